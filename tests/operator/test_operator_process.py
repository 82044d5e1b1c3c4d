"""The operator as its own process (`python -m baton.operator`) against kmock over real HTTP.

kmock serves the Kubernetes API with state and real watch streams, but runs no controllers:
the test plays the controllers' part (writes Deployment status, bumps generations) and
checks what the operator did through the stored objects and the requests it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml

NS = "llm"
MODELS = "baton.dev/v1alpha1/models"
DEPLOYMENTS = "apps/v1/deployments"
IMAGE = "registry.example/baton:test"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_body(name: str, uid: str, generation: int, spec: dict, namespace: str = NS) -> dict:
    return {"apiVersion": "baton.dev/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": generation,
                         "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec}


def two_pool_spec() -> dict:
    return {
        "source": {"uri": "pvc://model-store/nano"},
        "prefill": {"pools": [
            {"name": "blackwell", "gpuProduct": "NVIDIA-B200", "minReplicas": 1,
             "maxReplicas": 4, "relativeSpeed": "2.5"},
            {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 1,
             "maxReplicas": 8}]},
        "decode": {"pools": [
            {"name": "blackwell", "gpuProduct": "NVIDIA-B200", "minReplicas": 1,
             "maxReplicas": 2},
            {"name": "hopper", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "minReplicas": 1,
             "maxReplicas": 4}]},
    }


class Api:
    """The test's own HTTP client for kmock (what kubectl and the controllers would do)."""

    def __init__(self, session: aiohttp.ClientSession, base: str):
        self.session, self.base = session, base.rstrip("/")

    def path(self, resource: str, name: str | None = None, sub: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/" if "/" not in group_version else "/apis/"
        url = f"{self.base}{prefix}{group_version}/namespaces/{NS}/{plural}"
        return url + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create(self, resource: str, body: dict) -> None:
        async with self.session.post(self.path(resource), json=body) as r:
            assert r.status < 300, await r.text()

    async def patch(self, resource: str, name: str, body: dict, sub: str | None = None):
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self.path(resource, name, sub), json=body,
                                      headers=headers) as r:
            assert r.status < 300, await r.text()

    async def delete(self, resource: str, name: str) -> None:
        async with self.session.delete(self.path(resource, name)) as r:
            assert r.status < 300, await r.text()

    async def get(self, resource: str, name: str) -> dict | None:
        async with self.session.get(self.path(resource, name)) as r:
            if r.status == 404:
                return None
            assert r.status < 300, await r.text()
            return await r.json()

    async def list(self, resource: str) -> list[dict]:
        async with self.session.get(self.path(resource)) as r:
            assert r.status < 300, await r.text()
            return (await r.json()).get("items") or []


async def eventually(check, timeout: float = 20.0, what: str = "condition"):
    """Polls an async `check` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)  # a bounded poll for the asserted state
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


async def stays(check, seconds: float, what: str) -> None:
    """Asserts that an async `check` holds at every poll for `seconds`: for what must NOT
    happen (a paused operator acting), which no event can show. A slow machine can only make
    this pass more easily, never fail it; the positive state each test needs first (a pause
    logged, a reconcile counted) is waited for by event."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await check(), f"no longer true: {what}"
        await asyncio.sleep(0.1)  # a bounded poll: the asserted state is checked each time


