"""Issue 10, git worktrees: each attempt of a ``worktree:`` step runs in its own git worktree on
a fresh branch; outputs ``branch``/``commit``; downstream merges; removal after the attempt (kept
with ``--keep-workdirs``); rollback deletes the branch; hostile names refused. Real git, in
repositories made in tmp_path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dagcraft.errors import DagcraftError, InvalidInput
from dagcraft.orchestrator import WorkerConfig, list_runs, run_status
from dagcraft.orchestrator.worker import Worker
from dagcraft.orchestrator.worktree import check_branch
from dagcraft.primitives import open_store
from tests.conftest import server_store_url
from tests.orchestrator.helpers import cli, run_spec, steps, submit_spec, write_spec


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def branches(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads").split())


def worktrees(repo: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in git(repo, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "-c", "init.defaultBranch=main", "init", "-q")
    git(r, "config", "user.name", "Test")
    git(r, "config", "user.email", "test@example.com")
    (r / "README").write_text("base\n")
    git(r, "add", "README")
    git(r, "commit", "-q", "-m", "base")
    return r


def test_retry_gets_a_fresh_worktree_and_branch(tmp_path: Path, repo: Path, local_store: Any) -> None:
    log = tmp_path / "where.log"
    rid, status = run_spec(local_store, tmp_path, f"""
        name: wt
        steps:
          - id: impl
            worktree: {{repo: repo, base: main}}
            retries: {{limit: 1, backoff: 0}}
            run: |
              echo "$PWD $(git branch --show-current)" >> {log}
              echo "attempt $DAGCRAFT_ATTEMPT" > work.txt
              test "$DAGCRAFT_ATTEMPT" = 2
        """)
    st = steps(status)["impl"]
    assert st["status"] == "succeeded", status
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    (wd1, br1), (wd2, br2) = (line.split() for line in lines)
    assert wd1 != wd2
    assert (br1, br2) == (f"dagcraft/{rid}/impl/1", f"dagcraft/{rid}/impl/2")
    outputs = st["outputs"]
    assert outputs["branch"] == br2
    assert outputs["commit"] == git(repo, "rev-parse", br2)
    # the change left in the worktree was committed on the branch, not on main
    assert git(repo, "show", f"{br2}:work.txt") == "attempt 2"
    assert git(repo, "ls-tree", "--name-only", "main") == "README"
    # the failed attempt's branch is gone; both worktrees were removed
    assert branches(repo) == {"main", br2}
    assert worktrees(repo) == [str(repo)]
    assert not Path(wd1).exists() and not Path(wd2).exists()
