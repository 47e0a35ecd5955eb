"""Tests of the fault-injection infrastructure (tests/faults.py): it works, and it can fail."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dagcraft.errors import Conflict, NotFound, StoreUnavailable
from dagcraft.primitives.local import LocalStore
from dagcraft.primitives.s3 import S3Store
from dagcraft.primitives.store import Store
from tests.conftest import new_server_bucket
from tests.faults import FaultProxy, FaultyStore

pytestmark = pytest.mark.timeout(60)


# ============================================================================================
# FaultyStore on a real LocalStore
# ============================================================================================
@pytest.fixture
def faulty(local_store: LocalStore) -> FaultyStore:
    return FaultyStore(local_store, seed=1)


def test_faulty_store_passthrough(faulty: FaultyStore, local_store: LocalStore, tmp_path: Path) -> None:
    assert isinstance(faulty, Store)
    assert faulty.url == local_store.url
    assert faulty.stats is local_store.stats
    assert faulty.root == local_store.root  # forwarded via __getattr__
    etag = faulty.put("a/b", b"hello", if_none_match=True)
    assert faulty.get("a/b") == (b"hello", etag)
    with pytest.raises(Conflict):
        faulty.put("a/b", b"other", if_none_match=True)
    etag2 = faulty.put("a/b", b"v2", if_match=etag)
    assert faulty.head("a/b") == etag2
    src = tmp_path / "src.bin"
    src.write_bytes(b"file-bytes")
    faulty.put_file("a/f", src)
    with faulty.open_read("a/f") as f:
        assert f.read() == b"file-bytes"
    assert faulty.list("a/") == ["a/b", "a/f"]
    faulty.delete("a/f")
    assert faulty.get("a/f") is None
    assert abs(faulty.now() - time.time()) < 5
    assert sum(faulty.injected.values()) == 0
    with pytest.raises(AttributeError):
        faulty.no_such_attribute  # noqa: B018


def test_faulty_put_after_lands_but_raises(faulty: FaultyStore, local_store: LocalStore) -> None:
    faulty.rule(op="put", kind="after")
    with pytest.raises(StoreUnavailable, match="injected"):
        faulty.put("k", b"landed", if_none_match=True)
    got = local_store.get("k")
    assert got is not None and got[0] == b"landed"  # the write really happened
    assert faulty.injected[("put", "after")] == 1


def test_faulty_put_before_never_reaches_store(faulty: FaultyStore, local_store: LocalStore) -> None:
    faulty.rule(op="put", kind="before")
    with pytest.raises(StoreUnavailable):
        faulty.put("k", b"lost", if_none_match=True)
    assert local_store.get("k") is None
    assert local_store.stats["put"] == 0
    assert faulty.injected[("put", "before")] == 1


def test_faulty_after_masks_the_inner_outcome(faulty: FaultyStore, local_store: LocalStore) -> None:
    local_store.put("k", b"first")
    faulty.rule(op="put", kind="after", count=1)
    with pytest.raises(StoreUnavailable):  # the Conflict response was "lost" too
        faulty.put("k", b"second", if_none_match=True)
    with pytest.raises(Conflict):
        faulty.put("k", b"second", if_none_match=True)


def test_faulty_count_limits_and_remove(faulty: FaultyStore, local_store: LocalStore) -> None:
    r = faulty.rule(op="put", count=2)
    for i in range(2):
        with pytest.raises(StoreUnavailable):
            faulty.put(f"k{i}", b"x")
    faulty.put("k2", b"x")  # the rule is exhausted
    assert r.fired == 2 and r.exhausted
    assert local_store.list("") == ["k2"]

    r2 = faulty.rule(op="get")
    with pytest.raises(StoreUnavailable):
        faulty.get("k2")
    r2.remove()
    assert faulty.get("k2") is not None
    assert faulty.injected == {("put", "before"): 2, ("get", "before"): 1}


def test_faulty_filters_by_op_and_key(faulty: FaultyStore) -> None:
    faulty.put("runs/a", b"1")
    faulty.put("other/a", b"1")
    faulty.rule(op="get", key_contains="runs/")
    with pytest.raises(StoreUnavailable):
        faulty.get("runs/a")
    assert faulty.get("other/a") is not None
    faulty.put("runs/b", b"1")  # other ops unaffected
    faulty.rule(op="list", key_contains="runs/")  # list matches on the prefix
    with pytest.raises(StoreUnavailable):
        faulty.list("runs/")
    assert faulty.list("other/") == ["other/a"]


def test_faulty_open_read_after_and_put_file(faulty: FaultyStore, local_store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"data")
    faulty.rule(op="put_file", kind="after", count=1)
    with pytest.raises(StoreUnavailable):
        faulty.put_file("blob", src)
    assert local_store.get("blob") is not None
    faulty.rule(op="open_read", kind="after", count=1)
    with pytest.raises(StoreUnavailable):
        faulty.open_read("blob")
    with faulty.open_read("blob") as f:
        assert f.read() == b"data"
    with pytest.raises(NotFound):
        faulty.open_read("missing")


def test_faulty_outage_blocks_everything_then_ends(faulty: FaultyStore, local_store: LocalStore,
                                                   tmp_path: Path) -> None:
    faulty.put("k", b"v")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with faulty.outage():
        assert faulty.in_outage
        calls: list[Any] = [
            lambda: faulty.get("k"), lambda: faulty.put("k2", b"v"), lambda: faulty.list(""),
            lambda: faulty.delete("k"), lambda: faulty.put_file("k3", src), lambda: faulty.open_read("k"),
            lambda: faulty.head("k"),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                call()
        faulty.now()  # a local clock read never fails
    assert not faulty.in_outage
    assert local_store.list("") == ["k"]  # "before": nothing reached the store
    assert faulty.get("k") is not None
    assert sum(faulty.injected.values()) == len(calls)

    faulty.start_outage(kind="after")
    with pytest.raises(StoreUnavailable):
        faulty.put("k4", b"v")
    faulty.end_outage()
    assert local_store.get("k4") is not None
    faulty.put("k5", b"v")


def test_faulty_rate_is_deterministic(tmp_path: Path) -> None:
    def pattern(seed: int, root: Path) -> list[bool]:
        fs = FaultyStore(LocalStore(root), seed=seed)
        fs.rule(op="put", rate=0.5)
        out = []
        for i in range(40):
            try:
                fs.put(f"k{i}", b"x")
                out.append(True)
            except StoreUnavailable:
                out.append(False)
        assert fs.injected[("put", "before")] == out.count(False)
        return out

    a, b = pattern(7, tmp_path / "a"), pattern(7, tmp_path / "b")
    assert a == b
    assert 5 < a.count(False) < 35
    assert pattern(8, tmp_path / "c") != a


def test_faulty_threadsafe_reconfiguration(faulty: FaultyStore, local_store: LocalStore) -> None:
    ok: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            key = f"w{n}/{i}"
            i += 1
            try:
                faulty.put(key, b"x")
                res = ok
            except StoreUnavailable:
                res = failed
            with lock:
                res.append(key)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            time.sleep(0.01)
            with faulty.outage():
                time.sleep(0.01)
            r = faulty.rule(op="put", rate=0.5)
            time.sleep(0.01)
            r.remove()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert ok and failed
    assert sum(faulty.injected.values()) == len(failed)
    assert sorted(local_store.list("")) == sorted(ok)  # "before" faults never wrote


def test_faulty_validates_arguments(faulty: FaultyStore) -> None:
    with pytest.raises(ValueError):
        faulty.rule(op="nope")
    with pytest.raises(ValueError):
        faulty.rule(kind="during")
    with pytest.raises(ValueError):
        faulty.rule(rate=1.5)
    with pytest.raises(ValueError):
        faulty.start_outage("sideways")


# ============================================================================================
# FaultProxy on a tiny echo server (HTTP details: chunked, Expect, keep-alive, RST)
# ============================================================================================
class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        out = json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                          "te": self.headers.get("Transfer-Encoding"), "body": body.decode(),
                          "x": self.headers.get("X-Custom")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer


@pytest.fixture
def echo() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def echo_proxy(echo: str) -> Iterator[FaultProxy]:
    with FaultProxy(echo, seed=3) as p:
        yield p


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_proxy_forwards_keepalive_chunked_and_host(echo_proxy: FaultProxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _port(echo_proxy.url), timeout=5)
    conn.request("PUT", "/a?x=1", body=b"plain", headers={"X-Custom": "v", "Host": "signed.example:9"})
    r = conn.getresponse()
    got = json.loads(r.read())
    assert r.status == 200
    assert got == {"method": "PUT", "path": "/a?x=1", "host": "signed.example:9", "te": None,
                   "body": "plain", "x": "v"}
    # same connection (keep-alive), chunked request body: decoded and forwarded with a length
    conn.request("POST", "/b", body=iter([b"chu", b"nked"]), encode_chunked=True)
    r = conn.getresponse()
    got = json.loads(r.read())
    assert (got["method"], got["body"], got["te"]) == ("POST", "chunked", None)
    conn.request("HEAD", "/c")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 0
    conn.request("GET", "/d")
    assert json.loads(conn.getresponse().read())["path"] == "/d"
    conn.close()
    assert echo_proxy.forwarded == 4
    assert sum(echo_proxy.injected.values()) == 0


def test_proxy_expect_100_continue(echo_proxy: FaultProxy) -> None:
    with socket.create_connection(("127.0.0.1", _port(echo_proxy.url)), timeout=5) as s:
        s.sendall(b"PUT /e HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"body")
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 200 and json.loads(resp.read())["body"] == "body"


def test_proxy_fault_kinds_on_the_wire(echo_proxy: FaultProxy) -> None:
    port = _port(echo_proxy.url)
    req = b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"

    echo_proxy.rule("reset", count=1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req)
        with pytest.raises(ConnectionResetError):
            s.recv(100)

    echo_proxy.rule("drop", count=1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req)
        assert s.recv(100) == b""  # clean close, no answer

    echo_proxy.rule("lose_response", count=1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req)
        with pytest.raises(ConnectionResetError):
            s.recv(100)
    assert echo_proxy.forwarded == 1  # lose_response reached the upstream; drop/reset did not

    echo_proxy.rule("error503", count=2)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/y")
    r = conn.getresponse()
    assert r.status == 503 and b"<Code>SlowDown</Code>" in r.read()
    conn.request("HEAD", "/y")  # no body on HEAD; the connection stays usable
    r = conn.getresponse()
    assert r.status == 503 and r.read() == b""
    conn.request("GET", "/z")
    assert conn.getresponse().status == 200
    conn.close()
    assert echo_proxy.injected == {"reset": 1, "drop": 1, "lose_response": 1, "error503": 2}
    assert echo_proxy.forwarded == 2


def test_proxy_upstream_down_is_502() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with FaultProxy(f"http://127.0.0.1:{port}") as p:
        conn = http.client.HTTPConnection("127.0.0.1", _port(p.url), timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 502
        conn.close()


def test_proxy_validates_arguments() -> None:
    with pytest.raises(ValueError):
        FaultProxy("https://127.0.0.1:1")
    p = FaultProxy("http://127.0.0.1:1")
    with pytest.raises(ValueError):
        p.configure(drop=2.0)
    with pytest.raises(ValueError):
        p.configure(latency_s=(2.0, 1.0))
    with pytest.raises(ValueError):
        p.rule("explode")
    with pytest.raises(ValueError):
        p.start_outage("explode")
    p.stop()  # never started: no-op


# ============================================================================================
# FaultProxy in front of the moto S3 server, driven by boto3 through S3Store
# ============================================================================================
@pytest.fixture
def bucket(moto_server: str) -> str:
    return new_server_bucket(moto_server)


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server, seed=5) as p:
        yield p


@pytest.fixture
def direct(moto_server: str, bucket: str) -> S3Store:
    """The same bucket/prefix, straight to the moto server (no faults): the ground truth."""
    return S3Store(bucket, "pfx", endpoint_url=moto_server)


def _via(proxy: FaultProxy, bucket: str, attempts: int) -> S3Store:
    return S3Store(bucket, "pfx", endpoint_url=proxy.url, attempts=attempts, max_wait=0.2)


def test_s3_through_proxy_passthrough(proxy: FaultProxy, bucket: str, direct: S3Store, tmp_path: Path) -> None:
    s = _via(proxy, bucket, attempts=1)
    etag = s.put("a/1", b"one", if_none_match=True)
    assert s.get("a/1") == (b"one", etag)
    with pytest.raises(Conflict):  # 412 passes through the proxy
        s.put("a/1", b"again", if_none_match=True)
    with pytest.raises(Conflict):
        s.put("a/1", b"again", if_match="0" * 32)
    etag2 = s.put("a/1", b"two", if_match=etag)
    assert s.head("a/1") == etag2
    src = tmp_path / "blob"
    src.write_bytes(b"b" * 5000)
    s.put_file("a/2", src, if_none_match=True)
    with s.open_read("a/2") as f:
        assert f.read() == b"b" * 5000
    assert s.list("a/") == ["a/1", "a/2"]
    assert s.get("a/none") is None
    s.delete("a/2")
    assert direct.list("a/") == ["a/1"] and direct.get("a/1") == (b"two", etag2)
    assert sum(proxy.injected.values()) == 0
    assert proxy.forwarded == sum(s.stats.values())


def test_s3_lost_response_attempts_1_surfaces_but_write_landed(proxy: FaultProxy, bucket: str,
                                                               direct: S3Store) -> None:
    s = _via(proxy, bucket, attempts=1)
    proxy.rule("lose_response", method="PUT", count=1)
    with pytest.raises(StoreUnavailable):
        s.put("k", b"landed", if_none_match=True)
    got = direct.get("k")
    assert got is not None and got[0] == b"landed"
    assert proxy.injected["lose_response"] == 1 and proxy.forwarded == 1


def test_s3_lost_response_retried_conditional_put_succeeds_via_head(proxy: FaultProxy, bucket: str,
                                                                    direct: S3Store) -> None:
    s = _via(proxy, bucket, attempts=3)
    proxy.rule("lose_response", method="PUT", count=1)
    etag = s.put("k", b"landed", if_none_match=True)
    assert direct.get("k") == (b"landed", etag)
    # PUT (lost) -> PUT (412, it exists) -> HEAD: our write-id, so the first try landed
    assert s.stats["put"] == 2 and s.stats["head"] == 1
    assert proxy.injected["lose_response"] == 1 and proxy.forwarded == 3
    # a genuine conflict is still a Conflict
    with pytest.raises(Conflict):
        s.put("k", b"other", if_none_match=True)


def test_s3_error503_outage(proxy: FaultProxy, bucket: str, direct: S3Store) -> None:
    s = _via(proxy, bucket, attempts=2)
    with proxy.outage("error503"):
        with pytest.raises(StoreUnavailable, match="SlowDown"):
            s.put("k", b"v", if_none_match=True)
        with pytest.raises(StoreUnavailable):
            s.get("k")
        with pytest.raises(StoreUnavailable):
            s.list("")
    assert proxy.injected["error503"] == 6  # 3 operations x 2 attempts
    assert proxy.forwarded == 0
    assert direct.get("k") is None
    s.put("k", b"v", if_none_match=True)  # the outage ended
    assert direct.get("k") is not None


def test_s3_error503_retried_once_then_succeeds(proxy: FaultProxy, bucket: str, direct: S3Store) -> None:
    s = _via(proxy, bucket, attempts=2)
    proxy.rule("error503", count=1)
    s.put("k", b"v", if_none_match=True)
    assert s.stats["put"] == 2 and proxy.injected["error503"] == 1


@pytest.mark.parametrize("kind", ["drop", "reset"])
def test_s3_drop_and_reset_never_reach_server(proxy: FaultProxy, bucket: str, direct: S3Store, kind: str) -> None:
    s = _via(proxy, bucket, attempts=2)
    with proxy.outage(kind):
        with pytest.raises(StoreUnavailable):
            s.put("k", b"v", if_none_match=True)
        with pytest.raises(StoreUnavailable):
            s.get("k")
    assert proxy.injected[kind] == 4 and proxy.forwarded == 0
    assert direct.get("k") is None
    assert s.put("k", b"v", if_none_match=True)


def test_s3_configure_probabilities_and_latency(proxy: FaultProxy, bucket: str, direct: S3Store) -> None:
    s = _via(proxy, bucket, attempts=8)
    proxy.configure(latency=1.0, latency_s=(0.01, 0.03))
    assert s.put("slow", b"v", if_none_match=True)
    assert s.get("slow") is not None
    assert proxy.injected["latency"] == 2

    proxy.configure(drop=0.06, error503=0.08, reset=0.06, lose_response=0.08)
    etags = {f"r/{i}": s.put(f"r/{i}", f"v{i}".encode(), if_none_match=True) for i in range(25)}
    proxy.configure()  # all faults off
    assert {k: direct.get(k) for k in etags} == {k: (f"v{k[2:]}".encode(), e) for k, e in etags.items()}
    injected = proxy.injected
    assert injected["latency"] == 2 and sum(injected.values()) > 2  # some faults fired, all absorbed
    assert s.list("r/") == sorted(etags)
