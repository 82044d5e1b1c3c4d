"""Sizing prefill and decode pools across GPU generations from Prometheus metrics.

- profile: what one replica of the reference pool does (ReplicaProfile, DEFAULT_PROFILE).
- policy: the pure decision (spec, observation, current state) -> desired replicas.
- prometheus: a small client for Prometheus's HTTP API with typed errors.
- metrics: the PromQL the autoscaler reads, turned into a policy Observation.
- daemon: the per-Model kopf daemon (importing it registers the daemon).
- simulator: the discrete-event replay of a request trace behind `baton simulate`.

Nothing here imports torch or baton.workers (the operator image has neither).
"""
