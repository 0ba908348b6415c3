"""build-ova deletes the answer-file CD that vsphere-iso uploads to the datastore (it holds the
administrator password), against govmomi's vCenter simulator."""
from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from appliance_build.datastore_cleanup import CdUploads, delete_cd_images
from appliance_build.deploy.connection import Credentials
from appliance_build.deploy.options import TlsOptions, VcenterAddress
from tests.fixtures.vcsim import Vcsim, vcsim  # noqa: F401 - the session fixture

DATACENTER, DATASTORE = "DC0", "LocalDS_0"
# What Packer 1.6.6's vsphere-iso prints: the cd_files image, and an ISO cached from iso_url.
PACKER_LINES = [
    "\x1b[1;32m==> vsphere-iso.appliance: Uploading packer2441861312.iso to packer_cache/packer2441861312.iso\x1b[0m\n",
    "==> vsphere-iso.appliance: Uploading 5e4b3c5f0e0a.iso to packer_cache/5e4b3c5f0e0a.iso\n",
    "==> vsphere-iso.appliance: Uploading packer2441861312.iso to packer_cache/packer2441861312.iso\n",
]


@pytest.fixture
def si(vcsim: Vcsim) -> Iterator[Any]:  # noqa: F811
    from pyVim.connect import Disconnect, SmartConnect

    service = SmartConnect(host=vcsim.host, port=vcsim.port, user=vcsim.username, pwd=vcsim.password,
                           sslContext=ssl.create_default_context(cafile=str(vcsim.ca_file)))
    yield service
    Disconnect(service)


def _datastore_file(vcsim: Vcsim, si: Any, name: str, data: bytes | None = None) -> int:  # noqa: F811
    """PUT `data` to (or, without data, GET) packer_cache/<name> as Packer's upload does; the HTTP status."""
    url = (f"https://{vcsim.address}/folder/packer_cache/{name}?dcPath={DATACENTER}&dsName={DATASTORE}")
    request = urllib.request.Request(url, data=data, method="PUT" if data is not None else "GET",
                                     headers={"Cookie": si._stub.cookie})
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(vcsim.ca_file))) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _delete(vcsim: Vcsim, names: list[str], datacenter: str = DATACENTER, datastore: str = DATASTORE) -> list[str]:  # noqa: F811
    return delete_cd_images(VcenterAddress(vcsim.host, vcsim.port), Credentials(vcsim.username, vcsim.password),
                            TlsOptions(ca_file=vcsim.ca_file), datacenter, datastore, names)


def test_only_the_cd_files_image_is_taken_from_packers_output():
    uploads = CdUploads()
    for line in PACKER_LINES:
        uploads.see(line)
    assert uploads.names == ["packer2441861312.iso"]


def test_the_uploaded_answer_cd_is_deleted(vcsim: Vcsim, si: Any):  # noqa: F811
    assert _datastore_file(vcsim, si, "packer2441861312.iso", b"autounattend.xml stand-in") == 200
    assert _datastore_file(vcsim, si, "packer2441861312.iso") == 200
    assert _delete(vcsim, ["packer2441861312.iso"]) == []
    assert _datastore_file(vcsim, si, "packer2441861312.iso") == 404


def test_what_cannot_be_deleted_is_named_not_raised(vcsim: Vcsim, si: Any):  # noqa: F811
    assert _datastore_file(vcsim, si, "packer17.iso", b"x") == 200
    left = _delete(vcsim, ["packer17.iso"], datacenter="DC9")
    assert left == ["[LocalDS_0] packer_cache/packer17.iso: vCenter has no datacenter 'DC9'"]
    left = _delete(vcsim, ["packer17.iso"], datastore="NoSuchDS")
    assert len(left) == 1 and left[0].startswith("[NoSuchDS] packer_cache/packer17.iso: ")
    unreachable = delete_cd_images(VcenterAddress("127.0.0.1", 9), Credentials("u", "p"), TlsOptions(),
                                   DATACENTER, DATASTORE, ["packer17.iso"])
    assert len(unreachable) == 1 and "cannot reach" in unreachable[0]
    assert _datastore_file(vcsim, si, "packer17.iso") == 200


def test_build_ova_warns_naming_a_cd_it_could_not_delete(capsys):
    from appliance_build import build
    from appliance_build.settings import load_settings, settings_from_mapping

    raw = load_settings("vsphere").raw
    settings = settings_from_mapping({**raw, "builder": {**raw["builder"], "vsphere": {
        **raw["builder"]["vsphere"], "vcenter": "127.0.0.1"}}})  # nothing serves vCenter's 443 here
    build.delete_answer_cds(settings, "not-the-password", ["packer5.iso"])
    warning = capsys.readouterr().err
    assert "[datastore1] packer_cache/packer5.iso" in warning and "delete it by hand" in warning
    assert "not-the-password" not in warning
