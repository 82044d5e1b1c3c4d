"""Sizing prefill and decode pools across GPU generations from Prometheus metrics.

- profile: what one replica of the reference pool does (ReplicaProfile, DEFAULT_PROFILE).
- capacity: what one replica of a pool takes, and placement across pools.
- trend: whether the arrival rate rises clearly, and how fast (the leading signal).
- policy: the pure decision (spec, observation, current state) -> desired replicas.
- prometheus: a small client for Prometheus's HTTP API with typed errors.
- metrics: the PromQL the autoscaler reads, turned into a policy Observation.
- daemon: the per-Model kopf daemon (importing it registers the daemon).
- simulator: the discrete-event replay of a request trace behind `baton simulate`.
- windows: attainment in every 5-minute window of a run (the worst one beside the average).
- oracle: the fleet that follows a trace's load exactly (a lower bound for GPU hours).

Nothing here imports torch or baton.workers (the operator image has neither).
"""
