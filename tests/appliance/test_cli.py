"""The commands an operator runs: init, passphrase, status, db upgrade, serve, prereqs."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
from pathlib import Path

from tests.fixtures.ports import free_port, wait_for_port

ADMIN = "cli-operator-password"


def appliance(*args: str, env: dict | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["appliance", *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "APPLIANCE_ADMIN_PASSWORD": ADMIN, **(env or {})}, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def init_args(d: Path, *extra: str) -> list[str]:
    return ["init", "--data-dir", str(d), "--hostname", "appliance.test", "--address", "127.0.0.1",
            "--control-port", str(free_port()), "--data-port", str(free_port()), "--cache-quota-gb", "1", *extra]


def test_init_creates_identity_secrets_and_sqlite_database(tmp_path):
    d = tmp_path / "data"
    out = appliance(*init_args(d)).stdout
    assert "sqlite:///" in out and "ca.pem" in out
    for private in ("ca-key.pem", "control-key.pem", "data-key.pem", "master.key", "passphrase.sealed"):
        assert stat.S_IMODE((d / "private" / private).stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "appliance.db").stat().st_mode) == 0o600
    config = json.loads((d / "config.json").read_text())
    assert config["hostname"] == "appliance.test" and config["control_port"] != config["data_port"]
    passphrase = appliance("passphrase", "show", "--data-dir", str(d)).stdout.strip()
    assert len(passphrase) >= 16 and passphrase not in out
    assert ADMIN not in out and not any(ADMIN.encode() in p.read_bytes() for p in d.rglob("*") if p.is_file())

    again = appliance(*init_args(d), check=False)
    assert again.returncode == 1 and "already initialised" in again.stderr and "Traceback" not in again.stderr

    appliance("passphrase", "rotate", "--data-dir", str(d))
    assert appliance("passphrase", "show", "--data-dir", str(d)).stdout.strip() != passphrase
    status = appliance("status", "--data-dir", str(d)).stdout
    assert "builtin" in status and "no machines registered yet" in status
    as_json = json.loads(appliance("status", "--data-dir", str(d), "--json").stdout)
    assert as_json["process_servers"][0]["name"] == "builtin" and as_json["machines"] == []
    assert "database is at the current schema" in appliance("db", "upgrade", "--data-dir", str(d)).stdout


def test_init_with_mariadb_never_shows_or_stores_the_password_in_clear(tmp_path, mariadb_server):
    d = tmp_path / "data"
    url = mariadb_server.url(mariadb_server.new_database())
    result = appliance(*init_args(d, "--db", url), env={"APPLIANCE_DB_PASSWORD": mariadb_server.password})
    secret = mariadb_server.password
    assert secret not in result.stdout + result.stderr
    assert json.loads((d / "config.json").read_text())["db_url"] == url
    assert not any(secret.encode() in p.read_bytes() for p in d.rglob("*") if p.is_file())
    assert stat.S_IMODE((d / "private" / "db-password.sealed").stat().st_mode) == 0o600
    status = appliance("status", "--data-dir", str(d), "--json")
    assert json.loads(status.stdout)["overall_health"] in {"healthy", "warning", "critical"}
    assert secret not in status.stdout + status.stderr


def test_init_with_password_in_url_strips_it(tmp_path, mariadb_server):
    d = tmp_path / "data"
    url = mariadb_server.url(mariadb_server.new_database(), with_password=True)
    result = appliance(*init_args(d, "--db", url))
    assert mariadb_server.password not in result.stdout + result.stderr
    assert "warning: the database password in --db was visible to every user" in result.stderr
    assert mariadb_server.password not in (d / "config.json").read_text()
    appliance("status", "--data-dir", str(d))


def test_failed_init_leaves_nothing_behind(tmp_path, mariadb_server):
    d = tmp_path / "data"
    unreachable = appliance(*init_args(d, "--db", f"mysql+pymysql://appliance@127.0.0.1:{free_port()}/x"),
                            env={"APPLIANCE_DB_PASSWORD": "whatever"}, check=False)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr and not d.exists()

    used = mariadb_server.new_database()
    appliance(*init_args(tmp_path / "first", "--db", mariadb_server.url(used)),
              env={"APPLIANCE_DB_PASSWORD": mariadb_server.password})
    second = appliance(*init_args(d, "--db", mariadb_server.url(used)),
                       env={"APPLIANCE_DB_PASSWORD": mariadb_server.password}, check=False)
    assert second.returncode == 1 and "is not empty" in second.stderr and not d.exists()

    short = appliance(*init_args(d), env={"APPLIANCE_ADMIN_PASSWORD": "short"}, check=False)
    assert short.returncode == 1 and "at least 12" in short.stderr and not d.exists()

    no_password = subprocess.run(["appliance", *init_args(d)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                 env={k: v for k, v in os.environ.items() if k != "APPLIANCE_ADMIN_PASSWORD"})
    assert no_password.returncode == 1 and "APPLIANCE_ADMIN_PASSWORD" in no_password.stderr and not d.exists()


def test_serve_speaks_tls12_plus_and_stops_on_sigterm(tmp_path):
    d = tmp_path / "data"
    appliance(*init_args(d))
    port = json.loads((d / "config.json").read_text())["control_port"]
    with socket.socket() as blocker:  # the data port is taken: serve must say so, not crash
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = appliance("serve", "--data-dir", str(d), "--bind", "127.0.0.1", "--control-port",
                         str(blocker.getsockname()[1]), check=False, timeout=60)
    assert busy.returncode == 1 and "cannot listen" in busy.stderr and "Traceback" not in busy.stderr

    proc = subprocess.Popen(["appliance", "serve", "--data-dir", str(d), "--bind", "127.0.0.1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, timeout=60)
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="appliance.test") as tls:
            assert tls.version() in {"TLSv1.2", "TLSv1.3"}
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: appliance.test\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := tls.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b'"ok"' in reply
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_prereqs_reports_every_seed_row(tmp_path):
    from replication_appliance.requirements import requirement_rows

    result = appliance("prereqs", "--json", "--skip-network", "--cache-path", str(tmp_path), check=False)
    assert result.returncode in (0, 1)
    rows = {r["id"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {r["id"] for r in requirement_rows()}
    assert rows["sw.dotnet"]["status"] == "not applicable" and "Windows" in rows["sw.dotnet"]["observed"]
    assert rows["hw.cpu"]["observed"] == f"{os.cpu_count()} cores"
    assert rows["url.government"]["status"] == "not applicable"
    assert result.returncode == (1 if any(r["status"] == "fail" for r in rows.values()) else 0)
    table = appliance("prereqs", "--skip-network", "--cloud", "government", check=False).stdout
    assert "NOT APPLICABLE" in table and "url.public" in table
