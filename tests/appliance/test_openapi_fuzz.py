"""Schemathesis against the control API's own OpenAPI document: whatever it sends, valid or
not, the server never answers 5xx. Runs in-process (ASGI) on SQLite with an operator token
and, for the agent calls, the client certificate of a registered agent in the ASGI TLS
extension (what the TLS server puts there; the real TLS path is in test_control_api)."""
from __future__ import annotations

import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from replication_appliance.common.tls import make_csr, new_private_key
from replication_appliance.control.app import ControlContext, asgi_app
from replication_appliance.control.auth import FailureLimiter
from replication_appliance.db.engine import datadir_engine, session_factory
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from .appliance_harness import ADMIN_PASSWORD, DISKS, init_appliance

EXAMPLES = 10  # per operation and mode: bounded so the run takes seconds


class WithClientCertificate:
    """ASGI wrapper: every request arrives as if over mutual TLS with this certificate."""

    def __init__(self, app, cert_der: bytes) -> None:
        self.app, self.cert_der = app, cert_der

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope.setdefault("extensions", {})["tls"] = {"client_cert_der": self.cert_der, "client_cert_chain": []}
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    data_dir = init_appliance(tmp_path_factory.mktemp("fuzz") / "data")
    engine = datadir_engine(data_dir)
    ctx = ControlContext.open(data_dir, session_factory(engine),
                              passphrase_limiter=FailureLimiter(max_failures=1000),
                              login_limiter=FailureLimiter(max_failures=3, base_lockout_s=3600))
    app = asgi_app(ctx)
    with TestClient(app) as client:
        reg = client.post("/api/v1/agents/register", json={
            "passphrase": data_dir.passphrase(), "host_id": "fuzz-host", "hostname": "fuzz", "os_family": "linux",
            "disks": DISKS, "csr": make_csr(new_private_key(), "fuzz").decode()}).json()
        token = client.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}).json()["token"]
    der = x509.load_pem_x509_certificate(reg["certificate"].encode()).public_bytes(serialization.Encoding.DER)
    yield WithClientCertificate(app, der), token, reg["machine_id"]
    engine.dispose()


def operations(app) -> list:
    return [result.ok() for result in schemathesis.openapi.from_asgi("/openapi.json", app).get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_target, mode):
    app, token, machine_id = fuzz_target
    failures: list[str] = []
    for operation in operations(app):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def exercise(case):
            if (case.path_parameters or {}).get("machine_id") == "0":
                case.path_parameters["machine_id"] = machine_id  # sometimes aim at the real machine
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            if response.status_code >= 500:
                failures.append(f"{operation.label}: {response.status_code} {response.text[:200]} for {case.body!r}")
            case.validate_response(response, checks=[not_a_server_error])

        try:
            exercise()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing invalid to send (e.g. GET /healthz)
    assert failures == []
