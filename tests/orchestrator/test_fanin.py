"""Issue 10, fan-in: a step downstream of a matrix or foreach step sees every instance's outputs
and files (in instance order, and by instance key), end to end through ``dagcraft run`` on the
local store and on the moto server."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from dagcraft.orchestrator import layout, list_runs, run_status
from dagcraft.orchestrator.ops import read_log
from dagcraft.primitives import open_store
from tests.conftest import server_store_url
from tests.orchestrator.helpers import REPO, cli, run_spec, steps, write_spec


@pytest.fixture(params=["local", "s3server"])
def store_url(request: Any, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


def _run(tmp_path: Path, store_url: str, text: str) -> tuple[Any, dict[str, Any], Any]:
    spec = write_spec(tmp_path, text)
    proc = cli("run", str(spec), "--store", store_url, "--workers", "2", "--no-report", cwd=tmp_path, timeout=240)
    st = open_store(store_url)
    runs = list_runs(st)
    assert runs, proc.stdout + proc.stderr
    return proc, run_status(st, runs[0]["run_id"]), st


def _artifact(store: Any, run_id: str, step: str, name: str) -> bytes:
    ptr = json.loads(store.get(f"{layout.step_scope(run_id, step)}/artifacts/{name}")[0])
    got = store.get(f"blobs/sha256/{ptr['digest'].split(':', 1)[1]}")
    assert got is not None
    return bytes(got[0])


def _content(name: str) -> bytes:
    # binary, instance-specific, not a multiple of any block size
    return hashlib.sha256(name.encode()).digest() * 37 + bytes(range(256)) + name.encode()


WRITE = (f"{sys.executable}", "-c",
         "import hashlib, sys; n = sys.argv[1]; open('f.bin', 'wb').write("
         "hashlib.sha256(n.encode()).digest() * 37 + bytes(range(256)) + n.encode())")


def test_fanin_of_three_matrix_instances_artifacts_byte_compared(tmp_path, store_url):
    proc, status, store = _run(tmp_path, store_url, f"""
        name: fanin
        steps:
          - id: gen
            matrix: {{name: [a, b, c]}}
            run: {json.dumps([*WRITE, "${{ matrix.name }}"])}
            outputs: {{artifacts: [f.bin]}}
          - id: join
            needs: gen
            inputs: [{{from: gen, artifact: f.bin}}]
            run: |
              cat gen/name=a/f.bin gen/name=b/f.bin gen/name=c/f.bin > all.bin
              cat ${{{{ steps.gen.artifacts[0]['f.bin'] }}}} ${{{{ steps.gen.artifacts[1]['f.bin'] }}}} \\
                  ${{{{ steps.gen.artifacts[2]['f.bin'] }}}} > tpl.bin
              cat ${{{{ steps.gen.by_key['name=b'].artifacts['f.bin'] }}}} > b.bin
              echo "keys=${{{{ steps.gen.instances | map(attribute='key') | join(',') }}}}" >> $DAGCRAFT_OUTPUT
              echo "dirs=$(ls gen | tr '\\n' ,)" >> $DAGCRAFT_OUTPUT
            outputs: {{values: [keys, dirs], artifacts: [all.bin, tpl.bin, b.bin]}}
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by = steps(status)
    rid = status["run_id"]
    expected = _content("a") + _content("b") + _content("c")
    assert _artifact(store, rid, "join", "all.bin") == expected
    assert _artifact(store, rid, "join", "tpl.bin") == expected
    assert _artifact(store, rid, "join", "b.bin") == _content("b")  # not the last instance's file
    assert by["join"]["outputs"] == {"keys": "name=a,name=b,name=c", "dirs": "name=a,name=b,name=c,"}


