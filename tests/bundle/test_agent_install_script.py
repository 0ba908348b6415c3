"""install.sh of the Linux agent package, run for real under a temporary prefix (no SSH here;
the push-install tests run it over SSH), and its systemd unit checked by systemd-analyze."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from appliance_build.packaging import wheels
from appliance_build.packaging.agent_packages import package_paths
from appliance_build.version import APPLIANCE_VERSION, REPO_ROOT

INSTALL_WHEELS = REPO_ROOT / "installer" / "agent" / "linux" / "install_wheels.py"


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(the unpacked package's install.sh, the prefix it installed into)."""
    work = tmp_path_factory.mktemp("agent-install")
    with tarfile.open(package_paths(dist)[0]) as tf:
        tf.extractall(work / "package", filter="data")
    script = work / "package" / f"mobility-agent-{APPLIANCE_VERSION}-linux" / "install.sh"
    prefix = work / "root"
    result = run(script, "install", prefix)
    assert result.returncode == 0, result.stderr
    assert f"installed {APPLIANCE_VERSION} under {prefix}" in result.stdout
    return script, prefix


def run(script: Path, action: str, prefix: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(script), action, "--prefix", str(prefix), *extra], capture_output=True, text=True,
                          timeout=300)


def test_install_is_idempotent_and_keeps_a_control_script(installed):
    script, prefix = installed
    again = run(script, "install", prefix)
    assert again.returncode == 0 and "is already installed: nothing to do" in again.stdout
    control = prefix / "opt" / "mobility-agent" / "current" / "install.sh"
    assert control.is_file()
    site = next((prefix / "opt" / "mobility-agent" / "current" / "lib").glob("python3*/site-packages"))
    assert (site / "replication_appliance" / "agent" / "cli.py").is_file()
    assert not (site / "pip").exists()  # no pip: install_wheels.py unpacked the wheels, the venv carries only the agent
    meta = next(site.glob("replication_appliance-*.dist-info"))
    assert (meta / "INSTALLER").read_text().strip() == "mobility-agent-install"
    assert "../../../bin/mobility-agent,," in (meta / "RECORD").read_text()
    status = subprocess.run(["sh", str(control), "status", "--prefix", str(prefix)], capture_output=True, text=True)
    assert status.stdout.strip() == f"installed {APPLIANCE_VERSION} stopped"
    assert (prefix / "var" / "lib" / "mobility-agent").stat().st_mode & 0o077 == 0


# What the agent imports, run with the installed venv's own Python: every module of
# replication_appliance.agent, and an HTTP client built the way control_client builds it
# (httpx loads its transport, httpcore and h11, only then).
IMPORT_EVERY_AGENT_MODULE = """
import importlib, json, pkgutil, sys
import replication_appliance.agent as agent
names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, agent.__name__ + "."))
for name in names:
    importlib.import_module(name)
import httpx
httpx.Client(verify=False).close()
print(json.dumps({"modules": names, "paths": sorted({str(getattr(m, "__file__", "") or "") for m in sys.modules.values()})}))
"""


