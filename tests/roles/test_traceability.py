"""docs/traceability.yml maps every requirement row of the seed to the role task(s) that ensure
it and the prereqs check that verifies it; every name it gives must exist."""
from __future__ import annotations

from typing import Any

import pytest

from tests.roles.conftest import (
    PLAYBOOK_DIR,
    REPO_ROOT,
    ROLES,
    load_yaml,
    playbook_tasks,
    role_tasks,
)

TRACEABILITY = REPO_ROOT / "docs" / "traceability.yml"


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    return load_yaml(TRACEABILITY)["requirements"]


@pytest.fixture(scope="module")
def task_names() -> dict[str, set[str]]:
    return {role: {t.name for t in role_tasks(role)} for role in ROLES}


@pytest.fixture(scope="module")
def prereqs_rules() -> dict[str, Any]:
    return load_yaml(PLAYBOOK_DIR / "vars" / "prereqs_rules.yml")["prereqs_rules"]


def test_every_seed_row_has_a_mapping_and_no_mapping_is_stale(seed: dict[str, Any], table: dict[str, Any]) -> None:
    ids = [row["id"] for row in seed["requirements"]]
    assert len(ids) == len(set(ids)), "duplicate ids in the seed"
    assert sorted(set(ids) - set(table)) == [], "seed rows without a mapping"
    assert sorted(set(table) - set(ids)) == [], "mappings for rows the seed does not have"


def test_every_row_is_ensured_by_a_task_or_says_what_else_ensures_it(table: dict[str, Any]) -> None:
    for row_id, row in table.items():
        assert row["ensured_by"] or row.get("outside_ansible"), f"{row_id}: nothing ensures it"


def test_every_named_role_task_exists(table: dict[str, Any], task_names: dict[str, set[str]]) -> None:
    named = 0
    for row_id, row in table.items():
        for mapping in row["ensured_by"]:
            assert mapping["role"] in task_names, f"{row_id}: unknown role {mapping['role']}"
            assert mapping["task"] in task_names[mapping["role"]], (
                f"{row_id}: role {mapping['role']} has no task named {mapping['task']!r}")
            named += 1
    assert named >= 30


def test_every_row_is_verified_by_an_existing_prereqs_check(table: dict[str, Any], prereqs_rules: dict[str, Any]) -> None:
    prereqs_task_names = {t.name for t in playbook_tasks(PLAYBOOK_DIR / "prereqs.yml")}
    for row_id, row in table.items():
        check = row["verified_by"]
        assert (PLAYBOOK_DIR / check["playbook"]).is_file(), f"{row_id}: no playbook {check['playbook']}"
        assert check["task"] in prereqs_task_names, f"{row_id}: prereqs.yml has no task named {check['task']!r}"
        assert check["rule"] == row_id and row_id in prereqs_rules, f"{row_id}: no rule in prereqs_rules.yml"


def test_every_seed_row_has_a_prereqs_rule(seed: dict[str, Any], prereqs_rules: dict[str, Any]) -> None:
    ids = {row["id"] for row in seed["requirements"]}
    assert ids == set(prereqs_rules)
    for rule_id, rule in prereqs_rules.items():
        assert {"found", "status", "setup_fixes"} <= set(rule), rule_id


def test_mysql_rows_name_the_three_methods(table: dict[str, Any]) -> None:
    methods = {row_id for row_id in table if row_id.startswith("mysql.")}
    assert methods == {"mysql.detected", "mysql.offline", "mysql.download"}
    script = (REPO_ROOT / "roles" / "mysql" / "files" / "Install-MySql.ps1").read_text(encoding="utf-8")
    for method in ("'detected'", "'offline'", "'download'"):
        assert f"$method = {method}" in script


def test_url_rows_cover_both_clouds_from_the_seed(seed: dict[str, Any], table: dict[str, Any]) -> None:
    assert {f"url.{cloud}" for cloud in seed["urls"]} <= set(table)
    for cloud, urls in seed["urls"].items():
        assert all(entry.get("probe") for entry in urls), f"{cloud}: every URL needs a probe host"
