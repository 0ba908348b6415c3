"""Shared helpers for the static checks of the Ansible roles and playbooks (no Windows here)."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES_DIR = REPO_ROOT / "roles"
PLAYBOOK_DIR = REPO_ROOT / "playbooks"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
SEED_FILE = REPO_ROOT / "appliance_src" / "replication_appliance" / "requirements" / "seed.yml"
ROLES = sorted(p.name for p in ROLES_DIR.iterdir() if p.is_dir())


@dataclass(frozen=True)
class Task:
    """One task (or handler) as written in a role or playbook file."""

    file: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def flatten_tasks(items: list[dict[str, Any]] | None, file: Path) -> list[Task]:
    """Tasks in a task list, descending into block/rescue/always."""
    tasks: list[Task] = []
    for item in items or []:
        if "block" in item:
            for key in ("block", "rescue", "always"):
                tasks.extend(flatten_tasks(item.get(key), file))
        else:
            tasks.append(Task(file, item))
    return tasks


def role_tasks(role: str, folder: str = "tasks") -> list[Task]:
    tasks: list[Task] = []
    for path in sorted((ROLES_DIR / role / folder).glob("*.yml")):
        tasks.extend(flatten_tasks(load_yaml(path), path))
    return tasks


def playbook_tasks(playbook: Path) -> list[Task]:
    """Every task of a playbook's plays, and of the task files they include from playbooks/tasks."""
    tasks: list[Task] = []
    for play in load_yaml(playbook):
        for key in ("pre_tasks", "tasks", "post_tasks", "handlers"):
            tasks.extend(flatten_tasks(play.get(key), playbook))
    for task in list(tasks):
        included = task.data.get("ansible.builtin.include_tasks") or task.data.get("ansible.builtin.import_tasks")
        if included:
            path = playbook.parent / str(included)
            tasks.extend(flatten_tasks(load_yaml(path), path))
    return tasks


def tool_env(tmp_path: Path | None = None) -> dict[str, str]:
    """Environment for ansible-* run offline from the venv, with the repository's ansible.cfg."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["ANSIBLE_CONFIG"] = str(REPO_ROOT / "ansible.cfg")
    env["ANSIBLE_ROLES_PATH"] = str(ROLES_DIR)
    env["ANSIBLE_NOCOLOR"] = "1"
    env["NO_COLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    if tmp_path is not None:
        env["ANSIBLE_LOCAL_TEMP"] = str(tmp_path / "ansible-local")
        env["ANSIBLE_HOME"] = str(tmp_path / "ansible-home")
    return env


def run_tool(args: list[str], tmp_path: Path | None = None, timeout: int = 240,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = tool_env(tmp_path)
    env.update(extra_env or {})
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def seed() -> dict[str, Any]:
    return load_yaml(SEED_FILE)
