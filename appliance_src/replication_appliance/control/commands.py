"""CLI: init, serve, passphrase show|rotate, status, db upgrade."""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from pathlib import Path

from ..common.datadir import CLOUDS, DataDir
from ..common.errors import DataDirError
from ..storage.open import ENV_CONNECTION_STRING as STORAGE_ENV

# The database, web and crypto stacks are imported inside each command: `appliance --help`
# and `appliance passphrase show` should not pay for what they do not use.

ADMIN_PASSWORD_ENV = "APPLIANCE_ADMIN_PASSWORD"
DB_PASSWORD_ENV = "APPLIANCE_DB_PASSWORD"


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _positive_gb(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value <= 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in GB (a positive number)")
    return int(value * 10**9)


def _data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="the appliance's data directory")


def _secret(env: str, file: Path | None, prompt: str, what: str, required: bool) -> str | None:
    """A secret from a file, the environment or a prompt: never from argv, where `ps` shows it."""
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise DataDirError(f"cannot read the {what} file {file}: {exc.strerror}") from None
    if os.environ.get(env):
        return os.environ[env]
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    if required:
        raise DataDirError(f"no {what} given: set {env}, pass a file, or run interactively")
    return None


def _storage_directory(text: str) -> str:
    if "=" in text:  # argparse shows only this message, never the value
        raise argparse.ArgumentTypeError(
            "takes a local directory; a connection string holds the account key and must not be given on the "
            f"command line (any user sees it in `ps`): use --storage-from-env ({STORAGE_ENV}) or --storage-file F")
    return text


def _storage_setting(args: argparse.Namespace) -> str | None:
    """The cache storage setting: a directory from argv, a connection string never from argv."""
    if args.storage_from_env:
        if not os.environ.get(STORAGE_ENV, "").strip():
            raise DataDirError(f"--storage-from-env: {STORAGE_ENV} is not set or empty")
        return os.environ[STORAGE_ENV]
    if args.storage_file == "-":  # typed or pasted at a terminal: not echoed
        return getpass.getpass("storage connection string: ") if sys.stdin.isatty() else sys.stdin.read()
    if args.storage_file is not None:
        try:
            return Path(args.storage_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataDirError(f"cannot read the storage connection string file {args.storage_file}: "
                               f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from None
    return args.storage


def register(subparsers) -> None:
    p = subparsers.add_parser("init", help="create the data directory: CA, certificates, keys, passphrase, database")
    _data_dir(p)
    p.add_argument("--db", help="mysql+pymysql://USER@HOST[:PORT]/DATABASE (default: SQLite in the data dir); "
                                f"password from {DB_PASSWORD_ENV} or --db-password-file")
    p.add_argument("--db-password-file", type=Path, help="file holding the database password")
    p.add_argument("--hostname", help="name agents use to reach the appliance (default: this machine's FQDN)")
    p.add_argument("--address", action="append", default=[], dest="addresses",
                   help="IP address for the certificates (repeatable; default: every local address)")
    p.add_argument("--admin-user", default="admin", help="operator login name (default admin)")
    p.add_argument("--admin-password-file", type=Path,
                   help=f"file holding the operator password (else {ADMIN_PASSWORD_ENV} or a prompt)")
    p.add_argument("--control-port", type=_port, default=443)
    p.add_argument("--data-port", type=_port, default=9443)
    p.add_argument("--cloud", choices=CLOUDS, default="public")
    p.add_argument("--cache-quota-gb", type=_positive_gb,
                   help="size of the process server cache when it shares a filesystem (default: the whole filesystem)")
    storage = p.add_mutually_exclusive_group()
    storage.add_argument("--storage", metavar="DIRECTORY", type=_storage_directory,
                         help="a local directory as cache storage (a laptop); default DATA_DIR/storage")
    storage.add_argument("--storage-from-env", action="store_true",
                         help=f"the cache storage account's connection string from {STORAGE_ENV}")
    storage.add_argument("--storage-file", metavar="FILE",
                         help="file holding the cache storage account's connection string ('-': standard input)")
    p.set_defaults(handler=cmd_init)

    p = subparsers.add_parser("serve", help="run the configuration server (443) and the process server (9443)")
    _data_dir(p)
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--control-port", type=_port, help="override the configured control port")
    p.add_argument("--data-port", type=_port, help="override the configured data port")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler=cmd_serve)

    p = subparsers.add_parser("passphrase", help="show or rotate the agent registration passphrase")
    p.add_argument("action", choices=["show", "rotate"])
    _data_dir(p)
    p.set_defaults(handler=cmd_passphrase)

    p = subparsers.add_parser("status", help="process servers, machines, health and RPO")
    _data_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=cmd_status)

    p = subparsers.add_parser("db", help="database maintenance")
    p.add_argument("action", choices=["upgrade"], help="upgrade: apply the migrations this version brings")
    _data_dir(p)
    p.set_defaults(handler=cmd_db)


