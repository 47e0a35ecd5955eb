"""Costs that must not follow the DAG's size: submit writes a constant number of objects (a
step without a record is pending), and status reads each step by key, never listing the steps'
directories (which also hold every attempt's logs and traces). Counts, not timings."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dagcraft.errors import NotFound
from dagcraft.orchestrator import run_status
from dagcraft.orchestrator.model import StepStatus
from dagcraft.orchestrator.ops import latest_attempt, read_step_state
from dagcraft.primitives.local import LocalStore
from tests.orchestrator.helpers import drive_inline, submit_spec, write_spec


def chain_spec(n: int) -> str:
    lines = ["name: scale", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        if i >= 10:
            lines.append(f"    needs: [s{i - 10}]")
        lines.append('    run: ["true"]')
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("n", [10, 1000])
def test_submit_writes_five_objects_whatever_the_size(tmp_path, n):
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, chain_spec(n)))
    # run.json, control.json, a journal entry, the index entry, the idle workers' wake key
    assert store.stats["put"] == 5
    before = dict(store.stats)
    st = run_status(store, rid)
    assert st["counts"] == {"pending": n} and len(st["steps"]) == n
    assert store.stats["list"] - before.get("list", 0) <= 1  # the worker registry, not the steps
    assert store.stats["get"] - before.get("get", 0) <= n + 3
    assert read_step_state(store, rid, "s5").status == StepStatus.PENDING
    with pytest.raises(NotFound, match="has not started"):
        latest_attempt(store, rid, "s5")
    with pytest.raises(NotFound, match="step 'nope' not found"):
        read_step_state(store, rid, "nope")


def test_a_run_of_unwritten_steps_runs_to_the_end(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, chain_spec(40)))
    st = drive_inline(store, rid, tmp_path)
    assert st["status"] == "succeeded" and st["counts"] == {"succeeded": 40}
    before = dict(store.stats)
    run_status(store, rid)
    assert store.stats["list"] == before.get("list", 0)  # finished: not even the registry


def _creations(roots: dict[str, Path]):
    """Count what is created (a name that did not exist) under each root, via audit events:
    directories made, files opened with O_CREAT, and hard links made."""
    made: Counter[str] = Counter()
    live = [True]

    def where(path: object) -> str | None:
        if not isinstance(path, (str, os.PathLike)):
            return None
        p = os.fspath(path)
        if isinstance(p, bytes):
            return None
        for name, root in roots.items():
            if p.startswith(str(root) + os.sep):
                return name
        return None

    def hook(event: str, args: tuple) -> None:
        if not live[0]:
            return
        if event == "os.mkdir":
            path = args[0]
        elif event == "open" and isinstance(args[2], int) and args[2] & os.O_CREAT:
            path = args[0]
        elif event == "os.link":
            path = args[1]
        else:
            return
        name = where(path)
        if name is not None and not os.path.lexists(path):
            made[name] += 1

    sys.addaudithook(hook)  # hooks cannot be removed: this one switches itself off
    return made, live


def test_a_silent_step_costs_a_constant_few_files_and_directories(tmp_path):
    """Each scratch or store file made per attempt is an inode allocated (and, in scratch,
    freed again at the attempt's end): on ext4 without a journal the allocator skips every
    recently freed inode one by one, so this churn made per-step cost grow with the run. A
    silent step's attempt makes 1 thing in scratch (its trace: no empty log files, its directory
    is a recycled spare, and the step and run directories stay for the run's next attempts),
    and the store takes the trace by a link, not a copy."""
    n = 6
    lines = ["name: churn", "steps:"]
    for i in range(n):
        lines += [f"  - id: s{i}", '    run: ["true"]'] + ([f"    needs: [s{i - 1}]"] if i else [])
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, "\n".join(lines) + "\n"))
    made, live = _creations({"scratch": tmp_path / "work", "store-tmp": tmp_path / "store" / "tmp"})
    try:
        st = drive_inline(store, rid, tmp_path, concurrency=1, inline=True, status=False)
    finally:
        live[0] = False
    assert run_status(store, rid)["status"] == "succeeded", st
    # the run directory once, each step's directory once, the first attempt's directory, its
    # work directory and the spares' directory once; then only each attempt's trace (the
    # attempt directory is a spare renamed into place, emptied work/ included)
    assert made["scratch"] <= 1 + n + 3 + n, made
    # per step: a temp for each state write (claim, succeed) and the trace's link (journal
    # entries are made in place, the trace is not copied); per run: control, the status
    # summary written with the seal, the supervisor lease (2), the worker's registration (2)
    assert made["store-tmp"] <= 3 * n + 6, made
    assert not (tmp_path / "work" / rid).exists()  # and the run's scratch is gone at the end


def test_a_claim_reads_the_step_record_once(tmp_path):
    """Claiming a step never written (no record) read its record twice: the scheduler read
    it, found none, and the claim's transition read it again because no etag said it was
    read. One GET per step now (on S3 one request per step less)."""
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, chain_spec(30)))
    reads: Counter[str] = Counter()
    real_get = store.get

    def get(key: str):
        if key.endswith("/state.json"):
            reads[key] += 1
        return real_get(key)

    store.get = get  # type: ignore[method-assign]
    # inline: with an attempt thread, the main loop may list the attempt's journal entry
    # before the attempt marks it seen, and then read that step once more (benign, racy)
    st = drive_inline(store, rid, tmp_path, concurrency=1, inline=True, status=False)
    assert st == {}
    assert len(reads) == 30 and set(reads.values()) == {1}


def _count_listings(store: LocalStore) -> list[int]:
    """Wrap ``store.list``: the returned list gets the number of keys of each listing made."""
    listed: list[int] = []
    real_list = store.list

    def counting(prefix: str, start_after: str | None = None, limit: int | None = None) -> list[str]:
        got = real_list(prefix, start_after=start_after, limit=limit)
        listed.append(len(got))
        return got

    store.list = counting  # type: ignore[method-assign]
    return listed


def test_a_feed_moves_past_keys_its_own_process_wrote(tmp_path):
    """A key this process wrote is marked seen and is not returned again, but it must still
    move the feed's cursor: a lone worker, whose every journal entry is its own, listed the
    whole journal on every poll (quadratic in the run's length: 8.8 -> 22.9 ms of CPU per
    step from 500 to 3,000 steps, one worker)."""
    from dagcraft.orchestrator.journal import KeyFeed
    from dagcraft.primitives.ulid import new_ulid, ulid_floor

    store = LocalStore(tmp_path / "store", fsync=False)
    feed = KeyFeed(store, "j/", sweep_s=3600.0)
    t0 = int(time.time() * 1000) - 120_000  # older than the settle margin: a long run's journal

    def entry(ms: int, name: str) -> str:
        return f"j/{ulid_floor(ms)[:10]}{ms % 10**16:016d}~{name}"

    first = entry(t0, "other")
    store.put(first, b"", if_none_match=True)
    assert feed.poll() == [first]
    own = []
    for i in range(50):
        key = entry(t0 + 1 + i, f"mine{i}")
        store.put(key, b"", if_none_match=True)
        feed.mark_seen(key)
        own.append(key)
    listed = _count_listings(store)
    assert feed.poll() == []  # its own keys: not new
    assert feed.poll() == []
    assert listed[0] >= 50 and listed[1] == 0  # the second lists nothing: the cursor is past them
    later = f"j/{new_ulid()}~other2"
    store.put(later, b"", if_none_match=True)
    assert feed.poll() == [later]


def test_a_key_that_lands_after_a_later_one_was_read_is_found_by_the_next_poll(tmp_path):
    """A writer takes its entry's ULID, then PUTs it; another writer that took a later ULID
    can land first, and a reader that read that one has moved its cursor past the first. The
    next poll must still find it (it waited for the next sweep: with four workers on two
    cores, a finished run was sealed up to 2 s late)."""
    from dagcraft.orchestrator.journal import KeyFeed
    from dagcraft.primitives.ulid import new_ulid

    store = LocalStore(tmp_path / "store", fsync=False)
    feed = KeyFeed(store, "j/", sweep_s=3600.0, settle_every_s=0.0)  # no sweep; every poll settles
    slow, fast = f"j/{new_ulid()}~slow", f"j/{new_ulid()}~fast"
    assert slow < fast
    store.put(fast, b"", if_none_match=True)
    assert feed.poll() == [fast]
    assert feed.poll() == []  # its first sweep (then none for an hour)
    store.put(slow, b"", if_none_match=True)  # the slow writer lands
    assert feed.poll() == [slow]
    assert feed.poll() == []  # each key once
    lazy = KeyFeed(store, "j/", sweep_s=3600.0, settle_every_s=3600.0)  # the margin is what finds it
    assert sorted(lazy.poll()) == [slow, fast] and lazy.poll() == []
    later_slow, later_fast = f"j/{new_ulid()}~slow2", f"j/{new_ulid()}~fast2"
    store.put(later_fast, b"", if_none_match=True)
    assert lazy.poll() == [later_fast]
    store.put(later_slow, b"", if_none_match=True)
    assert lazy.poll() == []  # missed without the margin


def test_a_feed_forgets_keys_that_left_its_window_in_order(tmp_path):
    """The feed remembers keys only while they can be listed again (its look-back window);
    forgetting pops the oldest, so a poll's cost follows what left the window (it rebuilt the
    whole remembered set on every poll: 0.29 -> 0.86 ms of CPU per step, 500 -> 3,000 steps)."""
    from dagcraft.orchestrator.journal import KeyFeed
    from dagcraft.primitives.ulid import ulid_floor

    store = LocalStore(tmp_path / "store", fsync=False)
    feed = KeyFeed(store, "j/", lookback_s=10.0, sweep_s=0.0)  # every poll sweeps the window
    t0 = 1_800_000_000_000

    def key(ms: int, i: int) -> str:
        return f"j/{ulid_floor(ms)[:10]}{i:016d}~s{i}"

    for second in range(60):
        batch = [key(t0 + second * 1000, second * 10 + i) for i in range(10)]
        for k in batch:
            store.put(k, b"", if_none_match=True)
        assert sorted(feed.poll()) == batch  # each key returned once, though every poll re-lists
        assert len(feed._seen) <= 10 * 12  # the window (10 s) and its 1 s margin, not the run
    late = key(t0 + 55_000, 9999)  # a slow clock's entry, inside the window: still found
    store.put(late, b"", if_none_match=True)
    assert feed.poll() == [late]


def test_a_writer_whose_clock_is_ahead_does_not_hide_the_other_writers(tmp_path):
    """One writer's clock two minutes ahead makes its entry the newest key, and the look-back
    window follows the newest key: re-listing from a second ago must go by the reader's clock,
    or every entry of the writers with good clocks sorts before the window and is never read
    (a UI that started a run's workers saw the run stay `running`)."""
    from dagcraft.orchestrator.journal import KeyFeed
    from dagcraft.primitives.ulid import new_ulid, ulid_floor

    store = LocalStore(tmp_path / "store", fsync=False)
    feed = KeyFeed(store, "j/", sweep_s=3600.0, settle_every_s=0.0)  # every poll settles, none sweeps
    ahead = f"j/{ulid_floor(int(time.time() * 1000) + 120_000)[:10]}{'0' * 15}1~@control"
    store.put(ahead, b"", if_none_match=True)
    assert feed.poll() == [ahead]
    feed._last_sweep = time.monotonic()
    honest = [f"j/{new_ulid()}~3~succeeded~s{i}" for i in range(3)]
    for k in honest:
        store.put(k, b"", if_none_match=True)
    assert sorted(feed.poll()) == honest
    assert feed.poll() == []


def test_a_sweep_lists_one_page_of_the_window_and_a_walk_finds_a_late_key(tmp_path):
    """The look-back window of a busy run holds tens of thousands of keys (about 20,000 at
    10,000 steps with 4 workers). Re-listing all of it every sweep cost each worker one LIST
    per 1,000 keys every 2 s: per step, that grows with the pool's size and throughput (about
    3 LISTs a step with 64 workers), and each sweep held the whole window in memory. A sweep
    lists one page, walking the window oldest to newest; a late key is found within a walk."""
    from dagcraft.orchestrator.journal import KeyFeed
    from dagcraft.primitives.ulid import ulid_floor

    store = LocalStore(tmp_path / "store", fsync=False)
    feed = KeyFeed(store, "j/", lookback_s=3600.0, sweep_s=0.0, settle_every_s=3600.0)  # every poll sweeps
    t0 = int(time.time() * 1000) - 600_000

    def key(ms: int, i: int) -> str:
        return f"j/{ulid_floor(ms)[:10]}{i:016d}~s{i}"

    window = [key(t0 + i, i) for i in range(0, 10_000, 2)]  # 5,000 keys
    for k in window:
        store.put(k, b"", if_none_match=True)
    assert sorted(feed.poll()) == window  # the first poll lists the journal (its start)
    listed = _count_listings(store)
    late = key(t0 + 7001, 7001)  # lands deep behind the cursor (a host whose clock is behind)
    store.put(late, b"", if_none_match=True)
    found = []
    for _ in range(6):  # a walk: 5 pages, and the poll past the newest key with each
        before = store.stats["list"]
        found += feed.poll()
        assert store.stats["list"] - before <= 2  # one page of the sweep, one poll at the head
    assert found == [late]
    assert max(listed) <= 1000  # no listing holds the window
    assert feed.poll() == [] and feed.poll() == []


@pytest.mark.parametrize("reads", [False, True])
def test_a_step_that_reads_nothing_upstream_decodes_no_ancestor(tmp_path, monkeypatch, reads):
    """A step whose templates, inputs and workdir cannot see upstream results is handed to
    its attempt without its ancestors' records: in a chain, step k decoded all k - 1 of them
    at every claim (quadratic in the chain's length). A step that does read them still
    gets them all (the control)."""
    from dagcraft.orchestrator import view as view_mod

    monkeypatch.setattr(view_mod.StepStates, "UNPACKED", 0)  # every access of a finished record decodes it
    decoded = Counter()
    real = view_mod.StepState.model_validate_json.__func__  # type: ignore[attr-defined]

    def counting(cls, data, *a, **kw):
        st = real(cls, data, *a, **kw)
        decoded[st.step_id] += 1
        return st

    monkeypatch.setattr(view_mod.StepState, "model_validate_json", classmethod(counting))
    n = 30
    lines = ["name: chain", "steps:"]
    for i in range(n):
        lines.append(f"  - id: s{i}")
        if i:
            lines.append(f"    needs: [s{i - 1}]")
        ref = "${{ steps.s" + str(i - 1) + ".status }}"
        lines.append(f'    run: ["echo", "{ref}"]' if reads and i else '    run: ["true"]')
    rid = submit_spec(LocalStore(tmp_path / "store", fsync=False), write_spec(tmp_path, "\n".join(lines) + "\n"))
    store = LocalStore(tmp_path / "store", fsync=False)
    drive_inline(store, rid, tmp_path, concurrency=1, inline=True, status=False)
    total = sum(decoded.values())
    if reads:
        assert total >= n * (n - 1) // 2  # every ancestor, at every claim
    else:
        assert total <= 3 * n, decoded  # a few per step (its own record), not its ancestors


def test_a_wide_ready_set_costs_a_cycle_what_changed(tmp_path, monkeypatch):
    """Every cycle walks the ready set; a step already decided (its plain ``success()`` true
    for its current version) is passed over without building its model or a template
    context. With 300 steps ready at once and one slot, cycles built ready steps' models again
    and again (the table keeps 256): 7,859 models for this run; now at most a few per step."""
    from dagcraft.orchestrator import steptable

    built = Counter()
    real = steptable.StepTable._remember

    def counting(self, sid, step):
        built[sid] += 1
        return real(self, sid, step)

    monkeypatch.setattr(steptable.StepTable, "_remember", counting)
    n = 300
    text = "name: wide\nsteps:\n" + "".join(f'  - {{id: s{i}, run: ["true"]}}\n' for i in range(n))
    store = LocalStore(tmp_path / "store", fsync=False)
    rid = submit_spec(store, write_spec(tmp_path, text))
    built.clear()  # what submit built is not the worker's
    drive_inline(store, rid, tmp_path, concurrency=1, inline=True, status=False)
    assert sum(built.values()) <= 3 * n, built.most_common(3)


def test_a_paged_feed_returns_every_entry_of_racing_writers_once(tmp_path):
    """Four writers race, and one entry in twenty is PUT up to 0.8 s after its ULID was taken
    (it lands behind keys the reader already passed). A reader whose sweep walks a window
    bigger than one page still returns every entry exactly once."""
    import random
    import threading
    from collections import Counter

    from dagcraft.orchestrator.journal import KeyFeed
    from dagcraft.primitives.ulid import new_ulid

    store = LocalStore(tmp_path / "store", fsync=False)
    written: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(w: int) -> None:
        rnd = random.Random(w)
        while not stop.is_set():
            uid = new_ulid()
            if rnd.random() < 0.05:
                stop.wait(rnd.random() * 0.8)  # a slow writer: its key lands late
            key = f"j/{uid}~{w}~succeeded~s{rnd.randrange(100)}"
            store.put(key, b"", if_none_match=True)
            with lock:
                written.append(key)

    feed = KeyFeed(store, "j/", lookback_s=5.0, sweep_s=0.3, page=100)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    got: list[str] = []
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            got += feed.poll()
    finally:
        stop.set()
        for t in threads:
            t.join()
    with lock:
        expected = set(written)
    deadline = time.monotonic() + 10.0  # a full walk of the window, at most
    while set(got) != expected and time.monotonic() < deadline:
        got += feed.poll()
    assert len(expected) > 500  # the window spans many pages
    assert set(got) == expected
    assert [k for k, n in Counter(got).items() if n > 1] == []
