"""Issue 10, docs: every field of the spec models (``dagcraft/workflows/spec.py``) is documented
in docs/spec.md and present in ``dagcraft schema``. Walks the pydantic models from ``Spec``
down, so a field added anywhere in the spec (a new step field, a nested model) is found."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from dagcraft.workflows.spec import MATRIX_MODIFIERS, Spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def _models(annotation: typing.Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def spec_fields() -> list[tuple[str, str]]:
    """``(model name, field name as written in YAML)`` for every model reachable from Spec."""
    out: list[tuple[str, str]] = []
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Spec]
    while todo:
        model = todo.pop(0)
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            out.append((model.__name__, field.alias or name))
            todo.extend(_models(field.annotation))
    return out


def documented(key: str, doc: str) -> bool:
    """``key`` appears as a field: in backticks (`` `key` `` or `` `key: …` ``), or as a YAML
    key inside a fenced code block. A bare word in prose does not count."""
    code = "\n".join(re.findall(r"```.*?```", doc, re.S))
    k = re.escape(key)
    return (f"`{key}`" in doc
            or re.search(rf"`[^`\n]*(?<![\w-]){k}:", doc) is not None
            or re.search(rf"(^|[\s{{,\[-]){k}:", code, re.M) is not None)


FIELDS = spec_fields()


def test_the_walk_finds_nested_models() -> None:
    models = {m for m, _ in FIELDS}
    assert {"Spec", "StepSpec", "ParamSpec", "AgentDef", "RetrySpec", "RetryOnSpec", "OutputsSpec",
            "InputSpec", "ApprovalSpec", "WorktreeSpec", "DefaultsSpec"} <= models
    assert ("InputSpec", "from") in FIELDS and ("Spec", "finally") in FIELDS  # aliases, as written


def test_documented_rejects_prose_and_accepts_fields() -> None:
    doc = "A step named in prose.\n`needs` and `on_timeout: approve`\n```yaml\n  budget: {usd: 1}\n```\n"
    assert documented("needs", doc) and documented("on_timeout", doc) and documented("budget", doc)
    assert not documented("named", doc) and not documented("prose", doc) and not documented("tokens", doc)


@pytest.mark.parametrize("model,key", FIELDS, ids=[f"{m}.{k}" for m, k in FIELDS])
def test_every_spec_field_is_in_docs_spec_md(model: str, key: str) -> None:
    assert documented(key, DOC.read_text()), f"docs/spec.md does not document {model}.{key}"


def test_matrix_include_exclude_are_documented() -> None:
    doc = DOC.read_text()
    for key in MATRIX_MODIFIERS:
        assert documented(key, doc), key


def test_dagcraft_schema_has_every_field() -> None:
    proc = subprocess.run([sys.executable, "-m", "dagcraft.cli.main", "schema"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    defs = schema["$defs"]
    missing = []
    for model, key in FIELDS:
        props = schema["properties"] if model == "Spec" else defs.get(model, {}).get("properties", {})
        if key not in props:
            missing.append(f"{model}.{key}")
    assert not missing, f"dagcraft schema lacks {missing}"
    matrix = json.dumps(defs["StepSpec"]["properties"]["matrix"])
    assert all(f'"{k}"' in matrix for k in MATRIX_MODIFIERS)
