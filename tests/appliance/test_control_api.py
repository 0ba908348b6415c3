"""The control server over real TLS on a free port, against SQLite and a real MariaDB."""
from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading

import httpx
import pytest
from replication_appliance.common.tls import (
    client_ssl_context,
    key_to_pem,
    make_csr,
    new_private_key,
)
from replication_appliance.control import app as control_app
from replication_appliance.control.app import MAX_BODY_BYTES
from replication_appliance.db.models import Machine

from .appliance_harness import DISKS

HB = "/api/v1/agents/{}/heartbeat"


def counters(replicated=0, backlog=0):
    return [{"name": d["name"], "total_bytes": d["size_bytes"], "replicated_bytes": replicated, "backlog_bytes": backlog}
            for d in DISKS]


def test_registration_issues_client_certificate_and_assigns_process_server(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    assert agent.response["process_server"]["name"] == "builtin"
    assert agent.response["ca_certificate"] == appliance.data_dir.ca_cert.read_text()
    with appliance.agent_client(agent) as c:
        resp = c.post(HB.format(agent.machine_id), json={"state": "not_enabled", "disks": counters()})
    assert resp.status_code == 200, resp.text
    assert resp.json()["desired_state"] == "stop"
    assert resp.json()["policy"]["rpo_threshold_minutes"] == 60
    assert "agent.registered" in appliance.audit_actions()


def test_reregistration_is_idempotent_and_retires_the_old_certificate(appliance, tmp_path):
    first = appliance.register_agent(tmp_path)
    second = appliance.register_agent(tmp_path)
    assert second.machine_id == first.machine_id
    assert second.response["process_server"] == first.response["process_server"]
    with appliance.agent_client(first) as c:
        old = c.post(HB.format(first.machine_id), json={"state": "not_enabled"})
    with appliance.agent_client(second) as c:
        new = c.post(HB.format(second.machine_id), json={"state": "not_enabled"})
    assert old.status_code == 403 and "replaced" in old.json()["error"]
    assert new.status_code == 200
    with appliance.operator() as op:
        assert len(op.get("/api/v1/machines").json()) == 1


def test_disk_numbers_are_registration_order_and_survive_reregistration(appliance, tmp_path):
    def disks(*names: str) -> list[dict]:
        return [{"name": n, "size_bytes": 2**30} for n in names]

    def numbered(agent) -> list[tuple[int, str]]:
        with appliance.operator() as op:
            shown = op.get(f"/api/v1/machines/{agent.machine_id}").json()["disks"]
        assert [(d["index"], d["name"]) for d in shown] == [(d["index"], d["name"]) for d in agent.response["disks"]]
        return [(d["index"], d["name"]) for d in shown]

    first = appliance.register_agent(tmp_path, disks=disks("/dev/sdc", "/dev/sda"))
    assert numbered(first) == [(0, "/dev/sdc"), (1, "/dev/sda")]  # the order given, not the names' order
    # same disks in another order plus a new one: the kept disks keep their numbers
    again = appliance.register_agent(tmp_path, disks=disks("/dev/sdb", "/dev/sda", "/dev/sdc"))
    assert numbered(again) == [(0, "/dev/sdc"), (1, "/dev/sda"), (2, "/dev/sdb")]
    # dropping the last disk is allowed; a new disk then comes after the kept ones
    again = appliance.register_agent(tmp_path, disks=disks("/dev/sdc", "/dev/sda", "/dev/sdd"))
    assert numbered(again) == [(0, "/dev/sdc"), (1, "/dev/sda"), (2, "/dev/sdd")]
    # dropping a disk that others come after would renumber replicas: refused, nothing changed
    body, _ = appliance.registration(disks=disks("/dev/sdc", "/dev/sdd"))
    with appliance.client() as c:
        refused = c.post("/api/v1/agents/register", json=body)
    assert refused.status_code == 409
    assert "drops /dev/sda (disk 1)" in refused.json()["error"]
    assert numbered(again) == [(0, "/dev/sdc"), (1, "/dev/sda"), (2, "/dev/sdd")]


def test_certificate_cannot_act_for_another_machine(appliance, tmp_path):
    a = appliance.register_agent(tmp_path, host_id="host-a", hostname="a")
    b = appliance.register_agent(tmp_path, host_id="host-b", hostname="b")
    with appliance.agent_client(a) as c:
        resp = c.post(HB.format(b.machine_id), json={"state": "not_enabled"})
    assert resp.status_code == 403
    assert f"belongs to machine {a.machine_id}, not {b.machine_id}" in resp.json()["error"]


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_agent_calls_without_client_certificate_are_refused(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    with appliance.client() as c:
        resp = c.post(HB.format(agent.machine_id), json={"state": "not_enabled"})
    assert resp.status_code == 403 and "client certificate" in resp.json()["error"]


def test_wrong_passphrase_refused_then_slowed_down(appliance):
    body, _ = appliance.registration(passphrase="not-the-passphrase-at-all")
    with appliance.client() as c:
        codes = [c.post("/api/v1/agents/register", json=body).status_code for _ in range(3)]
        assert codes == [401, 401, 401]
        body["passphrase"] = appliance.data_dir.passphrase()
        locked = c.post("/api/v1/agents/register", json=body)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
    actions = appliance.audit_actions()
    assert actions.count("registration.refused") == 3
    with appliance.operator() as op:
        assert op.get("/api/v1/machines").json() == []


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_tls_below_1_2_is_refused(appliance):
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", appliance.port), timeout=10) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="appliance.test").do_handshake()
    ok = ssl.create_default_context(cafile=str(appliance.data_dir.ca_cert))
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", appliance.port), timeout=10) as raw:
        with ok.wrap_socket(raw, server_hostname="appliance.test") as tls:
            assert tls.version() == "TLSv1.2"


def test_replication_lifecycle_with_operator_actions(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    hb = lambda c, **b: c.post(HB.format(agent.machine_id), json=b)
    with appliance.operator() as op, appliance.agent_client(agent) as c:
        assert op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "enable"}).status_code == 200
        assert hb(c, state="not_enabled").json()["desired_state"] == "replicate"
        assert hb(c, state="initiating").status_code == 200
        assert hb(c, state="initial_sync", initial_sync_percent=40, disks=counters(replicated=2**30)).status_code == 200
        back = hb(c, state="initial_sync", initial_sync_percent=30)
        assert back.status_code == 409 and "cannot go back" in back.json()["error"]
        early = hb(c, state="continuous")
        assert early.status_code == 409 and "100 %" in early.json()["error"]
        assert hb(c, state="initial_sync", initial_sync_percent=100).status_code == 200
        assert hb(c, state="continuous").status_code == 200
        machine = op.get(f"/api/v1/machines/{agent.machine_id}").json()
        assert machine["replication_state"] == "continuous" and machine["rpo_minutes"] is not None
        assert op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "resync"}).json()["desired_state"] == "resync"
        assert hb(c, state="continuous").json()["desired_state"] == "resync"
        assert hb(c, state="resync").json()["desired_state"] == "replicate"
        assert op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "pause"}).status_code == 200
        assert hb(c, state="paused").json()["desired_state"] == "pause"
        again = op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "pause"})
        assert again.status_code == 409 and "cannot pause" in again.json()["error"]
        assert op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "disable"}).json()["desired_state"] == "stop"
    actions = appliance.audit_actions()
    for expected in ("machine.enable", "machine.resync", "machine.pause", "machine.disable", "machine.state_changed"):
        assert expected in actions


