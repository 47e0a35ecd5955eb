"""Property: random DAG specs compile, their order respects needs, and compile is deterministic."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagcraft.workflows import Spec, compile_workflow


@st.composite
def dag_specs(draw):
    n = draw(st.integers(1, 10))
    names = [f"s{i}" for i in range(n)]
    steps = []
    for i, name in enumerate(names):
        needs = draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=3)) if i else []
        step = {"id": name, "needs": needs, "run": ["echo", name]}
        if draw(st.integers(0, 4)) == 0:
            step["matrix"] = {"k": draw(st.lists(st.sampled_from(["a", "b", "c d", "x/y"]), min_size=1, max_size=3, unique=True))}
        elif needs and draw(st.integers(0, 5)) == 0:
            step["foreach"] = "${{ [1, 2] }}"
        if needs and draw(st.booleans()):
            step["run"] = ["echo", f"${{{{ steps.{needs[0]}.status }}}}"]
        steps.append(step)
    order = draw(st.permutations(range(n)))  # listing order must not matter for validity
    spec = {"name": "prop", "steps": [steps[i] for i in order]}
    if draw(st.booleans()):
        spec["finally"] = [{"id": "fin", "run": ["echo", "bye"]}]
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag_specs())
def test_random_dags_compile_in_topological_order(spec_data):
    wf = compile_workflow(Spec.model_validate(spec_data), {})
    position = {sid: i for i, sid in enumerate(wf.steps)}
    for sid, step in wf.steps.items():
        for need in step.needs:
            assert position[need] < position[sid], (need, sid)
    # every declared need is represented by (all instances of) its template
    templates = {s["id"]: s for s in spec_data["steps"]}
    for step in wf.steps.values():
        if step.is_finally:
            continue
        need_templates = {wf.steps[n].template_id for n in step.needs}
        assert need_templates == set(templates[step.template_id]["needs"])
    for tid, t in templates.items():
        count = sum(1 for s in wf.steps.values() if s.template_id == tid)
        assert count == (len(t["matrix"]["k"]) if "matrix" in t else 1)
    # finally steps come last and need every main leaf
    fins = [s for s in wf.steps.values() if s.is_finally]
    if fins:
        assert list(wf.steps)[-1] == "fin"
        g = wf.graph()
        leaves = {n for n in g.nodes if n != "fin" and set(g.successors(n)) <= {"fin"}}
        assert set(fins[0].needs) == leaves
    again = compile_workflow(Spec.model_validate(json.loads(json.dumps(spec_data))), {})
    assert again.model_dump_json() == wf.model_dump_json()
    assert again.spec_hash == wf.spec_hash
