"""Push install and agent upgrade on the appliance: credential, package, job, transport, steps."""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from ..common.datadir import DataDir
from ..db.models import Machine
from . import jobs
from .credentials import Credential, CredentialStore
from .errors import PackageError, PushInstallError, VersionRefused
from .plan import OS_FAMILIES, AgentPackage, Target, version_key
from .runner import PushOutcome, PushRequest, run_push_install
from .transport import SshTransport, Transport, WinRmTransport

DEFAULT_PORTS = {"linux": 22, "windows": 5986}
SUFFIX = {"linux": "linux.tar.gz", "windows": "windows.zip"}


def appliance_version() -> str:
    return importlib.metadata.version("replication-appliance")


def packages_dir(data_dir: DataDir) -> Path:
    """Where the installer puts the agent packages the appliance pushes."""
    return data_dir.root / "agent-packages"


def find_package(folder: Path, os_family: str, version: str) -> AgentPackage:
    path = folder / f"mobility-agent-{version}-{SUFFIX[os_family]}"
    if not path.is_file():
        raise PackageError(f"no {os_family} agent package for version {version} in {folder} (expected {path.name}; "
                           "`invoke agent-packages` builds it)")
    package = AgentPackage.from_file(path)
    sums = folder / "SHA256SUMS"
    if sums.is_file():
        listed = {line.split()[1]: line.split()[0] for line in sums.read_text().splitlines() if len(line.split()) == 2}
        if path.name in listed and listed[path.name] != package.sha256:
            raise PackageError(f"{path} does not match its line in {sums}: the file is damaged, copy it again")
    return package


def make_transport(target: Target, credential: Credential, data_dir: DataDir) -> Transport:
    if target.os == "linux":
        return SshTransport(target, credential, data_dir.root / "push-known-hosts")
    return WinRmTransport(target, credential)


@dataclass(frozen=True)
class PushJob:
    target: Target
    credential: str
    package: AgentPackage
    disks: tuple[str, ...] = ()
    hostname: str | None = None
    host_id: str | None = None


def control_server(data_dir: DataDir) -> str:
    config = data_dir.load_config()
    return f"{config.hostname}:{config.control_port}"


def run_job(data_dir: DataDir, sessions: sessionmaker[Session], job: PushJob, kind: str = "push-install",
            actor: str = "cli", server: str | None = None, heartbeat_timeout: float = 120.0,
            transport_factory: Callable[[Target, Credential, DataDir], Transport] = make_transport,
            on_step: Callable[[str, str, str, str], None] | None = None) -> tuple[str, PushOutcome | None, str | None]:
    """Run one push install as a recorded job; return (job id, outcome or None, error or None).

    Errors are recorded in the job (and returned), not raised, so many targets can run at once.
    """
    credential = CredentialStore(data_dir).get(job.credential)
    job_id = jobs.create_job(sessions, kind, job.target, job.credential, job.package.version, actor)
    recorder = jobs.JobRecorder(sessions, job_id, on_step)
    recorder.start()
    try:
        transport = transport_factory(job.target, credential, data_dir)
        try:
            request = PushRequest(job.target, job.package, server or control_server(data_dir), data_dir.ca_cert,
                                  data_dir.passphrase(), credential_owner=credential.username, disks=job.disks,
                                  hostname=job.hostname, host_id=job.host_id)
            outcome = run_push_install(request, transport, recorder, jobs.heartbeat_probe(sessions), heartbeat_timeout)
        finally:
            transport.close()
    except PushInstallError as exc:
        recorder.finish(str(exc))
        return job_id, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the job ends failed, not "running" forever
        error = f"unexpected {type(exc).__name__}: {exc}"
        recorder.finish(error)
        return job_id, None, error
    jobs.record_agent_version(sessions, outcome.machine_id, outcome.version)
    recorder.finish(None, outcome.machine_id)
    return job_id, outcome, None


def run_jobs(data_dir: DataDir, sessions: sessionmaker[Session], push_jobs: list[PushJob], parallel: int = 20,
             **kwargs) -> list[tuple[str, PushOutcome | None, str | None]]:
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(push_jobs)))) as pool:
        return list(pool.map(lambda j: run_job(data_dir, sessions, j, **kwargs), push_jobs))


def parse_target(host: str, os_family: str, port: int | None, install_root: str = "/") -> Target:
    if os_family not in OS_FAMILIES:
        raise PushInstallError(f"--os {os_family!r} is unknown: allowed are {', '.join(OS_FAMILIES)}")
    if not host or any(c.isspace() for c in host):
        raise PushInstallError(f"--host {host!r} is not a host name or address")
    if not install_root.startswith("/"):
        raise PushInstallError(f"--install-root {install_root!r} must be an absolute path")
    return Target(host=host, os=os_family, port=port or DEFAULT_PORTS[os_family], install_root=install_root)


def upgrade_jobs(data_dir: DataDir, sessions: sessionmaker[Session], version: str, folder: Path,
                 machine: str | None = None) -> tuple[list[PushJob], list[str]]:
    """The agents to bring to `version` (the appliance's), with the push path of their last install.

    Returns the jobs and notes on machines left alone (already current). An agent newer than the
    appliance raises VersionRefused: the appliance is upgraded first, then its agents.
    """
    planned, notes = [], []
    with sessions() as session:
        machines = {m.id: m for m in session.query(Machine).all()}
    for label, params in sorted(jobs.last_push_params(sessions).items()):
        machine_id = params.get("machine_id")
        record = machines.get(machine_id or "")
        if record is None or (machine and machine not in (machine_id, record.hostname, label)):
            continue
        running = record.agent_version or params["version"]
        if version_key(running) > version_key(version):
            raise VersionRefused(f"machine {record.hostname} ({label}) runs agent {running}, newer than the "
                                 f"appliance's {version}: upgrade the appliance first, agents after")
        if running == version:
            notes.append(f"{record.hostname} ({label}): agent {running} is current")
            continue
        target = Target(params["host"], params["os"], params["port"], params.get("install_root", "/"))
        planned.append(PushJob(target, params["credential"], find_package(folder, target.os, version)))
    if machine and not planned and not notes:
        raise PushInstallError(f"no push-installed machine matches {machine!r} (use a machine id, host name or "
                               "the target shown by `appliance push-install`)")
    return planned, notes
