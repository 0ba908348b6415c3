"""Alembic, run from code (`appliance init`, `appliance db upgrade`, `serve` checks).

VERSION_LOCATIONS lists every component's migration folder. A component that adds tables
puts its migrations in its own package and adds its folder here (one line); its first
migration sets `down_revision = CONTROL_PLANE_HEAD` (or the head it builds on). Upgrades go
to "heads", so components' branches coexist."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..common.errors import DatabaseError

CONTROL_PLANE_HEAD = "0002_disk_index"  # the newest control-plane migration: build on it

VERSION_LOCATIONS: list[str] = [
    "replication_appliance.db:migrations/versions",
]


def _resolve(location: str) -> str:
    """"package:sub/folder" inside an installed package, or a plain directory path."""
    if ":" not in location:
        return location
    package, _, sub = location.partition(":")
    return str(Path(str(resources.files(package))) / sub)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _resolve("replication_appliance.db:migrations"))
    cfg.set_main_option("version_locations", " ".join(_resolve(loc) for loc in VERSION_LOCATIONS))
    cfg.set_main_option("path_separator", "space")
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> None:
    try:
        command.upgrade(alembic_config(engine), "heads")
    except OperationalError as exc:
        raise DatabaseError(f"cannot migrate database {engine.url.render_as_string(hide_password=True)}: {exc.orig}") from None
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migration failed on {engine.url.render_as_string(hide_password=True)}: {exc}") from None


def pending_heads(engine: Engine) -> set[str]:
    """Heads of the code's migration chain the database has not reached yet (empty = current)."""
    script = ScriptDirectory.from_config(alembic_config(engine))
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return set(script.get_heads()) - current
