"""Build the agent's venv and install its wheels into it, in one light Python process.

    python3 -I -S install_wheels.py VENV WHEEL...

Used by install.sh instead of `python -m venv` plus pip: the venv is made in-process (no pip,
no ensurepip) and each wheel is unpacked as the wheel format says (PEP 427: the archive's
files into site-packages, `<name>.data/` sorted into scripts/purelib/platlib/data/headers,
console and GUI scripts written from entry_points.txt, INSTALLER and RECORD updated). No
bytecode is compiled here: the first import writes it for what the agent actually uses.
Dependencies are not resolved: the package carries exactly the locked set, and install.sh
starts the installed agent once to prove nothing is missing.
"""
from __future__ import annotations

import configparser
import csv
import io
import os
import shutil
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path, PurePosixPath

INSTALLER_NAME = "mobility-agent-install"
SCRIPT_TEMPLATE = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {top}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({call}())
"""


class WheelError(Exception):
    """A wheel that cannot be installed as it is (damaged, or a path leaving the venv)."""


def venv_paths(root: Path) -> dict[str, Path]:
    """Where each wheel scheme goes in the venv at `root` (the interpreter's own venv scheme)."""
    names = sysconfig.get_paths(scheme="venv", vars={"base": str(root), "platbase": str(root)})
    paths = {key: Path(names[key]) for key in ("purelib", "platlib", "scripts", "data")}
    paths["headers"] = root / "include" / "site" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return paths


def safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise WheelError(f"wheel member {name!r} would be written outside the venv")
    return path


def dist_info_dir(names: list[str], wheel: Path) -> str:
    found = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    if len(found) != 1:
        raise WheelError(f"{wheel.name} has {len(found)} .dist-info folders (one expected): the wheel is damaged")
    return found.pop()


def console_scripts(entry_points: str) -> dict[str, str]:
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # script names keep their case
    parser.read_string(entry_points)
    return {name: spec.strip() for section in ("console_scripts", "gui_scripts") if parser.has_section(section)
            for name, spec in parser.items(section)}


def script_text(python: Path, spec: str) -> str:
    """The launcher pip writes for `module:attr` (attr may be dotted)."""
    module, _, attr = spec.partition(":")
    attr = attr.split("[", 1)[0].strip()  # extras in an entry point do not change the call
    top = attr.split(".", 1)[0]
    return SCRIPT_TEMPLATE.format(python=python, module=module.strip(), top=top, call=attr)


def install_wheel(wheel: Path, paths: dict[str, Path], python: Path) -> None:
    site = paths["purelib"]
    written: list[Path] = []
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = dist_info_dir(names, wheel)
        data_dir = info.removesuffix(".dist-info") + ".data"
        for member in archive.infolist():
            if member.is_dir():
                continue
            rel = safe_member(member.filename)
            if rel.parts[0] == data_dir:
                if len(rel.parts) < 3 or rel.parts[1] not in paths:
                    raise WheelError(f"{wheel.name}: {member.filename} is not in a known .data scheme")
                dest = paths[rel.parts[1]].joinpath(*rel.parts[2:])
            else:
                dest = site.joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = archive.read(member)
            if rel.parts[0] == data_dir and rel.parts[1] == "scripts" and data.startswith(b"#!python"):
                data = b"#!" + str(python).encode() + data[len(b"#!python"):]
            dest.write_bytes(data)
            mode = member.external_attr >> 16
            if mode & 0o111 or (rel.parts[0] == data_dir and rel.parts[1] == "scripts"):
                dest.chmod(0o755)
            written.append(dest)
        entry_points = f"{info}/entry_points.txt"
        scripts = console_scripts(archive.read(entry_points).decode()) if entry_points in names else {}
    for name, spec in scripts.items():
        dest = paths["scripts"] / name
        dest.write_text(script_text(python, spec))
        dest.chmod(0o755)
        written.append(dest)
    meta = site / info
    (meta / "INSTALLER").write_text(INSTALLER_NAME + "\n")
    # RECORD lists what the wheel put in the venv, so a later tool can uninstall it cleanly.
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path in [*written, meta / "INSTALLER"]:
        if path != meta / "RECORD":
            writer.writerow([os.path.relpath(path, site), "", ""])
    writer.writerow([f"{info}/RECORD", "", ""])
    (meta / "RECORD").write_text(record.getvalue())


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: install_wheels.py VENV WHEEL...", file=sys.stderr)
        return 2
    root, wheels = Path(argv[0]).absolute(), [Path(w) for w in argv[1:]]
    if root.exists():
        shutil.rmtree(root)
    venv.EnvBuilder(symlinks=True, with_pip=False).create(root)
    paths = venv_paths(root)
    python = root / "bin" / "python"
    try:
        for wheel in wheels:
            install_wheel(wheel, paths, python)
    except (WheelError, zipfile.BadZipFile, configparser.Error) as exc:
        print(f"install_wheels.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
