"""Linux push install for real: sshd on loopback as the target, the agent package copied over
SFTP, installed under a temporary prefix, registered with a running appliance, first heartbeat
confirmed; a second run changes nothing; a running agent registered elsewhere is registered
here; wrong credentials fail clearly; a failed install leaves
the target clean; upgrades keep the registration; each job stages in a new private folder; a
failed upload fails its job clearly."""
from __future__ import annotations

import json
import pwd
import re
import resource
import stat
import subprocess
import tarfile
from pathlib import Path

import httpx
from replication_appliance.common.tls import client_ssl_context
from replication_appliance.db.models import Job, Machine
from replication_appliance.push_install import service
from replication_appliance.push_install.credentials import Credential
from replication_appliance.push_install.plan import AgentPackage, LinuxLayout, Target
from replication_appliance.push_install.transport import SshTransport

from appliance_build.packaging.agent_packages import build_agent_packages, package_paths
from tests.fixtures.ports import free_port

from .conftest import Appliance, LinuxTarget

SECRET = "Wr0ng-but-secret-password"


def add_key_credential(appliance: Appliance, target: LinuxTarget, name: str = "root-key") -> None:
    appliance.cli("credentials", "add", "--data-dir", str(appliance.data_dir.root), name, "--user", "root",
                  "--key-file", str(target.ssh.key_path), check=True)


def push(appliance: Appliance, target: LinuxTarget, credential: str = "root-key", *extra: str):
    appliance.calm_process_server()
    return appliance.cli(
        "push-install", "--data-dir", str(appliance.data_dir.root), "--host", target.ssh.host,
        "--port", str(target.ssh.port), "--os", "linux", "--credential", credential,
        "--install-root", str(target.root), "--disk", str(target.disk), "--hostname", "web01",
        "--host-id", f"test-target-{target.ssh.port}", "--server", appliance.server, "--heartbeat-timeout", "30",
        *extra)


def api_job(appliance: Appliance, job_id: str) -> httpx.Response:
    """GET /api/v1/jobs/{id} as an operator."""
    with httpx.Client(base_url=f"https://{appliance.server}", timeout=30,
                      verify=client_ssl_context(appliance.data_dir.ca_cert)) as client:
        token = client.post("/api/v1/auth/login", json={"username": "admin", "password": "operator-password-for-tests"})
        client.headers["Authorization"] = f"Bearer {token.json()['token']}"
        shown = client.get(f"/api/v1/jobs/{job_id}")
    assert shown.status_code == 200, shown.text
    return shown


def jobs(appliance: Appliance) -> list[Job]:
    with appliance.sessions()() as session:
        rows = session.query(Job).order_by(Job.created_at).all()
        for job in rows:
            _ = job.steps
        return rows


def steps(job: Job) -> dict[str, str]:
    return {s.name: s.status for s in job.steps}


def test_push_install_registers_heartbeats_and_second_run_is_a_no_op(appliance: Appliance, linux_target: LinuxTarget):
    add_key_credential(appliance, linux_target)
    first = push(appliance, linux_target)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed and running" in first.stdout

    # On the target: the version installed under the prefix, the agent running, the staging folder gone.
    assert linux_target.installed_version == "1.0.0"
    pid = linux_target.agent_pid()
    assert pid is not None
    identity = json.loads((linux_target.state_dir / "agent.json").read_text())
    assert identity["control_server"] == appliance.server
    assert not list((linux_target.root / "var" / "tmp").glob("mobility-agent-push-*"))

    # On the appliance: the machine and its heartbeat, a succeeded job with every step.
    with appliance.sessions()() as session:
        machine = session.get(Machine, identity["machine_id"])
        assert machine is not None and machine.last_heartbeat_at is not None
        assert machine.hostname == "web01" and machine.agent_version == "1.0.0"
    (job,) = jobs(appliance)
    assert job.status == "succeeded" and job.progress_percent == 100
    assert steps(job) == {name: "succeeded" for name in ("copy", "check", "install", "register", "start", "heartbeat")}

    # The job's steps through the API, as an operator sees them; no secret in it.
    shown = api_job(appliance, job.id)
    assert [s["name"] for s in shown.json()["steps"]] == ["copy", "check", "install", "register", "start", "heartbeat"]
    assert appliance.data_dir.passphrase() not in shown.text

    # Second run: nothing to do on the target, the agent keeps running, heartbeat still confirmed.
    marker = linux_target.root / "opt" / "mobility-agent" / "1.0.0" / "INSTALLED"
    mtime = marker.stat().st_mtime_ns
    second = push(appliance, linux_target)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing changed" in second.stdout
    assert linux_target.agent_pid() == pid
    assert marker.stat().st_mtime_ns == mtime
    again = jobs(appliance)[-1]
    assert steps(again) == {"copy": "skipped", "check": "skipped", "install": "skipped", "register": "skipped",
                            "start": "succeeded", "heartbeat": "succeeded"}

    listed = appliance.cli("agents", "jobs", "--data-dir", str(appliance.data_dir.root), "--job", job.id, check=True)
    assert "heartbeat" in listed.stdout and "succeeded" in listed.stdout

    # A running agent registered with another appliance is registered here: it holds its state
    # folder (one agent per folder), so it is stopped for that, and started again.
    identity["control_server"] = "elsewhere.example:443"
    (linux_target.state_dir / "agent.json").write_text(json.dumps(identity))
    third = push(appliance, linux_target)
    assert third.returncode == 0, third.stdout + third.stderr
    assert steps(jobs(appliance)[-1])["register"] == "succeeded"
    assert json.loads((linux_target.state_dir / "agent.json").read_text())["control_server"] == appliance.server
    assert linux_target.agent_pid() not in (None, pid)


