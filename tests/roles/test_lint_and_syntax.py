"""ansible-lint (production profile), yamllint and --syntax-check pass for the Ansible content,
run from the venv, offline; requirements.yml matches the collections the venv ships; the
Molecule scenario parses and points at the real playbooks."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.roles.conftest import (
    PLAYBOOK_DIR,
    REPO_ROOT,
    ROLES_DIR,
    VENV_BIN,
    load_yaml,
    run_tool,
    tool_env,
)

PLAYBOOKS = sorted(PLAYBOOK_DIR.glob("*.yml"))
OWN_YAML = ["roles", "playbooks", "molecule", "docs/traceability.yml", "requirements.yml", ".ansible-lint", ".yamllint"]


def test_the_three_playbooks_exist() -> None:
    assert {p.name for p in PLAYBOOKS} == {"appliance.yml", "prereqs.yml", "upgrade.yml"}


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_syntax_check(playbook: Path, tmp_path: Path) -> None:
    result = run_tool([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory/local",
                       str(playbook.relative_to(REPO_ROOT))], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_config_hides_nothing() -> None:
    config = load_yaml(REPO_ROOT / ".ansible-lint")
    assert config["profile"] == "production"
    assert config["offline"] is True
    for key in ("skip_list", "warn_list", "enable_list_skip", "mock_modules", "mock_roles"):
        assert key not in config, f".ansible-lint must not use {key}"
    for excluded in config["exclude_paths"]:
        assert not excluded.startswith(("roles", "playbooks", "molecule")), excluded
    noqa = [str(p) for p in [*ROLES_DIR.rglob("*.yml"), *PLAYBOOK_DIR.rglob("*.yml")] if "noqa" in p.read_text()]
    assert not noqa, f"noqa comments hide findings in {noqa}"


def test_ansible_lint_production_profile_passes(tmp_path: Path) -> None:
    result = run_tool([str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor"], tmp_path,
                      timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "Profile 'production' was required, and it passed" in result.stderr + result.stdout


def test_yamllint_passes_on_the_ansible_content(tmp_path: Path) -> None:
    result = run_tool([str(VENV_BIN / "yamllint"), "--strict", *OWN_YAML], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_requirements_name_every_collection_used_at_the_installed_version(tmp_path: Path) -> None:
    listed = run_tool([str(VENV_BIN / "ansible-galaxy"), "collection", "list", "--format", "json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    installed: dict[str, str] = {}
    for collections in json.loads(listed.stdout).values():
        for name, info in collections.items():
            installed.setdefault(name, info["version"])
    required = {c["name"]: c["version"] for c in load_yaml(REPO_ROOT / "requirements.yml")["collections"]}
    for name, version in required.items():
        assert installed.get(name) == version, f"{name}: requirements.yml {version}, venv {installed.get(name)}"
    text = "\n".join(p.read_text() for p in [*ROLES_DIR.rglob("*.yml"), *PLAYBOOK_DIR.rglob("*.yml")])
    used = {m for m in re.findall(r"\b([a-z_]+\.[a-z_]+)\.[a-z_]+:", text) if m != "ansible.builtin"}
    assert used == set(required), f"collections used {sorted(used)}, required {sorted(required)}"


def test_molecule_scenario_points_at_the_real_playbooks() -> None:
    scenario = REPO_ROOT / "molecule" / "default"
    config = load_yaml(scenario / "molecule.yml")
    assert config["driver"]["name"] == "default" and config["driver"]["options"]["managed"] is False
    playbooks = config["provisioner"]["playbooks"]
    assert (scenario / playbooks["converge"]).resolve() == PLAYBOOK_DIR / "appliance.yml"
    assert (scenario / playbooks["verify"]).resolve() == PLAYBOOK_DIR / "prereqs.yml"
    for link in config["provisioner"]["inventory"]["links"].values():
        assert (scenario / link).exists(), link
    assert {"converge", "idempotence", "verify"} <= set(config["scenario"]["test_sequence"])
    hosts = load_yaml(scenario / "inventory" / "hosts.yml")["all"]["hosts"]["appliance"]
    assert hosts["ansible_connection"] == "winrm"
    for key, env in (("ansible_host", "MOLECULE_WINDOWS_HOST"), ("ansible_password", "MOLECULE_WINDOWS_PASSWORD"),
                     ("ansible_user", "MOLECULE_WINDOWS_USER")):
        assert env in hosts[key], f"{key} must come from {env}"


def test_molecule_syntax_runs_offline(tmp_path: Path) -> None:
    result = run_tool([str(VENV_BIN / "molecule"), "syntax", "-s", "default"], tmp_path, timeout=300,
                      extra_env={"MOLECULE_WINDOWS_HOST": "192.0.2.10", "MOLECULE_WINDOWS_PASSWORD": "unused",
                                 "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "playbooks/appliance.yml" in result.stdout + result.stderr


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbook_finds_its_roles_from_any_directory_without_ansible_cfg(playbook: Path, tmp_path: Path) -> None:
    """Packer runs ansible-playbook beside its template (build/<inventory>/packer), where the
    repository's ansible.cfg is not read: the roles must still be found (playbooks/roles)."""
    env = tool_env(tmp_path)
    for key in ("ANSIBLE_CONFIG", "ANSIBLE_ROLES_PATH"):
        env.pop(key)
    result = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", str(playbook)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
