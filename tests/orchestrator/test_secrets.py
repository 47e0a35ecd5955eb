"""Issue 9.3: secrets never reach the store, a scratch file or another step.

Real runs on the real stores; after each run every object in the store (keys and bodies),
``status --json``, the HTML report and the scratch directory are searched for the secret.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from dagcraft.orchestrator import layout, run_status, write_report
from tests.faults import FaultyStore
from tests.orchestrator.helpers import drive_inline, run_spec, steps, submit_spec, write_spec

SECRET = "hunter2-" + "Zq9xVb7LmN3kP"  # an exact value: no credential shape
GHP = "ghp_" + "abcdefghijklmnopqrstuvwxyz0123456789"  # a shape, not a param
SECRET_SHA = hashlib.sha256(SECRET.encode()).hexdigest()


def store_hits(store: Any, needle: str) -> list[str]:
    """Every key whose name or body contains ``needle``."""
    hits = []
    for key in store.list(""):
        got = store.get(key)
        if needle in key or (got is not None and needle.encode() in got[0]):
            hits.append(key)
    return hits


def dir_hits(root: Path, needle: str) -> list[str]:
    if not root.exists():
        return []
    return [str(p) for p in root.rglob("*")
            if needle in str(p) or (p.is_file() and needle.encode() in p.read_bytes())]


LEAKY = """
    name: leaky
    params:
      token: {type: string, secret: true}
    steps:
      - id: leak
        run: "echo token=${{ params.token }} >> $DAGCRAFT_OUTPUT; cat %s >> $DAGCRAFT_OUTPUT"
        outputs: {values: [token, nested]}
        cache: true
      - id: down
        needs: [leak]
        run: "echo got=${{ steps.leak.outputs.token }} >> $DAGCRAFT_OUTPUT"
        outputs: {values: [got]}
"""


@pytest.fixture
def leaky(tmp_path) -> str:
    """The spec; its step reads a GitHub-token-shaped output from a file: the spec never holds it."""
    path = tmp_path / "nested.txt"
    path.write_text(f'nested={{"k": ["{GHP}"]}}\n')
    return LEAKY % path


def test_secret_in_outputs_never_lands(store, tmp_path, monkeypatch, leaky):
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", SECRET)
    rid, st = run_spec(store, tmp_path, leaky, params={"token": SECRET})
    assert st["status"] == "succeeded", st
    by = steps(st)
    assert by["leak"]["outputs"]["token"] == "[redacted]"
    assert by["leak"]["outputs"]["nested"] == {"k": ["[redacted]"]}
    assert by["down"]["outputs"]["got"] == "[redacted]"
    write_report(store, rid, tmp_path / "report.html")
    for needle in (SECRET, GHP):
        assert store_hits(store, needle) == [], needle
        assert needle not in json.dumps(run_status(store, rid), default=str)
        assert needle not in (tmp_path / "report.html").read_text()
        assert dir_hits(tmp_path / "work", needle) == [], needle
    # the cache entry was written redacted, and a hit serves the redacted outputs
    entries = [k for k in store.list("") if k.startswith("cache/")]
    assert entries and all(SECRET.encode() not in store.get(k)[0] for k in entries)
    (tmp_path / "again").mkdir()
    rid2, st2 = run_spec(store, tmp_path / "again", leaky, params={"token": SECRET})
    assert steps(st2)["leak"]["cached_from"] and steps(st2)["leak"]["outputs"]["token"] == "[redacted]"
    assert store_hits(store, SECRET) == []


def test_a_plaintext_cache_entry_is_redacted_when_served(local_store, tmp_path, monkeypatch, leaky):
    """An entry written before redaction existed (or by hand) never brings a secret back."""
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", SECRET)
    rid, _ = run_spec(local_store, tmp_path, leaky, params={"token": SECRET})
    (key,) = [k for k in local_store.list("") if k.startswith("cache/")]
    entry = json.loads(local_store.get(key)[0])
    entry["outputs"] = {"token": SECRET, "nested": GHP}
    local_store.put(key, json.dumps(entry).encode())
    (tmp_path / "again").mkdir()
    rid2, st2 = run_spec(local_store, tmp_path / "again", leaky, params={"token": SECRET})
    assert steps(st2)["leak"]["cached_from"]
    assert steps(st2)["leak"]["outputs"] == {"token": "[redacted]", "nested": "[redacted]"}
    assert [k for k in store_hits(local_store, SECRET) if not k.startswith("cache/")] == []


def test_only_steps_that_reference_a_secret_receive_it(local_store, tmp_path, monkeypatch):
    # the worker holds every secret in its environment (that is how it gets them)
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", SECRET)
    rid, st = run_spec(local_store, tmp_path, f"""
        name: scoped
        params:
          token: {{type: string, secret: true}}
        steps:
          - id: user
            run: "printf %s '${{{{ params.token }}}}' | sha256sum | grep -q {SECRET_SHA} && echo ok=1 >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [ok]}}
          - id: dumper
            run: "env > env.txt; echo env_b64=$(env | base64 -w0) >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [env_b64], artifacts: [env.txt]}}
          - id: templ
            run: "echo seen=${{{{ env.DAGCRAFT_PARAM_TOKEN | default('none') }}}} >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [seen]}}
    """, params={"token": SECRET})
    assert st["status"] == "succeeded", st
    by = steps(st)
    assert by["user"]["outputs"]["ok"] == 1  # the referencing step got the real value
    import base64
    dumped = base64.b64decode(by["dumper"]["outputs"]["env_b64"]).decode()
    assert SECRET not in dumped and "DAGCRAFT_PARAM_TOKEN" not in dumped
    assert "DAGCRAFT_STEP=dumper" in dumped  # it did dump its environment
    assert by["templ"]["outputs"]["seen"] == "none"
    assert store_hits(local_store, SECRET) == []  # the artifact env.txt included


SCRATCH = """
    name: scratch
    steps:
      - id: look
        run: "echo dir=$(dirname $DAGCRAFT_OUTPUT) >> $DAGCRAFT_OUTPUT; echo secretish > work.txt; echo hi"
        outputs: {values: [dir]}
