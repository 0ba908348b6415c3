"""Fixtures for the configuration server tests: a real MariaDB (tests/fixtures/mariadb.py),
Azurite (tests/fixtures/azurite.py), an initialised data directory on SQLite or MariaDB, and the control server running over real
TLS on a free loopback port."""
from __future__ import annotations

import pytest

from tests.fixtures.azurite import azurite  # noqa: F401 - re-exported fixture
from tests.fixtures.mariadb import mariadb_server  # noqa: F401 - re-exported fixture

from .appliance_harness import RunningAppliance, init_appliance, running_appliance


@pytest.fixture(params=["sqlite", "mariadb"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def appliance_dir(tmp_path, backend, request):
    """An initialised data directory on the parametrised backend."""
    mariadb = request.getfixturevalue("mariadb_server") if backend == "mariadb" else None
    return init_appliance(tmp_path / "data", mariadb)


@pytest.fixture
def appliance(appliance_dir) -> RunningAppliance:
    with running_appliance(appliance_dir) as running:
        yield running
