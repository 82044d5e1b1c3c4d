"""The autoscaler end to end: a real Prometheus server scraping a real exporter whose values
the test drives, the operator as its own process (`python -m baton.operator`: the reconcile
handlers and the autoscaler daemon) against the Kubernetes API served by kmock.

The autoscaler must read the metrics through Prometheus's HTTP API, write
status.autoscaler.desired as the policy says, and the reconcile must set the Deployments'
replicas from it; a TTFT breach scales prefill only; a lower load drains marked pods;
arrivals outrunning completions grow prefill before any breach; with Prometheus gone the
last decision holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from baton.operator.autoscaler.daemon import DELETION_COST, DRAIN_COST
from baton.operator.autoscaler.policy import Observation, PolicyState, decide
from baton.operator.autoscaler.profile import ReplicaProfile
from baton.operator.autoscaler.prometheus import (
    MissingSeries,
    PrometheusClient,
    PrometheusQueryError,
    PrometheusUnavailable,
)
from baton.operator.spec import Model

NS = "llm"
NAME = "nano"
MODELS = "baton.dev/v1alpha1/models"
DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"
ROOT = Path(__file__).resolve().parents[3]
RATE_WINDOW = 10
PROFILE = {"prefill_tokens_per_second": 10000, "decode_step_seconds": {"1": 0.01, "128": 0.02},
           "max_decode_batch": 128}
BUCKETS = (0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LABELS = ("namespace", "model", "role", "pool")

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_spec(prometheus_url: str) -> dict:
    # cost per capacity: fast 4 / 2 = 2, slow 3.3 / 1.5 = 2.2: fast fills first
    pools = [{"name": "fast", "gpuProduct": "NVIDIA-B200", "minReplicas": 1, "maxReplicas": 3,
              "relativeSpeed": "2", "costPerHour": "4"},
             {"name": "slow", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 0,
              "maxReplicas": 4, "relativeSpeed": "1.5", "costPerHour": "3.3"}]
    return {"source": {"uri": "pvc://model-store/nano"},
            "prefill": {"pools": pools},
            "decode": {"pools": pools, "maxConcurrency": 512},
            "autoscaling": {"enabled": True, "prometheusUrl": prometheus_url,
                            "intervalSeconds": 5, "scaleDownStabilizationSeconds": 5,
                            "startupSeconds": 5,
                            "pendingTimeoutSeconds": 1,
                            "targets": {"timeToFirstTokenSeconds": "2",
                                        "interTokenLatencySeconds": "0.05",
                                        "attainment": "0.95"}}}


class _Integral:
    """A quantity growing at a rate that changes at known instants: its value at any time."""

    def __init__(self, value: float = 0.0, rate: float = 0.0) -> None:
        self.base, self.rate, self.since = value, rate, time.monotonic()

    def value(self, now: float) -> float:
        return self.base + self.rate * (now - self.since)

    def set_rate(self, rate: float) -> None:
        now = time.monotonic()
        self.base, self.since, self.rate = self.value(now), now, rate


class Load:
    """A worker fleet's metrics at steady rates the test sets. Each scrape reads every
    counter as the exact integral of its rates up to the scrape's instant (no background
    loop adds increments, so no loop lag or sleep shapes what Prometheus sees): the rates
    Prometheus computes are the rates set, whenever it scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # requests finished (as many as arrive: a steady load) and those with a slow TTFT
        self._requests = _Integral(rate=10.0)
        self._slow = _Integral()
        self._prompt = _Integral(rate=30000.0)
        self._generation = _Integral(rate=54000.0)
        # the router counts a request in flight from its arrival, finished at its end
        self._router_running = _Integral(value=300.0)
        # refused requests (4xx): never arrivals, however many
        self._rejected = _Integral(rate=50.0)
        self._slow_share = 0.0
        self.registry.register(self)

    requests_per_second = property(lambda self: self._requests.rate)
    prompt_tokens_per_second = property(lambda self: self._prompt.rate)
    generation_tokens_per_second = property(lambda self: self._generation.rate)
    in_flight_growth = property(lambda self: self._router_running.rate)
    slow_ttft_share = property(lambda self: self._slow_share)

    @requests_per_second.setter
    def requests_per_second(self, rate: float) -> None:
        self._requests.set_rate(rate)
        self._slow.set_rate(rate * self._slow_share)

    @prompt_tokens_per_second.setter
    def prompt_tokens_per_second(self, rate: float) -> None:
        self._prompt.set_rate(rate)

    @generation_tokens_per_second.setter
    def generation_tokens_per_second(self, rate: float) -> None:
        self._generation.set_rate(rate)

    @in_flight_growth.setter
    def in_flight_growth(self, rate: float) -> None:
        self._router_running.set_rate(rate)

    @slow_ttft_share.setter
    def slow_ttft_share(self, share: float) -> None:
        self._slow_share = share
        self._slow.set_rate(self._requests.rate * share)

    def collect(self):
        now = time.monotonic()
        router = [NS, NAME, "router", ""]
        requests, slow = self._requests.value(now), self._slow.value(now)
        ttft = HistogramMetricFamily("baton_time_to_first_token_seconds", "TTFT",
                                     labels=LABELS)
        # fast requests take 0.4 s to their first token, slow ones 5 s
        ttft.add_metric(router, [(str(le), (requests - slow if le >= 0.4 else 0.0)
                                  + (slow if le >= 5.0 else 0.0)) for le in BUCKETS]
                        + [("+Inf", requests)], 0.4 * (requests - slow) + 5.0 * slow)
        itl = HistogramMetricFamily("baton_inter_token_latency_seconds", "ITL", labels=LABELS)
        itl.add_metric(router, [(str(le), requests if le >= 0.02 else 0.0) for le in BUCKETS]
                       + [("+Inf", requests)], 0.02 * requests)
        prompt = CounterMetricFamily("baton_prompt_tokens", "prompt tokens", labels=LABELS)
        prompt.add_metric([NS, NAME, "prefill", "fast"], self._prompt.value(now))
        generation = CounterMetricFamily("baton_generation_tokens", "generated tokens",
                                         labels=LABELS)
        generation.add_metric([NS, NAME, "decode", "fast"], self._generation.value(now))
        finished = CounterMetricFamily("baton_requests", "finished",
                                       labels=LABELS + ("outcome",))
        finished.add_metric(router + ["success"], requests)
        finished.add_metric(router + ["rejected"], self._rejected.value(now))
        waiting = GaugeMetricFamily("baton_requests_waiting", "waiting", labels=LABELS)
        for role in ("router", "prefill", "decode"):
            waiting.add_metric([NS, NAME, role, "" if role == "router" else "fast"], 0.0)
        running = GaugeMetricFamily("baton_requests_running", "running", labels=LABELS)
        running.add_metric([NS, NAME, "decode", "fast"], 300.0)
        running.add_metric([NS, NAME, "prefill", "fast"], 2.0)
        running.add_metric(router, self._router_running.value(now))
        return [ttft, itl, prompt, generation, finished, waiting, running]


