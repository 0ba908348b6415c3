"""One exception type per kind of user-facing failure. Each message says what is wrong and
what to do; the CLI prints it without a traceback and exits non-zero."""
from __future__ import annotations


class ApplianceError(Exception):
    """Base of every failure the CLI reports as a plain message."""


class DataDirError(ApplianceError):
    """The data directory is missing, incomplete, or already initialised."""


class SecretError(ApplianceError):
    """A secret at rest cannot be read (wrong master key, tampered or truncated file)."""


class CertificateError(ApplianceError):
    """A certificate or CSR is malformed or not acceptable."""


class DatabaseError(ApplianceError):
    """The database cannot be reached or migrated."""


class PrereqError(ApplianceError):
    """A prerequisite check was asked for with bad options."""
