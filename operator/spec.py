"""The Model resource, typed: spec, the status fields the operator reads, and WorkerConfig.

Imports neither kopf nor torch: the workers read WorkerConfig from here, and `baton up`
parses the same Model YAML a cluster gets.

    model = Model.from_resource(obj)          # SpecError("spec.prefill.pools[1].maxReplicas: ...")
    cfg = worker_config(model, "/models/m")   # what the ConfigMap and `baton up` hand the workers
    cfg = WorkerConfig.load(path)             # what a worker reads at start

Every field is declared once (baton.operator.fields.spec_field): the parser below and the
CRD schema (baton.operator.crd) both come from these declarations. The Model and the worker
configuration derived from it stay in one module on purpose: together they are the contract
the other parts import (DESIGN.md, Seams).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from baton.operator.fields import CelRule, SpecError, dump, parse, spec_field

__all__ = [
    "ROLES", "ROUTINGS", "SpecError", "Model", "ModelSpec", "SourceSpec", "EngineSpec",
    "PrefixCacheSpec", "ReasoningSpec", "RouterSpec", "PoolSpec", "ResourceRequests", "Toleration",
    "PrefillSpec", "DecodeSpec",
    "AutoscalingSpec", "TargetsSpec", "NetworkPolicySpec", "ModelStatus", "WorkerConfig",
    "PrefillConfig", "DecodeConfig", "RouterConfig", "PoolConfig", "PoolsConfig",
    "worker_config", "default_fp4_path", "load_model_file",
]

GROUP = "baton.dev"
VERSION = "v1alpha1"
KIND = "Model"
PLURAL = "models"

ROLES = ("prefill", "decode")
QUANTIZATIONS = ("auto", "nvfp4", "fp8", "bf16")
ROUTINGS = ("prefix-aware", "least-loaded", "round-robin")
DTYPES = ("auto", "bfloat16", "float16", "float32")
FP4_PATHS = ("native", "w4a16")

# Pool names become part of object names (<model>-<role>-<pool>): DNS-1123 label characters.
POOL_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
POOL_NAME_MAX = 24
# Bounded so that the API server can cost the pool-name uniqueness rule (CEL).
MAX_POOLS = 16
MAX_RAMP_HEADROOM = 1.0
"""autoscaling.rampPerMinute may ask for at most this much spare capacity (a share of the load)."""
# Kubernetes resource quantities ("500m", "8", "64Gi").
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
SOURCE_SCHEMES = ("pvc://", "file://", "hf://")
# Object names built from metadata.name must stay valid Service names (DNS-1035 labels).
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NAME_MAX = 63

# Blackwell parts run the native NVFP4 path; everything older runs W4A16 (FP4 weights,
# 16-bit activations). Matched as a whole token of the node label, e.g. "NVIDIA-B200".
_BLACKWELL = re.compile(r"(^|[-_ ])(GB|B)(100|200|300)([-_ ]|$)", re.IGNORECASE)


def default_fp4_path(gpu_product: str) -> str:
    """native on Blackwell (B100/B200/B300/GB200/GB300), else w4a16."""
    return "native" if _BLACKWELL.search(gpu_product or "") else "w4a16"


# ----------------------------------------------------------------------------------------
# spec


@dataclass(frozen=True)
class SourceSpec:
    uri: str = spec_field(
        "uri", "Where the checkpoint is: pvc://claim/path (a PersistentVolumeClaim), "
        "file:///path (a node path), hf://org/name (pre-pulled into the cache claim); "
        "`baton up` also takes a filesystem path, relative to the YAML file.")
    cache_claim: str | None = spec_field(
        "cacheClaim", "For hf:// sources: the PersistentVolumeClaim holding the pre-pulled "
        "cache (<claim>/<org>/<name>); without it a node path /var/lib/baton/hf is used.",
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

    @property
    def scheme(self) -> str:
        """pvc, file, hf, or path (a filesystem path: `baton up` only)."""
        for prefix in SOURCE_SCHEMES:
            if self.uri.startswith(prefix):
                return prefix[:-3]
        return "path"

    def check(self, path: str) -> None:
        uri, scheme = self.uri, self.scheme
        if not uri:
            raise SpecError(f"{path}.uri", "must not be empty")
        if scheme == "pvc":
            claim, _, _ = uri[len("pvc://"):].partition("/")
            if not re.match(r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", claim):
                raise SpecError(f"{path}.uri", f"pvc:// needs a claim name (pvc://claim/path), "
                                               f"got {uri!r}")
        elif scheme == "file":
            if not uri[len("file://"):].startswith("/"):
                raise SpecError(f"{path}.uri", f"file:// needs an absolute path "
                                               f"(file:///path), got {uri!r}")
        elif scheme == "hf":
            repo = uri[len("hf://"):]
            if not re.match(r"^[A-Za-z0-9][-._A-Za-z0-9]*/[A-Za-z0-9][-._A-Za-z0-9]*$", repo):
                raise SpecError(f"{path}.uri", f"hf:// needs org/name, got {uri!r}")
        elif "://" in uri:
            raise SpecError(f"{path}.uri", f"unknown scheme in {uri!r}; allowed: pvc://, "
                                           f"file://, hf://, or a path")
        if self.cache_claim is not None and scheme != "hf":
            raise SpecError(f"{path}.cacheClaim", f"only applies to hf:// sources, "
                                                  f"not {scheme}")


@dataclass(frozen=True)
class PrefixCacheSpec:
    enabled: bool = spec_field(
        "enabled", "Keep prompt prefixes on both roles for later requests to reuse: attention "
        "KV pages and Mamba state snapshots (a hit needs both).", default=True)
    snapshot_memory_fraction: float = spec_field(
        "snapshotMemoryFraction", "Share of a worker's cache memory that holds Mamba state "
        "snapshots (the rest holds KV pages), a decimal string in (0, 0.9].", default=0.25,
        decimal=True, minimum=0, exclusive_minimum=True, maximum=0.9)
    snapshot_interval_tokens: int = spec_field(
        "snapshotIntervalTokens", "Also snapshot every this many tokens inside long prompts "
        "(shared system prompts, documents), besides prompt and request ends; 0: only there. "
        "A multiple of kvPageSize.", default=1024, minimum=0, maximum=1048576)


@dataclass(frozen=True)
class EngineSpec:
    max_model_len: int = spec_field(
        "maxModelLen", "Longest sequence (prompt + output tokens) a request may reach.",
        default=4096, minimum=16, maximum=1048576)
    kv_page_size: int = spec_field(
        "kvPageSize", "Tokens per KV-cache page.", default=16, minimum=1, maximum=1024)
    cache_memory_fraction: float = spec_field(
        "cacheMemoryFraction", "Share of GPU memory the engine may use for weights and "
        "caches, a decimal string in (0, 1].", default=0.9, decimal=True, minimum=0,
        exclusive_minimum=True, maximum=1)
    dtype: str = spec_field(
        "dtype", "Activation dtype; auto follows the checkpoint.", default="auto",
        enum=DTYPES)
    cuda_graphs: bool = spec_field(
        "cudaGraphs", "Replay decode and MTP-verify steps as CUDA graphs per batch-size "
        "bucket; false runs every step eagerly.", default=True)
    compile: bool = spec_field(
        "compile", "Without CUDA (the torch path on the CPU): run decode, MTP-verify and "
        "MTP-draft steps as one torch.compile'd (inductor) function per batch-size bucket, "
        "compiled at start before the worker reports ready (cached on disk under the "
        "worker's cache directory; minutes on a small CPU the first time); false runs them "
        "eagerly.", default=False)
    prefix_cache: PrefixCacheSpec = spec_field(
        "prefixCache", "The prefix cache (KV pages and Mamba snapshots) of every worker.",
        default_factory=PrefixCacheSpec)

    def check(self, path: str) -> None:
        if self.max_model_len % self.kv_page_size:
            raise SpecError(f"{path}.maxModelLen",
                            f"must be a multiple of kvPageSize ({self.kv_page_size}), "
                            f"got {self.max_model_len}")
        interval = self.prefix_cache.snapshot_interval_tokens
        if interval % self.kv_page_size:
            raise SpecError(f"{path}.prefixCache.snapshotIntervalTokens",
                            f"must be a multiple of kvPageSize ({self.kv_page_size}), got "
                            f"{interval}")

    __rules__ = (CelRule("self.maxModelLen % self.kvPageSize == 0",
                         "maxModelLen must be a multiple of kvPageSize"),
                 CelRule("!has(self.prefixCache) || "
                         "self.prefixCache.snapshotIntervalTokens % self.kvPageSize == 0",
                         "prefixCache.snapshotIntervalTokens must be a multiple of "
                         "kvPageSize"))


REASONING_EFFORTS = ("minimal", "low", "medium", "high")


@dataclass(frozen=True)
class ReasoningSpec:
    """Reasoning budgets by effort level: OpenAI's `reasoning_effort` (chat) and
    `reasoning.effort` (Responses) pick one ("none" turns thinking off instead)."""

    minimal_tokens: int = spec_field(
        "minimalTokens", "Reasoning tokens allowed at effort minimal.", default=128,
        minimum=0, maximum=1048576)
    low_tokens: int = spec_field(
        "lowTokens", "Reasoning tokens allowed at effort low.", default=512, minimum=0,
        maximum=1048576)
    medium_tokens: int = spec_field(
        "mediumTokens", "Reasoning tokens allowed at effort medium.", default=2048,
        minimum=0, maximum=1048576)
    high_tokens: int = spec_field(
        "highTokens", "Reasoning tokens allowed at effort high.", default=8192, minimum=0,
        maximum=1048576)
    default_effort: str | None = spec_field(
        "defaultEffort", "The effort of a request that names none; unset: reasoning is not "
        "bounded (but for max_tokens).", default=None, enum=REASONING_EFFORTS)

    def budget(self, effort: str) -> int:
        """The token budget of an effort level (one of REASONING_EFFORTS)."""
        return {"minimal": self.minimal_tokens, "low": self.low_tokens,
                "medium": self.medium_tokens, "high": self.high_tokens}[effort]


@dataclass(frozen=True)
class RouterSpec:
    replicas: int = spec_field("replicas", "Router replicas.", default=1, minimum=0,
                               maximum=64)
    routing: str = spec_field(
        "routing", "How the router picks workers: prefix-aware (by the deepest prompt prefix a "
        "worker holds with a Mamba snapshot, balanced against load, and a session's "
        "prompt_cache_key), least-loaded, or round-robin.", default="prefix-aware",
        enum=ROUTINGS)
    request_timeout_seconds: int = spec_field(
        "requestTimeoutSeconds", "Deadline of a whole request.", default=600, minimum=1,
        maximum=86400)
    transfer_timeout_seconds: int = spec_field(
        "transferTimeoutSeconds", "Deadline of one prefill-to-decode state transfer.",
        default=30, minimum=1, maximum=3600)
    max_queued_requests: int = spec_field(
        "maxQueuedRequests", "Requests the router queues before answering 429.",
        default=256, minimum=1, maximum=1000000)
    local_prefill_max_tokens: int = spec_field(
        "localPrefillMaxTokens", "A decode worker whose prefix cache holds all but at most "
        "this many tokens of a prompt prefills them itself (no prefill worker, no state "
        "transfer); with prefix-aware routing up to 8 times as many where the prefill "
        "workers' caches lag so far that they would compute over 1.3 times as much; 0: "
        "never.", default=512, minimum=0, maximum=1048576)
    api_keys_secret: str | None = spec_field(
        "apiKeysSecret", "A Secret whose key `keys` lists accepted API keys, one per line; "
        "unset: no API keys.", default=None, pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
    max_request_body_bytes: int = spec_field(
        "maxRequestBodyBytes", "Largest request body the router reads; larger ones get 413.",
        default=16 * 1024**2, minimum=1024, maximum=1024**3)
    request_body_budget_bytes: int = spec_field(
        "requestBodyBudgetBytes", "Bytes of request bodies one router holds at once (read, "
        "not yet decoded); a request whose body would pass it gets 503 before its body is "
        "read. At least maxRequestBodyBytes; keep it well under memoryLimit.",
        default=128 * 1024**2, minimum=1024, maximum=16 * 1024**3)
    memory_limit: str = spec_field(
        "memoryLimit", "Memory limit of a router container (\"2Gi\").", default="2Gi",
        pattern=QUANTITY_PATTERN)
    reasoning: ReasoningSpec = spec_field(
        "reasoning", "Reasoning token budgets per effort level (thinking models).",
        default_factory=ReasoningSpec)

    def check(self, path: str) -> None:
        if self.request_body_budget_bytes < self.max_request_body_bytes:
            raise SpecError(f"{path}.requestBodyBudgetBytes",
                            f"must be at least maxRequestBodyBytes "
                            f"({self.max_request_body_bytes}), got "
                            f"{self.request_body_budget_bytes}")

    __rules__ = (
        CelRule("self.requestBodyBudgetBytes >= self.maxRequestBodyBytes",
                "requestBodyBudgetBytes must be at least maxRequestBodyBytes"),
    )


@dataclass(frozen=True)
class ResourceRequests:
    cpu: str | None = spec_field("cpu", "CPU request of a worker pod (\"8\", \"500m\").",
                                 default=None, pattern=QUANTITY_PATTERN)
    memory: str | None = spec_field("memory", "Memory request of a worker pod (\"64Gi\").",
                                    default=None, pattern=QUANTITY_PATTERN)


@dataclass(frozen=True)
class Toleration:
    key: str | None = spec_field("key", "Taint key; unset with Exists matches every taint.",
                                 default=None)
    operator: str = spec_field("operator", "Exists or Equal.", default="Equal",
                               enum=("Exists", "Equal"))
    value: str | None = spec_field("value", "Taint value (Equal).", default=None)
    effect: str | None = spec_field("effect", "Taint effect; unset matches all.",
                                    default=None,
                                    enum=("NoSchedule", "PreferNoSchedule", "NoExecute"))
    toleration_seconds: int | None = spec_field(
        "tolerationSeconds", "How long a NoExecute taint is tolerated.", default=None,
        minimum=0)

    def check(self, path: str) -> None:
        if self.operator == "Exists" and self.value is not None:
            raise SpecError(f"{path}.value", "must be unset when operator is Exists")

    __rules__ = (CelRule("self.operator != 'Exists' || !has(self.value)",
                         "value must be unset when operator is Exists"),)

    def to_k8s(self) -> dict:
        out = {k: v for k, v in dump(self).items() if v is not None}
        return out


@dataclass(frozen=True)
class PoolSpec:
    name: str = spec_field("name", "Pool name, part of object names and the `pool` metric "
                           "label.", pattern=POOL_NAME_PATTERN, max_length=POOL_NAME_MAX)
    gpu_product: str = spec_field(
        "gpuProduct", "Node label nvidia.com/gpu.product of the pool's nodes "
        "(e.g. NVIDIA-B200, NVIDIA-H100-80GB-HBM3); empty: no GPU product selector.",
        default="", max_length=63)
    node_selector: dict[str, str] = spec_field(
        "nodeSelector", "Extra node selector labels.", default_factory=dict)
    tolerations: tuple[Toleration, ...] = spec_field(
        "tolerations", "Tolerations of the pool's pods.", default_factory=tuple,
        max_items=32)
    min_replicas: int = spec_field("minReplicas", "Fewest replicas.", default=1, minimum=0,
                                   maximum=1000)
    max_replicas: int = spec_field("maxReplicas", "Most replicas.", default=1, minimum=0,
                                   maximum=1000)
    relative_speed: float = spec_field(
        "relativeSpeed", "Capacity of one replica relative to the reference pool, a decimal "
        "string > 0.", default=1.0, decimal=True, minimum=0, exclusive_minimum=True)
    cost_per_hour: float = spec_field(
        "costPerHour", "Cost of one replica per hour, a decimal string; cheaper capacity "
        "(costPerHour / relativeSpeed) is used first.", default=1.0, decimal=True, minimum=0)
    fp4_path_override: str | None = spec_field(
        "fp4Path", "NVFP4 kernel path: native (Blackwell) or w4a16; unset: from gpuProduct.",
        default=None, enum=FP4_PATHS)
    resources: ResourceRequests | None = spec_field(
        "resources", "CPU and memory requests of a worker pod.", default=None)

    @property
    def fp4_path(self) -> str:
        return self.fp4_path_override or default_fp4_path(self.gpu_product)

    def check(self, path: str) -> None:
        if self.max_replicas < self.min_replicas:
            raise SpecError(f"{path}.maxReplicas", f"must be >= minReplicas "
                                                   f"({self.min_replicas}), got "
                                                   f"{self.max_replicas}")
        if "nvidia.com/gpu.product" in self.node_selector:
            raise SpecError(f"{path}.nodeSelector.nvidia.com/gpu.product",
                            "set it through gpuProduct")

    __rules__ = (CelRule("self.minReplicas <= self.maxReplicas",
                         "minReplicas must be <= maxReplicas"),)


_POOL_RULES = (
    CelRule("size(self.pools) >= 1", "each role needs at least one pool"),
    CelRule("self.pools.all(p, self.pools.exists_one(q, q.name == p.name))",
            "pool names must be unique within a role"),
    CelRule("self.gpusPerReplica % self.expertParallel == 0",
            "expertParallel must divide gpusPerReplica"),
)


def _check_role(role: Any, path: str) -> None:
    seen: set[str] = set()
    for i, pool in enumerate(role.pools):
        if pool.name in seen:
            raise SpecError(f"{path}.pools[{i}].name",
                            f"must be unique within the role, {pool.name!r} repeats")
        seen.add(pool.name)
    if role.gpus_per_replica % role.expert_parallel:
        raise SpecError(f"{path}.expertParallel",
                        f"must divide gpusPerReplica ({role.gpus_per_replica}), got "
                        f"{role.expert_parallel}")


@dataclass(frozen=True)
class PrefillSpec:
    pools: tuple[PoolSpec, ...] = spec_field("pools", "GPU pools of prefill workers.",
                                             min_items=1, max_items=MAX_POOLS)
    gpus_per_replica: int = spec_field("gpusPerReplica", "GPUs per replica (one pod).",
                                       default=1, minimum=1, maximum=16)
    expert_parallel: int = spec_field("expertParallel", "Expert-parallel ranks across the "
                                      "replica's GPUs.", default=1, minimum=1, maximum=16)
    max_batch_tokens: int = spec_field("maxBatchTokens", "Prompt tokens per prefill batch.",
                                       default=8192, minimum=16, maximum=1048576)

    def check(self, path: str) -> None:
        _check_role(self, path)

    __rules__ = _POOL_RULES


@dataclass(frozen=True)
class DecodeSpec:
    pools: tuple[PoolSpec, ...] = spec_field("pools", "GPU pools of decode workers.",
                                             min_items=1, max_items=MAX_POOLS)
    gpus_per_replica: int = spec_field("gpusPerReplica", "GPUs per replica (one pod).",
                                       default=1, minimum=1, maximum=16)
    expert_parallel: int = spec_field("expertParallel", "Expert-parallel ranks across the "
                                      "replica's GPUs.", default=1, minimum=1, maximum=16)
    max_concurrency: int = spec_field("maxConcurrency", "Sequences one decode replica runs "
                                      "at once.", default=128, minimum=1, maximum=4096)
    speculative_tokens: int = spec_field("speculativeTokens", "MTP draft tokens per step; "
                                         "0 = off.", default=0, minimum=0, maximum=8)

    def check(self, path: str) -> None:
        _check_role(self, path)

    __rules__ = _POOL_RULES


@dataclass(frozen=True)
class TargetsSpec:
    time_to_first_token_seconds: float = spec_field(
        "timeToFirstTokenSeconds", "Per-request TTFT limit (drives prefill).", default=2.0,
        decimal=True, minimum=0, exclusive_minimum=True)
    inter_token_latency_seconds: float = spec_field(
        "interTokenLatencySeconds", "Per-request mean gap between output tokens (drives "
        "decode).", default=0.05, decimal=True, minimum=0, exclusive_minimum=True)
    attainment: float = spec_field(
        "attainment", "Share of requests kept within both limits, in (0, 1].", default=0.95,
        decimal=True, minimum=0, exclusive_minimum=True, maximum=1)


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = spec_field("enabled", "Size pools from metrics; off: minReplicas.",
                               default=False)
    prometheus_url: str | None = spec_field(
        "prometheusUrl", "Prometheus HTTP API base URL (required when enabled).",
        default=None, pattern=r"^https?://")
    interval_seconds: int = spec_field("intervalSeconds", "Seconds between decisions.",
                                       default=30, minimum=5, maximum=3600)
    scale_down_stabilization_seconds: int = spec_field(
        "scaleDownStabilizationSeconds", "Seconds a lower size must hold before scaling "
        "down.", default=300, minimum=0, maximum=86400)
    startup_seconds: int = spec_field(
        "startupSeconds", "Seconds from adding a replica to its serving (scheduling, image "
        "pull, loading weights): a rising load is projected this far ahead, so capacity is "
        "ready when the load arrives.", default=90, minimum=0, maximum=3600)
    pending_timeout_seconds: int = spec_field(
        "pendingTimeoutSeconds", "Seconds a pod may stay Pending before its pool counts as "
        "full and capacity overflows to the next pool.", default=120, minimum=1,
        maximum=86400)
    targets: TargetsSpec = spec_field("targets", "Latency targets.",
                                      default_factory=TargetsSpec)
    ramp_per_minute: float = spec_field(
        "rampPerMinute", "The steepest rise of the load kept within the targets, as a share "
        "of the load per minute (\"0.1\": 10 %/min). Replicas added at a ramp's onset serve "
        "one start-up later, so the fleet keeps the spare capacity this rise needs over "
        "startupSeconds plus one intervalSeconds; a steeper ramp is reported as infeasible "
        "(baton simulate), not absorbed. The rise over that time may be at most the load "
        "itself (spare capacity of 1x).",
        default=0.04, decimal=True, minimum=0, maximum=10)

    def ramp_headroom(self) -> float:
        """The spare capacity, as a share of the load, that rampPerMinute asks for: the rise
        over one start-up plus the interval until the next decision sees it."""
        return self.ramp_per_minute * (self.startup_seconds + self.interval_seconds) / 60.0

    def check(self, path: str) -> None:
        if self.enabled and not self.prometheus_url:
            raise SpecError(f"{path}.prometheusUrl", "is required when enabled is true")
        headroom = self.ramp_headroom()
        if self.enabled and headroom > MAX_RAMP_HEADROOM + 1e-9:
            raise SpecError(
                f"{path}.rampPerMinute",
                f"a ramp of {self.ramp_per_minute:g} of the load per minute rises by "
                f"{headroom:.2f}x the load over startupSeconds {self.startup_seconds} + "
                f"intervalSeconds {self.interval_seconds}, more than the "
                f"{MAX_RAMP_HEADROOM:g}x of spare capacity a fleet may keep: such a ramp "
                f"cannot be absorbed; lower rampPerMinute to at most "
                f"{MAX_RAMP_HEADROOM * 60 / (self.startup_seconds + self.interval_seconds):.3g}"
                " or shorten startupSeconds")

    __rules__ = (CelRule("!self.enabled || has(self.prometheusUrl)",
                         "prometheusUrl is required when enabled is true"),)


@dataclass(frozen=True)
class NetworkPolicySpec:
    enabled: bool = spec_field(
        "enabled", "Create a NetworkPolicy so that only the model's router and its peer "
        "workers reach the workers' gRPC port (metrics stay reachable).", default=False)


@dataclass(frozen=True)
class ModelSpec:
    source: SourceSpec = spec_field("source", "Where the checkpoint is.")
    prefill: PrefillSpec = spec_field("prefill", "Prefill workers.")
    decode: DecodeSpec = spec_field("decode", "Decode workers.")
    quantization: str = spec_field(
        "quantization", "Weight format: auto reads it from the checkpoint; a mismatch is "
        "reported as a condition.", default="auto", enum=QUANTIZATIONS)
    image: str = spec_field("image", "Worker image; empty: the operator's configured image.",
                            default="")
    served_model_name: str = spec_field(
        "servedModelName", "The model name clients send; empty: metadata.name.", default="",
        max_length=253)
    engine: EngineSpec = spec_field("engine", "Engine knobs shared by all workers.",
                                    default_factory=EngineSpec)
    router: RouterSpec = spec_field("router", "The OpenAI-compatible router.",
                                    default_factory=RouterSpec)
    autoscaling: AutoscalingSpec = spec_field("autoscaling", "Metric-driven pool sizing.",
                                              default_factory=AutoscalingSpec)
    network_policy: NetworkPolicySpec = spec_field("networkPolicy", "Worker isolation.",
                                                   default_factory=NetworkPolicySpec)

    def role(self, name: str) -> PrefillSpec | DecodeSpec:
        if name not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {name!r}")
        return self.prefill if name == "prefill" else self.decode


# ----------------------------------------------------------------------------------------
# status (the parts the operator reads back)


@dataclass(frozen=True)
class ModelStatus:
    """What the builders read from status: the autoscaler's desired replicas, if any.

    `desired[role][pool]`; written only by the autoscaler (DESIGN.md, Seams).
    """

    desired: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_status(cls, status: Any) -> ModelStatus:
        status = status or {}
        autoscaler = status.get("autoscaler") or {}
        desired_obj = autoscaler.get("desired") or {}
        path = "status.autoscaler.desired"
        if not isinstance(desired_obj, dict):
            raise SpecError(path, f"must be an object, got {type(desired_obj).__name__}")
        desired: dict[str, dict[str, int]] = {}
        for role, pools in desired_obj.items():
            if role not in ROLES:
                raise SpecError(f"{path}.{role}", f"unknown role; allowed: {', '.join(ROLES)}")
            if not isinstance(pools, dict):
                raise SpecError(f"{path}.{role}", "must be an object of pool: replicas")
            for pool, n in pools.items():
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise SpecError(f"{path}.{role}.{pool}",
                                    f"must be an integer >= 0, got {n!r}")
            desired[role] = dict(pools)
        return cls(desired=desired)


# ----------------------------------------------------------------------------------------
# the resource


@dataclass(frozen=True)
class Model:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: ModelSpec
    status: ModelStatus = field(default_factory=ModelStatus)

    @classmethod
    def from_resource(cls, obj: dict) -> Model:
        """Parses a Model resource (a dict); SpecError names the field path at fault."""
        if not isinstance(obj, dict):
            raise SpecError("<resource>", f"must be an object, got {type(obj).__name__}")
        kind = obj.get("kind")
        if kind is not None and kind != KIND:
            raise SpecError("kind", f"must be {KIND}, got {kind!r}")
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError("metadata.name", "is required")
        _check_model_name(name, obj.get("spec"))
        spec = parse(ModelSpec, obj.get("spec"), "spec")
        generation = meta.get("generation") or 0
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise SpecError("metadata.generation", f"must be an integer, got {generation!r}")
        return cls(name=name, namespace=meta.get("namespace") or "default",
                   uid=meta.get("uid") or "", generation=generation, spec=spec,
                   status=ModelStatus.from_status(obj.get("status")))

    @property
    def served_model_name(self) -> str:
        return self.spec.served_model_name or self.name

    def desired_replicas(self, role: str, pool: PoolSpec) -> int:
        """The autoscaler's decision when autoscaling is on and one exists, else minReplicas,
        clamped to [minReplicas, maxReplicas] (a stale decision never breaks the bounds)."""
        if self.spec.autoscaling.enabled:
            decided = self.status.desired.get(role, {}).get(pool.name)
            if decided is not None:
                return max(pool.min_replicas, min(pool.max_replicas, decided))
        return pool.min_replicas


def _check_model_name(name: str, spec: Any) -> None:
    """Names derived from metadata.name must be valid Service and Deployment names."""
    if not _DNS1035.match(name):
        raise SpecError("metadata.name", f"must be a DNS-1035 label (lowercase letters, "
                                         f"digits, '-', starting with a letter), got {name!r}")
    longest = max([len("workers")] + [
        len(role) + 1 + len(str(p.get("name", "")))
        for role in ROLES
        for p in ((spec or {}).get(role) or {}).get("pools") or [] if isinstance(p, dict)])
    if len(name) + 1 + longest > _NAME_MAX:
        raise SpecError("metadata.name", f"{name!r} is too long: <name>-<role>-<pool> must fit "
                                         f"in {_NAME_MAX} characters, so at most "
                                         f"{_NAME_MAX - 1 - longest} here")


def load_model_file(path: str | Path) -> tuple[Model, dict]:
    """Reads a Model YAML file (the first Model document); returns the Model and the raw dict."""
    text = Path(path).read_text()
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return Model.from_resource(doc), doc
    raise SpecError(str(path), f"holds no document of kind {KIND}")


# ----------------------------------------------------------------------------------------
# worker configuration (the file every worker and the router reads)


@dataclass(frozen=True)
class PrefillConfig:
    max_batch_tokens: int = spec_field("maxBatchTokens", "Prompt tokens per batch.",
                                       default=8192, minimum=1)
    expert_parallel: int = spec_field("expertParallel", "EP ranks.", default=1, minimum=1)
    gpus_per_replica: int = spec_field("gpusPerReplica", "GPUs per replica.", default=1,
                                       minimum=1)


@dataclass(frozen=True)
class DecodeConfig:
    max_concurrency: int = spec_field("maxConcurrency", "Sequences at once.", default=128,
                                      minimum=1)
    speculative_tokens: int = spec_field("speculativeTokens", "MTP draft tokens.", default=0,
                                         minimum=0)
    expert_parallel: int = spec_field("expertParallel", "EP ranks.", default=1, minimum=1)
    gpus_per_replica: int = spec_field("gpusPerReplica", "GPUs per replica.", default=1,
                                       minimum=1)


@dataclass(frozen=True)
class RouterConfig:
    routing: str = spec_field("routing", "Worker choice.", default="prefix-aware",
                              enum=ROUTINGS)
    max_queued_requests: int = spec_field("maxQueuedRequests", "Queue before 429.",
                                          default=256, minimum=1)
    local_prefill_max_tokens: int = spec_field(
        "localPrefillMaxTokens", "Uncached prompt tokens a decode worker prefills itself.",
        default=512, minimum=0)
    request_timeout_seconds: float = spec_field("requestTimeoutSeconds", "Request deadline.",
                                                default=600, minimum=0,
                                                exclusive_minimum=True)
    transfer_timeout_seconds: float = spec_field("transferTimeoutSeconds",
                                                 "State transfer deadline.", default=30,
                                                 minimum=0, exclusive_minimum=True)
    api_keys_file: str | None = spec_field("apiKeysFile", "File of API keys, one per line; "
                                           "null: no keys.", default=None)
    max_request_body_bytes: int = spec_field("maxRequestBodyBytes", "Body size limit (413).",
                                             default=16 * 1024**2, minimum=1024)
    request_body_budget_bytes: int = spec_field(
        "requestBodyBudgetBytes", "Bodies in flight at once (503 past it).",
        default=128 * 1024**2, minimum=1024)
    reasoning: ReasoningSpec = spec_field("reasoning", "Reasoning budgets per effort level.",
                                          default_factory=ReasoningSpec)


@dataclass(frozen=True)
class PoolConfig:
    name: str = spec_field("name", "Pool name (the `pool` metric label).",
                           pattern=POOL_NAME_PATTERN)
    fp4_path: str = spec_field("fp4Path", "NVFP4 kernel path.", default="w4a16",
                               enum=FP4_PATHS)


@dataclass(frozen=True)
class PoolsConfig:
    prefill: tuple[PoolConfig, ...] = spec_field("prefill", "Prefill pools.",
                                                 default_factory=tuple)
    decode: tuple[PoolConfig, ...] = spec_field("decode", "Decode pools.",
                                                default_factory=tuple)


@dataclass(frozen=True)
class WorkerConfig:
    """The JSON file every worker and the router reads (`--config FILE`)."""

    model: str = spec_field("model", "Model resource name (the `model` metric label).")
    model_path: str = spec_field("modelPath", "Checkpoint directory.")
    namespace: str = spec_field("namespace", "Namespace (the `namespace` metric label).",
                                default="default")
    served_model_name: str = spec_field("servedModelName", "Name clients send; empty: model.",
                                        default="")
    quantization: str = spec_field("quantization", "Expected weight format.", default="auto",
                                   enum=QUANTIZATIONS)
    # The Model's own engine settings, the one declaration (the CRD is generated from it too).
    engine: EngineSpec = spec_field("engine", "Engine knobs.", default_factory=EngineSpec)
    prefill: PrefillConfig = spec_field("prefill", "Prefill worker knobs.",
                                        default_factory=PrefillConfig)
    decode: DecodeConfig = spec_field("decode", "Decode worker knobs.",
                                      default_factory=DecodeConfig)
    router: RouterConfig = spec_field("router", "Router knobs.", default_factory=RouterConfig)
    pools: PoolsConfig = spec_field("pools", "Pools per role.", default_factory=PoolsConfig)

    def __post_init__(self) -> None:
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model)

    @classmethod
    def from_dict(cls, obj: dict) -> WorkerConfig:
        """Validates and reads a worker configuration; SpecError names the field at fault."""
        return parse(cls, obj, "workerConfig")

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        try:
            obj = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise SpecError(str(path), f"is not valid JSON: {exc}") from None
        return cls.from_dict(obj)

    def to_dict(self) -> dict:
        return dump(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def pool(self, role: str, name: str) -> PoolConfig:
        """The named pool of a role; ValueError listing the known pools otherwise."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        pools = getattr(self.pools, role)
        for pool in pools:
            if pool.name == name:
                return pool
        known = ", ".join(p.name for p in pools) or "none"
        raise ValueError(f"pool {name!r} is not a {role} pool of model {self.model!r}; "
                         f"known: {known}")


