"""`invoke deploy` as a user runs it: option wiring, credentials from the environment, Ctrl-C."""
from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from invoke import Exit, MockContext

import tasks
from tests.fixtures.vcsim import Vcsim

from .helpers import vm_named
from .proxy import FaultyProxy

REPO = Path(__file__).resolve().parents[2]
INVOKE = REPO / ".venv" / "bin" / "invoke"


def test_every_deploy_option_has_help_and_reaches_the_flags():
    from appliance_build.deploy.options import Flags

    parameters = set(inspect.signature(tasks.deploy.body).parameters) - {"c"}
    assert set(tasks.deploy.help) == parameters
    assert parameters - {"inventory"} == set(Flags.__dataclass_fields__)
    assert tasks.deploy in tasks.TASKS


def test_bad_flags_exit_with_every_problem_listed(monkeypatch):
    monkeypatch.setenv("VSPHERE_USER", "u")
    monkeypatch.setenv("VSPHERE_PASSWORD", "p")
    with pytest.raises(Exit) as caught:
        tasks.deploy(MockContext(), vcenter="http://vc.example.com", ip="10.0.0.300", dns="8.8.8.8,x",
                     disk_provisioning="sparse", insecure=True, ca_file="/nonexistent.pem", wait_ip=True)
    message = str(caught.value.message)
    for expected in ("only https://", "--ip '10.0.0.300'", "'x' is not an IPv4 address",
                     "allowed are thin, thick, eagerZeroedThick",
                     "--ca-file and --insecure contradict", "--wait-ip needs --power-on"):
        assert expected in message
    assert caught.value.code == 1


def test_missing_password_names_the_variable(monkeypatch, vcsim: Vcsim, appliance_ova):
    monkeypatch.delenv("VSPHERE_PASSWORD", raising=False)
    monkeypatch.setenv("VSPHERE_USER", "someone")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(Exit, match="VSPHERE_PASSWORD"):
        tasks.deploy(MockContext(), vcenter=vcsim.address, ova=str(appliance_ova), datacenter="DC0",
                     cluster="DC0_C0", datastore="LocalDS_0", ca_file=str(vcsim.ca_file))


def _invoke_deploy(vcsim: Vcsim, vcenter: str, ova: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "VSPHERE_USER": vcsim.username, "VSPHERE_PASSWORD": vcsim.password,
           "PYTHONUNBUFFERED": "1"}
    command = [str(INVOKE), "deploy", "--vcenter", vcenter, "--ova", str(ova), "--name", name,
               "--datacenter", "DC0", "--cluster", "DC0_C0", "--datastore", "LocalDS_0", "--network", "VM Network",
               "--ca-file", str(vcsim.ca_file), *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def test_invoke_deploy_prints_the_endpoints_and_no_secret(vcsim: Vcsim, si, appliance_ova):
    process = _invoke_deploy(vcsim, vcsim.address, appliance_ova, "appliance-cli", "--ip", "10.1.2.3/24",
                             "--gateway", "10.1.2.1", "--power-on")
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "control (configuration server): https://10.1.2.3:443/" in output
    assert "data (process server):          10.1.2.3:9443" in output
    assert vcsim.password not in output
    assert vm_named(si, "appliance-cli").runtime.powerState == "poweredOn"


def test_ctrl_c_during_upload_aborts_and_leaves_no_vm(vcsim: Vcsim, si, appliance_ova):
    proxy = FaultyProxy(upstream=(vcsim.host, vcsim.port), rate=512 * 1024)  # slow uploads, time to press Ctrl-C
    try:
        process = _invoke_deploy(vcsim, proxy.address, appliance_ova, "appliance-ctrlc")
        lines = []
        deadline = time.monotonic() + 60
        for line in process.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("uploading"):
                time.sleep(0.5)
                process.send_signal(signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(lines)
        output = "".join(lines) + process.communicate(timeout=60)[0]
    finally:
        proxy.close()
    assert process.returncode == 130, output
    assert "import interrupted: aborting the lease" in output
    assert "aborted import lease" in output
    assert vm_named(si, "appliance-ctrlc") is None