def test_wrong_credentials_give_a_clear_error_and_leave_the_target_untouched(appliance: Appliance,
                                                                            linux_target: LinuxTarget):
    appliance.cli("credentials", "add", "--data-dir", str(appliance.data_dir.root), "bad", "--user", "root",
                  env={"APPLIANCE_PUSH_PASSWORD": SECRET}, check=True)
    result = push(appliance, linux_target, "bad")
    assert result.returncode == 1
    assert "refused the login of 'root' with credential 'bad'" in result.stderr
    assert "check the user name and password" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert sorted(p.name for p in linux_target.root.iterdir()) == ["disk0.img"]
    (job,) = jobs(appliance)
    assert job.status == "failed" and "refused the login" in (job.error or "")
    assert SECRET not in job.params + (job.error or "")
    shown = api_job(appliance, job.id).json()
    assert shown["status"] == "failed" and "refused the login of 'root'" in shown["error"]
    assert [st["status"] for st in shown["steps"]] == ["pending"] * 6  # nothing ran on the target
    assert SECRET not in json.dumps(shown)


def test_credentials_are_sealed_and_never_shown(appliance: Appliance):
    root = str(appliance.data_dir.root)
    appliance.cli("credentials", "add", "--data-dir", root, "ops", "--user", "deploy",
                  env={"APPLIANCE_PUSH_PASSWORD": SECRET}, check=True)
    sealed = appliance.data_dir.private / "push-credentials" / "ops.sealed"
    assert SECRET.encode() not in sealed.read_bytes()
    assert sealed.stat().st_mode & 0o077 == 0
    listed = appliance.cli("credentials", "list", "--data-dir", root, "--json", check=True)
    assert json.loads(listed.stdout) == [{"name": "ops", "username": "deploy", "kind": "password", "sudo": "yes"}]
    assert SECRET not in listed.stdout
    again = appliance.cli("credentials", "add", "--data-dir", root, "ops", "--user", "x",
                          env={"APPLIANCE_PUSH_PASSWORD": "other"})
    assert again.returncode == 1 and "exists already" in again.stderr
    # A sealed file copied under another name does not open: the name is bound into the seal.
    sealed.with_name("copy.sealed").write_bytes(sealed.read_bytes())
    broken = appliance.cli("credentials", "list", "--data-dir", root)
    assert broken.returncode == 1 and "cannot be opened" in broken.stderr
    sealed.with_name("copy.sealed").unlink()
    appliance.cli("credentials", "remove", "--data-dir", root, "ops", check=True)
    missing = push_missing = appliance.cli("push-install", "--data-dir", root, "--host", "127.0.0.1", "--os", "linux",
                                           "--credential", "ops")
    assert push_missing.returncode == 1 and "no push-install credential named 'ops'" in missing.stderr


def test_failed_install_leaves_the_target_clean_and_can_be_run_again(appliance: Appliance, linux_target: LinuxTarget,
                                                                   agent_packages: Path, tmp_path: Path):
    """A package missing a dependency fails at `install`; nothing of it stays on the target."""
    good = package_paths(agent_packages)[0]
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    broken = broken_dir / good.name
    with tarfile.open(good) as src, tarfile.open(broken, "w:gz") as dst:
        for member in src.getmembers():
            if "/wheels/xxhash-" in member.name:
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    add_key_credential(appliance, linux_target)
    failed = push(appliance, linux_target, "root-key", "--package", str(broken))
    assert failed.returncode == 1
    job = jobs(appliance)[-1]
    assert steps(job)["install"] == "failed" and steps(job)["register"] == "pending"
    assert not (linux_target.root / "opt" / "mobility-agent" / "1.0.0").exists()
    assert not list((linux_target.root / "var" / "tmp").glob("mobility-agent-push-*"))
    assert linux_target.agent_pid() is None

    rerun = push(appliance, linux_target)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert linux_target.installed_version == "1.0.0"