def test_bad_heartbeat_changes_nothing(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    good = counters(replicated=5)
    with appliance.agent_client(agent) as c:
        assert c.post(HB.format(agent.machine_id), json={"state": "not_enabled", "disks": good}).status_code == 200
        bad = [dict(good[0], replicated_bytes=999), {"name": "/dev/nope", "total_bytes": 1, "replicated_bytes": 0,
                                                      "backlog_bytes": 0}]
        resp = c.post(HB.format(agent.machine_id), json={"state": "not_enabled", "disks": bad})
        assert resp.status_code == 422 and "/dev/nope" in resp.json()["error"]
        over = c.post(HB.format(agent.machine_id), json={"state": "not_enabled",
                                                         "disks": [dict(good[0], replicated_bytes=2**62)]})
        assert over.status_code == 422 and "exceeds total_bytes" in over.json()["error"]
    with appliance.operator() as op:
        disk = op.get(f"/api/v1/machines/{agent.machine_id}").json()["disks"][0]
    assert disk["replicated_bytes"] == 5


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("body, where", [
    ({"state": "flying"}, "body.state"),
    ({"state": "initial_sync", "initial_sync_percent": 101}, "initial_sync_percent"),
    ({"state": "not_enabled", "disks": [{"name": "/dev/sda", "total_bytes": -1, "replicated_bytes": 0, "backlog_bytes": 0}]}, "total_bytes"),
    ({"state": "not_enabled", "surprise": 1}, "surprise"),
])
def test_malformed_heartbeats_get_422_naming_the_field(appliance, tmp_path, body, where):
    agent = appliance.register_agent(tmp_path)
    with appliance.agent_client(agent) as c:
        resp = c.post(HB.format(agent.machine_id), json=body)
    assert resp.status_code == 422 and where in resp.json()["error"]


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_oversize_and_non_json_bodies(appliance):
    with appliance.client() as c:
        big = c.post("/api/v1/agents/register", content=b"x" * (MAX_BODY_BYTES + 1),
                     headers={"content-type": "application/json"})
        assert big.status_code == 413 and "limit" in big.json()["error"]
        garbage = c.post("/api/v1/agents/register", content=b"{not json", headers={"content-type": "application/json"})
        assert garbage.status_code == 422
        bad_csr, _ = appliance.registration()
        bad_csr["csr"] = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        resp = c.post("/api/v1/agents/register", json=bad_csr)
        assert resp.status_code == 400 and "CSR" in resp.json()["error"]
    with appliance.operator() as op:
        assert op.get("/api/v1/machines").json() == []


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_operator_login_required_and_wrong_password_refused(appliance):
    with appliance.client() as c:
        assert c.get("/api/v1/machines").status_code == 401
        assert c.get("/api/v1/machines", headers={"Authorization": "Bearer forged.token"}).status_code == 401
        wrong = c.post("/api/v1/auth/login", json={"username": "admin", "password": "wrong-password-123"})
        assert wrong.status_code == 401
    assert "operator.login_refused" in appliance.audit_actions()


def test_policies_validated_and_audited(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    with appliance.operator() as op:
        too_long = op.post("/api/v1/policies", json={"name": "long", "retention_hours": 361})
        assert too_long.status_code == 422 and "retention_hours" in too_long.json()["error"]
        created = op.post("/api/v1/policies", json={"name": "tight", "rpo_threshold_minutes": 15, "retention_hours": 360})
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        assert op.post("/api/v1/policies", json={"name": "tight"}).status_code == 409
        assert op.patch(f"/api/v1/policies/{pid}", json={"crash_consistent_minutes": 10}).json()["crash_consistent_minutes"] == 10
        assert op.put(f"/api/v1/machines/{agent.machine_id}/policy", json={"policy_id": pid}).status_code == 200
        in_use = op.delete(f"/api/v1/policies/{pid}")
        assert in_use.status_code == 409 and "used by 1 machine" in in_use.json()["error"]
        assert op.get("/api/v1/policies/999999").status_code == 404
    with appliance.agent_client(agent) as c:
        assert c.post(HB.format(agent.machine_id), json={"state": "not_enabled"}).json()["policy"]["rpo_threshold_minutes"] == 15
    actions = appliance.audit_actions()
    assert {"policy.created", "policy.updated", "machine.policy_assigned"} <= set(actions)


def test_scale_out_process_server_registers_heartbeats_and_takes_machines(appliance, tmp_path):
    from replication_appliance.common.tls import key_to_pem, make_csr, new_private_key

    key = new_private_key()
    body = {"passphrase": appliance.data_dir.passphrase(), "name": "ps2", "address": "10.0.0.9:9443",
            "csr": make_csr(key, "ps2").decode()}
    with appliance.client() as c:
        resp = c.post("/api/v1/process-servers/register", json=body)
    assert resp.status_code == 200, resp.text
    ps_id = resp.json()["process_server_id"]
    (tmp_path / "ps.pem").write_text(resp.json()["certificate"])
    (tmp_path / "ps.key").write_bytes(key_to_pem(key))
    # The built-in server is nearly full of cache: new machines must go to ps2.
    appliance.set_load("builtin", cache_free_percent=26.0)
    with appliance.client(tmp_path / "ps.pem", tmp_path / "ps.key") as ps:
        health = ps.post(f"/api/v1/process-servers/{ps_id}/heartbeat",
                         json={"cpu_percent": 5, "memory_percent": 10, "cache_free_percent": 95,
                               "upload_backlog_bytes": 0, "upload_rate_bytes_per_s": 1e6})
        assert health.status_code == 200 and health.json()["health"] == "healthy"
        agent = appliance.register_agent(tmp_path)
        assert agent.response["process_server"]["id"] == ps_id
        assigned = ps.get(f"/api/v1/process-servers/{ps_id}/machines").json()
        assert [m["id"] for m in assigned] == [agent.machine_id]
        other = ps.get("/api/v1/process-servers/not-mine/machines")
        assert other.status_code == 403
    with appliance.agent_client(agent) as c:  # an agent certificate is not a process server's
        assert c.get(f"/api/v1/process-servers/{ps_id}/machines").status_code == 403
    with appliance.operator() as op:
        servers = {p["name"]: p for p in op.get("/api/v1/process-servers").json()}
        assert servers["builtin"]["health"] == "warning" and servers["ps2"]["machines"] == 1
        builtin_id = servers["builtin"]["id"]
        switched = op.put(f"/api/v1/machines/{agent.machine_id}/process-server", json={"process_server_id": builtin_id})
        assert switched.status_code == 200 and switched.json()["process_server_id"] == builtin_id
        appliance.set_load("ps2", cache_free_percent=10.0)
        refused = op.put(f"/api/v1/machines/{agent.machine_id}/process-server", json={"process_server_id": ps_id})
        assert refused.status_code == 409 and "critical" in refused.json()["error"]
        missing = op.put(f"/api/v1/machines/{agent.machine_id}/process-server", json={"process_server_id": "nope"})
        assert missing.status_code == 404
    assert "machine.process_server_switched" in appliance.audit_actions()


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_no_assignment_when_every_process_server_lacks_headroom(appliance, tmp_path):
    appliance.set_load("builtin", cpu_percent=75.0)
    agent = appliance.register_agent(tmp_path)
    assert agent.response["process_server"] is None
    appliance.set_load("builtin", cpu_percent=10.0)
    with appliance.operator() as op:
        op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "enable"})
    with appliance.agent_client(agent) as c:
        resp = c.post(HB.format(agent.machine_id), json={"state": "not_enabled"})
    assert resp.json()["process_server"]["name"] == "builtin"


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_throttle_flag_follows_cache_free_space(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    appliance.set_load("builtin", cache_free_percent=19.0)
    with appliance.agent_client(agent) as c:
        assert c.post(HB.format(agent.machine_id), json={"state": "not_enabled"}).json()["throttled"] is True
    appliance.set_load("builtin", cache_free_percent=21.0)
    with appliance.agent_client(agent) as c:
        assert c.post(HB.format(agent.machine_id), json={"state": "not_enabled"}).json()["throttled"] is False


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_openapi_document_is_served(appliance):
    with appliance.client() as c:
        doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/agents/register" in doc["paths"] and "/api/v1/policies/{policy_id}" in doc["paths"]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_rpo_and_disconnection_alerts_per_machine(appliance, tmp_path):
    import datetime as dt

    from replication_appliance.db.models import Machine, utcnow

    agent = appliance.register_agent(tmp_path)
    url = HB.format(agent.machine_id)
    with appliance.operator() as op, appliance.agent_client(agent) as c:
        op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "enable"})
        for body in ({"state": "initiating"}, {"state": "initial_sync", "initial_sync_percent": 100}, {"state": "continuous"}):
            assert c.post(url, json=body).status_code == 200
        assert op.get(f"/api/v1/machines/{agent.machine_id}").json()["health"] == "healthy"

        def set_times(recovery_minutes_ago: int, heartbeat_minutes_ago: int = 0) -> dict:
            with appliance.serve_ctx.sessions.begin() as session:  # recovery points are the data plane's
                m = session.get(Machine, agent.machine_id)
                m.last_recovery_point_at = utcnow() - dt.timedelta(minutes=recovery_minutes_ago)
            # the agent's last heartbeat lives in the heartbeat store's memory: age it there
            appliance.ctx.heartbeats._figures[agent.machine_id].last_heartbeat_at = \
                utcnow() - dt.timedelta(minutes=heartbeat_minutes_ago)
            return op.get(f"/api/v1/machines/{agent.machine_id}").json()

        late = set_times(90)
        assert late["health"] == "warning" and [a["code"] for a in late["alerts"]] == ["rpo_exceeded"]
        assert 89 <= late["rpo_minutes"] <= 91
        assert op.get("/api/v1/status").json()["overall_health"] == "warning"
        very_late = set_times(125)
        assert very_late["health"] == "critical" and very_late["alerts"][0]["code"] == "rpo_critical"
        silent = set_times(10, heartbeat_minutes_ago=6)
        assert silent["replication_state"] == "disconnected"
        assert "disconnected" in [a["code"] for a in silent["alerts"]] and silent["health"] == "critical"


