"""Each requirement row of the seed (requirements.requirement_rows()) checked on this machine.

Facts are gathered first (I/O, `gather_facts`), then judged by pure functions (`evaluate`),
so every rule is testable without the machine it describes. Rows that only exist on
Windows (roles, group policies, IIS, .NET, licence, the MySQL installer) are reported as
not applicable on Linux with the reason."""
from __future__ import annotations

import argparse
import concurrent.futures
import enum
import json
import locale
import os
import platform
import shutil
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ..requirements import requirement_rows, time_source, url_allow_list

GB = 10**9
MIN_CORES = 8
MIN_RAM_BYTES = 16 * 2**30 * 0.95  # a 16 GB VM reports a little less than 16 GiB usable
MIN_DISKS = 3
MIN_FREE_BYTES = 600 * GB
MAX_CLOCK_OFFSET_S = 300.0
PROBE_TIMEOUT_S = 3.0
NOT_WINDOWS = "only applies to a Windows appliance; this is {os}"
WINDOWS_ONLY = {"vmware.powercli", "sw.licence", "sw.dotnet", "sw.role_adds", "sw.role_iis", "sw.role_hyperv",
                "gpo.cmd", "gpo.regedit", "gpo.attachments", "gpo.scripts", "iis.default_site", "iis.port443",
                "iis.anonymous_auth", "iis.fastcgi", "mysql.offline", "mysql.download"}
OUR_PORTS_HINT = {22, 3306}  # SSH and the appliance's own MySQL are expected listeners


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class Result:
    id: str
    component: str
    expected: str
    status: Status
    observed: str


@dataclass
class Facts:
    os_family: str  # Windows | Linux | Darwin
    os_name: str
    cores: int
    ram_bytes: int
    disks: list[str]
    free_bytes: dict[str, int]  # path -> free bytes (cache, retention)
    locale_name: str
    tls12: bool
    openssl: str
    is_vmware: bool
    nic_drivers: dict[str, str]
    dhcp_clients: list[str]
    mysql_binary: str | None
    control_port: int
    data_port: int
    ports_in_use: dict[int, str]  # port -> who holds it
    other_listeners: list[str]
    unreachable: list[str] = field(default_factory=list)  # required URLs that did not answer
    unreachable_optional: list[str] = field(default_factory=list)
    clock_offset_s: float | None = None
    clock_error: str = ""
    network_checked: bool = True


# --- gathering (I/O) --------------------------------------------------------------------------
def probe_tcp(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if host:port accepts a TCP connection, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def ntp_offset(host: str, port: int = 123, timeout: float = PROBE_TIMEOUT_S) -> float:
    """Clock offset (s) against an NTP server: SNTP (RFC 4330) client request, mode 3."""
    ntp_epoch = 2208988800
    packet = b"\x23" + 47 * b"\0"  # LI 0, version 4, mode 3 (client)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sent = time.time()
        sock.sendto(packet, (host, port))
        data, _ = sock.recvfrom(512)
        received = time.time()
    if len(data) < 48:
        raise OSError(f"short NTP reply ({len(data)} bytes)")
    secs, frac = struct.unpack("!II", data[40:48])
    server_time = secs - ntp_epoch + frac / 2**32
    return server_time - (sent + received) / 2


def _block_disks() -> list[str]:
    root = Path("/sys/block")
    if not root.is_dir():
        return sorted({p.device for p in psutil.disk_partitions()})
    skip = ("loop", "ram", "zram", "sr", "dm-", "md", "nbd")
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(skip))


def _nic_drivers() -> dict[str, str]:
    out = {}
    for dev in Path("/sys/class/net").glob("*") if Path("/sys/class/net").is_dir() else []:
        driver = dev / "device" / "driver"
        if driver.exists():
            out[dev.name] = driver.resolve().name
    return out


