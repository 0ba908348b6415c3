"""How far ingest is from the least that its work costs in Python on this machine.

    .venv/bin/python benchmarks/bench_ingest_floor.py [--size-gib 2] [--rounds 5]

Ingest's goal (issue 6) is 0.7x raw TLS loopback. This script measures, in alternating
rounds, each beside the mean of the raw TLS runs just before and after it, and with the CPU
seconds per GB both ends spent:

1. ingest: agent -> process server (TLS, validate, journal, fsync, ack) of the benchmark
   image (2 GiB, holes and zero blocks included), as in bench_replication.py's section 2;
2. a minimal pipeline doing the same work per byte sent, and nothing else, over the image's
   non-zero data laid end to end (so, unlike ingest, it neither looks for holes nor skips
   zero blocks, and every frame is 4 MiB): one reading thread (read a chunk, XXH3-128 of the
   chunk and of each 4 KiB block, the frame header with its checksum), one sending thread,
   64 MiB of frames in flight; a receiving process that reads each frame into one of 16
   buffers, decodes and checks it, and hands it to a thread that writes it with O_DIRECT,
   fsyncs and posts the acknowledgement the receiver sends back;
3. the same minimal pipeline with the work taken out (no read, hashes, checksum, write or
   fsync: frames, threads and acknowledgements only).

(2) is what ingest's work costs in Python on this machine when nothing else is done: if it
stays under 0.7 of raw TLS, trimming the product's own code cannot reach the goal here.
(3) shows what Python's threads and frames alone cost beside raw TLS.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import queue
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_replication import (
    check_free_space,
    cpu_seconds,
    nonzero_segments,
    tls_loopback,
)
from replication_appliance.dataplane.digests import chunk_digest, digest_blocks
from replication_appliance.dataplane.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    Kind,
    check_payload,
    decode_header,
    encode_header,
)

from tests.appliance.dataplane.conftest import (
    Pki,
    ServerProcess,
    make_machine,
    make_pki,
    replicator,
)

MiB = 1 << 20
FRAME = 4 * MiB
IN_FLIGHT = 16  # frames: 64 MiB, the agent's window
ACK_SIZE = 8
DONE = (1 << 64) - 1


def _receive_exact(sock, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if not n:
            return False
        got += n
    return True


def _receiver(pki: Pki, workdir: Path, work: bool, ports: multiprocessing.Queue) -> None:
    """The minimal process server: receive, check, write, fsync, acknowledge."""
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    sock = pki.server_context().wrap_socket(conn, server_side=True)
    buffers = [mmap.mmap(-1, FRAME) for _ in range(IN_FLIGHT)]  # page-aligned, as O_DIRECT needs
    free: queue.SimpleQueue = queue.SimpleQueue()
    for b in buffers:
        b[::4096] = bytes(FRAME // 4096)  # touched before the clock starts
        free.put(b)
    journal = os.open(workdir / "journal", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    to_write: queue.SimpleQueue = queue.SimpleQueue()
    durable: queue.SimpleQueue = queue.SimpleQueue()

    def writer() -> None:
        while (item := to_write.get()) is not None:
            buf, seq = item
            if work:
                os.write(journal, buf)
            free.put(buf)
            if to_write.empty() or seq % 4 == 0:  # group commit: one fsync for what is written
                if work:
                    os.fsync(journal)
                durable.put(seq)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    header = bytearray(HEADER_SIZE)
    while _receive_exact(sock, memoryview(header)) and any(header):  # zeros: the sender is done
        h = decode_header(header)
        buf = free.get()
        payload = memoryview(buf)[:h.length]
        if not _receive_exact(sock, payload):
            break
        if work:
            check_payload(header, h, payload)
        to_write.put((buf, h.seq))
        acked = None
        while not durable.empty():
            acked = durable.get()
        if acked is not None:
            sock.sendall(acked.to_bytes(ACK_SIZE, "big"))
    to_write.put(None)
    thread.join()
    sock.sendall(DONE.to_bytes(ACK_SIZE, "big"))
    os.close(journal)


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def minimal_pipeline(pki: Pki, data: Path, workdir: Path, work: bool) -> tuple[float, float]:
    """(seconds, CPU seconds of both ends) to push `data` through the minimal pipeline
    (`work`: with ingest's work)."""
    cpu = _cpu_with_children()
    ports: multiprocessing.Queue = multiprocessing.Queue()
    proc = multiprocessing.Process(target=_receiver, args=(pki, workdir, work, ports), daemon=True)
    proc.start()
    port = ports.get(timeout=30)
    sock = pki.client_context(uuid.uuid4()).wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                                         server_hostname="127.0.0.1")
    machine = uuid.uuid4()
    window = threading.Semaphore(IN_FLIGHT)
    to_send: queue.SimpleQueue = queue.SimpleQueue()

    def acknowledgements() -> None:
        acked = 0
        while True:
            raw = bytearray(ACK_SIZE)
            if not _receive_exact(sock, memoryview(raw)) or (seq := int.from_bytes(raw, "big")) == DONE:
                return
            window.release(seq - acked)  # cumulative: everything up to seq is durable
            acked = seq

    def sender() -> None:
        while (item := to_send.get()) is not None:
            header, payload = item
            sock.sendall(header)
            sock.sendall(payload)

    threads = [threading.Thread(target=t, daemon=True) for t in (acknowledgements, sender)]
    buffers = [bytearray(FRAME) for _ in range(IN_FLIGHT + 1)]
    size = data.stat().st_size
    fd = os.open(data, os.O_RDONLY)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for seq, offset in enumerate(range(0, size, FRAME), start=1):
        if not window.acquire(timeout=60):
            raise RuntimeError("the minimal receiver stopped acknowledging for 60 s (see its traceback above)")
        buf = buffers[seq % len(buffers)]
        n = os.preadv(fd, [buf], offset) if work else min(FRAME, size - offset)
        payload = memoryview(buf)[:n]
        if work:
            chunk_digest(payload)
            digest_blocks(payload)
            header = encode_header(Frame(Kind.DATA, machine, seq=seq, offset=offset, payload=payload))
        else:  # no checksum
            header = HEADER.pack(MAGIC, VERSION, Kind.DATA, 0, machine.bytes, 0, 0, seq, offset, n, 0)
        to_send.put((header, payload))
    to_send.put(None)
    threads[1].join()
    sock.sendall(bytes(HEADER_SIZE))  # not a frame: the receiver stops at it
    threads[0].join()
    elapsed = time.perf_counter() - start
    os.close(fd)
    sock.close()
    proc.join(timeout=30)
    return elapsed, _cpu_with_children() - cpu


