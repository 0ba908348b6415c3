"""Registration + heartbeat load on the configuration server, against a real MariaDB.

N simulated agents (default 200, the appliance's machine limit) register with the passphrase
and a CSR, then heartbeat once a second each over mutual TLS (one kept-alive connection per
agent, as the Mobility agent does). Prints p50/p95/p99/max latency and the CPU used by the
server process and by MariaDB. Same-run baseline: the same agents calling GET /healthz (TLS +
HTTP stack, no database) at the same rate, so the database and application cost stands out.

    .venv/bin/python benchmarks/bench_control_plane.py [--agents 200] [--seconds 30]

Goal (issue 5): p99 < 50 ms at 200 agents on 2 cores. Client and server share the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from replication_appliance.common.tls import (
    client_ssl_context,
    key_to_pem,
    make_csr,
    new_private_key,
)

from tests.fixtures.mariadb import start_mariadb, stop_mariadb
from tests.fixtures.ports import free_port, wait_for_port

ADMIN_PASSWORD = "benchmark-operator-password"
DISKS = [{"name": "/dev/sda", "size_bytes": 64 * 2**30}, {"name": "/dev/sdb", "size_bytes": 200 * 2**30}]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + sum(c.cpu_times().user + c.cpu_times().system for c in proc.children(recursive=True))


def register_agents(base: str, data: Path, passphrase: str, n: int, folder: Path) -> tuple[list[tuple[str, Path, Path]], list[float]]:
    agents, latencies = [], []
    with httpx.Client(base_url=base, verify=client_ssl_context(data / "ca.pem"), timeout=30) as c:
        for i in range(n):
            key = new_private_key()
            body = {"passphrase": passphrase, "host_id": f"bench-{i}", "hostname": f"vm{i:03d}", "os_family": "linux",
                    "disks": DISKS, "csr": make_csr(key, f"vm{i:03d}").decode()}
            start = time.perf_counter()
            resp = c.post("/api/v1/agents/register", json=body)
            latencies.append(time.perf_counter() - start)
            resp.raise_for_status()
            out = resp.json()
            cert, keyfile = folder / f"{i}.pem", folder / f"{i}.key"
            cert.write_text(out["certificate"])
            keyfile.write_bytes(key_to_pem(key))
            agents.append((out["machine_id"], cert, keyfile))
    return agents, latencies


class Connection:
    """A kept-alive HTTP/1.1 connection over TLS with as little client work as possible, so the
    figures are the server's and not a client library's (the client shares the 2 cores)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="appliance.test"))

    async def request(self, method: str, path: str, body: bytes | None, headers: dict | None = None) -> int:
        head = f"{method} {path} HTTP/1.1\r\nHost: appliance.test\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        header = await self.reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length"))
        await self.reader.readexactly(length)
        return int(header.split(b" ", 2)[1])

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def load(port: int, ca: Path, agents, seconds: float, path_for,
               operator: tuple[str, float] | None = None) -> tuple[list[float], int, list[float]]:
    latencies: list[float] = []
    status_latencies: list[float] = []
    errors = 0
    conns = [await Connection.open(port, client_ssl_context(ca, cert, key)) for _, cert, key in agents]
    start = time.perf_counter() + 1.0

    async def poll_status(token: str, every_s: float) -> None:
        conn = await Connection.open(port, client_ssl_context(ca))
        tick = start
        while tick < start + seconds:
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
            t0 = time.perf_counter()
            await conn.request("GET", "/api/v1/status", None, {"Authorization": f"Bearer {token}"})
            status_latencies.append(time.perf_counter() - t0)
            tick += every_s
        await conn.close()

    async def agent(i: int, machine_id: str, conn: Connection) -> None:
        nonlocal errors
        method, path, body = path_for(machine_id)
        data = json.dumps(body).encode() if body is not None else None
        tick = start + i / len(agents)  # spread the agents over the second
        while tick < start + seconds:
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
            t0 = time.perf_counter()
            status = await conn.request(method, path, data)
            latencies.append(time.perf_counter() - t0)
            errors += status != 200
            tick += 1.0

    jobs = [agent(i, m, c) for i, ((m, _, _), c) in enumerate(zip(agents, conns, strict=True))]
    if operator is not None:
        jobs.append(poll_status(*operator))
    await asyncio.gather(*jobs)
    await asyncio.gather(*(c.close() for c in conns))
    return latencies, errors, status_latencies


