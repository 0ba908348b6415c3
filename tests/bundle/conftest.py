"""Bundle and agent packages built twice per session (for the reproducibility check), with the
wheel downloads cached in one session folder."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance_build.packaging.agent_packages import build_agent_packages
from appliance_build.packaging.bundle import build_bundle


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wheel-cache")


@pytest.fixture(scope="session")
def source_date_epoch() -> Iterator[None]:
    """One fixed time for both builds: by default it is the last commit's, which moves while
    other work is committed in this checkout between the two builds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01
        yield


def _build(out: Path, cache: Path) -> Path:
    build_bundle(out, cache_dir=cache)
    build_agent_packages(out, cache_dir=cache)
    return out


@pytest.fixture(scope="session")
def builds(tmp_path_factory, wheel_cache, source_date_epoch) -> tuple[Path, Path]:
    """Two builds back to back (the second one reuses the wheel cache)."""
    return (_build(tmp_path_factory.mktemp("dist"), wheel_cache),
            _build(tmp_path_factory.mktemp("dist-again"), wheel_cache))


@pytest.fixture(scope="session")
def dist(builds) -> Path:
    return builds[0]


@pytest.fixture(scope="session")
def dist_again(builds) -> Path:
    return builds[1]
