"""Runs the real control server (uvicorn, TLS, the app) in a thread for tests, and talks to
it like an agent, a process server or an operator would."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from replication_appliance.common.datadir import DataDir
from replication_appliance.common.tls import (
    client_ssl_context,
    key_to_pem,
    make_csr,
    new_private_key,
    server_ssl_context,
)
from replication_appliance.control import schemas, service
from replication_appliance.control.app import ControlContext, asgi_app
from replication_appliance.control.auth import FailureLimiter
from replication_appliance.control.initialise import InitOptions, initialise
from replication_appliance.control.schemas import ProcessServerLoad
from replication_appliance.control.service import record_process_server_load
from replication_appliance.db.engine import datadir_engine, session_factory
from replication_appliance.db.models import ProcessServer, utcnow
from replication_appliance.serve import ServeContext, ServerSpec, run_servers
from sqlalchemy import select

from tests.fixtures.ports import free_port, wait_for_port

ADMIN_PASSWORD = "operator-password-for-tests"
DISKS = [{"name": "/dev/sda", "size_bytes": 64 * 2**30}, {"name": "/dev/sdb", "size_bytes": 200 * 2**30}]


def init_appliance(root: Path, mariadb=None) -> DataDir:
    db_url = db_password = None
    if mariadb is not None:
        db_url, db_password = mariadb.url(mariadb.new_database()), mariadb.password
    initialise(InitOptions(data_dir=root, admin_password=ADMIN_PASSWORD, db_url=db_url, db_password=db_password,
                           hostname="appliance.test", addresses=["127.0.0.1"], control_port=free_port(),
                           data_port=free_port(), cache_quota_bytes=2**30))
    return DataDir(root)


@dataclass
class Agent:
    machine_id: str
    cert: Path
    key: Path
    response: dict


@dataclass
class RunningAppliance:
    data_dir: DataDir
    port: int
    ctx: ControlContext
    serve_ctx: ServeContext
    _token: str | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=client_ssl_context(self.data_dir.ca_cert, cert, key), timeout=30)

    def registration(self, host_id: str = "host-1", hostname: str = "web01", disks=None, passphrase=None,
                     key=None) -> tuple[dict, object]:
        key = key or new_private_key()
        return {"passphrase": passphrase or self.data_dir.passphrase(), "host_id": host_id, "hostname": hostname,
                "os_family": "linux", "os_name": "Debian 12", "agent_version": "1.0.0", "addresses": ["10.1.2.3"],
                "disks": disks or DISKS, "csr": make_csr(key, hostname).decode()}, key

    def register_agent(self, tmp: Path, host_id: str = "host-1", hostname: str = "web01", disks=None) -> Agent:
        body, key = self.registration(host_id, hostname, disks)
        with self.client() as c:
            resp = c.post("/api/v1/agents/register", json=body)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        folder = tmp / f"agent-{host_id}-{out['certificate'][-40:-30].replace('/', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_text(out["certificate"])
        (folder / "key.pem").write_bytes(key_to_pem(key))
        return Agent(out["machine_id"], folder / "cert.pem", folder / "key.pem", out)

    def agent_client(self, agent: Agent) -> httpx.Client:
        return self.client(agent.cert, agent.key)

    @contextlib.contextmanager
    def operator(self) -> Iterator[httpx.Client]:
        with self.client() as c:
            if self._token is None:  # one login per server: argon2 verification is deliberately slow
                resp = c.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
                assert resp.status_code == 200, resp.text
                self._token = resp.json()["token"]
            c.headers["Authorization"] = f"Bearer {self._token}"
            yield c

    def set_load(self, name: str = "builtin", **figures) -> None:
        """Record a process server's load as its heartbeat would."""
        load = schemas.ProcessServerLoad(**{"cpu_percent": 10.0, "memory_percent": 20.0, "cache_free_percent": 90.0,
                                            "upload_backlog_bytes": 0, "upload_rate_bytes_per_s": 10e6, **figures})
        with self.serve_ctx.sessions.begin() as session:
            ps = session.scalars(select(ProcessServer).where(ProcessServer.name == name)).one()
            service.record_process_server_load(session, ps.id, load, utcnow())
        self.ctx.heartbeats.refresh_process_servers()

    def audit_actions(self) -> list[str]:
        with self.operator() as op:
            return [e["action"] for e in op.get("/api/v1/audit", params={"limit": 1000}).json()]


@contextlib.contextmanager
def running_appliance(data_dir: DataDir, **limiter) -> Iterator[RunningAppliance]:
    """The control server on a free port, in a thread with its own event loop."""
    serve_ctx = ServeContext.open(data_dir, "127.0.0.1")
    ctx = ControlContext.open(data_dir, serve_ctx.sessions,
                              passphrase_limiter=FailureLimiter(**{"max_failures": 3, "base_lockout_s": 30.0, **limiter}))
    tls = server_ssl_context(data_dir.server_cert("control"), data_dir.server_key("control"), data_dir.ca_cert, False)
    spec = ServerSpec("control", asgi_app(ctx), serve_ctx.control_port, tls, tasks=[ctx.heartbeats.run_flusher()])
    ready: dict = {}

    async def main() -> None:
        ready["loop"], ready["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await run_servers([spec], [], "127.0.0.1", log_level="warning", stop=ready["stop"])

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    wait_for_port(spec.port)
    running = RunningAppliance(data_dir, spec.port, ctx, serve_ctx)
    running.set_load()
    try:
        yield running
    finally:
        ready["loop"].call_soon_threadsafe(ready["stop"].set)
        thread.join(timeout=30)
        serve_ctx.engine.dispose()


def body_json(resp: httpx.Response) -> dict:
    try:
        return resp.json()
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {resp.status_code} {resp.text[:200]}") from None


def calm_process_server(data_dir: DataDir) -> None:
    """Record an idle load for the built-in process server. In tests the machine's CPU is the
    test suite's (and targets', agents') work on the appliance's own 2 cores, and the appliance
    would (rightly) refuse new machines while its CPU sample leaves under 30 % headroom; the
    rule itself is tested in the control plane's tests."""
    engine = datadir_engine(data_dir)
    try:
        with session_factory(engine).begin() as session:
            ps = session.scalars(select(ProcessServer).where(ProcessServer.builtin.is_(True))).one()
            load = ProcessServerLoad(cpu_percent=5.0, memory_percent=20.0, cache_free_percent=90.0)
            record_process_server_load(session, ps.id, load, utcnow())
    finally:
        engine.dispose()
