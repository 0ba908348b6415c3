"""The Invoke tasks' wiring: options reach the build package; failures become clean exits."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from invoke import Config, Context, Exit, MockContext, Result

import tasks
from appliance_build.errors import SettingsError


def test_every_task_is_listed_with_a_description(repo_root):
    listing = subprocess.run([shutil.which("invoke"), "--list"], cwd=repo_root, capture_output=True, text=True,
                             check=True).stdout
    for name in ("render", "validate", "build-ova", "assemble-ova", "verify-ova", "test", "deploy", "bundle",
                 "agent-packages"):
        line = next((l for l in listing.splitlines() if l.strip().startswith(name + " ")), None)
        assert line is not None and len(line.split(None, 1)) == 2, f"{name} has no description in invoke --list"


def test_every_option_has_help():
    for task in tasks.ns.tasks.values():
        params = [a for a in task.get_arguments()]
        for arg in params:
            assert arg.help, f"{task.name} --{arg.name} has no help text"


def test_test_task_fails_when_pytest_ran_nothing():
    c = MockContext(run={"python -m pytest": Result(exited=5)})
    with pytest.raises(Exit) as caught:
        tasks.test(c)
    assert caught.value.code == 5
    c = MockContext(run={"python -m pytest -k ova -x": Result(exited=0)})
    tasks.test(c, k="ova", x=True)


def test_render_uses_the_configured_inventory_and_the_flag(monkeypatch):
    from appliance_build import render

    calls = []
    monkeypatch.setattr(render, "render_inventory", lambda inv: calls.append(inv) or f"build/{inv}")
    tasks.render(Context(config=Config(overrides={"appliance": {"inventory": "local"}})))
    tasks.render(MockContext(), inventory="vsphere")
    assert calls == ["local", "vsphere"]


def test_a_build_error_becomes_a_clean_exit(monkeypatch):
    from appliance_build import build

    def fail(inventory, iso=None, force=False):
        raise SettingsError("vm.cpus = 0: must be a whole number from 8 to 128")

    monkeypatch.setattr(build, "build_ova", fail)
    with pytest.raises(Exit) as caught:
        tasks.build_ova(MockContext(), inventory="local")
    assert caught.value.code == 1
    assert "vm.cpus = 0" in str(caught.value.message)


def test_build_ova_passes_its_options(monkeypatch):
    from appliance_build import build

    seen = {}
    monkeypatch.setattr(build, "build_ova", lambda inventory, iso=None, force=False: seen.update(
        inventory=inventory, iso=iso, force=force) or "dist/x.ova")
    tasks.build_ova(MockContext(), inventory="vsphere", iso="/isos/ws2016.iso", force=True)
    assert seen == {"inventory": "vsphere", "iso": "/isos/ws2016.iso", "force": True}


def test_assemble_splits_the_disk_list(monkeypatch):
    from appliance_build.ova import assemble

    seen = {}
    monkeypatch.setattr(assemble, "assemble_from_inventory",
                        lambda inv, disks, out: seen.update(inv=inv, disks=disks, out=out) or out)
    tasks.assemble_ova(MockContext(), disks="a.vmdk,b.vmdk,c.vmdk", out="dist/x.ova")
    assert seen == {"inv": "local", "disks": ["a.vmdk", "b.vmdk", "c.vmdk"], "out": "dist/x.ova"}
