"""The appliance's PKI: its own CA, server certificates with hostname and IP SANs, client
certificates issued from agents' CSRs, and TLS contexts that speak TLS 1.2 or newer only.

Client certificate subjects carry the role and the id they may act for:
CN=<id>, OU=<role> (role is `agent` or `process-server`), O=Replication appliance.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateError
from .secrets import write_private_file

ORGANISATION = "Replication appliance"
ROLE_AGENT = "agent"
ROLE_PROCESS_SERVER = "process-server"
CLIENT_ROLES = (ROLE_AGENT, ROLE_PROCESS_SERVER)
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 825
MAX_CSR_BYTES = 16 * 1024


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of the DER certificate, hex: how the database pins an issued certificate."""
    return hashlib.sha256(cert_der).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str) -> CertificateAuthority:
        key = new_private_key()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA"),
        ])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"CA key {key_path} is not an EC key")
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_private_file(key_path, key_to_pem(self.key))
        cert_path.write_bytes(cert_to_pem(self.cert))

    def _leaf(self, subject: x509.Name, public_key, extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(self, hostname: str, addresses: list[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate for `hostname` with every name and IP address in its SANs."""
        key = new_private_key()
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys([hostname, "localhost", *addresses]):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                             x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
        cert = self._leaf(subject, key.public_key(), [
            (x509.SubjectAlternativeName(sans), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ])
        return cert, key

    def sign_client_csr(self, csr_pem: str | bytes, role: str, subject_id: str) -> x509.Certificate:
        """Issue a client certificate for the CSR's key. The subject is set here from `role` and
        `subject_id`, never taken from the CSR, so a caller cannot name itself another machine."""
        if role not in CLIENT_ROLES:
            raise CertificateError(f"unknown certificate role {role!r}: allowed are {', '.join(CLIENT_ROLES)}")
        csr = load_csr(csr_pem)
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_id),
        ])
        return self._leaf(subject, csr.public_key(), [
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        ])


def load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise CertificateError(f"CSR is {len(data)} bytes; at most {MAX_CSR_BYTES} are accepted")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CertificateError("CSR is not a PEM-encoded PKCS#10 certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertificateError("CSR signature does not verify: it was not signed by the key it carries")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise CertificateError(f"CSR RSA key is {key.key_size} bits; at least 2048 are required")
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise CertificateError("CSR key type is not accepted: use an EC (P-256 or larger) or RSA (>= 2048) key")
    return csr


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """Client side (agent, process server): a CSR for `key`; the appliance sets the real subject."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class ClientIdentity:
    role: str
    subject_id: str
    fingerprint: str


def identity_from_der(cert_der: bytes) -> ClientIdentity | None:
    """Who a verified peer certificate speaks for (None if it is not one the appliance issued)."""
    cert = x509.load_der_x509_certificate(cert_der)
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ids = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(roles) != 1 or len(ids) != 1 or roles[0].value not in CLIENT_ROLES:
        return None
    return ClientIdentity(str(roles[0].value), str(ids[0].value), fingerprint(cert_der))


def server_ssl_context(cert_path: Path, key_path: Path, ca_path: Path, require_client_cert: bool) -> ssl.SSLContext:
    """TLS 1.2+ server context trusting only the appliance CA for client certificates.

    The control port asks for a client certificate but does not require one, because
    registration is how an agent gets its first certificate; every later call is checked
    in the application. The data port requires one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    return ctx


def client_ssl_context(ca_path: Path, cert_path: Path | None = None, key_path: Path | None = None) -> ssl.SSLContext:
    """TLS 1.2+ client context trusting only the appliance CA (agents, process servers, tests)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_path))
    if cert_path is not None:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
