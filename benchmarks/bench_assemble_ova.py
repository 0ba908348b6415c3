#!/usr/bin/env python3
"""Benchmark: assemble-ova throughput and peak RSS beside `sha256sum` + `tar` over the same disks.

Three streamOptimized VMDKs of incompressible content (>= 2 GB in all) are made once with
qemu-img and kept in a cache folder. Each contender runs in its own process (peak RSS is that
process's); both are measured alternately, several rounds, on the same warm page cache.
Goal (issue 2): >= 0.8x the baseline's throughput, peak RSS < 150 MB.

    ./bootstrap.sh python benchmarks/bench_assemble_ova.py [--gib 2.1] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BENCH_CACHE", Path(tempfile.gettempdir()) / "appliance-bench"))
ASSEMBLE = """
import sys
from pathlib import Path
from appliance_build.settings import load_settings
from appliance_build.ova.assemble import assemble_ova
assemble_ova(load_settings("local"), [Path(p) for p in sys.argv[2:]], Path(sys.argv[1]), progress=False)
"""


def make_disks(total_gib: float) -> list[Path]:
    CACHE.mkdir(parents=True, exist_ok=True)
    per_disk = int(total_gib * 2**30 / 3)
    disks = [CACHE / f"disk{n}.vmdk" for n in range(3)]
    if all(d.is_file() and d.stat().st_size >= per_disk for d in disks):
        return disks
    raw = CACHE / "random.raw"
    # Incompressible, so the VMDK file is as large as the data. Made by a child process: a
    # forked child starts with its parent's peak RSS, so this process must stay small.
    subprocess.run(["bash", "-c", f"head -c {per_disk} /dev/urandom > {raw}"], check=True)
    print(f"making a {per_disk / 2**30:.2f} GiB streamOptimized VMDK with qemu-img (once, cached in {CACHE})")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(disks[0])], check=True)
    raw.unlink()
    for other in disks[1:]:
        shutil.copyfile(disks[0], other)  # distinct files (not links): each is read on its own
    return disks


def timed(args: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process (an upper bound: a child's peak
    starts at this small parent's RSS at fork time)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[0]} failed")
    return elapsed, usage.ru_maxrss * 1024


def baseline(disks: list[Path], out: Path) -> tuple[float, int]:
    script = (f"sha256sum {' '.join(d.name for d in disks)} > /dev/null && "
              f"tar --format=ustar -cf {out} {' '.join(d.name for d in disks)}")
    return timed(["bash", "-c", script], disks[0].parent)


def ours(disks: list[Path], out: Path) -> tuple[float, int]:
    return timed([sys.executable, "-c", ASSEMBLE, str(out), *map(str, disks)], REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--gib", type=float, default=2.1, help="total size of the three disks (GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of each contender")
    args = parser.parse_args()
    disks = make_disks(args.gib)
    total = sum(d.stat().st_size for d in disks)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp)
        baseline(disks, out / "warm.tar")  # warm the page cache for both
        results: dict[str, list[tuple[float, int]]] = {"baseline": [], "assemble-ova": []}
        for _ in range(args.rounds):
            results["baseline"].append(baseline(disks, out / "base.tar"))
            results["assemble-ova"].append(ours(disks, out / "ours.ova"))
            (out / "base.tar").unlink()
            (out / "ours.ova").unlink()
    print(f"\nassemble-ova benchmark: 3 disks, {total / 2**30:.2f} GiB, {args.rounds} rounds, median")
    rates = {}
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        rates[name] = total / seconds
        print(f"  {name:<24} {seconds:6.2f} s  {rates[name] / 2**20:8.1f} MiB/s  peak RSS {rss / 2**20:6.1f} MiB")
    ratio = rates["assemble-ova"] / rates["baseline"]
    peak = max(r[1] for r in results["assemble-ova"]) / 2**20
    print(f"  throughput ratio {ratio:.2f}x of sha256sum+tar (goal >= 0.8x); peak RSS {peak:.1f} MiB (goal < 150)")


if __name__ == "__main__":
    main()
