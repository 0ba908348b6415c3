"""Push install to 20 Linux targets at once, beside a single install in the same run.

Each target is a real OpenSSH server on a loopback port (tests/fixtures/sshd.py) installing
under its own temporary prefix; the appliance is `appliance serve` on free loopback ports with
a SQLite database; the push installs run as `appliance agents upgrade` would run them (one
thread per target, jobs recorded in the database).

Prints wall time, appliance CPU (the orchestrating process plus `appliance serve`), the targets'
CPU (each sshd with the sessions it ran, and the agents left running) and the whole machine's
CPU (other work on the machine included), for 1 target and for N at once, and the time per step.
Goal: N at once in less than twice the time of one.

Two figures, because here every target runs on the appliance's own 2 cores:
- shared cores: as the machine is. N targets' own work (remote shells, unpacking, the venv and its
  wheels, registration, agent start) queues for the same 2 cores, so N at once cannot take less
  than N x (one target's CPU) / 2 of wall time, whatever the appliance does.
- equal CPU per target: an emulation of N separate machines of equal, small CPU. Each target's
  sshd is put in its own cgroup capped at --quota-percent of one core (default: the machine's
  cores split evenly over N, 10 % each for N=20 on 2 cores); its sessions and the agent it starts
  inherit the cap. The 1-target round gets the same cap. The appliance is not capped. It does not
  emulate a network, separate disks or separate kernels: file system, page cache and kernel locks
  stay shared. Needs a writable cgroup cpu controller (v1 /sys/fs/cgroup/cpu or v2 cpu.max);
  without one the figure is reported as not measured, with the reason.

    .venv/bin/python benchmarks/bench_push_install.py [--targets 20] [--quota-percent P] [--heartbeat-timeout 120]
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replication_appliance.common.datadir import DataDir
from replication_appliance.control.initialise import InitOptions, initialise
from replication_appliance.db.engine import datadir_engine, session_factory
from replication_appliance.db.models import Job, utcnow
from replication_appliance.push_install import service
from replication_appliance.push_install.credentials import Credential, CredentialStore
from replication_appliance.push_install.plan import Target

from appliance_build.packaging.agent_packages import build_agent_packages
from appliance_build.packaging.wheels import DEFAULT_CACHE
from tests.appliance.appliance_harness import calm_process_server
from tests.fixtures.ports import free_port, wait_for_port
from tests.fixtures.sshd import running_sshd

APPLIANCE = str(Path(sys.executable).with_name("appliance"))
CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000


class CgroupUnavailable(Exception):
    """No writable cgroup CPU controller: the equal-CPU figure cannot be measured."""


@dataclass(frozen=True)
class CpuCap:
    """A cgroup whose processes (and their children) together get at most its share of one core."""

    path: Path
    unified: bool  # cgroup v2 (cpu.max) rather than v1 (cpu.cfs_quota_us)

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_seconds(self) -> float:
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["throttled_usec"]) / 1e6 if self.unified else int(stat["throttled_time"]) / 1e9


def cpu_cgroup_base() -> tuple[Path, bool]:
    """Where capped groups can be made: the v2 hierarchy if there is one, else v1's cpu controller."""
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        if "cpu" not in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
            raise CgroupUnavailable(f"the cgroup v2 hierarchy at {CGROUP_ROOT} offers no cpu controller")
        base, unified = CGROUP_ROOT, True
    elif (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").is_file():
        base, unified = CGROUP_ROOT / "cpu", False
    else:
        raise CgroupUnavailable(f"no cgroup cpu controller under {CGROUP_ROOT} (neither v2 cpu.max nor v1 "
                                "cpu/cpu.cfs_quota_us)")
    if not os.access(base, os.W_OK):
        raise CgroupUnavailable(f"{base} is not writable (needs root and cgroups mounted read-write)")
    return base, unified


@contextlib.contextmanager
def cpu_capped_groups(count: int, percent: float, name: str) -> Iterator[list[CpuCap]]:
    """`count` new cgroups, each capped at `percent` of one core; on exit their processes go back
    to the parent group and the groups are removed."""
    base, unified = cpu_cgroup_base()
    quota = int(CFS_PERIOD_US * percent / 100)
    made: list[Path] = []
    try:
        try:
            if unified:
                (base / "cgroup.subtree_control").write_text("+cpu")
            for i in range(count):
                path = base / f"{name}-{i}"
                path.mkdir()
                made.append(path)
                if unified:
                    (path / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
                else:
                    (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                    (path / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            raise CgroupUnavailable(f"cannot make a CPU-capped cgroup under {base}: {exc}") from None
        yield [CpuCap(path, unified) for path in made]
    finally:
        for path in reversed(made):
            remove_group(path)


def remove_group(path: Path) -> None:
    """Move what still runs in the group (sshd, agents) to its parent, then remove it."""
    for _ in range(50):
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                (path.parent / "cgroup.procs").write_text(pid)
        try:
            path.rmdir()
            return
        except OSError:  # a process forked meanwhile: move it too
            time.sleep(0.1)
    print(f"warning: could not remove cgroup {path}; remove it with rmdir once its processes ended", file=sys.stderr)


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


def print_round(label: str, figures: dict, sessions) -> None:
    failed = [error for _job, _outcome, error in figures["results"] if error]
    to_started = "n/a" if figures["to_started"] is None else f"{figures['to_started']:.1f} s"
    print(f"  {label:<26} wall {figures['wall']:7.1f} s   all agents started after {to_started}   "
          f"appliance CPU {figures['appliance_cpu']:6.1f} s   targets CPU {figures['target_cpu']:6.1f} s   "
          f"machine CPU {figures['machine_cpu']:7.1f} s   failed {len(failed)}")
    for error in sorted(set(failed))[:3]:
        print(f"      error: {error[:200]}")
    steps = step_times(sessions, [job_id for job_id, _o, _e in figures["results"]])
    print("      mean step seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))


def print_ratio(name: str, single: dict, many: dict, targets: int) -> None:
    ratio = many["wall"] / single["wall"]
    started = (f"; until every agent started {many['to_started'] / single['to_started']:.2f}x"
               if single["to_started"] and many["to_started"] else "")
    print(f"{name}: {targets} at once / 1 = {ratio:.2f}x wall (goal < 2x){started}; targets' CPU per target "
          f"{single['target_cpu']:.2f} s alone, {many['target_cpu'] / targets:.2f} s in the batch; appliance CPU "
          f"per target {single['appliance_cpu']:.2f} s alone, {many['appliance_cpu'] / targets:.2f} s in the batch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=20, help="targets pushed to at once (default 20)")
    parser.add_argument("--quota-percent", type=float, default=None,
                        help="equal-CPU figure: each target's cap in percent of one core (default: 100 x cores / "
                             "targets, the machine's cores split evenly)")
    parser.add_argument("--heartbeat-timeout", type=float, default=300.0,
                        help="seconds to wait for each first heartbeat (default 300: a capped target is slow)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.targets < 1:
        parser.error(f"--targets {args.targets}: at least 1")
    quota = args.quota_percent if args.quota_percent is not None else 100.0 * cores / args.targets
    if not 1.0 <= quota <= 100.0 * cores:
        parser.error(f"--quota-percent {quota:g}: allowed is 1 to {100 * cores} (percent of one core; "
                     f"this machine has {cores} cores)")

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

        def job(i: int, kind: str) -> service.PushJob:
            """A fresh target on sshd `i`: its own install root, disk and identity for each kind of round."""
            prefix = tmp / f"{kind}-target-{i}"
            prefix.mkdir()
            disk = prefix / "disk0.img"
            disk.write_bytes(os.urandom(1 << 20))
            return service.PushJob(Target("127.0.0.1", "linux", servers[i].port, str(prefix)), "root-key", package,
                                   (str(disk),), f"{kind}{i:02d}", f"{kind}-target-{i}")

        def stop_agents() -> None:
            for pidfile in tmp.glob("*-target-*/var/lib/mobility-agent/agent.pid"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
        stack.callback(stop_agents)

        engine = datadir_engine(data_dir)
        stack.callback(engine.dispose)
        sessions = session_factory(engine)
        server = f"127.0.0.1:{config.control_port}"
        serve_proc = psutil.Process(serve.pid)
        sshd_procs = [psutil.Process(s.pid) for s in servers]

        def round_of(jobs: list[service.PushJob], sshds: list[psutil.Process]) -> dict:
            return run_round(data_dir, sessions, jobs, server, args.heartbeat_timeout, serve_proc, sshds)

        first, batch = [job(0, "shared")], [job(i, "shared") for i in range(1, args.targets + 1)]
        single, many = round_of(first, sshd_procs[:1]), round_of(batch, sshd_procs[1:])
        # Second runs change nothing on the targets: what is left is the appliance's own work
        # (SSH, reading the installed version and identity, start check, heartbeat lookup).
        single_again, many_again = round_of(first, sshd_procs[:1]), round_of(batch, sshd_procs[1:])

        capped: tuple[dict, dict, float] | None = None
        try:
            caps = stack.enter_context(cpu_capped_groups(args.targets + 1, quota, f"bench-push-{os.getpid()}"))
        except CgroupUnavailable as exc:
            not_measured = str(exc)
        else:
            for cap, sshd in zip(caps, servers):
                cap.add(sshd.pid)  # every session it starts from now on, and the agents they start, inherit it
            capped_single = round_of([job(0, "capped")], sshd_procs[:1])
            capped_many = round_of([job(i, "capped") for i in range(1, args.targets + 1)], sshd_procs[1:])
            capped = (capped_single, capped_many, sum(cap.throttled_seconds() for cap in caps))

        print(f"shared cores: every target's work runs on this machine's {cores} cores with the appliance's")
        for label, figures in (("1 target", single), (f"{args.targets} targets at once", many),
                               ("1 target, second run", single_again),
                               (f"{args.targets} at once, second run", many_again)):
            print_round(label, figures, sessions)
        print(f"equal CPU per target: each target (its sshd, sessions and agent) capped at {quota:g} % of one core "
              "in its own cgroup, in both rounds; the appliance uncapped on the same cores. Emulates separate "
              "machines of equal CPU, not a network, separate disks or kernels.")
        if capped is None:
            print(f"  NOT MEASURED: {not_measured}")
        else:
            print_round("1 target, capped", capped[0], sessions)
            print_round(f"{args.targets} at once, capped each", capped[1], sessions)
            print(f"  the caps held the targets back {capped[2]:.1f} s in all (cgroup throttled time)")
        print_ratio("shared cores", single, many, args.targets)
        if capped is not None:
            print_ratio(f"equal CPU ({quota:g} % of a core each)", capped[0], capped[1], args.targets)
        print(f"second runs (no change on the targets): {many_again['wall'] / single_again['wall']:.2f}x wall; "
              f"the shared-cores rounds used {many['machine_cpu']:.0f} CPU-s of the machine's {cores} cores in "
              f"{many['wall']:.0f} s, the targets' installs included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
