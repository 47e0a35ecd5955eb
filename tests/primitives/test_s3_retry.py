"""S3 specifics: a retried conditional PUT whose first try landed is not a false Conflict;
transient errors are retried; the clock comes from the Date header."""

from __future__ import annotations

import botocore.exceptions as bex
import pytest

from dagcraft.errors import Conflict


def _lose_first_response(store, op="PutObject"):
    """After the first PutObject reaches the server, make the client see a dropped connection."""
    state = {"n": 0}

    def after_call(**kwargs):
        state["n"] += 1
        if state["n"] == 1:
            raise bex.ConnectionClosedError(endpoint_url="http://lost-response")

    store.client.meta.events.register(f"after-call.s3.{op}", after_call)
    return state


@pytest.mark.parametrize("backend", ["moto_store", "s3_server_store"])
def test_retried_create_that_landed_is_not_a_conflict(request, backend):
    s = request.getfixturevalue(backend)
    _lose_first_response(s)
    s.stats.clear()
    etag = s.put("k", b"mine", if_none_match=True)
    assert s.get("k") == (b"mine", etag)
    assert s.stats["put"] == 2 and s.stats["head"] == 1  # first try landed, retry got 412, HEAD said ours


def test_retried_cas_that_landed_is_not_a_conflict(moto_store):
    s = moto_store
    e1 = s.put("k", b"v1")
    _lose_first_response(s)
    e2 = s.put("k", b"v2", if_match=e1)
    assert s.get("k") == (b"v2", e2)


def test_real_conflict_after_retry_is_still_a_conflict(moto_store):
    s = moto_store
    state = {"n": 0}

    def before_call(**kwargs):  # someone else creates the key, then our first try is lost
        state["n"] += 1
        if state["n"] == 1:
            raise bex.ConnectionClosedError(endpoint_url="http://lost-request")

    s.put("k", b"theirs")
    s.client.meta.events.register("before-call.s3.PutObject", before_call)
    with pytest.raises(Conflict):
        s.put("k", b"mine", if_none_match=True)
    assert s.get("k")[0] == b"theirs"


def test_transient_errors_retried_then_store_unavailable(moto_store):
    from dagcraft.errors import StoreUnavailable

    s = moto_store
    s.attempts = 3

    def always_fail(**kwargs):
        raise bex.ConnectionClosedError(endpoint_url="http://flaky")

    s.client.meta.events.register("after-call.s3.GetObject", always_fail)
    s.stats.clear()
    with pytest.raises(StoreUnavailable):
        s.get("k")
    assert s.stats["get"] == 3


def test_clock_from_date_header(s3_server_store):
    import time

    s = s3_server_store
    s.get("x")  # any response teaches the offset
    assert s._offset != 0.0 and abs(s._offset) < 2
    assert abs(s.now() - time.time()) < 2


class _BrokenBody:
    """A response body whose read fails like a connection reset mid-stream."""

    def __init__(self, body, exc):
        self.body, self.exc = body, exc

    def read(self, amt=None):
        self.body.read(1)  # some bytes arrived, then the connection broke
        raise self.exc

    def close(self):
        self.body.close()


def _break_body_reads(store, n, exc):
    """Make the body read of the first ``n`` GetObject responses raise ``exc``."""
    state = {"broken": 0}

    def after_call(parsed=None, **kwargs):
        if state["broken"] < n and parsed is not None and "Body" in parsed:
            state["broken"] += 1
            parsed["Body"] = _BrokenBody(parsed["Body"], exc)

    store.client.meta.events.register("after-call.s3.GetObject", after_call)
    return state


def _reset():
    import urllib3.exceptions as u3ex

    return u3ex.ProtocolError("Connection broken", ConnectionResetError(104, "Connection reset by peer"))


@pytest.mark.parametrize("make_exc", [
    lambda: bex.ResponseStreamingError(error=_reset()),
    _reset,  # a raw urllib3 error, should one escape botocore's wrapping
    lambda: bex.IncompleteReadError(actual_bytes=1, expected_bytes=5),
], ids=["ResponseStreamingError", "urllib3.ProtocolError", "IncompleteReadError"])
def test_body_read_error_is_retried(moto_store, make_exc):
    s = moto_store
    etag = s.put("k", b"hello")
    state = _break_body_reads(s, 2, make_exc())
    s.stats.clear()
    assert s.get("k") == (b"hello", etag)
    assert state["broken"] == 2 and s.stats["get"] == 3  # GET + read retried as one unit


def test_body_read_error_persisting_is_store_unavailable(moto_store):
    from dagcraft.errors import StoreUnavailable

    s = moto_store
    s.attempts = 3
    s.put("k", b"hello")
    _break_body_reads(s, 100, bex.ResponseStreamingError(error=_reset()))
    s.stats.clear()
    with pytest.raises(StoreUnavailable, match="connection lost while reading"):
        s.get("k")
    assert s.stats["get"] == 3
