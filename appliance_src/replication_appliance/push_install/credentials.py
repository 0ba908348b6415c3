"""Push-install accounts, sealed with the appliance's master key (AES-256-GCM).

One file per credential under D/private/push-credentials/<name>.sealed (0600). The sealing
purpose includes the name, so a sealed file renamed to another credential does not open.
Listing shows names, users and kinds only; the secret leaves this module only towards the
target's login (paramiko / pywinrm), never towards logs, the API, argv or job records.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..common.datadir import DataDir
from .errors import CredentialError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KINDS = ("password", "key")
PURPOSE = "push-install credential"


@dataclass(frozen=True)
class Credential:
    name: str
    username: str
    kind: str  # password: `secret` is the password; key: `secret` is an OpenSSH/PEM private key
    secret: str = field(repr=False)
    sudo_password: str | None = field(default=None, repr=False)  # for sudo when the user is not root

    def summary(self) -> dict[str, str]:
        return {"name": self.name, "username": self.username, "kind": self.kind,
                "sudo": "yes" if self.sudo_password is not None or self.kind == "password" else "no"}


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise CredentialError(f"credential name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


class CredentialStore:
    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        self.folder = data_dir.private / "push-credentials"

    def _path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}.sealed"

    def add(self, credential: Credential, replace: bool = False) -> None:
        if credential.kind not in KINDS:
            raise CredentialError(f"credential kind {credential.kind!r} is unknown: allowed are {', '.join(KINDS)}")
        if not credential.username or any(c in credential.username for c in "\r\n\0"):
            raise CredentialError("the credential needs a user name without line breaks")
        if not credential.secret:
            raise CredentialError(f"credential {credential.name!r} has an empty {credential.kind}")
        path = self._path(credential.name)
        if path.exists() and not replace:
            raise CredentialError(f"credential {credential.name!r} exists already: remove it first or use --replace")
        self.data_dir.make_private_dir()
        self.folder.mkdir(mode=0o700, exist_ok=True)
        document = {"username": credential.username, "kind": credential.kind, "secret": credential.secret,
                    "sudo_password": credential.sudo_password}
        self.data_dir.master_key().store_secret(path, json.dumps(document), f"{PURPOSE}:{credential.name}")

    def get(self, name: str) -> Credential:
        path = self._path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise CredentialError(f"no push-install credential named {name!r} (stored: {known}); "
                                  f"add it with `appliance credentials add --data-dir {self.data_dir.root} {name}`")
        data = json.loads(self.data_dir.master_key().load_secret(path, f"{PURPOSE}:{name}"))
        return Credential(name=name, username=data["username"], kind=data["kind"], secret=data["secret"],
                          sudo_password=data.get("sudo_password"))

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.sealed")) if self.folder.is_dir() else []

    def list(self) -> list[dict[str, str]]:
        return [self.get(name).summary() for name in self.names()]

    def remove(self, name: str) -> None:
        path = self._path(name)
        if not path.is_file():
            raise CredentialError(f"no push-install credential named {name!r}")
        path.unlink()
