"""Models and migrations agree on SQLite and MariaDB; the chain can be extended; the wheel
carries the migrations."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from replication_appliance.common.errors import DatabaseError
from replication_appliance.db import migrate
from replication_appliance.db.engine import make_engine, parse_db_url
from replication_appliance.db.models import Base
from sqlalchemy import inspect, text


@pytest.fixture
def engine(backend, tmp_path, request):
    if backend == "mariadb":
        server = request.getfixturevalue("mariadb_server")
        url = server.url(server.new_database(), with_password=True)
    else:
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(parse_db_url(url))
    yield engine
    engine.dispose()


def test_migrations_build_exactly_the_models(engine):
    assert migrate.pending_heads(engine) == {migrate.CONTROL_PLANE_HEAD}
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # idempotent
    assert migrate.pending_heads(engine) == set()
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.execute(text("SELECT name, rpo_threshold_minutes, retention_hours FROM policies")).all() == \
            [("default", 60, 24)]


def test_downgrade_to_base_removes_every_table(engine):
    migrate.upgrade(engine)
    from alembic import command

    command.downgrade(migrate.alembic_config(engine), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_another_component_can_add_a_migration_after_ours(engine, tmp_path, monkeypatch):
    versions = tmp_path / "dataplane_migrations"
    versions.mkdir()
    (versions / "0001_dataplane.py").write_text(f'''
import sqlalchemy as sa
from alembic import op

revision = "0001_dataplane"
down_revision = "{migrate.CONTROL_PLANE_HEAD}"
branch_labels = ("dataplane",)
depends_on = None


def upgrade():
    op.create_table("recovery_points", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("machine_id", sa.String(36), sa.ForeignKey("machines.id")))


def downgrade():
    op.drop_table("recovery_points")
''')
    monkeypatch.setattr(migrate, "VERSION_LOCATIONS", [*migrate.VERSION_LOCATIONS, str(versions)])
    assert migrate.pending_heads(engine) == {"0001_dataplane"}
    migrate.upgrade(engine)
    assert "recovery_points" in inspect(engine).get_table_names()
    assert migrate.pending_heads(engine) == set()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_unreachable_database_is_a_clear_error(backend):
    engine = make_engine(parse_db_url("mysql+pymysql://nobody@127.0.0.1:1/appliance"))
    with pytest.raises(DatabaseError, match="cannot migrate database mysql\\+pymysql://nobody@127.0.0.1:1/appliance"):
        migrate.upgrade(engine)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("url, message", [("postgresql://x@y/z", "not supported"), ("mysql+pymysql://u@h", "names no database"),
                                          ("::::", "not a URL"), ("mysql+pymysql://u@h:notaport/db", "port that is not a number"),
                                          ("mysql+pymysql://u@h:70000/db", "port 70000: a TCP port is 1-65535")])
def test_bad_database_urls(backend, url, message):
    with pytest.raises(DatabaseError, match=message):
        parse_db_url(url)


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("url", ["mysql+pymysql//app:S3cretPw@db/appliance", "mysql+pymysql://app:S3cretPw@db:notaport/appliance",
                                 "mysql+pymysql://app:S3cretPw@db:0/appliance", "mysql+pymysql://app:S3cretPw@db",
                                 "postgresql://app:S3cretPw@db/appliance"])
def test_bad_database_url_errors_never_show_the_password(backend, url):
    with pytest.raises(DatabaseError) as caught:
        parse_db_url(url)
    assert "S3cretPw" not in str(caught.value)
    # no chained error that repeats the URL in a traceback
    assert caught.value.__context__ is None or caught.value.__suppress_context__


@pytest.mark.parametrize("backend", ["sqlite"])
def test_wheel_carries_the_migrations(backend, tmp_path, repo_root):
    source = tmp_path / "src"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(repo_root / "appliance_src", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("replication_appliance-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("replication_appliance/db/migrations/env.py", "replication_appliance/db/migrations/script.py.mako",
                   "replication_appliance/db/migrations/versions/0001_control_plane.py",
                   "replication_appliance/requirements/seed.yml"):
        assert member in names


@pytest.mark.parametrize("backend", ["sqlite"])
def test_serve_refuses_a_database_behind_the_code_until_upgraded(backend, tmp_path, monkeypatch):
    from replication_appliance.serve import ServeContext

    from .appliance_harness import init_appliance

    data_dir = init_appliance(tmp_path / "data")
    versions = tmp_path / "newer"
    versions.mkdir()
    (versions / "0002_newer.py").write_text(f'''
import sqlalchemy as sa
from alembic import op

revision = "0002_newer"
down_revision = "{migrate.CONTROL_PLANE_HEAD}"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("machines", sa.Column("note", sa.String(64)))


def downgrade():
    op.drop_column("machines", "note")
''')
    monkeypatch.setattr(migrate, "VERSION_LOCATIONS", [*migrate.VERSION_LOCATIONS, str(versions)])
    with pytest.raises(DatabaseError, match="appliance db upgrade"):
        ServeContext.open(data_dir, "127.0.0.1")
    from replication_appliance.db.engine import datadir_engine

    engine = datadir_engine(data_dir)
    migrate.upgrade(engine)
    engine.dispose()
    ServeContext.open(data_dir, "127.0.0.1").engine.dispose()


def test_disk_index_migration_numbers_existing_disks_by_registration_order(engine):
    """Disks registered before 0002 get their index from their id, per machine (not by name)."""
    from alembic import command
    from replication_appliance.db.models import Machine
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    command.upgrade(migrate.alembic_config(engine), "0001_control_plane")
    now = "2026-01-01 00:00:00"
    with engine.begin() as conn:
        policy = conn.execute(text("SELECT id FROM policies")).scalar_one()
        for machine in ("m-a", "m-b"):
            conn.execute(text("INSERT INTO machines (id, host_id, hostname, os_family, os_name, agent_version, addresses, "
                              "policy_id, desired_state, replication_state, state_changed_at, registered_at) VALUES "
                              "(:id, :id, :id, 'linux', '', '', '[]', :p, 'stop', 'not_enabled', :now, :now)"),
                         {"id": machine, "p": policy, "now": now})
        # interleaved between machines, names not in alphabetical order
        for disk_id, machine, name in [(1, "m-a", "/dev/sdb"), (2, "m-b", "/dev/vdz"), (3, "m-a", "/dev/sda"),
                                       (4, "m-b", "/dev/vda"), (5, "m-b", "/dev/vdc")]:
            conn.execute(text("INSERT INTO disks (id, machine_id, name, size_bytes, total_bytes, replicated_bytes, "
                              "backlog_bytes) VALUES (:i, :m, :n, 512, 512, 0, 0)"), {"i": disk_id, "m": machine, "n": name})
    migrate.upgrade(engine)
    with Session(engine) as session:
        machines = {m.id: [(d.index, d.name) for d in m.disks] for m in session.scalars(select(Machine))}
    assert machines == {"m-a": [(0, "/dev/sdb"), (1, "/dev/sda")],
                        "m-b": [(0, "/dev/vdz"), (1, "/dev/vda"), (2, "/dev/vdc")]}
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("UPDATE disks SET machine_id = 'm-a' WHERE id = 4"))  # a second disk 1 on m-a