"""


def test_scratch_dirs_are_private_and_removed(local_store, tmp_path):
    spec = write_spec(tmp_path, SCRATCH.replace("echo hi", "stat -c '%a %n' $(dirname $DAGCRAFT_OUTPUT) "
                                                "$(dirname $DAGCRAFT_OUTPUT)/.. $(dirname $DAGCRAFT_OUTPUT)/../.. "
                                                "$(dirname $DAGCRAFT_OUTPUT)/../../.. "
                                                "| tr '\\n' ';' | sed 's/^/modes=/' >> $DAGCRAFT_OUTPUT"))
    spec.write_text(spec.read_text().replace("values: [dir]", "values: [dir, modes]"))
    rid = submit_spec(local_store, spec)
    st = drive_inline(local_store, rid, tmp_path)
    assert st["status"] == "succeeded", st
    out = steps(st)["look"]["outputs"]
    modes = [m.split(" ")[0] for m in out["modes"].strip(";").split(";")]
    assert modes == ["700"] * 4, out["modes"]  # attempt dir, step dir, run dir, tmp_root
    assert not Path(out["dir"]).exists()
    # audit: the empty step and run directories above it go too (they piled up in /tmp)
    assert not (tmp_path / "work" / rid).exists(), list((tmp_path / "work").rglob("*"))
    assert stat.S_IMODE((tmp_path / "work").stat().st_mode) == 0o700


def test_scratch_dirs_are_kept_with_keep_workdirs(local_store, tmp_path):
    from dagcraft.orchestrator import WorkerConfig
    from dagcraft.orchestrator.worker import Worker

    rid = submit_spec(local_store, write_spec(tmp_path, SCRATCH))
    cfg = WorkerConfig(store=local_store, store_url=local_store.url, worker_id="w", tmp_root=tmp_path / "work",
                       keep_workdirs=True)
    Worker(cfg, run_id=rid, concurrency=1, exit_when_idle=True, poll_min=0.01, poll_max=0.05).run()
    out = steps(run_status(local_store, rid))["look"]["outputs"]
    kept = Path(out["dir"])
    assert (kept / "work" / "work.txt").read_text() == "secretish\n"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700


def test_a_queued_upload_survives_the_scratch_dir(local_store, tmp_path):
    """The outbox owns a copy of what it queued: removing the attempt's dir loses nothing."""
    faulty = FaultyStore(local_store)
    rule = faulty.rule("put_file", key_contains="stdout.log", count=1)
    rid = submit_spec(local_store, write_spec(tmp_path, SCRATCH))
    st = drive_inline(faulty, rid, tmp_path)
    assert st["status"] == "succeeded" and rule.fired == 1
    assert local_store.get(f"{layout.attempt_prefix(rid, 'look', 1)}/stdout.log")[0] == b"hi\n"
    assert not Path(steps(st)["look"]["outputs"]["dir"]).exists()
    outbox = tmp_path / "work" / "outbox"
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700
    assert [p for p in outbox.rglob("*") if p.is_file()] == []  # the copy went with its note


