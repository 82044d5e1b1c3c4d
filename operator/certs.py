"""The certificates of a Model's processes: a CA and one certificate per role.

A certificate names its role as a URI SAN `baton://role/<role>` (roles: ROLES); those of the
workers (prefill, decode) also carry the DNS SANs SERVER_NAME and server_name(role), which
clients check instead of the worker's address (pod addresses change): a router dialling a
decode worker, or a prefill worker sending it state, expects server_name("decode"); a health
check expects any worker (SERVER_NAME).

What a certificate proves: that the holder of the CA's key (the operator, or `baton up`)
issued it to a process of that role. It names no pod, node or model; whoever can read a
role's key can act as that role until the certificate expires.

A certificate directory holds ca.crt and <role>.crt / <role>.key (PEM), as
CertificateAuthority.write_dir writes it and as the operator's Secret mounts it. The gRPC
side (credentials, authorization) is baton.workers.security.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("router", "prefill", "decode", "operator")
SERVER_ROLES = ("prefill", "decode")
ROLE_URI_PREFIX = "baton://role/"
SERVER_NAME = "baton-worker"
CA_VALIDITY = datetime.timedelta(days=365)
CERT_VALIDITY = datetime.timedelta(days=365)


def server_name(role: str) -> str:
    """The DNS name a worker certificate of `role` holds (e.g. decode.baton-worker)."""
    return f"{check_role(role)}.{SERVER_NAME}"


def check_role(role: str) -> str:
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
        check_role(role)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in SERVER_ROLES:
            names += [x509.DNSName(SERVER_NAME), x509.DNSName(server_name(role))]
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
