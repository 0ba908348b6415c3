"""Role argument specs are checked by Ansible itself before any task runs: with the inventory's
settings every role validates, and a bad setting stops the play with a message that names it.
Only the validation (tagged `always`) runs, on this machine; no Windows task is reached."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.roles.conftest import REPO_ROOT, ROLES, VENV_BIN, run_tool

INVENTORY_VARS = REPO_ROOT / "inventory" / "local" / "group_vars" / "all.yml"


def validate_roles(tmp_path: Path, *extra_vars: str) -> tuple[int, str]:
    playbook = [{"name": "Validate the role arguments", "hosts": "localhost", "connection": "local",
                 "gather_facts": False, "roles": [{"role": role} for role in ROLES]}]
    path = tmp_path / "validate.yml"
    path.write_text(yaml.safe_dump(playbook), encoding="utf-8")
    args = [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(path), "-e", f"@{INVENTORY_VARS}",
            "--tags", "argument-validation-only"]
    for extra in extra_vars:
        args += ["-e", extra]
    result = run_tool(args, tmp_path)
    return result.returncode, result.stdout + result.stderr


def test_every_role_validates_with_the_inventory_settings(tmp_path: Path) -> None:
    code, output = validate_roles(tmp_path)
    assert code == 0, output
    assert output.count("Validating arguments against arg spec") == len(ROLES)


def test_an_unknown_cloud_is_refused_with_the_allowed_values(tmp_path: Path) -> None:
    settings = json.dumps({"appliance": {"cloud": "moon", "mysql_version": "8.0.40"}})
    code, output = validate_roles(tmp_path, settings)
    assert code != 0
    assert "_cloud must be one of: public, government, got: moon" in output


def test_a_port_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    code, output = validate_roles(tmp_path, json.dumps({"ports": {"control": 443, "data": "ninety"}}))
    assert code != 0
    assert "appliance_software_data_port" in output and "cannot be converted to an int" in output


def test_a_wrong_allocation_unit_is_refused(tmp_path: Path) -> None:
    code, output = validate_roles(tmp_path, "appliance_disks_allocation_unit=1000")
    assert code != 0
    assert "appliance_disks_allocation_unit must be one of" in output


def test_a_secret_given_on_validation_is_not_echoed(tmp_path: Path) -> None:
    secret = "NOT-SHOWN-7Q2X"
    code, output = validate_roles(tmp_path, f"mysql_root_password={secret}", "mysql_port=not-a-port")
    assert code != 0 and "mysql_port" in output
    assert secret not in output


def test_the_playbooks_wire_the_roles_together_and_validate(tmp_path: Path) -> None:
    """appliance.yml maps one role's settings onto another's (data dir on the cache volume,
    database URL from the mysql role...): every such value must resolve and validate."""
    for playbook, roles in (("appliance.yml", len(ROLES)), ("upgrade.yml", 1)):
        result = run_tool([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", f"playbooks/{playbook}",
                           "-e", f"@{INVENTORY_VARS}", "-e", "ansible_connection=local",
                           "--tags", "argument-validation-only"], tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert output.count("Validating arguments against arg spec") == roles, playbook
