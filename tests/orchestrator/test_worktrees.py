"""Issue 10, git worktrees: each attempt of a ``worktree:`` step runs in its own git worktree on
a fresh branch; outputs ``branch``/``commit``; downstream merges; removal after the attempt (kept
with ``--keep-workdirs``); rollback deletes the branch; hostile names refused. Real git, in
repositories made in tmp_path."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from dagcraft.errors import InvalidInput
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


def test_downstream_merges_two_upstream_branches(tmp_path: Path, repo: Path, local_store: Any) -> None:
    rid, status = run_spec(local_store, tmp_path, """
        name: merge
        steps:
          - id: a
            worktree: {repo: repo, base: main}
            run: echo A > a.txt
          - id: b
            worktree: {repo: repo, base: main}
            run: echo B > b.txt
          - id: join
            needs: [a, b]
            worktree: {repo: repo, base: main, branch: "merged/${{ run.id }}"}
            run: ["git", "merge", "--no-edit", "-q", "${{ steps.a.outputs.branch }}", "${{ steps.b.outputs.branch }}"]
        """)
    st = steps(status)
    assert {s["status"] for s in st.values()} == {"succeeded"}, status
    merged = st["join"]["outputs"]
    assert merged["branch"] == f"merged/{rid}"
    assert git(repo, "show", f"{merged['commit']}:a.txt") == "A"
    assert git(repo, "show", f"{merged['commit']}:b.txt") == "B"
    parents = git(repo, "rev-list", "--parents", "-n", "1", merged["commit"]).split()[1:]
    assert set(parents) >= {st["a"]["outputs"]["commit"], st["b"]["outputs"]["commit"]}


def test_base_from_an_upstream_branch(tmp_path: Path, repo: Path, local_store: Any) -> None:
    _, status = run_spec(local_store, tmp_path, """
        name: chain
        steps:
          - id: a
            worktree: {repo: repo, base: main}
            run: echo A > a.txt
          - id: b
            needs: [a]
            worktree: {repo: repo, base: "${{ steps.a.outputs.branch }}"}
            run: cat a.txt > copy.txt
        """)
    st = steps(status)
    assert st["b"]["status"] == "succeeded", status
    assert git(repo, "show", f"{st['b']['outputs']['commit']}:copy.txt") == "A"


def test_kept_with_keep_workdirs(tmp_path: Path, repo: Path, local_store: Any) -> None:
    spec = write_spec(tmp_path, """
        name: keep
        steps:
          - id: impl
            worktree: {repo: repo}
            run: echo x > x.txt
        """)
    rid = submit_spec(local_store, spec)
    cfg = WorkerConfig(store=local_store, store_url=local_store.url, worker_id="w", tmp_root=tmp_path / "work",
                       keep_workdirs=True)
    Worker(cfg, run_id=rid, exit_when_idle=True, poll_min=0.01, poll_max=0.05).run()
    st = steps(run_status(local_store, rid))["impl"]
    assert st["status"] == "succeeded"
    kept = [p for p in worktrees(repo) if p != str(repo)]
    assert len(kept) == 1 and (Path(kept[0]) / "x.txt").read_text() == "x\n"
    assert git(Path(kept[0]), "branch", "--show-current") == st["outputs"]["branch"]


def test_rollback_deletes_the_branch(tmp_path: Path, repo: Path, local_store: Any) -> None:
    _, status = run_spec(local_store, tmp_path, """
        name: undo
        on_failure: rollback
        steps:
          - id: impl
            worktree: {repo: repo, delete_on_rollback: true}
            run: echo x > x.txt
          - id: later
            needs: [impl]
            run: exit 1
        """)
    st = steps(status)
    assert st["impl"]["status"] == "rolled_back", status
    assert branches(repo) == {"main"}
    assert worktrees(repo) == [str(repo)]


def test_a_leftover_of_a_killed_attempt_is_pruned(tmp_path: Path, repo: Path, local_store: Any) -> None:
    """A worktree registered by an attempt whose directory vanished (the worker was killed and
    its tmp wiped) does not block the next add."""
    ghost = tmp_path / "ghost"
    git(repo, "worktree", "add", "-q", "-b", "ghost", str(ghost), "main")
    subprocess.run(["rm", "-rf", str(ghost)], check=True)
    _, status = run_spec(local_store, tmp_path, """
        name: prune
        steps:
          - id: impl
            worktree: {repo: repo}
            run: "true"
        """)
    assert steps(status)["impl"]["status"] == "succeeded", status
    assert worktrees(repo) == [str(repo)]


@pytest.mark.parametrize("name", ["--upload-pack=x", "../x", "a/../b", "-b", "x.lock", "a b", "a~1", "@{-1}",
                                  "a//b", ".hidden", "x/", "a:b", ""])
def test_hostile_branch_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="not a valid git branch name"):
        check_branch(name)


@pytest.mark.parametrize("value", ["--upload-pack=x", "../x"])
def test_hostile_branch_from_a_param_fails_the_step(tmp_path: Path, repo: Path, local_store: Any,
                                                     value: str) -> None:
    _, status = run_spec(local_store, tmp_path, """
        name: hostile
        params: {b: {type: string}}
        steps:
          - id: impl
            worktree: {repo: repo, branch: "${{ params.b }}"}
            run: "true"
        """, {"b": value})
    st = steps(status)["impl"]
    assert st["status"] == "failed"
    assert "not a valid git branch name" in st["reason"] and repr(value) in st["reason"]
    assert branches(repo) == {"main"}
    assert worktrees(repo) == [str(repo)]


def test_repo_outside_the_spec_dir_is_a_compile_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
        name: bad
        steps:
          - id: impl
            worktree: {repo: ../elsewhere}
            run: "true"
        """)
    proc = cli("validate", str(spec), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "worktree" in err and "pipeline.yaml:5" in err and "Traceback" not in err


def test_not_a_repository_fails_the_step(tmp_path: Path, local_store: Any) -> None:
    (tmp_path / "plain").mkdir()
    _, status = run_spec(local_store, tmp_path, """
        name: norepo
        steps:
          - id: impl
            worktree: {repo: plain}
            run: "true"
        """)
    st = steps(status)["impl"]
    assert st["status"] == "failed" and "is not a git repository" in st["reason"]


@pytest.fixture(params=["local", "s3server"])
def store_url(request: Any, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return server_store_url(request.getfixturevalue("moto_server"))


def test_end_to_end_concurrent_worktrees_on_one_repo(tmp_path: Path, repo: Path, store_url: str) -> None:
    """Through ``dagcraft run`` with 4 workers: 4 matrix instances add worktrees to one repo at
    once, then a join merges all of them; the repo stays consistent (fsck) and nothing is left."""
    spec = write_spec(tmp_path, """
        name: e2e
        steps:
          - id: impl
            matrix: {n: [a, b, c, d]}
            worktree: {repo: repo, base: main}
            run: echo "${{ matrix.n }}" > "${{ matrix.n }}.txt"
          - id: join
            needs: [impl]
            worktree: {repo: repo, base: main}
            run: ["git", "merge", "--no-edit", "-q", "${{ steps.impl.outputs[0].branch }}",
                  "${{ steps.impl.by_key['n=b'].outputs.branch }}", "${{ steps.impl.outputs[2].branch }}",
                  "${{ steps.impl.outputs[3].branch }}"]
        """)
    proc = cli("run", str(spec), "--store", store_url, "--workers", "4", "--no-report", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = open_store(store_url)
    st = steps(run_status(store, list_runs(store)[0]["run_id"]))
    impl = [s for sid, s in st.items() if sid.startswith("impl")]
    assert len(impl) == 4 and len({s["outputs"]["branch"] for s in impl}) == 4
    commit = st["join"]["outputs"]["commit"]
    for n in "abcd":
        assert git(repo, "show", f"{commit}:{n}.txt") == n
    subprocess.run(["git", "-C", str(repo), "fsck", "--strict"], check=True, capture_output=True)
    assert worktrees(repo) == [str(repo)]
    assert len(branches(repo)) == 6


def test_schema_includes_worktree() -> None:
    from dagcraft.workflows.spec import spec_json_schema

    schema = spec_json_schema()
    assert "worktree" in schema["$defs"]["StepSpec"]["properties"]
    assert set(schema["$defs"]["WorktreeSpec"]["properties"]) == {"repo", "base", "branch", "push",
                                                                    "delete_on_rollback"}


def test_push_to_a_remote_and_a_downstream_builds_on_it(tmp_path: Path, repo: Path, local_store: Any) -> None:
    """With ``push:`` the branch reaches the remote; a step whose base is only on the remote
    (as on another host) fetches it; rollback deletes it there too. ``drop`` deleting the
    upstream branch also proves no worktree holds it once its step shows succeeded."""
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(repo, "remote", "add", "origin", str(remote))
    git(repo, "push", "-q", "origin", "main")
    _, status = run_spec(local_store, tmp_path, """
        name: pushed
        on_failure: rollback
        steps:
          - id: a
            worktree: {repo: repo, base: main, push: origin, delete_on_rollback: true}
            run: echo A > a.txt
          - id: drop
            needs: [a]
            workdir: repo
            run: ["git", "branch", "-D", "${{ steps.a.outputs.branch }}"]
          - id: b
            needs: [drop]
            worktree: {repo: repo, base: "${{ steps.a.outputs.branch }}", push: origin}
            run: cat a.txt > copy.txt
          - id: fail
            needs: [b]
            run: exit 1
        """)
    st = steps(status)
    assert st["b"]["status"] == "succeeded", status
    assert st["a"]["status"] == "rolled_back", status
    remote_branches = branches(remote)
    assert st["a"]["outputs"]["branch"] not in remote_branches  # deleted on rollback
    assert st["b"]["outputs"]["branch"] in remote_branches
    assert git(remote, "show", f"{st['b']['outputs']['branch']}:copy.txt") == "A"


def test_kill_9_mid_attempt_leftover_is_pruned_by_the_next(tmp_path: Path, repo: Path) -> None:
    """A worker killed with SIGKILL mid-attempt leaves its worktree and branch behind; the
    next attempt of the step on that host removes them and runs in a fresh one."""
    import signal

    from dagcraft.orchestrator import layout
    from dagcraft.orchestrator.model import load_state
    from tests.orchestrator.helpers import killpg, spawn_cli, wait_for

    marker = tmp_path / "started"
    store_url = str(tmp_path / "store")
    spec = write_spec(tmp_path, f"""
        name: crash
        steps:
          - id: slow
            worktree: {{repo: repo}}
            run: "echo $DAGCRAFT_ATTEMPT >> {marker}; test $DAGCRAFT_ATTEMPT = 2 || sleep 60"
        """)
    rid = cli("submit", str(spec), "--store", store_url, check=True).stdout.strip()
    env = {"TMPDIR": str(tmp_path / "tmp")}
    args = ("worker", "--store", store_url, "--run", rid, "--exit-when-idle", "--lease-ttl", "2",
            "--poll-max", "0.2", "--quiet")
    first = spawn_cli(*args, env=env)
    try:
        wait_for(lambda: marker.exists(), what="the step to start")
        killpg(first, signal.SIGKILL)
        first.wait(timeout=10)
        leftover = [p for p in worktrees(repo) if p != str(repo)]
        assert len(leftover) == 1 and f"dagcraft/{rid}/slow/1" in branches(repo)
        second = spawn_cli(*args, env=env)
        second.wait(timeout=120)
        assert second.returncode == 0
    finally:
        killpg(first)
    store = open_store(store_url)
    got = store.get(layout.step_state(rid, "slow"))
    assert got is not None
    state = load_state(got[0])
    assert [str(h.status) for h in state.history] == ["lost", "succeeded"]
    assert worktrees(repo) == [str(repo)]
    assert branches(repo) == {"main", f"dagcraft/{rid}/slow/2"}


def test_branch_and_commit_need_not_be_declared(tmp_path: Path) -> None:
    from dagcraft.workflows import compile_file

    spec = write_spec(tmp_path, """
        name: refs
        steps:
          - id: a
            worktree: {repo: .}
            outputs: {values: [summary]}
            run: echo summary=x > "$DAGCRAFT_OUTPUT"
          - id: b
            needs: [a]
            run: ["echo", "${{ steps.a.outputs.branch }}", "${{ steps.a.outputs.commit }}"]
          - id: c
            needs: [a]
            run: ["echo", "${{ steps.a.outputs.nope }}"]
        """)
    with pytest.raises(InvalidInput, match="declares no output 'nope'") as err:
        compile_file(spec, {})
    assert "'branch'" not in str(err.value) and "'commit'" not in str(err.value)
