"""Login and TLS against the real simulator: verified by default, --ca-file, --insecure."""
from __future__ import annotations

import pytest

from appliance_build.deploy.connection import (
    Credentials,
    read_credentials,
    vcenter_session,
)
from appliance_build.deploy.errors import VcenterConnectionError
from appliance_build.deploy.options import TlsOptions, VcenterAddress
from appliance_build.errors import SecretError
from tests.fixtures.ports import free_port


def _address(vcsim) -> VcenterAddress:
    return VcenterAddress(vcsim.host, vcsim.port)


def test_ca_file_verifies_the_certificate(vcsim, credentials):
    with vcenter_session(_address(vcsim), credentials, TlsOptions(ca_file=vcsim.ca_file)) as si:
        assert si.content.about.apiType == "VirtualCenter"


def test_untrusted_certificate_is_refused_by_default(vcsim, credentials):
    with pytest.raises(VcenterConnectionError, match=r"not trusted.*--ca-file.*--insecure"):
        with vcenter_session(_address(vcsim), credentials, TlsOptions()):
            pass


def test_insecure_skips_verification_only_when_asked(vcsim, credentials):
    with vcenter_session(_address(vcsim), credentials, TlsOptions(insecure=True)) as si:
        assert si.content.about.apiType == "VirtualCenter"


def test_wrong_password_is_named_without_showing_it(vcsim):
    wrong = Credentials(vcsim.username, "not-the-password-123")
    with pytest.raises(VcenterConnectionError) as caught:
        with vcenter_session(_address(vcsim), wrong, TlsOptions(ca_file=vcsim.ca_file)):
            pass
    assert "refused the login" in str(caught.value) and "VSPHERE_PASSWORD" in str(caught.value)
    assert "not-the-password-123" not in str(caught.value)


def test_unreachable_vcenter_says_so():
    with pytest.raises(VcenterConnectionError, match=r"cannot reach vCenter 127\.0\.0\.1:\d+"):
        with vcenter_session(VcenterAddress("127.0.0.1", free_port()), Credentials("u", "p"), TlsOptions()):
            pass


def test_credentials_come_from_the_environment_or_a_prompt():
    assert read_credentials({"VSPHERE_USER": "a", "VSPHERE_PASSWORD": "b"}, interactive=False) == Credentials("a", "b")
    prompted = read_credentials({}, default_user="admin@vsphere.local", interactive=True,
                                ask=lambda _: "unused", ask_secret=lambda prompt: f"typed for {prompt}")
    assert prompted.user == "admin@vsphere.local" and prompted.password.startswith("typed for")
    assert "typed" not in repr(prompted)
    with pytest.raises(SecretError, match="VSPHERE_USER and VSPHERE_PASSWORD"):
        read_credentials({}, interactive=False)
