"""The ``dagcraft ui`` web server: Starlette routes served by uvicorn.

Guarantees:
- Binds to 127.0.0.1 unless told otherwise, and answers only requests whose ``Host`` is that
  address (or ``localhost``): a DNS-rebinding page cannot read it through another name.
- A state-changing request (every POST) needs the per-session token (random at start, embedded
  in the page, compared with ``hmac.compare_digest``) in ``X-Dagcraft-Token``, and is refused
  (403) when its ``Origin`` is not this server or the browser says it is cross-site.
- Serves only its own static files, JSON built from the store (secrets there are already
  redacted), and artifacts named by a step's artifact pointers, always as downloads
  (``attachment``, ``nosniff``): never an arbitrary path, never an artifact rendered in this
  origin. Every page carries a CSP that allows nothing but this origin.
- Resume and retry start workers for the run with the orchestrator's pool (:func:`drive`, in a
  background thread of this process: ordinary ``dagcraft worker --run R --exit-when-idle``
  processes, restarted if they die). Ctrl-C in the UI's terminal reaches them too (they hand
  their steps back: the run stays resumable); otherwise they finish the run if the UI stops.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dagcraft.errors import Conflict, DagcraftError, InvalidInput, NotFound
from dagcraft.orchestrator import PoolOptions, cancel, drive, prepare_resume, retry_from
from dagcraft.orchestrator.model import RUN_FINISHED
from dagcraft.orchestrator.view import SECRET_ENV_PREFIX, require_secrets
from dagcraft.primitives import artifacts
from dagcraft.primitives.store import Store
from dagcraft.ui import data
from dagcraft.workflows.graph_render import SVG_CSS, to_svg

TOKEN_HEADER = "x-dagcraft-token"
_STATIC = files("dagcraft.ui") / "static"
_STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HTTP_STATUS = {2: 400, 3: 409, 4: 404, 5: 503}


@dataclass
class UiOptions:
    """How the UI serves a store. ``store_url`` is what the workers it starts open."""

    store_url: str
    host: str = "127.0.0.1"
    port: int = 8765
    #: worker pool for runs resumed or retried from the UI
    pool: PoolOptions = field(default_factory=lambda: PoolOptions(workers=2))
    #: the per-session token (random unless given: tests give none either)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))


class _SecurityHeaders:
    """Adds the CSP and no-sniff/no-frame/no-referrer headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", _CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                            (b"cache-control", b"no-store")]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Cache:
    """Answers kept for ``data.CACHE_S``, so many pollers cost the store one reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, ...], tuple[float, Any]] = {}

    def get(self, key: tuple[str, ...], compute: Callable[[], Any]) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and time.monotonic() - hit[0] < data.CACHE_S:
                return hit[1]
        value = compute()
        with self._lock:
            self._items[key] = (time.monotonic(), value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class UiApp:
    """Routes and actions over one store. ``drivers`` are the pools this UI started, per run."""

    def __init__(self, store: Store, opts: UiOptions) -> None:
        self.store = store
        self.opts = opts
        self.cache = _Cache()
        self._lock = threading.Lock()
        self.drivers: dict[str, threading.Thread] = {}
        self.driven: dict[str, str] = {}  # run → how its last pool ended ("succeeded", "error: …")

    # -- guards ------------------------------------------------------------------------------
    def check_post(self, request: Request) -> None:
        """403 unless the request carries this session's token and comes from this origin."""
        given = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.opts.token.encode()):
            raise _Refused("missing or wrong session token: reload the page")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            raise _Refused(f"cross-origin request from {origin} refused")
        if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            raise _Refused("cross-site request refused")

    # -- pages -------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        html = (_STATIC / "index.html").read_text("utf-8").replace("{{TOKEN}}", self.opts.token)
        return Response(html, media_type="text/html; charset=utf-8")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "dag.css":
            return Response(SVG_CSS, media_type="text/css")
        if name not in _STATIC_FILES:  # a fixed list: no path ever reaches the filesystem
            raise NotFound(f"no static file {name!r}")
        return Response((_STATIC / name).read_text("utf-8"), media_type=_STATIC_FILES[name])

    # -- JSON --------------------------------------------------------------------------------
    def runs(self, request: Request) -> Response:
        return JSONResponse(self.cache.get(("runs",), lambda: data.runs_json(self.store)))

    def run(self, request: Request) -> Response:
        rid = request.path_params["run_id"]
        body = dict(self.cache.get(("run", rid), lambda: data.run_json(self.store, rid)))
        with self._lock:
            alive = rid in self.drivers and self.drivers[rid].is_alive()
            body["ui_workers"] = "running" if alive else self.driven.get(rid)
        return JSONResponse(body)

    def dag(self, request: Request) -> Response:
        from dagcraft.orchestrator.view import load_run

        rid = request.path_params["run_id"]
        _, wf = load_run(self.store, rid)
        run = self.cache.get(("run", rid), lambda: data.run_json(self.store, rid))
        statuses = {s["step"]: s["status"] for s in run["steps"]}
        return Response(to_svg(wf, statuses, embed_style=False), media_type="image/svg+xml")

    def step(self, request: Request) -> Response:
        rid, sid = request.path_params["run_id"], request.path_params["step"]
        attempt = request.query_params.get("attempt") or None
        key = ("step", rid, sid, attempt or "")
        return JSONResponse(self.cache.get(key, lambda: data.step_json(self.store, rid, sid, attempt)))

    def artifact(self, request: Request) -> Response:
        """The artifact a step's state points to, verified against the pointer's digest."""
        rid, sid, name = (request.path_params[k] for k in ("run_id", "step", "name"))
        state = data.step_state(self.store, rid, sid)
        ptr = state.artifacts.get(name)
        if ptr is None:  # only names the run itself recorded: never a path of our choosing
            raise NotFound(f"step {sid!r} of run {rid!r} has no artifact {name!r}")
        tmp = Path(tempfile.mkdtemp(prefix="dagcraft-ui-"))
        dest = tmp / "blob"
        try:
            got = artifacts.get(self.store, scope=str(ptr["scope"]), name=str(ptr["name"]), dest=dest)
            if got.digest != ptr.get("digest"):
                raise Conflict(f"artifact {name!r} was replaced since step {sid!r} recorded it")
        except BaseException:
            _rmtree(tmp)
            raise
        return FileResponse(dest, media_type="application/octet-stream", filename=name.rsplit("/", 1)[-1],
                            background=BackgroundTask(_rmtree, tmp))

    # -- actions -----------------------------------------------------------------------------
    async def action(self, request: Request) -> Response:
        self.check_post(request)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            raise InvalidInput("request body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput("request body must be a JSON object")
        from starlette.concurrency import run_in_threadpool

        result = await run_in_threadpool(self.act, request.path_params["run_id"], request.path_params["action"],
                                         body.get("step"), body.get("comment"))
        self.cache.clear()
        return JSONResponse(result)

    def act(self, run_id: str, action: str, step: Any, comment: Any = None) -> dict[str, Any]:
        """Do ``action`` on the run; the same functions as the CLI's commands. ``approve`` and
        ``reject`` decide a waiting gate (exactly once: a gate already decided is 409), then
        start workers so the run goes on."""
        if action == "cancel":
            return {"status": cancel(self.store, run_id, "cancelled from the UI"), "message": "cancel requested"}
        if action == "resume":
            self._require_secrets(run_id)
            before = data.run_json(self.store, run_id)["status"]
            status = prepare_resume(self.store, run_id, retry_failed=before == "failed")
            if status in RUN_FINISHED:
                return {"status": status, "message": f"run is {status}: nothing to resume"}
            return {"status": status, "message": self._start_workers(run_id)}
        if action == "retry":
            if not isinstance(step, str) or not step:
                raise InvalidInput("retry needs a step: {\"step\": \"<id>\"}")
            self._require_secrets(run_id)
            reset = retry_from(self.store, run_id, step)
            return {"status": "running", "reset": reset,
                    "message": f"reset {len(reset)} step(s); {self._start_workers(run_id)}"}
        if action in ("approve", "reject"):
            from dagcraft.orchestrator.approval import decide, decider

            if not isinstance(step, str) or not step:
                raise InvalidInput(f"{action} needs a step: {{\"step\": \"<id>\"}}")
            if comment is not None and not isinstance(comment, str):
                raise InvalidInput("comment must be a string")
            self._require_secrets(run_id)
            got = decide(self.store, run_id, step, action == "approve", by=f"{decider()} (ui)", comment=comment)
            return {"status": got["status"], "approval": got,
                    "message": f"{step}: {got['decision']}; {self._start_workers(run_id)}"}
        raise NotFound(f"no action {action!r} (cancel, resume, retry, approve, reject)")

    def _require_secrets(self, run_id: str) -> None:
        # the workers inherit this process's environment: it must carry the run's secrets
        env = {k: v for k, v in os.environ.items() if k.startswith(SECRET_ENV_PREFIX)}
        require_secrets(self.store, run_id, env)

    def _start_workers(self, run_id: str) -> str:
        with self._lock:
            if run_id in self.drivers and self.drivers[run_id].is_alive():
                return "its workers (started here) are running"
            t = threading.Thread(target=self._drive, args=(run_id,), name=f"ui-drive-{run_id}", daemon=True)
            self.drivers[run_id] = t
            self.driven.pop(run_id, None)
            t.start()
        return f"started {self.opts.pool.workers} worker(s)"

    def _drive(self, run_id: str) -> None:
        try:
            outcome = str(drive(self.store, self.opts.store_url, run_id, self.opts.pool))
        except DagcraftError as exc:
            outcome = f"error: {exc}"
        with self._lock:
            self.driven[run_id] = outcome


class _Refused(DagcraftError):
    """A request this server will not serve (403)."""


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def _error(request: Request, exc: Exception) -> Response:
    """Every error as one JSON line ``{"error": ...}``: never a traceback, never HTML."""
    if isinstance(exc, HTTPException):
        what = "no such page" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": f"{what}: {request.url.path}"}, status_code=exc.status_code)
    if isinstance(exc, _Refused):
        return JSONResponse({"error": str(exc)}, status_code=403)
    if not isinstance(exc, DagcraftError):  # a bug: uvicorn logs its traceback; the page gets one line
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
    return JSONResponse({"error": str(exc)}, status_code=_HTTP_STATUS.get(exc.exit_code, 500))


def allowed_hosts(host: str) -> list[str]:
    """Host header values served: loopback names, and the bound address (any, for 0.0.0.0/::)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    # an IPv6 literal comes bracketed in a Host header
    return sorted({"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host})


def create_app(store: Store, opts: UiOptions) -> Starlette:
    """The ASGI app (a :class:`UiApp` as ``app.state.ui``)."""
    ui = UiApp(store, opts)
    routes = [
        Route("/", ui.page),
        Route("/runs/{run_id}", ui.page),
        Route("/static/{name}", ui.static),
        Route("/api/runs", ui.runs),
        Route("/api/runs/{run_id}", ui.run),
        Route("/api/runs/{run_id}/dag.svg", ui.dag),
        Route("/api/runs/{run_id}/steps/{step}", ui.step),
        Route("/api/runs/{run_id}/steps/{step}/artifacts/{name:path}", ui.artifact),
        Route("/api/runs/{run_id}/actions/{action}", ui.action, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={DagcraftError: _error, HTTPException: _error, Exception: _error},
                    middleware=[Middleware(_SecurityHeaders),
                                Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(opts.host))])
    app.state.ui = ui
    return app


def serve(store: Store, opts: UiOptions, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted. The socket is bound first (port 0 picks a free one), so a busy
    port is an InvalidInput naming it; ``on_ready`` gets the real URL once requests are served."""
    import uvicorn

    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((opts.host, opts.port))
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"--host/--port: cannot listen on {opts.host}:{opts.port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    opts.port = port
    app = create_app(store, opts)
    shown = f"[{opts.host}]" if ":" in opts.host else opts.host
    link = f"http://{'127.0.0.1' if opts.host in ('0.0.0.0', '') else shown}:{port}/"

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            # only now: serving, and Ctrl-C handled by uvicorn (a graceful stop, then exit 130)
            if self.started and on_ready is not None:
                on_ready(link)

    _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")).run(sockets=[sock])
