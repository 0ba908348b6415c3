"""Shared test setup. Fixtures for real servers live in tests/fixtures/ (one module each) and
are imported by the conftest of the test folder that needs them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ovf_schema_dir() -> Path:
    d = SHARED / "ovf-schema"
    if not d.is_dir():
        pytest.fail(f"OVF schema not found at {d} (the project expects shared/ beside the checkout)")
    return d


# Tools installed by ./bootstrap.sh into the project (Azurite) must be found by tests too.
os.environ["PATH"] = os.pathsep.join(
    [str(REPO_ROOT / ".venv" / "bin"), str(REPO_ROOT / ".tools" / "node_modules" / ".bin"), os.environ.get("PATH", "")]
)
sys.path.insert(0, str(REPO_ROOT))
