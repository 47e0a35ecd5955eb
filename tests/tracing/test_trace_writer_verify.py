from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import warnings

import pytest
from _tracehelp import PY, make_trace

from dagcraft.errors import InvalidInput
from dagcraft.tracing import TornTailWarning, TraceWriter, read_trace, verify
from dagcraft.tracing.event import line_hash


def lines(p):
    return p.read_bytes().split(b"\n")[:-1]


def write_lines(p, ls):
    p.write_bytes(b"".join(x + b"\n" for x in ls))


def test_chain_fields(tmp_path):
    p = make_trace(tmp_path / "t.jsonl", n=3)
    evs = read_trace(p)
    raw = lines(p)
    assert [e.seq for e in evs] == [1, 2, 3, 4, 5]
    assert evs[0].prev is None and json.loads(raw[0])["prev"] is None
    for i in range(1, len(evs)):
        assert evs[i].prev == line_hash(raw[i - 1])
    assert len({e.event_id for e in evs}) == 5
    assert all(e.version == 1 and e.run_id == "run1" for e in evs)
    rep = verify(p)
    assert rep.ok and rep.status == "ok" and rep.events == 5 and rep.head == line_hash(raw[-1])


def test_writer_rejects_unknown_kind_accepts_extension(tmp_path):
    with TraceWriter(tmp_path / "t.jsonl", "r") as w:
        with pytest.raises(InvalidInput):
            w.append("bogus.kind")
        assert w.append("x.agent.custom", {"a": 1}).kind == "x.agent.custom"


def test_writer_refuses_other_run(tmp_path):
    p = make_trace(tmp_path / "t.jsonl")
    with pytest.raises(InvalidInput, match="belongs to run"):
        TraceWriter(p, "other")


def _tamper_cases():
    def edit(ls):
        obj = json.loads(ls[2])
        obj["payload"]["i"] = 99
        ls[2] = json.dumps(obj, separators=(",", ":")).encode()
        return ls, 4  # line 3 edited -> line 4's prev no longer matches

    def remove(ls):
        del ls[2]
        return ls, 3

    def insert(ls):
        obj = json.loads(ls[2])
        obj["event_id"] = "INSERTED"
        ls.insert(3, json.dumps(obj, separators=(",", ":")).encode())
        return ls, 4

    def reorder(ls):
        ls[2], ls[3] = ls[3], ls[2]
        return ls, 3

    def drop_first(ls):
        del ls[0]
        return ls, 1

    return {"edit": edit, "remove": remove, "insert": insert, "reorder": reorder, "drop_first": drop_first}


@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_tampering_detected_and_line_named(tmp_path, case):
    p = make_trace(tmp_path / "t.jsonl", n=5)
    assert verify(p).ok
    ls, bad_line = _tamper_cases()[case](lines(p))
    write_lines(p, ls)
    rep = verify(p)
    assert not rep.ok and rep.status == "tampered"
    assert rep.first_bad_line == bad_line, rep.problems
    assert f"line {bad_line}:" in rep.message()
    assert rep.torn_tail is None


def test_last_line_edit_needs_pinned_head(tmp_path):
    p = make_trace(tmp_path / "t.jsonl")
    head = verify(p).head
    ls = lines(p)
    ls[-1] = ls[-1].replace(b"succeeded", b"failedxxx")
    write_lines(p, ls)
    assert verify(p).ok  # a chain alone cannot see an edit of the last line ...
    rep = verify(p, expect_head=head)  # ... a pinned head can
    assert not rep.ok and rep.status == "head mismatch" and "head its commit pinned" in rep.message()


def test_open_trace_needs_allow_open(tmp_path):
    p = make_trace(tmp_path / "t.jsonl", finish=False)
    assert not verify(p).ok and "run.finished" in verify(p).message()
    assert verify(p, allow_open=True).ok


def test_first_event_must_be_run_started(tmp_path):
    with TraceWriter(tmp_path / "t.jsonl", "r") as w:
        w.append("tool.call")
        w.append("run.finished")
    rep = verify(tmp_path / "t.jsonl")
    assert not rep.ok and rep.first_bad_line == 1