def _wrong_logins(appliance, per_address: int, addresses=("127.0.0.1",)) -> list:
    """`per_address` wrong-password logins from each address, all sent at once."""
    async def burst():
        clients = [httpx.AsyncClient(base_url=appliance.url, timeout=120, limits=httpx.Limits(max_connections=per_address),
                                     transport=httpx.AsyncHTTPTransport(
                                         local_address=a, verify=client_ssl_context(appliance.data_dir.ca_cert)))
                   for a in addresses]
        try:
            return await asyncio.gather(*(c.post("/api/v1/auth/login", json={"username": "admin", "password": "wrong-password-123"})
                                          for c in clients for _ in range(per_address)))
        finally:
            for c in clients:
                await c.aclose()
    return asyncio.run(burst())


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_concurrent_wrong_logins_get_no_more_tries_than_sequential_ones(appliance):
    appliance.audit_actions()  # the operator's token first: the burst locks 127.0.0.1 out of logging in
    limiter = appliance.ctx.login_limiter
    limiter.base_lockout_s = 300.0  # outlasts the burst on a busy machine, so no lockout ends during it
    responses = _wrong_logins(appliance, 20)
    codes = [r.status_code for r in responses]
    assert codes.count(401) == limiter.max_failures and codes.count(429) == 20 - limiter.max_failures, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and "retry in" in r.json()["error"]
    assert appliance.audit_actions().count("operator.login_refused") == limiter.max_failures  # one per password check


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_password_checks_at_once_are_bounded_across_addresses(appliance, monkeypatch):
    running, peak, lock = 0, 0, threading.Lock()
    real = control_app.verify_password

    def counted(password_hash: str, password: str) -> bool:  # the real check, counting how many run at once
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(password_hash, password)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(control_app, "verify_password", counted)
    addresses = [f"127.0.0.{i}" for i in range(2, 6)]  # each under its own failure limit
    responses = _wrong_logins(appliance, 4, addresses)
    assert [r.status_code for r in responses] == [401] * 16
    assert 1 <= peak <= control_app.MAX_PASSWORD_CHECKS


