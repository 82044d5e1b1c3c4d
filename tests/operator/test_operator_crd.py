"""The CRD: generated from the typed spec, validated with its own OpenAPI schema."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from baton.operator.crd import crd, crd_yaml
from baton.operator.fields import SpecError
from baton.operator.spec import Model

ROOT = Path(__file__).resolve().parents[2]
CHART_CRD = ROOT / "charts" / "baton" / "crds" / "models.baton.dev.yaml"
EXAMPLES = sorted((ROOT / "examples" / "models").glob("*.yaml"))


def schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(schema())


def good() -> dict:
    return {
        "apiVersion": "baton.dev/v1alpha1", "kind": "Model",
        "metadata": {"name": "nano", "namespace": "llm"},
        "spec": {
            "source": {"uri": "pvc://model-store/nano"},
            "quantization": "nvfp4",
            "router": {"replicas": 2, "routing": "round-robin"},
            "engine": {"maxModelLen": 8192, "cacheMemoryFraction": "0.85"},
            "prefill": {"gpusPerReplica": 1, "pools": [
                {"name": "blackwell", "gpuProduct": "NVIDIA-B200", "minReplicas": 1,
                 "maxReplicas": 4, "relativeSpeed": "2.5", "costPerHour": "10"},
                {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 0,
                 "maxReplicas": 8, "tolerations": [{"key": "gpu", "operator": "Exists"}]}]},
            "decode": {"speculativeTokens": 2, "pools": [
                {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "maxReplicas": 3,
                 "resources": {"cpu": "8", "memory": "64Gi"}}]},
            "autoscaling": {"enabled": True, "prometheusUrl": "http://prom:9090",
                            "targets": {"timeToFirstTokenSeconds": "2.0",
                                        "interTokenLatencySeconds": "0.05",
                                        "attainment": "0.95"}},
        },
    }


def test_chart_crd_is_generated_from_the_spec():
    assert CHART_CRD.read_text() == crd_yaml(), (
        "charts/baton/crds/models.baton.dev.yaml is stale: regenerate it with "
        "`python -m baton.operator.crd charts/baton/crds/models.baton.dev.yaml`")


def test_crd_shape():
    doc = crd()
    version = doc["spec"]["versions"][0]
    assert doc["metadata"]["name"] == "models.baton.dev"
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready", "Prefill", "Decode", "Endpoint", "Age"]
    assert doc["spec"]["names"]["shortNames"]
    spec = schema()["properties"]["spec"]
    assert spec["required"] == ["source", "prefill", "decode"]
    assert spec["properties"]["quantization"]["enum"] == ["auto", "nvfp4", "fp8", "bf16"]
    router = spec["properties"]["router"]["properties"]
    assert router["routing"]["enum"] == ["prefix-aware", "least-loaded", "round-robin"]
    assert router["routing"]["default"] == "prefix-aware"
    assert router["localPrefillMaxTokens"] == {
        "type": "integer", "minimum": 0, "maximum": 1048576, "default": 512,
        "description": router["localPrefillMaxTokens"]["description"]}
    prefix = spec["properties"]["engine"]["properties"]["prefixCache"]["properties"]
    assert prefix["enabled"]["default"] is True
    assert prefix["snapshotMemoryFraction"]["default"] == "0.25"
    assert prefix["snapshotIntervalTokens"]["default"] == 1024
    pool = spec["properties"]["prefill"]["properties"]["pools"]["items"]
    assert pool["properties"]["relativeSpeed"]["type"] == "string"
    rules = [r["rule"] for r in pool["x-kubernetes-validations"]]
    assert "self.minReplicas <= self.maxReplicas" in rules


def test_good_model_and_examples_validate():
    validator().validate(good())
    Model.from_resource(good())
    assert EXAMPLES, "examples/models/ holds no Model"
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Model":
                validator().validate(doc)
                Model.from_resource(doc)


def mutate(path: str, value) -> dict:
    obj = copy.deepcopy(good())
    node = obj
    keys = path.replace("]", "").replace("[", ".").split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is REMOVE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return obj


REMOVE = object()

# Bad input the OpenAPI schema itself rejects (admission), and the parser too.
SCHEMA_BAD = [
    ("spec.source", REMOVE),
    ("spec.decode", REMOVE),
    ("spec.quantization", "int4"),
    ("spec.router.routing", "random"),
    ("spec.router.replicas", -1),
    ("spec.router.replicas", "2"),
    ("spec.prefill.pools", []),
    ("spec.prefill.pools[0].name", "Blackwell"),
    ("spec.prefill.pools[0].name", "b" * 25),
    ("spec.prefill.pools[0].name", "-edge"),
    ("spec.prefill.pools[0].minReplicas", -1),
    ("spec.prefill.pools[0].relativeSpeed", 2.5),
    ("spec.prefill.pools[0].relativeSpeed", "fast"),
    ("spec.prefill.pools[0].fp4Path", "fp4"),
    ("spec.prefill.pools[0].tolerations", [{"operator": "Sometimes"}]),
    ("spec.decode.pools[0].resources", {"memory": "64 GB"}),
    ("spec.decode.speculativeTokens", 9),
    ("spec.prefill.gpusPerReplica", 0),
    ("spec.engine.dtype", "fp8"),
    ("spec.engine.cacheMemoryFraction", 0.9),
    ("spec.autoscaling.intervalSeconds", 1),
    ("spec.autoscaling.targets.attainment", "95%"),
    ("spec.autoscaling.prometheusUrl", "prom:9090"),
]


@pytest.mark.parametrize("path,value", SCHEMA_BAD)
def test_schema_rejects(path, value):
    bad = mutate(path, value)
    errors = list(validator().iter_errors(bad))
    assert errors, f"schema accepted {path}={value!r}"
    with pytest.raises(SpecError):
        Model.from_resource(bad)


# What OpenAPI cannot say goes into x-kubernetes-validations (CEL, checked by the API server);
# the parser enforces each rule too. Every rule in the CRD must appear here.
CEL_BAD = {
    "self.minReplicas <= self.maxReplicas":
        ("spec.prefill.pools[0].minReplicas", 5, "spec.prefill.pools[0].maxReplicas"),
    "self.pools.all(p, self.pools.exists_one(q, q.name == p.name))":
        ("spec.prefill.pools[1].name", "blackwell", "spec.prefill.pools[1].name"),
    "size(self.pools) >= 1":
        ("spec.decode.pools", [], "spec.decode.pools"),
    "self.gpusPerReplica % self.expertParallel == 0":
        ("spec.prefill.expertParallel", 2, "spec.prefill.expertParallel"),
    "self.maxModelLen % self.kvPageSize == 0":
        ("spec.engine.maxModelLen", 1000, "spec.engine.maxModelLen"),
    "!has(self.prefixCache) || self.prefixCache.snapshotIntervalTokens % self.kvPageSize == 0":
        ("spec.engine.prefixCache", {"snapshotIntervalTokens": 1000},
         "spec.engine.prefixCache.snapshotIntervalTokens"),
    "!self.enabled || has(self.prometheusUrl)":
        ("spec.autoscaling.prometheusUrl", REMOVE, "spec.autoscaling.prometheusUrl"),
    "self.requestBodyBudgetBytes >= self.maxRequestBodyBytes":
        ("spec.router.requestBodyBudgetBytes", 4096, "spec.router.requestBodyBudgetBytes"),
    "self.operator != 'Exists' || !has(self.value)":
        ("spec.prefill.pools[1].tolerations",
         [{"key": "gpu", "operator": "Exists", "value": "x"}],
         "spec.prefill.pools[1].tolerations[0].value"),
}


def _cel_rules(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            found.add(rule["rule"])
        for value in node.values():
            found |= _cel_rules(value)
    elif isinstance(node, list):
        for value in node:
            found |= _cel_rules(value)
    return found


def test_every_cel_rule_is_enforced_by_the_parser():
    assert _cel_rules(schema()) == set(CEL_BAD)
    for rule, (path, value, error_path) in CEL_BAD.items():
        with pytest.raises(SpecError) as info:
            Model.from_resource(mutate(path, value))
        assert info.value.path == error_path, (rule, str(info.value))


def test_status_schema_accepts_what_the_operator_writes():
    from baton.operator.status import model_status, now_rfc3339

    model = Model.from_resource({**good(), "metadata": {"name": "nano", "namespace": "llm",
                                                        "uid": "u", "generation": 2}})
    status = model_status(model, [], None, now_rfc3339())
    status["autoscaler"] = {"desired": {"prefill": {"blackwell": 2}}, "reason": "x",
                            "lastScaleTime": "2026-01-01T00:00:00Z", "extra": {"a": 1}}
    validator().validate({**good(), "status": status})


def _objects_with_rules(node, found=None):
    found = [] if found is None else found
    if isinstance(node, dict):
        if node.get("x-kubernetes-validations"):
            found.append(node)
        for value in node.values():
            _objects_with_rules(value, found)
    elif isinstance(node, list):
        for value in node:
            _objects_with_rules(value, found)
    return found


def test_cel_rules_only_read_fields_that_are_always_there():
    """The API server defaults fields before it runs the rules; a rule reading `self.x`
    outside has() needs x required or defaulted, else it errors on objects without x."""
    import re

    for node in _objects_with_rules(schema()):
        present = set(node.get("required", [])) | {
            name for name, prop in node["properties"].items() if "default" in prop}
        for rule in node["x-kubernetes-validations"]:
            guarded = set(re.findall(r"has\(self\.(\w+)\)", rule["rule"]))
            read = set(re.findall(r"(?<![\w.])self\.(\w+)", rule["rule"])) - guarded
            assert read <= present, (rule["rule"], read - present)
            assert rule["message"]


def test_lists_under_cel_are_bounded():
    """CEL cost estimation needs maxItems/maxLength on what the rules iterate."""
    spec = schema()["properties"]["spec"]["properties"]
    for role in ("prefill", "decode"):
        pools = spec[role]["properties"]["pools"]
        assert pools["maxItems"] <= 16
        assert pools["items"]["properties"]["name"]["maxLength"] <= 63


def apply_defaults(node: dict, obj):
    """Structural-schema defaulting, as the API server does before it runs the rules."""
    if isinstance(obj, dict) and node.get("type") == "object":
        for name, prop in (node.get("properties") or {}).items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj:
                apply_defaults(prop, obj[name])
    elif isinstance(obj, list) and node.get("type") == "array":
        for item in obj:
            apply_defaults(node["items"], item)
    return obj


def failing_rules(node: dict, obj, evaluate) -> set[str]:
    """Every CEL rule that evaluates to false somewhere in `obj` under schema `node`."""
    failed = set()
    if isinstance(obj, dict) and node.get("type") == "object":
        for rule in node.get("x-kubernetes-validations", []):
            if not evaluate(rule["rule"], obj):
                failed.add(rule["rule"])
        for name, prop in (node.get("properties") or {}).items():
            if name in obj:
                failed |= failing_rules(prop, obj[name], evaluate)
    elif isinstance(obj, list) and node.get("type") == "array":
        for item in obj:
            failed |= failing_rules(node["items"], item, evaluate)
    return failed


def test_cel_rules_evaluate_as_the_parser_decides():
    """Runs the CRD's CEL rules with a CEL interpreter: the good Model passes every rule,
    each bad example fails exactly its rule (and the parser rejects it too, above)."""
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")

    env = celpy.Environment()
    programs = {}

    def evaluate(rule: str, obj) -> bool:
        if rule not in programs:
            programs[rule] = env.program(env.compile(rule))
        return bool(programs[rule].evaluate({"self": celpy.json_to_cel(obj)}))

    spec_schema = schema()["properties"]["spec"]
    assert failing_rules(spec_schema, apply_defaults(spec_schema, good()["spec"]),
                         evaluate) == set()
    for rule, (path, value, _) in CEL_BAD.items():
        bad = apply_defaults(spec_schema, mutate(path, value)["spec"])
        assert failing_rules(spec_schema, bad, evaluate) == {rule}, rule


def test_the_generator_writes_a_named_file_and_only_that(tmp_path, capsys, monkeypatch):
    from baton.operator import crd

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "models.yaml"
    assert crd.main([str(out)]) == 0
    assert out.read_text() == crd.crd_yaml()
    with pytest.raises(SystemExit) as e:
        crd.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
    assert not (tmp_path / "--help").exists()