def test_foreach_fanin_of_outputs_and_files_in_instance_order(tmp_path, store_url):
    proc, status, store = _run(tmp_path, store_url, """
        name: fanin
        steps:
          - id: plan
            run: "echo 'items=[\\"c\\", \\"a\\", \\"b\\"]' >> $DAGCRAFT_OUTPUT"
            outputs: {values: [items]}
          - id: impl
            needs: plan
            foreach: "${{ steps.plan.outputs.items }}"
            run: "echo v=${{ item }}-done >> $DAGCRAFT_OUTPUT; printf '%s;' ${{ item }} > r.txt"
            outputs: {values: [v], artifacts: [r.txt]}
          - id: join
            needs: impl
            inputs: [{from: impl, artifact: r.txt, as: got}]
            run: |
              echo "order=${{ steps.impl.outputs | map(attribute='v') | join(',') }}" >> $DAGCRAFT_OUTPUT
              echo "keys=${{ steps.impl.instances | map(attribute='key') | join(',') }}" >> $DAGCRAFT_OUTPUT
              echo "items=${{ steps.impl.instances | map(attribute='item') | join(',') }}" >> $DAGCRAFT_OUTPUT
              echo "one=${{ steps.impl.by_key['1'].outputs.v }}" >> $DAGCRAFT_OUTPUT
              echo "files=$(cat got/0/r.txt got/1/r.txt got/2/r.txt)" >> $DAGCRAFT_OUTPUT
              echo "tpl=$(cat ${{ steps.impl.instances[2].artifacts['r.txt'] }})" >> $DAGCRAFT_OUTPUT
            outputs: {values: [order, keys, items, one, files, tpl]}
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert steps(status)["join"]["outputs"] == {
        "order": "c-done,a-done,b-done", "keys": "0,1,2", "items": "c,a,b", "one": "a-done",
        "files": "c;a;b;", "tpl": "b;",
    }


def test_ambiguous_reference_is_refused_before_anything_is_written(tmp_path):
    spec = write_spec(tmp_path, """
        name: fanin
        steps:
          - id: gen
            matrix: {name: [a, b, c]}
            run: "echo ${{ matrix.name }} > f.txt"
            outputs: {artifacts: [f.txt]}
          - id: read
            needs: gen
            run: "cat ${{ steps.gen.artifacts['f.txt'] }}"
    """)
    store = tmp_path / "store"
    proc = cli("run", str(spec), "--store", str(store), "--no-report", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"dagcraft: {spec}:10:10: steps[1].run: "), line  # the spec text starts with a newline
    assert "inputs: [{from: gen, artifact: f.txt}]" in line and "by_key['name=a']" in line
    assert not store.exists() or not list_runs(open_store(str(store)))


def test_instances_that_failed_are_visible_and_their_files_absent(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: partial
        on_failure: continue
        steps:
          - id: gen
            matrix: {name: [a, b, c]}
            run: "test ${{ matrix.name }} != b && echo ${{ matrix.name }} > f.txt"
            outputs: {artifacts: [f.txt]}
          - id: join
            needs: gen
            when: "${{ always() }}"
            inputs: [{from: gen, artifact: f.txt}]
            run: |
              echo "st=${{ steps.gen.instances | map(attribute='status') | join(',') }}" >> $DAGCRAFT_OUTPUT
              echo "agg=${{ steps.gen.status }}" >> $DAGCRAFT_OUTPUT
              echo "files=$(cat gen/*/f.txt | tr '\\n' ,)" >> $DAGCRAFT_OUTPUT
            outputs: {values: [st, agg, files]}
    """)
    by = steps(st)
    assert by["gen[name=b]"]["status"] == "failed"
    assert by["join"]["status"] == "succeeded", by["join"]
    assert by["join"]["outputs"] == {"st": "succeeded,failed,succeeded", "agg": "failed", "files": "a,c,"}


def test_the_fan_in_example_in_docs_runs(local_store, tmp_path):
    text = (REPO / "docs" / "spec.md").read_text()
    block = text[text.index("## Fan-in"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    block = block.replace("review --as ${{ matrix.reviewer }}", "echo by ${{ matrix.reviewer }}")
    rid, st = run_spec(local_store, tmp_path, "name: d\nsteps:\n" + block)
    assert st["status"] == "succeeded", st
    out = read_log(local_store, rid, "merge").decode()
    assert "ok,ok\nby style\nreviewer=security reviewer=style\n" in out, out


def test_matrix_include_and_exclude_reach_the_commands(local_store, tmp_path):
    rid, st = run_spec(local_store, tmp_path, """
        name: incl
        steps:
          - id: t
            matrix:
              os: [linux, mac]
              exclude: [{os: mac}]
              include: [{os: linux, cc: clang}, {os: win}]
            run: "echo got=${{ matrix.os }}-${{ matrix.cc | default('none') }} >> $DAGCRAFT_OUTPUT"
            outputs: {values: [got]}
          - id: join
            needs: t
            run: "echo all=${{ steps.t.outputs | map(attribute='got') | join(',') }} >> $DAGCRAFT_OUTPUT"
            outputs: {values: [all]}
    """)
    by = steps(st)
    assert [s for s in by if s.startswith("t[")] == ["t[os=linux]", "t[os=win]"]
    assert by["join"]["outputs"] == {"all": "linux-clang,win-none"}