def test_process_server_name_cannot_be_taken_over_with_the_passphrase(appliance, tmp_path):
    def register(name: str, address: str, cert=None, key_file=None):
        key = new_private_key()
        body = {"passphrase": appliance.data_dir.passphrase(), "name": name, "address": address,
                "csr": make_csr(key, name).decode()}
        with appliance.client(cert, key_file) as c:
            resp = c.post("/api/v1/process-servers/register", json=body)
        if resp.status_code == 200:
            folder = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
            folder.mkdir()
            (folder / "cert.pem").write_text(resp.json()["certificate"])
            (folder / "key.pem").write_bytes(key_to_pem(key))
            return resp, folder / "cert.pem", folder / "key.pem"
        return resp, None, None

    def addresses() -> dict[str, str]:
        with appliance.operator() as op:
            return {p["name"]: p["address"] for p in op.get("/api/v1/process-servers").json()}

    def heartbeat(ps_id: str, cert, key_file) -> int:
        with appliance.client(cert, key_file) as c:
            return c.post(f"/api/v1/process-servers/{ps_id}/heartbeat",
                          json={"cpu_percent": 5, "memory_percent": 10, "cache_free_percent": 95}).status_code

    before = addresses()
    builtin, _, _ = register("builtin", "10.6.6.6:9443")
    assert builtin.status_code == 409 and "built-in process server" in builtin.json()["error"]

    first, cert, key_file = register("ps2", "10.0.0.9:9443")
    assert first.status_code == 200
    ps_id = first.json()["process_server_id"]
    _, other_cert, other_key = register("ps3", "10.0.0.10:9443")
    stolen, _, _ = register("ps2", "10.6.6.6:9443")
    assert stolen.status_code == 409 and "current client certificate" in stolen.json()["error"]
    wrong, _, _ = register("ps2", "10.6.6.6:9443", other_cert, other_key)
    assert wrong.status_code == 403 and "not the current one of process server 'ps2'" in wrong.json()["error"]
    assert addresses() == {**before, "ps2": "10.0.0.9:9443", "ps3": "10.0.0.10:9443"}
    assert heartbeat(ps_id, cert, key_file) == 200  # the real one's certificate still works

    # the process server itself, with its current certificate, may move and renew it
    moved, new_cert, new_key = register("ps2", "10.0.0.11:9443", cert, key_file)
    assert moved.status_code == 200 and moved.json()["process_server_id"] == ps_id
    assert addresses()["ps2"] == "10.0.0.11:9443"
    assert heartbeat(ps_id, new_cert, new_key) == 200 and heartbeat(ps_id, cert, key_file) == 403
    assert "process_server.reregistered" in appliance.audit_actions()


