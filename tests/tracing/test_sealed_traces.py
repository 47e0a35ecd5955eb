"""Sealed traces, attacked as someone who can rewrite the store but holds no key: every tamper
goes through the real CLI on a real run (local store, and the moto S3 server once)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dagcraft.orchestrator.model import RunStatus, StepStatus, load_control, load_state, seal_material
from dagcraft.tracing import seal
from dagcraft.tracing.event import encode_event
from tests.orchestrator.helpers import cli, write_spec

RUN = "seal-1"
SPEC = """
    name: sealed
    steps:
      - id: good
        run: "echo fine; env"
      - id: bad
        needs: [good]
        run: "echo broken; exit 3"
"""


def _keypair(d: Path, name: str) -> tuple[Path, Path, bytes]:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    priv.write_bytes(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub, pem


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | bytes]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub, pem = _keypair(d, "signer")
    _, other_pub, _ = _keypair(d, "other")
    return {"priv": priv, "pub": pub, "pem": pem, "other_pub": other_pub}


@pytest.fixture(scope="module")
def sealed_store(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path | bytes]) -> Path:
    """One real signed run (the key given as $DAGCRAFT_SIGNING_KEY): `good` succeeds, `bad` fails."""
    d = tmp_path_factory.mktemp("sealed")
    spec = write_spec(d, SPEC)
    store = d / "store"
    pem = keys["pem"]
    assert isinstance(pem, bytes)
    proc = cli("run", str(spec), "--store", str(store), "--run-id", RUN, "--workers", "1", "--no-report",
               cwd=d, env={"DAGCRAFT_SIGNING_KEY": pem.decode()})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the run failed (step `bad`)
    return store


@pytest.fixture
def store(sealed_store: Path, tmp_path: Path) -> Path:
    """A private copy of the sealed run, to tamper with."""
    dst = tmp_path / "store"
    shutil.copytree(sealed_store, dst)
    return dst


class Obj:
    """One object of the run in the store, read and rewritten through the store's own API
    (what someone with write access to the bucket can do)."""

    def __init__(self, root: Path, key: str) -> None:
        from dagcraft.primitives.local import LocalStore

        self.store, self.key = LocalStore(root), key

    def read_bytes(self) -> bytes:
        got = self.store.get(self.key)
        assert got is not None, self.key
        return got[0]

    def write_bytes(self, data: bytes) -> None:
        self.store.put(self.key, data)

    def unlink(self) -> None:
        self.store.delete(self.key)

    def local_copy(self, tmp: Path) -> Path:
        p = tmp / "copy.jsonl"
        p.write_bytes(self.read_bytes())
        return p


def trace_file(store: Path, step: str, attempt: str = "1") -> Obj:
    return Obj(store, f"runs/{RUN}/steps/{step}/attempts/{attempt}/trace.jsonl")


def state_file(store: Path, step: str) -> Obj:
    return Obj(store, f"runs/{RUN}/steps/{step}/state.json")


def control_file(store: Path) -> Obj:
    return Obj(store, f"runs/{RUN}/control.json")


def read_lines(p: Obj) -> list[dict]:
    return [json.loads(line) for line in p.read_bytes().splitlines()]


def write_rechained(p: Obj, events: list[dict]) -> None:
    """Write events with every ``prev`` recomputed: a chain that verifies on its own."""
    out: list[bytes] = []
    for i, ev in enumerate(events):
        ev = dict(ev, seq=i + 1, prev=hashlib.sha256(out[-1]).hexdigest() if out else None)
        out.append(encode_event(ev))
    p.write_bytes(b"".join(line + b"\n" for line in out))


def as_success(events: list[dict]) -> list[dict]:
    """The failed step's trace rewritten to say it succeeded."""
    out = []
    for ev in events:
        ev = json.loads(json.dumps(ev))
        if ev["kind"] == "tool.result":
            ev["payload"].update(success=True, exit_code=0)
        if ev["kind"] == "run.finished":
            ev["payload"].update(status="succeeded", exit_code=0, reason=None)
        out.append(ev)
    return out


