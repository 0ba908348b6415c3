"""The installer's own scripts, checked statically: no PowerShell (and no Windows) is available
here, so none of these PowerShell files is executed by the tests. install.sh is executed for
real by the push-install tests (tests/appliance/push_install)."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from replication_appliance.requirements import requirement_rows

from appliance_build.version import REPO_ROOT
from tests.fixtures.powershell import (
    declared_parameters,
    param_block,
    parse,
    strip_strings_and_comments,
    syntax_errors,
)

INSTALLER = REPO_ROOT / "installer"
POWERSHELL = sorted(INSTALLER.rglob("*.ps1"))
SECRET_PARAM = re.compile(r"password|passwd|secret|passphrase|token|key$", re.IGNORECASE)


def script(name: str) -> str:
    return next(p for p in POWERSHELL if p.name == name).read_text(encoding="utf-8")


def role_script(name: str) -> str:
    (path,) = REPO_ROOT.glob(f"roles/*/files/{name}")
    return path.read_text(encoding="utf-8")


def test_the_installer_scripts_exist():
    assert {p.name for p in POWERSHELL} == {"Install-ReplicationAppliance.ps1", "Test-AppliancePrerequisites.ps1",
                                            "Install-PythonRuntime.ps1", "Install-MobilityAgent.ps1"}


def powershell_syntax_errors(source: bytes) -> list[str]:
    """Errors of the tree-sitter PowerShell grammar: a parse, not an execution."""
    root = parse(source)
    return syntax_errors(root) if root.has_error else []


@pytest.mark.parametrize("path", POWERSHELL, ids=lambda p: p.name)
def test_powershell_parses_with_the_grammar(path: Path):
    assert powershell_syntax_errors(path.read_bytes()) == []


@pytest.mark.parametrize("path", POWERSHELL, ids=lambda p: p.name)
def test_powershell_brackets_balance_outside_strings_and_comments(path: Path):
    code = strip_strings_and_comments(path.read_text(encoding="utf-8"))
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for index, char in enumerate(code):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack[-1] == pairs[char], f"unbalanced {char!r} near: {code[max(0, index - 80):index + 1]!r}"
            stack.pop()
    assert not stack, f"unclosed {stack}"


@pytest.mark.parametrize("path", POWERSHELL, ids=lambda p: p.name)
def test_powershell_has_help_a_param_block_and_strict_errors(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<#") and ".SYNOPSIS" in text[:text.index("#>")]
    assert "[CmdletBinding()]" in text and param_block(text)
    assert "$ErrorActionPreference = 'Stop'" in text and "Set-StrictMode -Version" in text


@pytest.mark.parametrize("path", POWERSHELL, ids=lambda p: p.name)
def test_no_secret_is_a_parameter_or_on_a_command_line(path: Path):
    text = path.read_text(encoding="utf-8")
    params = [name for name in declared_parameters(text) if name != "env"]
    assert not [p for p in params if SECRET_PARAM.search(p)], params
    code = strip_strings_and_comments(text)
    assert "ConvertTo-SecureString" not in code and "-AsPlainText" not in code
    assert "Start-Transcript" not in code  # a transcript would record whatever the steps print


def setup_step_calls(text: str) -> list[tuple[str, str]]:
    """(script, the text of its -Arguments @{...} hashtable or '') for each Invoke-SetupStep."""
    calls = []
    for match in re.finditer(r"Invoke-SetupStep -Script '([^']+)'( -Arguments @\{)?", text):
        arguments = ""
        if match.group(2):
            depth, index = 1, match.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(text[index], 0)
                index += 1
            arguments = text[match.end():index - 1]
        calls.append((match.group(1), arguments))
    return calls


def test_the_installer_passes_only_declared_parameters_to_the_roles_scripts():
    """Each `Invoke-SetupStep -Script X -Arguments @{...}` names parameters X declares, and every
    mandatory one."""
    text = script("Install-ReplicationAppliance.ps1")
    calls = setup_step_calls(text[text.index("# --- main"):])
    called = {name for name, _ in calls}
    assert {"Set-Tls12.ps1", "Install-DotNet.ps1", "Set-ApplianceFirewall.ps1", "Install-MySql.ps1",
            "Install-ApplianceSoftware.ps1", "Initialize-ApplianceDisks.ps1"} <= called
    for name, arguments in calls:
        declared = declared_parameters(role_script(name))
        passed = set(re.findall(r"(?:^|[;{\s])([A-Z][A-Za-z0-9]*)\s*=", arguments))
        assert passed <= set(declared), f"{name}: passes {sorted(passed - set(declared))}, not declared there"
        missing = {p for p, mandatory in declared.items() if mandatory} - passed
        assert not missing, f"{name}: mandatory {sorted(missing)} not passed"


def test_the_prerequisite_checker_checks_seed_rows_only():
    ids = set(re.findall(r"New-Check -Id '([a-z0-9_.]+)'", script("Test-AppliancePrerequisites.ps1")))
    ids |= set(re.findall(r"Id = '([a-z0-9_.]+)'", script("Test-AppliancePrerequisites.ps1")))
    seed_ids = {row["id"] for row in requirement_rows()}
    assert ids <= seed_ids, sorted(ids - seed_ids)
    # The rows a physical server can be checked for before anything is installed.
    assert {"hw.cpu", "hw.ram", "hw.disks", "hw.cache_free", "hw.retention_free", "sw.os", "sw.locale", "sw.tls12",
            "sw.dotnet", "sw.role_adds", "sw.role_iis", "sw.role_hyperv", "gpo.cmd", "gpo.regedit",
            "gpo.attachments", "gpo.scripts", "iis.port443", "net.port_data", "net.static_ip", "time.sync"} <= ids


def test_the_python_runtime_is_checked_against_its_pinned_digest():
    text = script("Install-PythonRuntime.ps1")
    code = strip_strings_and_comments(text)
    # Hash check before the installer runs, whichever of the three ways the file came.
    assert code.index("Get-FileHash") < code.index("Start-Process")
    assert "[ValidatePattern('^[0-9a-f]{64}$')]" in text


def test_the_installer_refuses_a_downgrade_unless_forced_and_is_idempotent():
    text = script("Install-ReplicationAppliance.ps1")
    assert re.search(r"\$installed -gt \$bundleVersion -and -not \$Force\)\s*\{\s*\n\s*Stop-Install", text)
    assert re.search(r"\$installed -eq \$bundleVersion -and -not \$Force\)\s*\{[^}]*nothing to do[^}]*exit 0", text)
    code = strip_strings_and_comments(text)
    # The prerequisites are checked (and can stop the run) before any setup step changes the machine.
    assert code.index("Test-BundleIntegrity -Manifest") < code.index("Test-AppliancePrerequisites.ps1") \
        if "Test-AppliancePrerequisites.ps1" in code else True
    assert text.index("prerequisites not met") < text.index("Invoke-SetupStep -Script 'Set-Tls12.ps1'")


@pytest.mark.parametrize("shell", ["sh", "bash", "dash"])
def test_install_sh_parses(shell: str):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    result = subprocess.run([shell, "-n", str(INSTALLER / "agent" / "linux" / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_install_sh_rejects_unknown_options_and_actions(tmp_path: Path):
    sh = INSTALLER / "agent" / "linux" / "install.sh"
    bad_option = subprocess.run(["sh", str(sh), "check", "--prefx", "/x"], capture_output=True, text=True)
    assert bad_option.returncode == 2 and "unknown option --prefx" in bad_option.stderr
    bad_action = subprocess.run(["sh", str(sh), "frobnicate"], capture_output=True, text=True)
    assert bad_action.returncode == 2 and "usage: install.sh" in bad_action.stderr


def test_windows_service_host_is_valid_python():
    source = (INSTALLER / "agent" / "windows" / "mobility_agent_service.py").read_text()
    tree = ast.parse(source)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes and {"SvcDoRun", "SvcStop"} <= {f.name for f in classes[0].body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("caller", ["Install-ReplicationAppliance.ps1", "Install-MobilityAgent.ps1"])
def test_callers_of_the_python_runtime_step_pass_its_declared_parameters(caller: str):
    text = script(caller)
    start = text.index("'Install-PythonRuntime.ps1')")
    statement = re.split(r"(?<!`)\n", text[start:], maxsplit=1)[0]
    while statement.rstrip().endswith("`"):  # continued lines
        start += len(statement) + 1
        statement += "\n" + re.split(r"(?<!`)\n", text[start:], maxsplit=1)[0]
    passed = set(re.findall(r"\s-([A-Z][A-Za-z]+)\b", statement))
    declared = declared_parameters(script("Install-PythonRuntime.ps1"))
    assert passed <= set(declared), sorted(passed - set(declared))
    assert {p for p, mandatory in declared.items() if mandatory} <= passed


def test_the_installer_passes_only_declared_parameters_to_the_checker():
    call = re.search(r"'Test-AppliancePrerequisites.ps1'\) (.*)$", script("Install-ReplicationAppliance.ps1"), re.MULTILINE)
    passed = set(re.findall(r"-([A-Z][A-Za-z]+)\b", call.group(1)))
    assert passed and passed <= set(declared_parameters(script("Test-AppliancePrerequisites.ps1")))
