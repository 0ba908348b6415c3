"""Push install to 20 Linux targets at once, beside a single install in the same run.

Each target is a real OpenSSH server on a loopback port (tests/fixtures/sshd.py) installing
under its own temporary prefix; the appliance is `appliance serve` on free loopback ports with
a SQLite database; the push installs run as `appliance agents upgrade` would run them (one
thread per target, jobs recorded in the database).

Prints wall time, appliance CPU (the orchestrating process plus `appliance serve`), the targets'
CPU (each sshd with the sessions it ran, and the agents left running) and the whole machine's
CPU (other work on the machine included), for 1 target and for N at once, and the time per step.
Goal: N at once in less than twice the time of one. Note that here the targets' own work
(remote shells, unpacking, the venv and its wheels, registration, agent start) runs on the same
2 cores as the appliance.

    .venv/bin/python benchmarks/bench_push_install.py [--targets 20] [--heartbeat-timeout 120]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance_build.packaging.agent_packages import build_agent_packages  # noqa: E402
from appliance_build.packaging.wheels import DEFAULT_CACHE  # noqa: E402
from replication_appliance.common.datadir import DataDir  # noqa: E402
from replication_appliance.control.initialise import InitOptions, initialise  # noqa: E402
from replication_appliance.db.engine import datadir_engine, session_factory  # noqa: E402
from replication_appliance.db.models import Job, utcnow  # noqa: E402
from replication_appliance.push_install import service  # noqa: E402
from replication_appliance.push_install.credentials import Credential, CredentialStore  # noqa: E402
from replication_appliance.push_install.plan import Target  # noqa: E402
from tests.appliance.push_install.conftest import calm_process_server  # noqa: E402
from tests.fixtures.ports import free_port, wait_for_port  # noqa: E402
from tests.fixtures.sshd import running_sshd  # noqa: E402

APPLIANCE = str(Path(sys.executable).with_name("appliance"))


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def target_cpu_seconds(sshds: list[psutil.Process], prefixes: list[Path]) -> float:
    """CPU of the targets' side: each sshd with every session it ran (reaped children count, so
    bash, install.sh, Python...) and the agents those sessions left running (pid files)."""
    total = 0.0
    for proc in sshds:  # closed sessions count once sshd has reaped them
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.wait_procs(proc.children(), timeout=5)
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    for prefix in prefixes:
        pidfile = prefix / "var" / "lib" / "mobility-agent" / "agent.pid"
        with contextlib.suppress(OSError, ValueError, psutil.NoSuchProcess):
            t = psutil.Process(int(pidfile.read_text())).cpu_times()
            total += t.user + t.system
    return total


def machine_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0)


def keep_process_server_calm(data_dir: DataDir, stop: threading.Event) -> None:
    """The targets run on the appliance's cores here; its CPU sample would refuse new machines."""
    while not stop.wait(2.0):
        calm_process_server(data_dir)


def run_round(data_dir: DataDir, sessions, jobs: list[service.PushJob], server: str, timeout: float,
              serve: psutil.Process, sshds: list[psutil.Process]) -> dict:
    me = psutil.Process()
    prefixes = [Path(job.target.install_root) for job in jobs]
    targets0 = target_cpu_seconds(sshds, prefixes)
    cpu0, machine0, t0 = cpu_seconds([me, serve]), machine_cpu_seconds(), time.perf_counter()
    started = utcnow()
    results = service.run_jobs(data_dir, sessions, jobs, parallel=len(jobs), server=server, heartbeat_timeout=timeout)
    wall = time.perf_counter() - t0
    return {"wall": wall, "appliance_cpu": cpu_seconds([me, serve]) - cpu0,
            "machine_cpu": machine_cpu_seconds() - machine0, "results": results,
            "target_cpu": target_cpu_seconds(sshds, prefixes) - targets0,
            "to_started": last_step_end(sessions, [job_id for job_id, _o, _e in results], "start", started)}


def last_step_end(sessions, job_ids: list[str], step: str, since) -> float | None:
    """Seconds from the round's start until the last job finished `step` (None if one never did)."""
    ends = []
    with sessions() as session:
        for job_id in job_ids:
            row = next(st for st in session.get(Job, job_id).steps if st.name == step)
            if row.status != "succeeded" or row.finished_at is None:
                return None
            ends.append((row.finished_at - since).total_seconds())
    return max(ends)


