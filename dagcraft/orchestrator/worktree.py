"""Git worktrees per attempt (``worktree:`` in a step).

Every attempt of a worktree step gets its own worktree, at ``<attempt dir>/worktree``, on a
fresh branch cut from the declared base; the branch name includes the attempt by default, so
two attempts never share one. Guarantees:

- git runs as a subprocess with an argv list, never a shell; every name that reaches it
  (branch, base, remote) is checked first, so a value such as ``--upload-pack=x`` or ``../x``
  is refused with :class:`InvalidInput` naming the field, never passed on as an option.
- ``git worktree add`` / ``remove`` / ``prune`` on one repo are serialized across processes by
  an exclusive file lock in the repo's common git dir (git's own ref locking covers the rest),
  so concurrent attempts on one repo do not corrupt it. The registration of a worktree whose
  attempt was killed (its directory gone) is pruned before each add.
- After a successful command, changes left in the worktree are committed by dagcraft (one
  commit, ``dagcraft: <run> <step> attempt <n>``); the step's outputs ``branch`` and ``commit``
  are the branch and its HEAD then. With ``push:`` the branch is pushed to that remote.
- The worktree is removed before the commit (no worktree holds a published branch). A failed
  attempt commits nothing; its branch is deleted with its worktree unless the
  worker keeps workdirs.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagcraft.errors import InvalidInput
from dagcraft.workflows import ConcreteStep, RenderContext, render_text
from dagcraft.workflows.spec import WorktreeSpec

#: a remote must be a configured remote's name (never a URL or an option)
_REMOTE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_UNSAFE_IN_REF = re.compile(r"[^A-Za-z0-9._=,-]+")
GIT_TIMEOUT_S = 120.0


class GitError(InvalidInput):
    """A git command failed: the attempt fails with git's own message."""


def check_branch(name: str, what: str = "worktree.branch") -> str:
    """``name`` if it is a safe git branch name (git's check-ref-format rules, and never an
    option or a path that climbs), else InvalidInput naming ``what``."""
    bad = (not name or name.startswith(("-", "/")) or name.endswith(("/", ".", ".lock"))
           or ".." in name or "//" in name or "@{" in name or name == "@" or _BAD_REF_CHARS.search(name)
           or any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")))
    if bad:
        raise InvalidInput(f"{what}: {name!r} is not a valid git branch name")
    return name


def check_remote(name: str) -> str:
    if not _REMOTE_RE.match(name):
        raise InvalidInput(f"worktree.push: {name!r} is not a remote name")
    return name


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``git -C repo args…`` (argv, no shell, no prompts). A failure raises GitError with
    git's message when ``check``."""
    env = {"GIT_TERMINAL_PROMPT": "0"}
    res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                         timeout=GIT_TIMEOUT_S, env={**os.environ, **env}, stdin=subprocess.DEVNULL, check=False)
    if check and res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise GitError(f"git {args[0]}: {msg[-1] if msg else f'exit code {res.returncode}'}")
    return res


@contextmanager
def repo_lock(repo: Path) -> Iterator[None]:
    """Exclusive lock on ``repo`` among dagcraft processes (held while worktrees are added or
    removed): a file in the repo's common git dir, so every worktree of it shares one."""
    common = Path(git(repo, "rev-parse", "--git-common-dir").stdout.strip())
    if not common.is_absolute():
        common = repo / common
    with open(common / "dagcraft-worktree.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ref_safe(step_id: str) -> str:
    """``step_id`` as a branch name component: a matrix or foreach instance's brackets become
    dashes (``impl[n=a]`` → ``impl-n=a``), so the default branch is valid for every step."""
    return _UNSAFE_IN_REF.sub("-", step_id).strip("-.") or "step"


@dataclass(frozen=True)
class Worktree:
    repo: Path
    path: Path
    branch: str
    push: str | None


def render(spec: WorktreeSpec, step: ConcreteStep, ctx: RenderContext, attempt: int,
           spec_dir: str | None) -> tuple[Path, str, str]:
    """The repo path, base and branch of ``spec`` rendered for this attempt, each checked."""
    variables: dict[str, Any] = {"params": ctx.params, "run": ctx.run, "steps": ctx.steps, "matrix": ctx.matrix,
                                 "item": ctx.item, "env": ctx.env, "step": {"id": ref_safe(step.id)}, "attempt": attempt}
    out: dict[str, str] = {}
    for name in ("repo", "base", "branch"):
        try:
            out[name] = render_text(getattr(spec, name), variables).strip()
        except Exception as exc:  # jinja raises many types; the step fails with the message
            raise InvalidInput(f"step {step.id!r}: worktree.{name}: {exc}") from None
    repo = Path(out["repo"])
    if not repo.is_absolute():
        parts = out["repo"].split("/")
        if ".." in parts or "\x00" in out["repo"]:
            raise InvalidInput(f"step {step.id!r}: worktree.repo {out['repo']!r} may not leave the spec's directory")
        repo = Path(spec_dir or ".") / repo
    check_branch(out["base"], "worktree.base")
    return repo, out["base"], check_branch(out["branch"])


def _resolve_base(repo: Path, base: str, remote: str | None) -> str:
    """The commit ``base`` names; a branch found only on ``remote`` (pushed by a step on
    another host) is fetched first."""
    res = git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{base}^{{commit}}", check=False)
    if res.returncode == 0:
        return res.stdout.strip()
    if remote is not None:
        git(repo, "fetch", "--quiet", "--end-of-options", remote, f"refs/heads/{base}")
        return git(repo, "rev-parse", "--verify", "FETCH_HEAD^{commit}").stdout.strip()
    raise InvalidInput(f"worktree.base: {base!r} is not a commit or branch in {repo}")


def create(spec: WorktreeSpec, step: ConcreteStep, ctx: RenderContext, attempt: int, spec_dir: str | None,
           path: Path, *, keep_leftovers: bool = False) -> Worktree:
    """A new worktree at ``path`` on a fresh branch cut from the rendered base. A leftover at
    ``path``, and an earlier attempt's left beside it by a killed worker (with its branch), are
    removed first unless ``keep_leftovers``; an existing branch of that name is refused:
    an attempt never takes over another's branch."""
    repo, base, branch = render(spec, step, ctx, attempt, spec_dir)
    remote = check_remote(spec.push) if spec.push is not None else None
    if not repo.is_dir() or git(repo, "rev-parse", "--git-dir", check=False).returncode != 0:
        raise InvalidInput(f"step {step.id!r}: worktree.repo {str(repo)!r} is not a git repository")
    repo = Path(git(repo, "rev-parse", "--show-toplevel").stdout.strip())
    with repo_lock(repo):
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        git(repo, "worktree", "prune")
        if not keep_leftovers:  # --keep-workdirs keeps every attempt's worktree
            _remove_leftovers(repo, path)
        commit = _resolve_base(repo, base, remote)
        if git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False).returncode == 0:
            raise InvalidInput(f"step {step.id!r}: worktree.branch {branch!r} already exists in {repo}")
        path.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "add", "--quiet", "-b", branch, "--", str(path), commit)
    return Worktree(repo=repo, path=path, branch=branch, push=remote)


