"""``dagcraft ui`` server without a browser: real runs on real stores, Starlette's TestClient.

What the page reads (runs, run, step, DAG, artifacts), what it must never serve (secrets,
arbitrary paths, other hosts), and the guarded actions (token, origin), including resume and
retry starting real worker processes.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from dagcraft.orchestrator import PoolOptions, layout, run_status
from dagcraft.ui import UiOptions, create_app
from tests.orchestrator.helpers import cli, run_spec, steps, submit_spec, write_spec

TOKEN = "test-token-" + "x" * 20
BASE = "http://127.0.0.1:8765"

MIXED = """
    name: mixed
    steps:
      - id: make
        run: |
          echo "made it"
          echo "count=3" >> "$DAGCRAFT_OUTPUT"
          mkdir -p out && printf 'a,b\\n1,2\\n' > out/table.csv
        outputs: {values: [count], artifacts: [out/table.csv]}
      - id: boom
        needs: [make]
        run: "echo 'cannot open config.yaml' >&2; exit 3"
      - id: later
        needs: [boom]
        run: "echo unreachable"
"""


def client_for(store: Any, **kw: Any) -> TestClient:
    opts = UiOptions(store_url=str(getattr(store, "root", store.url)), token=TOKEN,
                     pool=PoolOptions(workers=1, lease_ttl=5.0), **kw)
    return TestClient(create_app(store, opts), base_url=BASE)


def post(client: TestClient, run_id: str, action: str, body: dict[str, Any] | None = None,
         **headers: str) -> Any:
    hdrs = {"X-Dagcraft-Token": TOKEN, "Origin": BASE}
    hdrs.update(headers)
    return client.post(f"/api/runs/{run_id}/actions/{action}", json=body or {},
                       headers={k: v for k, v in hdrs.items() if v})


@pytest.fixture(params=["local", "s3server"])
def read_store(request: Any) -> Any:
    return request.getfixturevalue({"local": "local_store", "s3server": "s3_server_store"}[request.param])


@pytest.fixture
def mixed_run(read_store: Any, tmp_path: Path) -> tuple[Any, str]:
    rid, st = run_spec(read_store, tmp_path, MIXED)
    assert st["status"] == "failed", st
    return read_store, rid


def test_page_embeds_token_and_no_external_resource(local_store: Any) -> None:
    with client_for(local_store) as c:
        for path in ("/", "/runs/any-run"):
            r = c.get(path)
            assert r.status_code == 200
            assert f'<meta name="dagcraft-token" content="{TOKEN}">' in r.text
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-frame-options"] == "DENY"
        page = c.get("/").text + c.get("/static/app.js").text + c.get("/static/app.css").text
        # no CDN, no font service: every URL the page loads is relative to this server
        assert re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", page) == []
        assert re.findall(r"""url\(["']?(?:https?:)?//""", page) == []
        assert c.get("/static/dag.css").text.startswith(".dc-dag")


def test_runs_run_and_step_json(mixed_run: tuple[Any, str]) -> None:
    store, rid = mixed_run
    with client_for(store) as c:
        runs = c.get("/api/runs").json()["runs"]
        assert [(r["run_id"], r["status"]) for r in runs] == [(rid, "failed")]
        assert runs[0]["age_s"] >= 0 and runs[0]["duration_s"] > 0

        run = c.get(f"/api/runs/{rid}").json()
        by = {s["step"]: s for s in run["steps"]}
        assert {k: v["status"] for k, v in by.items()} == {"make": "succeeded", "boom": "failed", "later": "skipped"}
        assert run["actions"] == ["resume"]
        assert by["boom"]["actions"] == ["retry"] and by["make"]["actions"] == ["retry"]
        tl = run["timeline"]
        # one bar per attempt, measured from the first claim; waiting for a worker shown apart
        assert sorted(b["step"] for b in tl["bars"]) == ["boom", "make"]
        assert min(b["offset_s"] for b in tl["bars"]) == 0.0
        assert tl["queue_s"] >= 0 and tl["span_s"] >= max(b["offset_s"] + b["duration_s"] for b in tl["bars"]) - 1e-6
        assert tl["first_claim"] == pytest.approx(run["submitted_at"] + tl["queue_s"])

        boom = c.get(f"/api/runs/{rid}/steps/boom").json()
        assert boom["attempt"] == "1" and boom["attempts"][0]["exit_code"] == 3
        assert "cannot open config.yaml" in boom["stderr"]["text"]
        kinds = [e["kind"] for e in boom["trace"]["events"]]
        assert kinds[0] == "run.started" and "run.finished" in kinds

        make = c.get(f"/api/runs/{rid}/steps/make").json()
        assert make["outputs"] == {"count": 3}
        assert make["stdout"]["text"] == "made it"
        [art] = make["artifacts"]
        assert art["name"] == "out/table.csv" and art["size"] == 8
        got = c.get(art["url"])
        assert got.status_code == 200 and got.content == b"a,b\n1,2\n"
        assert got.headers["content-type"] == "application/octet-stream"  # never rendered in this origin
        assert got.headers["content-disposition"].startswith("attachment")
        assert got.headers["x-content-type-options"] == "nosniff"


def test_dag_svg_carries_live_status(mixed_run: tuple[Any, str]) -> None:
    import xml.etree.ElementTree as ET

    store, rid = mixed_run
    with client_for(store) as c:
        r = c.get(f"/api/runs/{rid}/dag.svg")
    assert r.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(r.text)
    nodes = {g.get("data-step"): g.get("class") for g in root.iter("{http://www.w3.org/2000/svg}g")}
    assert nodes == {"make": "dc-node st-succeeded", "boom": "dc-node st-failed", "later": "dc-node st-skipped"}
    assert "<style>" not in r.text  # the page's CSP allows only its own stylesheet (dag.css)


def test_never_serves_arbitrary_paths(mixed_run: tuple[Any, str]) -> None:
    store, rid = mixed_run
    with client_for(store) as c:
        base = f"/api/runs/{rid}/steps/make/artifacts"
        for path in (f"{base}/other.csv", f"{base}/table.csv", f"{base}/out/../../state.json",
                     f"{base}/%2e%2e/%2e%2e/state.json", f"/api/runs/{rid}/steps/boom/artifacts/out/table.csv",
                     "/static/index.html", "/static/server.py", "/static/..%2fserver.py", "/api/runs/nope"):
            r = c.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.json()["error"], path
        # bad ids are named, one line, 400
        r = c.get(f"/api/runs/{rid}/steps/..%2f..")
        assert r.status_code in (400, 404) and "\n" not in r.json()["error"]


def test_refuses_other_hosts(local_store: Any) -> None:
    # a DNS-rebinding page reaches 127.0.0.1 under its own name: its Host header gives it away
    with client_for(local_store) as c:
        assert c.get("/api/runs", headers={"Host": "evil.example:8765"}).status_code == 400
        assert c.get("/api/runs", headers={"Host": "localhost:8765"}).status_code == 200
        assert c.get("/api/runs", headers={"Host": "[::1]:8765"}).status_code == 200
    with client_for(local_store, host="fd00::5") as c:
        assert c.get("/api/runs", headers={"Host": "[fd00::5]:8765"}).status_code == 200
        assert c.get("/api/runs", headers={"Host": "[fd00::6]:8765"}).status_code == 400


def test_post_needs_token_and_same_origin(local_store: Any, tmp_path: Path) -> None:
    rid = submit_spec(local_store, write_spec(tmp_path, MIXED))  # no worker: stays running
    with client_for(local_store) as c:
        refused = [
            post(c, rid, "cancel", **{"X-Dagcraft-Token": ""}),
            post(c, rid, "cancel", **{"X-Dagcraft-Token": TOKEN[:-1] + "y"}),
            post(c, rid, "cancel", Origin="http://evil.example"),
            post(c, rid, "cancel", Origin="http://127.0.0.1:9999"),
            post(c, rid, "cancel", **{"Sec-Fetch-Site": "cross-site"}),
        ]
        assert [r.status_code for r in refused] == [403] * 5
        assert "token" in refused[0].json()["error"] and "cross-origin" in refused[2].json()["error"]
        assert run_status(local_store, rid)["status"] == "running"  # nothing changed
        assert c.get(f"/api/runs/{rid}/actions/cancel").status_code == 405  # GET never changes state
        assert post(c, rid, "approve").status_code == 400  # names no step

        ok = post(c, rid, "cancel")
        assert ok.status_code == 200, ok.text
        # no live worker serves this run, so the cancel finishes the cancellation itself
        assert ok.json()["status"] == "cancelled"
        assert run_status(local_store, rid)["status"] == "cancelled"
        assert post(c, "no-such-run", "cancel").status_code == 404


def test_resume_from_ui_starts_workers(local_store: Any, tmp_path: Path) -> None:
    rid = submit_spec(local_store, write_spec(tmp_path, """
        name: later
        steps:
          - id: a
            run: "echo a"
          - id: b
            needs: [a]
            run: "echo b"
    """))
    with client_for(local_store) as c:
        r = post(c, rid, "resume")
        assert r.status_code == 200 and "started 1 worker" in r.json()["message"], r.text
        c.app.state.ui.drivers[rid].join(120)  # the pool returns when the run has finished
        assert c.get(f"/api/runs/{rid}").json()["ui_workers"] == "succeeded"
    assert run_status(local_store, rid)["status"] == "succeeded"


def test_retry_from_a_step(local_store: Any, tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    rid, st = run_spec(local_store, tmp_path, f"""
        name: flaky
        steps:
          - id: first
            run: "echo one"
          - id: check
            needs: [first]
            run: "test -e '{flag}'"
          - id: after
            needs: [check]
            run: "echo done"
    """)
    assert st["status"] == "failed"
    flag.touch()
    with client_for(local_store) as c:
        assert post(c, rid, "retry", {}).status_code == 400  # which step?
        r = post(c, rid, "retry", {"step": "check"})
        assert r.status_code == 200, r.text
        assert r.json()["reset"] == ["check", "after"]
        c.app.state.ui.drivers[rid].join(120)
    by = steps(run_status(local_store, rid))
    assert (by["check"]["status"], by["check"]["attempt"], by["after"]["status"]) == ("succeeded", 2, "succeeded")
    assert by["first"]["attempt"] == 1  # upstream of the retried step did not run again


def test_secret_values_never_served(local_store: Any, tmp_path: Path, monkeypatch: Any) -> None:
    secret = "hunter2-" + "Zq9xVb7LmN3kP"
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", secret)
    rid, st = run_spec(local_store, tmp_path, """
        name: leaky
        params:
          token: {type: string, secret: true}
        steps:
          - id: leak
            run: "echo token=${{ params.token }} >> $DAGCRAFT_OUTPUT; echo ${{ params.token }}; echo ${{ params.token }} >&2; exit 1"
            outputs: {values: [token]}
    """, params={"token": secret})
    with client_for(local_store) as c:
        bodies = [c.get(p).text for p in ("/api/runs", f"/api/runs/{rid}", f"/api/runs/{rid}/dag.svg",
                                          f"/api/runs/{rid}/steps/leak", f"/api/runs/{rid}/steps/leak?attempt=1")]
    assert all(b for b in bodies)
    assert [secret in b for b in bodies] == [False] * 5
    assert "[redacted]" in json.loads(bodies[3])["stderr"]["text"]


def test_cli_busy_port_is_one_line_exit_2(local_store: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("ui", "--store", str(local_store.root), "--port", str(port), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unreachable_store_is_exit_5() -> None:
    proc = cli("ui", "--store", "s3://nobucket/x?endpoint=http://127.0.0.1:9", "--port", "0", timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.startswith("dagcraft: ") and proc.stderr.strip().count("\n") == 0


def test_resume_without_the_runs_secret_is_refused(local_store: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DAGCRAFT_PARAM_TOKEN", "s3cr3t-" + "value-1234")
    rid = submit_spec(local_store, write_spec(tmp_path, """
        name: needs-secret
        params:
          token: {type: string, secret: true}
        steps:
          - id: use
            run: "echo ${{ params.token }}"
    """), params={"token": "s3cr3t-" + "value-1234"})
    monkeypatch.delenv("DAGCRAFT_PARAM_TOKEN")  # the UI's environment lacks it
    with client_for(local_store) as c:
        r = post(c, rid, "resume")
        assert r.status_code == 400 and "DAGCRAFT_PARAM_TOKEN" in r.json()["error"], r.text
        assert rid not in c.app.state.ui.drivers  # no worker started without it


def test_cli_ctrl_c_is_exit_130(local_store: Any) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dagcraft.cli.main", "ui", "--store", str(local_store.root),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("dagcraft ui: http://127.0.0.1:")  # listening
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert proc.stderr.read().strip() == "dagcraft: interrupted"


def test_requests_per_poll_as_documented(tmp_path: Path) -> None:
    """docs/ui.md: a run page poll is 2 GETs per step + 3 (1 per step + 3 once the run is
    sealed: its status is read from the summary); the step panel up to 4 GETs; the run list 2
    LISTs + 2 GETs per run; many tabs within CACHE_S cost one poll."""
    from collections import Counter

    from dagcraft.primitives.local import LocalStore
    from dagcraft.ui import data

    store = LocalStore(tmp_path / "store", fsync=False)
    n = 10
    spec = "name: counts\nsteps:\n" + "".join(f"  - id: s{i}\n    run: ['echo', 'x']\n" for i in range(n))
    rid, st = run_spec(store, tmp_path, spec)
    assert st["status"] == "succeeded"

    def cost(fn: Any) -> dict[str, int]:
        before = Counter(store.stats)
        fn()
        after = Counter(store.stats)
        after.subtract(before)
        return {k: v for k, v in after.items() if v}

    assert cost(lambda: data.run_json(store, rid)) == {"get": n + 3}  # sealed: control, summary, run.json, n states
    assert cost(lambda: data.step_json(store, rid, "s3")) == {"get": 4}
    assert cost(lambda: data.runs_json(store)) == {"list": 2, "get": 2}  # index + corrupt marks
    with client_for(store) as c:
        polls = cost(lambda: [c.get(f"/api/runs/{rid}") for _ in range(5)])
    assert polls == {"get": n + 3}  # five tabs, one read of the store
    ctl = json.loads(store.get(layout.control(rid))[0])
    ctl["seal"]["summary"] = None  # a run sealed by an older dagcraft: its status reads every record
    store.put(layout.control(rid), json.dumps(ctl).encode())
    assert cost(lambda: data.run_json(store, rid)) == {"get": 2 * n + 3}