def test_traceframe_file_is_valid_unchained(tmp_path):
    p = tmp_path / "tf.jsonl"
    evs = [
        {"version": 1, "run_id": "tf", "event_id": f"e{i}", "kind": k, "ts_ms": 1000 + i, "seq": i, "payload": {}}
        for i, k in enumerate(["run.started", "model.call", "tool.call", "tool.result", "run.finished"], 1)
    ]
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    rep = verify(p)
    assert rep.ok and rep.status == "unchained" and not rep.chained
    assert [e.kind for e in read_trace(p)][0] == "run.started"
    # appending with dagcraft's writer continues the file with a chain from there on
    with TraceWriter(p, "tf") as w:
        w.append("x.note", {"n": 1})
        w.append("run.finished", {"status": "succeeded"})
    rep = verify(p)
    assert rep.ok and rep.status == "ok" and rep.chained_from == 6
    # an unchained line slipped in after the chain started is caught
    ls = lines(p)
    ls.append(json.dumps({**evs[0], "kind": "run.finished", "event_id": "zz", "seq": 99, "ts_ms": 10**13}).encode())
    write_lines(p, ls)
    assert verify(p).first_bad_line == 8


def test_duplicate_ids_and_seq_and_ts(tmp_path):
    p = tmp_path / "t.jsonl"
    base = {"version": 1, "run_id": "r", "payload": {}}
    evs = [dict(base, event_id="a", kind="run.started", ts_ms=5, seq=1),
           dict(base, event_id="a", kind="tool.call", ts_ms=6, seq=2),
           dict(base, event_id="c", kind="run.finished", ts_ms=7, seq=3)]
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    assert verify(p).first_bad_line == 2
    evs[1]["event_id"] = "b"
    evs[2]["ts_ms"] = 1
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    assert "ts_ms" in verify(p).message()
    evs[2]["ts_ms"], evs[2]["seq"] = 9, 2
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    assert "seq" in verify(p).message()


