"""Lease handling: device URLs, readiness, keep-alive, manifest comparison, upload failures."""
from __future__ import annotations

import hashlib
import io
import ssl
import time
from types import SimpleNamespace

import pytest

from appliance_build.deploy.errors import LeaseError, UploadError
from appliance_build.deploy.lease import (
    DeviceUrl,
    FileItem,
    LeaseKeeper,
    ServerDigest,
    Upload,
    manifest_mismatches,
    plan_uploads,
    rewrite_host,
    upload,
    wait_until_ready,
)
from appliance_build.deploy.options import TlsOptions, VcenterAddress
from tests.fixtures.ports import free_port

VC = VcenterAddress("vc.example.com", 443)


def test_star_host_becomes_vcenters_address_and_real_hosts_stay():
    assert rewrite_host("https://*/nfc/52ab/disk-0.vmdk", VC) == "https://vc.example.com:443/nfc/52ab/disk-0.vmdk"
    assert rewrite_host("https://*:8443/nfc/x/d.vmdk", VC) == "https://vc.example.com:8443/nfc/x/d.vmdk"
    assert rewrite_host("https://*/nfc/x", VcenterAddress("fd00::5", 444)) == "https://[fd00::5]:444/nfc/x"
    assert rewrite_host("https://esx1.lab:443/nfc/x/d.vmdk", VC) == "https://esx1.lab:443/nfc/x/d.vmdk"


def test_every_file_is_paired_with_its_device_url():
    items = [FileItem("/app/VirtualLsiLogicController0:0", "disk1.vmdk"), FileItem("/app/disk:1", "disk2.vmdk")]
    urls = [DeviceUrl("/app/disk:1", "/vm-1/disk:1", "https://*/nfc/l/disk-1.vmdk", "AB:CD"),
            DeviceUrl("/app/VirtualLsiLogicController0:0", "/vm-1/disk:0", "https://*/nfc/l/disk-0.vmdk")]
    plan = plan_uploads(items, urls, {"disk1.vmdk": 10, "disk2.vmdk": 20}, VC)
    assert [(u.member, u.url.rsplit("/", 1)[1], u.size, u.device_key, u.thumbprint) for u in plan] == [
        ("disk1.vmdk", "disk-0.vmdk", 10, "/vm-1/disk:0", ""),
        ("disk2.vmdk", "disk-1.vmdk", 20, "/vm-1/disk:1", "AB:CD")]
    with pytest.raises(LeaseError, match="no upload URL for disk2.vmdk"):
        plan_uploads(items, urls[1:], {"disk1.vmdk": 10, "disk2.vmdk": 20}, VC)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_lease_wait_returns_on_ready_and_fails_on_error_or_timeout():
    clock = _Clock()
    class Lease:  # each read of `state` is one poll of the server
        states = iter(["initializing", "initializing", "ready"])
        state = property(lambda self: next(self.states))

    wait_until_ready(Lease(), timeout=10, clock=clock, sleep=clock.sleep)
    assert clock.now == 1.0

    failed = SimpleNamespace(state="error", error=SimpleNamespace(localizedMessage="Insufficient disk space"))
    with pytest.raises(LeaseError, match="Insufficient disk space"):
        wait_until_ready(failed, timeout=10, clock=clock, sleep=clock.sleep)
    stuck = SimpleNamespace(state="initializing")
    with pytest.raises(LeaseError, match="not ready after 3s.*--lease-timeout"):
        wait_until_ready(stuck, timeout=3, clock=clock, sleep=clock.sleep)


def test_keeper_reports_progress_every_interval_and_never_100():
    clock = _Clock()
    sent: list[int] = []
    lease = SimpleNamespace(Progress=lambda percent: sent.append(percent))
    keeper = LeaseKeeper(lease, total=1000, interval=5, clock=clock)
    for _ in range(10):
        clock.now += 2
        keeper.advance(100)
    assert sent == [30, 60, 90]  # at 6 s, 12 s and 18 s
    keeper.report()
    assert sent[-1] == 99  # all bytes sent, but only HttpNfcLeaseComplete says 100


