"""The rendered qemu source, run by the real Packer with KVM, starts QEMU with the OS, cache and
retention disks, the install ISO and the cd_files CD all attached (a dummy ISO stands in for
Windows); Ctrl-C then leaves nothing running and nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from appliance_build.packer import detect_packer_version
from appliance_build.render import private_answer_dir
from appliance_build.settings import load_settings
from appliance_build.version import REPO_ROOT

PASSWORD = "Dummy-Passw0rd-1"
WAITING_FOR_WINRM = "Waiting for WinRM to become available"
# What build_ova does with Packer, in a process of its own so that it can be sent Ctrl-C.
BUILD = """
import json, os, signal, sys
from pathlib import Path
from appliance_build.packer import PackerClient
signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal, even if started ignoring it
client = PackerClient(Path(sys.argv[1]), secrets={"admin_password": os.environ.pop("TEST_ADMIN_PASSWORD")},
                      variables=json.loads(sys.argv[2]))
try:
    client.build(on_line=lambda line: (sys.stdout.write(line), sys.stdout.flush()))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def _processes() -> dict[int, tuple[int, str]]:
    """pid: (parent pid, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def _descendants(pid: int) -> list[int]:
    processes, found, todo = _processes(), [], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in processes.items() if ppid == parent]
        found += children
        todo += children
    return found


def _started_here(*markers: str) -> list[int]:
    """Processes whose command line names one of this test's own (unique) paths."""
    return [pid for pid, (_, cmdline) in _processes().items() if any(m in cmdline for m in markers)]


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


def _qmp(path: Path, *commands: tuple[str, dict]) -> list:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rw")
        json.loads(stream.readline())  # greeting
        answers = []
        for name, arguments in (("qmp_capabilities", {}), *commands):
            stream.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
            stream.flush()
            while "return" not in (answer := json.loads(stream.readline())):
                assert "error" not in answer, answer
            answers.append(answer["return"])
        return answers[1:]


def _read_until(child: subprocess.Popen[str], text: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert child.stdout is not None
    for line in child.stdout:  # the child flushes every line
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, f"no {text!r} after {timeout:.0f} s:\n" + "".join(lines)[-4000:]
    pytest.fail("Packer stopped before QEMU ran:\n" + "".join(lines)[-4000:])


def test_qemu_starts_with_three_disks_and_two_cds_and_ctrl_c_cleans_up(rendered_local: Path, tmp_path: Path,
                                                                         monkeypatch, request):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    # Packer's temporary files (plugin sockets, floppy, CD image) and the answer folder land in
    # `temp`, which must end empty; a short path, as Packer's unix sockets need one.
    short = Path(tempfile.mkdtemp(prefix="pkq-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    temp = short / "t"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    template = rendered_local / "packer" / "appliance.pkr.hcl"
    # A monitor for the test only: Packer 1.6.6's qmp_enable holds its socket's single client.
    qmp_socket = short / "qmp.sock"
    text = template.read_text()
    assert 'source "qemu" "appliance" {\n' in text
    template.write_text(text.replace('source "qemu" "appliance" {\n', 'source "qemu" "appliance" {\n'
                                     f'  qemuargs = [["-qmp", "unix:{qmp_socket},server,nowait"]]\n'))
    iso = tmp_path / "dummy.iso"
    iso.write_bytes(os.urandom(1 << 20))
    tools_iso = tmp_path / "windows.iso"
    tools_iso.write_bytes(b"stands in for the VMware Tools ISO")
    output = tmp_path / "output"
    settings = load_settings("local")
    markers = (str(template), str(temp), str(output))
    request.addfinalizer(lambda: _stop(_started_here(*markers)))  # whatever a failed run left

    with private_answer_dir(settings, detect_packer_version(), PASSWORD) as answer_dir:
        variables = {"answer_dir": str(answer_dir), "output_directory": str(output), "iso_url": iso.as_uri(),
                     "iso_checksum": f"sha256:{hashlib.sha256(iso.read_bytes()).hexdigest()}",
                     "vmware_tools_iso": str(tools_iso), "playbook_file": str(REPO_ROOT / "playbooks" / "appliance.yml")}
        child = subprocess.Popen([sys.executable, "-c", BUILD, str(template), json.dumps(variables)],
                                 cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "TEST_ADMIN_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO_ROOT)})
        try:
            lines = _read_until(child, WAITING_FOR_WINRM, timeout=180)
            blocks, status, qtree = _qmp(qmp_socket, ("query-block", {}), ("query-status", {}),
                                         ("human-monitor-command", {"command-line": "info qtree"}))
            child.send_signal(signal.SIGINT)  # Ctrl-C, as a terminal sends it to build-ova
            rest, _ = child.communicate(timeout=120)
            lines.append(rest)
        finally:
            if child.poll() is None:  # the test failed: stop everything it started
                for pid in _descendants(child.pid):
                    os.kill(pid, signal.SIGTERM)
                child.kill()
                child.wait()

    inserted = {b["device"]: b["inserted"]["file"] for b in blocks if "inserted" in b}
    stem = f"{settings.artifact_stem}-disk1"
    assert [inserted.get(f"ide{n}-hd0") for n in range(3)] == [str(output / stem), str(output / f"{stem}-1"),
                                                               str(output / f"{stem}-2")]
    assert inserted.get("ide3-cd0") == str(iso)
    assert inserted.get("ide4-cd0", "").startswith(str(temp)) and inserted["ide4-cd0"].endswith(".iso")
    assert "floppy0" in inserted  # autounattend.xml
    assert status["running"]
    # if=ide on q35 is its ICH9 AHCI controller, which Windows Setup drives with its inbox driver.
    assert "dev: ich9-ahci" in qtree and qtree.count("dev: ide-hd") == 3 and qtree.count("dev: ide-cd") == 2

    log = "".join(lines)
    assert child.returncode == 130 and "Build was cancelled" in log, log[-4000:]
    assert not _started_here(*markers), "Packer or QEMU left running"
    assert not output.exists()
    assert list(temp.iterdir()) == []
    assert PASSWORD not in log
