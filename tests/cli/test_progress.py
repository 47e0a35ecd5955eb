"""The live table of ``dagcraft run`` counts what ``status`` counts (submitted steps; foreach
children listed under their parent) and shows the run's one duration (issue 11)."""

from __future__ import annotations

import io

from rich.console import Console

from dagcraft.cli.progress import Progress, snapshot
from dagcraft.orchestrator.view import LocalView
from tests.orchestrator.helpers import FANOUT, drive_inline, submit_spec, write_spec


def _frame(view: LocalView) -> str:
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False, color_system=None).print(Progress().render(view))
    return out.getvalue()


def test_table_counts_submitted_steps_and_shows_the_summary_duration(local_store, tmp_path):
    rid = submit_spec(local_store, write_spec(tmp_path, FANOUT))
    queued = LocalView(local_store, rid, detail=True)
    snap = snapshot(queued)
    assert (snap["total"], snap["done"], snap["duration_s"]) == (3, 0, None)
    assert "waiting for a worker" in _frame(queued)

    st = drive_inline(local_store, rid, tmp_path)
    view = LocalView(local_store, rid, detail=True)
    snap = snapshot(view)
    assert snap["counts"] == st["counts"] == {"succeeded": 3}  # not 6: children are not steps
    assert (snap["total"], snap["done"]) == (3, 3)
    assert snap["duration_s"] is not None and abs(snap["duration_s"] - st["duration_s"]) < 1e-3
    kids = [r["step"] for r in snap["rows"] if r["child"]]
    assert kids == ["each[0]", "each[1]", "each[2]"]
    assert [r["step"] for r in snap["rows"] if not r["child"]] == ["plan", "each", "merge"]
    frame = _frame(view)
    assert f"{st['duration_s']:.1f}s" in frame.splitlines()[0]
    assert "3 of 3 steps done  succeeded: 3" in frame
    assert "3/3 done (3 succeeded)" in frame
    assert "  each[1]" in frame


def test_plain_progress_decodes_only_the_steps_that_changed(local_store, tmp_path, monkeypatch):
    """Not a terminal: each poll prints the steps whose status changed, and reads no record of
    a step that did not (the walk of a 10,000-step run decoded every finished step per poll)."""
    from dagcraft.orchestrator.model import StepState

    body = "\n".join(f"  - id: s{i}\n    run: ['true']" for i in range(100))
    rid = submit_spec(local_store, write_spec(tmp_path, f"name: many\nsteps:\n{body}\n"))
    drive_inline(local_store, rid, tmp_path)
    view = LocalView(local_store, rid, detail=True)
    out = io.StringIO()
    progress = Progress(Console(file=out, force_terminal=False))
    progress.update(view)
    assert out.getvalue().count(": succeeded") == 100
    decoded = []
    real = StepState.model_validate_json.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(StepState, "model_validate_json",
                        classmethod(lambda cls, *a, **k: decoded.append(1) or real(cls, *a, **k)))
    view.changes += 1  # something changed (a control write, say), but no step did
    progress.update(view)
    assert out.getvalue().count(": succeeded") == 100  # nothing printed twice
    assert decoded == []
