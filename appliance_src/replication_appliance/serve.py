"""`appliance serve`: every server and background task of the appliance in one process.

Components plug in by adding one import string to a list here:
- SERVER_FACTORIES: "module:function"; the function takes a ServeContext and returns a list
  of ServerSpec (an ASGI app, a port and its TLS context). The control server (443) is the
  first; the process server (9443) adds its factory beside it.
- BACKGROUND_TASKS: "module:function"; the function takes a ServeContext and returns a
  coroutine that runs until cancelled (at shutdown).

Every server speaks TLS 1.2+ (common.tls.server_ssl_context) and exposes the peer's client
certificate to the app as the ASGI TLS extension: scope["extensions"]["tls"]["client_cert_chain"].
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from uvicorn.protocols.http.h11_impl import H11Protocol

from .common.datadir import ApplianceConfig, DataDir
from .common.errors import ApplianceError, DatabaseError
from .db.engine import datadir_engine, session_factory
from .db.migrate import pending_heads

log = logging.getLogger("replication_appliance.serve")

SERVER_FACTORIES: list[str] = [
    "replication_appliance.control.app:control_servers",
]
BACKGROUND_TASKS: list[str] = [
    "replication_appliance.process_server.appliance_hook:run_builtin_process_server",
]

MAX_HEADER_BYTES = 16 * 1024


class ServeError(ApplianceError):
    """A server cannot start (port in use, missing certificate)."""


@dataclass
class ServeContext:
    data_dir: DataDir
    config: ApplianceConfig
    engine: Engine
    sessions: sessionmaker[Session]
    bind: str
    control_port: int
    data_port: int

    @classmethod
    def open(cls, data_dir: DataDir, bind: str, control_port: int | None = None,
             data_port: int | None = None) -> ServeContext:
        config = data_dir.load_config()
        engine = datadir_engine(data_dir)
        missing = pending_heads(engine)
        if missing:
            raise DatabaseError(f"database is not at the code's schema (missing {', '.join(sorted(missing))}): "
                                f"run `appliance db upgrade --data-dir {data_dir.root}`")
        return cls(data_dir, config, engine, session_factory(engine), bind,
                   control_port if control_port is not None else config.control_port,
                   data_port if data_port is not None else config.data_port)


@dataclass
class ServerSpec:
    name: str
    app: Callable[..., Awaitable[None]]
    port: int
    ssl_context: ssl.SSLContext
    tasks: list[Awaitable[None]] = field(default_factory=list)  # run beside the server, cancelled at shutdown


def _tls_extension(transport: asyncio.Transport) -> dict[str, Any]:
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_der": der,  # not in the ASGI spec: saves re-parsing the PEM per request
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}.get(ssl_object.version()) if ssl_object else None,
        "cipher_suite": None,
    }


class TLSPeerH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the ASGI TLS extension (the peer certificate of this connection)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = _tls_extension(transport)
        inner = self.app

        async def app_with_tls(scope, receive, send):
            scope.setdefault("extensions", {})["tls"] = tls
            await inner(scope, receive, send)

        self.app = app_with_tls


class _QuietSignalsServer(uvicorn.Server):
    """Several servers share one process: `run_servers` owns the signals, not each server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def uvicorn_server(spec: ServerSpec, bind: str, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(spec.app, host=bind, port=spec.port, http=TLSPeerH11Protocol, lifespan="off",
                            ssl_context_factory=lambda _cfg, _default: spec.ssl_context, log_level=log_level,
                            access_log=False, timeout_keep_alive=75, server_header=False,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return _QuietSignalsServer(config)


async def run_servers(specs: list[ServerSpec], tasks: list[Awaitable[None]], bind: str,
                      log_level: str = "info", stop: asyncio.Event | None = None) -> None:
    """Serve every spec and run every task until SIGINT/SIGTERM (or `stop` is set)."""
    stop = stop or asyncio.Event()
    servers = [uvicorn_server(s, bind, log_level) for s in specs]
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    sockets = [listen(bind, spec) for spec in specs]
    serving = [asyncio.create_task(s.serve(sockets=[sock]), name=f"serve-{spec.name}")
               for s, spec, sock in zip(servers, specs, sockets)]
    background = [asyncio.ensure_future(t) for t in [*tasks, *(t for spec in specs for t in spec.tasks)]]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*serving, stopper], return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    for task in background:
        task.cancel()
    await asyncio.gather(*serving, *background, return_exceptions=True)
    stopper.cancel()
    for task in done:
        if task is not stopper and task.exception() is not None:
            raise task.exception()  # a server that failed to start (e.g. port in use)


def listen(bind: str, spec: ServerSpec) -> socket.socket:
    """Bind before serving, so a port in use is a clear error rather than a server exiting."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, spec.port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"{spec.name} server cannot listen on {bind}:{spec.port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def build_all(ctx: ServeContext) -> tuple[list[ServerSpec], list[Awaitable[None]]]:
    specs = [spec for ref in SERVER_FACTORIES for spec in _load(ref)(ctx)]
    tasks = [_load(ref)(ctx) for ref in BACKGROUND_TASKS]
    return specs, tasks


def serve(ctx: ServeContext, log_level: str = "info") -> None:
    specs, tasks = build_all(ctx)
    for spec in specs:
        log.info("%s listening on https://%s:%d", spec.name, ctx.bind, spec.port)
    try:
        asyncio.run(run_servers(specs, tasks, ctx.bind, log_level))
    finally:
        ctx.engine.dispose()
