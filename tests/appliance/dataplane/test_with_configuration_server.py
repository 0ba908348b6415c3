"""The data path wired to the real configuration server: `appliance init` (given Azurite's
connection string on standard input, sealed in the data directory), `appliance serve`
(control port and the built-in process server), `mobility-agent register` with the
passphrase, operator enables replication, `mobility-agent run`, `appliance apply`, export.
Nothing is given the connection string but `init`: the rest find it sealed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from azure.storage.blob import ContainerClient
from replication_appliance.common.datadir import DataDir
from replication_appliance.common.tls import client_ssl_context
from replication_appliance.storage.azure_blob import CONTAINER

from tests.appliance.appliance_harness import calm_process_server
from tests.fixtures.azurite import ACCOUNT_KEY
from tests.fixtures.ports import free_port, wait_for_port

from .conftest import make_image, random_writes, sha256

MiB = 1 << 20
ADMIN_PASSWORD = "correct-horse-battery-staple"


OUTPUTS: list[str] = []  # every command's output, checked for the connection string


def cli(*args: str, env: dict, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", *args], check=False, capture_output=True, text=True, env=env, timeout=180,
                       input=stdin if stdin is not None else "")
    OUTPUTS.extend((p.stdout, p.stderr))
    if ok:
        assert p.returncode == 0, f"{args[:3]} failed:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture()
def served_appliance(tmp_path, azurite, backend, request):
    """`appliance init` on SQLite or a real MariaDB (the `backend` parameter of tests/appliance),
    then `appliance serve`; storage is Azurite, its connection string given to `init` on stdin."""
    d = tmp_path / "D"
    control, data = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_STORAGE_CONNECTION_STRING"}
    db = []
    if backend == "mariadb":
        mariadb = request.getfixturevalue("mariadb_server")
        db = ["--db", mariadb.url(mariadb.new_database())]
        env["APPLIANCE_DB_PASSWORD"] = mariadb.password
    (tmp_path / "admin").write_text(ADMIN_PASSWORD)
    cli("replication_appliance.cli", "init", "--data-dir", str(d), "--hostname", "127.0.0.1", "--address", "127.0.0.1",
        "--admin-password-file", str(tmp_path / "admin"), "--control-port", str(control), "--data-port", str(data),
        "--cache-quota-gb", "4", "--storage-file", "-", *db, env=env, stdin=azurite.connection_string)
    assert (d / "private" / "storage-connection.sealed").exists()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "replication_appliance.cli", "serve", "--data-dir", str(d),
                                 "--bind", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(control, timeout=60)
        wait_for_port(data, timeout=60)
        yield d, control, data, env
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def operator(d: Path, control: int, machine_id: str, action: str) -> None:
    with httpx.Client(base_url=f"https://127.0.0.1:{control}", verify=client_ssl_context(d / "ca.pem")) as c:
        token = c.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}).json()["token"]
        r = c.post(f"/api/v1/machines/{machine_id}/actions", json={"action": action},
                   headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text


def test_register_enable_replicate_apply_through_the_appliance(tmp_path, served_appliance, backend, azurite):
    d, control, data, env = served_appliance
    host = f"srv-{backend}"  # Azurite is shared by the session: hostnames must not collide
    image = tmp_path / "disk0.img"
    make_image(image, 48 * MiB, seed=21)
    passphrase = cli("replication_appliance.cli", "passphrase", "show", "--data-dir", str(d), env=env).stdout.strip()
    (tmp_path / "pass").write_text(passphrase)
    state = tmp_path / "agent"
    calm_process_server(DataDir(d))  # this machine's CPU is the test suite's, not the appliance's load
    register = ["replication_appliance.agent.cli", "register", "--server", f"127.0.0.1:{control}", "--passphrase-file",
                str(tmp_path / "pass"), "--ca-file", str(d / "ca.pem"), "--state-dir", str(state), "--disk", str(image),
                "--hostname", host, "--host-id", f"host-{backend}"]
    out = cli(*register, env=env).stdout
    assert f"process server 127.0.0.1:{data}" in out
    agent = json.loads((state / "agent.json").read_text())
    assert (state / "agent-key.pem").stat().st_mode & 0o077 == 0

    run = ["replication_appliance.agent.cli", "run", "--state-dir", str(state), "--once"]
    refused = cli(*run, env=env, ok=False)
    assert refused.returncode == 1 and "desired state for this machine is 'stop'" in refused.stderr
    operator(d, control, agent["machine_id"], "enable")
    cli(*run, env=env)
    random_writes(image, 200, seed=3)
    cli(*run, env=env)
    expected = sha256(image)

    status = json.loads(cli("replication_appliance.cli", "status", "--data-dir", str(d), "--json", env=env).stdout)
    [machine] = [m for m in status["machines"] if m["hostname"] == host]
    assert machine["replication_state"] == "continuous"

    cli("replication_appliance.cli", "apply", "--data-dir", str(d), "--machine", host, "--once", env=env)
    points = cli("replication_appliance.cli", "recovery-points", "--data-dir", str(d), "--machine", host,
                 env=env).stdout.splitlines()
    assert len(points) == 2
    cli("replication_appliance.cli", "replica", "export", "--data-dir", str(d), "--machine", host, "--disk", "0",
        "--out", str(tmp_path / "replica.img"), env=env)
    assert sha256(tmp_path / "replica.img") == expected

    # re-registration issues a new certificate: the data port refuses the old one from then on
    old = {name: (state / name).read_bytes() for name in ("agent.pem", "agent-key.pem")}
    cli(*register, env=env)
    assert (state / "agent.pem").read_bytes() != old["agent.pem"]
    for name, content in old.items():
        (state / name).write_bytes(content)
    stale = cli(*run, "--no-heartbeat", env=env, ok=False)
    assert stale.returncode == 1 and "replaced by a newer registration" in stale.stderr

    # the built-in process server uploaded to Azurite with the sealed connection string (the
    # machine's manifest); apply deleted the logs it applied
    container = ContainerClient.from_connection_string(azurite.connection_string, CONTAINER)
    names = {b.name for b in container.list_blobs()}
    assert {f"machines/{agent['machine_id']}.json", f"replicas/{agent['machine_id']}/disk0"} <= names
    assert not any(n.startswith(f"logs/{agent['machine_id']}/") for n in names)
    # the connection string (and its account key) is in no output and no file in plaintext
    for secret in (azurite.connection_string, ACCOUNT_KEY):
        assert not any(secret in out for out in OUTPUTS)
        leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert leaked == []