# Where the operator mounts the API keys Secret in router pods.
API_KEYS_DIR = "/etc/baton/api-keys"
API_KEYS_SECRET_KEY = "keys"


def worker_config(model: Model, model_path: str) -> WorkerConfig:
    """The worker configuration of a Model; `model_path` is where the checkpoint is mounted
    (the operator) or found (`baton up`, which resolves relative sources itself)."""
    spec = model.spec
    api_keys = (f"{API_KEYS_DIR}/{API_KEYS_SECRET_KEY}" if spec.router.api_keys_secret
                else None)
    return WorkerConfig(
        model=model.name,
        namespace=model.namespace,
        served_model_name=model.served_model_name,
        model_path=model_path,
        quantization=spec.quantization,
        engine=spec.engine,
        prefill=PrefillConfig(max_batch_tokens=spec.prefill.max_batch_tokens,
                              expert_parallel=spec.prefill.expert_parallel,
                              gpus_per_replica=spec.prefill.gpus_per_replica),
        decode=DecodeConfig(max_concurrency=spec.decode.max_concurrency,
                            speculative_tokens=spec.decode.speculative_tokens,
                            expert_parallel=spec.decode.expert_parallel,
                            gpus_per_replica=spec.decode.gpus_per_replica),
        router=RouterConfig(routing=spec.router.routing,
                            max_queued_requests=spec.router.max_queued_requests,
                            local_prefill_max_tokens=spec.router.local_prefill_max_tokens,
                            request_timeout_seconds=spec.router.request_timeout_seconds,
                            transfer_timeout_seconds=spec.router.transfer_timeout_seconds,
                            api_keys_file=api_keys,
                            max_request_body_bytes=spec.router.max_request_body_bytes,
                            request_body_budget_bytes=spec.router.request_body_budget_bytes,
                            reasoning=spec.router.reasoning),
        pools=PoolsConfig(**{role: tuple(PoolConfig(name=p.name, fp4_path=p.fp4_path)
                                         for p in spec.role(role).pools) for role in ROLES}),
    )
