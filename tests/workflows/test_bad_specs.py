"""The malformed-spec corpus: every file must fail `dagcraft validate` with exit 2, one line,
the expected ``file:line:col: field: message`` fragment, and nothing written anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from dagcraft.cli.main import cli

BAD = Path(__file__).parent / "bad_specs"
CASES = sorted(BAD.glob("*.yaml"))


def _header(path: Path) -> tuple[str, list[str]]:
    expect, params = None, []
    for line in path.read_text().splitlines():
        if line.startswith("# expect: "):
            expect = line[len("# expect: "):]
        elif line.startswith("# params: "):
            params.append(line[len("# params: "):])
    assert expect, f"{path.name} has no '# expect:' line"
    return expect, params


def test_corpus_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_spec(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    expect, params = _header(path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGCRAFT_STORE", str(tmp_path / "store"))
    args = ["validate", str(path)]
    for p in params:
        args += ["-p", p]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    out = result.stderr if hasattr(result, "stderr") else result.output
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out  # one line, no traceback
    msg = lines[0]
    assert "Traceback" not in out
    wanted = f"{path}{expect}" if expect.startswith(":") else expect
    assert wanted in msg, f"\nexpected fragment: {wanted}\n got: {msg}"
    assert os.listdir(tmp_path) == []  # nothing written: no store, no files
    assert not Path("/tmp/pwned").exists()