def _registered(repo: Path) -> dict[Path, str | None]:
    """The repo's worktrees: path → checked-out branch (None: detached)."""
    out: dict[Path, str | None] = {}
    current: Path | None = None
    for line in git(repo, "worktree", "list", "--porcelain").stdout.splitlines():
        if line.startswith("worktree "):
            current = Path(line[len("worktree "):])
            out[current] = None
        elif line.startswith("branch refs/heads/") and current is not None:
            out[current] = line[len("branch refs/heads/"):]
    return out


def _remove_leftovers(repo: Path, path: Path) -> None:
    """Worktrees left by earlier attempts of this step on this host (``<step dir>/<n>/worktree``
    beside ``path``: their worker was killed before it could remove them), and their branches
    (a killed attempt published nothing). Called under the repo lock."""
    step_dir = path.parent.parent.resolve()
    for wt, branch in _registered(repo).items():
        if wt.name != path.name or wt.parent.parent.resolve() != step_dir or wt.resolve() == path.resolve():
            continue
        git(repo, "worktree", "remove", "--force", "--", str(wt), check=False)
        shutil.rmtree(wt, ignore_errors=True)
        if branch is not None:
            git(repo, "branch", "--quiet", "-D", "--", branch, check=False)
    git(repo, "worktree", "prune", check=False)


def finish(wt: Worktree, message: str) -> dict[str, str]:
    """Commit what the command left in the worktree (nothing to commit: no commit), push the
    branch when a remote is declared, and return the outputs ``branch`` and ``commit``."""
    git(wt.path, "add", "-A")
    if git(wt.path, "diff", "--cached", "--quiet", check=False).returncode != 0:
        ident: list[str] = []
        if git(wt.path, "config", "user.email", check=False).returncode != 0:
            ident = ["-c", "user.name=dagcraft", "-c", "user.email=dagcraft@localhost"]
        git(wt.path, *ident, "commit", "--quiet", "--no-verify", "-m", message)
    commit = git(wt.path, "rev-parse", "HEAD").stdout.strip()
    if wt.push is not None:
        git(wt.repo, "push", "--quiet", "--end-of-options", wt.push, f"refs/heads/{wt.branch}:refs/heads/{wt.branch}")
    return {"branch": wt.branch, "commit": commit}


def remove(wt: Worktree, *, delete_branch: bool) -> None:
    """Remove the worktree (and its branch when ``delete_branch``). Best effort on a path that
    is already gone: the registration is pruned."""
    with repo_lock(wt.repo):
        git(wt.repo, "worktree", "remove", "--force", "--", str(wt.path), check=False)
        shutil.rmtree(wt.path, ignore_errors=True)
        git(wt.repo, "worktree", "prune", check=False)
        if delete_branch:
            git(wt.repo, "branch", "--quiet", "-D", "--", wt.branch, check=False)


def delete_branch(spec: WorktreeSpec, step: ConcreteStep, ctx: RenderContext, spec_dir: str | None,
                  branch: str) -> None:
    """Compensation (``delete_on_rollback``): delete ``branch`` (the step's output) from the
    repo, and from the push remote when there is one."""
    repo, _, _ = render(spec, step, ctx, 0, spec_dir)
    check_branch(branch, "outputs.branch")
    with repo_lock(repo):
        git(repo, "worktree", "prune", check=False)
        if git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False).returncode == 0:
            git(repo, "branch", "--quiet", "-D", "--", branch)
    if spec.push is not None:
        git(repo, "push", "--quiet", "--end-of-options", check_remote(spec.push), f":refs/heads/{branch}")