@pytest.mark.parametrize("backend", ["sqlite"])  # DB-independent: SQLite only, to keep the suite fast
def test_a_scale_out_process_server_serving_no_machine_can_be_removed(appliance, tmp_path):
    """Retired, or its certificate lost: removing it frees its name; not while it serves
    machines, never the built-in one."""
    key = new_private_key()
    body = {"passphrase": appliance.data_dir.passphrase(), "name": "ps2", "address": "10.0.0.9:9443",
            "csr": make_csr(key, "ps2").decode()}
    with appliance.client() as c:
        registered = c.post("/api/v1/process-servers/register", json=body).json()
    ps_id = registered["process_server_id"]
    (tmp_path / "ps.pem").write_text(registered["certificate"])
    (tmp_path / "ps.key").write_bytes(key_to_pem(key))
    appliance.set_load("builtin", cache_free_percent=26.0)  # new machines go to ps2
    with appliance.client(tmp_path / "ps.pem", tmp_path / "ps.key") as ps:
        assert ps.post(f"/api/v1/process-servers/{ps_id}/heartbeat",
                       json={"cpu_percent": 5, "memory_percent": 10, "cache_free_percent": 95}).status_code == 200
    agent = appliance.register_agent(tmp_path)
    assert agent.response["process_server"]["id"] == ps_id
    with appliance.operator() as op:
        builtin_id = {p["name"]: p["id"] for p in op.get("/api/v1/process-servers").json()}["builtin"]
        busy = op.delete(f"/api/v1/process-servers/{ps_id}")
        assert busy.status_code == 409 and "serves 1 machine(s): switch them" in busy.json()["error"]
        builtin = op.delete(f"/api/v1/process-servers/{builtin_id}")
        assert builtin.status_code == 409 and "built-in process server" in builtin.json()["error"]
        assert op.delete("/api/v1/process-servers/nope").status_code == 404
        appliance.set_load("builtin", cache_free_percent=90.0)
        assert op.put(f"/api/v1/machines/{agent.machine_id}/process-server",
                      json={"process_server_id": builtin_id}).status_code == 200
        assert op.delete(f"/api/v1/process-servers/{ps_id}").status_code == 204
        assert [p["name"] for p in op.get("/api/v1/process-servers").json()] == ["builtin"]
    assert "process_server.removed" in appliance.audit_actions()
    with appliance.client(tmp_path / "ps.pem", tmp_path / "ps.key") as ps:  # its certificate no longer works
        assert ps.post(f"/api/v1/process-servers/{ps_id}/heartbeat",
                       json={"cpu_percent": 5, "memory_percent": 10, "cache_free_percent": 95}).status_code == 403
    with appliance.client() as c:  # the name is free again, without the lost certificate
        again = c.post("/api/v1/process-servers/register", json={**body, "csr": make_csr(new_private_key(), "ps2").decode()})
    assert again.status_code == 200 and again.json()["process_server_id"] != ps_id


