"""Screenshots of ``dagcraft ui`` for docs/img (run by hand: ``python -m tests.ui.screenshots OUT``).

Makes a store with a succeeded, a failed and a running run (real workers), serves it with
``dagcraft ui`` and photographs the run list and both run pages in headless Chromium.
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

from tests.orchestrator.helpers import REPO, cli, spawn_cli, wait_for
from tests.ui.conftest import CHROMIUM_ARGS, UiProcess, chromium_path

FAILING = """
name: nightly-report
steps:
  - id: fetch
    run: "echo 'fetched 1200 rows'; echo rows=1200 >> $DAGCRAFT_OUTPUT; sleep 0.6"
    outputs: {values: [rows]}
  - id: clean
    needs: [fetch]
    run: "echo cleaning; sleep 0.8"
  - id: stats
    needs: [fetch]
    run: "echo computing; sleep 0.4"
  - id: render
    needs: [clean, stats]
    run: |
      echo 'loading template report.j2'
      echo 'Traceback (most recent call last):' >&2
      echo '  File "render.py", line 41, in <module>' >&2
      echo "KeyError: 'revenue'" >&2
      exit 1
  - id: publish
    needs: [render]
    run: "echo never"
finally:
  - id: notify
    run: "echo notified"
"""

RUNNING = """
name: train-eval
params:
  gate: {type: string}
steps:
  - id: download
    run: "echo downloading; sleep 0.5"
  - id: tokenize
    needs: [download]
    run: "echo tokenizing; sleep 0.7"
  - id: train
    needs: [tokenize]
    run: "for i in 1 2 3 4 5 6; do echo epoch $i loss 0.$((9-i)); sleep 0.2; done; while [ ! -e '${{ params.gate }}' ]; do sleep 0.1; done"
  - id: eval
    needs: [tokenize]
    run: "echo evaluating baseline; sleep 0.3"
  - id: package
    needs: [train, eval]
    run: "echo packaging"
"""


def main(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from dagcraft.errors import NotFound
    from dagcraft.orchestrator import run_status
    from dagcraft.primitives.local import LocalStore

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="dagcraft-shots-"))
    store_url = str(tmp / "store")
    store = LocalStore(Path(store_url))
    ok = cli("run", str(REPO / "examples/shell-pipeline/pipeline.yaml"), "--store", store_url, "--no-report",
             "--run-id", "shell-pipeline-20261201-a1")
    assert ok.returncode == 0, ok.stderr
    (tmp / "failing.yaml").write_text(textwrap.dedent(FAILING))
    cli("run", str(tmp / "failing.yaml"), "--store", store_url, "--no-report", "--run-id", "nightly-report-20261201-b2")
    (tmp / "running.yaml").write_text(textwrap.dedent(RUNNING))
    gate = tmp / "gate"
    running = spawn_cli("run", str(tmp / "running.yaml"), "--store", store_url, "--no-report", "--workers", "2",
                        "--run-id", "train-eval-20261201-c3", "-p", f"gate={gate}")
    def train_running() -> bool:
        try:
            steps = {s["step"]: s for s in run_status(store, "train-eval-20261201-c3")["steps"]}
        except NotFound:
            return False  # not submitted yet
        return steps["train"]["status"] == "running" and steps["eval"]["status"] == "succeeded"

    wait_for(train_running, what="train running")
    ui = UiProcess(store_url)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 300})
            page.goto(ui.url + "/")
            page.wait_for_selector("tr[data-run]")
            page.screenshot(path=str(out / "ui-runs.png"), full_page=True)
            page.goto(ui.url + "/runs/nightly-report-20261201-b2")
            page.wait_for_selector("#detail pre.stderr")
            page.screenshot(path=str(out / "ui-run-failed.png"), full_page=True)
            page.goto(ui.url + "/runs/train-eval-20261201-c3")
            page.wait_for_selector('#dag g[data-step="train"].st-running')
            page.wait_for_selector("#detail pre.stdout")
            page.wait_for_timeout(1500)  # a photo, not a test: let the bars grow a little
            page.screenshot(path=str(out / "ui-run-running.png"), full_page=True)
            browser.close()
    finally:
        ui.stop()
        gate.touch()
        running.wait(60)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dagcraft-shots"))
