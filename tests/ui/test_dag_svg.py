"""``graph_render.to_svg``: the DAG drawing the UI colours live (and any page can embed)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from dagcraft.workflows import compile_file
from dagcraft.workflows.graph_render import SVG_CSS, to_svg
from dagcraft.workflows.spec import CompiledWorkflow, ConcreteStep
from tests.orchestrator.helpers import unsupported_spec_fields

REPO = Path(__file__).resolve().parents[2]
NS = "{http://www.w3.org/2000/svg}"


def wf_of(steps: dict[str, dict[str, object]], name: str = "w") -> CompiledWorkflow:
    return CompiledWorkflow(name=name, steps={sid: ConcreteStep(id=sid, template_id=sid, run="true", **kw)  # type: ignore[arg-type]
                                              for sid, kw in steps.items()})


def nodes(svg: str) -> dict[str, ET.Element]:
    return {g.get("data-step"): g for g in ET.fromstring(svg).iter(f"{NS}g")}  # type: ignore[misc]


def x_of(g: ET.Element) -> float:
    m = re.match(r"translate\(([\d.]+),", g.get("transform", ""))
    assert m, g.attrib
    return float(m.group(1))


def test_every_example_draws_every_step_and_edge() -> None:
    for spec in sorted(REPO.glob("examples/*/pipeline.yaml")):
        if unsupported_spec_fields(spec.read_text()):
            continue  # uses loop/budget, not merged on this branch yet
        wf = compile_file(spec, {})
        svg = to_svg(wf)
        root = ET.fromstring(svg)  # well-formed XML
        got = nodes(svg)
        assert set(got) == set(wf.steps), spec
        edges = [(p.get("data-from"), p.get("data-to")) for p in root.iter(f"{NS}path") if p.get("data-from")]
        assert sorted(edges) == sorted((n, s) for s, st in wf.steps.items() for n in st.needs), spec
        for sid, step in wf.steps.items():  # edges run left to right: a step right of its needs
            assert all(x_of(got[sid]) > x_of(got[n]) for n in step.needs), (spec, sid)
        assert svg == to_svg(wf)  # deterministic


def test_status_classes_and_text() -> None:
    wf = wf_of({"a": {"needs": []}, "b": {"needs": ["a"]}, "c": {"needs": ["a"]}})
    plain = nodes(to_svg(wf))
    assert {k: g.get("class") for k, g in plain.items()} == dict.fromkeys("abc", "dc-node")
    live = nodes(to_svg(wf, {"a": "succeeded", "b": "running"}))
    assert {k: g.get("class") for k, g in live.items()} == {"a": "dc-node st-succeeded", "b": "dc-node st-running",
                                                            "c": "dc-node st-pending"}
    sub = {k: g.find(f"{NS}text[@class='dc-sub']").text for k, g in live.items()}  # type: ignore[union-attr]
    assert sub == {"a": "succeeded", "b": "running", "c": "pending"}


def test_finally_last_and_dashed() -> None:
    wf = wf_of({"a": {"needs": []}, "b": {"needs": ["a"]}, "z": {"needs": ["b"], "is_finally": True,
                                                              "when": "${{ always() }}"}})
    got = nodes(to_svg(wf))
    assert got["z"].get("class") == "dc-node dc-finally"
    assert x_of(got["z"]) > x_of(got["b"]) > x_of(got["a"])


def test_text_is_escaped_and_long_ids_shortened() -> None:
    long_id = "a_really_long_step_identifier_for_the_drawing"
    wf = wf_of({long_id: {"needs": [], "when": '${{ 1 < 2 && "</text><script>x</script>" }}'}}, name='w"<&')
    svg = to_svg(wf)
    assert "<script>" not in svg and "&lt;/text&gt;&lt;script&gt;" in svg
    root = ET.fromstring(svg)
    assert root.get("aria-label") == 'w"<& DAG'
    g = nodes(svg)[long_id]
    assert g.find(f"{NS}title").text.startswith(long_id)  # type: ignore[union-attr]
    shown = g.find(f"{NS}text[@class='dc-id']").text  # type: ignore[union-attr]
    assert shown is not None and shown.endswith("…") and len(shown) == 24


def test_style_embedded_unless_asked_not_to() -> None:
    wf = wf_of({"a": {"needs": []}})
    assert f"<style>{SVG_CSS}</style>" in to_svg(wf)
    assert "<style>" not in to_svg(wf, embed_style=False)
    for status in ("running", "succeeded", "failed", "skipped", "cancelled", "retrying"):
        assert f".st-{status} rect" in SVG_CSS
