"""Mutual TLS and role authorization over real gRPC: certificates from a throwaway CA, a server
with RoleAuthorization in front of one handler per RPC class, and callers with no
certificate, a forged one, the wrong role and the right role."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from baton.workers import security
from baton.workers.security import CertificateAuthority, Identity

SERVICES = {
    "baton.decode.v1.DecodeService": {"Reserve": "uu", "Generate": "us", "Release": "uu",
                                      "TransferState": "su"},
    "baton.prefill.v1.PrefillService": {"Prefill": "uu"},
    "baton.worker.v1.WorkerService": {"Load": "uu", "Drain": "uu"},
    "grpc.health.v1.Health": {"Check": "uu"},
}
METHODS = {f"/{service}/{name}": kind for service, methods in SERVICES.items()
           for name, kind in methods.items()}
ALLOWED = {
    "/baton.decode.v1.DecodeService/Reserve": "router",
    "/baton.decode.v1.DecodeService/Generate": "router",
    "/baton.decode.v1.DecodeService/Release": "router",
    "/baton.decode.v1.DecodeService/TransferState": "prefill",
    "/baton.prefill.v1.PrefillService/Prefill": "router",
    "/baton.worker.v1.WorkerService/Load": "operator",
    "/baton.worker.v1.WorkerService/Drain": "operator",
    "/grpc.health.v1.Health/Check": "decode",
}


class Server:
    """A real mutual-TLS gRPC server whose handlers record every call they run."""

    def __init__(self, identity: Identity):
        self.ran: list[str] = []
        self.refused: list[tuple[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  interceptors=(security.RoleAuthorization(
                                      lambda m, r: self.refused.append((m, r))),))
        for service, methods in SERVICES.items():
            handlers = {name: self._handler(f"/{service}/{name}", kind)
                        for name, kind in methods.items()}
            self.server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),))
        self.port = self.server.add_secure_port("127.0.0.1:0", identity.server_credentials())
        self.server.start()

    def _handler(self, method: str, kind: str):
        if kind == "uu":
            def unary(request, context):
                self.ran.append(method)
                return b"ok"
            return grpc.unary_unary_rpc_method_handler(unary)
        if kind == "us":
            def stream(request, context):
                self.ran.append(method)
                yield b"ok"
            return grpc.unary_stream_rpc_method_handler(stream)

        def client_stream(requests, context):
            for _ in requests:
                pass
            self.ran.append(method)
            return b"ok"
        return grpc.stream_unary_rpc_method_handler(client_stream)


def call(channel: grpc.Channel, method: str) -> bytes:
    kind = METHODS[method]
    if kind == "uu":
        return channel.unary_unary(method)(b"x", timeout=10)
    if kind == "us":
        return b"".join(channel.unary_stream(method)(b"x", timeout=10))
    return channel.stream_unary(method)(iter([b"x"]), timeout=10)


def secure(port: int, identity: Identity) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{port}", identity.channel_credentials(),
                               options=security.CHANNEL_OPTIONS)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    certs = CertificateAuthority.create().write_dir(root / "ours")
    forged = CertificateAuthority.create().write_dir(root / "forged")
    server = Server(Identity.load(certs, "decode"))
    yield server, certs, forged
    server.server.stop(grace=None).wait()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_the_allowed_role_runs_each_method(deployment, method):
    server, certs, _ = deployment
    for role in security.ROLES:
        before = len(server.ran)
        with secure(server.port, Identity.load(certs, role)) as channel:
            if role in security.POLICY[method]:
                assert call(channel, method) == b"ok"
                assert server.ran[before:] == [method]
                continue
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, method)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, (role, method)
        assert server.ran[before:] == []
        assert server.refused[-1] == (method, "forbidden")
    # The role the policy names for it is one that runs it.
    assert ALLOWED[method] in security.POLICY[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_outsiders_never_reach_a_handler(deployment, method):
    server, certs, forged = deployment
    before = len(server.ran)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
        with pytest.raises(grpc.RpcError) as plaintext:
            call(plain, method)
    assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE
    # A certificate of the allowed role, signed by another CA: the handshake fails.
    with secure(server.port, Identity.load(forged, ALLOWED[method])) as channel:
        with pytest.raises(grpc.RpcError) as forged_cert:
            call(channel, method)
    assert forged_cert.value.code() is grpc.StatusCode.UNAVAILABLE
    # Server-side TLS only (our CA, no client certificate): refused at the handshake too.
    ca_only = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{server.port}", ca_only,
                             options=security.CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as no_cert:
            call(channel, method)
    assert no_cert.value.code() is grpc.StatusCode.UNAVAILABLE
    assert server.ran[before:] == []


def test_a_certificate_names_its_role_and_the_worker_name(tmp_path):
    ca = CertificateAuthority.create()
    for role in security.ROLES:
        issued = ca.issue(role)
        assert security.cert_roles(issued.cert) == {role}
    certs = ca.write_dir(tmp_path / "certs")
    assert (certs / "router.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="decode.crt names roles \\['router'\\]"):
        (certs / "decode.crt").write_bytes((certs / "router.crt").read_bytes())
        Identity.load(certs, "decode")
    with pytest.raises(ValueError, match="cannot read prefill.key"):
        (certs / "prefill.key").unlink()
        Identity.load(certs, "prefill")
    with pytest.raises(ValueError, match="role='admin' is not one of"):
        ca.issue("admin")


def test_a_worker_certificate_is_checked_against_the_worker_name(tmp_path):
    """A client dialling a server whose certificate lacks SERVER_NAME (a router's) refuses."""
    certs = CertificateAuthority.create().write_dir(tmp_path / "certs")
    server = Server(Identity.load(certs, "router"))
    try:
        with secure(server.port, Identity.load(certs, "operator")) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                call(channel, "/grpc.health.v1.Health/Check")
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.ran == []
    finally:
        server.server.stop(grace=None).wait()


def test_a_client_that_expects_a_decode_worker_refuses_a_prefill_one(tmp_path):
    certs = CertificateAuthority.create().write_dir(tmp_path / "certs")
    server = Server(Identity.load(certs, "prefill"))
    router = Identity.load(certs, "router")
    try:
        for expected, answered in (("decode", False), ("prefill", True)):
            with grpc.secure_channel(f"127.0.0.1:{server.port}", router.channel_credentials(),
                                     options=security.channel_options(expected)) as channel:
                if answered:
                    assert call(channel, "/baton.prefill.v1.PrefillService/Prefill") == b"ok"
                    continue
                with pytest.raises(grpc.RpcError) as refused:
                    call(channel, "/baton.prefill.v1.PrefillService/Prefill")
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.ran == ["/baton.prefill.v1.PrefillService/Prefill"]
    finally:
        server.server.stop(grace=None).wait()