def test_upgrade_from_n_to_n_plus_1_keeps_configuration_and_registration(appliance: Appliance,
                                                                        linux_target: LinuxTarget,
                                                                        wheel_cache: Path, tmp_path: Path):
    """N = 0.9.0 pushed explicitly; `appliance agents upgrade` brings it to the appliance's 1.0.0."""
    old_dist = tmp_path / "dist-0.9.0"
    build_agent_packages(old_dist, cache_dir=wheel_cache, version="0.9.0")
    add_key_credential(appliance, linux_target)
    first = push(appliance, linux_target, "root-key", "--package", str(package_paths(old_dist, "0.9.0")[0]))
    assert first.returncode == 0, first.stdout + first.stderr
    assert linux_target.installed_version == "0.9.0"
    identity_before = (linux_target.state_dir / "agent.json").read_text()
    cert_before = (linux_target.state_dir / "agent.pem").read_bytes() if (linux_target.state_dir / "agent.pem").exists() else None
    old_pid = linux_target.agent_pid()

    appliance.calm_process_server()
    upgraded = appliance.cli("agents", "upgrade", "--data-dir", str(appliance.data_dir.root))
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "1 agent(s) upgraded to 1.0.0, 0 failed" in upgraded.stdout
    assert linux_target.installed_version == "1.0.0"
    assert not (linux_target.root / "opt" / "mobility-agent" / "0.9.0").exists()
    assert (linux_target.state_dir / "agent.json").read_text() == identity_before
    if cert_before is not None:
        assert (linux_target.state_dir / "agent.pem").read_bytes() == cert_before
    new_pid = linux_target.agent_pid()
    assert new_pid is not None and new_pid != old_pid  # the new version runs
    job = jobs(appliance)[-1]
    assert job.kind == "agent-upgrade" and job.status == "succeeded"
    assert steps(job)["register"] == "skipped" and steps(job)["heartbeat"] == "succeeded"
    machine_id = json.loads(identity_before)["machine_id"]
    with appliance.sessions()() as session:
        assert session.get(Machine, machine_id).agent_version == "1.0.0"

    # Everything current now: a second upgrade has nothing to do.
    again = appliance.cli("agents", "upgrade", "--data-dir", str(appliance.data_dir.root), check=True)
    assert "agent 1.0.0 is current" in again.stdout and "0 agent(s) upgraded" in again.stdout


def test_an_agent_newer_than_the_appliance_is_refused(appliance: Appliance, linux_target: LinuxTarget,
                                                      agent_packages: Path, tmp_path: Path):
    # The version is read from the package's name, before anything is copied.
    newer = tmp_path / "mobility-agent-1.0.1-linux.tar.gz"
    newer.write_bytes(package_paths(agent_packages)[0].read_bytes())
    add_key_credential(appliance, linux_target)
    refused = push(appliance, linux_target, "root-key", "--package", str(newer))
    assert refused.returncode == 1 and "newer than the appliance (1.0.0): upgrade the appliance first" in refused.stderr
    assert sorted(p.name for p in linux_target.root.iterdir()) == ["disk0.img"]

    # A target that already runs a newer agent: refused before anything is copied.
    marker = linux_target.root / "opt" / "mobility-agent" / "current"
    marker.mkdir(parents=True)
    (marker / "INSTALLED").write_text("1.0.1\n")
    result = push(appliance, linux_target)
    assert result.returncode == 1
    assert "runs agent 1.0.1, newer than this appliance's 1.0.0" in result.stderr
    assert not (linux_target.root / "var").exists()


def test_a_changed_host_key_is_refused(appliance: Appliance, linux_target: LinuxTarget, tmp_path: Path):
    """The host key learnt on first contact is checked later: another key is a clear error."""
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    known = appliance.data_dir.root / "push-known-hosts"
    known.write_text(f"[{linux_target.ssh.host}]:{linux_target.ssh.port} {kind} {key}\n")
    add_key_credential(appliance, linux_target)
    result = push(appliance, linux_target)
    assert result.returncode == 1
    assert "presented a different host key than on first contact" in result.stderr
    assert sorted(p.name for p in linux_target.root.iterdir()) == ["disk0.img"]


