"""The one place that talks to Packer, through python-packer (the design card's wrapper).

Swapping the wrapper means changing this module only. Secrets reach Packer as PKR_VAR_*
environment variables, never as -var arguments (argv is visible to every user of the host).
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import PreflightError
from .toolenv import tool_env

_VERSION_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def packer_path() -> str | None:
    return shutil.which("packer")


def detect_packer_version(executable: str | None = None) -> tuple[int, int, int] | None:
    """The version of the Packer on PATH, or None when there is none."""
    executable = executable or packer_path()
    if not executable:
        return None
    try:
        out = subprocess.run([executable, "version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(out)
    return tuple(int(x) for x in match.groups()) if match else None  # type: ignore[return-value]


class PackerFailed(PreflightError):
    """Packer ran and reported a failure; the message carries its output."""


class _LineWriter:
    """Packer's output to `on_line`, a line at a time. sh 1.11 inspects a callable handler with
    inspect.getargspec, which Python 3.11 removed; a file-like handler takes another path."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line

    def write(self, chunk: bytes) -> None:
        self._on_line(chunk.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        pass


class PackerClient:
    """validate, fmt and build of one rendered template."""

    def __init__(self, template: Path, secrets: Mapping[str, str] | None = None,
                 variables: Mapping[str, str] | None = None) -> None:
        import packer as python_packer  # python-packer
        import sh

        executable = packer_path()
        if executable is None:
            raise PreflightError("packer is not on PATH: install it (Debian: apt-get install packer)")
        self._sh = sh
        self.template = template
        self._client = python_packer.Packer(str(template), exec_path=executable)
        env = tool_env()
        env.update({f"PKR_VAR_{k}": v for k, v in (secrets or {}).items()})
        env.update({f"PKR_VAR_{k}": v for k, v in (variables or {}).items()})
        env["CHECKPOINT_DISABLE"] = "1"  # no call home
        self._env = env
        # Run beside the template so its relative paths (playbook, vars, output) resolve.
        self._client.packer = self._client.packer.bake(_cwd=str(template.parent), _env=env)

    def fmt_check(self) -> str:
        return self._run(lambda: self._client.packer("fmt", "-check", "-diff", str(self.template)), "packer fmt -check")

    def validate(self) -> str:
        # python-packer's own validate() reads `ex.message`, which Python 3 exceptions lack, so
        # a failing template would crash it; the baked command it holds is called instead.
        return self._run(lambda: self._client.packer("validate", str(self.template)), "packer validate")

    def build(self, on_line: Callable[[str], None], only: str | None = None) -> None:
        client = self._client
        if only:
            client.only = [only]
        # Packer writes the floppy and cd_files images (the answer file, with the password) and
        # Ansible's inventory under TMPDIR, and 1.6.6 never removes its cd_files staging folder:
        # give it a private folder, removed whatever happens.
        with tempfile.TemporaryDirectory(prefix="appliance-packer-") as private_tmp:
            lines = _LineWriter(on_line)
            client.packer = client.packer.bake(_out=lines, _err=lines, _out_bufsize=1, _bg=True,
                                               _env={**self._env, "TMPDIR": private_tmp})
            running = client.build(parallel=False, force=True)
            try:
                self._run(running.wait, "packer build")
            except KeyboardInterrupt:
                # sh starts Packer in a session of its own, so Ctrl-C reaches only this process:
                # pass it on as SIGTERM, which Packer handles as Ctrl-C (it stops QEMU or the VM
                # and deletes its output), and wait for that before anything else goes.
                running.signal(signal.SIGTERM)
                running.process.wait()
                raise

    def _run(self, call: Callable[[], object], what: str) -> str:
        try:
            result = call()
        except self._sh.ErrorReturnCode as exc:
            output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
            # build() streams Packer's output to its caller, so there is none to quote here.
            detail = f":\n{output.strip()}" if output.strip() else " (its output is above)"
            raise PackerFailed(f"{what} failed for {self.template}{detail}") from None
        stdout = getattr(result, "stdout", b"")
        return stdout.decode(errors="replace") if isinstance(stdout, bytes) else ""