def cmd_init(args: argparse.Namespace) -> int:
    from .initialise import InitOptions, initialise

    storage = _storage_setting(args)
    admin_password = _secret(ADMIN_PASSWORD_ENV, args.admin_password_file, "operator password: ", "operator password", True)
    db_password = None
    if args.db:
        from ..db.engine import parse_db_url

        if parse_db_url(args.db).password:  # kept (sealed, never in config.json), but it was in argv
            print(f"warning: the database password in --db was visible to every user of this machine while "
                  f"this ran (the process list); give the URL without it and the password in {DB_PASSWORD_ENV} "
                  "or --db-password-file", file=sys.stderr)
        db_password = _secret(DB_PASSWORD_ENV, args.db_password_file, "database password: ", "database password", False)
    result = initialise(InitOptions(
        data_dir=args.data_dir, admin_password=admin_password, db_url=args.db, db_password=db_password,
        hostname=args.hostname, addresses=args.addresses, admin_user=args.admin_user,
        control_port=args.control_port, data_port=args.data_port, cloud=args.cloud,
        cache_quota_bytes=args.cache_quota_gb, storage=storage))
    print(f"initialised {result.data_dir}")
    print(f"  hostname      {result.hostname} ({', '.join(result.addresses)})")
    print(f"  database      {result.db_url}")
    print(f"  CA            {result.data_dir / 'ca.pem'} (SHA-256 {result.ca_fingerprint})")
    if result.storage is not None:
        print(f"  storage       {result.storage} (sealed in {result.data_dir / 'private'})")
    else:
        print(f"  storage       {result.data_dir / 'storage'} (local directory, unless {STORAGE_ENV} is set for serve)")
    print(f"  passphrase    `appliance passphrase show --data-dir {result.data_dir}`")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeContext, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(ServeContext.open(DataDir(args.data_dir), args.bind, args.control_port, args.data_port), args.log_level)
    return 0


def cmd_passphrase(args: argparse.Namespace) -> int:
    from ..common.secrets import generate_passphrase
    from ..db.engine import datadir_engine, session_factory
    from . import service

    d = DataDir(args.data_dir)
    d.require_initialised()
    if args.action == "rotate":
        engine = datadir_engine(d)
        try:
            with session_factory(engine).begin() as session:
                service.audit(session, "cli", "passphrase.rotated", "appliance", d.load_config().hostname)
                d.store_passphrase(generate_passphrase())
        finally:
            engine.dispose()
        print("passphrase rotated; agents and process servers registering from now on need the new one")
        return 0
    print(d.passphrase())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ..db.engine import datadir_engine, session_factory
    from ..db.models import utcnow
    from . import service
    from .status_view import render_status

    d = DataDir(args.data_dir)
    engine = datadir_engine(d)
    try:
        with session_factory(engine).begin() as session:
            summary = service.status(session, utcnow())
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"overall_health": summary.overall,
                          "process_servers": [p.model_dump(mode="json") for p in summary.process_servers],
                          "machines": [m.model_dump(mode="json") for m in summary.machines]}, indent=2))
    else:
        print(render_status(summary))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from ..db.engine import datadir_engine
    from ..db.migrate import upgrade

    engine = datadir_engine(DataDir(args.data_dir))
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    print("database is at the current schema")
    return 0
