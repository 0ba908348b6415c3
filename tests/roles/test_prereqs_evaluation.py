"""The judging half of playbooks/prereqs.yml, run for real by ansible-playbook on this machine.

Collecting the facts needs Windows (Get-ApplianceFacts.ps1, Test-ApplianceUrls.ps1), so the
facts here are a recorded-shape fake of a Windows machine; everything after that (the rules,
the table, the failure) is the playbook's own code: playbooks/tasks/prereqs_evaluate.yml with
playbooks/vars/prereqs_rules.yml and the seed."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles.conftest import PLAYBOOK_DIR, SEED_FILE, VENV_BIN, load_yaml, run_tool

COMPLIANT_MACHINE: dict[str, Any] = {
    "manufacturer": "VMware, Inc.", "is_vmware": True, "cpu_cores": 8, "ram_gb": 15.9,
    "os_caption": "Microsoft Windows Server 2016 Datacenter Evaluation", "os_version": "10.0.14393",
    "disk_count": 3, "cache_free_gb": 599.8, "cache_where": "P: (ApplianceCache)",
    "retention_free_gb": 599.8, "retention_where": "R: (ApplianceRetention)",
    "licence_status": 1, "licence_days_left": 170, "licence_evaluation": True,
    "system_locale": "en-US", "tls12_enabled": True, "strong_crypto": True, "dotnet_release": 394802,
    "mysql_service": "MySQL (Running)", "mysql_offline_installer": "", "other_apps": [],
    "features": {"AD-Domain-Services": False, "Web-Server": False, "Hyper-V": False, "Web-CGI": False},
    "policies_enabled": [], "iis_default_site": False, "iis_anonymous_auth": None,
    "control_port_foreign": [], "data_port_foreign": [], "control_port_open": True, "data_port_open": True,
    "nic_types": ["vmxnet3 Ethernet Adapter"], "static_ip": True, "ip_addresses": ["10.0.0.5/24"],
    "powercli_version": "12.7.0", "ntp_server": "time.windows.com,0x9",
}


def url_results(cloud: str, unreachable: set[str] = frozenset()) -> list[dict[str, Any]]:
    """What Test-ApplianceUrls.ps1 returns for the seed's allow-list of a cloud."""
    seed = load_yaml(SEED_FILE)
    return [{"pattern": u["pattern"], "probe": u["probe"], "port": u.get("port", 443),
             "protocol": u.get("protocol", "tcp"), "optional": bool(u.get("optional", False)),
             "reachable": u["probe"] not in unreachable,
             "detail": "no connection within 5 s" if u["probe"] in unreachable else "connected"}
            for u in seed["urls"][cloud]]


