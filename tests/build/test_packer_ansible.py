"""What the Ansible provisioner hands ansible-playbook: the WinRM port of Packer's inventory, and
the WinRM password from the environment, never on the command line.

A probe playbook reports what Ansible resolved; its only task is `debug`, which needs no
connection to the (absent) Windows machine.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from appliance_build.packer import PackerClient
from appliance_build.secrets import ADMIN_PASSWORD_ENV
from appliance_build.toolenv import tool_env

from .winrm_stub import winrm_stub

PASSWORD = "Probe-Passw0rd-7"
USER = "Administrator"
PROBE = re.compile(r"PROBE port=(\d+) password_ok=(\w+) argv_has_password=(\w+)")
# Packer 1.6.6's inventory line for WinRM without its proxy (DefaultWinRMInventoryFilev2).
PACKER_INVENTORY_LINE = ("default ansible_host=127.0.0.1 ansible_connection=winrm ansible_winrm_transport=basic "
                         "ansible_shell_type=powershell ansible_user={user} ansible_port={port}\n")


def _probe_playbook(folder: Path) -> Path:
    playbook = folder / "probe.yml"
    playbook.write_text(
        "- name: Probe what the provisioner hands Ansible\n"
        "  hosts: all\n"
        "  gather_facts: false\n"
        "  tasks:\n"
        "    - name: Report the port and where the password came from\n"
        "      ansible.builtin.debug:\n"
        "        msg: >-\n"
        "          PROBE port={{ ansible_port }}\n"
        f"          password_ok={{{{ ansible_password == '{PASSWORD}' }}}}\n"
        "          argv_has_password={{ ansible_password in lookup('ansible.builtin.file', '/proc/self/cmdline') }}\n")
    return playbook


def _probe_result(output: str) -> tuple[int, bool, bool]:
    found = PROBE.search(output)
    assert found, f"the probe play did not report:\n{output}"
    return int(found[1]), found[2] == "True", found[3] == "True"


def test_the_winrm_port_is_the_one_in_packers_inventory(rendered_local: Path, tmp_path: Path):
    # The qemu builder forwards WinRM to a random host port; the vars file must not override it.
    inventory = tmp_path / "inventory"
    inventory.write_text(PACKER_INVENTORY_LINE.format(user=USER, port=3456))
    result = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), "--extra-vars",
         f"@{rendered_local / 'ansible' / 'appliance-vars.yml'}", str(_probe_playbook(tmp_path))],
        env=tool_env({ADMIN_PASSWORD_ENV: PASSWORD, "ANSIBLE_NOCOLOR": "True"}),
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    port, password_ok, _ = _probe_result(result.stdout)
    assert port == 3456
    assert password_ok


def test_packer_runs_ansible_with_its_port_and_no_password_in_argv(rendered_local: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    # The rendered build block as it is; only the qemu source gives way to a null source whose
    # WinRM endpoint is a stub on a random port, as the qemu builder's forwarded port is.
    monkeypatch.setenv(ADMIN_PASSWORD_ENV, PASSWORD)  # as build_ova sets it
    template = rendered_local / "packer" / "appliance.pkr.hcl"
    with winrm_stub(USER, PASSWORD) as stub:
        null_source = (f'source "null" "appliance" {{\n  communicator   = "winrm"\n  winrm_host     = "127.0.0.1"\n'
                       f'  winrm_port     = {stub.port}\n  winrm_username = var.admin_user\n'
                       f'  winrm_password = var.admin_password\n  winrm_timeout  = "2m"\n}}\n')
        text, replaced = re.subn(r'source "qemu" "appliance" \{\n.*?\n\}\n', null_source,
                                 template.read_text(), count=1, flags=re.DOTALL)
        assert replaced == 1
        template.write_text(text.replace("source.qemu.appliance", "source.null.appliance"))
        client = PackerClient(template, secrets={"admin_password": PASSWORD},
                              variables={"answer_dir": str(tmp_path), "playbook_file": str(_probe_playbook(tmp_path))})
        lines: list[str] = []
        client.build(on_line=lines.append)
    output = "".join(lines)
    assert stub.requests and not stub.refused
    port, password_ok, argv_has_password = _probe_result(output)
    assert port == stub.port
    assert password_ok
    assert not argv_has_password, "Packer put the WinRM password on ansible-playbook's command line"
    assert PASSWORD not in output
