"""The environment for the tools the build runs (packer, ansible-*, yamllint).

Tools installed in the same virtualenv as this package are found even when the venv is not
activated (`.venv/bin/invoke ...`), because their folder is put first on PATH.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    if venv_bin not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    env.update(extra or {})
    return env
