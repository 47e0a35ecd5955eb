"""``dagcraft ui`` in a real headless Chromium, during a real run served by real workers.

The run's ``wait`` step waits for a file the test creates, so each state change is awaited
(Playwright waits for the page's DOM to show it), never slept for.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dagcraft.orchestrator import run_status
from tests.orchestrator.helpers import spawn_cli, write_spec

pytestmark = pytest.mark.browser

LIVE = """
    name: ui-live
    params:
      gate: {type: string}
    steps:
      - id: prepare
        run: |
          echo "preparing"
          echo "rows=2" >> "$DAGCRAFT_OUTPUT"
          printf 'x\\n' > data.txt
        outputs: {values: [rows], artifacts: [data.txt]}
      - id: wait
        needs: [prepare]
        run: "while [ ! -e '${{ params.gate }}' ]; do sleep 0.05; done; echo gate open"
      - id: long
        needs: [wait]
        run: "echo working; sleep 300"
      - id: after
        needs: [long]
        run: "echo never"
"""


def watch_console(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return errors


def raw_post(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture(params=["local", "s3server"])
def live_store(request: Any) -> tuple[Any, str]:
    """(store, URL for the processes): the UI serves a local directory or an S3 bucket alike."""
    if request.param == "local":
        store = request.getfixturevalue("local_store")
        return store, str(store.root)
    store = request.getfixturevalue("s3_server_store")
    return store, store.url


def test_live_run_updates_and_cancels(browser: Any, live_store: tuple[Any, str], tmp_path: Path,
                                      ui_process: Any) -> None:
    local_store, store_url = live_store
    gate = tmp_path / "gate"
    rid = "ui-live-1"
    spec = write_spec(tmp_path, LIVE)
    run = spawn_cli("run", str(spec), "--store", store_url, "--run-id", rid, "--workers", "2", "--no-report",
                    "-p", f"gate={gate}", new_session=False)
    ui = ui_process(store_url)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = watch_console(page)
    try:
        page.goto(ui.url + "/")
        page.wait_for_selector(f'tr[data-run="{rid}"]', timeout=60_000)
        page.click(f'tr[data-run="{rid}"] a')
        page.wait_for_url(f"**/runs/{rid}")
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads

        page.wait_for_selector('#dag g[data-step="wait"].st-running', timeout=60_000)
        assert page.locator('#dag g[data-step="prepare"].st-succeeded').count() == 1
        assert "running" in page.inner_text('#steps tr[data-step="wait"]')
        # the step detail: outputs, artifact link, logs of the selected step
        page.click('#steps tr[data-step="prepare"] td')
        page.wait_for_selector('#detail a[download="data.txt"]', timeout=30_000)
        assert "preparing" in page.inner_text("#detail pre.stdout")
        assert '"rows": 2' in page.inner_text("#detail pre.json")

        gate.touch()
        page.wait_for_selector('#dag g[data-step="wait"].st-succeeded', timeout=60_000)
        page.wait_for_selector('#dag g[data-step="long"].st-running', timeout=60_000)
        assert page.evaluate("window.__sameDocument") is True  # updated in place, not reloaded
        assert page.locator("#timeline .trow").count() >= 3  # prepare, wait, long: one bar each

        page.click('#run-actions button[data-action="cancel"]')
        page.wait_for_selector("#run-status.st-cancelled", timeout=90_000)
        assert page.inner_text("#run-status") == "cancelled"
        assert page.evaluate("window.__sameDocument") is True
        assert run.wait(90) == 1  # `dagcraft run` exits 1 for a run that did not succeed
        st = run_status(local_store, rid)
        assert st["status"] == "cancelled" and st["reason"] == "cancelled from the UI"
        assert {s["step"]: s["status"] for s in st["steps"]}["long"] == "cancelled"
        page.wait_for_selector('#run-actions button[data-action="resume"]', timeout=30_000)

        # state changes need the session token, from this origin
        api = f"{ui.url}/api/runs/{rid}/actions/resume"
        token = page.get_attribute('meta[name="dagcraft-token"]', "content")
        assert raw_post(api, {}) == 403
        assert raw_post(api, {"X-Dagcraft-Token": "guess"}) == 403
        assert raw_post(api, {"X-Dagcraft-Token": token, "Origin": "http://evil.example"}) == 403
        in_page = page.evaluate("""async (url) => (await fetch(url, {method: 'POST', body: '{}',
                                     headers: {'Content-Type': 'application/json'}})).status""", api)
        assert in_page == 403
        assert run_status(local_store, rid)["status"] == "cancelled"  # none of them resumed it
    finally:
        page.close()
        if run.poll() is None:
            run.kill()
            run.wait()
    errors = [e for e in errors if "403" not in e]  # the refused fetch above logs its status
    assert errors == []


def test_failed_run_page_shows_why(browser: Any, local_store: Any, tmp_path: Path, ui_process: Any) -> None:
    from tests.orchestrator.helpers import run_spec

    rid, st = run_spec(local_store, tmp_path, """
        name: broken
        steps:
          - id: fetch
            run: "echo fetched"
          - id: parse
            needs: [fetch]
            run: |
              echo 'parse error: line 3: unexpected token' >&2
              echo '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>' >&2
              echo '<b onmouseover=alert(1)>bold</b>'
              exit 2
          - id: publish
            needs: [parse]
            run: "echo never"
    """)
    assert st["status"] == "failed"
    ui = ui_process(str(local_store.root))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = watch_console(page)
    try:
        page.goto(f"{ui.url}/runs/{rid}")
        page.wait_for_selector('#dag g[data-step="parse"].st-failed', timeout=60_000)
        assert page.locator('#dag g[data-step="publish"].st-skipped').count() == 1
        # the failed step is opened by itself, its stderr shown
        page.wait_for_selector("#detail pre.stderr", timeout=30_000)
        assert "parse error: line 3" in page.inner_text("#detail pre.stderr")
        # what a step printed is shown as text, never run as markup
        assert '<img src=x onerror="window.__pwned=1">' in page.inner_text("#detail pre.stderr")
        assert "<b onmouseover" in page.inner_text("#detail pre.stdout")
        assert page.evaluate("window.__pwned === undefined") is True
        assert page.locator("#main img, #main script, #main b").count() == 0
        assert "run.finished" in page.inner_text("#detail table.events")
        assert page.locator('#steps tr[data-step="parse"] button[data-action="retry"]').count() == 1
        assert json.loads(page.evaluate("JSON.stringify([...document.querySelectorAll('#timeline .trow')]"
                                        ".map(r => r.dataset.step))")) == ["fetch", "parse"]
    finally:
        page.close()
    assert errors == []


def test_fanout_parent_summarized(browser: Any, local_store: Any, tmp_path: Path, ui_process: Any) -> None:
    from tests.orchestrator.helpers import run_spec

    rid, st = run_spec(local_store, tmp_path, """
        name: fan
        steps:
          - id: plan
            run: "echo 'items=[\\"a\\", \\"b\\", \\"c\\"]' >> $DAGCRAFT_OUTPUT"
            outputs: {values: [items]}
          - id: work
            needs: [plan]
            foreach: "${{ steps.plan.outputs.items }}"
            run: "test ${{ item }} != b"
        on_failure: continue
    """)
    by = {s["step"]: s for s in st["steps"]}
    assert len(by["work"]["children"]) == 3, st
    ui = ui_process(str(local_store.root))
    page = browser.new_page()
    errors = watch_console(page)
    try:
        page.goto(f"{ui.url}/runs/{rid}")
        page.wait_for_selector("#steps tr.child")
        assert page.text_content('#dag g[data-step="work"] .dc-sub') == "3/3 done · 1 failed"
        assert page.locator("#steps tr.child").count() == 3
    finally:
        page.close()
    assert errors == []