def test_every_agent_module_imports_in_the_installed_venv_without_the_dropped_wheels(installed):
    _script, prefix = installed
    venv = prefix / "opt" / "mobility-agent" / "current"
    # A clean environment, as over SSH: nothing from this checkout or its venv can stand in.
    result = subprocess.run([str(venv / "bin" / "python"), "-c", IMPORT_EVERY_AGENT_MODULE], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}, cwd=prefix,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert {"replication_appliance.agent.cli", "replication_appliance.agent.control_client",
            "replication_appliance.agent.link", "replication_appliance.agent.replicator"} <= set(loaded["modules"])
    site = next((venv / "lib").glob("python3*/site-packages")).resolve()
    third_party = {Path(p).resolve().relative_to(site).parts[0] for p in loaded["paths"]
                   if p and Path(p).resolve().is_relative_to(site)}
    assert {"replication_appliance", "cryptography", "httpx", "httpcore", "h11", "xxhash", "idna"} <= third_party
    # Not in the package (the agent never imports them): nothing was found for them elsewhere either.
    installed_dists = {wheels.canonical_name(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
    assert not installed_dists & {"zstandard", "pyyaml", "psutil", "pip"}, installed_dists
    assert not any(p.startswith(str(REPO_ROOT)) for p in loaded["paths"] if p)


def test_a_downgrade_is_refused_unless_forced(installed, tmp_path: Path):
    script, prefix = installed
    # A copy of the package that claims an older version.
    older = tmp_path / "older"
    shutil.copytree(script.parent, older)
    manifest = older / "manifest.json"
    manifest.write_text(manifest.read_text().replace(f'\n "version": "{APPLIANCE_VERSION}",', '\n "version": "0.0.1",'))
    refused = run(older / "install.sh", "install", prefix)
    assert refused.returncode == 4
    assert f"version {APPLIANCE_VERSION} is installed, newer than this package (0.0.1)" in refused.stderr
    assert (prefix / "opt" / "mobility-agent" / "current" / "INSTALLED").read_text().strip() == APPLIANCE_VERSION


def test_the_systemd_unit_verifies(installed, tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    script, prefix = installed
    unit = tmp_path / "mobility-agent.service"
    unit.write_text((script.parent / "mobility-agent.service").read_text().replace("@PREFIX@", str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # The check can fail: a unit whose command does not exist is reported.
    unit.write_text(unit.read_text().replace(str(prefix), str(tmp_path / "missing")))
    broken = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert broken.returncode != 0 and "not executable" in broken.stderr


def test_uninstall_keeps_the_registration_state(installed, tmp_path: Path):
    script, prefix = installed
    state = prefix / "var" / "lib" / "mobility-agent"
    (state / "agent.json").write_text('{"machine_id": "kept"}')
    result = run(script, "uninstall", prefix)
    assert result.returncode == 0 and "registration and state kept" in result.stdout
    assert not (prefix / "opt" / "mobility-agent").exists()
    assert (state / "agent.json").read_text() == '{"machine_id": "kept"}'


def demo_wheel(path: Path, extra: dict[str, str] | None = None) -> Path:
    """A small wheel with a package, a console script, a .data script and a .data file."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("demo/__init__.py", "def main():\n    print('demo says hi')\n    return 3\n")
        wheel.writestr("demo-1.0.data/scripts/demo-raw", "#!python\nimport demo\nraise SystemExit(demo.main())\n")
        wheel.writestr("demo-1.0.data/data/share/demo/readme.txt", "shared data\n")
        wheel.writestr("demo-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
        wheel.writestr("demo-1.0.dist-info/entry_points.txt", "[console_scripts]\ndemo-tool = demo:main\n")
        wheel.writestr("demo-1.0.dist-info/RECORD", "")
        for name, text in (extra or {}).items():
            wheel.writestr(name, text)
    return path


def install_wheels(venv: Path, *wheels: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-S", str(INSTALL_WHEELS), str(venv), *map(str, wheels)],
                          capture_output=True, text=True, timeout=120)


def test_install_wheels_follows_the_wheel_format(tmp_path: Path):
    venv = tmp_path / "venv"
    result = install_wheels(venv, demo_wheel(tmp_path / "demo-1.0-py3-none-any.whl"))
    assert result.returncode == 0, result.stderr
    assert (venv / "pyvenv.cfg").is_file() and not list(venv.glob("lib/python3*/site-packages/pip"))
    # The console script and the .data script run with the venv's Python and find the package.
    tool = subprocess.run([str(venv / "bin" / "demo-tool")], capture_output=True, text=True)
    assert (tool.returncode, tool.stdout) == (3, "demo says hi\n")
    raw = venv / "bin" / "demo-raw"
    assert raw.read_text().startswith(f"#!{venv / 'bin' / 'python'}\n")
    assert subprocess.run([str(raw)], capture_output=True, text=True).stdout == "demo says hi\n"
    assert (venv / "share" / "demo" / "readme.txt").read_text() == "shared data\n"
    record = next(venv.glob("lib/python3*/site-packages/demo-1.0.dist-info/RECORD")).read_text()
    assert "demo/__init__.py,," in record and "../../../bin/demo-tool,," in record


def test_install_wheels_refuses_a_member_outside_the_venv(tmp_path: Path):
    venv = tmp_path / "venv"
    evil = demo_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"../../escaped.txt": "x"})
    result = install_wheels(venv, evil)
    assert result.returncode == 1
    assert "'../../escaped.txt' would be written outside the venv" in result.stderr
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.rglob("escaped.txt"))