def test_each_job_stages_in_a_new_folder_only_the_login_user_may_enter(linux_target: LinuxTarget, tmp_path: Path):
    package = tmp_path / "mobility-agent-1.0.0-linux.tar.gz"
    package.write_bytes(b"package")
    target = Target(linux_target.ssh.host, "linux", linux_target.ssh.port, str(linux_target.root))
    layout = LinuxLayout(target, AgentPackage.from_file(package))
    transport = SshTransport(target, Credential("root-key", "root", "key", linux_target.ssh.key_path.read_text()),
                             tmp_path / "known-hosts")
    login_user = pwd.getpwnam("nobody")  # sshd lets only root in here: another owner shows the chown
    try:
        made = [layout.staged(transport.run(layout.prepare_staging(login_user.pw_name)).stdout) for _ in range(2)]
        folders = [Path(job.staging) for job in made]
        assert folders[0] != folders[1] and {f.parent for f in folders} == {linux_target.root / "var" / "tmp"}
        for folder in folders:
            info = folder.lstat()
            assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
            assert info.st_uid == login_user.pw_uid and list(folder.iterdir()) == []
        for job in made:
            assert transport.run(job.cleanup()).exit_code == 0
        assert not any(f.exists() for f in folders)
    finally:
        transport.close()


def test_a_staging_folder_someone_made_beforehand_is_not_used(appliance: Appliance, linux_target: LinuxTarget,
                                                             tmp_path: Path):
    """/var/tmp is every user's: a folder under the old, predictable name, with links planted in
    it, must not be written through (the copy runs as root)."""
    planted = linux_target.root / "var" / "tmp" / "mobility-agent-push-1.0.0"
    planted.mkdir(parents=True)
    names = ["ca.pem", "mobility-agent-1.0.0-linux.tar.gz"]
    for name in names:
        victim = tmp_path / f"root-only-{name}"
        victim.write_bytes(b"root's own file\n")
        (planted / name).symlink_to(victim)
    add_key_credential(appliance, linux_target)
    result = push(appliance, linux_target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(tmp_path / f"root-only-{name}").read_bytes() for name in names] == [b"root's own file\n"] * 2
    assert sorted(p.name for p in planted.iterdir()) == names and all(p.is_symlink() for p in planted.iterdir())
    # The job's own folder is gone: only the planted one is left.
    assert list((linux_target.root / "var" / "tmp").iterdir()) == [planted]


def test_an_upload_failing_on_the_target_fails_the_job_clearly(appliance: Appliance, linux_target: LinuxTarget):
    """A write that fails on the target ends the job `failed`, with the cause and an end time, not
    `running` forever; the CLI reports it without a traceback, and many targets at once (`agents
    upgrade`) are all reported. The failure is real: the target's sshd gets a file-size limit,
    so its SFTP server dies writing the package, as on a full disk it would fail."""
    resource.prlimit(linux_target.ssh.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    add_key_credential(appliance, linux_target)
    result = push(appliance, linux_target)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    copying = (r"copying mobility-agent-1\.0\.0-linux\.tar\.gz to \S+/var/tmp/mobility-agent-push-\w{10}/"
               rf"mobility-agent-1\.0\.0-linux\.tar\.gz on 127\.0\.0\.1:{linux_target.ssh.port} \(\S+\) failed: "
               "[^;]+; check the free space and permissions there")  # the cause in paramiko's words
    assert re.search(copying, result.stderr), result.stderr
    job = jobs(appliance)[-1]
    assert job.status == "failed" and job.finished_at is not None and re.search(copying, job.error or "")
    assert steps(job) == {"copy": "failed", **{name: "pending" for name in ("check", "install", "register", "start",
                                                                           "heartbeat")}}
    assert not (linux_target.root / "var" / "tmp").exists() or not list((linux_target.root / "var" / "tmp").iterdir())

    # Many targets at once: every one is reported and recorded, whatever failed on the others.
    package = service.find_package(service.packages_dir(appliance.data_dir), "linux", "1.0.0")
    limited = Target(linux_target.ssh.host, "linux", linux_target.ssh.port, str(linux_target.root))
    nothing_there = Target("127.0.0.1", "linux", free_port(), str(linux_target.root))
    sessions = appliance.sessions()
    results = service.run_jobs(appliance.data_dir, sessions, [service.PushJob(limited, "root-key", package),
                                                              service.PushJob(nothing_there, "root-key", package)],
                               kind="agent-upgrade", server=appliance.server)
    assert [(outcome, bool(re.search(pattern, error or ""))) for (_, outcome, error), pattern in
            zip(results, (copying, "cannot reach SSH on 127.0.0.1"), strict=True)] == [(None, True)] * 2
    with sessions() as session:
        recorded = [session.get(Job, job_id) for job_id, _, _ in results]
        assert [(j.status, j.finished_at is not None) for j in recorded] == [("failed", True)] * 2
