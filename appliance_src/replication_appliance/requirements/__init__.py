"""The seed's requirement rows and URL allow-lists, as data (seed.yml), in one place.

Used by `appliance prereqs`, the Ansible prereqs playbook, the traceability test and the docs.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

CLOUDS = ("public", "government")


@lru_cache(maxsize=1)
def seed() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("seed.yml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def requirement_rows() -> list[dict[str, Any]]:
    return list(seed()["requirements"])


def url_allow_list(cloud: str) -> list[dict[str, Any]]:
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}: allowed are {', '.join(CLOUDS)}")
    return list(seed()["urls"][cloud])


def time_source(cloud: str) -> str:
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}: allowed are {', '.join(CLOUDS)}")
    return seed()["time_sources"][cloud]
