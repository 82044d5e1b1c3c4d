"""`baton up` defaults against outsiders: every worker gRPC method refuses a caller with no
certificate, with a certificate from another CA, and with a certificate of the wrong role,
while the router keeps serving; each role refusal is counted in the worker's metrics."""

from __future__ import annotations

import concurrent.futures
import urllib.request
from pathlib import Path

import grpc
import openai
from prometheus_client.parser import text_string_to_metric_families

from baton.workers import security
from baton.workers.local import free_port
from baton.workers.security import CertificateAuthority, Identity

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "examples" / "tiny.yaml"
METHODS = {
    "decode": {"/baton.decode.v1.DecodeService/Reserve": "uu",
               "/baton.decode.v1.DecodeService/Generate": "us",
               "/baton.decode.v1.DecodeService/Release": "uu",
               "/baton.decode.v1.DecodeService/TransferState": "su"},
    "prefill": {"/baton.prefill.v1.PrefillService/Prefill": "uu"},
}
COMMON = {"/baton.worker.v1.WorkerService/Load": "uu",
          "/baton.worker.v1.WorkerService/Drain": "uu",
          "/grpc.health.v1.Health/Check": "uu"}


def call(channel: grpc.Channel, method: str, kind: str):
    """An empty request (valid for every message type): refusal comes before the handler."""
    if kind == "uu":
        return channel.unary_unary(method)(b"", timeout=20)
    if kind == "us":
        return list(channel.unary_stream(method)(b"", timeout=20))
    return channel.stream_unary(method)(iter([b""]), timeout=20)


def refused(channel: grpc.Channel, method: str, kind: str) -> grpc.StatusCode:
    try:
        call(channel, method, kind)
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError(f"{method} was answered")


def refusals(metrics_port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.labels["method"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name == "baton_rpc_refused"
            for s in family.samples if s.name == "baton_rpc_refused_total"}


def test_outsiders_are_refused_by_every_worker_while_the_router_serves(tmp_path, e2e):
    up, ready, output = e2e.start_baton_up(TINY_YAML, free_port())
    try:
        assert ready["certs"] is not None, "baton up defaults to mutual TLS"
        assert "mutual TLS" in "".join(output)
        certs = Path(ready["certs"])
        forged = CertificateAuthority.create().write_dir(tmp_path / "forged")
        client = openai.OpenAI(base_url=ready["url"], api_key="none", max_retries=0,
                               timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # A long request in flight through the attacks.
            during = pool.submit(client.completions.create, model="tiny", prompt="Hello",
                                 max_tokens=64, temperature=0,
                                 extra_body={"ignore_eos": True})
            for name, ports in ready["workers"].items():
                role = name.rstrip("0123456789")
                address = f"127.0.0.1:{ports['grpc']}"
                expected: dict[tuple[str, str], float] = {}
                for method, kind in {**METHODS[role], **COMMON}.items():
                    allowed = security.POLICY[method]
                    with grpc.insecure_channel(address) as plain:
                        assert refused(plain, method, kind) is grpc.StatusCode.UNAVAILABLE
                    some_allowed = sorted(allowed)[0]
                    with grpc.secure_channel(
                            address, Identity.load(forged, some_allowed).channel_credentials(),
                            options=security.CHANNEL_OPTIONS) as channel:
                        assert refused(channel, method, kind) is grpc.StatusCode.UNAVAILABLE, \
                            (name, method, "forged")
                    for wrong in sorted(set(security.ROLES) - allowed):
                        identity = Identity.load(certs, wrong)
                        with grpc.secure_channel(address, identity.channel_credentials(),
                                                 options=security.CHANNEL_OPTIONS) as channel:
                            assert refused(channel, method, kind) is \
                                grpc.StatusCode.PERMISSION_DENIED, (name, method, wrong)
                        expected[(method, "forbidden")] = \
                            expected.get((method, "forbidden"), 0) + 1
                # The same port answers the roles it is for.
                with grpc.secure_channel(
                        address, Identity.load(certs, "operator").channel_credentials(),
                        options=security.CHANNEL_OPTIONS) as channel:
                    call(channel, "/baton.worker.v1.WorkerService/Load", "uu")
                counted = refusals(ports["metrics"])
                assert {k: v for k, v in counted.items() if v} == expected, name
            first = during.result()
        assert first.usage.completion_tokens == 64
        # No refused Drain drained anything: the only prefill and decode workers still serve.
        after = client.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                          temperature=0)
        assert after.usage.completion_tokens >= 1
    finally:
        e2e.stop_baton_up(up)
