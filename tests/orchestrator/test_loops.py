"""Issue 10, loops: a bounded loop over a group of body steps, run again until ``until`` holds,
at most ``max_iterations`` times. Each iteration's body steps are distinct steps
(``polish#2.review``) with their own attempts and traces; end to end through ``dagcraft run``
(local store and the moto server), kill -9 + ``resume``, ``retry --from`` a body step, and the
compile errors."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dagcraft.orchestrator import layout, list_runs, run_status
from dagcraft.orchestrator.ops import read_log
from dagcraft.primitives import open_store
from tests.conftest import server_store_url
from tests.orchestrator.helpers import cli, killpg, spawn_cli, steps, wait_for, write_spec


@pytest.fixture(params=["local", "s3server"])
def store_url(request: Any, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


def _spec(tmp_path: Path, *, max_iterations: int = 3, on_max: str = "fail", approve_at: str = "2",
          review_extra: str = "") -> str:
    """implement → polish (loop: review, then fix unless approved) → merge. ``review`` approves
    from iteration ``approve_at`` on (a number, or a shell expression read at run time);
    every body step appends its id and iteration to effects.txt."""
    fx = tmp_path / "effects.txt"
    return f"""
        name: loops
        steps:
          - id: implement
            run: "echo implement >> {fx}; echo summary=impl >> $DAGCRAFT_OUTPUT"
            outputs: {{values: [summary]}}
          - id: polish
            needs: [implement]
            loop:
              max_iterations: {max_iterations}
              on_max: {on_max}
              until: "${{{{ steps.review.outputs.verdict == 'approve' }}}}"
              steps:
                - id: review
                  run: >-
                    echo "review round ${{{{ loop.iteration }}}} of ${{{{ steps.implement.outputs.summary }}}},
                    previous fix: ${{{{ loop.previous.steps.fix.outputs.summary | default('none') }}}}";
                    echo review-${{{{ loop.iteration }}}} >> {fx};{review_extra}
                    if [ ${{{{ loop.iteration }}}} -ge {approve_at} ]; then v=approve; else v=changes-${{{{ loop.iteration }}}}; fi;
                    echo verdict=$v >> $DAGCRAFT_OUTPUT
                  outputs: {{values: [verdict]}}
                - id: fix
                  needs: [review]
                  when: "${{{{ steps.review.outputs.verdict != 'approve' }}}}"
                  run: "echo fix-${{{{ loop.iteration }}}} >> {fx}; echo summary=fixed-${{{{ loop.iteration }}}} >> $DAGCRAFT_OUTPUT"
                  outputs: {{values: [summary]}}
          - id: merge
            needs: [polish]
            run: "echo merged ${{{{ steps.review.outputs.verdict }}}} after ${{{{ steps.polish.outputs.iterations }}}}"
        """


def _run(tmp_path: Path, store_url: str, text: str, *extra: str) -> tuple[Any, dict[str, Any], Any]:
    spec = write_spec(tmp_path, text)
    proc = cli("run", str(spec), "--store", store_url, "--workers", "2", "--no-report", *extra, cwd=tmp_path,
               timeout=240)
    st = open_store(store_url)
    runs = list_runs(st)
    assert runs, proc.stdout + proc.stderr
    return proc, run_status(st, runs[0]["run_id"]), st


def _effects(tmp_path: Path) -> Counter[str]:
    return Counter((tmp_path / "effects.txt").read_text().split())


def _has_trace(store: Any, run_id: str, step: str, attempt: int) -> bool:
    return store.get(f"{layout.attempt_prefix(run_id, step, attempt)}/trace.jsonl") is not None


def test_loop_runs_until_true_each_iteration_its_own_attempts(tmp_path, store_url):
    proc, status, store = _run(tmp_path, store_url, _spec(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rid = status["run_id"]
    by = steps(status)
    assert status["status"] == "succeeded"
    # the run's summary says how the loop ended, as `status` does (not "3 of 4 succeeded")
    assert "polish: iteration 2 of max 3, until true" in proc.stdout, proc.stdout
    body = [s["step"] for s in status["steps"] if s["parent"] == "polish"]
    assert body == ["polish#1.review", "polish#1.fix", "polish#2.review", "polish#2.fix"]  # exactly 2 iterations
    assert by["polish#2.fix"]["status"] == "skipped"  # approved: its `when` is false
    for sid in ("polish#1.review", "polish#1.fix", "polish#2.review"):
        assert by[sid]["status"] == "succeeded" and by[sid]["attempt"] == 1, by[sid]
        assert _has_trace(store, rid, sid, 1), sid  # a distinct attempt, with its own trace
    assert _effects(tmp_path) == Counter(["implement", "review-1", "fix-1", "review-2"])
    # the rendered commands: iteration 2 sees iteration 1's fix through loop.previous
    assert read_log(store, rid, "polish#1.review").decode().strip() == "review round 1 of impl, previous fix: none"
    assert read_log(store, rid, "polish#2.review").decode().strip() == "review round 2 of impl, previous fix: fixed-1"
    # downstream of the loop, steps.review is the last iteration's
    assert read_log(store, rid, "merge").decode().strip() == "merged approve after 2"
    # status --json: the iteration of each body step, the loop's iteration count and until result
    assert [by[s]["iteration"] for s in body] == [1, 1, 2, 2]
    assert by["polish"]["loop"] == {"iterations": 2, "max_iterations": 3, "on_max": "fail", "until": True}
    assert by["polish"]["outputs"] == {"iterations": 2, "until": True}
    js = cli("status", rid, "--store", store_url, "--json", check=True)
    assert steps(json.loads(js.stdout))["polish"]["loop"]["iterations"] == 2
    text = cli("status", rid, "--store", store_url, check=True).stdout
    assert "iteration 2 of max 3, until true" in text
    assert [line.split()[0] for line in text.splitlines() if line.strip().endswith("iteration 2")] == \
        ["polish#2.review"]
    html = tmp_path / "report.html"
    cli("trace", "render", rid, "--store", store_url, "--html", str(html), check=True)
    page = html.read_text()
    assert "iteration 2 of max 3, until true" in page and "polish#2.review (iteration 2)" in page


def test_loop_at_cap_with_on_max_fail_fails_the_run_naming_the_loop(tmp_path):
    store_url = str(tmp_path / "store")
    proc, status, _ = _run(tmp_path, store_url, _spec(tmp_path, max_iterations=2, approve_at="99"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    by = steps(status)
    assert status["status"] == "failed"
    assert status["reason"] == ("step 'polish' failed: loop 'polish' reached max_iterations 2 with until still "
                                "false (on_max: fail)")
    assert by["polish"]["reason_kind"] == "max_iterations"
    assert by["polish"]["loop"] == {"iterations": 2, "max_iterations": 2, "on_max": "fail", "until": False}
    assert by["merge"]["status"] == "skipped"
    assert _effects(tmp_path) == Counter(["implement", "review-1", "fix-1", "review-2", "fix-2"])


def test_loop_at_cap_with_on_max_continue_succeeds_with_the_last_iteration(tmp_path):
    store_url = str(tmp_path / "store")
    proc, status, store = _run(tmp_path, store_url, _spec(tmp_path, max_iterations=2, on_max="continue",
                                                          approve_at="99"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by = steps(status)
    assert status["status"] == "succeeded" and by["polish"]["status"] == "succeeded"
    assert by["polish"]["loop"]["until"] is False and by["polish"]["loop"]["iterations"] == 2
    assert read_log(store, status["run_id"], "merge").decode().strip() == "merged changes-2 after 2"


def test_a_body_step_failing_for_good_fails_the_loop_and_the_run(tmp_path):
    store_url = str(tmp_path / "store")
    extra = ' if [ ${{ loop.iteration }} -eq 2 ]; then echo broken >&2; exit 3; fi;'
    proc, status, _ = _run(tmp_path, store_url, _spec(tmp_path, approve_at="3", review_extra=extra))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    by = steps(status)
    assert by["polish#2.review"]["status"] == "failed" and by["polish#2.fix"]["status"] == "skipped"
    assert by["polish"]["status"] == "failed"
    assert by["polish"]["reason"] == "iteration 2: step 'polish#2.review' failed"
    assert "polish#3.review" not in by and by["merge"]["status"] == "skipped"
    assert status["status"] == "failed"


def test_kill_9_mid_loop_then_resume_does_not_redo_iteration_1(tmp_path):
    store_url = str(tmp_path / "store")
    started = tmp_path / "iteration2-started"
    # iteration 2's review announces itself, then hangs (the first time only) until killed
    hang = (f' if [ ${{{{ loop.iteration }}}} -eq 2 ] && [ ! -e {started} ]; then touch {started}; '
            'sleep 300; fi;')
    spec = write_spec(tmp_path, _spec(tmp_path, approve_at="3", review_extra=hang))
    run = spawn_cli("run", str(spec), "--store", store_url, "--workers", "1", "--lease-ttl", "2",
                    "--run-id", "loop-kill-1", "--no-report")
    try:
        wait_for(started.exists, timeout=120, what="iteration 2's review to start")
        killpg(run, signal.SIGKILL)  # the pool, its worker and the step: mid-iteration 2
        run.wait(timeout=10)
    finally:
        killpg(run)
    store = open_store(store_url)
    before = steps(run_status(store, "loop-kill-1"))
    assert before["polish#1.review"]["status"] == before["polish#1.fix"]["status"] == "succeeded"
    assert before["polish#2.review"]["status"] == "running"
    res = cli("resume", "loop-kill-1", "--store", store_url, "--workers", "1", "--lease-ttl", "2",
              "--no-report", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    after = run_status(store, "loop-kill-1")
    by = steps(after)
    assert after["status"] == "succeeded"
    assert by["polish"]["loop"]["iterations"] == 3
    # iteration 1 ran once: one attempt each, one effect each
    assert by["polish#1.review"]["attempt"] == by["polish#1.fix"]["attempt"] == 1
    fx = _effects(tmp_path)
    assert fx["review-1"] == fx["fix-1"] == fx["implement"] == 1
    # the killed attempt is recorded lost; the next one is a new attempt with its own trace
    st = json.loads(store.get(layout.step_state("loop-kill-1", "polish#2.review"))[0])
    assert [h["status"] for h in st["history"]] == ["lost", "succeeded"]
    assert _has_trace(store, "loop-kill-1", "polish#2.review", 2)
    assert fx["review-2"] == 2 and fx["fix-2"] == 1 and fx["review-3"] == 1


def test_retry_from_a_body_step_continues_the_loop_from_that_iteration(tmp_path):
    store_url = str(tmp_path / "store")
    threshold = tmp_path / "threshold"
    threshold.write_text("2")
    proc, status, store = _run(tmp_path, store_url, _spec(tmp_path, approve_at=f"$(cat {threshold})"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rid = status["run_id"]
    assert steps(status)["polish"]["loop"]["iterations"] == 2
    # the reviewer gets stricter; re-review from iteration 2's review (`review`: the latest)
    threshold.write_text("3")
    res = cli("retry", rid, "--from", "review", "--store", store_url, "--workers", "1", "--no-report", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    by = steps(run_status(store, rid))
    assert by["polish"]["status"] == "succeeded" and by["polish"]["loop"]["iterations"] == 3
    # iteration 1 kept as it was; iteration 2 re-run from its review (attempt 2), now with a fix
    assert by["polish#1.review"]["attempt"] == by["polish#1.fix"]["attempt"] == 1
    assert by["polish#2.review"]["attempt"] == 2 and by["polish#2.fix"]["status"] == "succeeded"
    assert by["polish#3.review"]["attempt"] == 1 and by["polish#3.fix"]["status"] == "skipped"
    assert _has_trace(store, rid, "polish#2.review", 1) and _has_trace(store, rid, "polish#2.review", 2)
    assert by["merge"]["attempt"] == 2 and read_log(store, rid, "merge").decode().strip() == "merged approve after 3"
    assert read_log(store, rid, "polish#3.review").decode().strip() == \
        "review round 3 of impl, previous fix: fixed-2"
    # from iteration 1's fix: iteration 2 and 3 are dropped and run again (new attempts)
    res = cli("retry", rid, "--from", "polish#1.fix", "--store", store_url, "--workers", "1", "--no-report",
              timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    by = steps(run_status(store, rid))
    assert by["polish#1.review"]["attempt"] == 1 and by["polish#1.fix"]["attempt"] == 2
    assert by["polish#2.review"]["attempt"] == 3 and by["polish#3.review"]["attempt"] == 2
    assert by["polish"]["loop"]["iterations"] == 3 and by["polish"]["status"] == "succeeded"
    assert [s["step"] for s in run_status(store, rid)["steps"] if s["parent"] == "polish"] == [
        "polish#1.review", "polish#1.fix", "polish#2.review", "polish#2.fix", "polish#3.review", "polish#3.fix"]


def test_resume_retry_failed_continues_the_loop_at_the_failed_iteration(tmp_path):
    store_url = str(tmp_path / "store")
    flag = tmp_path / "broken"
    flag.write_text("")
    extra = f' if [ ${{{{ loop.iteration }}}} -eq 2 ] && [ -e {flag} ]; then exit 3; fi;'
    proc, status, store = _run(tmp_path, store_url, _spec(tmp_path, approve_at="2", review_extra=extra))
    assert proc.returncode == 1 and steps(status)["polish#2.review"]["status"] == "failed"
    flag.unlink()
    res = cli("resume", status["run_id"], "--retry-failed", "--store", store_url, "--workers", "1", "--no-report",
              timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    by = steps(run_status(store, status["run_id"]))
    assert by["polish"]["status"] == "succeeded" and by["polish"]["loop"]["iterations"] == 2
    assert by["polish#1.review"]["attempt"] == 1 and by["polish#2.review"]["attempt"] == 2
    assert _effects(tmp_path)["review-1"] == 1


BODY = """
name: e
steps:
  - id: implement
    run: "true"
  - id: polish
    needs: [implement]
    loop:
      max_iterations: {max}
      until: "${{{{ steps.{until_ref}.outputs.verdict == 'ok' }}}}"
      steps:
        - id: review
          run: "echo verdict=ok >> $DAGCRAFT_OUTPUT"{review}
          outputs: {{values: [verdict]}}
{body}{after}"""


@pytest.mark.parametrize(("fields", "line", "message"), [
    ({"until_ref": "implement"}, 10,
     "steps[1].loop.until: until may reference only steps of the loop's body (review), not 'implement'"),
    ({"review": "\n          needs: [implement]"}, 14,
     "steps[1].loop.steps[0].needs[0]: 'implement' is outside loop 'polish': a body step may need only steps "
     "of its loop's body"),
    ({"after": "  - id: merge\n    needs: [review]\n    run: \"true\"\n"}, 16,
     "steps[2].needs[0]: 'review' is a step of loop 'polish''s body; need the loop 'polish'"),
    ({"body": "        - id: nested\n          loop: {max_iterations: 2, until: 'true', steps: [{id: inner, run: 'true'}]}\n"},
     16,
     "steps[1].loop.steps[1].loop: nested loops are not supported"),
    ({"review": "\n          foreach: \"${{ [1, 2] }}\""}, 14,
     "steps[1].loop.steps[0].foreach: 'foreach' inside a loop body is not supported"),
    ({"review": "\n          env: {P: \"${{ loop.previous.steps.fixx.outputs.x | default('') }}\"}"}, 14,
     "steps[1].loop.steps[0].env.P: loop.previous.steps.fixx: 'fixx' is not a step of loop 'polish''s body"),
    ({"max": 0}, 9, "steps[1].loop.max_iterations: Input should be greater than or equal to 1"),
    ({"max": 101}, 9, "steps[1].loop.max_iterations: Input should be less than or equal to 100"),
    ({"after": "  - id: merge\n    needs: [polish]\n    run: \"echo ${{ loop.iteration }}\"\n"}, 17,
     "steps[2].run: 'loop' is not available here (only in the body steps of a loop)"),
])
def test_loop_compile_errors_name_file_line_and_field(tmp_path, fields, line, message):
    values = {"max": 3, "until_ref": "review", "review": "", "body": "", "after": ""} | fields
    spec = tmp_path / "e.yaml"
    spec.write_text(BODY.format(**values))
    proc = cli("validate", str(spec))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert any(e.startswith(f"dagcraft: {spec}:{line}:") and message in e for e in err), err


def test_schema_includes_loop():
    proc = cli("schema", check=True)
    schema = json.loads(proc.stdout)
    assert "loop" in schema["$defs"]["StepSpec"]["properties"]
    loop = schema["$defs"]["LoopSpec"]
    assert set(loop["required"]) == {"max_iterations", "until", "steps"}
    assert loop["properties"]["max_iterations"]["minimum"] == 1
    assert loop["properties"]["max_iterations"]["maximum"] == 100
    assert loop["properties"]["on_max"]["enum"] == ["fail", "continue"]
