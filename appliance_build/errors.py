"""User-facing failures. Each says what is wrong and what to do; tasks.py turns them into Exit."""
from __future__ import annotations


class BuildError(Exception):
    """Base of every failure the user can fix; the message is shown as is."""


class SettingsError(BuildError):
    """An inventory setting is missing or has a value that is not allowed."""


class SecretError(BuildError):
    """A required secret was neither in the environment nor given at a prompt."""


class PreflightError(BuildError):
    """A tool, file or service the build needs is missing or unreachable."""


class RenderError(BuildError):
    """A template could not be rendered from the settings."""


class OvaError(BuildError):
    """An OVA or OVF package is malformed or cannot be written."""


class VerificationError(OvaError):
    """An OVA failed one or more checks; the message names them."""
