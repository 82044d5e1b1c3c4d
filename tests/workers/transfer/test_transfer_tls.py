"""State transfer over TLS: mutual authentication, the expected server name, no plaintext."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent import futures

import grpc
import pytest
import torch

from baton.workers.engine import LayerState, StateKind
from baton.workers.transfer import (
    CHANNEL_OPTIONS,
    FailureReason,
    FirstToken,
    GrpcTransport,
    ReservationBinding,
    StateReceiver,
    TransferError,
    TransferStateHandler,
)

FINGERPRINT = "t" * 64
SERVER_NAME = "decode.baton.test"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make_pki(folder) -> dict[str, bytes]:
    """A CA, a server certificate for SERVER_NAME and a client certificate (EC P-256)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=baton-test-ca")
    for name, san in (("server", f"DNS:{SERVER_NAME}"), ("client", "DNS:prefill.baton.test")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".pem", ".key")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


class Target:
    def __init__(self):
        self.states, self.first_token, self.error = [], None, None

    def bind(self, token, chain_hash):
        pass

    def write(self, state):
        self.states.append(state.tensor.clone())

    def complete(self, first_token, cached_tokens=0):
        self.first_token = first_token

    def fail(self, error):
        self.error = error


@pytest.fixture
def tls_decode_side(pki):
    receiver = StateReceiver(FINGERPRINT)
    server = grpc.server(futures.ThreadPoolExecutor(4), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "baton.decode.v1.DecodeService",
        {"TransferState": TransferStateHandler(receiver).method_handler()}),))
    credentials = grpc.ssl_server_credentials(
        [(pki["server.key"], pki["server.pem"])], root_certificates=pki["ca.pem"],
        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield receiver, f"127.0.0.1:{port}"
    server.stop(None)


def _send(transport: GrpcTransport, address: str, request_id: str) -> torch.Tensor:
    state = torch.randn(2, 9, 2, 16)
    sender = transport.open(address, request_id, request_id, 9, 0, time.time() + 10,
                            ReservationBinding("t" * 32, b"h" * 32))
    sender.on_layer(LayerState(1, StateKind.KV, 0, 9, state))
    sender.finish(FirstToken(3))
    return state


def test_mutual_tls_round_trip(tls_decode_side, pki):
    receiver, address = tls_decode_side
    target = Target()
    receiver.expect("tls1", "tls1", 9, 0, target, time.time() + 10)
    transport = GrpcTransport(FINGERPRINT, server_name=SERVER_NAME,
                              channel_credentials=grpc.ssl_channel_credentials(
                                  pki["ca.pem"], pki["client.key"], pki["client.pem"]))
    sent = _send(transport, address, "tls1")
    transport.close()
    assert torch.equal(target.states[0], sent) and target.first_token == FirstToken(3)


@pytest.mark.parametrize("case", ["no client certificate", "wrong server name", "plaintext"])
def test_unauthenticated_peers_cannot_send(tls_decode_side, pki, case):
    receiver, address = tls_decode_side
    target = Target()
    receiver.expect("tls2", "tls2", 9, 0, target, time.time() + 10)
    if case == "no client certificate":
        transport = GrpcTransport(FINGERPRINT, server_name=SERVER_NAME,
                                  channel_credentials=grpc.ssl_channel_credentials(
                                      pki["ca.pem"]))
    elif case == "wrong server name":
        transport = GrpcTransport(FINGERPRINT, channel_credentials=grpc.ssl_channel_credentials(
            pki["ca.pem"], pki["client.key"], pki["client.pem"]))
    else:
        transport = GrpcTransport(FINGERPRINT)
    with pytest.raises(TransferError) as err:
        _send(transport, address, "tls2")
    transport.close()
    assert err.value.reason is FailureReason.UNAVAILABLE
    assert target.states == [] and target.first_token is None