async def reconciles(metrics_port: int, outcome: str) -> float:
    """The operator's baton_reconciles_total for `outcome` (0 before the first)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = await r.text()
    found = re.search(rf'^baton_reconciles_total\{{outcome="{outcome}"\}} ([0-9.e+]+)$',
                      text, re.M)
    return float(found.group(1)) if found else 0.0


async def reconciled_again(metrics_port: int, outcome: str, times: int, what: str) -> None:
    """Waits until the operator has reconciled `times` more times with `outcome` (counted by
    its own metric): after that, whatever those reconciles would write has been written."""
    start = await reconciles(metrics_port, outcome)

    async def counted():
        return await reconciles(metrics_port, outcome) >= start + times
    await eventually(counted, 30, what)


def prepare_kmock(kmock) -> str:
    kmock.resources.load_bundled()
    kmock.resources[MODELS] = kmock.ResourceInfo(
        kind="Model", namespaced=True, subresources={"status"},
        verbs={"list", "watch", "get", "patch", "create", "delete"})
    kmock.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False,
        verbs={"list", "watch", "get", "patch", "create"})
    kmock.resources["kopf.dev/v1/kopfpeerings"] = kmock.ResourceInfo(
        kind="KopfPeering", namespaced=True, verbs={"list", "watch", "get", "patch", "create"})
    return str(kmock.url).rstrip("/")


def peering_url(base: str, namespace: str | None) -> str:
    if namespace is None:
        return f"{base}/apis/kopf.dev/v1/clusterkopfpeerings"
    return f"{base}/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings"


async def peers_announced(session: aiohttp.ClientSession, base: str,
                          namespace: str | None = None) -> list[dict]:
    async with session.get(f"{peering_url(base, namespace)}/baton") as r:
        peers = ((await r.json()).get("status") or {}).values()
    return [p for p in peers if isinstance(p, dict) and "priority" in p]


@contextlib.asynccontextmanager
async def operator_process(kmock, tmp_path: Path, *, token: str = "operator",
                           priority: int = 0, existing_peers: int = 0,
                           namespace: str | None = None, peering: bool = True,
                           args: tuple[str, ...] = ()):
    """Runs `python -m baton.operator` against kmock; its requests carry `token`; with
    `namespace`, it serves only that namespace (and peers through a KopfPeering there).
    peering: create the peering object the chart installs (and wait for the operator to
    announce itself on it); args: more command-line arguments."""
    base = prepare_kmock(kmock)
    kubeconfig = tmp_path / f"kubeconfig-{token}.yaml"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": base}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}]}))
    log_path = tmp_path / f"operator-{token}.log"
    liveness_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    async with aiohttp.ClientSession() as session:
        api = Api(session, base)
        if peering and not existing_peers:
            # The peering object the chart installs: Kopf's peering is on.
            kind = "ClusterKopfPeering" if namespace is None else "KopfPeering"
            async with session.post(peering_url(base, namespace), json={
                    "apiVersion": "kopf.dev/v1", "kind": kind,
                    "metadata": {"name": "baton", "namespace": namespace}}) as r:
                assert r.status < 300, await r.text()
        with log_path.open("w") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "baton.operator", "--kubeconfig", str(kubeconfig),
                "--worker-image", IMAGE, "--metrics-port", str(metrics_port),
                "--resync-seconds", "3", "--priority", str(priority),
                # kmock cannot serve the cluster-wide namespace list Kopf's scanning reads.
                *(["--namespace", namespace, "--no-scanning"] if namespace else []),
                "--liveness", f"http://127.0.0.1:{liveness_port}/healthz", *args,
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            async def alive():
                assert proc.returncode is None, log_path.read_text()
                try:
                    async with session.get(f"http://127.0.0.1:{liveness_port}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False
            await eventually(alive, 30, "the liveness endpoint")
            if not peering:
                yield api, log_path, proc, metrics_port
                return

            async def announced():
                peers = await peers_announced(session, base, namespace)
                return len(peers) == existing_peers + 1 and peers
            # Peering is on: the operator announces itself on the peering object.
            peers = await eventually(announced, 10, "the operator on the peering object")
            assert priority in {p["priority"] for p in peers}
            yield api, log_path, proc, metrics_port
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()


def actions_by(kmock, token: str) -> list:
    """Reads by name and writes made with `token` (one operator process), peering and Events
    aside. A paused operator still keeps its watch streams, but its handlers never run, and
    only they (the reconcile) fetch or write objects."""
    return [r for r in kmock if r.action in (kmock.action.FETCH, kmock.action.CREATE,
                                             kmock.action.UPDATE, kmock.action.DELETE)
            and r.headers.get("Authorization") == f"Bearer {token}"
            and r.resource is not None and r.resource.plural not in ("clusterkopfpeerings",
                                                                     "events")]


def owned_names(items: list[dict], model: str) -> set[str]:
    return {o["metadata"]["name"] for o in items
            if (o["metadata"].get("labels") or {}).get("baton.dev/model") == model}


def condition(model: dict | None, type_: str) -> dict:
    for c in ((model or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


def assert_clean_log(log_path: Path) -> None:
    """No errors in the operator's log, except kmock refusing Kopf's second and later Events
    (it does not implement generateName)."""
    lines = [line for line in log_path.read_text().splitlines()
             if "Failed to post an event" not in line]
    bad = [line for line in lines if "Traceback" in line or " ERROR " in line]
    assert not bad, "\n".join(bad[:20])


def posted_events(kmock) -> list[dict]:
    """Events as posted: kmock does not implement generateName, so it stores only the first
    of Kopf's events; the requests themselves are all recorded."""
    return [r.data for r in kmock[kmock.action.CREATE, kmock.resource("v1/events")]
            if isinstance(r.data, dict)]


