"""`invoke validate`: render, then every static check a build would otherwise fail on late.

Steps: packer fmt -check, packer validate (with placeholder secrets, never real ones),
ansible-playbook --syntax-check of every playbook, ansible-lint (production profile),
yamllint, and the OVF checks on the descriptor the inventory produces.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .ova.assemble import appliance_spec, planned_disks
from .ova.descriptor import build_descriptor, parse_descriptor
from .ova.schema import schema_errors
from .ova.verify import VerificationReport, check_requirements
from .packer import PackerClient, PackerFailed, detect_packer_version
from .render import write_rendered
from .settings import Settings, load_settings
from .toolenv import tool_env
from .version import REPO_ROOT

PLACEHOLDER_SECRET = "validate-only-placeholder"  # not a secret: only packer validate sees it
PLAYBOOK_DIR = REPO_ROOT / "playbooks"


@dataclass(frozen=True)
class StepResult:
    name: str
    ok: bool
    detail: str


def validate_all(inventory: str, echo: bool = True) -> list[StepResult]:
    settings = load_settings(inventory)
    version = detect_packer_version()
    folder = write_rendered(settings, version)
    results = [*packer_checks(settings, folder), *ansible_checks(), ovf_check(settings)]
    if echo:
        width = max(len(r.name) for r in results)
        for r in results:
            print(f"{r.name:<{width}}  {'pass' if r.ok else 'FAIL'}  {r.detail}")
    failed = [r.name for r in results if not r.ok]
    if failed:
        raise BuildError(f"validation failed: {', '.join(failed)}")
    return results


def packer_checks(settings: Settings, folder: Path) -> list[StepResult]:
    template = folder / "packer" / "appliance.pkr.hcl"
    with tempfile.TemporaryDirectory(prefix="appliance-validate-") as tmp:
        # Packer validate stats the VMware Tools ISO of a qemu build: give it a stand-in.
        tools_iso = Path(tmp) / "windows.iso"
        tools_iso.write_bytes(b"")
        variables = {"answer_dir": str(folder / "packer" / "answer")}
        if settings.builder.target == "qemu":
            variables["vmware_tools_iso"] = str(tools_iso)
        secrets = {"admin_password": PLACEHOLDER_SECRET}
        if settings.builder.target == "vsphere":
            secrets["vsphere_password"] = PLACEHOLDER_SECRET
        try:
            client = PackerClient(template, secrets=secrets, variables=variables)
        except BuildError as exc:
            return [StepResult("packer", False, str(exc))]
        results = []
        for name, call in (("packer fmt -check", client.fmt_check), ("packer validate", client.validate)):
            try:
                call()
                results.append(StepResult(name, True, os.path.relpath(template, REPO_ROOT)))
            except PackerFailed as exc:
                results.append(StepResult(name, False, str(exc)))
        return results


def _run(name: str, args: list[str], detail: str) -> StepResult:
    env = tool_env({"ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"})
    try:
        result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError:
        return StepResult(name, False, f"{args[0]} is not on PATH (run inside the venv: ./bootstrap.sh invoke ...)")
    if result.returncode != 0:
        return StepResult(name, False, (result.stdout + result.stderr).strip()[-4000:])
    return StepResult(name, True, detail)


def playbooks() -> list[Path]:
    return sorted(PLAYBOOK_DIR.glob("*.yml"))


def ansible_checks() -> list[StepResult]:
    books = playbooks()
    if not books:
        return [StepResult("ansible", False, f"no playbooks in {PLAYBOOK_DIR}")]
    results = [_run(f"syntax-check {b.name}", ["ansible-playbook", "--syntax-check", "-i", "inventory/local",
                                                str(b.relative_to(REPO_ROOT))], "ok") for b in books]
    results.append(_run("ansible-lint", ["ansible-lint", "--profile", "production", "--offline", "playbooks",
                                         "roles"], "production profile"))
    results.append(_run("yamllint", ["yamllint", "--strict", "."], "no findings"))
    return results


def ovf_check(settings: Settings) -> StepResult:
    """The descriptor this inventory produces: schema-valid and meeting the seed's requirements."""
    descriptor = build_descriptor(appliance_spec(settings, planned_disks(settings)))
    errors = schema_errors(descriptor)
    report = VerificationReport(Path(f"{settings.artifact_stem}.ovf"))
    check_requirements(parse_descriptor(descriptor), report)
    problems = errors + [f"{c.name}: {c.detail}" for c in report.failures]
    return StepResult("OVF descriptor", not problems, "schema-valid, meets the appliance requirements"
                      if not problems else "; ".join(problems))