KILLER = textwrap.dedent("""
    import os, sys, json
    from dagcraft.tracing import TraceWriter
    path = sys.argv[1]
    w = TraceWriter(path, "crash")
    w.append("run.started")
    for i in range(3):
        w.append("tool.call", {"i": i})
    # simulate the kernel having written only part of the next line, then die hard
    line = json.dumps({"version": 1, "run_id": "crash", "event_id": "torn", "kind": "tool.call",
                       "ts_ms": 1, "seq": 5, "payload": {"big": "x" * 100}}).encode()
    os.write(w._fd, line[: len(line) // 2])
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_kill9_mid_line_torn_tail_then_clean_append(tmp_path):
    p = tmp_path / "t.jsonl"
    proc = subprocess.Popen([PY, "-c", KILLER, str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"  # event, not sleep: the partial line is on disk
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not p.read_bytes().endswith(b"\n")
    rep = verify(p)
    assert not rep.ok and rep.problems == [] and rep.torn_tail == 5 and rep.events == 4
    assert "torn tail at line 5" in rep.message() and "invalid" not in rep.message()
    assert len(read_trace(p)) == 4  # readers skip the torn tail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = TraceWriter(p, "crash")
    assert any(issubclass(c.category, TornTailWarning) for c in caught)
    assert w.torn_tail is not None and w.torn_tail.line == 5 and not w.repaired_torn_tail
    w.append("run.finished", {"status": "failed"})
    w.close()
    assert w.repaired_torn_tail
    rep = verify(p)
    assert rep.ok, rep.problems
    evs = read_trace(p)
    assert [e.kind for e in evs][-2:] == ["trace.repaired", "run.finished"]
    assert evs[-2].payload["line"] == 5 and evs[-2].payload["dropped_bytes"] > 0
    assert [e.seq for e in evs] == list(range(1, 7))


def test_torn_only_line_is_repaired_with_an_event(tmp_path):
    # the writer crashed in the middle of the very first line: no complete line at all
    import hashlib

    p = tmp_path / "t.jsonl"
    line = json.dumps({"version": 1, "run_id": "crash", "event_id": "torn", "kind": "run.started",
                       "ts_ms": 1, "seq": 1, "payload": {"big": "x" * 100}, "prev": None}).encode()
    partial = line[: len(line) // 2]
    p.write_bytes(partial)
    rep = verify(p)
    assert rep.torn_tail == 1 and rep.events == 0 and rep.problems == []
    with pytest.warns(TornTailWarning):
        w = TraceWriter(p, "crash")
    assert w.torn_tail is not None and w.torn_tail.line == 1 and w.torn_tail.offset == 0
    w.append("run.started")
    w.append("run.finished", {"status": "failed"})
    w.close()
    assert w.repaired_torn_tail
    rep = verify(p)
    assert rep.ok, rep.problems
    evs = read_trace(p)
    # the trace still begins with run.started; the repair is recorded right after it
    assert [e.kind for e in evs] == ["run.started", "trace.repaired", "run.finished"]
    assert [e.seq for e in evs] == [1, 2, 3]
    assert evs[1].payload["line"] == 1 and evs[1].payload["dropped_bytes"] == len(partial)
    assert evs[1].payload["dropped_sha256"] == hashlib.sha256(partial).hexdigest()
    assert partial not in p.read_bytes()


def test_unterminated_complete_line_is_kept(tmp_path):
    p = make_trace(tmp_path / "t.jsonl", finish=False)
    p.write_bytes(p.read_bytes()[:-1])  # only the newline missing
    assert verify(p, allow_open=True).ok
    with TraceWriter(p, "run1") as w:
        w.append("run.finished")
    assert verify(p).ok and len(read_trace(p)) == 7


APPENDER = textwrap.dedent("""
    import sys
    from dagcraft.tracing import TraceWriter
    path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("go", flush=True); sys.stdin.readline()
    with TraceWriter(path, "shared", fsync=False) as w:
        for i in range(n):
            w.append("x.work", {"who": who, "i": i})
""")


def test_two_processes_append_1000_each(tmp_path):
    p = tmp_path / "t.jsonl"
    with TraceWriter(p, "shared") as w:
        w.append("run.started")
    procs = [subprocess.Popen([PY, "-c", APPENDER, str(p), who, "1000"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) for who in ("a", "b")]
    for pr in procs:
        assert pr.stdout.readline() == b"go\n"
    for pr in procs:  # release both together so their appends interleave
        pr.stdin.write(b"\n")
        pr.stdin.flush()
    for pr in procs:
        pr.stdin.close()
        assert pr.wait(60) == 0
    with TraceWriter(p, "shared") as w:
        w.append("run.finished")
    rep = verify(p)
    assert rep.ok, rep.problems
    evs = read_trace(p)
    assert len(evs) == 2002
    assert [e.seq for e in evs] == list(range(1, 2003))
    for who in "ab":
        assert [e.payload["i"] for e in evs if e.payload.get("who") == who] == list(range(1000))


def test_threads_share_a_writer(tmp_path):
    import threading

    p = tmp_path / "t.jsonl"
    w = TraceWriter(p, "r", fsync=False)
    w.append("run.started")
    ts = [threading.Thread(target=lambda: [w.append("x.t", {"i": i}) for i in range(200)]) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    w.append("run.finished")
    w.close()
    assert verify(p).ok and len(read_trace(p)) == 802


def test_read_trace_errors(tmp_path):
    from dagcraft.errors import NotFound

    with pytest.raises(NotFound):
        read_trace(tmp_path / "missing.jsonl")
    p = tmp_path / "bad.jsonl"
    p.write_text("garbage\n{}\n")
    with pytest.raises(InvalidInput, match=":1:"):
        read_trace(p)
    assert verify(p).first_bad_line == 1


def test_crlf_line_endings_are_named_not_blamed_on_an_edit(tmp_path):
    """A trace whose line endings were converted (a text-mode copy, git autocrlf) no longer has
    the bytes that were hashed: it does not verify, and the message says why instead of
    "line 1 was edited"."""
    p = make_trace(tmp_path / "t.jsonl")
    p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    rep = verify(p)
    assert not rep.ok and rep.status == "tampered" and rep.first_bad_line == 2
    assert "CRLF" in rep.message() and "edited" not in rep.message(), rep.message()
