"""The appliance version: read from appliance_src/pyproject.toml, the one place it is written."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
APPLIANCE_PYPROJECT = REPO_ROOT / "appliance_src" / "pyproject.toml"


def appliance_version() -> str:
    with APPLIANCE_PYPROJECT.open("rb") as fh:
        return tomllib.load(fh)["project"]["version"]


APPLIANCE_VERSION = appliance_version()
