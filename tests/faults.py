"""Fault injection for tests: NOT a fake backend — the real backend still decides every write.

- :class:`FaultyStore` wraps a real Store and raises :class:`~dagcraft.errors.StoreUnavailable`
  around it: ``"before"`` (the call never reaches the inner store) or ``"after"`` (the inner
  store applies the call, then the response is "lost").
- :class:`FaultProxy` is a threaded HTTP/1.1 proxy (standard library only) in front of an HTTP
  endpoint such as the moto server: it drops, resets, answers ``503 SlowDown``, delays, or
  forwards a request and then resets the client instead of answering (lost response).

Both are deterministic for a given seed and request order, thread-safe, and reconfigurable while
other threads use them. ``injected`` counters record every fault for assertions.
"""

from __future__ import annotations

import contextlib
import email.utils
import html
import http.client
import random
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from dagcraft.errors import StoreUnavailable
from dagcraft.primitives.store import Store

T = TypeVar("T")

#: operations of FaultyStore that can fail ("head" only when the inner store has it)
STORE_OPS = ("get", "put", "list", "delete", "put_file", "open_read", "head")
STORE_KINDS = ("before", "after")


# --------------------------------------------------------------------------------------------
# FaultyStore
# --------------------------------------------------------------------------------------------
class Rule:
    """One fault rule of a :class:`FaultyStore`; ``remove()`` disables it."""

    def __init__(self, owner: FaultyStore, op: str | None, key_contains: str | None, kind: str,
                 rate: float, count: int | None) -> None:
        self._owner = owner
        self.op = op
        self.key_contains = key_contains
        self.kind = kind
        self.rate = rate
        self.count = count
        #: how many times this rule has fired
        self.fired = 0

    def matches(self, op: str, key: str) -> bool:
        if self.op is not None and self.op != op:
            return False
        if self.key_contains is not None and self.key_contains not in key:
            return False
        return self.count is None or self.fired < self.count

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def remove(self) -> None:
        self._owner._remove_rule(self)

    def __repr__(self) -> str:
        return (f"Rule(op={self.op!r}, key_contains={self.key_contains!r}, kind={self.kind!r}, "
                f"rate={self.rate}, count={self.count}, fired={self.fired})")


class FaultyStore:
    """A Store that delegates to ``inner`` and injects :class:`StoreUnavailable` faults.

    Rules are checked in the order they were added; the first matching rule that fires decides
    the fault. An active outage overrides all rules. ``now()`` never fails (a local clock read).
    """

    def __init__(self, inner: Store, seed: int = 0) -> None:
        self._inner = inner
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._outage: str | None = None
        #: faults injected, by (op, kind)
        self.injected: Counter[tuple[str, str]] = Counter()

    # -- configuration -----------------------------------------------------------------------
    def rule(self, op: str | None = None, key_contains: str | None = None, kind: str = "before",
             rate: float = 1.0, count: int | None = None) -> Rule:
        """Fail calls of ``op`` (None: every op) whose key contains ``key_contains`` (for
        ``list``: the prefix), with probability ``rate``, at most ``count`` times."""
        if op is not None and op not in STORE_OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {STORE_OPS} or None")
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {STORE_KINDS}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        r = Rule(self, op, key_contains, kind, rate, count)
        with self._lock:
            self._rules.append(r)
        return r

    def _remove_rule(self, r: Rule) -> None:
        with self._lock:
            if r in self._rules:
                self._rules.remove(r)

    def clear(self) -> None:
        """Remove every rule and end any outage."""
        with self._lock:
            self._rules.clear()
            self._outage = None

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def start_outage(self, kind: str = "before") -> None:
        """Every call (but ``now()``) fails with ``kind`` until :meth:`end_outage`."""
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {STORE_KINDS}")
        with self._lock:
            self._outage = kind

    def end_outage(self) -> None:
        with self._lock:
            self._outage = None

    @property
    def in_outage(self) -> bool:
        with self._lock:
            return self._outage is not None

    @contextlib.contextmanager
    def outage(self, kind: str = "before") -> Iterator[FaultyStore]:
        self.start_outage(kind)
        try:
            yield self
        finally:
            self.end_outage()

    # -- machinery ---------------------------------------------------------------------------
    def _decide(self, op: str, key: str) -> str | None:
        with self._lock:
            kind: str | None = self._outage
            if kind is None:
                for r in self._rules:
                    if not r.matches(op, key):
                        continue
                    if r.rate < 1.0 and self._rng.random() >= r.rate:
                        continue
                    r.fired += 1
                    kind = r.kind
                    break
            if kind is not None:
                self.injected[(op, kind)] += 1
            return kind

    def _run(self, op: str, key: str, fn: Callable[[], T], cleanup: Callable[[T], None] | None = None) -> T:
        kind = self._decide(op, key)
        where = f"{self._inner.url}: injected fault ({kind}) in {op} {key!r}"
        if kind == "before":
            raise StoreUnavailable(where)
        try:
            result = fn()
        except Exception:
            if kind == "after":  # the response, whatever it was, is lost
                raise StoreUnavailable(where) from None
            raise
        if kind == "after":
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup(result)
            raise StoreUnavailable(where)
        return result

    # -- the Store protocol -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def stats(self) -> Counter[str]:
        return self._inner.stats

    @property
    def inner(self) -> Store:
        return self._inner

    def get(self, key: str) -> tuple[bytes, str] | None:
        return self._run("get", key, lambda: self._inner.get(key))

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        return self._run("put", key, lambda: self._inner.put(key, data, if_none_match=if_none_match,
                                                             if_match=if_match))

    def list(self, prefix: str, start_after: str | None = None, limit: int | None = None) -> list[str]:
        return self._run("list", prefix, lambda: self._inner.list(prefix, start_after, limit))

    def delete(self, key: str) -> None:
        self._run("delete", key, lambda: self._inner.delete(key))

    def now(self) -> float:
        return self._inner.now()

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False, consume: bool = False) -> str:
        return self._run("put_file", key, lambda: self._inner.put_file(key, path, if_none_match=if_none_match,
                                                                       consume=consume))

    def open_read(self, key: str) -> BinaryIO:
        return self._run("open_read", key, lambda: self._inner.open_read(key), cleanup=lambda f: f.close())

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally: forward to the inner store (root,
        # bucket, ...). ``head`` is optional in the protocol, so it is wrapped only if present.
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._inner, name)
        if name == "head" and callable(attr):
            head: Callable[[str], str | None] = attr

            def faulty_head(key: str) -> str | None:
                return self._run("head", key, lambda: head(key))

            return faulty_head
        return attr

    def __repr__(self) -> str:
        return f"FaultyStore({self._inner!r})"