def test_keeper_turns_a_lost_lease_into_a_lease_error():
    def gone(percent: int) -> None:
        raise RuntimeError("The object has already been deleted")

    keeper = LeaseKeeper(SimpleNamespace(Progress=gone), total=10, interval=0)
    with pytest.raises(LeaseError, match="no longer accepts progress"):
        keeper.advance(1)


def test_server_manifest_is_compared_where_algorithms_match():
    mf = {"d1.vmdk": "aa" * 32, "d2.vmdk": "bb" * 20}
    algorithms = {"d1.vmdk": "SHA256", "d2.vmdk": "SHA1"}
    good = [ServerDigest("d1.vmdk", "sha256", "AA" * 32), ServerDigest("d2.vmdk", "sha256", "cc" * 32)]
    assert manifest_mismatches(good, mf, algorithms) == ([], 1)  # d2: .mf has SHA1, server SHA256: not comparable
    bad = [ServerDigest("d1.vmdk", "sha256", "ff" * 32), ServerDigest("d2.vmdk", "sha1", "bb" * 20)]
    mismatches, compared = manifest_mismatches(bad, mf, algorithms)
    assert compared == 2 and len(mismatches) == 1 and mismatches[0].startswith("d1.vmdk: vCenter computed SHA256")


def test_unreachable_esxi_host_is_named_with_what_to_do():
    item = Upload("disk1.vmdk", f"https://127.0.0.1:{free_port()}/nfc/x/disk-0.vmdk", 10, "/vm/disk:0")
    with pytest.raises(UploadError) as caught:
        upload(item, io.BytesIO(b"0" * 10), TlsOptions(insecure=True), lambda n: None)
    message = str(caught.value)
    assert "cannot reach 127.0.0.1" in message and "the ESXi host named in the upload URL of disk1.vmdk" in message
    assert "not only vCenter" in message


def test_thumbprint_pins_a_certificate_without_a_ca(vcsim):
    der = ssl.PEM_cert_to_DER_cert(vcsim.ca_file.read_text())
    right = ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())
    url = f"https://{vcsim.address}/nfc/no-such-lease/disk-0.vmdk"
    with pytest.raises(UploadError, match="does not match the thumbprint"):
        upload(Upload("d.vmdk", url, 4, "k", "00:" * 19 + "00"), io.BytesIO(b"data"), TlsOptions(), lambda n: None)
    # The right thumbprint gets past TLS with no CA given; vcsim then refuses the unknown lease.
    with pytest.raises(UploadError, match="refused d.vmdk: HTTP 404"):
        upload(Upload("d.vmdk", url, 4, "k", right), io.BytesIO(b"data"), TlsOptions(), lambda n: None)
    # Without a thumbprint and without a CA, the certificate is not trusted.
    with pytest.raises(UploadError, match="is not trusted"):
        upload(Upload("d.vmdk", url, 4, "k"), io.BytesIO(b"data"), TlsOptions(), lambda n: None)


def test_package_fingerprint_changes_when_the_ova_is_rewritten(tmp_path):
    from appliance_build.deploy.deployer import package_fingerprint

    ova = tmp_path / "a.ova"
    ova.write_bytes(b"x" * 100)
    before = package_fingerprint(ova)
    assert package_fingerprint(ova) == before
    time.sleep(0.05)  # past the kernel's coarse timestamp tick
    ova.write_bytes(b"y" * 100)  # same size, new content: the write moves mtime
    assert package_fingerprint(ova) != before
    folder = tmp_path / "ovf"
    folder.mkdir()
    (folder / "a.ovf").write_text("<x/>")
    before = package_fingerprint(folder)
    (folder / "disk1.vmdk").write_bytes(b"d")
    assert package_fingerprint(folder) != before


def test_a_refused_upload_shows_the_servers_answer(vcsim):
    size = 8 * 2**20  # far more than the server reads before it answers and closes
    url = f"https://{vcsim.address}/nfc/no-such-lease/disk-0.vmdk"
    with pytest.raises(UploadError, match="refused d.vmdk: HTTP 404"):
        upload(Upload("d.vmdk", url, size, "k"), io.BytesIO(bytes(size)), TlsOptions(ca_file=vcsim.ca_file),
               lambda n: None)
