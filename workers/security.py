"""Mutual TLS between baton's processes, and authorization by the caller's role.

Every process holds a certificate from the Model's CA that names its role
(baton.operator.certs). A worker's gRPC port requires one and RoleAuthorization lets each
method be called only by the roles POLICY names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from baton.operator.certs import (
    ROLES,
    SERVER_NAME,
    CertificateAuthority,
    cert_roles,
    check_role,
    server_name,
)

__all__ = ["ROLES", "SERVER_NAME", "CertificateAuthority", "Identity", "RoleAuthorization",
           "POLICY", "CHANNEL_OPTIONS", "cert_roles", "channel_options", "peer_roles",
           "server_name"]

log = logging.getLogger("baton.security")

# Which roles may call which method. A method not listed is refused to everyone.
HEALTH = "/grpc.health.v1.Health/"
POLICY: dict[str, frozenset[str]] = {
    "/baton.decode.v1.DecodeService/Reserve": frozenset({"router"}),
    "/baton.decode.v1.DecodeService/Generate": frozenset({"router"}),
    "/baton.decode.v1.DecodeService/Release": frozenset({"router"}),
    "/baton.decode.v1.DecodeService/TransferState": frozenset({"prefill"}),
    "/baton.prefill.v1.PrefillService/Prefill": frozenset({"router"}),
    # Load is the read-only load report: the router balances on it, a prefill worker asks a
    # decode worker for its transfer port, the operator and `baton up` read it.
    "/baton.worker.v1.WorkerService/Load": frozenset({"router", "prefill", "operator"}),
    "/baton.worker.v1.WorkerService/Drain": frozenset({"operator"}),
    HEALTH + "Check": frozenset(ROLES),
    HEALTH + "Watch": frozenset(ROLES),
}


@dataclass(frozen=True)
class Identity:
    """One process's certificate, key and the CA that verifies its peers (PEM bytes)."""

    role: str
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path, role: str) -> Identity:
        """Reads ca.crt, <role>.crt and <role>.key from directory; a clear error when one is
        missing or is not PEM, or when the certificate does not name the role."""
        check_role(role)
        directory = Path(directory)
        parts = {}
        for field, name in (("ca", "ca.crt"), ("cert", f"{role}.crt"), ("key", f"{role}.key")):
            path = directory / name
            try:
                parts[field] = path.read_bytes()
            except OSError as e:
                raise ValueError(f"certificate directory {str(directory)!r}: cannot read "
                                 f"{name}: {e.strerror or e}") from None
            if b"-----BEGIN " not in parts[field]:
                raise ValueError(f"certificate directory {str(directory)!r}: {name} is not PEM")
        named = cert_roles(parts["cert"])
        if role not in named:
            raise ValueError(f"certificate directory {str(directory)!r}: {role}.crt names "
                             f"roles {sorted(named)}, not {role!r}")
        return cls(role=role, **parts)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS that requires a client certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


# Clients dial workers by address; the certificate is checked against a name instead: any
# worker's (CHANNEL_OPTIONS, health checks) or one role's (channel_options(role)).
CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", SERVER_NAME),)


def channel_options(role: str) -> tuple[tuple[str, str], ...]:
    """Options of a channel to a worker of `role`: its certificate must name that role."""
    return (("grpc.ssl_target_name_override", server_name(role)),)


def peer_roles(context: grpc.ServicerContext) -> frozenset[str] | None:
    """The roles of the caller's verified certificate; None when it presented none."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    return cert_roles(pem[0])


Refused = Callable[[str, str], None]
"""Called with (method, reason) at every refusal; reason is unauthenticated or forbidden."""


class RoleAuthorization(grpc.ServerInterceptor):
    """Refuses every call whose caller's certificate role may not call its method (POLICY):
    UNAUTHENTICATED without a certificate, PERMISSION_DENIED with one of the wrong role."""

    def __init__(self, on_refused: Refused | None = None,
                 policy: dict[str, frozenset[str]] = POLICY):
        self.policy = policy
        self.on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        allowed = self.policy.get(method, frozenset())
        kind = (("stream_" if handler.request_streaming else "unary_")
                + ("stream" if handler.response_streaming else "unary"))
        behavior = getattr(handler, kind)

        def refuse(context: grpc.ServicerContext) -> None:
            roles = peer_roles(context)
            if roles is not None and roles & allowed:
                return
            reason = "unauthenticated" if roles is None else "forbidden"
            log.warning("refused %s from %s (certificate roles: %s)", method, context.peer(),
                        "none" if roles is None else ", ".join(sorted(roles)) or "none")
            if self.on_refused is not None:
                self.on_refused(method, reason)
            if roles is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"{method} needs a client certificate")
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{method} is not open to this caller's role")

        if handler.response_streaming:
            def guarded(request, context):
                refuse(context)
                yield from behavior(request, context)
        else:
            def guarded(request, context):
                refuse(context)
                return behavior(request, context)
        factory = {"unary_unary": grpc.unary_unary_rpc_method_handler,
                   "unary_stream": grpc.unary_stream_rpc_method_handler,
                   "stream_unary": grpc.stream_unary_rpc_method_handler,
                   "stream_stream": grpc.stream_stream_rpc_method_handler}[kind]
        return factory(guarded, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