def _listeners() -> dict[int, str]:
    found: dict[int, str] = {}
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr:
                name = ""
                if c.pid:
                    try:
                        name = psutil.Process(c.pid).name()
                    except psutil.Error:
                        pass
                found.setdefault(c.laddr.port, name or "unknown process")
    except psutil.AccessDenied:
        pass
    return found


def gather_facts(cloud: str, cache_path: Path, retention_path: Path, control_port: int = 443, data_port: int = 9443,
                 check_network: bool = True, probe: Callable[[str, int], str | None] = probe_tcp,
                 clock: Callable[[str], float] = ntp_offset) -> Facts:
    system = platform.system()
    listeners = _listeners()
    dmi = Path("/sys/class/dmi/id/sys_vendor")
    facts = Facts(
        os_family=system, os_name=_os_name(system), cores=os.cpu_count() or 0,
        ram_bytes=psutil.virtual_memory().total, disks=_block_disks(),
        free_bytes={str(p): shutil.disk_usage(_existing(p)).free for p in (cache_path, retention_path)},
        locale_name=locale.getlocale()[0] or os.environ.get("LANG", "C"),
        tls12=ssl.HAS_TLSv1_2, openssl=ssl.OPENSSL_VERSION,
        is_vmware=dmi.exists() and "vmware" in dmi.read_text(errors="replace").lower(),
        nic_drivers=_nic_drivers(),
        dhcp_clients=sorted({p.info["name"] for p in psutil.process_iter(["name"])
                             if p.info["name"] in {"dhclient", "dhcpcd", "udhcpc"}}),
        mysql_binary=shutil.which("mysqld") or shutil.which("mariadbd") or shutil.which("/usr/sbin/mariadbd"),
        control_port=control_port, data_port=data_port,
        ports_in_use={p: listeners[p] for p in (control_port, data_port) if p in listeners},
        other_listeners=sorted(f"{port} ({who})" for port, who in listeners.items()
                               if port not in {control_port, data_port} | OUR_PORTS_HINT),
        network_checked=check_network,
    )
    if check_network:
        entries = [u for u in url_allow_list(cloud) if u.get("protocol", "tcp") == "tcp"]
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda u: probe(u["probe"], int(u.get("port", 443))), entries))
        for entry, why in zip(entries, answers):
            if why is not None:
                target = facts.unreachable_optional if entry.get("optional") else facts.unreachable
                target.append(f"{entry['pattern']} ({entry['probe']}: {why})")
        try:
            facts.clock_offset_s = clock(time_source(cloud))
        except OSError as exc:
            facts.clock_error = exc.strerror or str(exc) or type(exc).__name__
    return facts


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _os_name(system: str) -> str:
    if system == "Linux":
        try:
            return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
        except OSError:
            return "Linux"
    return f"{system} {platform.release()}"


# --- judging (pure) ---------------------------------------------------------------------------
def _ok(cond: bool) -> Status:
    return Status.PASS if cond else Status.FAIL