def observation(load: Load) -> Observation:
    return Observation(request_rate=load.requests_per_second,
                       prompt_tokens_per_second=load.prompt_tokens_per_second,
                       generation_tokens_per_second=load.generation_tokens_per_second,
                       prefill_waiting=0.0, decode_running=300.0, decode_waiting=0.0,
                       ttft_attainment=1 - load.slow_ttft_share, itl_attainment=1.0,
                       mean_itl_seconds=0.02, arrival_rate=load.requests_per_second,
                       window_seconds=RATE_WINDOW)


def steady_decision(spec, load: Load, tolerance: float = 0.09) -> dict:
    """The policy's fixed point for a steady load, checked to be the same for rates off by
    the rate window's error (so the test does not depend on scrape timing)."""
    profile = ReplicaProfile.from_dict(PROFILE)
    results = []
    for scale in (1 - tolerance, 1.0, 1 + tolerance):
        base = observation(load)
        obs = Observation(**{**base.__dict__,
                             "prompt_tokens_per_second": base.prompt_tokens_per_second * scale,
                             "generation_tokens_per_second":
                                 base.generation_tokens_per_second * scale})
        current = None
        state = PolicyState()
        for k in range(4):  # iterate to the fixed point (capacity depends on the fleet)
            current = current or {"prefill": {"fast": 1, "slow": 0},
                                  "decode": {"fast": 1, "slow": 0}}
            d = decide(spec, obs, current, {}, state, 1e6 + 100 * k, profile)
            current, state = d.desired, d.state
        results.append(current)
    assert results[0] == results[1] == results[2], results
    return results[1]


