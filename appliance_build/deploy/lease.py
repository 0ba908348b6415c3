"""The import lease: wait until ready, stream each disk to its device URL, keep the lease alive.

Disks go up as they are stored in the OVA (streamOptimized VMDKs), read straight from the
tar at their offsets, one fixed buffer at a time: memory stays flat for any disk size.
"""
from __future__ import annotations

import hashlib
import http.client
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from .connection import ssl_context
from .errors import LeaseError, UploadError
from .options import TlsOptions, VcenterAddress

STREAM_VMDK_TYPE = "application/x-vnd.vmware-streamVmdk"
CHUNK = 1024 * 1024
PROGRESS_INTERVAL = 5.0  # vCenter drops a lease that hears nothing for about 5 minutes
UPLOAD_TIMEOUT = 300  # seconds without progress on one socket operation


@dataclass(frozen=True)
class FileItem:
    """What CreateImportSpec asks to upload: an OVA member for a device."""
    device_id: str
    path: str


@dataclass(frozen=True)
class DeviceUrl:
    """Where the lease takes a device's bytes."""
    import_key: str
    key: str
    url: str
    thumbprint: str = ""


@dataclass(frozen=True)
class Upload:
    member: str
    url: str
    size: int
    device_key: str
    thumbprint: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


def rewrite_host(url: str, vcenter: VcenterAddress) -> str:
    """Device URLs name the host as `*` when it is the one we talk to: put vCenter's address in."""
    parts = urlsplit(url)
    if parts.hostname not in ("*", None) and not parts.netloc.startswith("*"):
        return url
    port = parts.port if parts.netloc.startswith("*:") else vcenter.port
    host = f"[{vcenter.host}]" if ":" in vcenter.host else vcenter.host
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, parts.fragment))


def plan_uploads(items: list[FileItem], urls: list[DeviceUrl], sizes: dict[str, int],
                 vcenter: VcenterAddress) -> list[Upload]:
    """Pair every file to upload with its device URL; LeaseError when the lease lacks one."""
    by_import_key = {u.import_key: u for u in urls}
    plan = []
    for item in items:
        url = by_import_key.get(item.device_id)
        if url is None:
            raise LeaseError(f"the import lease has no upload URL for {item.path} (device {item.device_id}); "
                             f"it offers {', '.join(sorted(by_import_key)) or 'none'}")
        plan.append(Upload(item.path, rewrite_host(url.url, vcenter), sizes[item.path], url.key, url.thumbprint))
    return plan


