"""Starting a process server: beside the configuration server (`appliance serve` calls
`start_for_data_dir`), or on its own (`python -m replication_appliance.process_server`, used by
scale-out process servers, fault tests and benchmarks)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import uuid
from pathlib import Path

from ..common.datadir import DataDir
from ..common.secrets import MasterKey
from ..common.tls import server_ssl_context
from ..dataplane.session import MachineDirectory, MachineRecord, StaticDirectory
from ..storage import open_store, store_for_data_dir
from .server import ProcessServer, ProcessServerConfig


def start_for_data_dir(data_dir: Path, directory: MachineDirectory, host: str, port: int) -> ProcessServer:
    """The process server of an initialised appliance, started; call `.stop()` on shutdown."""
    dd = DataDir(data_dir)
    ctx = server_ssl_context(dd.server_cert("data"), dd.server_key("data"), dd.ca_cert, require_client_cert=True)
    server = ProcessServer(ProcessServerConfig(dd.cache_dir, host=host, port=port), ctx, directory,
                           store_for_data_dir(dd.root), dd.master_key())
    server.start()
    return server


def load_machines(path: Path) -> StaticDirectory:
    """A JSON list of {machine_id, hostname, disk_sizes} (for a process server without a database)."""
    records = [MachineRecord(uuid.UUID(m["machine_id"]), m["hostname"], tuple(m["disk_sizes"]))
               for m in json.loads(path.read_text())]
    return StaticDirectory(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replication_appliance.process_server",
                                description="Run a process server on its own (data port only).")
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    p.add_argument("--ca", type=Path, required=True, help="appliance CA that signs agent certificates")
    p.add_argument("--machines", type=Path, required=True, help="JSON list of registered machines")
    p.add_argument("--master-key", type=Path, required=True, help="file holding the 32-byte master key")
    p.add_argument("--storage", required=True, help="local storage directory, or 'env' to read "
                   "APPLIANCE_STORAGE_CONNECTION_STRING")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9443)
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--cache-capacity", type=int, help="usable cache size in bytes (default: the file system)")
    p.add_argument("--segment-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--segment-age", type=float, default=5.0)
    p.add_argument("--upload-concurrency", type=int, default=4)
    p.add_argument("--zstd-level", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--upload-backoff-max", type=float, default=15.0, help="longest wait between upload retries (s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    spec = os.environ["APPLIANCE_STORAGE_CONNECTION_STRING"] if args.storage == "env" else args.storage
    config = ProcessServerConfig(args.cache_dir, args.host, args.port, args.segment_bytes, args.segment_age,
                                 cache_capacity_bytes=args.cache_capacity, upload_concurrency=args.upload_concurrency,
                                 upload_backoff_max=args.upload_backoff_max, zstd_level=args.zstd_level)
    ctx = server_ssl_context(args.cert, args.key, args.ca, require_client_cert=True)
    server = ProcessServer(config, ctx, load_machines(args.machines), open_store(spec), MasterKey.load(args.master_key))
    port = server.start()
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0