def run_prereqs(tmp_path: Path, facts: dict[str, Any], urls: list[dict[str, Any]], **overrides: Any
                ) -> tuple[int, dict[str, str], list[str], str]:
    """Runs the evaluation; returns exit code, {row id: status}, the printed table, the failure message."""
    play_vars = load_yaml(PLAYBOOK_DIR / "prereqs.yml")[0]["vars"]
    play_vars.update({"prereqs_cloud": "public", **overrides})
    playbook = [{
        "name": "Judge recorded facts with the prereqs rules",
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(PLAYBOOK_DIR / "vars" / "prereqs_rules.yml")],
        "vars": play_vars,
        "tasks": [
            {"name": "Load the seed", "ansible.builtin.include_vars": {"file": str(SEED_FILE), "name": "prereqs_seed"}},
            {"name": "Recorded facts", "ansible.builtin.set_fact": {
                "prereqs_facts_run": {"result": facts}, "prereqs_urls_run": {"result": {"urls": urls}}}},
            {"name": "Evaluate", "ansible.builtin.include_tasks": str(PLAYBOOK_DIR / "tasks" / "prereqs_evaluate.yml")},
        ],
    }]
    path = tmp_path / "judge.yml"
    path.write_text(yaml.safe_dump(playbook), encoding="utf-8")
    result = run_tool([str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", str(path)], tmp_path,
                      extra_env={"ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json", "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"})
    report = json.loads(result.stdout)
    tasks = {t["task"]["name"]: t["hosts"].get("localhost", {}) for t in report["plays"][0]["tasks"]}
    table_rows = tasks["Evaluate every requirement row"]["ansible_facts"]["prereqs_table"] \
        if "ansible_facts" in tasks["Evaluate every requirement row"] else \
        tasks["Evaluate every requirement row"]["results"][-1]["ansible_facts"]["prereqs_table"]
    statuses = {row["id"]: row["status"] for row in table_rows}
    printed = tasks["Print the requirement table"]["msg"]
    failure = tasks.get("Fail when a requirement row fails", {}).get("msg", "")
    return result.returncode, statuses, printed, failure


def test_a_compliant_appliance_passes_every_row(tmp_path: Path, seed: dict[str, Any]) -> None:
    code, statuses, printed, failure = run_prereqs(tmp_path, COMPLIANT_MACHINE, url_results("public"))
    assert code == 0, failure
    assert set(statuses) == {row["id"] for row in seed["requirements"]}
    assert {s for s in statuses.values()} <= {"pass", "n/a"}
    assert statuses["url.government"] == "n/a" and statuses["url.public"] == "pass"
    assert statuses["mysql.detected"] == "pass" and statuses["mysql.offline"] == "n/a"
    assert printed[0].split("|")[0].strip() == "requirement" and printed[0].rstrip().endswith("result")
    assert len(printed) == len(seed["requirements"]) + 1
    assert any(line.startswith("CPU cores") and "8 cores" in line and line.rstrip().endswith("pass") for line in printed)


def test_a_machine_that_misses_rows_fails_and_names_them(tmp_path: Path) -> None:
    facts = copy.deepcopy(COMPLIANT_MACHINE)
    facts.update(cpu_cores=4, tls12_enabled=False, iis_default_site=True, control_port_foreign=["w3wp"],
                 policies_enabled=["Prevent access to the command prompt"], nic_types=["Intel(R) 82574L"])
    facts["features"]["Web-Server"] = True
    code, statuses, _, failure = run_prereqs(tmp_path, facts, url_results("public"))
    assert code != 0
    failed = {row for row, status in statuses.items() if status == "fail"}
    assert failed == {"hw.cpu", "sw.tls12", "iis.default_site", "iis.port443", "sw.role_iis", "gpo.cmd",
                      "net.port_control", "vmware.nic", "net.nic", "iis.fastcgi"}
    for row in failed:
        assert row in failure


def test_before_install_the_rows_setup_fixes_are_to_do_and_hardware_still_fails(tmp_path: Path) -> None:
    facts = copy.deepcopy(COMPLIANT_MACHINE)
    facts.update(cpu_cores=4, tls12_enabled=False, mysql_service="", mysql_offline_installer="mysql-8.0.40-winx64.msi",
                 control_port_open=False, data_port_open=False, is_vmware=False)
    code, statuses, _, failure = run_prereqs(tmp_path, facts, url_results("public"), prereqs_before_install=True)
    assert statuses["sw.tls12"] == "to do" and statuses["sw.mysql"] == "to do"
    assert statuses["net.port_control"] == "to do" and statuses["net.port_data"] == "to do"
    assert statuses["mysql.offline"] == "pass" and statuses["mysql.download"] == "n/a"
    assert statuses["vmware.powercli"] == "n/a" and statuses["vmware.nic"] == "n/a"
    assert statuses["hw.cpu"] == "fail" and code != 0 and "hw.cpu" in failure


def test_unreachable_urls_fail_and_an_optional_one_only_warns(tmp_path: Path) -> None:
    code, statuses, _, _ = run_prereqs(tmp_path, COMPLIANT_MACHINE,
                                       url_results("public", {"dc.services.visualstudio.com"}))
    assert code == 0 and statuses["url.public"] == "warn"
    code, statuses, _, failure = run_prereqs(tmp_path, COMPLIANT_MACHINE,
                                             url_results("public", {"management.azure.com", "time.windows.com"}))
    assert code != 0 and statuses["url.public"] == "fail" and statuses["time.sync"] == "fail"
    assert "url.public" in failure


def test_government_cloud_uses_its_own_list_and_time_source(tmp_path: Path) -> None:
    code, statuses, _, failure = run_prereqs(tmp_path, COMPLIANT_MACHINE, url_results("government"),
                                             prereqs_cloud="government")
    assert statuses["url.public"] == "n/a" and statuses["url.government"] == "pass"
    # The machine still points at the public time source.
    assert statuses["time.sync"] == "fail" and code != 0 and "time.sync" in failure
    facts = dict(COMPLIANT_MACHINE, ntp_server="time.nist.gov,0x9")
    code, statuses, _, _ = run_prereqs(tmp_path, facts, url_results("government"), prereqs_cloud="government")
    assert code == 0 and statuses["time.sync"] == "pass"


@pytest.mark.parametrize("days_left, evaluation, expected", [(170, True, "pass"), (10, True, "warn"), (0, True, "fail")])
def test_licence_days_left(tmp_path: Path, days_left: int, evaluation: bool, expected: str) -> None:
    facts = dict(COMPLIANT_MACHINE, licence_days_left=days_left, licence_evaluation=evaluation)
    _, statuses, _, _ = run_prereqs(tmp_path, facts, url_results("public"))
    assert statuses["sw.licence"] == expected