def verify(store: Path, target: str = RUN, *extra: str) -> tuple[int, dict]:
    proc = cli("trace", "verify", target, "--store", str(store), "--json", *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def trace_statuses(report: dict) -> dict[str, str]:
    return {t["path"]: t["status"] for t in report["traces"]}


def test_an_untouched_run_verifies_with_its_heads_pinned_and_its_seal_signed(store: Path, keys: dict) -> None:
    code, rep = verify(store, RUN, "--public-key", str(keys["pub"]))
    assert code == 0 and rep["ok"] and rep["status"] == "ok", rep
    assert trace_statuses(rep) == {f"{RUN}/good/1": "ok", f"{RUN}/bad/1": "ok"}
    assert rep["signed"] and rep["signature_checked"] and rep["run_status"] == "failed"
    # the commit pinned the trace's final line (run.finished), not a line before it
    for step in ("good", "bad"):
        [h] = load_state(state_file(store, step).read_bytes()).history
        last = trace_file(store, step).read_bytes().splitlines()[-1]
        assert json.loads(last)["kind"] == "run.finished"
        assert h.trace_head == hashlib.sha256(last).hexdigest()
    human = cli("trace", "verify", f"{RUN}/bad/1", "--store", str(store))
    assert human.returncode == 0 and human.stdout.startswith(f"{RUN}/bad/1: valid"), human.stdout


def test_last_line_edit_is_a_head_mismatch(store: Path, tmp_path: Path) -> None:
    p = trace_file(store, "bad")
    lines = p.read_bytes().splitlines()
    lines[-1] = lines[-1].replace(b'"status":"failed"', b'"status":"succeeded"')
    assert b'"succeeded"' in lines[-1]
    p.write_bytes(b"\n".join(lines) + b"\n")
    for target in (RUN, f"{RUN}/bad", f"{RUN}/bad/1"):
        code, rep = verify(store, target)
        assert code == 1 and not rep["ok"] and rep["status"] == "head mismatch", (target, rep)
        assert trace_statuses(rep)[f"{RUN}/bad/1"] == "head mismatch"
    # the file alone still chains: only the pinned head catches an edit of the last line
    assert cli("trace", "verify", str(p.local_copy(tmp_path))).returncode == 0


def test_rewrite_and_rechain_is_a_head_mismatch(store: Path, tmp_path: Path) -> None:
    p = trace_file(store, "bad")
    write_rechained(p, as_success(read_lines(p)))
    assert cli("trace", "verify", str(p.local_copy(tmp_path))).returncode == 0  # a consistent chain on its own ...
    code, rep = verify(store)
    assert code == 1 and rep["status"] == "head mismatch", rep  # ... but not the one committed
    assert trace_statuses(rep) == {f"{RUN}/good/1": "ok", f"{RUN}/bad/1": "head mismatch"}


def test_rechain_and_repin_the_step_state_breaks_the_run_seal(store: Path) -> None:
    p = trace_file(store, "bad")
    write_rechained(p, as_success(read_lines(p)))
    st = load_state(state_file(store, "bad").read_bytes())
    st.history[0].trace_head = hashlib.sha256(p.read_bytes().splitlines()[-1]).hexdigest()
    st.status, st.exit_code = StepStatus.SUCCEEDED, 0
    state_file(store, "bad").write_bytes(st.dump())
    code, rep = verify(store)
    assert code == 1 and rep["status"] == "seal mismatch" and rep["seal_status"] == "seal mismatch", rep
    assert set(trace_statuses(rep).values()) == {"ok"}  # every trace matches its (forged) pin


def test_forged_seal_without_the_key_is_a_bad_signature(store: Path, keys: dict) -> None:
    """Rewrite trace, step state and the seal's digest consistently: only the signature tells."""
    p = trace_file(store, "bad")
    write_rechained(p, as_success(read_lines(p)))
    st = load_state(state_file(store, "bad").read_bytes())
    st.history[0].trace_head = hashlib.sha256(p.read_bytes().splitlines()[-1]).hexdigest()
    st.status = StepStatus.SUCCEEDED
    state_file(store, "bad").write_bytes(st.dump())
    ctl = load_control(control_file(store).read_bytes())
    states = [load_state(state_file(store, s).read_bytes()) for s in ("good", "bad")]
    ctl.status = RunStatus.SUCCEEDED
    assert ctl.seal is not None
    ctl.seal.digest = seal.digest(seal_material(RUN, ctl.status, ctl.generation, states))
    control_file(store).write_bytes(ctl.model_dump_json().encode())
    code, rep = verify(store)
    assert code == 0, rep  # without a public key, a consistent rewrite cannot be told apart
    code, rep = verify(store, RUN, "--public-key", str(keys["pub"]))
    assert code == 1 and rep["status"] == "bad signature", rep
    # stripping the signature instead: unsigned, when a key is required
    ctl.seal.signature = ctl.seal.key_id = None
    control_file(store).write_bytes(ctl.model_dump_json().encode())
    code, rep = verify(store, RUN, "--public-key", str(keys["pub"]))
    assert code == 1 and rep["status"] == "unsigned", rep


def test_another_key_is_a_bad_signature(store: Path, keys: dict) -> None:
    code, rep = verify(store, RUN, "--public-key", str(keys["other_pub"]))
    assert code == 1 and rep["status"] == "bad signature" and "not by the given key" in rep["seal_problem"], rep


def test_deleted_last_line_is_a_head_mismatch(store: Path) -> None:
    p = trace_file(store, "good")
    p.write_bytes(b"".join(line + b"\n" for line in p.read_bytes().splitlines()[:-1]))
    code, rep = verify(store)
    assert code == 1 and trace_statuses(rep)[f"{RUN}/good/1"] == "head mismatch", rep


def test_missing_trace(store: Path) -> None:
    trace_file(store, "good").unlink()
    code, rep = verify(store)
    assert code == 1 and rep["status"] == "missing", rep
    assert trace_statuses(rep) == {f"{RUN}/good/1": "missing", f"{RUN}/bad/1": "ok"}


def test_torn_tail(store: Path) -> None:
    p = trace_file(store, "bad")
    p.write_bytes(p.read_bytes() + b'{"version":1,"run_id":"seal-1","ev')
    code, rep = verify(store)
    assert code == 1 and rep["status"] == "torn tail", rep


def test_unknown_kind_is_rejected(store: Path, tmp_path: Path) -> None:
    p = trace_file(store, "good")
    events = read_lines(p)
    events[1]["kind"] = "evil.kind"
    write_rechained(p, events)
    file_check = cli("trace", "verify", str(p.local_copy(tmp_path)), "--json")
    assert file_check.returncode == 1 and json.loads(file_check.stdout)["status"] == "invalid"
    assert "unknown event kind 'evil.kind'" in json.loads(file_check.stdout)["problems"][0]
    code, rep = verify(store)
    assert code == 1 and trace_statuses(rep)[f"{RUN}/good/1"] == "invalid", rep


def test_seal_removed(store: Path) -> None:
    ctl = load_control(control_file(store).read_bytes())
    ctl.seal = None
    control_file(store).write_bytes(ctl.model_dump_json().encode())
    code, rep = verify(store)
    assert code == 1 and rep["status"] == "unsealed", rep


def test_the_signing_key_lands_nowhere(sealed_store: Path, keys: dict) -> None:
    pem = keys["pem"]
    assert isinstance(pem, bytes)
    body = b"".join(pem.splitlines()[1:-1])  # the base64 of the key, wherever it might be copied
    seen = 0
    for dirpath, _, files in os.walk(sealed_store):
        for name in files:
            data = (Path(dirpath) / name).read_bytes()
            seen += 1
            assert body not in data and body[:40] not in data, f"key material in {name}"
            assert b"DAGCRAFT_SIGNING_KEY" not in data, f"the key's variable reached {dirpath}/{name}"
    stdout = Obj(sealed_store, f"runs/{RUN}/steps/good/attempts/1/stdout.log").read_bytes()
    assert b"PATH=" in stdout and seen > 5  # the step did print its environment


def test_trace_commands_on_a_run_clean_up_and_label_run_step_attempt(store: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    s = cli("trace", "summary", RUN, "--store", str(store), env=env)
    assert s.returncode == 0 and f"== {RUN}/good/1" in s.stdout and str(tmp) not in s.stdout, s.stdout
    i = cli("trace", "inspect", f"{RUN}/bad", "--store", str(store), env=env)
    assert i.returncode == 0 and "run.finished" in i.stdout
    assert cli("trace", "verify", RUN, "--store", str(store), env=env).returncode == 0
    assert cli("trace", "policy-check", RUN, "--store", str(store), env=env).returncode == 0
    ledger = cli("trace", "ledger", "--all-runs", "--json", "--store", str(store), env=env)
    entries = json.loads(ledger.stdout)
    assert sorted(e["path"] for e in entries) == [f"{RUN}/bad/1/trace.jsonl", f"{RUN}/good/1/trace.jsonl"]
    assert {e["integrity"] for e in entries} == {"ok"}
    assert list(tmp.iterdir()) == []  # no dagcraft-traces-* (or any) directory left behind


def test_bad_public_key_is_exit_2_naming_the_file(store: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    proc = cli("trace", "verify", RUN, "--store", str(store), "--public-key", str(junk))
    assert proc.returncode == 2 and str(junk) in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_bad_signing_key_is_exit_2_and_submits_nothing(tmp_path: Path) -> None:
    from dagcraft.primitives.local import LocalStore

    spec = write_spec(tmp_path, SPEC)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    proc = cli("run", str(spec), "--store", str(tmp_path / "store"), "--signing-key", str(junk), cwd=tmp_path)
    assert proc.returncode == 2 and str(junk) in proc.stderr and "nope" not in proc.stderr, proc.stderr
    assert not (tmp_path / "store").exists() or not LocalStore(tmp_path / "store").list("runs/")
    env = cli("run", str(spec), "--store", str(tmp_path / "store"), cwd=tmp_path,
              env={"DAGCRAFT_SIGNING_KEY": "garbage"})
    assert env.returncode == 2 and "$DAGCRAFT_SIGNING_KEY" in env.stderr and "garbage" not in env.stderr
    assert not (tmp_path / "store").exists() or not LocalStore(tmp_path / "store").list("runs/")


def test_sealed_and_signed_on_s3(moto_server: str, tmp_path: Path, keys: dict) -> None:
    from tests.conftest import server_store_url

    url = server_store_url(moto_server)
    spec = write_spec(tmp_path, SPEC)
    proc = cli("run", str(spec), "--store", url, "--run-id", RUN, "--workers", "1", "--no-report",
               "--signing-key", str(keys["priv"]), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    ok = cli("trace", "verify", RUN, "--store", url, "--json", "--public-key", str(keys["pub"]))
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "ok", ok.stdout
    bad = cli("trace", "verify", RUN, "--store", url, "--json", "--public-key", str(keys["other_pub"]))
    assert bad.returncode == 1 and json.loads(bad.stdout)["status"] == "bad signature", bad.stdout


def test_foreach_and_rollback_runs_are_sealed(local_store, tmp_path: Path) -> None:
    from dagcraft.orchestrator.report import verify_sealed
    from tests.orchestrator.helpers import run_spec

    rid, st = run_spec(local_store, tmp_path, """
        name: mix
        on_failure: rollback
        steps:
          - id: plan
            run: "echo 'items=[1, 2]' >> $DAGCRAFT_OUTPUT"
            outputs: {values: [items]}
            rollback: "true"
          - id: each
            needs: [plan]
            foreach: "${{ steps.plan.outputs.items }}"
            run: ["sh", "-c", "echo \\"v=$1\\" >> $DAGCRAFT_OUTPUT", "x", "${{ item }}"]
          - id: last
            needs: [each]
            run: "exit 3"
    """)
    assert st["status"] == "rolled_back", st
    rep = verify_sealed(local_store, rid)
    assert rep.ok and rep.digest and not rep.signed, [t.message() for t in rep.traces] + [rep.seal_message()]
    labels = {t.path.split("/", 1)[1] for t in rep.traces}
    assert {"plan/1", "plan/rollback-1", "last/1"} <= labels and len(labels) == 5, labels  # + 2 children


def test_a_resumed_run_is_sealed_again(local_store, tmp_path: Path) -> None:
    from dagcraft.orchestrator import prepare_resume
    from dagcraft.orchestrator.report import verify_sealed
    from tests.orchestrator.helpers import drive_inline, run_spec

    flag = tmp_path / "fail-once"
    flag.write_text("x")
    rid, st = run_spec(local_store, tmp_path, f"""
        name: again
        steps:
          - id: flaky
            run: "if [ -e {flag} ]; then rm {flag}; exit 3; fi"
    """)
    assert st["status"] == "failed"
    first = verify_sealed(local_store, rid)
    assert first.ok, first.seal_message()
    prepare_resume(local_store, rid, retry_failed=True)
    running = verify_sealed(local_store, rid)  # reopened: the old seal is gone, the run is open
    assert not running.ok and running.status == "open"
    assert verify_sealed(local_store, rid, allow_open=True).ok
    assert drive_inline(local_store, rid, tmp_path)["status"] == "succeeded"
    again = verify_sealed(local_store, rid)
    assert again.ok and again.digest != first.digest and len(again.traces) == 2, again.seal_message()


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    from dagcraft.tracing.seal import load_public_key, load_signer

    out = tmp_path / "k.pem"
    proc = cli("trace", "keygen", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    signer = load_signer(out)
    assert signer is not None and signer.key_id in proc.stdout and "PRIVATE" not in proc.stdout
    assert seal.key_id(load_public_key(Path(str(out) + ".pub"))) == signer.key_id
    assert repr(signer) == f"Signer(key_id={signer.key_id!r})"  # no key material in logs
    before = out.read_bytes()
    again = cli("trace", "keygen", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and out.read_bytes() == before
