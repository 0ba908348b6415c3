"""Prerequisite rules on given facts, and the real network probes against loopback servers."""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import replace

import pytest
from replication_appliance.prereqs.checks import (
    Facts,
    Status,
    evaluate,
    gather_facts,
    judge,
    ntp_offset,
    probe_tcp,
)
from replication_appliance.requirements import requirement_rows, url_allow_list

GB = 10**9


def facts(**kw) -> Facts:
    base = Facts(os_family="Linux", os_name="Debian GNU/Linux 12", cores=8, ram_bytes=16 * 2**30, disks=["sda", "sdb", "sdc"],
                 free_bytes={"/cache": 700 * GB, "/retention": 650 * GB}, locale_name="en_US", tls12=True,
                 openssl="OpenSSL 3", is_vmware=True, nic_drivers={"ens192": "vmxnet3"}, dhcp_clients=[],
                 mysql_binary="/usr/sbin/mariadbd", control_port=443, data_port=9443, ports_in_use={},
                 other_listeners=[], clock_offset_s=0.4)
    return replace(base, **kw)


def status_of(row: str, f: Facts, cloud: str = "public") -> Status:
    return judge(row, f, cloud)[0]


def test_every_seed_row_gets_a_result():
    results = evaluate(facts(), "public")
    assert [r.id for r in results] == [r["id"] for r in requirement_rows()]


def test_windows_only_rows_say_so_on_linux():
    for r in evaluate(facts(), "public"):
        if r.id.startswith(("gpo.", "iis.", "sw.role_")) or r.id in {"sw.dotnet", "sw.licence", "vmware.powercli"}:
            assert r.status == Status.NOT_APPLICABLE and "Windows" in r.observed


@pytest.mark.parametrize("row, good, bad", [
    ("hw.cpu", {"cores": 8}, {"cores": 7}),
    ("hw.ram", {"ram_bytes": 16 * 2**30}, {"ram_bytes": 12 * 2**30}),
    ("hw.disks", {"disks": ["a", "b", "c"]}, {"disks": ["a", "b"]}),
    ("hw.cache_free", {"free_bytes": {"/c": 600 * GB, "/r": 1}}, {"free_bytes": {"/c": 599 * GB, "/r": 700 * GB}}),
    ("hw.retention_free", {"free_bytes": {"/c": 1, "/r": 600 * GB}}, {"free_bytes": {"/c": 700 * GB, "/r": 5 * GB}}),
    ("sw.locale", {"locale_name": "en_US"}, {"locale_name": "de_DE"}),
    ("sw.tls12", {"tls12": True}, {"tls12": False}),
    ("sw.mysql", {"mysql_binary": "/usr/sbin/mysqld"}, {"mysql_binary": None}),
    ("net.port_control", {"ports_in_use": {9443: "x"}}, {"ports_in_use": {443: "nginx"}}),
    ("net.port_data", {"ports_in_use": {443: "x"}}, {"ports_in_use": {9443: "java"}}),
    ("net.nic", {"nic_drivers": {"ens192": "vmxnet3"}}, {"nic_drivers": {"ens192": "e1000"}}),
    ("time.sync", {"clock_offset_s": -12.0}, {"clock_offset_s": 400.0}),
    ("url.public", {"unreachable": []}, {"unreachable": ["*.blob.core.windows.net (x: refused)"]}),
])
def test_rules_pass_and_fail_at_their_thresholds(row, good, bad):
    assert status_of(row, facts(**good)) == Status.PASS
    assert status_of(row, facts(**bad)) == Status.FAIL


def test_os_row_fails_on_linux_and_passes_on_windows_server_2016():
    assert judge("sw.os", facts(), "public") == (Status.FAIL, "Debian GNU/Linux 12")
    assert status_of("sw.os", facts(os_family="Windows", os_name="Windows Server 2016 Datacenter")) == Status.PASS


def test_network_rows_follow_the_chosen_cloud_and_skip_flag():
    assert status_of("url.public", facts(), "government") == Status.NOT_APPLICABLE
    assert status_of("url.government", facts(), "government") == Status.PASS
    assert status_of("time.sync", facts(network_checked=False)) == Status.NOT_APPLICABLE
    assert status_of("time.sync", facts(clock_offset_s=None, clock_error="timed out")) == Status.FAIL
    assert status_of("url.public", facts(unreachable_optional=["telemetry"])) == Status.PASS


def test_nic_rows_only_apply_on_vmware():
    assert status_of("vmware.nic", facts(is_vmware=False)) == Status.NOT_APPLICABLE


def test_probe_tcp_against_a_loopback_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert probe_tcp("127.0.0.1", listener.getsockname()[1]) is None
        port = listener.getsockname()[1]
    assert probe_tcp("127.0.0.1", port, timeout=1) is not None


def test_ntp_offset_against_a_loopback_sntp_server():
    skew = 120.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))

        def answer():
            data, addr = server.recvfrom(512)
            now = time.time() + skew + 2208988800
            reply = bytearray(48)
            reply[0] = 0x24  # version 4, mode 4 (server)
            reply[40:48] = struct.pack("!II", int(now), int((now % 1) * 2**32))
            server.sendto(bytes(reply), addr)

        threading.Thread(target=answer, daemon=True).start()
        assert ntp_offset("127.0.0.1", server.getsockname()[1], timeout=5) == pytest.approx(skew, abs=1.0)


def test_gather_facts_probes_every_tcp_url_of_the_cloud(tmp_path):
    probed: list[tuple[str, int]] = []

    def probe(host: str, port: int):  # answers like probe_tcp, without leaving this machine
        probed.append((host, port))
        return "refused" if host == "management.azure.com" else None

    f = gather_facts("public", tmp_path, tmp_path, probe=probe, clock=lambda host: 1.5)
    expected = {(u["probe"], int(u.get("port", 443))) for u in url_allow_list("public") if u.get("protocol", "tcp") == "tcp"}
    assert set(probed) == expected
    assert len(f.unreachable) == 1 and "management.azure.com" in f.unreachable[0]
    assert f.clock_offset_s == 1.5 and f.cores >= 1