# --------------------------------------------------------------------------------------------
# FaultProxy
# --------------------------------------------------------------------------------------------
PROXY_KINDS = ("drop", "error503", "reset", "lose_response", "latency")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
               "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
_MAX_LINE = 65536


class ProxyRule:
    """One fault rule of a :class:`FaultProxy`; ``remove()`` disables it."""

    def __init__(self, owner: FaultProxy, kind: str, method: str | None, path_contains: str | None,
                 rate: float, count: int | None) -> None:
        self._owner = owner
        self.kind = kind
        self.method = method.upper() if method else None
        self.path_contains = path_contains
        self.rate = rate
        self.count = count
        self.fired = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method.upper():
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        return self.count is None or self.fired < self.count

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def remove(self) -> None:
        self._owner._remove_rule(self)

    def __repr__(self) -> str:
        return (f"ProxyRule(kind={self.kind!r}, method={self.method!r}, path_contains={self.path_contains!r}, "
                f"rate={self.rate}, count={self.count}, fired={self.fired})")


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: http.client.HTTPMessage,
                 body: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body

    @property
    def keep_alive(self) -> bool:
        conn = (self.headers.get("Connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class _BadRequest(Exception):
    pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 60.0

    def handle(self) -> None:
        proxy = self.server.proxy
        proxy._track(self.connection, True)
        try:
            while True:
                try:
                    req = self._read_request()
                except (_BadRequest, ValueError, http.client.HTTPException):
                    self._simple_response(400, "Bad Request", b"bad request\n", close=True)
                    return
                except OSError:
                    return
                if req is None:
                    return
                if not proxy._serve(self, req):
                    return
        finally:
            proxy._track(self.connection, False)

    # -- reading -----------------------------------------------------------------------------
    def _readline(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise _BadRequest("line too long")
        return line

    def _read_request(self) -> _Request | None:
        line = self._readline()
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLFs between requests
            line = self._readline()
        if not line:
            return None  # client closed the connection
        parts = line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadRequest(f"bad request line {line!r}")
        method, target, version = parts
        headers = http.client.parse_headers(self.rfile)
        if (headers.get("Expect") or "").lower() == "100-continue" and version != "HTTP/1.0":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        te = (headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            body = self._read_chunked()
        else:
            length = int(headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            if len(body) != length:
                raise OSError("client closed mid-body")
        return _Request(method, target, version, headers, body)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size_line = self._readline()
            if not size_line:
                raise OSError("client closed mid-body")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            data = self.rfile.read(size)
            if len(data) != size:
                raise OSError("client closed mid-body")
            chunks.append(data)
            self._readline()  # CRLF after the chunk
        while True:  # trailers (dropped) up to the empty line
            trailer = self._readline()
            if trailer in (b"\r\n", b"\n", b""):
                break
        return b"".join(chunks)

    # -- writing -----------------------------------------------------------------------------
    def _write_response(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
                        close: bool) -> None:
        out = [f"HTTP/1.1 {status} {reason}\r\n"]
        out += [f"{k}: {v}\r\n" for k, v in headers]
        if close:
            out.append("Connection: close\r\n")
        out.append("\r\n")
        self.wfile.write("".join(out).encode("latin-1") + body)
        self.wfile.flush()

    def _simple_response(self, status: int, reason: str, body: bytes, close: bool,
                         content_type: str = "text/plain", head: bool = False,
                         extra: list[tuple[str, str]] | None = None) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("Date", email.utils.formatdate(usegmt=True)), *(extra or [])]
        with contextlib.suppress(OSError):
            self._write_response(status, reason, headers, b"" if head else body, close)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0, then close)."""
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # makefile() objects keep the fd open: close them first so close() really closes now
        for f in (self.rfile, self.wfile):
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            sock.close()


class FaultProxy:
    """HTTP/1.1 proxy in front of ``upstream`` that injects network faults.

    Per request, in order: an active outage decides the fault; else the first matching
    :meth:`rule` that fires; else each probability of :meth:`configure` is drawn (``drop``,
    ``error503``, ``reset``, ``lose_response``: the first that hits). ``latency`` is drawn
    independently and delays forwarding. Requests are read in full (answering
    ``Expect: 100-continue`` with ``100 Continue``; Content-Length or chunked bodies) before any
    fault is applied, so "drop" and "reset" never reach the upstream, and "lose_response" always
    does.
    """

    def __init__(self, upstream: str, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._probs: dict[str, float] = dict.fromkeys(PROXY_KINDS, 0.0)
        self._latency_s: tuple[float, float] = (1.0, 3.0)
        self._rules: list[ProxyRule] = []
        self._outage: str | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        #: faults injected, by kind ("drop", "error503", "reset", "lose_response", "latency")
        self.injected: Counter[str] = Counter()
        #: requests forwarded to the upstream (including those whose response was then lost)
        self.forwarded = 0
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> str:
        """Start serving; return the proxy's URL ``http://127.0.0.1:<port>``."""
        if self._server is not None:
            return self.url
        self._server = _Server(self)
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"FaultProxy:{port}", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake handler threads blocked on keep-alive reads
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- configuration -----------------------------------------------------------------------
    def configure(self, drop: float = 0.0, error503: float = 0.0, reset: float = 0.0,
                  lose_response: float = 0.0, latency: float = 0.0,
                  latency_s: tuple[float, float] = (1.0, 3.0)) -> None:
        """Set the per-request fault probabilities (all of them; omitted ones become 0)."""
        probs = {"drop": drop, "error503": error503, "reset": reset, "lose_response": lose_response,
                 "latency": latency}
        for k, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {p}")
        lo, hi = latency_s
        if lo < 0 or hi < lo:
            raise ValueError(f"latency_s must be (lo, hi) with 0 <= lo <= hi, got {latency_s}")
        with self._lock:
            self._probs = probs
            self._latency_s = (float(lo), float(hi))

    def rule(self, kind: str, *, method: str | None = None, path_contains: str | None = None,
             rate: float = 1.0, count: int | None = None) -> ProxyRule:
        """Apply ``kind`` to requests with ``method`` (None: any) whose path contains
        ``path_contains``, with probability ``rate``, at most ``count`` times."""
        if kind not in PROXY_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {PROXY_KINDS}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        r = ProxyRule(self, kind, method, path_contains, rate, count)
        with self._lock:
            self._rules.append(r)
        return r

    def _remove_rule(self, r: ProxyRule) -> None:
        with self._lock:
            if r in self._rules:
                self._rules.remove(r)

    def clear(self) -> None:
        """Remove every rule, zero every probability and end any outage."""
        with self._lock:
            self._rules.clear()
            self._probs = dict.fromkeys(PROXY_KINDS, 0.0)
            self._outage = None

    def start_outage(self, kind: str = "error503") -> None:
        if kind not in PROXY_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {PROXY_KINDS}")
        with self._lock:
            self._outage = kind

    def end_outage(self) -> None:
        with self._lock:
            self._outage = None

    @contextlib.contextmanager
    def outage(self, kind: str = "error503") -> Iterator[FaultProxy]:
        self.start_outage(kind)
        try:
            yield self
        finally:
            self.end_outage()

    # -- per request -------------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> tuple[str | None, float]:
        """(fault kind or None, latency seconds) for one request."""
        with self._lock:
            kind: str | None = self._outage
            delay = 0.0
            if kind is None:
                for r in self._rules:
                    if not r.matches(method, path):
                        continue
                    if r.rate < 1.0 and self._rng.random() >= r.rate:
                        continue
                    r.fired += 1
                    kind = r.kind
                    break
            if kind is None:
                for k in ("drop", "error503", "reset", "lose_response"):
                    p = self._probs[k]
                    if p > 0.0 and self._rng.random() < p:
                        kind = k
                        break
            lat = self._probs["latency"]
            if kind == "latency" or (lat > 0.0 and self._rng.random() < lat):
                delay = self._rng.uniform(*self._latency_s)
                self.injected["latency"] += 1
            if kind is not None and kind != "latency":
                self.injected[kind] += 1
            return (None if kind == "latency" else kind), delay

    def _serve(self, h: _Handler, req: _Request) -> bool:
        """Handle one request; return whether the connection stays open."""
        kind, delay = self._decide(req.method, req.target)
        if kind == "drop":
            return False  # graceful close (FIN) without an answer
        if kind == "reset":
            h._reset()
            return False
        if kind == "error503":
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate. (injected by FaultProxy)</Message>"
                    b"<RequestId>faultproxy</RequestId></Error>")
            h._simple_response(503, "Slow Down", body, close=not req.keep_alive, content_type="application/xml",
                               head=req.method == "HEAD", extra=[("x-amz-request-id", "faultproxy")])
            return req.keep_alive
        if delay > 0:
            time.sleep(delay)
        try:
            status, reason, headers, body = self._forward(req)
        except OSError as exc:
            msg = f"upstream {self.upstream} unreachable: {type(exc).__name__}\n".encode()
            h._simple_response(502, "Bad Gateway", msg, close=True, head=req.method == "HEAD")
            return False
        if kind == "lose_response":
            h._reset()
            return False
        try:
            h._write_response(status, reason, headers, body, close=not req.keep_alive)
        except OSError:
            return False
        return req.keep_alive

    def _forward(self, req: _Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=60)
        try:
            conn.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
            for k, v in req.headers.items():  # keep Host (it is signed), drop hop-by-hop
                if k.lower() in _HOP_BY_HOP or k.lower() == "content-length":
                    continue
                conn.putheader(k, v)
            if req.body or req.method in ("PUT", "POST", "PATCH") or "Content-Length" in req.headers:
                conn.putheader("Content-Length", str(len(req.body)))
            conn.putheader("Connection", "close")
            conn.endheaders(req.body or None)
            with self._lock:
                self.forwarded += 1
            resp = conn.getresponse()
            no_body = req.method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            body = b"" if no_body else resp.read()
            headers: list[tuple[str, str]] = []
            for k, v in resp.getheaders():
                lk = k.lower()
                if lk in _HOP_BY_HOP:
                    continue
                if lk == "content-length" and not no_body:
                    continue
                headers.append((k, v))
            if not no_body:
                headers.append(("Content-Length", str(len(body))))
            return resp.status, resp.reason or "", headers, body
        finally:
            conn.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.url or 'stopped'} -> {self.upstream})"


