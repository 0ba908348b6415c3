"""`invoke validate` end to end, as a user runs it."""
from __future__ import annotations

import shutil
import subprocess


def test_invoke_validate_passes_on_the_committed_tree(repo_root):
    result = subprocess.run([shutil.which("invoke"), "validate"], cwd=repo_root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("packer fmt -check", "packer validate", "syntax-check appliance.yml", "ansible-lint", "yamllint",
                 "OVF descriptor"):
        assert any(line.startswith(step) and " pass " in line for line in result.stdout.splitlines()), step
