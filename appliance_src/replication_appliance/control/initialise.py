"""`appliance init`: a new data directory with the appliance's identity, secrets and database.

All or nothing: on any failure the files written so far are removed and the database
migrations are rolled back, so a second `init` starts clean."""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..common.datadir import CLOUDS, ApplianceConfig, DataDir
from ..common.errors import DatabaseError, DataDirError
from ..common.secrets import MasterKey, generate_passphrase, write_private_file
from ..common.tls import CertificateAuthority, cert_fingerprint, cert_to_pem, key_to_pem
from ..db.engine import make_engine, parse_db_url, session_factory, without_password
from ..db.migrate import alembic_config, upgrade
from ..db.models import ProcessServer
from ..storage.base import StorageError
from ..storage.open import (
    DIRECTORY,
    SEALED_CONNECTION_FILE,
    SEALED_PURPOSE,
    StorageSpec,
    judge_storage_spec,
    open_spec,
)
from . import service
from .auth import hash_password, validate_admin_password

BUILTIN_PROCESS_SERVER = "builtin"


@dataclass
class InitOptions:
    data_dir: Path
    admin_password: str
    db_url: str | None = None  # None: embedded SQLite in the data dir
    db_password: str | None = None
    hostname: str | None = None
    addresses: list[str] = field(default_factory=list)
    admin_user: str = "admin"
    control_port: int = 443
    data_port: int = 9443
    cloud: str = "public"
    cache_quota_bytes: int | None = None
    # Cache storage: an Azure connection string (a secret: sealed, never shown) or a local
    # directory; None: DATA_DIR/storage (or APPLIANCE_STORAGE_CONNECTION_STRING at serve time).
    storage: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class InitResult:
    data_dir: Path
    hostname: str
    addresses: list[str]
    db_url: str  # without password
    ca_fingerprint: str
    storage: str | None  # what may be shown of it (account and endpoint, or the directory)


def local_addresses() -> list[str]:
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                found.append(a.address.split("%")[0])
    return sorted(set(found), key=lambda a: (ipaddress.ip_address(a).version, a))


def _validated(opts: InitOptions) -> tuple[str, list[str], URL | None]:
    try:
        validate_admin_password(opts.admin_password)
    except ValueError as exc:
        raise DataDirError(str(exc)) from None
    hostname = opts.hostname or socket.getfqdn()
    if not hostname or len(hostname) > 253 or any(c.isspace() for c in hostname):
        raise DataDirError(f"hostname {hostname!r} is not usable in a certificate: give --hostname NAME")
    for a in opts.addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise DataDirError(f"--address {a!r} is not an IP address") from None
    if opts.cloud not in CLOUDS:
        raise DataDirError(f"cloud {opts.cloud!r} is unknown: allowed are {', '.join(CLOUDS)}")
    url = parse_db_url(opts.db_url) if opts.db_url else None
    return hostname, list(dict.fromkeys(opts.addresses or local_addresses())), url


def _checked_storage(text: str) -> StorageSpec:
    """Judged and reached before anything is written, so a typo never leaves a half-made appliance."""
    spec = judge_storage_spec(text)
    if spec.kind == DIRECTORY:
        root = Path(spec.value).expanduser().resolve()
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"storage directory {root} cannot be created or written ({existing} is "
                               f"{'not a directory' if not existing.is_dir() else 'not writable'})")
        return StorageSpec(DIRECTORY, str(root), str(root))
    try:
        open_spec(spec)  # creates the container if missing: proves the account and its key work
    except StorageError as exc:
        raise StorageError(f"cache storage {spec.shown} is not usable: {exc}; check the connection string "
                           "and that the appliance can reach the endpoint (nothing was written)") from None
    return spec