def step_times(sessions, job_ids: list[str]) -> dict[str, float]:
    """Mean seconds per step over the given jobs."""
    totals: dict[str, list[float]] = {}
    with sessions() as session:
        for job_id in job_ids:
            for st in session.get(Job, job_id).steps:
                if st.started_at and st.finished_at:
                    totals.setdefault(st.name, []).append((st.finished_at - st.started_at).total_seconds())
    return {name: sum(v) / len(v) for name, v in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=20, help="targets pushed to at once (default 20)")
    parser.add_argument("--heartbeat-timeout", type=float, default=120.0, help="seconds to wait for each first heartbeat")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        dist = tmp / "dist"
        build_agent_packages(dist, cache_dir=DEFAULT_CACHE)
        root = tmp / "appliance"
        initialise(InitOptions(data_dir=root, admin_password="bench-operator-password", hostname="127.0.0.1",
                               addresses=["127.0.0.1"], control_port=free_port(), data_port=free_port(),
                               cache_quota_bytes=2**30))
        data_dir = DataDir(root)
        shutil.copytree(dist, service.packages_dir(data_dir))
        config = data_dir.load_config()
        log = stack.enter_context((tmp / "serve.log").open("wb"))
        serve = subprocess.Popen([APPLIANCE, "serve", "--data-dir", str(root), "--bind", "127.0.0.1",
                                  "--log-level", "warning"], stdout=log, stderr=log)
        stack.callback(lambda: (serve.terminate(), serve.wait(30)))
        wait_for_port(config.control_port)
        stop = threading.Event()
        calm = threading.Thread(target=keep_process_server_calm, args=(data_dir, stop), daemon=True)
        calm.start()
        stack.callback(stop.set)

        servers = [stack.enter_context(running_sshd(tmp / f"sshd-{i}")) for i in range(args.targets + 1)]
        CredentialStore(data_dir).add(Credential("root-key", "root", "key", servers[0].key_path.read_text()))
        for server in servers[1:]:
            # One key for all targets: the credential is the appliance's, the targets trust it.
            (server.workdir / "authorized_keys").write_text(Path(f"{servers[0].key_path}.pub").read_text())
        package = service.find_package(service.packages_dir(data_dir), "linux", service.appliance_version())

        def job(i: int) -> service.PushJob:
            prefix = tmp / f"target-{i}"
            prefix.mkdir()
            disk = prefix / "disk0.img"
            disk.write_bytes(os.urandom(1 << 20))
            return service.PushJob(Target("127.0.0.1", "linux", servers[i].port, str(prefix)), "root-key", package,
                                   (str(disk),), f"bench{i:02d}", f"bench-target-{i}")

        def stop_agents() -> None:
            for pidfile in tmp.glob("target-*/var/lib/mobility-agent/agent.pid"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
        stack.callback(stop_agents)

        engine = datadir_engine(data_dir)
        stack.callback(engine.dispose)
        sessions = session_factory(engine)
        server = f"127.0.0.1:{config.control_port}"
        serve_proc = psutil.Process(serve.pid)
        first, batch = [job(0)], [job(i) for i in range(1, args.targets + 1)]
        sshd_procs = [psutil.Process(s.pid) for s in servers]
        single = run_round(data_dir, sessions, first, server, args.heartbeat_timeout, serve_proc, sshd_procs[:1])
        many = run_round(data_dir, sessions, batch, server, args.heartbeat_timeout, serve_proc, sshd_procs[1:])
        # Second runs change nothing on the targets: what is left is the appliance's own work
        # (SSH, reading the installed version and identity, start check, heartbeat lookup).
        single_again = run_round(data_dir, sessions, first, server, args.heartbeat_timeout, serve_proc, sshd_procs[:1])
        many_again = run_round(data_dir, sessions, batch, server, args.heartbeat_timeout, serve_proc, sshd_procs[1:])

        for label, figures in (("1 target", single), (f"{args.targets} targets at once", many),
                               ("1 target, second run", single_again),
                               (f"{args.targets} at once, second run", many_again)):
            failed = [error for _job, _outcome, error in figures["results"] if error]
            to_started = "n/a" if figures["to_started"] is None else f"{figures['to_started']:.1f} s"
            print(f"{label:<22} wall {figures['wall']:7.1f} s   all agents started after {to_started}   "
                  f"appliance CPU {figures['appliance_cpu']:6.1f} s   targets CPU {figures['target_cpu']:6.1f} s   "
                  f"machine CPU {figures['machine_cpu']:7.1f} s   "
                  f"failed {len(failed)}")
            for error in sorted(set(failed))[:3]:
                print(f"    error: {error[:200]}")
            steps = step_times(sessions, [job_id for job_id, _o, _e in figures["results"]])
            print("    mean step seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
        print(f"targets' own CPU per target: {single['target_cpu']:.2f} s alone, "
              f"{many['target_cpu'] / args.targets:.2f} s in the batch (sshd sessions, install, agent)")
        ratio = many["wall"] / single["wall"]
        print(f"ratio {args.targets} at once / 1 = {ratio:.2f}x wall (goal < 2x); appliance CPU per target: "
              f"{single['appliance_cpu']:.2f} s alone, {many['appliance_cpu'] / args.targets:.2f} s in the batch")
        if single["to_started"] and many["to_started"]:
            print(f"ratio until every agent started: {many['to_started'] / single['to_started']:.2f}x")
        print(f"second runs (no change on the targets): {many_again['wall'] / single_again['wall']:.2f}x wall; "
              f"the first rounds used {many['machine_cpu']:.0f} CPU-s of the machine's 2 cores in "
              f"{many['wall']:.0f} s, the targets' installs included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