def status_patches(kmock, name: str) -> int:
    return sum(1 for r in kmock[kmock.action.UPDATE, kmock.resource(MODELS)]
               if r.name == name and r.subresource == "status")


async def test_operator_reconciles_model_lifecycle(kmock, tmp_path):
    uid = str(uuid.uuid4())
    async with operator_process(kmock, tmp_path) as (api, log_path, _, metrics_port):
        await api.create(MODELS, model_body("nano", uid, 1, two_pool_spec()))

        # Applying a Model creates every object, owned by it.
        expected_deployments = {"nano-prefill-blackwell", "nano-prefill-hopper",
                                "nano-decode-blackwell", "nano-decode-hopper", "nano-router"}

        expected = {
            DEPLOYMENTS: expected_deployments,
            "v1/services": {"nano-prefill", "nano-decode", "nano-router"},
            "v1/configmaps": {"nano-config"},
            "policy/v1/poddisruptionbudgets": expected_deployments,
        }

        async def all_created():
            return all([owned_names(await api.list(resource), "nano") == names
                        for resource, names in expected.items()])
        await eventually(all_created, 20, "every owned object")
        for resource in (DEPLOYMENTS, "v1/services", "v1/configmaps",
                         "policy/v1/poddisruptionbudgets"):
            for obj in await api.list(resource):
                refs = obj["metadata"]["ownerReferences"]
                assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == \
                    [("Model", "nano", uid, True)]
        dep = await api.get(DEPLOYMENTS, "nano-decode-hopper")
        pod = dep["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["containers"][0]["image"] == IMAGE

        async def not_ready_yet():
            model = await api.get(MODELS, "nano")
            return condition(model, "Ready").get("reason") == "NotServing" and model
        model = await eventually(not_ready_yet, 10, "Ready=False NotServing")
        assert model["status"]["endpoint"] == "http://nano-router.llm.svc:8000/v1"

        # The test plays the Deployment controller: pods come up, status follows.
        for name in expected_deployments:
            await api.patch(DEPLOYMENTS, name, {"metadata": {"generation": 2}})
            await api.patch(DEPLOYMENTS, name, {"status": {
                "observedGeneration": 2, "replicas": 1, "readyReplicas": 1,
                "availableReplicas": 1}}, sub="status")

        async def ready():
            model = await api.get(MODELS, "nano")
            status = model.get("status") or {}
            return (condition(model, "Ready").get("status") == "True"
                    and status.get("prefill", {}).get("readyReplicas") == 2
                    and status.get("decode", {}).get("readyReplicas") == 2 and model)
        model = await eventually(ready, 15, "Ready=True with 2+2 ready replicas")
        assert condition(model, "PrefillReady")["status"] == "True"
        assert condition(model, "DecodeReady")["status"] == "True"
        assert condition(model, "Degraded")["status"] == "False"
        assert {p["name"]: p["readyReplicas"] for p in model["status"]["prefill"]["pools"]} \
            == {"blackwell": 1, "hopper": 1}
        ready_since = condition(model, "Ready")["lastTransitionTime"]

        # Edit: remove a prefill pool, grow a decode pool.
        spec = two_pool_spec()
        spec["prefill"]["pools"] = spec["prefill"]["pools"][:1]
        spec["decode"]["pools"][1]["minReplicas"] = 2
        await api.patch(MODELS, "nano", {"metadata": {"generation": 2}, "spec": spec})

        async def edited():
            names = owned_names(await api.list(DEPLOYMENTS), "nano")
            hopper = await api.get(DEPLOYMENTS, "nano-decode-hopper")
            return ("nano-prefill-hopper" not in names
                    and hopper["spec"]["replicas"] == 2 and names)
        names = await eventually(edited, 15, "the removed pool deleted, the grown one patched")
        assert names == expected_deployments - {"nano-prefill-hopper"}
        pdbs = owned_names(await api.list("policy/v1/poddisruptionbudgets"), "nano")
        assert "nano-prefill-hopper" not in pdbs

        async def degraded():
            model = await api.get(MODELS, "nano")
            return (model["status"].get("observedGeneration") == 2
                    and condition(model, "Degraded").get("status") == "True" and model)
        model = await eventually(degraded, 15, "Degraded after the decode pool grew")
        assert "decode/hopper 1/2 ready" in condition(model, "Degraded")["message"]
        assert condition(model, "Ready")["status"] == "True"
        assert condition(model, "Ready")["lastTransitionTime"] == ready_since
        assert condition(model, "Ready")["observedGeneration"] == 2

        # Replicas have one writer: a manual scale is put back by the next reconcile.
        await api.patch(DEPLOYMENTS, "nano-decode-blackwell", {"spec": {"replicas": 5}})

        async def scaled_back():
            dep = await api.get(DEPLOYMENTS, "nano-decode-blackwell")
            return dep["spec"]["replicas"] == 1
        await eventually(scaled_back, 15, "the manual scale reverted")

        # A Deployment deleted behind the operator's back comes back.
        await api.delete(DEPLOYMENTS, "nano-router")

        async def recreated():
            return await api.get(DEPLOYMENTS, "nano-router")
        await eventually(recreated, 15, "the router Deployment recreated")

        # Events say what the operator did.
        reasons = {e.get("reason") for e in posted_events(kmock)
                   if (e.get("involvedObject") or {}).get("name") == "nano"}
        assert {"Created", "Updated", "Deleted"} <= reasons, reasons

        # The operator's own metrics.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                metrics = await r.text()
        count = re.search(r"^baton_reconcile_seconds_count ([0-9.e+]+)$", metrics, re.M)
        assert count and float(count.group(1)) >= 3, metrics[:2000]
        assert re.search(r'^baton_build_info\{version="[^"]+"\} 1\.0$', metrics, re.M)
        assert re.search(r'^baton_reconciles_total\{outcome="converged"\} ', metrics, re.M)

        # Deleting the Model releases it: no finalizer stays anywhere. (Kopf holds one while
        # the Model has timers or daemons, to stop them before the Model goes.)
        held = await api.get(MODELS, "nano")
        assert held["metadata"].get("finalizers") == ["baton.dev/kopf-finalizer"]
        await api.delete(MODELS, "nano")

        async def gone():
            return await api.get(MODELS, "nano") is None
        await eventually(gone, 15, "the Model released by its finalizers")
        for resource in (DEPLOYMENTS, "v1/services", "v1/configmaps",
                         "policy/v1/poddisruptionbudgets"):
            for obj in await api.list(resource):
                assert not obj["metadata"].get("finalizers"), obj["metadata"]
        assert_clean_log(log_path)


async def test_invalid_model_is_reported_once_per_generation(kmock, tmp_path):
    uid = str(uuid.uuid4())
    spec = two_pool_spec()
    # The schema cannot know that this source needs `baton up`: the operator must say so.
    spec["source"] = {"uri": "./checkpoints/nano"}
    async with operator_process(kmock, tmp_path) as (api, log_path, proc, metrics_port):
        await api.create(MODELS, model_body("broken", uid, 1, spec))

        async def rejected():
            model = await api.get(MODELS, "broken")
            return condition(model, "Ready").get("reason") == "InvalidSpec" and model
        model = await eventually(rejected, 20, "Ready=False reason InvalidSpec")
        ready = condition(model, "Ready")
        assert ready["status"] == "False"
        assert ready["message"].startswith("spec.source.uri: ")
        assert ready["observedGeneration"] == 1
        assert model["status"]["observedGeneration"] == 1

        # A watch event and a resync (every 3 s) later, each reconciled again (the operator's
        # own counter says so): still one status write, no retries.
        await api.patch(MODELS, "broken", {"metadata": {"labels": {"touched": "yes"}}})
        await reconciled_again(metrics_port, "invalid", 2, "two more reconciles of 'broken'")
        assert proc.returncode is None
        assert status_patches(kmock, "broken") == 1
        assert owned_names(await api.list(DEPLOYMENTS), "broken") == set()

        # A new generation that is still invalid: one more write, naming the new field.
        spec["source"] = {"uri": "pvc://store/nano"}
        spec["decode"]["pools"][0]["minReplicas"] = 3
        await api.patch(MODELS, "broken", {"metadata": {"generation": 2}, "spec": spec})

        async def second():
            model = await api.get(MODELS, "broken")
            return condition(model, "Ready").get("observedGeneration") == 2 and model
        model = await eventually(second, 15, "the second generation's report")
        assert condition(model, "Ready")["message"] == (
            "spec.decode.pools[0].maxReplicas: must be >= minReplicas (3), got 2")
        await reconciled_again(metrics_port, "invalid", 1, "a resync of generation 2")
        assert status_patches(kmock, "broken") == 2
        warnings = [e for e in posted_events(kmock) if e.get("reason") == "InvalidSpec"]
        assert len(warnings) == 2
        assert {w["type"] for w in warnings} == {"Warning"}
        assert_clean_log(log_path)


def test_operator_without_credentials_says_so(tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-m", "baton.operator", "--metrics-port", "0"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "no Kubernetes credentials" in out.stderr and "Traceback" not in out.stderr


async def test_peering_lower_priority_stands_by_and_equal_priorities_freeze(kmock, tmp_path):
    """HA as the chart runs it: the highest priority acts, a lower one does nothing; two of
    equal priority both pause until one goes."""
    spec = two_pool_spec()
    async with operator_process(kmock, tmp_path, token="high", priority=10) as (
            api, high_log, *_):
        async with operator_process(kmock, tmp_path, token="low", priority=5,
                                    existing_peers=1) as (_, low_log, *_):
            # A required peering starts paused; seeing a higher priority, the lower one stays
            # so, silently (Kopf logs only a resumption).
            await api.create(MODELS, model_body("nano", str(uuid.uuid4()), 1, spec))

            async def created():
                return len(owned_names(await api.list(DEPLOYMENTS), "nano")) == 5
            await eventually(created, 20, "the high-priority operator's Deployments")
            assert actions_by(kmock, "high")

            async def low_idle():
                return (actions_by(kmock, "low") == []
                        and "Resuming operations" not in low_log.read_text())
            await stays(low_idle, 1, "the paused low-priority operator does nothing")

        # Equal priorities: both pause rather than act twice.
        async with operator_process(kmock, tmp_path, token="twin", priority=10,
                                    existing_peers=1) as (_, twin_log, *_):
            # The twin starts paused and sees its equal; the running one pauses on seeing it.
            async def both_paused():
                return ("same priority" in twin_log.read_text()
                        and "Pausing all operators, including self" in high_log.read_text())
            await eventually(both_paused, 20, "both operators of equal priority pausing")
            before = len(actions_by(kmock, "high"))
            await api.create(MODELS, model_body("other", str(uuid.uuid4()), 1, spec))

            async def frozen():
                return (owned_names(await api.list(DEPLOYMENTS), "other") == set()
                        and actions_by(kmock, "twin") == []
                        and len(actions_by(kmock, "high")) == before)
            await stays(frozen, 2, "two paused operators of equal priority do nothing")

        # The twin leaves (it removes itself from the peering on exit): the other resumes.
        async def resumed():
            return len(owned_names(await api.list(DEPLOYMENTS), "other")) == 5
        await eventually(resumed, 20, "the remaining operator resuming")


async def test_namespaced_operator_serves_only_its_namespace(kmock, tmp_path):
    spec = two_pool_spec()
    async with operator_process(kmock, tmp_path, namespace=NS) as (
            api, log_path, _, metrics_port):
        elsewhere = model_body("nano", str(uuid.uuid4()), 1, spec, namespace="elsewhere")
        async with api.session.post(
                f"{api.base}/apis/baton.dev/v1alpha1/namespaces/elsewhere/models",
                json=elsewhere) as r:
            assert r.status < 300, await r.text()
        await api.create(MODELS, model_body("nano", str(uuid.uuid4()), 1, spec))

        async def created():
            return len(owned_names(await api.list(DEPLOYMENTS), "nano")) == 5
        await eventually(created, 20, "the Deployments in the served namespace")
        # A resync after that: every Model the operator sees has been reconciled again.
        await reconciled_again(metrics_port, "converged", 1, "a resync in the namespace")
        served = {r.namespace for r in kmock if r.resource is not None
                  and r.headers.get("Authorization") == "Bearer operator"
                  and r.action in (kmock.action.FETCH, kmock.action.CREATE,
                                   kmock.action.UPDATE, kmock.action.DELETE)}
        assert served == {NS}
        assert_clean_log(log_path)


async def test_without_a_peering_object_the_operator_runs_standalone_and_says_so(
        kmock, tmp_path):
    """Started without the KopfPeering the chart installs, the operator does not wait in
    silence: it runs standalone, warns what that means, and says how to create the object."""
    spec = two_pool_spec()
    async with operator_process(kmock, tmp_path, namespace=NS, peering=False) as (
            api, log_path, *_):
        text = log_path.read_text()
        assert f"No KopfPeering 'baton' in namespace '{NS}': running standalone" in text
        assert "A second operator replica would act on the same Models" in text
        assert ("kubectl apply -f - <<< '{\"apiVersion\": \"kopf.dev/v1\", \"kind\": "
                f"\"KopfPeering\", \"metadata\": {{\"name\": \"baton\", \"namespace\": "
                f"\"{NS}\"}}}}'") in text
        await api.create(MODELS, model_body("nano", str(uuid.uuid4()), 1, spec))

        async def created():
            return len(owned_names(await api.list(DEPLOYMENTS), "nano")) == 5
        await eventually(created, 20, "the Deployments of a standalone operator")
        # standalone: it neither announced itself nor created a peering object
        assert not [r for r in kmock if r.resource is not None
                    and r.resource.plural == "kopfpeerings"
                    and r.action in (kmock.action.CREATE, kmock.action.UPDATE)]
        assert_clean_log(log_path)


async def test_an_operator_that_requires_peering_says_what_it_waits_for(kmock, tmp_path):
    """With --require-peering and no ClusterKopfPeering, the operator says at start-up what
    it waits for and how to create it, reconciles nothing, and starts once it exists."""
    spec = two_pool_spec()
    async with operator_process(kmock, tmp_path, peering=False,
                                args=("--require-peering",)) as (api, log_path, proc, _):
        text = log_path.read_text()
        assert ("Waiting for ClusterKopfPeering 'baton' (--require-peering): nothing is "
                "reconciled until it exists. Create it: kubectl apply -f - <<< "
                "'{\"apiVersion\": \"kopf.dev/v1\", \"kind\": \"ClusterKopfPeering\", "
                "\"metadata\": {\"name\": \"baton\"}}'") in text
        await api.create(MODELS, model_body("nano", str(uuid.uuid4()), 1, spec))

        async def waiting():
            return (proc.returncode is None and actions_by(kmock, "operator") == []
                    and owned_names(await api.list(DEPLOYMENTS), "nano") == set())
        await stays(waiting, 2, "an operator waiting for its peering object does nothing")

        # the object the message named appears: the operator finds it and starts
        async with api.session.post(peering_url(api.base, None), json={
                "apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                "metadata": {"name": "baton"}}) as r:
            assert r.status < 300, await r.text()

        async def created():
            return len(owned_names(await api.list(DEPLOYMENTS), "nano")) == 5
        await eventually(created, 30, "the Deployments once the peering object exists")

        async def found():
            return "Found ClusterKopfPeering 'baton': peering is on" in log_path.read_text()
        await eventually(found, 15, "the operator saying it found the peering object")
        assert_clean_log(log_path)


def test_standalone_and_require_peering_exclude_each_other(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "baton.operator", "--standalone",
                          "--require-peering"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 2
    assert "not allowed with argument" in out.stderr
