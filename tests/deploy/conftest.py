"""Fixtures for deploy tests: a real vcsim, a real OVA assembled from real VMDKs, an API session."""
from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance_build.deploy.connection import Credentials
from appliance_build.settings import Settings, load_settings
from tests.fixtures.vcsim import Vcsim, vcsim  # noqa: F401 - the session fixture

from .helpers import make_vmdk

DISK_DATA = 2 * 2**20  # random bytes at the start of each disk: uploads of a few MiB that do not compress away


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings("local")


@pytest.fixture(scope="session")
def appliance_ova(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Path:
    """The appliance OVA as `assemble-ova` writes it, from three small real VMDKs."""
    from appliance_build.ova.assemble import assemble_ova

    folder = tmp_path_factory.mktemp("ova")
    disks = [make_vmdk(folder / f"{role}.vmdk", os.urandom(DISK_DATA)) for role in ("os", "cache", "retention")]
    return assemble_ova(settings, disks, folder / "appliance.ova")


@pytest.fixture(scope="session")
def credentials(vcsim: Vcsim) -> Credentials:  # noqa: F811
    return Credentials(vcsim.username, vcsim.password)


@pytest.fixture(scope="session")
def si(vcsim: Vcsim) -> Iterator[Any]:  # noqa: F811
    """A separate API session to look at what the deployer did."""
    from pyVim.connect import Disconnect, SmartConnect

    context = ssl.create_default_context(cafile=str(vcsim.ca_file))
    service = SmartConnect(host=vcsim.host, port=vcsim.port, user=vcsim.username, pwd=vcsim.password,
                           sslContext=context)
    yield service
    Disconnect(service)