def test_a_failure_reason_holding_the_secret_is_redacted(local_store, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", SECRET)
    rid, st = run_spec(local_store, tmp_path, """
        name: reason
        params:
          token: {type: string, secret: true}
        steps:
          - id: spawn
            run: ["${{ params.token }}"]
    """, params={"token": SECRET})
    assert st["status"] == "failed"
    reason = steps(st)["spawn"]["reason"]
    assert "[redacted]" in reason and SECRET not in reason
    assert store_hits(local_store, SECRET) == []


def test_a_foreach_over_a_secret_is_refused(local_store, tmp_path, monkeypatch):
    """A foreach child's item is stored (its definition, its id, journal keys): refused."""
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", SECRET)
    rid, st = run_spec(local_store, tmp_path, """
        name: fan
        params:
          token: {type: string, secret: true}
        steps:
          - id: each
            foreach: "${{ [params.token, 'plain'] }}"
            run: ["echo", "${{ item }}"]
    """, params={"token": SECRET})
    assert st["status"] == "failed"
    assert "secret" in steps(st)["each"]["reason"]
    assert store_hits(local_store, SECRET) == []


@pytest.mark.parametrize("field", [
    'foreach: "${{ params.token }}"',  # not a list: the error quoted the value
    'when: "${{ params.token.nope.x }}"',
])
def test_a_fan_out_or_condition_error_quoting_the_secret_is_redacted(local_store, tmp_path, monkeypatch, field):
    """Audit: a step that cannot start records its error as the reason: redacted like any other."""
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", SECRET)
    rid, st = run_spec(local_store, tmp_path, f"""
        name: fan
        params:
          token: {{type: string, secret: true}}
        steps:
          - id: each
            {field}
            run: ["echo", "x"]
    """, params={"token": SECRET})
    assert st["status"] == "failed"
    assert SECRET not in steps(st)["each"]["reason"]
    assert store_hits(local_store, SECRET) == []


def test_a_worker_without_the_secret_fails_the_step_that_needs_it(local_store, tmp_path, monkeypatch):
    """Not given the secret, a worker must not run the store's placeholder in its place."""
    monkeypatch.delenv("DAGCRAFT_PARAM_TOKEN", raising=False)
    spec = write_spec(tmp_path, f"""
        name: nosecret
        params:
          token: {{type: string, secret: true}}
        steps:
          - id: free
            run: "echo free"
          - id: needs_it
            run: "echo ${{{{ params.token }}}} > {tmp_path / 'ran'}"
    """)
    rid = submit_spec(local_store, spec, {"token": SECRET})
    st = drive_inline(local_store, rid, tmp_path)
    by = steps(st)
    assert by["free"]["status"] == "succeeded"
    assert by["needs_it"]["status"] == "failed" and by["needs_it"]["attempt"] == 1
    assert "secret parameter 'token' is not set" in by["needs_it"]["reason"]
    assert not (tmp_path / "ran").exists()


def test_private_dir_survives_parents_removed_concurrently(tmp_path):
    """Attempts remove their empty step/run directories when they end; a sibling attempt
    creating its scratch dir at that moment must still get it (private_dir starts over)."""
    import threading

    from dagcraft.orchestrator.scratch import private_dir

    root = tmp_path / "work"
    stop = threading.Event()

    def remover() -> None:
        # an adversary removing empty parents thousands of times a second (as ending attempts
        # do, far less often); paced so that it races private_dir instead of starving it
        # of the GIL, which only a tight loop on one core could do
        while not stop.wait(0.0002):
            for d in (root / "r" / "s", root / "r"):
                try:
                    d.rmdir()
                except OSError:
                    pass

    t = threading.Thread(target=remover)
    t.start()
    try:
        for i in range(100):
            made = private_dir(root / "r" / "s" / str(i), root)
            assert made.is_dir()  # its non-empty parents cannot be removed under it
            made.rmdir()
    finally:
        stop.set()
        t.join()


def test_a_spare_attempt_dir_is_reused_only_when_private(tmp_path):
    """Attempt directories are recycled through ``tmp_root/.spare``; a spare that is not a
    0700 directory of this user (a symlink, a loosened mode) is never used as one."""
    import os

    from dagcraft.orchestrator.scratch import SPARE_DIR, attempt_dir, private_dir, release_attempt_dir

    root = tmp_path / "dagcraft"
    first = attempt_dir(root / "r" / "s" / "1", root)
    (first / "work").mkdir()
    (first / "work" / "left.txt").write_text("x")
    (first / "trace.jsonl").write_text("{}")
    ino = first.stat().st_ino
    release_attempt_dir(first, root)
    assert not first.exists() and len(os.listdir(root / SPARE_DIR)) == 1
    second = attempt_dir(root / "r" / "s" / "2", root)
    assert second.stat().st_ino == ino  # the same directory, renamed into place
    assert os.listdir(second) == ["work"] and os.listdir(second / "work") == []
    assert os.listdir(root / SPARE_DIR) == []
    # planted spares: a symlink to elsewhere, and a directory anyone can read
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / SPARE_DIR / "a")
    loose = private_dir(root / SPARE_DIR / "b", root)
    loose.chmod(0o755)
    for n in ("3", "4"):
        made = attempt_dir(root / "r" / "s" / n, root)
        st = made.lstat()
        assert not made.is_symlink() and (st.st_mode & 0o777) == 0o700 and os.listdir(made) == []
    assert elsewhere.is_dir() and os.listdir(root / SPARE_DIR) == []
