"""Render the build definitions from the inventory with Jinja2.

Outputs (all deterministic: same inventory and Packer line, same bytes):
  build/<inventory>/packer/appliance.pkr.hcl      Packer HCL2 template (one source per target)
  build/<inventory>/packer/answer/autounattend.xml answer file, password REDACTED (kept copy)
  build/<inventory>/packer/answer/*.ps1           first-boot scripts
  build/<inventory>/ansible/appliance-vars.yml    extra vars for playbooks/appliance.yml
The answer file with the real password is only ever written to a private temporary folder
for the length of a build (see `private_answer_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from .errors import RenderError
from .settings import Settings, load_settings
from .version import REPO_ROOT

TEMPLATE_DIR = REPO_ROOT / "images" / "windows-server-2016"
BUILD_ROOT = REPO_ROOT / "build"
REDACTED = "REDACTED-SET-AT-BUILD-TIME"
PRODUCT = "Replication appliance"
TOOLS_ISO_NAME = "windows.iso"

# First-boot scripts in the order FirstLogonCommands runs them; WinRM is enabled last so
# Packer only connects to a finished machine.
FIRST_BOOT_SCRIPTS = (
    ("Install-VMwareDrivers.ps1", "Install VMware Tools or stage the PVSCSI and VMXNET3 drivers"),
    ("Enable-WinRM.ps1", "Enable WinRM for the build (last)"),
)
SUPPORT_SCRIPTS = ("Stop-Build.ps1",)  # staged on the media, run by Packer's shutdown_command
ANSWER_FILES = ("autounattend.xml", *(name for name, _ in FIRST_BOOT_SCRIPTS), *SUPPORT_SCRIPTS)


@dataclass(frozen=True)
class RenderedFile:
    path: str  # relative to the inventory's build folder
    content: bytes


def packer_supports_required_plugins(version: tuple[int, ...] | None) -> bool:
    """`required_plugins` exists from Packer 1.7 on; 1.6 rejects the block."""
    return version is None or version >= (1, 7)


# --- escaping filters -------------------------------------------------------------------------


def hcl_literal(value: Any) -> str:
    """An HCL2 literal: strings quoted with `\\`, `"`, `${` and `%{` escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise RenderError(f"cannot write {value!r} as an HCL literal")
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t").replace("${", "$${").replace("%{", "%%{"))
    return f'"{escaped}"'


def yaml_literal(value: Any) -> str:
    """A YAML scalar on one line (JSON is YAML; it quotes everything that needs quoting)."""
    return json.dumps(value, ensure_ascii=False)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=lambda name: bool(name and name.endswith(".xml.j2")),
    )
    env.filters["hcl"] = hcl_literal
    env.filters["yaml"] = yaml_literal
    return env


# --- rendering -----------------------------------------------------------------------------------


def template_context(settings: Settings, packer_version: tuple[int, ...] | None) -> dict[str, Any]:
    return {
        "inventory": settings.inventory,
        "name": settings.name,
        "version": settings.version,
        "product": PRODUCT,
        "target": settings.builder.target,
        "vm": asdict(settings.vm),
        "network": asdict(settings.network),
        "windows": asdict(settings.windows),
        "builder": asdict(settings.builder),
        "packer_required_plugins": packer_supports_required_plugins(packer_version),
        "answer_files": ANSWER_FILES,
        "first_boot_scripts": [{"name": n, "description": d} for n, d in FIRST_BOOT_SCRIPTS],
        "playbook_file": "../../../playbooks/appliance.yml",
        "ansible_vars_file": "../ansible/appliance-vars.yml",
        "wheel_dir": "../../wheels",
        "tools_iso_name": TOOLS_ISO_NAME,
        "tools_install_attempts": 3,
        "winrm_max_timeout_ms": 1800000,
    }


def ansible_settings(settings: Settings) -> dict[str, Any]:
    """The inventory's settings as the roles read them (same keys as group_vars/all.yml)."""
    keys = ("appliance", "vm", "network", "ports", "windows")
    return {key: settings.raw[key] for key in keys if key in settings.raw}


def render_files(settings: Settings, packer_version: tuple[int, ...] | None,
                 admin_password: str | None = None) -> list[RenderedFile]:
    """Every rendered file; the answer file carries `admin_password` or the REDACTED marker."""
    env = _environment()
    context = template_context(settings, packer_version)
    try:
        files = [RenderedFile("packer/appliance.pkr.hcl", _render(env, "appliance.pkr.hcl.j2", context))]
        answer_context = {**context, "admin_password": admin_password if admin_password is not None else REDACTED}
        files.append(RenderedFile("packer/answer/autounattend.xml",
                                  _render(env, "autounattend.xml.j2", answer_context)))
        for script in ANSWER_FILES[1:]:
            files.append(RenderedFile(f"packer/answer/{script}", _render(env, f"scripts/{script}.j2", context)))
        settings_yaml = yaml.safe_dump(ansible_settings(settings), sort_keys=True, default_flow_style=False,
                                       allow_unicode=True)
        files.append(RenderedFile("ansible/appliance-vars.yml",
                                  _render(env, "ansible-vars.yml.j2", {**context, "settings_yaml": settings_yaml})))
    except jinja2.TemplateError as exc:
        raise RenderError(f"template error: {exc}") from None
    return files


def _render(env: jinja2.Environment, name: str, context: dict[str, Any]) -> bytes:
    return env.get_template(name).render(context).encode("utf-8")


def build_dir(settings: Settings) -> Path:
    return BUILD_ROOT / settings.inventory


def write_rendered(settings: Settings, packer_version: tuple[int, ...] | None) -> Path:
    """Write the kept (secret-free) rendering into build/<inventory>/; returns that folder."""
    out = build_dir(settings)
    files = render_files(settings, packer_version)
    for f in files:
        target = out / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(target, f.content)
    return out


def render_inventory(inventory: str, packer_version: tuple[int, ...] | None = None,
                     detect_packer: bool = True) -> Path:
    settings = load_settings(inventory)
    if packer_version is None and detect_packer:
        from .packer import detect_packer_version

        packer_version = detect_packer_version()
    return write_rendered(settings, packer_version)


@contextmanager
def private_answer_dir(settings: Settings, packer_version: tuple[int, ...] | None,
                       admin_password: str) -> Iterator[Path]:
    """A 0700 temporary folder with the real answer file; removed whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-answer-"))
    try:
        os.chmod(folder, stat.S_IRWXU)
        for f in render_files(settings, packer_version, admin_password):
            if f.path.startswith("packer/answer/"):
                target = folder / Path(f.path).name
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(f.content)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_if_changed(path: Path, content: bytes) -> None:
    if path.is_file() and path.read_bytes() == content:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
