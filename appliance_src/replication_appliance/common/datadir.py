"""The appliance's data directory: one place for its configuration, identity and secrets.

    D/config.json                  settings (database URL without its password, ports, hostname)
    D/ca.pem                       appliance CA certificate, handed to agents to trust
    D/tls/control.pem, data.pem    server certificates for 443 and 9443
    D/private/ (0700)              ca-key.pem, control-key.pem, data-key.pem, master.key,
                                   passphrase.sealed, db-password.sealed (all 0600)
    D/appliance.db                 embedded SQLite database (when no --db was given)
    D/cache/                       process server cache (data plane)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import fileio
from .errors import DataDirError
from .secrets import MasterKey, write_private_file

CONFIG_VERSION = 1
PASSPHRASE_PURPOSE = "registration passphrase"
DB_PASSWORD_PURPOSE = "database password"
CLOUDS = ("public", "government")


@dataclass
class ApplianceConfig:
    hostname: str
    addresses: list[str]
    db_url: str  # never contains a password; see DataDir.database_password()
    control_port: int = 443
    data_port: int = 9443
    cloud: str = "public"
    admin_user: str = "admin"
    # Process server cache size when the cache shares a filesystem (None: the whole filesystem,
    # as on the appliance's dedicated cache disk). Cache health is judged against it.
    cache_quota_bytes: int | None = None
    config_version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # other components' settings, by component name

    def validate(self) -> None:
        for name in ("control_port", "data_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise DataDirError(f"{name} {port!r} is not a TCP port: use 1-65535")
        if self.control_port == self.data_port:
            raise DataDirError(f"control and data ports must differ (both are {self.control_port})")
        if self.cache_quota_bytes is not None and (not isinstance(self.cache_quota_bytes, int) or self.cache_quota_bytes <= 0):
            raise DataDirError(f"cache_quota_bytes {self.cache_quota_bytes!r} must be a positive number of bytes or null")
        if self.cloud not in CLOUDS:
            raise DataDirError(f"cloud {self.cloud!r} is unknown: allowed are {', '.join(CLOUDS)}")

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> ApplianceConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataDirError(f"{source}: unknown settings {', '.join(unknown)}; allowed are {', '.join(sorted(known))}")
        try:
            config = cls(**data)
        except TypeError as exc:
            raise DataDirError(f"{source}: {exc}") from None
        config.validate()
        return config


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    # Paths: every component finds its files here rather than building them itself.
    @property
    def config_path(self) -> Path: return self.root / "config.json"
    @property
    def private(self) -> Path: return self.root / "private"
    @property
    def ca_cert(self) -> Path: return self.root / "ca.pem"
    @property
    def ca_key(self) -> Path: return self.private / "ca-key.pem"
    @property
    def master_key_path(self) -> Path: return self.private / "master.key"
    @property
    def passphrase_path(self) -> Path: return self.private / "passphrase.sealed"
    @property
    def db_password_path(self) -> Path: return self.private / "db-password.sealed"
    @property
    def sqlite_path(self) -> Path: return self.root / "appliance.db"
    @property
    def cache_dir(self) -> Path: return self.root / "cache"

    def server_cert(self, port_name: str) -> Path:
        """`port_name` is `control` (443) or `data` (9443)."""
        return self.root / "tls" / f"{port_name}.pem"

    def server_key(self, port_name: str) -> Path:
        return self.private / f"{port_name}-key.pem"

    def is_initialised(self) -> bool:
        return self.config_path.is_file()

    def require_initialised(self) -> None:
        if not self.is_initialised():
            raise DataDirError(f"{self.root} is not an appliance data directory (no config.json): run `appliance init --data-dir {self.root}`")

    def load_config(self) -> ApplianceConfig:
        self.require_initialised()
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataDirError(f"{self.config_path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataDirError(f"{self.config_path} must hold a JSON object")
        return ApplianceConfig.from_json(data, self.config_path)

    def save_config(self, config: ApplianceConfig) -> None:
        config.validate()
        data = (json.dumps(asdict(config), indent=2, sort_keys=True) + "\n").encode()
        try:
            fileio.replace_file(self.config_path, data)
        except OSError as exc:
            raise DataDirError(f"cannot save the configuration to {self.config_path} ({exc.strerror or exc}): "
                               "free space or fix permissions and run the command again") from None

    def master_key(self) -> MasterKey:
        return MasterKey.load(self.master_key_path)

    def passphrase(self) -> str:
        return self.master_key().load_secret(self.passphrase_path, PASSPHRASE_PURPOSE)

    def store_passphrase(self, passphrase: str) -> None:
        self.master_key().store_secret(self.passphrase_path, passphrase, PASSPHRASE_PURPOSE)

    def database_password(self) -> str | None:
        if not self.db_password_path.exists():
            return None
        return self.master_key().load_secret(self.db_password_path, DB_PASSWORD_PURPOSE)

    def store_database_password(self, password: str) -> None:
        self.master_key().store_secret(self.db_password_path, password, DB_PASSWORD_PURPOSE)

    def make_private_dir(self) -> None:
        self.private.mkdir(parents=True, exist_ok=True)
        os.chmod(self.private, 0o700)


__all__ = ["CLOUDS", "ApplianceConfig", "DataDir", "write_private_file"]
