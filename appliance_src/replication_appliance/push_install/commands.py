"""CLI: push-install, credentials add|list|remove, agents upgrade|jobs."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from ..common.datadir import DataDir
from ..control import service as control_service
from ..db.engine import datadir_engine, session_factory
from . import service
from .credentials import Credential, CredentialStore
from .errors import CredentialError, PackageError, VersionRefused
from .plan import AgentPackage, version_key

PASSWORD_ENV = "APPLIANCE_PUSH_PASSWORD"
SUDO_PASSWORD_ENV = "APPLIANCE_PUSH_SUDO_PASSWORD"


def register(subparsers) -> None:
    p = subparsers.add_parser("push-install", help="install the Mobility agent on a machine over SSH or WinRM")
    _data_dir(p)
    p.add_argument("--host", required=True, help="the machine's address or name")
    p.add_argument("--os", required=True, choices=["linux", "windows"], help="linux (SSH) or windows (WinRM)")
    p.add_argument("--credential", required=True, help="name of a stored push-install credential")
    p.add_argument("--port", type=int, help="SSH or WinRM port (default 22 / 5986)")
    p.add_argument("--install-root", default="/", help="Linux: install under this prefix instead of / (test targets)")
    p.add_argument("--server", help="host:port agents register with (default: this appliance's hostname and control port)")
    p.add_argument("--package", type=Path, help="agent package file (default: the appliance's version from "
                                                "DATA_DIR/agent-packages)")
    p.add_argument("--disk", action="append", default=[], dest="disks",
                   help="disk to replicate (repeatable; default: every disk of the machine)")
    p.add_argument("--hostname", help="name to register the machine under (default: its own host name)")
    p.add_argument("--host-id", help="identity to register (default: the machine's /etc/machine-id or BIOS UUID)")
    p.add_argument("--heartbeat-timeout", type=float, default=120.0, help="seconds to wait for the first heartbeat")
    p.set_defaults(handler=cmd_push_install)

    p = subparsers.add_parser("credentials", help="push-install accounts, stored encrypted with the master key")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="store an account (root, a sudoer, or a Windows administrator)")
    _data_dir(add)
    add.add_argument("name", help="credential name, used with push-install --credential")
    add.add_argument("--user", required=True, help="the account to log in with")
    add.add_argument("--key-file", type=Path, help="private key file (SSH); else a password is used")
    add.add_argument("--password-file", type=Path, help=f"file holding the password (else {PASSWORD_ENV} or a prompt)")
    add.add_argument("--sudo-password-file", type=Path,
                     help=f"sudo password for a key login as a non-root user (else {SUDO_PASSWORD_ENV}; "
                          "not needed where sudo asks for none)")
    add.add_argument("--replace", action="store_true", help="replace a credential of the same name")
    listing = actions.add_parser("list", help="names, users and kinds (never the secrets)")
    _data_dir(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    remove = actions.add_parser("remove", help="delete a stored credential")
    _data_dir(remove)
    remove.add_argument("name")
    p.set_defaults(handler=cmd_credentials)

    p = subparsers.add_parser("agents", help="Mobility agents: upgrade them, show push-install jobs")
    p.add_argument("action", choices=["upgrade", "jobs"])
    _data_dir(p)
    p.add_argument("--machine", help="upgrade: only this machine (id, host name or target)")
    p.add_argument("--job", help="jobs: show this job's steps")
    p.add_argument("--parallel", type=int, default=20, help="upgrade: machines at once (default 20)")
    p.add_argument("--json", action="store_true", help="jobs: print JSON")
    p.set_defaults(handler=cmd_agents)


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="the appliance's data directory")


def _read_secret(file: Path | None, env: str, prompt: str | None, what: str) -> str | None:
    """A secret from a file, the environment or a prompt: never from argv, where `ps` shows it."""
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CredentialError(f"cannot read the {what} file {file}: {exc.strerror}") from None
    if os.environ.get(env):
        return os.environ[env]
    if prompt and sys.stdin.isatty():
        return getpass.getpass(prompt)
    return None


def _echo(target: str, step: str, status: str, message: str) -> None:
    print(f"{target}  {step:<9} {status:<9} {message}".rstrip(), flush=True)


def _sessions(data_dir: DataDir):
    data_dir.require_initialised()
    engine = datadir_engine(data_dir)
    return engine, session_factory(engine)


def cmd_push_install(args: argparse.Namespace) -> int:
    data_dir = DataDir(args.data_dir)
    target = service.parse_target(args.host, args.os, args.port, args.install_root)
    version = service.appliance_version()
    if args.package:
        package = AgentPackage.from_file(args.package) if args.package.is_file() else None
        if package is None:
            raise PackageError(f"agent package {args.package} does not exist")
        if package.os != target.os:
            raise PackageError(f"{args.package.name} is a {package.os} package; the target is {target.os}")
        if version_key(package.version) > version_key(version):
            raise VersionRefused(f"agent package {package.version} is newer than the appliance ({version}): "
                                 "upgrade the appliance first")
    else:
        package = service.find_package(service.packages_dir(data_dir), target.os, version)
    engine, sessions = _sessions(data_dir)
    try:
        job_id, outcome, error = service.run_job(
            data_dir, sessions, service.PushJob(target, args.credential, package, tuple(args.disks), args.hostname,
                                                args.host_id), server=args.server,
            heartbeat_timeout=args.heartbeat_timeout, on_step=_echo)
    finally:
        engine.dispose()
    if error:
        print(f"push install to {target.label} failed (job {job_id}): {error}", file=sys.stderr)
        return 1
    assert outcome is not None
    what = f"agent {outcome.version} installed and running" if outcome.changed else f"agent {outcome.version} already installed: nothing changed"
    print(f"{target.label}: {what}; machine {outcome.machine_id} (job {job_id})")
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    data_dir = DataDir(args.data_dir)
    data_dir.require_initialised()
    store = CredentialStore(data_dir)
    if args.action == "list":
        rows = store.list()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['name']:<24} {row['username']:<20} {row['kind']:<9} sudo={row['sudo']}")
        return 0
    if args.action == "remove":
        store.remove(args.name)
        _audit(data_dir, "credential.removed", args.name)
        print(f"removed credential {args.name}")
        return 0
    if args.key_file:
        try:
            secret = args.key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialError(f"cannot read the key file {args.key_file}: {exc.strerror}") from None
        kind = "key"
        sudo = _read_secret(args.sudo_password_file, SUDO_PASSWORD_ENV, None, "sudo password")
    else:
        secret = _read_secret(args.password_file, PASSWORD_ENV, f"password for {args.user}: ", "password")
        if not secret:
            raise CredentialError(f"no password given: use --password-file, set {PASSWORD_ENV}, run interactively, "
                                  "or give --key-file")
        kind, sudo = "password", None
    store.add(Credential(args.name, args.user, kind, secret, sudo), replace=args.replace)
    _audit(data_dir, "credential.added", args.name)
    print(f"stored credential {args.name} ({kind} for {args.user}), encrypted with the master key")
    return 0


def _audit(data_dir: DataDir, action: str, name: str) -> None:
    """Who changed which credential, never what it holds."""
    engine, sessions = _sessions(data_dir)
    try:
        with sessions.begin() as session:
            control_service.audit(session, "cli", action, "credential", name)
    finally:
        engine.dispose()


def cmd_agents(args: argparse.Namespace) -> int:
    data_dir = DataDir(args.data_dir)
    engine, sessions = _sessions(data_dir)
    try:
        if args.action == "jobs":
            with sessions() as session:
                shown = [control_service.get_job(session, args.job)] if args.job else control_service.list_jobs(session, 50)
            if args.json:
                print(json.dumps([j.model_dump(mode="json") for j in shown], indent=2))
                return 0
            for job in shown:
                print(f"{job.id}  {job.kind:<14} {job.target:<28} {job.status:<9} {job.progress_percent:>3}%"
                      + (f"  {job.error}" if job.error else ""))
                if args.job:
                    for st in job.steps:
                        print(f"    {st.position} {st.name:<9} {st.status:<9} {st.message}".rstrip())
            return 0
        version = service.appliance_version()
        planned, notes = service.upgrade_jobs(data_dir, sessions, version, service.packages_dir(data_dir), args.machine)
        for note in notes:
            print(note)
        results = service.run_jobs(data_dir, sessions, planned, parallel=args.parallel, kind="agent-upgrade",
                                   on_step=_echo)
    finally:
        engine.dispose()
    failed = [(job_id, error) for job_id, _outcome, error in results if error]
    for job_id, error in failed:
        print(f"upgrade failed (job {job_id}): {error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} agent(s) upgraded to {version}, {len(failed)} failed")
    return 1 if failed else 0