def product_ingest(pki: Pki, m, workdir: Path, nbytes: int) -> tuple[float, float]:
    """(seconds, CPU seconds of agent and process server) of one initial replication into a
    fresh process server cache, scaled to `nbytes` sent."""
    for f in m.state.root.glob("disk-*"):
        f.unlink()
    store = workdir / "store"
    store.mkdir(exist_ok=True)
    ps = ServerProcess(pki, workdir / "ps", [m.record], str(store), extra=["--upload-concurrency", "0"])
    ps.start()
    try:
        rep = replicator(pki, m, ps.port)
        os.sync()
        cpu = cpu_seconds() + cpu_seconds(ps.proc.pid)
        t = time.perf_counter()
        report = rep.run_cycle()
        scale = nbytes / report.bytes_sent
        return (time.perf_counter() - t) * scale, (cpu_seconds() + cpu_seconds(ps.proc.pid) - cpu) * scale
    finally:
        ps.stop()
        shutil.rmtree(ps.workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-floor-", dir=args.workdir))
    size = int(args.size_gib * 1024) * MiB
    try:
        check_free_space(work, 3 * size)  # the image, its data and a journal
        pki = make_pki(work / "pki", "bench")
        m = make_machine(work, "floor", [size], seed=1, ps_port=0)
        data = work / "data"  # the bytes ingest sends, without the zeros it skips
        with open(data, "wb") as f:
            f.writelines(nonzero_segments(m.images[0]))
        nbytes = data.stat().st_size
        print(f"{nbytes / 1e6:.0f} MB of non-zero data, {args.rounds} rounds; each figure beside the mean of "
              "the raw TLS runs before and after it\n")

        def raw_tls() -> tuple[float, float]:
            os.sync()
            scale = nbytes / ((nbytes // MiB) * MiB)
            run = tls_loopback(pki, (nbytes // MiB) * MiB)
            return run.seconds * scale, (run.sender_cpu + run.receiver_cpu) * scale

        runs = {
            "ingest (agent -> process server)": lambda: product_ingest(pki, m, work, nbytes),
            "minimal pipeline, ingest's work": lambda: minimal_pipeline(pki, data, work, work=True),
            "minimal pipeline, frames only": lambda: minimal_pipeline(pki, data, work, work=False),
        }
        ratios: dict[str, list[float]] = {name: [] for name in runs}
        cpus: dict[str, list[float]] = {name: [] for name in (*runs, "raw TLS loopback")}
        gb = nbytes / 1e9
        before = raw_tls()
        cpus["raw TLS loopback"].append(before[1] / gb)
        for round_no in range(1, args.rounds + 1):
            for name, run in runs.items():
                seconds, cpu = run()
                after = raw_tls()
                baseline = (before[0] + after[0]) / 2
                ratios[name].append(baseline / seconds)
                cpus[name].append(cpu / gb)
                cpus["raw TLS loopback"].append(after[1] / gb)
                print(f"  round {round_no}: {name:<34} {nbytes / seconds / 1e6:7.1f} MB/s, {cpu / gb:.2f} CPU-s/GB | "
                      f"raw TLS before+after {nbytes / baseline / 1e6:7.1f} MB/s   ratio {baseline / seconds:.2f}", flush=True)
                before = after
        print("\nmedian ratio to raw TLS loopback (ingest's goal: >= 0.7), and CPU seconds per GB (both ends)")
        for name, values in ratios.items():
            print(f"  {name:<34} {statistics.median(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})   "
                  f"{statistics.median(cpus[name]):.2f} CPU-s/GB")
        print(f"  {'raw TLS loopback':<34} {'':<{6 * args.rounds + 6}}   {statistics.median(cpus['raw TLS loopback']):.2f} CPU-s/GB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
