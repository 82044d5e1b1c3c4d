"""baton.operator: the Model custom resource, its builders, the Kopf handlers and the autoscaler.

    spec        the typed Model (spec, the status the builders read) and WorkerConfig
    fields      declared fields: one description feeds the parser and the CRD schema
    crd         the CustomResourceDefinition generated from spec
    builders    pure: Model -> the Kubernetes objects it owns
    status      pure: owned Deployments (and pods) -> conditions and counts
    reconcile   the level-based reconcile (API calls through kube)
    handlers    thin Kopf adapters; `python -m baton.operator` runs them
    autoscaler  Prometheus-driven sizing of the pools (a Kopf daemon per Model)

Never imports baton.workers or baton.kernels (the operator image has no torch).
"""

import os as _os

if __name__ == "operator":
    # This folder is imported as the top-level `operator` only when the repository root is on
    # sys.path ahead of the standard library (`python -m ...` or `python -c` run from a
    # checkout, before anything imported the real module). Become the standard library's
    # `operator` then, instead of shadowing it: collections, contextlib and runpy import it.
    # importlib may itself be mid-import here, so the source is executed directly.
    _stdlib_operator = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    with open(_stdlib_operator, encoding="utf-8") as _source:
        exec(compile(_source.read(), _stdlib_operator, "exec"))
    __file__ = _stdlib_operator
    del __path__  # a module, not a package