def wait_until_ready(lease: Any, timeout: float, poll: float = 0.5,
                     clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait for `ready`; LeaseError on `error`, on an unexpected state, or after `timeout` seconds."""
    deadline = clock() + timeout
    while True:
        state = lease.state
        if state == "ready":
            return
        if state == "error":
            message = lease.error.localizedMessage if lease.error else "no reason given"
            raise LeaseError(f"vCenter could not prepare the import: {message}")
        if state != "initializing":
            raise LeaseError(f"the import lease is {state!r} before any upload; rerun the deploy")
        if clock() >= deadline:
            raise LeaseError(f"the import lease was not ready after {timeout:.0f}s; vCenter may be busy: rerun, "
                             f"or raise --lease-timeout")
        sleep(poll)


class LeaseKeeper:
    """Reports overall progress to the lease every `interval` seconds, so it stays alive."""

    def __init__(self, lease: Any, total: int, interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lease = lease
        self._total = max(total, 1)
        self._done = 0
        self._interval = interval
        self._clock = clock
        self._last = clock()
        self.reports = 0

    def advance(self, n: int) -> None:
        self._done += n
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self.report()

    def report(self) -> None:
        percent = min(99, self._done * 100 // self._total)  # 100 is said by HttpNfcLeaseComplete
        try:
            self._lease.Progress(percent=percent)
        except Exception as exc:  # noqa: BLE001 - any fault here means the lease is gone
            raise LeaseError(f"vCenter no longer accepts progress on the import lease: {_fault_text(exc)}") from None
        self.reports += 1


def upload(item: Upload, source: BinaryIO, tls: TlsOptions, on_bytes: Callable[[int], None]) -> None:
    """POST `item.size` bytes of `source` to the device URL as a stream-optimized VMDK."""
    parts = urlsplit(item.url)
    connection = _connection(parts.scheme, parts.hostname or "", parts.port, tls, item.thumbprint)
    try:
        _connect(connection, item)
        sent = 0
        try:
            connection.putrequest("POST", parts.path + (f"?{parts.query}" if parts.query else ""),
                                  skip_accept_encoding=True)
            connection.putheader("Content-Type", STREAM_VMDK_TYPE)
            connection.putheader("Content-Length", str(item.size))
            connection.endheaders()
            view = memoryview(bytearray(CHUNK))
            while sent < item.size:
                n = source.readinto(view[: min(CHUNK, item.size - sent)])
                if not n:
                    raise UploadError(f"{item.member} ended after {sent} of {item.size} bytes: the OVA is truncated")
                connection.sock.sendall(view[:n])
                sent += n
                on_bytes(n)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            # A server that refuses the upload answers and closes before reading it all: show its answer.
            response = _early_response(connection)
            if response is None:
                raise UploadError(f"the upload of {item.member} to {item.host} failed after {sent} of {item.size} "
                                  f"bytes: {exc or type(exc).__name__}") from None
        body = response.read(2048)
        if response.status not in (200, 201):
            detail = body.decode("utf-8", "replace").strip()[:300]
            raise UploadError(f"{item.host} refused {item.member}: HTTP {response.status} {response.reason}"
                              + (f": {detail}" if detail else ""))
    finally:
        connection.close()


def _connect(connection: http.client.HTTPConnection, item: Upload) -> None:
    host = urlsplit(item.url)
    try:
        connection.connect()
    except ssl.SSLCertVerificationError as exc:
        raise UploadError(
            f"the TLS certificate of {item.host}, where vCenter sends the disk {item.member}, is not trusted "
            f"({exc.verify_message}): give --ca-file a PEM with the CA of the ESXi hosts as well as vCenter's "
            f"(the VMCA root), or --insecure on a network you trust") from None
    except (OSError, ssl.SSLError) as exc:
        raise UploadError(
            f"cannot reach {item.host}, the ESXi host named in the upload URL of {item.member} ({exc}): this "
            f"machine must reach the ESXi hosts on port {host.port or 443}, not only vCenter. Check DNS for "
            f"{host.hostname} and the firewall, or deploy from a machine in the management network") from None
    _check_thumbprint(connection, item)


def _early_response(connection: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    if connection.sock is None:
        return None
    try:
        connection.sock.settimeout(5)
        return connection.getresponse()
    except (OSError, http.client.HTTPException):
        return None


def _connection(scheme: str, host: str, port: int | None, tls: TlsOptions,
                thumbprint: str) -> http.client.HTTPConnection:
    if scheme == "http":
        return http.client.HTTPConnection(host, port, timeout=UPLOAD_TIMEOUT)
    if scheme != "https":
        raise UploadError(f"unsupported upload URL scheme {scheme!r} for {host}: expected https")
    if thumbprint and not tls.insecure:
        # ESXi certificates are often self-signed: vCenter hands us the expected thumbprint instead.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl_context(tls)
    return http.client.HTTPSConnection(host, port, timeout=UPLOAD_TIMEOUT, context=context,
                                       blocksize=CHUNK)


def _check_thumbprint(connection: http.client.HTTPConnection, item: Upload) -> None:
    if not item.thumbprint or not isinstance(connection.sock, ssl.SSLSocket):
        return
    if connection.sock.context.verify_mode != ssl.CERT_NONE:
        return  # verified against the CA instead (the thumbprint is only used when not verifying)
    expected = item.thumbprint.replace(":", "").lower()
    der = connection.sock.getpeercert(binary_form=True) or b""
    algorithm = "sha1" if len(expected) == 40 else "sha256"
    actual = hashlib.new(algorithm, der).hexdigest()
    if actual != expected:
        raise UploadError(f"the certificate of {item.host} does not match the thumbprint vCenter gave for it "
                          f"({item.thumbprint}): refusing to send {item.member} to an unexpected host")


@dataclass(frozen=True)
class ServerDigest:
    """One entry of HttpNfcLeaseGetManifest, mapped to its OVA member."""
    member: str
    algorithm: str  # sha1 | sha256 | sha512
    digest: str


def manifest_mismatches(server: list[ServerDigest], manifest: dict[str, str],
                        algorithms: dict[str, str]) -> tuple[list[str], int]:
    """Compare what the server computed with the OVA's .mf: (mismatch messages, entries compared)."""
    mismatches = []
    compared = 0
    for entry in server:
        expected = manifest.get(entry.member)
        if expected is None or algorithms.get(entry.member, "").lower() != entry.algorithm.lower():
            continue  # the .mf lists this file with another algorithm (or not at all): nothing to compare
        compared += 1
        if entry.digest.lower() != expected.lower():
            mismatches.append(f"{entry.member}: vCenter computed {entry.algorithm.upper()} {entry.digest.lower()}, "
                              f"the .mf says {expected.lower()}")
    return mismatches, compared


def _fault_text(exc: BaseException) -> str:
    return getattr(exc, "msg", None) or str(exc) or type(exc).__name__
