"""Store capabilities: probed once per bucket, recorded, adapted to, enforced.

The real-server deviations (Ceph RGW, SeaweedFS) are reproduced by :class:`S3DeviantProxy` in
front of the real moto server: the server still decides every write the proxy forwards."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from dagcraft.errors import Conflict, StoreUnavailable
from dagcraft.orchestrator import list_runs, run_status
from dagcraft.primitives import capabilities
from dagcraft.primitives.capabilities import Capabilities
from dagcraft.primitives.s3 import S3Store
from dagcraft.primitives.url import open_store, s3_url
from tests.conftest import new_server_bucket
from tests.faults import S3DeviantProxy
from tests.orchestrator.helpers import REPO, cli, steps, write_spec

EXAMPLES = REPO / "examples"


@pytest.fixture
def deviant(moto_server):
    """``make(*deviations)`` → (proxy, URL of a fresh bucket through it, store through it,
    store on the same bucket straight to moto, for inspection)."""
    proxies: list[S3DeviantProxy] = []

    def make(*deviations: str, **kw):
        proxy = S3DeviantProxy(moto_server, set(deviations), **kw)
        proxy.start()
        proxies.append(proxy)
        bucket = new_server_bucket(moto_server)
        url = s3_url(bucket, "pfx", endpoint=proxy.url)
        return proxy, url, open_store(url), S3Store(bucket, "", endpoint_url=moto_server)

    yield make
    for p in proxies:
        p.stop()


def _fresh(store: S3Store, prefix: str | None = None) -> S3Store:
    """Another instance on the same bucket (as another process opens it): it has learned no
    capabilities yet."""
    return S3Store(store.bucket, store.prefix if prefix is None else prefix, endpoint_url=store.endpoint_url)


def _probe_counts(store) -> Counter:
    store.stats.clear()
    capabilities.probe(store)
    return Counter(store.stats)


# -- the probe and its record ---------------------------------------------------------------
def test_probe_on_moto_confirms_everything_in_a_fixed_number_of_requests(s3_server_store):
    store = s3_server_store
    store.stats.clear()
    caps = capabilities.probe(store)
    assert caps == capabilities.Capabilities.full().model_copy(update={"if_match_missing_status": 404})
    assert not caps.missing()
    assert dict(store.stats) == capabilities.PROBE_REQUESTS
    assert store.list("_dagcraft/") == []  # its scratch keys are gone


def test_probe_on_in_process_moto(moto_store):
    assert not capabilities.probe(moto_store).missing()


def test_probed_once_per_bucket_then_one_get_per_process(s3_server_store):
    # a prefix never probed, on a store instance that has learned nothing yet
    store = _fresh(s3_server_store, f"{s3_server_store.prefix}-fresh".lstrip("-"))
    assert store.capabilities is None
    first = capabilities.load(store)
    expected = Counter(capabilities.PROBE_REQUESTS)
    expected.update({"get": 1, "put": 1})  # read the (absent) record, record the result
    assert Counter(store.stats) == expected
    assert json.loads(store.get(capabilities.RECORD_KEY)[0])["protocol"] == capabilities.PROTOCOL_VERSION
    store.stats.clear()
    assert capabilities.load(store) == first
    assert sum(store.stats.values()) == 0  # held by the store instance
    # another instance (as in another process) reads the record once
    other = S3Store(store.bucket, store.prefix, endpoint_url=store.endpoint_url)
    assert capabilities.require(other) == first
    assert dict(other.stats) == {"get": 1}


def test_record_of_another_protocol_version_is_probed_again(s3_server_store):
    store = s3_server_store
    old = capabilities.Capabilities.full().model_copy(update={"protocol": capabilities.PROTOCOL_VERSION - 1,
                                                              "list_byte_order": False})
    store.put(capabilities.RECORD_KEY, old.model_dump_json().encode())
    caps = capabilities.load(_fresh(store))
    assert caps.list_byte_order and caps.protocol == capabilities.PROTOCOL_VERSION
    rec = capabilities.Capabilities.model_validate_json(store.get(capabilities.RECORD_KEY)[0])
    assert rec == caps


def test_local_store_is_capable_without_any_request(local_store):
    assert capabilities.require(local_store) == capabilities.Capabilities.full()
    assert sum(local_store.stats.values()) == 0
    assert local_store.list("") == []


# -- Ceph RGW: quoted If-Match refused, multipart If-None-Match ignored, 500 to race losers ----
def test_rgw_quoted_if_match_is_detected_and_the_unquoted_form_is_sent(deviant):
    proxy, _, store, _ = deviant("refuse_quoted_if_match")
    etag = store.put("k", b"1")
    store.apply_capabilities(Capabilities.full())  # told AWS's behaviour: the quoted form is sent
    with pytest.raises(Conflict):  # the finding: a valid CAS is refused while the quoted form is sent
        store.put("k", b"2", if_match=etag)
    store.capabilities = None  # forget what it was told, as a new process would
    caps = capabilities.require(store)
    assert (caps.if_match_quoted, caps.if_match_unquoted, caps.cas_refuses_stale) == (False, True, True)
    e2 = store.put("k", b"2", if_match=etag)
    with pytest.raises(Conflict):  # and the unquoted form is still enforced
        store.put("k", b"3", if_match=etag)
    assert store.get("k") == (b"2", e2)
    assert proxy.deviated["refused_if_match"] >= 2


def test_a_fresh_store_adapts_before_its_first_cas_without_being_told(deviant):
    """Every command and every step's `dagcraft agent ...` call gets the server's form, not
    only run/submit/worker (which `require` the capabilities): the first CAS loads them."""
    proxy, url, _, _ = deviant("refuse_quoted_if_match")
    store = open_store(url)
    etag = store.put("k", b"1")
    e2 = store.put("k", b"2", if_match=etag)  # probed (once), then sent unquoted
    assert store.get("k") == (b"2", e2)
    with pytest.raises(Conflict):
        store.put("k", b"3", if_match=etag)
    again = open_store(url)  # a second instance in this process: no probe, no refusal
    assert again.put("k", b"4", if_match=e2)
    assert proxy.deviated["refused_if_match"] >= 1


def test_rgw_example_pipeline_runs(deviant, tmp_path):
    _, url, _, _ = deviant("refuse_quoted_if_match", "multipart_ignores_if_none_match")
    proc = cli("run", str(EXAMPLES / "shell-pipeline" / "pipeline.yaml"), "--store", url, "--workers", "2",
               "--no-report", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = open_store(url)
    assert run_status(st, list_runs(st)[0]["run_id"])["status"] == "succeeded"


def _big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (6 << 20))  # over the 1 MiB threshold the tests set: a multipart upload
    return path


def test_rgw_multipart_create_if_absent_is_not_relied_on(deviant, tmp_path):
    proxy, url, store, _ = deviant("multipart_ignores_if_none_match")
    store.apply_capabilities(Capabilities.full())  # told AWS's behaviour: multipart relied on
    store.multipart_threshold = 1 << 20
    big = _big_file(tmp_path)
    store.put_file("a", big, if_none_match=True)
    store.put_file("a", big, if_none_match=True)  # the finding: the second create overwrote silently
    assert proxy.deviated["multipart_ignored"] == 2
    store.capabilities = None  # forget what it was told, as a new process would
    caps = capabilities.require(store)
    assert not caps.multipart_create_if_absent
    etag = store.put_file("b", big, if_none_match=True)
    assert etag and etag == store.head("b")  # one conditional PUT, with a real etag
    with pytest.raises(Conflict):
        store.put_file("b", big, if_none_match=True)
    assert store.stats["multipart_complete"] == 2 + 1  # the two above and the probe's own, no more


def test_rgw_empty_etag_of_a_multipart_upload_is_replaced_by_the_stored_one(deviant, tmp_path):
    _, _, store, _ = deviant("multipart_ignores_if_none_match")
    store.multipart_threshold = 1 << 20
    etag = store.put_file("a", _big_file(tmp_path))
    assert etag and etag == store.head("a")


def test_rgw_race_losers_answered_500_still_one_winner(deviant):
    proxy, _, store, _ = deviant("refuse_quoted_if_match", "loser_500", loser_500_rate=0.3)
    capabilities.require(store)
    wins: Counter[str] = Counter()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def racer(n: int) -> None:
        me = S3Store(store.bucket, store.prefix, endpoint_url=store.endpoint_url)
        capabilities.load(me)
        start.wait()
        for i in range(12):
            try:
                me.put(f"race/{i}", f"{n}".encode(), if_none_match=True)
                wins[f"race/{i}"] += 1
            except Conflict:
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert wins == Counter({f"race/{i}": 1 for i in range(12)})
    assert proxy.deviated["loser_500"] > 0


def test_rgw_loser_answered_500_on_every_try_is_a_conflict_not_an_outage(deviant):
    """A create that lost answered 500 on all its tries (RGW under a long race): the store
    HEADs, finds another writer's object, and reports the Conflict it is; a create that won
    answered 500 (its response lost) still succeeds."""
    proxy, _, store, _ = deviant("refuse_quoted_if_match", "loser_500", loser_500_rate=1.0)
    capabilities.require(store)
    store.put("race/0", b"first", if_none_match=True)
    with pytest.raises(Conflict):
        store.put("race/0", b"second", if_none_match=True)
    assert proxy.deviated["loser_500"] == store.attempts
    assert store.get("race/0")[0] == b"first"


def test_rgw_pipeline_with_racing_workers_runs_each_step_once(deviant, tmp_path):
    _, url, _, _ = deviant("refuse_quoted_if_match", "loser_500", loser_500_rate=0.5)
    marks = tmp_path / "marks"
    marks.mkdir()
    body = "\n".join(f"  - id: s{i}\n    run: echo x >> {marks}/s{i}" for i in range(8))
    spec = write_spec(tmp_path, f"name: once\nsteps:\n{body}\n")
    proc = cli("run", str(spec), "--store", url, "--workers", "4", "--no-report", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in marks.iterdir()) == sorted(f"s{i}" for i in range(8))
    assert all(p.read_text() == "x\n" for p in marks.iterdir())


# -- SeaweedFS: tree-order LIST, start_after returning earlier keys ---------------------------
TREE_KEYS = ["j/a/b", "j/a%b/c", "j/a-b", "j/a!", "j/b"]


def test_seaweedfs_tree_order_is_detected_and_listings_stay_correct(deviant):
    proxy, _, store, _ = deviant("tree_order_list")
    store.apply_capabilities(Capabilities.full())  # told AWS's behaviour: listings cut server side
    for k in TREE_KEYS:
        store.put(k, b"")
    # the finding: tree order, and start_after both returning an earlier key and skipping later ones
    assert store.list("j/") != sorted(TREE_KEYS) or store.list("j/", start_after="j/a!") != ["j/a%b/c", "j/a-b",
                                                                                             "j/a/b", "j/b"]
    assert proxy.deviated["tree_order_list"] > 0
    store.capabilities = None  # forget what it was told, as a new process would
    caps = capabilities.require(store)
    assert not caps.list_byte_order and not caps.start_after_complete
    assert store.list("j/") == sorted(TREE_KEYS)
    assert store.list("j/", start_after="j/a!") == ["j/a%b/c", "j/a-b", "j/a/b", "j/b"]
    assert store.list("j/", start_after="j/a-b") == ["j/a/b", "j/b"]
    assert store.list("j/", start_after="j/a%b/c", limit=2) == ["j/a-b", "j/a/b"]


def test_seaweedfs_fanout_example_runs(deviant, tmp_path):
    proxy, url, _, _ = deviant("tree_order_list")
    proc = cli("run", str(EXAMPLES / "research-fanout" / "pipeline.yaml"), "--store", url, "--workers", "2",
               "--no-report", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = open_store(url)
    status = run_status(st, list_runs(st)[0]["run_id"])
    assert status["status"] == "succeeded"
    assert steps(status)["summarize"]["artifacts"] == ["summary.md"]


# -- no conditional writes: refused at once, nothing written -----------------------------------
@pytest.mark.parametrize("command", ["run", "submit", "worker"])
def test_store_without_conditional_writes_is_refused_at_once(deviant, tmp_path, command):
    _, url, _, direct = deviant("no_conditionals")
    spec = str(EXAMPLES / "shell-pipeline" / "pipeline.yaml")
    args = {"run": ["run", spec, "--no-report"], "submit": ["submit", spec], "worker": ["worker"]}[command]
    t0 = time.monotonic()
    proc = cli(*args, "--store", url, cwd=tmp_path, timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 5, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "lacks conditional create" in lines[0] and "dagcraft store check" in lines[0]
    assert direct.list("") == []  # no run, no record, no probe leftovers


def test_store_check_names_a_server_that_refuses_valid_conditional_writes(deviant, tmp_path):
    _, url, _, _ = deviant("refuse_if_match")
    proc = cli("store", "check", url, cwd=tmp_path, timeout=60)
    assert proc.returncode == 5
    assert "If-Match with the current etag was refused, quoted and unquoted" in proc.stderr
    assert "does not enforce" not in proc.stderr and proc.stderr.count("\n") == 1


def test_store_check_reports_what_dagcraft_adapts_to(deviant, tmp_path):
    _, url, store, _ = deviant("refuse_quoted_if_match", "multipart_ignores_if_none_match", "tree_order_list")
    proc = cli("store", "check", url, "--json", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and out["missing"] == [] and len(out["adapted"]) == 3
    assert out["capabilities"]["if_match_unquoted"] and not out["capabilities"]["if_match_quoted"]
    assert store.get(capabilities.RECORD_KEY) is not None  # recorded for run/submit/worker


def test_unreachable_store_is_store_unavailable(tmp_path):
    store = open_store(s3_url("nobucket", "p", endpoint="http://127.0.0.1:9"))
    with pytest.raises(StoreUnavailable):
        capabilities.require(store)


def test_create_if_absent_beyond_one_put_is_refused_where_multipart_is_not_enforced(moto_store, tmp_path):
    from dagcraft.errors import InvalidInput
    from dagcraft.primitives.s3 import MAX_SINGLE_PUT

    moto_store.apply_capabilities(capabilities.Capabilities.full().model_copy(
        update={"multipart_create_if_absent": False}))
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(MAX_SINGLE_PUT + 1)  # sparse: nothing is read before the refusal
    moto_store.stats.clear()
    with pytest.raises(InvalidInput, match="5368709120 bytes"):
        moto_store.put_file("huge", huge, if_none_match=True)
    assert sum(moto_store.stats.values()) == 0
