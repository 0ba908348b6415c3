"""Every role follows the house rules: required files, argument specs for every default,
role-prefixed variables, FQCN modules, no_log on secrets, no unused task files or scripts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.roles.conftest import (
    PLAYBOOK_DIR,
    ROLES,
    ROLES_DIR,
    Task,
    load_yaml,
    playbook_tasks,
    role_tasks,
)

EXPECTED_ROLES = {
    "windows_baseline", "tls", "dotnet", "powercli", "mysql",
    "appliance_disks", "appliance_software", "firewall", "licence",
}
REQUIRED_FILES = ("tasks/main.yml", "defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml")
ALLOWED_COLLECTIONS = ("ansible.builtin.", "ansible.windows.", "community.windows.")
# Keywords a task may carry besides its one action.
TASK_KEYWORDS = {
    "name", "when", "loop", "loop_control", "register", "notify", "no_log", "vars", "tags",
    "changed_when", "failed_when", "environment", "delegate_to", "run_once", "ignore_errors",
    "until", "retries", "delay", "args", "listen", "check_mode", "diff", "throttle", "timeout",
    "become", "become_user", "become_method", "async", "poll", "module_defaults", "any_errors_fatal",
}
SECRET_WORDS = re.compile(r"password|passwd|secret|product_key|token", re.IGNORECASE)
# Options whose value is itself a secret (a secrets folder path is not).
SECRET_OPTION = re.compile(r"(password|passwd|product_key|token|_secret)$")


def action_of(task: Task) -> str:
    actions = [key for key in task.data if key not in TASK_KEYWORDS]
    assert len(actions) == 1, f"{task.file}: task {task.name!r} has actions {actions}"
    return actions[0]


def all_role_tasks() -> list[tuple[str, Task]]:
    return [(role, task) for role in ROLES for folder in ("tasks", "handlers")
            for task in role_tasks(role, folder)]


def test_the_roles_are_the_agreed_ones() -> None:
    assert set(ROLES) == EXPECTED_ROLES


@pytest.mark.parametrize("role", ROLES)
def test_role_has_the_required_files(role: str) -> None:
    missing = [name for name in REQUIRED_FILES if not (ROLES_DIR / role / name).is_file()]
    assert not missing, f"role {role} lacks {missing}"


@pytest.mark.parametrize("role", ROLES)
def test_main_includes_every_task_file_and_only_existing_ones(role: str) -> None:
    tasks_dir = ROLES_DIR / role / "tasks"
    included = {str(t.data["ansible.builtin.include_tasks"]) for t in role_tasks(role)
                if "ansible.builtin.include_tasks" in t.data}
    on_disk = {p.name for p in tasks_dir.glob("*.yml")} - {"main.yml"}
    assert included == on_disk, f"{role}: included {sorted(included)}, files {sorted(on_disk)}"


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_cover_exactly_the_defaults(role: str) -> None:
    defaults = load_yaml(ROLES_DIR / role / "defaults" / "main.yml") or {}
    options = load_yaml(ROLES_DIR / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options), (
        f"{role}: defaults without spec {sorted(set(defaults) - set(options))}, "
        f"spec without default {sorted(set(options) - set(defaults))}")
    for name, spec in options.items():
        assert spec.get("description"), f"{role}: option {name} has no description"
        assert spec.get("type"), f"{role}: option {name} has no type"
        if SECRET_OPTION.search(name):
            assert spec.get("no_log") is True, f"{role}: secret option {name} is not no_log in the argument spec"


@pytest.mark.parametrize("role", ROLES)
def test_variables_are_prefixed_with_the_role_name(role: str) -> None:
    prefix = f"{role}_"
    defaults = load_yaml(ROLES_DIR / role / "defaults" / "main.yml") or {}
    names: list[str] = list(defaults)
    for task in role_tasks(role) + role_tasks(role, "handlers"):
        if "register" in task.data:
            names.append(task.data["register"])
        names.extend((task.data.get("vars") or {}).keys())
        names.extend((task.data.get("ansible.builtin.set_fact") or {}).keys())
        include_vars = task.data.get("ansible.builtin.include_vars")
        if isinstance(include_vars, dict) and "name" in include_vars:
            names.append(include_vars["name"])
    unprefixed = [name for name in names if not name.startswith(prefix)]
    assert not unprefixed, f"{role}: variables without the {prefix} prefix: {unprefixed}"


def test_every_module_is_fqcn_from_an_allowed_collection() -> None:
    tasks = [task for _, task in all_role_tasks()]
    for playbook in PLAYBOOK_DIR.glob("*.yml"):
        tasks.extend(playbook_tasks(playbook))
    bad = [(str(t.file.relative_to(ROLES_DIR.parent)), t.name, action_of(t)) for t in tasks
           if not action_of(t).startswith(ALLOWED_COLLECTIONS) or action_of(t).count(".") != 2]
    assert not bad, f"non-FQCN or unexpected modules: {bad}"
    assert len(tasks) > 40


def test_every_task_touching_a_secret_has_no_log() -> None:
    tasks = [task for _, task in all_role_tasks()]
    for playbook in PLAYBOOK_DIR.glob("*.yml"):
        tasks.extend(playbook_tasks(playbook))
    touching = []
    for task in tasks:
        body = {k: v for k, v in task.data.items() if k not in ("name", "no_log")}
        if SECRET_WORDS.search(repr(body)) and action_of(task) != "ansible.builtin.debug":
            touching.append(task)
    assert touching, "expected the MySQL, licence and appliance software tasks to handle secrets"
    without = [(str(t.file.relative_to(ROLES_DIR.parent)), t.name) for t in touching if t.data.get("no_log") is not True]
    assert not without, f"tasks touching secrets without no_log: true: {without}"


def test_debug_tasks_do_not_print_secret_variables() -> None:
    for _, task in all_role_tasks():
        if action_of(task) == "ansible.builtin.debug":
            assert not SECRET_WORDS.search(repr(task.data.get("ansible.builtin.debug"))), task.name


@pytest.mark.parametrize("role", ROLES)
def test_every_script_a_role_names_exists_and_every_script_is_used(role: str) -> None:
    files_dir = ROLES_DIR / role / "files"
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROLES_DIR / role / "tasks").glob("*.yml"))
    named = set(re.findall(r"([A-Za-z]+-[A-Za-z0-9]+\.ps1)", text))
    on_disk = {p.name for p in files_dir.glob("*")} if files_dir.is_dir() else set()
    assert named <= on_disk, f"{role}: tasks name missing files {sorted(named - on_disk)}"
    assert on_disk <= named, f"{role}: unused files {sorted(on_disk - named)}"


@pytest.mark.parametrize("role", ROLES)
def test_handlers_that_tasks_notify_exist(role: str) -> None:
    handlers = {t.name for t in role_tasks(role, "handlers")}
    notified = {str(t.data["notify"]) for t in role_tasks(role) if "notify" in t.data}
    assert notified <= handlers, f"{role}: notifies unknown handlers {sorted(notified - handlers)}"


@pytest.mark.parametrize("role", ROLES)
def test_meta_names_the_role_and_windows(role: str) -> None:
    meta = load_yaml(ROLES_DIR / role / "meta" / "main.yml")["galaxy_info"]
    assert meta["role_name"] == role
    assert {p["name"] for p in meta["platforms"]} == {"Windows"}
    assert "2016" in meta["platforms"][0]["versions"]


def test_role_defaults_map_from_the_inventory() -> None:
    """The inventory stays the one source of truth for the settings it carries."""
    mapping = {
        ("firewall", "firewall_data_port"): "ports.data",
        ("firewall", "firewall_control_port"): "ports.control",
        ("appliance_software", "appliance_software_data_port"): "ports.data",
        ("mysql", "mysql_version"): "appliance.mysql_version",
        ("windows_baseline", "windows_baseline_cloud"): "appliance.cloud",
        ("windows_baseline", "windows_baseline_locale"): "windows.locale",
        ("appliance_disks", "appliance_disks_cache_min_gb"): "vm.disks.cache_gb",
    }
    for (role, name), source in mapping.items():
        value = (load_yaml(Path(ROLES_DIR / role / "defaults" / "main.yml")))[name]
        assert source in str(value), f"{role}.{name} should map from inventory {source}, is {value!r}"
