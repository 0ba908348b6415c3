"""Install-ApplianceSoftware.ps1 drives the appliance's own CLI on Windows; the subcommands,
options and secret environment variables it uses must be the ones the real CLI (installed
editable in the venv) accepts, so a change on either side breaks this test and not a build."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.roles.conftest import ROLES_DIR, VENV_BIN

SCRIPT = (ROLES_DIR / "appliance_software" / "files" / "Install-ApplianceSoftware.ps1").read_text(encoding="utf-8")


def cli_help(*command: str) -> str:
    result = subprocess.run([str(VENV_BIN / "appliance"), *command, "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def invoked(subcommand: str) -> list[str]:
    """The argument list the script passes to appliance.exe for a subcommand."""
    match = re.search(r"Invoke-Checked \$applianceExe @\('" + subcommand + r"'(.*?)\)", SCRIPT, flags=re.DOTALL)
    assert match, f"the script does not run appliance {subcommand}"
    return re.findall(r"'(--[a-z-]+)'", match.group(1))


@pytest.mark.parametrize("subcommand", ["init", "db"])
def test_options_passed_exist(subcommand: str) -> None:
    options = invoked(subcommand)
    assert "--data-dir" in options
    help_text = cli_help(subcommand)
    for option in options:
        assert re.search(rf"\s{re.escape(option)}\b", help_text), f"appliance {subcommand} has no {option}"


def test_service_runs_serve_with_options_it_accepts() -> None:
    arguments = re.search(r'\$arguments = "serve (.*)"', SCRIPT)
    assert arguments
    options = re.findall(r"(--[a-z-]+)", arguments.group(1))
    assert set(options) == {"--data-dir", "--bind", "--control-port", "--data-port"}
    help_text = cli_help("serve")
    for option in options:
        assert option in help_text


def test_upgrade_uses_the_migration_command() -> None:
    assert "'db', 'upgrade'" in SCRIPT
    assert "{upgrade}" in cli_help("db")


def test_secrets_reach_init_through_the_variables_the_cli_reads() -> None:
    help_text = cli_help("init")
    for variable in ("APPLIANCE_DB_PASSWORD", "APPLIANCE_ADMIN_PASSWORD"):
        assert variable in help_text, f"appliance init no longer reads {variable}"
        assert f"GetEnvironmentVariable('{variable}')" in SCRIPT
    init_args = invoked("init")
    assert not {"--db-password-file", "--admin-password-file"} & set(init_args)
    assert not re.search(r"mysql\+pymysql://[^@'\"]*:[^@'\"]*@", SCRIPT), "no password inside a database URL"


IDENTITY = (ROLES_DIR / "appliance_software" / "files" / "Initialize-ApplianceIdentity.ps1").read_text(encoding="utf-8")


def test_first_boot_init_passes_options_the_cli_accepts() -> None:
    call = re.search(r"Invoke-ApplianceInit \(\[string\]\$record\.appliance_exe\) @\('init'(.*?)\)\n", IDENTITY, flags=re.DOTALL)
    assert call, "the first-boot script does not run appliance init"
    options = re.findall(r"'(--[a-z-]+)'", call.group(1))
    assert set(options) == set(invoked("init")), "first boot and first install must initialise alike"
    help_text = cli_help("init")
    for option in options:
        assert re.search(rf"\s{re.escape(option)}\b", help_text)


def test_first_boot_reads_only_what_the_install_record_holds() -> None:
    record = re.search(r"\$record = \[ordered\]@\{(.*?)\} \| ConvertTo-Json", SCRIPT, flags=re.DOTALL)
    assert record
    written = set(re.findall(r"(\w+) = ", record.group(1)))
    read = set(re.findall(r"\$record\.([a-z_]+)\b", IDENTITY))
    assert read and read <= written, f"install.json lacks {sorted(read - written)}"
    assert "initialise_at_first_boot" in written
