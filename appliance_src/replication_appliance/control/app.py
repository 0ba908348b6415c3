"""The control API on 443 (FastAPI): agents, process servers and operators.

Agent and process-server calls after registration are authenticated by their client
certificate (mutual TLS; the certificate reaches the app as the ASGI TLS extension, see
serve.TLSPeerH11Protocol). Operator calls carry a bearer token from /api/v1/auth/login."""
# No `from __future__ import annotations`: FastAPI must resolve the route-local Annotated aliases.

import asyncio
import datetime as dt
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..common.datadir import DataDir
from ..common.errors import CertificateError
from ..common.tls import (
    ROLE_PROCESS_SERVER,
    CertificateAuthority,
    ClientIdentity,
    identity_from_der,
    server_ssl_context,
)
from ..db.models import Operator, Policy, utcnow
from . import schemas as s
from . import service
from .auth import FailureLimiter, TokenSigner, dummy_hash, verify_password
from .heartbeats import HeartbeatStore
from .service import ConflictError, ControlError, ForbiddenError

log = logging.getLogger("replication_appliance.control")
MAX_BODY_BYTES = 64 * 1024
MAX_PASSWORD_CHECKS = 2  # operator logins verified at once (argon2, 64 MiB each); more wait their turn
API = "/api/v1"


@dataclass
class ControlContext:
    data_dir: DataDir
    sessions: sessionmaker[Session]
    ca: CertificateAuthority
    signer: TokenSigner
    passphrase_limiter: FailureLimiter = field(default_factory=FailureLimiter)
    login_limiter: FailureLimiter = field(default_factory=FailureLimiter)
    password_checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_PASSWORD_CHECKS))
    max_body_bytes: int = MAX_BODY_BYTES
    heartbeats: HeartbeatStore = None  # type: ignore[assignment] - set in __post_init__
    _passphrase: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        if self.heartbeats is None:
            self.heartbeats = HeartbeatStore(self.sessions)

    @classmethod
    def open(cls, data_dir: DataDir, sessions: sessionmaker[Session], **kwargs) -> "ControlContext":
        ca = CertificateAuthority.load(data_dir.ca_cert, data_dir.ca_key)
        return cls(data_dir, sessions, ca, TokenSigner(data_dir.master_key().derive("operator-tokens")), **kwargs)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A transaction for operator reads; state changes (and their audit entries) written first.
        Newer agent figures than the rows' come from `self.live`."""
        self.heartbeats.flush(everything=False)
        with self.sessions.begin() as session:
            yield session

    def live(self, machine_id: str) -> service.AgentView | None:
        f = self.heartbeats.live(machine_id)
        return None if f is None else service.AgentView(f.state, f.percent, f.state_changed_at, f.last_heartbeat_at, f.disks)

    def passphrase(self) -> str:
        """The current passphrase; re-read when `appliance passphrase rotate` replaced the file."""
        stamp = os.stat(self.data_dir.passphrase_path).st_mtime_ns
        if self._passphrase is None or self._passphrase[0] != stamp:
            self._passphrase = (stamp, self.data_dir.passphrase())
        return self._passphrase[1]

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before the app sees any of it (buffers the body)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_problem(send, 413, f"request body is over the {self.limit} byte limit")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_problem(send, 413, f"request body is over the {self.limit} byte limit")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_problem(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "details": []}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def problem(status: int, message: str, details: list[str] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "details": details or []}, status_code=status, headers=headers)


ERRORS = {code: {"model": s.Problem} for code in (400, 401, 403, 404, 409, 413, 422, 429)}


