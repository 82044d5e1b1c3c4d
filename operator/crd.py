"""The Model CustomResourceDefinition, generated from the typed spec.

The spec schema comes from the field declarations in baton.operator.spec (the same ones the
parser reads), so the CRD and the operator's validation cannot drift; a test checks that the
chart's copy equals `crd()`. Regenerate the chart's copy with:

    python -m baton.operator.crd charts/baton/crds/models.baton.dev.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from baton.operator.fields import openapi_schema
from baton.operator.spec import GROUP, KIND, PLURAL, VERSION, ModelSpec

SHORT_NAMES = ["bm"]
CATEGORIES = ["baton"]


def _replica_counts() -> dict:
    pool = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"},
        "desiredReplicas": {"type": "integer", "minimum": 0},
        "replicas": {"type": "integer", "minimum": 0},
        "readyReplicas": {"type": "integer", "minimum": 0}}}
    return {"type": "object", "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "readyReplicas": {"type": "integer", "minimum": 0},
        "pools": {"type": "array", "items": pool}}}


def status_schema() -> dict:
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]*$"},
            "message": {"type": "string"},
            "observedGeneration": {"type": "integer", "minimum": 0},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
        },
    }
    per_role = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
    return {
        "type": "object",
        "properties": {
            "observedGeneration": {"type": "integer", "minimum": 0},
            "endpoint": {"type": "string"},
            "conditions": {"type": "array", "items": condition,
                           "x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["type"]},
            "prefill": _replica_counts(),
            "decode": _replica_counts(),
            "router": {"type": "object", "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "readyReplicas": {"type": "integer", "minimum": 0}}},
            # Written only by the autoscaler; it may record more than the operator reads.
            "autoscaler": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {
                    "desired": {"type": "object",
                                "properties": {"prefill": per_role, "decode": per_role}},
                    "lastScaleTime": {"type": "string"},
                    "reason": {"type": "string"},
                },
            },
        },
    }


PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string",
     "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Prefill", "type": "integer", "jsonPath": ".status.prefill.readyReplicas",
     "description": "Ready prefill replicas"},
    {"name": "Decode", "type": "integer", "jsonPath": ".status.decode.readyReplicas",
     "description": "Ready decode replicas"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict:
    spec_schema = openapi_schema(ModelSpec)
    spec_schema["description"] = ("What to serve and how: the checkpoint, prefill and decode "
                                   "pools per GPU product, the router and autoscaling.")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL,
                      "singular": KIND.lower(), "shortNames": SHORT_NAMES,
                      "categories": CATEGORIES},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A model served by baton with disaggregated prefill and "
                                   "decode worker pools.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema(),
                    },
                }},
            }],
        },
    }


def crd_yaml() -> str:
    header = ("# Generated by `python -m baton.operator.crd` from baton.operator.spec; "
              "do not edit.\n")
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m baton.operator.crd",
        description="Write the Model CRD generated from operator/spec.py.")
    parser.add_argument("out", nargs="?", type=Path,
                        help="file to write (default: standard output)")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    text = crd_yaml()
    if ns.out is not None:
        ns.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
