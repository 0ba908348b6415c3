"""The archive writers leave no `.part` (nor archive) behind when writing fails or is interrupted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance_build.packaging.archive import ZIP_EPOCH, Entry, write_tar_gz, write_zip

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_child(code: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, text=True, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_zip_with_a_missing_source_leaves_nothing(tmp_path: Path):
    (tmp_path / "a.txt").write_text("a")
    out = tmp_path / "out" / "x.zip"
    out.parent.mkdir()
    with pytest.raises(FileNotFoundError):
        write_zip(out, [Entry("a.txt", tmp_path / "a.txt"), Entry("b.txt", tmp_path / "missing.txt")], ZIP_EPOCH)
    assert list(out.parent.iterdir()) == []


def test_zip_interrupted_by_ctrl_c_leaves_nothing(tmp_path: Path):
    # The second source is a FIFO nobody writes to: the writer blocks in it, .part open, until SIGINT.
    (tmp_path / "a.txt").write_text("a" * 100_000)
    os.mkfifo(tmp_path / "b.fifo")
    child = _run_child(
        "from pathlib import Path\n"
        "from appliance_build.packaging.archive import Entry, write_zip\n"
        "write_zip(Path('x.zip'), [Entry('a.txt', Path('a.txt')), Entry('b.txt', Path('b.fifo'))], 315532800)\n",
        tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "x.zip.part").exists():
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read() if child.stderr else ""
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=30)
    assert "KeyboardInterrupt" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.fifo"]


def test_tar_gz_that_cannot_be_written_leaves_nothing(tmp_path: Path):
    # A file-size limit makes the write fail for real (EFBIG) partway through the .part file.
    (tmp_path / "big.bin").write_bytes(os.urandom(1 << 20))
    child = _run_child(
        "import resource, signal\n"
        "from pathlib import Path\n"
        "from appliance_build.packaging.archive import Entry, write_tar_gz\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))\n"
        "write_tar_gz(Path('x.tar.gz'), [Entry('big.bin', Path('big.bin'))], 315532800)\n",
        tmp_path)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode != 0 and "File too large" in stderr, stderr
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_archives_are_still_written(tmp_path: Path):
    (tmp_path / "a.sh").write_text("echo a\n")
    entries = [Entry("top/a.sh", tmp_path / "a.sh")]
    write_zip(tmp_path / "x.zip", entries, ZIP_EPOCH)
    write_tar_gz(tmp_path / "x.tar.gz", entries, ZIP_EPOCH)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sh", "x.tar.gz", "x.zip"]