@contextlib.contextmanager
def exporter(registry):
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield port
    finally:
        server.shutdown()
        thread.join(5)


@contextlib.contextmanager
def prometheus(tmp_path: Path, target_port: int):
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(binary):
        pytest.fail("the Prometheus server is not installed: run `make tools` "
                    "(scripts/install-test-tools.sh installs the Debian package)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "baton", "honor_labels": True,
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session, self.base = session, base.rstrip("/")

    def path(self, resource: str, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/" if "/" not in group_version else "/apis/"
        return f"{self.base}{prefix}{group_version}/namespaces/{NS}/{plural}" + (
            f"/{name}" if name else "")

    async def create(self, resource: str, body: dict) -> None:
        async with self.session.post(self.path(resource), json=body) as r:
            assert r.status < 300, await r.text()

    async def delete(self, resource: str, name: str) -> None:
        async with self.session.delete(self.path(resource, name)) as r:
            assert r.status < 300, await r.text()

    async def list(self, resource: str) -> list[dict]:
        async with self.session.get(self.path(resource)) as r:
            assert r.status < 300, await r.text()
            return (await r.json()).get("items") or []

    async def get(self, resource: str, name: str) -> dict | None:
        async with self.session.get(self.path(resource, name)) as r:
            if r.status == 404:
                return None
            assert r.status < 300, await r.text()
            return await r.json()


def pod(role: str, pool: str, index: int, created: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{NAME}-{role}-{pool}-{index}", "namespace": NS,
                         "uid": str(uuid.uuid4()), "creationTimestamp": created,
                         "labels": {"baton.dev/model": NAME, "baton.dev/role": role,
                                    "baton.dev/pool": pool}},
            "status": {"phase": "Running",
                       "conditions": [{"type": "PodScheduled", "status": "True"},
                                      {"type": "Ready", "status": "True"}]}}


async def test_prometheus_client_errors(tmp_path):
    registry = CollectorRegistry()
    Counter("baton_prompt_tokens", "prompt tokens", LABELS,
            registry=registry).labels(NS, NAME, "prefill", "fast").inc(1)
    with exporter(registry) as port, prometheus(tmp_path, port) as (url, _):
        async with PrometheusClient(url, timeout=3) as prom:
            async def scraped():
                try:
                    return await prom.query("baton_prompt_tokens_total")
                except PrometheusUnavailable:
                    return None
            samples = await eventually(scraped, 20, "the first scrape")
            assert samples[0].labels["role"] == "prefill" and samples[0].value == 1.0
            with pytest.raises(PrometheusQueryError, match="bad_data"):
                await prom.query("sum(rate(baton_prompt_tokens_total[1m]")
            with pytest.raises(MissingSeries, match="baton_no_such_metric"):
                await prom.query_value("sum(baton_no_such_metric)")
    async with PrometheusClient(url, timeout=1) as prom:
        with pytest.raises(PrometheusUnavailable, match="unreachable"):
            await prom.query("up")


async def test_autoscaler_sizes_pools_from_prometheus(kmock, tmp_path):
    load = Load()
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(json.dumps(PROFILE))
    kmock.resources.load_bundled()
    kmock.resources[MODELS] = kmock.ResourceInfo(
        kind="Model", namespaced=True, subresources={"status"},
        verbs={"list", "watch", "get", "patch", "create", "delete"})
    kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False,
        verbs={"list", "watch", "get", "patch", "create"})
    base = str(kmock.url).rstrip("/")
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": base}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(BATON_AUTOSCALER_PROFILE=str(profile_path),
               BATON_AUTOSCALER_MIN_RATE_WINDOW_SECONDS=str(RATE_WINDOW))
    removed: list[str] = []

    async def replica_set(api: Api) -> None:
        """kmock runs no controllers: when a Deployment has fewer replicas than pods, remove
        the excess, pods marked for removal (lowest pod-deletion-cost) first, as a
        ReplicaSet scaling down does. (It creates no pods; the test does where it needs.)"""
        while True:
            pods = await api.list(PODS)
            for dep in await api.list(DEPLOYMENTS):
                labels = dep["spec"]["selector"]["matchLabels"]
                members = [p for p in pods if all(
                    (p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]
                excess = len(members) - dep["spec"]["replicas"]
                members.sort(key=lambda p: int((p["metadata"].get("annotations") or {})
                                               .get(DELETION_COST, "0")))
                for item in members[:max(0, excess)]:
                    if (item["metadata"].get("annotations") or {}).get(DELETION_COST) \
                            == DRAIN_COST:
                        await api.delete(PODS, item["metadata"]["name"])
                        removed.append(item["metadata"]["name"])
            await asyncio.sleep(0.2)
    log_path = tmp_path / "operator.log"
    with exporter(load.registry) as port, prometheus(tmp_path, port) as (prom_url, prom_proc):
        spec = model_spec(prom_url)
        typed = Model.from_resource({"kind": "Model", "metadata": {"name": NAME},
                                     "spec": spec}).spec
        async with aiohttp.ClientSession() as session:
            api = Api(session, base)
            async with session.post(f"{base}/apis/kopf.dev/v1/clusterkopfpeerings", json={
                    "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                    "metadata": {"name": "baton"}}) as r:
                assert r.status < 300
            log = log_path.open("w")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "baton.operator", "--kubeconfig", str(kubeconfig),
                "--worker-image", "registry.example/baton:test", "--metrics-port", "0",
                "--resync-seconds", "2", "--liveness", "",
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                async def watching():
                    assert proc.returncode is None, log_path.read_text()
                    return bool(kmock[kmock.action.WATCH, kmock.resource(MODELS)])
                await eventually(watching, 30, "the operator's watch on models")
                controller = asyncio.create_task(replica_set(api))

                # the load has been steady for longer than the autoscaler's longest window
                # (2 x RATE_WINDOW) before it first looks: otherwise the series' first
                # seconds read as a ramp from nothing
                async with PrometheusClient(prom_url, timeout=3) as prom:
                    async def history():
                        try:
                            samples = await prom.query(
                                f"count_over_time(baton_prompt_tokens_total"
                                f"[{3 * RATE_WINDOW}s])")
                        except PrometheusUnavailable:
                            return None
                        return samples if samples and samples[0].value >= 2 * RATE_WINDOW \
                            else None
                    await eventually(history, 90, f"{3 * RATE_WINDOW} s of scraped load")
                for role, count in (("prefill", 3), ("decode", 3)):
                    for i in range(count):
                        await api.create(PODS, pod(role, "fast", i,
                                                   f"2026-01-01T00:0{i}:00Z"))
                await api.create(MODELS, {
                    "apiVersion": "baton.dev/v1alpha1", "kind": "Model",
                    "metadata": {"name": NAME, "namespace": NS, "uid": str(uuid.uuid4()),
                                 "generation": 1, "resourceVersion": "1",
                                 "creationTimestamp": "2026-01-01T00:00:00Z"},
                    "spec": spec})

                async def autoscaler_status():
                    model = await api.get(MODELS, NAME)
                    return ((model or {}).get("status") or {}).get("autoscaler") or {}

                async def deployments():
                    out = {}
                    for role in ("prefill", "decode"):
                        out[role] = {}
                        for pool_name in ("fast", "slow"):
                            dep = await api.get(DEPLOYMENTS, f"{NAME}-{role}-{pool_name}")
                            if dep is None:
                                return None
                            out[role][pool_name] = dep["spec"]["replicas"]
                    return out

                seen: dict = {}

                async def settled(expected):
                    status = seen["status"] = await autoscaler_status()
                    seen["deployments"] = await deployments()
                    if status.get("desired") != expected or status.get("held"):
                        return None
                    return status if seen["deployments"] == expected else None

                # 1. a steady load: the policy's fixed point; decode overflows to "slow"
                expected = steady_decision(typed, load)
                assert expected == {"prefill": {"fast": 2, "slow": 0},
                                    "decode": {"fast": 3, "slow": 1}}
                status = await eventually(lambda: settled(expected), 60,
                                          f"desired {expected} and the Deployments")
                observed = status["observed"]
                assert observed["promptTokensPerSecond"] == pytest.approx(30000, rel=0.1)
                assert observed["ttftAttainment"] == pytest.approx(1.0)
                # 10 admitted per second; the 50 rejected per second are not arrivals
                assert observed["arrivalsPerSecond"] == pytest.approx(10, rel=0.15)
                # "<role> <pool> <n>" per pool ("<before> -> <n>" while the Deployment lags)
                assert re.match(r"prefill fast (\d -> )?2, slow 0: sized for \S+ prompt "
                                r"tokens/s \(arrivals ", status["reason"]), status["reason"]
                assert re.search(r"; decode fast (\d -> )?3, slow (\d -> )?1: sized for ",
                                 status["reason"]), status["reason"]

                # 2. a TTFT breach: prefill grows, decode stays
                load.slow_ttft_share = 0.3
                boosted = {"prefill": {"fast": 3, "slow": 0},
                           "decode": expected["decode"]}
                status = await eventually(lambda: settled(boosted), 60, "the TTFT boost")
                assert "TTFT attainment" in status["reason"]

                # 3. less load: prefill shrinks after the window, pods chosen are marked
                load.slow_ttft_share = 0.0
                load.prompt_tokens_per_second = 9000.0
                load.requests_per_second = 3.0
                shrunk = {"prefill": {"fast": 1, "slow": 0}, "decode": expected["decode"]}
                await eventually(lambda: settled(shrunk), 60, "the scale-down")

                async def replicas_removed():
                    return sorted(removed) if len(removed) == 2 else None
                # the youngest two of the three equally idle pods drain first
                assert await eventually(replicas_removed, 10, "two pods removed") == [
                    f"{NAME}-prefill-fast-1", f"{NAME}-prefill-fast-2"]

                # 3b. requests arrive faster than they finish (they pile up in flight at the
                # router): prefill grows on the arrival rate alone, before any breach
                load.in_flight_growth = 10.0

                async def ahead_of_arrivals():
                    status = seen["status"] = await autoscaler_status()
                    desired = status.get("desired") or {}
                    grown = sum((desired.get("prefill") or {}).values()) > 1
                    arrivals = (status.get("observed") or {}).get("arrivalsPerSecond") or 0
                    return status if grown and arrivals > 5 and not status.get("held") \
                        else None
                status = await eventually(ahead_of_arrivals, 30, "prefill sized for arrivals")
                assert status["observed"]["ttftAttainment"] == pytest.approx(1.0)
                assert "arrivals" in status["reason"]

                async def scaled_up_event():
                    events = [r.data for r in kmock[kmock.action.CREATE,
                                                    kmock.resource("v1/events")]
                              if isinstance(r.data, dict) and r.data.get("reason") == "ScaledUp"]
                    return [e["message"] for e in events
                            if re.match(r"prefill fast 1 -> \d", e.get("message", ""))]
                # the Event says what grew, for what load, in the operator's words
                [message, *_] = await eventually(scaled_up_event, 10, "a ScaledUp Event")
                assert "prompt tokens/s" in message and "arrivals" in message
                load.in_flight_growth = 0.0
                # ... and returns once the projection and the window have passed
                await eventually(lambda: settled(shrunk), 60, "back to the small fleet")

                # 4. Prometheus gone: the last decision holds, and status says why
                prom_proc.send_signal(signal.SIGTERM)
                prom_proc.wait(10)

                async def held():
                    status = await autoscaler_status()
                    return status if status.get("held") else None
                status = seen["status"] = await eventually(held, 30, "the held decision")
                assert status["desired"] == shrunk
                assert "unreachable" in status["reason"]
                assert status.get("observed") is None  # a merge patch's null removes it
                assert await deployments() == shrunk
            except AssertionError:
                # what the autoscaler last said, and the operator's log, for the failure
                print(json.dumps(seen, indent=1))
                print(log_path.read_text()[-6000:])
                raise
            finally:
                if "controller" in locals():
                    controller.cancel()
                if proc.returncode is None:
                    # graceful shutdown is the operator's own test; a few seconds suffice here
                    proc.terminate()
                    try:
                        await asyncio.wait_for(proc.wait(), 4)
                    except asyncio.TimeoutError:
                        proc.kill()
                        await proc.wait()
                log.close()
    text = log_path.read_text()
    assert "Autoscaling round failed" not in text, text[-3000:]
