"""Log in to vCenter: credentials from the environment or a prompt, TLS verified by default."""
from __future__ import annotations

import getpass
import os
import socket
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import SecretError
from .errors import VcenterConnectionError
from .options import TlsOptions, VcenterAddress

USER_VARIABLE = "VSPHERE_USER"
PASSWORD_VARIABLE = "VSPHERE_PASSWORD"
SOAP_TIMEOUT = 120  # seconds for one API call; uploads have their own connections


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


def read_credentials(environ: Mapping[str, str] = os.environ, default_user: str | None = None,
                     interactive: bool | None = None,
                     ask: Callable[[str], str] = input, ask_secret: Callable[[str], str] = getpass.getpass,
                     ) -> Credentials:
    """VSPHERE_USER / VSPHERE_PASSWORD, else a prompt on a terminal; never argv or a file."""
    if interactive is None:
        interactive = sys.stdin.isatty()
    user = environ.get(USER_VARIABLE) or default_user or ""
    password = environ.get(PASSWORD_VARIABLE, "")
    if not user and interactive:
        user = ask("vCenter user: ").strip()
    if not password and interactive:
        password = ask_secret(f"vCenter password for {user}: ")
    missing = [name for name, value in ((USER_VARIABLE, user), (PASSWORD_VARIABLE, password)) if not value]
    if missing:
        raise SecretError(f"no vCenter credentials: set {' and '.join(missing)} in the environment "
                          f"(or run on a terminal to be prompted); they are never read from flags or files")
    return Credentials(user, password)


def ssl_context(tls: TlsOptions) -> ssl.SSLContext:
    """Verifying context (system CAs or --ca-file); no verification only with --insecure."""
    if tls.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise VcenterConnectionError(f"cannot use --ca-file {tls.ca_file}: {exc}; it must be a PEM file "
                                     f"with the CA certificate(s) that signed vCenter's certificate") from None


@contextmanager
def vcenter_session(address: VcenterAddress, credentials: Credentials, tls: TlsOptions) -> Iterator[Any]:
    """A logged-in ServiceInstance; logged out on exit."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim

    where = f"vCenter {address.netloc}"
    try:
        si = SmartConnect(host=address.host, port=address.port, user=credentials.user, pwd=credentials.password,
                          sslContext=ssl_context(tls), httpConnectionTimeout=SOAP_TIMEOUT)
    except ssl.SSLCertVerificationError as exc:
        raise VcenterConnectionError(
            f"the TLS certificate of {where} is not trusted ({exc.verify_message}): pass --ca-file with the "
            f"vCenter's CA certificate (download it from https://{address.netloc}/certs/download.zip), "
            f"or --insecure to skip verification on a network you trust") from None
    except vim.fault.InvalidLogin:
        raise VcenterConnectionError(f"{where} refused the login of {credentials.user!r}: check {USER_VARIABLE} "
                                     f"and {PASSWORD_VARIABLE}") from None
    except (socket.gaierror, ConnectionError, TimeoutError, ssl.SSLError) as exc:
        raise VcenterConnectionError(f"cannot reach {where}: {exc}; check the address and that this machine "
                                     f"can reach it on port {address.port}") from None
    except OSError as exc:
        raise VcenterConnectionError(f"cannot reach {where}: {exc}") from None
    except vim.fault.VimFault as exc:
        raise VcenterConnectionError(f"{where} refused the session: {exc.msg}") from None
    try:
        yield si
    finally:
        try:
            Disconnect(si)
        except Exception:  # noqa: BLE001 - logging out of a dead session must not hide the real error
            pass
