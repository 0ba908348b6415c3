"""Push-install failures, one type per kind; each message says what to do."""
from __future__ import annotations

from ..common.errors import ApplianceError


class PushInstallError(ApplianceError):
    """Base of push-install failures."""


class CredentialError(PushInstallError):
    """A stored push-install credential is unknown, malformed or already exists."""


class TargetAuthError(PushInstallError):
    """The target refused the credential (wrong user, password or key)."""


class TargetUnreachableError(PushInstallError):
    """The target's SSH or WinRM port cannot be reached."""


class TransferFailed(PushInstallError):
    """A file could not be copied to the target (disk full, permissions, a dropped connection)."""


class StepFailed(PushInstallError):
    """A step ran on the target and failed; the message carries the target's own words."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step {step} failed: {message}")
        self.step = step


class PackageError(PushInstallError):
    """The agent package for the target is missing or does not match its checksum."""


class VersionRefused(PushInstallError):
    """An agent newer than the appliance: the appliance is upgraded first, then its agents."""
