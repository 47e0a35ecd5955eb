"""Persistence: one try when it succeeds, retries through an outage, none through a refusal."""

from __future__ import annotations

import threading

import pytest

from dagcraft.errors import StoreRefused, StoreUnavailable
from dagcraft.primitives.persist import ONCE, Persistence


def _flaky(failures: list[BaseException]):
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "landed"
    return fn, calls


def test_outage_is_retried_until_the_write_lands():
    fn, calls = _flaky([StoreUnavailable("down"), StoreUnavailable("still down")])
    assert Persistence(limit_s=30, first_wait_s=0.001, max_wait_s=0.002).call(fn) == "landed"
    assert len(calls) == 3


def test_success_is_one_call_and_a_refusal_is_never_retried():
    fn, calls = _flaky([])
    assert Persistence().call(fn) == "landed" and len(calls) == 1
    fn, calls = _flaky([StoreRefused("read-only")])
    with pytest.raises(StoreRefused):
        Persistence(first_wait_s=0.001).call(fn)
    assert len(calls) == 1


def test_once_and_a_set_stop_give_up_after_the_first_try():
    fn, calls = _flaky([StoreUnavailable("down")])
    with pytest.raises(StoreUnavailable):
        ONCE.call(fn)
    assert len(calls) == 1
    stop = threading.Event()
    stop.set()
    fn, calls = _flaky([StoreUnavailable("down")])
    with pytest.raises(StoreUnavailable):
        Persistence(first_wait_s=0.001).call(fn, stop=stop)
    assert len(calls) == 1


def test_the_limit_ends_the_retries():
    fn, calls = _flaky([StoreUnavailable(f"down {i}") for i in range(10_000)])
    with pytest.raises(StoreUnavailable):
        Persistence(limit_s=0.05, first_wait_s=0.001, max_wait_s=0.002).call(fn)
    assert 2 <= len(calls) < 10_000
