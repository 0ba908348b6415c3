"""The PowerShell files that the roles run and the physical-server installer bundles.

No PowerShell is available here, so they are checked statically: they parse with a real
PowerShell grammar (tree-sitter-powershell), documented parameters (the bundle helper reads
the help block), the parameters the roles pass exist, secrets only come from the
environment, each reports changed/unchanged both under Ansible and standalone, and brackets
balance outside strings and comments."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.powershell import (
    declared_parameters,
    parse,
    strip_strings_and_comments,
    syntax_errors,
)
from tests.roles.conftest import (
    PLAYBOOK_DIR,
    REPO_ROOT,
    ROLES,
    ROLES_DIR,
    playbook_tasks,
    role_tasks,
)

SCRIPTS = sorted([*ROLES_DIR.glob("*/files/*.ps1"), *(PLAYBOOK_DIR / "files").glob("*.ps1")])
# The files the brief names: the installer bundle takes these.
SHARED_WITH_INSTALLER = {
    "tls/files/Set-Tls12.ps1", "dotnet/files/Install-DotNet.ps1", "mysql/files/Install-MySql.ps1",
    "firewall/files/Set-ApplianceFirewall.ps1", "appliance_disks/files/Initialize-ApplianceDisks.ps1",
    "appliance_software/files/Install-ApplianceSoftware.ps1", "windows_baseline/files/Set-NetworkFromOvfEnv.ps1",
}
APPROVED_VERBS = {"Get", "Set", "Install", "Initialize", "Test"}
SECRET_PARAM = re.compile(r"password|passwd|secret$|productkey|token", re.IGNORECASE)
# Run at boot by the first-boot scheduled task, not by a role.
BOOT_SCRIPTS = {"Set-NetworkFromOvfEnv.ps1", "Initialize-ApplianceIdentity.ps1"}
OVF_KEYS = {"ip", "prefix", "gateway", "dns", "hostname", "data_port", "admin_password"}


def help_block(text: str) -> str:
    assert text.startswith("<#"), "the help block must open the file"
    return text[:text.index("#>")]


def role_script_calls() -> list[tuple[str, dict[str, object]]]:
    """(script file name, parameters) of every win_powershell task that runs a script file."""
    calls = []
    tasks = [t for role in ROLES for t in role_tasks(role)]
    tasks += [t for p in PLAYBOOK_DIR.glob("*.yml") for t in playbook_tasks(p)]
    for task in tasks:
        body = task.data.get("ansible.windows.win_powershell")
        if body:
            match = re.search(r"'(?:files/)?([A-Za-z]+-[A-Za-z0-9]+\.ps1)'", str(body.get("script", "")))
            assert match, f"{task.name}: win_powershell must run a script file, not inline code"
            calls.append((match.group(1), body.get("parameters") or {}))
    return calls


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_parses_with_the_powershell_grammar(script: Path) -> None:
    root = parse(script.read_bytes())
    assert root.type == "program"
    assert not root.has_error, f"{script.name}: {syntax_errors(root)[:5]}"


def test_the_grammar_rejects_a_broken_script() -> None:
    """The parse check above can fail: an unclosed block and a dangling pipe are errors."""
    broken = b"param([int]$Port = 443)\nif ($Port -gt 0) {\n    Get-Item C:\\ |\n"
    assert parse(broken).has_error


def test_the_shared_scripts_exist() -> None:
    names = {str(p.relative_to(ROLES_DIR)) for p in SCRIPTS if ROLES_DIR in p.parents}
    assert SHARED_WITH_INSTALLER <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_name_is_verb_noun_with_an_approved_verb(script: Path) -> None:
    verb, _, noun = script.stem.partition("-")
    assert verb in APPROVED_VERBS and noun


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_documents_exactly_the_parameters(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    help_text = help_block(text)
    assert ".SYNOPSIS" in help_text and ".DESCRIPTION" in help_text and ".OUTPUTS" in help_text
    assert "[CmdletBinding()]" in text
    documented = set(re.findall(r"^\.PARAMETER\s+(\w+)", help_text, flags=re.MULTILINE))
    assert documented == set(declared_parameters(text)), script.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_secret_is_a_parameter(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    secret_params = [name for name in declared_parameters(text) if SECRET_PARAM.search(name)]
    assert not secret_params, f"{script.name}: secrets must come from the environment, not {secret_params}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_secrets_named_in_the_help_are_read_from_the_environment(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    names = re.findall(r"\b([A-Z][A-Z_]*(?:PASSWORD|KEY))\b", help_block(text))
    # A variable the script only sets is one it hands to a child script, not one it reads.
    handed_on = {name for name in names if f"$env:{name} = " in text}
    for name in set(names) - handed_on:
        # Directly, or through a helper that takes the variable's name.
        read = f"GetEnvironmentVariable('{name}')" in text or (
            re.search(rf"(Get|Read)-Secret '{name}'", text) and "GetEnvironmentVariable($EnvName)" in text)
        assert read, f"{script.name}: {name} is not read from the environment"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_reports_changed_under_ansible_and_standalone(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    assert "Get-Variable -Name Ansible -Scope Global -ErrorAction SilentlyContinue" in text
    assert re.search(r"\.Value\.Changed\s*=", text), "must set $Ansible.Changed"
    assert re.search(r"\[pscustomobject\]", text), "must write a result object when run standalone"
    assert "Set-StrictMode" in text and "$ErrorActionPreference = 'Stop'" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_brackets_balance_outside_strings_and_comments(script: Path) -> None:
    code = strip_strings_and_comments(script.read_text(encoding="utf-8"))
    for opening, closing in ("{}", "()", "[]"):
        assert code.count(opening) == code.count(closing), f"{script.name}: {opening}{closing} unbalanced"


def test_roles_pass_only_declared_parameters_and_every_mandatory_one() -> None:
    by_name = {p.name: declared_parameters(p.read_text(encoding="utf-8")) for p in SCRIPTS}
    calls = role_script_calls()
    assert {name for name, _ in calls} >= {p.name for p in SCRIPTS} - BOOT_SCRIPTS
    for name, parameters in calls:
        declared = by_name[name]
        assert set(parameters) <= set(declared), f"{name}: unknown parameters {sorted(set(parameters) - set(declared))}"
        mandatory = {p for p, required in declared.items() if required}
        assert mandatory <= set(parameters), f"{name}: mandatory parameters not passed {sorted(mandatory - set(parameters))}"


def test_first_boot_task_passes_declared_parameters() -> None:
    script = ROLES_DIR / "windows_baseline" / "files" / "Set-NetworkFromOvfEnv.ps1"
    declared = declared_parameters(script.read_text(encoding="utf-8"))
    task = next(t for t in role_tasks("windows_baseline") if "community.windows.win_scheduled_task" in t.data)
    arguments = task.data["community.windows.win_scheduled_task"]["actions"][0]["arguments"]
    passed = set(re.findall(r"(?:^|\s)-([A-Z][A-Za-z]+)\b", arguments)) - {"NoProfile", "NonInteractive", "ExecutionPolicy", "File"}
    assert passed and passed <= set(declared)


def test_first_boot_script_reads_exactly_the_agreed_ovf_properties() -> None:
    text = (ROLES_DIR / "windows_baseline" / "files" / "Set-NetworkFromOvfEnv.ps1").read_text(encoding="utf-8")
    used = set(re.findall(r"\$(?:Props|props)\.([a-z_]+)\b(?!\()", text)) | set(re.findall(r"ContainsKey\('(\w+)'\)", text))
    assert used == OVF_KEYS
    documented = set(re.findall(r"appliance\.(\w+)\s{2,}", help_block(text)))
    assert documented == OVF_KEYS
    assert "guestinfo.ovfEnv" in text and "StartsWith('appliance.')" in text


def test_first_boot_runs_the_identity_script_with_declared_parameters() -> None:
    network = (ROLES_DIR / "windows_baseline" / "files" / "Set-NetworkFromOvfEnv.ps1").read_text(encoding="utf-8")
    identity = (ROLES_DIR / "appliance_software" / "files" / "Initialize-ApplianceIdentity.ps1").read_text(encoding="utf-8")
    call = re.search(r"& \$identityScript (.*)", network)
    assert call and "'Initialize-ApplianceIdentity.ps1'" in network
    passed = set(re.findall(r"-([A-Z][A-Za-z]+)\b", call.group(1)))
    assert passed and passed <= set(declared_parameters(identity))
    # Not while a rename restart is pending: the certificates must carry the final name.
    assert "if (-not $RestartPending -and (Test-Path $identityScript))" in network


def test_the_admin_password_from_the_ovf_environment_is_never_kept_or_shown() -> None:
    text = (ROLES_DIR / "windows_baseline" / "files" / "Set-NetworkFromOvfEnv.ps1").read_text(encoding="utf-8")
    # The state file keeps a SHA-256 of the properties, not the properties.
    assert re.search(r"@\{ fingerprint = \$fingerprint; applied = ", text)
    assert "SHA256" in text
    # The result leaves it out, and no log line carries it.
    assert "if ($key -ne 'admin_password')" in text
    for line in re.findall(r"Write-Log (.*)", text):
        assert "admin_password" not in line.replace("appliance.admin_password must", "") or "$(" not in line
        assert "$props.admin_password" not in line and "$password" not in line
    assert "Remove-Item Env:\\APPLIANCE_ADMIN_PASSWORD" in text


def test_the_ovf_environment_the_deployer_writes_is_the_one_the_script_reads() -> None:
    """The deployer's own OVF environment document (appliance_build.deploy.ovfenv) read with the
    namespace, element path and attribute names the first-boot script uses."""
    import xml.etree.ElementTree as ET

    from appliance_build.deploy.ovfenv import ovf_environment
    from appliance_build.ova.descriptor import ParsedDescriptor, ParsedProperty

    text = (ROLES_DIR / "windows_baseline" / "files" / "Set-NetworkFromOvfEnv.ps1").read_text(encoding="utf-8")
    namespace = re.search(r"AddNamespace\('oe', '([^']+)'\)", text).group(1)
    path = re.search(r"SelectNodes\('//(oe:PropertySection/oe:Property)'", text).group(1)
    attributes = re.findall(r"GetAttribute\('(\w+)', '([^']+)'\)", text)
    assert {name for name, _ in attributes} == {"key", "value"} and {ns for _, ns in attributes} == {namespace}
    wanted = {"ip": "10.20.0.7", "prefix": "22", "gateway": "10.20.0.1", "dns": "10.20.0.2,10.20.0.3",
              "hostname": "asr-east", "data_port": "9444", "admin_password": "Secret-Pass-123"}
    properties = tuple(ParsedProperty(f"appliance.{key}", "string", "", True, key == "admin_password") for key in wanted)
    descriptor = ParsedDescriptor(name="replication-appliance", files=(), disks=(), networks=("VM Network",), items=(),
                                  guest_type=None, transport="com.vmware.guestInfo", properties=properties)
    document = ovf_environment(descriptor, {f"appliance.{k}": v for k, v in wanted.items()}, "VMware vCenter Server 8.0")
    root = ET.fromstring(document)
    found = {}
    for node in root.iterfind(".//" + path, {"oe": namespace}):
        key, value = node.get(f"{{{namespace}}}key"), node.get(f"{{{namespace}}}value")
        if key.startswith("appliance.") and value:
            found[key[len("appliance."):]] = value
    assert found == wanted
    assert set(found) == OVF_KEYS


# Where keys and passwords are kept on Windows, the folder's variable, and the first command
# that puts one there (None: the folder is restricted as it is created, in one function).
KEY_FOLDERS = [
    (ROLES_DIR / "appliance_software/files/Install-ApplianceSoftware.ps1", "$DataDir", "'init', '--data-dir'"),
    (ROLES_DIR / "mysql/files/Install-MySql.ps1", "$SecretsDir", None),
    (REPO_ROOT / "installer/agent/windows/Install-MobilityAgent.ps1", "$state", "mobility_agent_service.py') --startup"),
]
# SYSTEM and Administrators by SID (names differ on a localised Windows), nothing inherited,
# and a failure stops the script rather than leaving the folder open
RESTRICT = re.compile(r"&\s*icacls\.exe\s+(\$\w+)\s+/inheritance:r\s+/grant:r\s+'\*S-1-5-18:\(OI\)\(CI\)F'\s+"
                      r"'\*S-1-5-32-544:\(OI\)\(CI\)F'\s*\|\s*Out-Null\s*\n\s*if \(\$LASTEXITCODE -ne 0\) \{ (?:throw|Write-Error)")


@pytest.mark.parametrize(("script", "folder", "first_write"), KEY_FOLDERS, ids=lambda v: getattr(v, "name", None))
def test_folders_holding_keys_are_closed_to_other_users_before_a_key_is_written(script, folder, first_write):
    text = script.read_text(encoding="utf-8")
    restrict = RESTRICT.search(text)
    assert restrict, f"{script.name}: no icacls restricting a folder to SYSTEM and Administrators by SID, exit code checked"
    restricted_at = restrict.start()
    if restrict.group(1) != folder:  # done by a function of the script: where it is called on the folder
        function = re.findall(r"^function ([\w-]+)\(\[string\]" + re.escape(restrict.group(1)) + r"\)", text[:restricted_at], re.M)
        assert function, f"{script.name}: icacls restricts {restrict.group(1)}, not {folder}"
        call = re.search(rf"^{re.escape(function[-1])} {re.escape(folder)}\b", text, re.M)
        assert call, f"{script.name}: {function[-1]} is never called on {folder}"
        restricted_at = call.start()
    if first_write is not None:
        assert restricted_at < text.index(first_write), f"{script.name}: {folder} is restricted only after a key is written"
