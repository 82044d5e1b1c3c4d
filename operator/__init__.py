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