def judge(row_id: str, f: Facts, cloud: str) -> tuple[Status, str]:
    windows = f.os_family == "Windows"
    if row_id in WINDOWS_ONLY and not windows:
        return Status.NOT_APPLICABLE, NOT_WINDOWS.format(os=f.os_name)
    gib = lambda n: f"{n / GB:.0f} GB"
    match row_id:
        case "vmware.nic" | "net.nic":
            if not f.is_vmware:
                return Status.NOT_APPLICABLE, "not a VMware VM"
            bad = {n: d for n, d in f.nic_drivers.items() if d != "vmxnet3"}
            return _ok(not bad and bool(f.nic_drivers)), ", ".join(f"{n}: {d}" for n, d in f.nic_drivers.items()) or "no NIC"
        case "hw.cpu":
            return _ok(f.cores >= MIN_CORES), f"{f.cores} cores"
        case "hw.ram":
            return _ok(f.ram_bytes >= MIN_RAM_BYTES), f"{f.ram_bytes / 2**30:.1f} GiB"
        case "hw.disks":
            return _ok(len(f.disks) >= MIN_DISKS), f"{len(f.disks)} disks ({', '.join(f.disks) or 'none'})"
        case "hw.cache_free" | "hw.retention_free":
            path, free = list(f.free_bytes.items())[0 if row_id == "hw.cache_free" else -1]
            return _ok(free >= MIN_FREE_BYTES), f"{gib(free)} free at {path}"
        case "sw.os":
            return _ok(windows and any(v in f.os_name for v in ("2016", "2012 R2"))), f.os_name
        case "sw.locale":
            return _ok(f.locale_name.replace("-", "_").lower().startswith("en_us")), f.locale_name
        case "sw.tls12":
            return _ok(f.tls12), f"{f.openssl}, TLS 1.2 {'available' if f.tls12 else 'missing'}; the appliance refuses older versions"
        case "sw.mysql" | "mysql.detected":
            return _ok(f.mysql_binary is not None), f.mysql_binary or "no mysqld/mariadbd found"
        case "sw.other_apps":
            return (Status.WARN if f.other_listeners else Status.PASS), (
                "other listeners: " + ", ".join(f.other_listeners) if f.other_listeners else "no other listening services")
        case "net.static_ip":
            return (Status.WARN if f.dhcp_clients else Status.PASS), (
                f"DHCP client running: {', '.join(f.dhcp_clients)}" if f.dhcp_clients else "no DHCP client running")
        case "net.port_control" | "net.port_data":
            return _port_status(f, f.control_port if row_id == "net.port_control" else f.data_port)
        case "url.public" | "url.government":
            if row_id != f"url.{cloud}":
                return Status.NOT_APPLICABLE, f"appliance uses the {cloud} cloud"
            if not f.network_checked:
                return Status.NOT_APPLICABLE, "not checked (--skip-network)"
            note = f"; optional unreachable: {', '.join(f.unreachable_optional)}" if f.unreachable_optional else ""
            return _ok(not f.unreachable), ("unreachable: " + ", ".join(f.unreachable) if f.unreachable else "all reachable") + note
        case "time.sync":
            if not f.network_checked:
                return Status.NOT_APPLICABLE, "not checked (--skip-network)"
            if f.clock_offset_s is None:
                return Status.FAIL, f"{time_source(cloud)} did not answer: {f.clock_error}"
            return _ok(abs(f.clock_offset_s) <= MAX_CLOCK_OFFSET_S), f"offset {f.clock_offset_s:+.1f} s against {time_source(cloud)}"
    return Status.WARN, "no automatic check on this OS: verify by hand"


def _port_status(f: Facts, wanted: int) -> tuple[Status, str]:
    holder = f.ports_in_use.get(wanted)
    if holder is None:
        return Status.PASS, f"port {wanted} is free"
    return Status.FAIL, f"port {wanted} is in use by {holder}"


def evaluate(f: Facts, cloud: str) -> list[Result]:
    results = []
    for row in requirement_rows():
        status, observed = judge(row["id"], f, cloud)
        results.append(Result(row["id"], row["component"], str(row["expected"]), status, observed))
    return results


def render(results: list[Result]) -> str:
    from ..control.status_view import table

    rows = [[r.id, r.component, r.status.value.upper(), r.observed] for r in results]
    counts = {s: sum(r.status == s for r in results) for s in Status}
    summary = ", ".join(f"{n} {s.value}" for s, n in counts.items())
    return table(["ID", "REQUIREMENT", "RESULT", "OBSERVED"], rows) + f"\n\n{summary}"


def main(args: argparse.Namespace) -> int:
    facts = gather_facts(args.cloud, Path(args.cache_path), Path(args.retention_path), args.control_port,
                         args.data_port, check_network=not args.skip_network)
    results = evaluate(facts, args.cloud)
    if args.json:
        print(json.dumps([{**asdict(r), "status": r.status.value} for r in results], indent=2))
    else:
        print(render(results))
    return 1 if any(r.status == Status.FAIL for r in results) else 0
