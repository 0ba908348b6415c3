"""Secrets come from the environment or a prompt; never from a file, never echoed."""
from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass

from .errors import SecretError

ADMIN_PASSWORD_ENV = "APPLIANCE_ADMIN_PASSWORD"
VSPHERE_PASSWORD_ENV = "VSPHERE_PASSWORD"
MIN_ADMIN_PASSWORD = 8


@dataclass(frozen=True)
class SecretSpec:
    env: str
    prompt: str
    min_length: int = 1


ADMIN_PASSWORD = SecretSpec(ADMIN_PASSWORD_ENV, "Local administrator password for the appliance image: ",
                            MIN_ADMIN_PASSWORD)
VSPHERE_PASSWORD = SecretSpec(VSPHERE_PASSWORD_ENV, "vCenter password: ")


def read_secret(spec: SecretSpec, interactive: bool | None = None) -> str:
    """The secret from `spec.env`, else a prompt on a terminal; SecretError otherwise."""
    value = os.environ.get(spec.env)
    if value is None:
        if interactive is None:
            interactive = sys.stdin.isatty()
        if not interactive:
            raise SecretError(f"{spec.env} is not set and there is no terminal to ask on: "
                              f"export {spec.env} (it is never read from a file or the command line)")
        value = getpass.getpass(spec.prompt)
    if len(value) < spec.min_length:
        raise SecretError(f"{spec.env} is too short: at least {spec.min_length} characters are needed")
    if any(c in value for c in "\r\n\0"):
        raise SecretError(f"{spec.env} must not contain line breaks or NUL characters")
    return value