def measured(label: str, port: int, ca: Path, agents, seconds: float, path_for, server: psutil.Process,
             db: psutil.Process, operator: tuple[str, float] | None = None) -> None:
    me = psutil.Process()
    s0, d0, c0, w0 = cpu_seconds(server), cpu_seconds(db), cpu_seconds(me), time.perf_counter()
    latencies, errors, status = asyncio.run(load(port, ca, agents, seconds, path_for, operator))
    wall = time.perf_counter() - w0
    s1, d1, c1 = cpu_seconds(server), cpu_seconds(db), cpu_seconds(me)
    ms = [x * 1000 for x in latencies]
    print(f"{label:<34} {len(ms):>6} req {len(ms) / wall:>6.0f}/s  p50 {percentile(ms, 50):6.1f} ms  "
          f"p95 {percentile(ms, 95):6.1f} ms  p99 {percentile(ms, 99):6.1f} ms  max {max(ms):6.1f} ms  "
          f"errors {errors}  CPU: server {100 * (s1 - s0) / wall:5.1f} %  MariaDB {100 * (d1 - d0) / wall:5.1f} %  "
          f"client {100 * (c1 - c0) / wall:5.1f} %")
    print(f"{'':<34} load average during the run: {os.getloadavg()[0]:.1f} (other work on the machine skews figures)")
    if status:
        st = [x * 1000 for x in status]
        print(f"{'  operator GET /api/v1/status':<34} {len(st):>6} req  p50 {percentile(st, 50):6.1f} ms  "
              f"max {max(st):6.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-control-"))
    mariadb = start_mariadb(work)
    data = work / "appliance"
    env = {**os.environ, "APPLIANCE_ADMIN_PASSWORD": ADMIN_PASSWORD, "APPLIANCE_DB_PASSWORD": mariadb.password}
    appliance = str(REPO / ".venv" / "bin" / "appliance")
    control, data_port = free_port(), free_port()
    subprocess.run([appliance, "init", "--data-dir", str(data), "--db", mariadb.url(mariadb.new_database()),
                    "--hostname", "appliance.test", "--address", "127.0.0.1", "--control-port", str(control),
                    "--data-port", str(data_port), "--cache-quota-gb", "10"], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([appliance, "serve", "--data-dir", str(data), "--bind", "127.0.0.1", "--log-level", "warning"],
                            env=env)
    try:
        wait_for_port(control, timeout=60)
        base = f"https://127.0.0.1:{control}"
        passphrase = subprocess.run([appliance, "passphrase", "show", "--data-dir", str(data)], check=True,
                                    capture_output=True, text=True).stdout.strip()
        print(f"{os.cpu_count()} cores, {args.agents} agents, {args.seconds:.0f} s per run, MariaDB "
              f"{subprocess.run(['mariadbd', '--version'], capture_output=True, text=True).stdout.split()[2]}")
        certs = work / "agents"
        certs.mkdir()
        t0 = time.perf_counter()
        agents, reg = register_agents(base, data, passphrase, args.agents, certs)
        reg_ms = [x * 1000 for x in reg]
        print(f"{'registration (sequential)':<34} {len(reg):>6} req {len(reg) / (time.perf_counter() - t0):>6.0f}/s  "
              f"p50 {percentile(reg_ms, 50):6.1f} ms  p99 {percentile(reg_ms, 99):6.1f} ms")
        server, db = psutil.Process(proc.pid), mariadb.process and psutil.Process(mariadb.process.pid)
        ca = data / "ca.pem"
        counters = [{"name": d["name"], "total_bytes": d["size_bytes"], "replicated_bytes": d["size_bytes"] // 2,
                     "backlog_bytes": 4096} for d in DISKS]
        measured("baseline: GET /healthz (no DB)", control, ca, agents, args.seconds,
                 lambda m: ("GET", "/healthz", None), server, db)
        measured("heartbeat (MariaDB)", control, ca, agents, args.seconds,
                 lambda m: ("POST", f"/api/v1/agents/{m}/heartbeat", {"state": "not_enabled", "disks": counters}),
                 server, db)
        with httpx.Client(base_url=base, verify=client_ssl_context(ca), timeout=30) as c:
            token = c.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}).json()["token"]
        measured("heartbeat + operator status/5 s", control, ca, agents, args.seconds,
                 lambda m: ("POST", f"/api/v1/agents/{m}/heartbeat", {"state": "not_enabled", "disks": counters}),
                 server, db, operator=(token, 5.0))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        stop_mariadb(mariadb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
