"""Validate a descriptor against the DMTF OVF 1.1 schema (DSP8023 1.1.1), offline.

The schema files are kept in this package (byte-identical copies of shared/ovf-schema), so
verify-ova works anywhere; no URL is ever fetched.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import xmlschema

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
ENTRY = "dsp8023_1.1.1.xsd"
_DMTF_PREFIX = "http://schemas.dmtf.org/wbem/"


def _local(url: str) -> str:
    if url.startswith(_DMTF_PREFIX):
        return str(SCHEMA_DIR / url.rsplit("/", 1)[1])
    return url


@lru_cache(maxsize=1)
def ovf_schema() -> xmlschema.XMLSchema:
    return xmlschema.XMLSchema(str(SCHEMA_DIR / ENTRY), uri_mapper=_local, allow="local")


def schema_errors(descriptor: bytes | str, limit: int = 5) -> list[str]:
    """Up to `limit` schema violations, each with its path in the document; empty when valid."""
    source = descriptor.decode("utf-8") if isinstance(descriptor, bytes) else descriptor
    errors = []
    for error in ovf_schema().iter_errors(source):
        errors.append(f"{error.path}: {error.reason}")
        if len(errors) >= limit:
            break
    return errors
