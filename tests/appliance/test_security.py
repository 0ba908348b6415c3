"""The appliance PKI, secrets at rest, operator tokens and the failure limiter."""
from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from replication_appliance.common.errors import CertificateError, SecretError
from replication_appliance.common.secrets import (
    PASSPHRASE_ALPHABET,
    MasterKey,
    generate_passphrase,
)
from replication_appliance.common.tls import (
    ROLE_AGENT,
    CertificateAuthority,
    cert_fingerprint,
    identity_from_der,
    make_csr,
    new_private_key,
)
from replication_appliance.control.auth import (
    FailureLimiter,
    TokenSigner,
    hash_password,
    verify_password,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("appliance.test")


def test_server_certificate_has_hostname_and_ip_sans_and_chains_to_ca(ca):
    cert, _ = ca.issue_server("appliance.test", ["192.0.2.10", "2001:db8::1"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"appliance.test", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("192.0.2.10"),
                                                             ipaddress.ip_address("2001:db8::1")}
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    cert.verify_directly_issued_by(ca.cert)


def test_client_certificate_subject_comes_from_the_appliance_not_the_csr(ca):
    csr = make_csr(new_private_key(), "pretend-to-be-someone-else")
    cert = ca.sign_client_csr(csr, ROLE_AGENT, "machine-42")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "machine-42"
    identity = identity_from_der(cert.public_bytes(serialization.Encoding.DER))
    assert identity.role == ROLE_AGENT and identity.subject_id == "machine-42"
    assert identity.fingerprint == cert_fingerprint(cert)


def test_bad_csrs_are_refused(ca):
    with pytest.raises(CertificateError, match="PEM-encoded"):
        ca.sign_client_csr("hello", ROLE_AGENT, "m")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(weak, hashes.SHA256())
    with pytest.raises(CertificateError, match="at least 2048"):
        ca.sign_client_csr(csr.public_bytes(serialization.Encoding.PEM), ROLE_AGENT, "m")
    with pytest.raises(CertificateError, match="unknown certificate role"):
        ca.sign_client_csr(make_csr(new_private_key(), "x"), "admin", "m")


def test_master_key_file_is_private_and_seals_with_purpose(tmp_path):
    key = MasterKey.create(tmp_path / "master.key")
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    sealed = key.seal_text("s3cret-db-password", "database password")
    assert b"s3cret" not in sealed
    assert MasterKey.load(tmp_path / "master.key").open_text(sealed, "database password") == "s3cret-db-password"
    with pytest.raises(SecretError, match="wrong master key or the data was altered"):
        key.open(sealed, "push-install credential")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretError, match="altered"):
        key.open(tampered, "database password")
    other = MasterKey.create(tmp_path / "other.key")
    with pytest.raises(SecretError):
        other.open(sealed, "database password")
    with pytest.raises(SecretError, match="already exists"):
        MasterKey.create(tmp_path / "master.key")


def test_stored_secret_file_is_0600(tmp_path):
    key = MasterKey.create(tmp_path / "k")
    key.store_secret(tmp_path / "p.sealed", "pass", "registration passphrase")
    assert stat.S_IMODE((tmp_path / "p.sealed").stat().st_mode) == 0o600
    assert key.load_secret(tmp_path / "p.sealed", "registration passphrase") == "pass"


def test_passphrases_are_long_random_and_unambiguous():
    phrases = {generate_passphrase() for _ in range(50)}
    assert len(phrases) == 50
    assert all(len(p) >= 16 and set(p) <= set(PASSPHRASE_ALPHABET) for p in phrases)
    assert not set("0O1lI") & set(PASSPHRASE_ALPHABET)
    with pytest.raises(ValueError, match="at least 16"):
        generate_passphrase(15)


def test_password_hash_is_argon2id_and_verifies():
    h = hash_password("correct horse battery")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "correct horse battery") and not verify_password(h, "wrong")
    assert not verify_password("not-a-hash", "x")


def test_tokens_expire_and_cannot_be_forged():
    signer = TokenSigner(b"k" * 32)
    token, expires = signer.issue("admin", now=1000.0)
    assert signer.verify(token, now=1001.0) == "admin"
    assert signer.verify(token, now=expires + 1) is None
    assert TokenSigner(b"x" * 32).verify(token, now=1001.0) is None
    payload, _, sig = token.partition(".")
    assert signer.verify("e30." + sig, now=1001.0) is None
    assert signer.verify("garbage", now=1001.0) is None


def test_failure_limiter_locks_out_and_doubles():
    t = [0.0]
    limiter = FailureLimiter(max_failures=3, window_s=60, base_lockout_s=5, max_lockout_s=40, clock=lambda: t[0])
    for _ in range(2):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 5
    assert limiter.retry_after("10.0.0.2") == 0  # per address
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 10
    for _ in range(5):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 40  # capped
    t[0] = 100.0
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1")  # old failures left the window
    assert limiter.retry_after("10.0.0.1") == 0


def test_failure_limiter_counts_attempts_in_flight():
    t = [0.0]
    limiter = FailureLimiter(max_failures=3, window_s=60, base_lockout_s=5, max_lockout_s=40, busy_retry_s=1,
                             clock=lambda: t[0])
    assert [limiter.reserve("10.0.0.1") for _ in range(4)] == [0, 0, 0, 1]  # 3 checks at once, the 4th waits
    assert limiter.reserve("10.0.0.2") == 0  # per address
    limiter.succeeded("10.0.0.1")
    limiter.release("10.0.0.1")  # a check that could not be made (database down) gives its attempt back
    limiter.failed("10.0.0.1")
    assert [limiter.reserve("10.0.0.1") for _ in range(3)] == [0, 0, 1]  # one failure: 2 left
    limiter.failed("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.reserve("10.0.0.1") == 5  # 3 failures: locked out
    t[0] = 6.0
    assert [limiter.reserve("10.0.0.1") for _ in range(2)] == [0, 1]  # after a lockout: one attempt at a time
    limiter.failed("10.0.0.1")
    assert limiter.reserve("10.0.0.1") == 10  # and each failure doubles the lockout, as one by one