def test_reregistered_agent_can_report_again(appliance, tmp_path):
    agent = appliance.register_agent(tmp_path)
    with appliance.operator() as op:
        op.post(f"/api/v1/machines/{agent.machine_id}/actions", json={"action": "enable"})
        with appliance.agent_client(agent) as c:
            for body in ({"state": "initiating"}, {"state": "initial_sync", "initial_sync_percent": 100}, {"state": "continuous"}):
                assert c.post(HB.format(agent.machine_id), json=body).status_code == 200
        seen = op.get(f"/api/v1/machines/{agent.machine_id}").json()["last_heartbeat_at"]
        # the agent lost its state: it registers again and starts replicating from the start
        again = appliance.register_agent(tmp_path)
        assert again.machine_id == agent.machine_id
        restarted = op.get(f"/api/v1/machines/{agent.machine_id}").json()
        assert restarted["replication_state"] == "initiating" and restarted["desired_state"] == "replicate"
        with appliance.agent_client(again) as c:
            first = c.post(HB.format(agent.machine_id), json={"state": "initial_sync", "initial_sync_percent": 0,
                                                              "disks": counters()})
            assert first.status_code == 200, first.text
            assert first.json()["desired_state"] == "replicate"
            assert c.post(HB.format(agent.machine_id), json={"state": "initial_sync", "initial_sync_percent": 20}).status_code == 200
            back = c.post(HB.format(agent.machine_id), json={"state": "initial_sync", "initial_sync_percent": 10})
            assert back.status_code == 409 and "cannot go back" in back.json()["error"]  # still refused
        machine = op.get(f"/api/v1/machines/{agent.machine_id}").json()
    assert machine["replication_state"] == "initial_sync" and machine["initial_sync_percent"] == 20
    assert dt.datetime.fromisoformat(machine["last_heartbeat_at"]) > dt.datetime.fromisoformat(seen)
    # the restart is on record, and the row a restarted server reads holds the new agent's state
    with appliance.operator() as op:
        entries = op.get("/api/v1/audit", params={"limit": 1000}).json()
    reregistered = next(e for e in entries if e["action"] == "agent.reregistered")
    assert reregistered["details"]["replication_state"] == {"from": "continuous", "to": "initiating"}
    appliance.ctx.heartbeats.flush()
    with appliance.serve_ctx.sessions() as session:
        assert session.get(Machine, agent.machine_id).replication_state == "initial_sync"