def build_control_app(ctx: ControlContext) -> FastAPI:
    app = FastAPI(title="Replication appliance configuration server", version=_version(),
                  docs_url=None, redoc_url=None, responses=ERRORS)
    bearer = HTTPBearer(auto_error=False, description="token from POST /api/v1/auth/login")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return problem(422, "invalid request: " + "; ".join(details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ControlError)
    async def _control(_request: Request, exc: ControlError) -> JSONResponse:
        return problem(exc.status_code, str(exc))

    @app.exception_handler(CertificateError)
    async def _cert(_request: Request, exc: CertificateError) -> JSONResponse:
        return problem(400, str(exc))

    @app.exception_handler(IntegrityError)
    async def _integrity(_request: Request, exc: IntegrityError) -> JSONResponse:
        return problem(409, "a concurrent change touched the same record: retry the request")

    @app.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc.orig)
        return problem(503, "the configuration database is unavailable: retry later", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, "internal error (logged on the appliance)")

    # --- who is calling -------------------------------------------------------------------
    def presented(request: Request) -> ClientIdentity | None:
        """The client certificate's identity, if the caller sent one (optional on this port)."""
        tls = request.scope.get("extensions", {}).get("tls") or {}
        if "identity" not in tls:
            der = tls.get("client_cert_der")
            tls["identity"] = identity_from_der(der) if der else None
        return tls.get("identity")

    def peer(request: Request) -> ClientIdentity:
        identity = presented(request)
        if identity is None:
            raise ForbiddenError("this call needs the client certificate issued at registration (mutual TLS)")
        return identity

    def operator(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        username = ctx.signer.verify(creds.credentials) if creds is not None else None
        if username is None:
            raise StarletteHTTPException(401, "operator login required: POST /api/v1/auth/login and send "
                                              "'Authorization: Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"})
        return f"operator:{username}"

    def remote(request: Request) -> str:
        return request.client.host if request.client else ""

    Peer = Annotated[ClientIdentity, Depends(peer)]
    Actor = Annotated[str, Depends(operator)]
    MachineId = Annotated[str, Path(min_length=1, max_length=36)]
    ServerId = Annotated[str, Path(min_length=1, max_length=36)]
    PolicyId = Annotated[int, Path(ge=1, le=2**31 - 1)]

    def reserve_attempt(limiter: FailureLimiter, address: str, what: str) -> None:
        wait = limiter.reserve(address)
        if wait > 0:
            raise StarletteHTTPException(429, f"too many {what} from {address}: retry in {max(1, round(wait))} s",
                                         headers={"Retry-After": str(max(1, round(wait)))})

    async def check_passphrase(address: str, given: str) -> None:
        reserve_attempt(ctx.passphrase_limiter, address, "wrong passphrases")
        try:
            ok = service.passphrase_matches(given, ctx.passphrase())
        except BaseException:
            ctx.passphrase_limiter.release(address)
            raise
        if not ok:
            ctx.passphrase_limiter.failed(address)
            await run_in_threadpool(_audit_refusal, address)
            await asyncio.sleep(0.2)  # every wrong guess costs the caller time
            raise StarletteHTTPException(401, "wrong registration passphrase: get the current one with "
                                              "`appliance passphrase show` on the appliance")
        ctx.passphrase_limiter.succeeded(address)

    def _audit_refusal(address: str) -> None:
        with ctx.transaction() as session:
            service.audit(session, "anonymous", "registration.refused", details={"reason": "wrong passphrase"}, remote=address)

    # --- agents -------------------------------------------------------------------------
    @app.post(f"{API}/agents/register", response_model=s.AgentRegistered, tags=["agents"])
    async def register_agent(req: s.AgentRegistration, request: Request):
        """Register a Mobility agent: passphrase + CSR in, client certificate + process server out."""
        address = remote(request)
        await check_passphrase(address, req.passphrase)

        def work():
            with ctx.heartbeats.registering() as replaced:
                with ctx.transaction() as session:
                    out = service.register_agent(session, ctx.ca, req, address, utcnow())
                replaced(out.machine_id)
            ctx.heartbeats.load(out.machine_id, utcnow())  # ready for its first heartbeat
            return out
        return await run_in_threadpool(work)

    @app.post(f"{API}/agents/{{machine_id}}/heartbeat", response_model=s.DesiredStateOut, tags=["agents"])
    async def agent_heartbeat(machine_id: MachineId, hb: s.Heartbeat, who: Peer, request: Request):
        """State and per-disk counters in, desired state out (answered from memory, see control.heartbeats)."""
        service.check_agent_identity(machine_id, who.role, who.subject_id)
        for _ in range(3):
            if ctx.heartbeats.needs_load(machine_id):
                await run_in_threadpool(ctx.heartbeats.load, machine_id, utcnow())
            answer = ctx.heartbeats.apply(machine_id, who.fingerprint, hb, remote(request), utcnow())
            if answer is not None:
                return answer
        raise ConflictError("the machine is being changed by an operator right now: retry the heartbeat")

    # --- process servers ----------------------------------------------------------------
    @app.post(f"{API}/process-servers/register", response_model=s.ProcessServerRegistered, tags=["process servers"])
    async def register_process_server(req: s.ProcessServerRegistration, request: Request):
        """Register a scale-out process server (same passphrase as agents); an already registered
        name only with that process server's current client certificate."""
        address, caller = remote(request), presented(request)
        await check_passphrase(address, req.passphrase)

        def work():
            with ctx.transaction() as session:
                return service.register_process_server(session, ctx.ca, req, address, caller)
        return await run_in_threadpool(work)

    def own_process_server(session: Session, ps_id: str, who: ClientIdentity):
        if who.role != ROLE_PROCESS_SERVER or who.subject_id != ps_id:
            raise ForbiddenError(f"this certificate cannot act for process server {ps_id}")
        return service.authorised_process_server(session, ps_id, who.fingerprint)

    @app.post(f"{API}/process-servers/{{ps_id}}/heartbeat", response_model=s.ProcessServerHealthOut, tags=["process servers"])
    def process_server_heartbeat(ps_id: ServerId, load: s.ProcessServerLoad, who: Peer):
        """Load figures in, computed health out."""
        with ctx.transaction() as session:
            own_process_server(session, ps_id, who)
            now = utcnow()
            ps = service.record_process_server_load(session, ps_id, load, now)
            out = service.ps_health_out(ps, service.machine_counts(session).get(ps.id, 0), now)
        ctx.heartbeats.refresh_process_servers()
        return out

    @app.get(f"{API}/process-servers/{{ps_id}}/machines", response_model=list[s.AssignedMachine], tags=["process servers"])
    def process_server_machines(ps_id: ServerId, who: Peer):
        """The machines assigned to this process server and their certificate fingerprints."""
        with ctx.transaction() as session:
            own_process_server(session, ps_id, who)
            return service.assigned_machines(session, ps_id)

    # --- operators ----------------------------------------------------------------------
    @app.post(f"{API}/auth/login", response_model=s.TokenOut, tags=["operators"])
    async def login(req: s.Login, request: Request):
        address = remote(request)
        reserve_attempt(ctx.login_limiter, address, "failed or pending logins")

        def check() -> bool:
            with ctx.transaction() as session:
                op = session.scalars(select(Operator).where(Operator.username == req.username)).one_or_none()
                ok = verify_password(op.password_hash if op else dummy_hash(), req.password) and op is not None
                service.audit(session, f"operator:{req.username}", "operator.login" if ok else "operator.login_refused",
                              "operator", req.username, remote=address)
                return ok
        try:
            async with ctx.password_checks:  # each is argon2 with 64 MiB: bound them across addresses too
                ok = await run_in_threadpool(check)
        except BaseException:
            ctx.login_limiter.release(address)
            raise
        if not ok:
            ctx.login_limiter.failed(address)
            raise StarletteHTTPException(401, "wrong username or password")
        ctx.login_limiter.succeeded(address)
        token, expires = ctx.signer.issue(req.username)
        return s.TokenOut(token=token, expires_at=dt.datetime.fromtimestamp(expires, dt.UTC))

    @app.get(f"{API}/status", response_model=s.StatusOut, tags=["operators"])
    def get_status(_actor: Actor):
        with ctx.reading() as session:
            summary = service.status(session, utcnow(), ctx.live)
        config = ctx.data_dir.load_config()
        return s.StatusOut(appliance={"hostname": config.hostname, "version": _version(), "cloud": config.cloud},
                           process_servers=summary.process_servers, machines=summary.machines,
                           overall_health=summary.overall)

    @app.get(f"{API}/machines", response_model=list[s.MachineOut], tags=["operators"])
    def list_machines(_actor: Actor):
        with ctx.reading() as session:
            return service.list_machines(session, utcnow(), ctx.live)

    @app.get(f"{API}/machines/{{machine_id}}", response_model=s.MachineOut, tags=["operators"])
    def get_machine(machine_id: MachineId, _actor: Actor):
        with ctx.reading() as session:
            return service.machine_out(service.load_machine(session, machine_id), utcnow(), ctx.live)

    @app.post(f"{API}/machines/{{machine_id}}/actions", response_model=s.MachineOut, tags=["operators"])
    def machine_action(machine_id: MachineId, req: s.MachineAction, actor: Actor, request: Request):
        """enable, disable, pause, resume or resync replication of a machine."""
        with ctx.transaction() as session:
            service.machine_action(session, machine_id, req.action, actor, remote(request))
        ctx.heartbeats.invalidate(machine_id)
        return get_machine(machine_id, actor)

    @app.put(f"{API}/machines/{{machine_id}}/process-server", response_model=s.MachineOut, tags=["operators"])
    def switch_process_server(machine_id: MachineId, req: s.SwitchProcessServer, actor: Actor, request: Request):
        with ctx.transaction() as session:
            service.switch_process_server(session, machine_id, req.process_server_id, actor, remote(request), utcnow())
        ctx.heartbeats.invalidate(machine_id)
        return get_machine(machine_id, actor)

    @app.put(f"{API}/machines/{{machine_id}}/policy", response_model=s.MachineOut, tags=["operators"])
    def assign_policy(machine_id: MachineId, req: s.AssignPolicy, actor: Actor, request: Request):
        with ctx.transaction() as session:
            service.assign_policy(session, machine_id, req.policy_id, actor, remote(request))
        ctx.heartbeats.invalidate(machine_id)
        return get_machine(machine_id, actor)

    @app.get(f"{API}/process-servers", response_model=list[s.ProcessServerHealthOut], tags=["operators"])
    def list_process_servers(_actor: Actor):
        with ctx.reading() as session:
            return service.list_process_servers(session, utcnow())

    @app.delete(f"{API}/process-servers/{{ps_id}}", status_code=204, tags=["operators"])
    def remove_process_server(ps_id: ServerId, actor: Actor, request: Request):
        """Remove a scale-out process server that serves no machine (not the built-in one)."""
        with ctx.transaction() as session:
            service.remove_process_server(session, ps_id, actor, remote(request))
        ctx.heartbeats.refresh_process_servers()

    @app.get(f"{API}/policies", response_model=list[s.PolicyOut], tags=["operators"])
    def list_policies(_actor: Actor):
        with ctx.transaction() as session:
            return [service.policy_out(p) for p in session.scalars(select(Policy).order_by(Policy.id))]

    @app.post(f"{API}/policies", response_model=s.PolicyOut, status_code=201, tags=["operators"])
    def create_policy(req: s.PolicyIn, actor: Actor, request: Request):
        with ctx.transaction() as session:
            return service.policy_out(service.create_policy(session, req, actor, remote(request)))

    @app.get(f"{API}/policies/{{policy_id}}", response_model=s.PolicyOut, tags=["operators"])
    def get_policy(policy_id: PolicyId, _actor: Actor):
        with ctx.transaction() as session:
            return service.policy_out(service.get_policy(session, policy_id))

    @app.patch(f"{API}/policies/{{policy_id}}", response_model=s.PolicyOut, tags=["operators"])
    def update_policy(policy_id: PolicyId, req: s.PolicyPatch, actor: Actor, request: Request):
        with ctx.transaction() as session:
            out = service.policy_out(service.update_policy(session, policy_id, req, actor, remote(request)))
        ctx.heartbeats.invalidate()  # every machine on this policy answers with the new values
        return out

    @app.delete(f"{API}/policies/{{policy_id}}", status_code=204, tags=["operators"])
    def delete_policy(policy_id: PolicyId, actor: Actor, request: Request):
        with ctx.transaction() as session:
            service.delete_policy(session, policy_id, actor, remote(request))

    @app.get(f"{API}/audit", response_model=list[s.AuditOut], tags=["operators"])
    def audit_log(_actor: Actor, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                  before_id: Annotated[int | None, Query(ge=1, le=2**62)] = None):
        with ctx.reading() as session:
            return service.audit_entries(session, limit, before_id)

    @app.get(f"{API}/jobs", response_model=list[s.JobOut], tags=["operators"])
    def list_jobs(_actor: Actor, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        with ctx.transaction() as session:
            return service.list_jobs(session, limit)

    @app.get(f"{API}/jobs/{{job_id}}", response_model=s.JobOut, tags=["operators"])
    def get_job(job_id: Annotated[str, Path(min_length=1, max_length=36)], _actor: Actor):
        with ctx.transaction() as session:
            return service.get_job(session, job_id)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("replication-appliance")
    except PackageNotFoundError:
        return "0+unknown"


def asgi_app(ctx: ControlContext):
    """The control app behind the body-size limit: what the server runs."""
    return BodyLimit(build_control_app(ctx), ctx.max_body_bytes)


def control_servers(serve_ctx) -> list:
    """serve.SERVER_FACTORIES entry: the control server on the control port."""
    from ..serve import ServerSpec

    d = serve_ctx.data_dir
    ctx = ControlContext.open(d, serve_ctx.sessions)
    ctx.heartbeats.load_all()
    tls = server_ssl_context(d.server_cert("control"), d.server_key("control"), d.ca_cert, require_client_cert=False)
    return [ServerSpec("control", asgi_app(ctx), serve_ctx.control_port, tls, tasks=[ctx.heartbeats.run_flusher()])]