def _ensure_mysql_database(url: URL) -> None:
    server = make_engine(URL.create(url.drivername, url.username, url.password, url.host, url.port, None, url.query))
    try:
        with server.begin() as conn:
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{url.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"))
    except OperationalError as exc:
        raise DatabaseError(f"cannot reach or create database {url.render_as_string(hide_password=True)}: {exc.orig}") from None
    finally:
        server.dispose()


def initialise(opts: InitOptions) -> InitResult:
    hostname, addresses, url = _validated(opts)
    storage = _checked_storage(opts.storage) if opts.storage is not None else None
    d = DataDir(opts.data_dir)
    if d.root.exists() and (not d.root.is_dir() or any(d.root.iterdir())):
        reason = "is already initialised" if d.is_initialised() else "exists and is not an empty directory"
        raise DataDirError(f"{d.root} {reason}: choose a new --data-dir")
    created_root = not d.root.exists()
    migrated = None
    try:
        d.root.mkdir(parents=True, exist_ok=True)
        os.chmod(d.root, 0o750)
        d.make_private_dir()
        d.cache_dir.mkdir()
        master = MasterKey.create(d.master_key_path)
        if storage is not None:
            master.store_secret(d.private / SEALED_CONNECTION_FILE, storage.value, SEALED_PURPOSE)
        ca = CertificateAuthority.create(hostname)
        ca.save(d.ca_cert, d.ca_key)
        for port_name in ("control", "data"):
            cert, key = ca.issue_server(hostname, addresses)
            write_private_file(d.server_key(port_name), key_to_pem(key))
            d.server_cert(port_name).parent.mkdir(exist_ok=True)
            d.server_cert(port_name).write_bytes(cert_to_pem(cert))
        d.store_passphrase(generate_passphrase())
        if url is None:
            url = parse_db_url(f"sqlite:///{d.sqlite_path}")
        password = opts.db_password if opts.db_password is not None else url.password
        stored_url = without_password(url)
        if password is not None:
            d.store_database_password(password)
        config = ApplianceConfig(hostname=hostname, addresses=addresses,
                                 db_url=stored_url.render_as_string(hide_password=False),
                                 control_port=opts.control_port, data_port=opts.data_port, cloud=opts.cloud,
                                 admin_user=opts.admin_user, cache_quota_bytes=opts.cache_quota_bytes)
        config.validate()
        full_url = stored_url.set(password=password) if password is not None else stored_url
        if full_url.drivername.startswith("mysql"):
            _ensure_mysql_database(full_url)
        engine = make_engine(full_url)
        try:
            _refuse_used_database(engine, stored_url)
            migrated = engine
            upgrade(engine)
            if stored_url.drivername == "sqlite":
                os.chmod(d.sqlite_path, 0o600)  # holds the operator password hash
            with session_factory(engine).begin() as session:
                service.create_operator(session, opts.admin_user, hash_password(opts.admin_password))
                session.add(ProcessServer(name=BUILTIN_PROCESS_SERVER, address=f"{hostname}:{opts.data_port}", builtin=True))
                service.audit(session, "cli", "appliance.initialised", "appliance", hostname,
                              {"db": stored_url.render_as_string(hide_password=True), "control_port": opts.control_port,
                               "data_port": opts.data_port, "cloud": opts.cloud,
                               "storage": storage.shown if storage else None})
        except BaseException:
            if migrated is not None and stored_url.drivername.startswith("mysql"):
                _roll_back_schema(engine)
            raise
        finally:
            engine.dispose()
        d.save_config(config)  # last: its presence marks the data dir as initialised
        return InitResult(d.root, hostname, addresses, stored_url.render_as_string(hide_password=True),
                          cert_fingerprint(ca.cert), storage.shown if storage else None)
    except BaseException:
        if created_root:
            shutil.rmtree(d.root, ignore_errors=True)
        else:
            for child in d.root.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise


def _refuse_used_database(engine, url: URL) -> None:
    try:
        tables = inspect(engine).get_table_names()
    except OperationalError as exc:
        raise DatabaseError(f"cannot connect to {url.render_as_string(hide_password=True)}: {exc.orig}") from None
    if tables:
        raise DatabaseError(f"database {url.render_as_string(hide_password=True)} is not empty "
                            f"({len(tables)} tables, e.g. {min(tables)}): give an empty database")


def _roll_back_schema(engine) -> None:
    try:
        command.downgrade(alembic_config(engine), "base")
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    except SQLAlchemyError:
        pass  # best effort: the original error is what the operator needs to see