# --------------------------------------------------------------------------------------------
# S3DeviantProxy: the real S3 servers' deviations from AWS, in front of the moto server
# --------------------------------------------------------------------------------------------
DEVIATIONS = ("refuse_quoted_if_match", "refuse_if_match", "multipart_ignores_if_none_match",
              "tree_order_list", "loser_500", "no_conditionals")


def _tree_key(key: str) -> list[str]:
    """SeaweedFS's listing order: a directory walk, entries by name (``a/b`` before ``a%b/c``)."""
    return key.split("/")


class S3DeviantProxy(FaultProxy):
    """A :class:`FaultProxy` whose upstream (the real moto server) behaves like a real-world
    S3 server that deviates from AWS, per ``deviations`` (any of :data:`DEVIATIONS`):

    - ``refuse_quoted_if_match`` (Ceph RGW): a PUT with a quoted ``If-Match`` is answered 412
      without reaching the upstream; the unquoted form is forwarded (and enforced).
    - ``refuse_if_match``: every PUT with ``If-Match`` is answered 412 (refuses valid writes).
    - ``multipart_ignores_if_none_match`` (RGW): ``If-None-Match`` is stripped from
      CompleteMultipartUpload (a second create overwrites) and its ETag comes back empty.
    - ``tree_order_list`` (SeaweedFS): ListObjectsV2 returns keys in tree order and applies
      ``start-after`` in that order (so it returns keys before it and skips some after it).
    - ``loser_500`` (RGW): a fraction ``loser_500_rate`` of 412 answers to PUTs outside
      ``_dagcraft/`` become HTTP 500 InternalError.
    - ``no_conditionals``: ``If-None-Match`` and ``If-Match`` are stripped from every request
      (a server without conditional writes; every write lands).

    ``deviated`` counts each deviation applied.
    """

    def __init__(self, upstream: str, deviations: set[str] | frozenset[str] = frozenset(), seed: int = 0,
                 loser_500_rate: float = 0.3) -> None:
        super().__init__(upstream, seed)
        unknown = set(deviations) - set(DEVIATIONS)
        if unknown:
            raise ValueError(f"unknown deviations {sorted(unknown)}; expected some of {DEVIATIONS}")
        self.deviations = set(deviations)
        self.loser_500_rate = loser_500_rate
        self._dev_rng = random.Random(seed)
        self.deviated: Counter[str] = Counter()

    def _note(self, what: str) -> None:
        with self._lock:
            self.deviated[what] += 1

    @staticmethod
    def _error(status: int, code: str) -> tuple[int, str, list[tuple[str, str]], bytes]:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code} '
                f"(S3DeviantProxy)</Message><RequestId>deviant</RequestId></Error>").encode()
        return status, code, [("Content-Type", "application/xml"), ("Date", email.utils.formatdate(usegmt=True)),
                              ("Content-Length", str(len(body)))], body

    def _drop_header(self, req: _Request, name: str) -> bool:
        if req.headers.get(name) is None:
            return False
        del req.headers[name]
        return True

    def _forward(self, req: _Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
        d = self.deviations
        method = req.method.upper()
        complete = method == "POST" and "uploadId=" in req.target
        if method == "PUT" and req.headers.get("If-Match") is not None:
            quoted = (req.headers.get("If-Match") or "").startswith('"')
            if "refuse_if_match" in d or ("refuse_quoted_if_match" in d and quoted):
                self._note("refused_if_match")
                return self._error(412, "PreconditionFailed")
        if "no_conditionals" in d:
            if self._drop_header(req, "If-None-Match") | self._drop_header(req, "If-Match"):
                self._note("no_conditionals")
        if complete and "multipart_ignores_if_none_match" in d and self._drop_header(req, "If-None-Match"):
            self._note("multipart_ignored")
        listing = method == "GET" and "list-type=2" in req.target and "tree_order_list" in d
        start_after: str | None = None
        if listing:
            path, _, query = req.target.partition("?")
            params = [p for p in query.split("&") if p]
            kept = []
            for p in params:
                if p.startswith("start-after="):
                    start_after = urllib.parse.unquote(p.split("=", 1)[1])
                else:
                    kept.append(p)
            req.target = path + "?" + "&".join(kept)
        status, reason, headers, body = super()._forward(req)
        if listing and status == 200:
            body = self._tree_order(body, start_after)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        if complete and status == 200 and "multipart_ignores_if_none_match" in d:
            body = re.sub(rb"<ETag>[^<]*</ETag>", b"<ETag></ETag>", body)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        if ("loser_500" in d and status == 412 and method == "PUT" and "_dagcraft/" not in req.target):
            with self._lock:
                hit = self._dev_rng.random() < self.loser_500_rate
            if hit:
                self._note("loser_500")
                return self._error(500, "InternalError")
        return status, reason, headers, body

    def _tree_order(self, body: bytes, start_after: str | None) -> bytes:
        items = re.findall(rb"<Contents>.*?</Contents>", body, flags=re.S)
        if not items:
            return body

        def key_of(item: bytes) -> str:
            m = re.search(rb"<Key>(.*?)</Key>", item, flags=re.S)
            return html.unescape(m.group(1).decode()) if m else ""

        ordered = sorted(items, key=lambda it: _tree_key(key_of(it)))
        if start_after is not None:
            ordered = [it for it in ordered if _tree_key(key_of(it)) > _tree_key(start_after)]
        if [key_of(i) for i in ordered] != sorted(key_of(i) for i in items):
            self._note("tree_order_list")
        head = body[:body.index(items[0])]
        tail = body[body.rindex(items[-1]) + len(items[-1]):]
        tail = re.sub(rb"<KeyCount>\d+</KeyCount>", f"<KeyCount>{len(ordered)}</KeyCount>".encode(), tail)
        head = re.sub(rb"<KeyCount>\d+</KeyCount>", f"<KeyCount>{len(ordered)}</KeyCount>".encode(), head)
        return head + b"".join(ordered) + tail
