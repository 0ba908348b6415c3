"""Deploy throughput and memory: `invoke deploy`'s upload path vs a plain HTTP POST of the same bytes.

Builds an appliance OVA with >= 1 GiB of incompressible disk data, starts govmomi's vCenter
simulator, and in fresh processes (so peak RSS is each one's own):
  baseline  ImportVApp, then a plain http.client POST of each disk member (read from the OVA,
            same 1 MiB blocks) to its lease URL, then abort: the transfer and nothing else;
  deploy    the real deployer: verify the OVA, CreateImportSpec, ImportVApp, upload with
            progress bar, lease keep-alive and .mf hashing, complete.
Prints MiB/s of the upload phase (median and best of --rounds, alternating), the client's CPU
seconds per GiB in that phase (steadier than MiB/s on a busy machine) and peak RSS.

    .venv/bin/python benchmarks/bench_deploy.py [--data-mib 1024] [--rounds 5]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance_build.deploy.connection import Credentials, vcenter_session
from appliance_build.deploy.deployer import deploy, import_plan, remove_vm
from appliance_build.deploy.lease import (
    CHUNK,
    STREAM_VMDK_TYPE,
    DeviceUrl,
    plan_uploads,
    wait_until_ready,
)
from appliance_build.deploy.options import Flags, options_from
from appliance_build.deploy.placement import find_vm, resolve
from appliance_build.ova.descriptor import parse_descriptor
from appliance_build.ova.package import open_package
from appliance_build.settings import load_settings

MIB = 2**20


def build_ova(folder: Path, data_mib: int) -> Path:
    """OS disk with `data_mib` MiB of random data (does not compress), two small data disks."""
    from appliance_build.ova.assemble import assemble_ova

    disks = []
    for role, mib in (("os", data_mib), ("cache", 4), ("retention", 4)):
        raw = folder / f"{role}.raw"
        with raw.open("wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(MIB))
            fh.truncate(max(mib * MIB, 64 * MIB))
        vmdk = folder / f"{role}.vmdk"
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(vmdk)],
                       check=True)
        raw.unlink()
        disks.append(vmdk)
    return assemble_ova(load_settings("local"), disks, folder / "bench.ova")


def _options(args: argparse.Namespace, name: str):
    return options_from(load_settings("local"), Flags(
        vcenter=args.vcenter, ova=args.ova, name=name, datacenter="DC0", cluster="DC0_C0", datastore="LocalDS_0",
        network="VM Network", ca_file=args.ca_file))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_deploy(args: argparse.Namespace, credentials: Credentials) -> dict[str, float]:
    marks: dict[str, tuple[float, float]] = {}

    def say(line: str) -> None:
        if line.startswith("uploading") and "start" not in marks:
            marks["start"] = (time.perf_counter(), _cpu_seconds())
        elif line.startswith(("the server offers no manifest", "server manifest")):
            marks["end"] = (time.perf_counter(), _cpu_seconds())

    started = time.perf_counter()
    deploy(_options(args, args.name), credentials, say=say, progress=True)
    total = time.perf_counter() - started
    return {"upload_s": marks["end"][0] - marks["start"][0], "cpu_s": marks["end"][1] - marks["start"][1],
            "total_s": total}


def worker_baseline(args: argparse.Namespace, credentials: Credentials) -> dict[str, float]:
    options = _options(args, args.name)
    with open_package(options.ova) as package, vcenter_session(options.vcenter, credentials, options.tls) as si:
        content = si.RetrieveContent()
        target = resolve(content, options.placement)
        plan = import_plan(content, package, parse_descriptor(package.descriptor_text), target, options)
        lease = target.resource_pool.ImportVApp(spec=plan.spec, folder=target.folder)
        wait_until_ready(lease, 60)
        urls = [DeviceUrl(u.importKey, u.key, u.url) for u in lease.info.deviceUrl]
        sizes = {i.path: package.member_size(i.path) for i in plan.file_items}
        uploads = plan_uploads(plan.file_items, urls, sizes, options.vcenter)
        context = ssl.create_default_context(cafile=str(options.tls.ca_file))
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        for item in uploads:
            parts = urlsplit(item.url)
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, blocksize=CHUNK)
            with package.open_member(item.member) as body:
                connection.request("POST", parts.path, body=body,
                                   headers={"Content-Type": STREAM_VMDK_TYPE, "Content-Length": str(item.size)})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"baseline POST of {item.member}: HTTP {response.status}")
            connection.close()
        upload_s, cpu_s = time.perf_counter() - started, _cpu_seconds() - cpu_started
        lease.Abort()
        remove_vm(find_vm(content, target.datacenter, options.name))
    return {"upload_s": upload_s, "cpu_s": cpu_s, "total_s": upload_s}


def run_worker(args: argparse.Namespace) -> None:
    credentials = Credentials(os.environ["BENCH_VC_USER"], os.environ["BENCH_VC_PASSWORD"])
    result = (worker_deploy if args.worker == "deploy" else worker_baseline)(args, credentials)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-mib", type=int, default=1024, help="MiB of disk data in the OVA (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of baseline and deploy")
    parser.add_argument("--worker", choices=("deploy", "baseline"), help=argparse.SUPPRESS)
    for hidden in ("--vcenter", "--ova", "--ca-file", "--name"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    from tests.fixtures.vcsim import running_vcsim

    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        folder = Path(tmp)
        print(f"building an OVA with {args.data_mib} MiB of random disk data ...", flush=True)
        ova = build_ova(folder, args.data_mib)
        with open_package(ova) as package:
            disk_bytes = sum(package.member_size(m) for m in package.members if m.endswith(".vmdk"))
        print(f"{ova.name}: {ova.stat().st_size / MIB:.0f} MiB, disk members {disk_bytes / MIB:.0f} MiB", flush=True)
        with running_vcsim(folder) as vcsim:
            env = {**os.environ, "BENCH_VC_USER": vcsim.username, "BENCH_VC_PASSWORD": vcsim.password}
            results: dict[str, list[dict[str, float]]] = {"baseline": [], "deploy": []}
            for round_number in range(args.rounds):
                for kind in ("baseline", "deploy"):
                    worker = subprocess.run(
                        [sys.executable, __file__, "--worker", kind, "--vcenter", vcsim.address, "--ova", str(ova),
                         "--ca-file", str(vcsim.ca_file), "--name", f"bench-{kind}-{round_number}"],
                        env=env, capture_output=True, text=True)
                    if worker.returncode != 0:
                        sys.exit(f"{kind} worker failed:\n{worker.stderr[-3000:]}")
                    results[kind].append(json.loads(worker.stdout.strip().splitlines()[-1]))
                    run = results[kind][-1]
                    rate = disk_bytes / MIB / run["upload_s"]
                    print(f"  round {round_number + 1} {kind:8}: {rate:7.1f} MiB/s upload, "
                          f"client CPU {run['cpu_s']:.2f}s, peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
    rates = {kind: sorted(disk_bytes / MIB / r["upload_s"] for r in runs) for kind, runs in results.items()}
    rss = {kind: max(r["peak_rss_mib"] for r in runs) for kind, runs in results.items()}
    print()
    cpu = {kind: statistics.median(r["cpu_s"] for r in runs) for kind, runs in results.items()}
    print(f"{'':34}{'median MiB/s':>14}{'best MiB/s':>12}{'CPU s/GiB':>11}{'peak RSS MiB':>14}")
    for kind, label in (("baseline", "baseline (plain http.client POST)"), ("deploy", "invoke deploy (upload phase)")):
        print(f"{label:34}{statistics.median(rates[kind]):14.1f}{rates[kind][-1]:12.1f}"
              f"{cpu[kind] * 1024 * MIB / disk_bytes:11.2f}{rss[kind]:14.0f}")
    median_ratio = statistics.median(rates["deploy"]) / statistics.median(rates["baseline"])
    print(f"ratio deploy/baseline: median {median_ratio:.2f}x, "
          f"best {rates['deploy'][-1] / rates['baseline'][-1]:.2f}x (goal >= 0.8x, RSS < 150 MiB); "
          f"whole deploy incl. verification {min(r['total_s'] for r in results['deploy']):.1f}s "
          f"for {disk_bytes / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
