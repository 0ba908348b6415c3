"""`mobility-agent register` against the real control server: the server's refusal reaches
the operator as one clear line (the server's errors are {"error": ..., "details": [...]})."""
from __future__ import annotations

import json
import subprocess
import sys


def register(appliance, tmp_path, passphrase: str, disks: tuple[str, ...] = ("disk0.img",)) -> subprocess.CompletedProcess:
    for name in disks:
        (tmp_path / name).write_bytes(b"\x01" * (1 << 20))
    (tmp_path / "pass").write_text(passphrase)
    return subprocess.run(
        [sys.executable, "-m", "replication_appliance.agent.cli", "register", "--server", f"127.0.0.1:{appliance.port}",
         "--passphrase-file", str(tmp_path / "pass"), "--ca-file", str(appliance.data_dir.ca_cert),
         "--state-dir", str(tmp_path / "agent"), *(a for n in disks for a in ("--disk", str(tmp_path / n))),
         "--hostname", "web01", "--host-id", "host-cli"],
        capture_output=True, text=True, timeout=120, check=False)


def test_wrong_passphrase_is_one_clear_line(appliance, tmp_path):
    refused = register(appliance, tmp_path, "this-is-not-the-passphrase")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [(
        f"mobility-agent register: registration refused by 127.0.0.1:{appliance.port} (HTTP 401): wrong registration "
        "passphrase: get the current one with `appliance passphrase show` on the appliance")]
    assert not (tmp_path / "agent" / "agent.json").exists()  # nothing half-registered


def test_right_passphrase_registers(appliance, tmp_path):
    done = register(appliance, tmp_path, appliance.data_dir.passphrase())
    assert done.returncode == 0, done.stderr
    assert "registered web01 as machine" in done.stdout
    assert "HTTP Request" not in done.stderr  # httpx's per-request INFO lines stay out of the agent's output


def test_reregistration_in_another_order_keeps_the_agents_disk_numbers(appliance, tmp_path):
    """The agent numbers its disks as the appliance does: disk i of its config is disk i on the data port."""
    for disks in [("b.img", "a.img"), ("a.img", "c.img", "b.img")]:
        done = register(appliance, tmp_path, appliance.data_dir.passphrase(), disks)
        assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "agent" / "agent.json").read_text())
    assert [d["path"] for d in config["disks"]] == [str(tmp_path / n) for n in ("b.img", "a.img", "c.img")]
