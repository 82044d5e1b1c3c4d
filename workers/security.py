"""Mutual TLS between baton's processes, and authorization by the caller's role.

Every process holds a certificate signed by the deployment's CA. The certificate names its
role as a URI SAN `baton://role/<role>` (roles: ROLES). Worker certificates (prefill, decode)
also carry the DNS SAN SERVER_NAME, which clients check instead of the worker's address (pod
addresses change; the name says "a worker of this deployment").

What a certificate proves: that the CA's holder (the operator, or `baton up`) issued it to a
process of that role. It does not name a pod, a node or a model; anyone who can read the
role's key can act as that role.

A CA directory holds ca.crt and <role>.crt / <role>.key (PEM), as `write_ca_dir` writes it
and as the operator's Secret mounts it.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("baton.security")

ROLES = ("router", "prefill", "decode", "operator")
SERVER_ROLES = ("prefill", "decode")
ROLE_URI_PREFIX = "baton://role/"
SERVER_NAME = "baton-worker"
CA_VALIDITY = datetime.timedelta(days=365)
CERT_VALIDITY = datetime.timedelta(days=90)

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


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role={role!r} is not one of {', '.join(ROLES)}")
    return role


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Issued:
    """A PEM certificate and its PEM private key."""

    cert: bytes
    key: bytes


class CertificateAuthority:
    """A throwaway CA (`baton up`, tests, the operator's Secret) that issues role certificates."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, name: str = "baton CA") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + CA_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, role: str, validity: datetime.timedelta = CERT_VALIDITY) -> Issued:
        """A certificate for `role`: client and (for workers) server use."""
        _check_role(role)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in SERVER_ROLES:
            names.append(x509.DNSName(SERVER_NAME))
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"baton-{role}")]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + validity)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

    def write_dir(self, directory: Path, roles: Iterable[str] = ROLES) -> Path:
        """Writes ca.crt and <role>.crt / <role>.key for each role (keys 0600)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.crt").write_bytes(self.cert_pem)
        for role in roles:
            issued = self.issue(role)
            (directory / f"{role}.crt").write_bytes(issued.cert)
            key_path = directory / f"{role}.key"
            key_path.touch(mode=0o600)
            key_path.chmod(0o600)
            key_path.write_bytes(issued.key)
        return directory


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
        _check_role(role)
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


# Clients dial workers by address; the certificate is checked against SERVER_NAME instead.
CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", SERVER_NAME),)


@functools.lru_cache(maxsize=256)
def cert_roles(pem: bytes) -> frozenset[str]:
    """The roles a PEM certificate names in its `baton://role/` URI SANs."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(uri[len(ROLE_URI_PREFIX):]
                     for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
                     if uri.startswith(ROLE_URI_PREFIX) and uri[len(ROLE_URI_PREFIX):] in ROLES)


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
