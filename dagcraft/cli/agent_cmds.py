"""Agent-facing commands (`dagcraft agent …`): memory, send/inbox, artifact, claim/renew/release, wait-for.

Context for every command:
- store: ``--store`` → ``$DAGCRAFT_STORE`` → ``.dagcraft``
- scope: ``--run`` / ``$DAGCRAFT_RUN_ID`` → ``runs/<run>``, else ``shared``
- identity: ``--as`` → ``$DAGCRAFT_AGENT`` → ``$DAGCRAFT_STEP`` → ``user@host:<ppid>`` (the pid of
  the calling shell, so successive commands of one script share an identity)
Exit codes: 0 ok, 1 failed upstream, 2 bad input, 3 conflict, 4 not found, 5 store, 124 timeout.
Imports are lazy: ``dagcraft agent memory get`` on a local store never loads boto3.
"""

from __future__ import annotations

import copy
import functools
import getpass
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dagcraft.errors import DagcraftError, Failed, InvalidInput, NotFound


class Ctx:
    def __init__(self, store: str | None, run: str | None, as_: str | None, step: str | None = None) -> None:
        from dagcraft.cli.common import LATEST, resolve_run
        from dagcraft.primitives.keys import validate_run_id, validate_segment

        self.store_url = store
        self._store: Any = None
        self.run = run or os.environ.get("DAGCRAFT_RUN_ID") or None
        if self.run == LATEST:
            self.run = resolve_run(self.store, self.run)
        elif self.run:
            validate_run_id(self.run)
        self.step = step or os.environ.get("DAGCRAFT_STEP") or None
        if self.step:
            validate_segment(self.step, "step id")
        ident = as_ or os.environ.get("DAGCRAFT_AGENT") or self.step
        if not ident:
            try:
                user = getpass.getuser()
            except Exception:
                user = "user"
            ident = f"{user}@{socket.gethostname()}:{os.getppid()}"
        self.identity = validate_segment(ident, "identity")

    @property
    def store(self) -> Any:
        if self._store is None:
            from dagcraft.primitives.url import open_store

            self._store = open_store(self.store_url)
        return self._store

    @property
    def reader(self) -> Any:
        """The store for commands that only read: a mistyped path is "no store at PATH"
        (exit 4), never a new empty store. Opened on first use, so a bad key or name is
        still reported first (exit 2)."""
        return self._store if self._store is not None else _LazyReader(self.store_url)

    @property
    def scope(self) -> str:
        return f"runs/{self.run}" if self.run else "shared"

    @property
    def artifact_scope(self) -> str:
        if self.run and self.step:
            return f"runs/{self.run}/steps/{self.step}"
        return self.scope


class _LazyReader:
    """Opens the store (``create=False``) at the first call a primitive makes on it."""

    def __init__(self, url: str | None) -> None:
        self._url = url
        self._inner: Any = None

    def _open(self) -> Any:
        if self._inner is None:
            from dagcraft.primitives.url import open_store

            self._inner = open_store(self._url, create=False)
        return self._inner

    def __getattr__(self, name: str) -> Any:
        if self._inner is not None:
            return getattr(self._inner, name)
        # `store.get(_k(key))` looks `get` up before the key is validated: open at the call
        return lambda *args, **kw: getattr(self._open(), name)(*args, **kw)


def _opts(f: Callable[..., Any]) -> Callable[..., Any]:
    """Common context options + OSError guard; passes ``ctx: Ctx`` to the command."""

    @click.option("--store", "store_url", default=None, help="Store URL (default $DAGCRAFT_STORE, else .dagcraft).")
    @click.option("--run", "run", default=None, help="Run id scope, or @latest (default $DAGCRAFT_RUN_ID, else shared).")
    @click.option("--as", "as_", default=None, help="Identity (default $DAGCRAFT_AGENT, $DAGCRAFT_STEP, user@host:ppid).")
    @functools.wraps(f)
    def wrapper(store_url: str | None, run: str | None, as_: str | None, **kw: Any) -> Any:
        try:
            return f(Ctx(store_url, run, as_, kw.pop("step", None)), **kw)
        except DagcraftError:
            raise
        except OSError as exc:
            raise DagcraftError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None

    return wrapper


def _json_opt(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def _out(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


def _show_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def register(cli: click.Group) -> None:
    """Add the ``agent`` group to the root group, and its commands as hidden top-level
    aliases (``dagcraft memory get`` = ``dagcraft agent memory get``): scripts written for
    the old spelling keep working, while ``dagcraft --help`` lists only ``agent``."""

    @cli.group("agent")
    def agent() -> None:
        """Commands steps call: memory, messages, artifacts, claims, wait-for.

        Scoped to the step's run ($DAGCRAFT_RUN_ID, or --run RUN; RUN may be @latest), else to
        the store's shared scope. The old top-level spellings (`dagcraft memory …`) still work."""

    _register_agent(agent)
    for name, cmd in agent.commands.items():
        alias = copy.copy(cmd)
        alias.hidden = True
        cli.add_command(alias, name)


def _register_agent(cli: click.Group) -> None:

    # -- memory ----------------------------------------------------------------------------
    @cli.group("memory")
    def memory_group() -> None:
        """Versioned shared memory (scoped to the run, else shared)."""

    @memory_group.command("get")
    @click.argument("key")
    @_json_opt
    @_opts
    def memory_get(ctx: Ctx, key: str, as_json: bool) -> None:
        """Print KEY's value (strings raw, else JSON). Exit 4 if unset."""
        from dagcraft.primitives import memory

        got = memory.get(ctx.reader, ctx.scope, key)
        if got is None:
            raise NotFound(f"memory key {key!r} not set in {ctx.scope}")
        if as_json:
            _out({"key": key, "value": got[0], "version": got[1], "scope": ctx.scope})
        else:
            click.echo(_show_value(got[0]))

    @memory_group.command("set")
    @click.argument("key")
    @click.argument("value")
    @click.option("--if-version", default=None, help="Compare-and-swap: only if the current version is this.")
    @click.option("--string", "as_string", is_flag=True, help="Store VALUE as a string even if it parses as JSON.")
    @_json_opt
    @_opts
    def memory_set(ctx: Ctx, key: str, value: str, if_version: str | None, as_string: bool, as_json: bool) -> None:
        """Set KEY to VALUE (parsed as JSON when it is valid JSON, else a string). Prints the version."""
        from dagcraft.primitives import memory

        parsed: Any = value
        if not as_string:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
        version = memory.set(ctx.store, ctx.scope, key, parsed, writer=ctx.identity, if_version=if_version)
        if as_json:
            _out({"key": key, "version": version, "scope": ctx.scope})
        else:
            click.echo(version)

    @memory_group.command("list")
    @click.argument("prefix", required=False, default="")
    @_json_opt
    @_opts
    def memory_list(ctx: Ctx, prefix: str, as_json: bool) -> None:
        """List memory keys (under PREFIX)."""
        from dagcraft.primitives import memory

        keys = memory.list_keys(ctx.reader, ctx.scope, prefix)
        if as_json:
            _out(keys)
        else:
            for k in keys:
                click.echo(k)

    @memory_group.command("history")
    @click.argument("key")
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="Show only the last N versions.")
    @_json_opt
    @_opts
    def memory_history(ctx: Ctx, key: str, limit: int | None, as_json: bool) -> None:
        """Show KEY's history, oldest first."""
        from dagcraft.primitives import memory

        hist = memory.history(ctx.reader, ctx.scope, key, limit)
        if as_json:
            _out(hist)
        else:
            for h in hist:
                click.echo(f"{h['ts']:.3f}\t{h['writer']}\t{h['version']}\t{_show_value(h['value'])}")

    # -- mailbox ---------------------------------------------------------------------------
    @cli.command("send")
    @click.argument("to")
    @click.argument("message")
    @_json_opt
    @_opts
    def send(ctx: Ctx, to: str, message: str, as_json: bool) -> None:
        """Send MESSAGE to TO (a reader identity, or '*' for everyone). Prints the message id."""
        from dagcraft.primitives import mailbox

        m = mailbox.send(ctx.store, ctx.scope, sender=ctx.identity, to=to, body=message)
        if as_json:
            _out(m.to_dict())
        else:
            click.echo(m.id)

    @cli.command("inbox")
    @click.option("--ack", is_flag=True, help="Acknowledge the messages printed (they will not be shown again).")
    @click.option("--limit", type=click.IntRange(min=1), default=None, help="Print at most N messages.")
    @_json_opt
    @_opts
    def inbox(ctx: Ctx, ack: bool, limit: int | None, as_json: bool) -> None:
        """Print unacknowledged messages for this identity, oldest first (at-least-once)."""
        from dagcraft.primitives import mailbox

        msgs = mailbox.read(ctx.store, ctx.scope, ctx.identity, limit=limit)
        if as_json:
            _out([m.to_dict() for m in msgs])
        else:
            for m in msgs:
                click.echo(f"{m.id}\t{m.sender}\t{_show_value(m.body)}")
        if ack and msgs:
            mailbox.ack(ctx.store, ctx.scope, ctx.identity, [m.id for m in msgs])

    # -- artifacts -------------------------------------------------------------------------
    @cli.group("artifact")
    def artifact_group() -> None:
        """Content-addressed artifacts (scoped to the run's step, the run, else shared)."""

    step_opt = click.option("--step", default=None, help="Step scope (default $DAGCRAFT_STEP).")

    @artifact_group.command("put")
    @click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--name", default=None, help="Artifact name (default: the file name).")
    @click.option("--content-type", default=None, help="MIME type recorded with the artifact.")
    @step_opt
    @_json_opt
    @_opts
    def artifact_put(ctx: Ctx, path: Path, name: str | None, content_type: str | None, as_json: bool) -> None:
        """Upload PATH as an artifact. Prints its digest."""
        from dagcraft.primitives import artifacts

        if not path.is_file():
            raise NotFound(f"no such file: {path}")
        p = artifacts.put(ctx.store, path, scope=ctx.artifact_scope, name=name or path.name,
                          uploader=ctx.identity, content_type=content_type)
        if as_json:
            _out(p.model_dump())
        else:
            click.echo(p.digest)

    @artifact_group.command("get")
    @click.argument("name")
    @click.argument("dest", required=False)
    @step_opt
    @_json_opt
    @_opts
    def artifact_get(ctx: Ctx, name: str, dest: str | None, as_json: bool) -> None:
        """Download artifact NAME to DEST (default: ./NAME), verifying its digest."""
        from dagcraft.primitives import artifacts
        from dagcraft.primitives.keys import validate_relpath

        validate_relpath(name, "artifact name")
        target = Path(dest) if dest else Path(name)
        if target.is_dir() or (dest is not None and dest.endswith(("/", os.sep))):
            target = target / Path(name).name
        p = artifacts.get(ctx.reader, scope=ctx.artifact_scope, name=name, dest=target)
        if as_json:
            _out({**p.model_dump(), "path": str(target)})
        else:
            click.echo(str(target))

    @artifact_group.command("list")
    @step_opt
    @_json_opt
    @_opts
    def artifact_list(ctx: Ctx, as_json: bool) -> None:
        """List artifacts in scope."""
        from dagcraft.primitives import artifacts

        items = artifacts.list_artifacts(ctx.reader, ctx.artifact_scope)
        if as_json:
            _out([p.model_dump() for p in items])
        else:
            for p in items:
                click.echo(f"{p.name}\t{p.size}\t{p.digest}\t{p.uploader}")

    # -- claims ----------------------------------------------------------------------------
    def _claim_key(ctx: Ctx, name: str) -> str:
        from dagcraft.primitives.keys import validate_relpath

        validate_relpath(name, "claim name")
        return f"{ctx.scope}/claims/{name}"

    def _lease_out(lease: Any, as_json: bool, verb: str) -> None:
        if as_json:
            _out({"name": lease.key, "holder": lease.holder, "token": lease.token, "expires_at": lease.expires_at})
        else:
            click.echo(f"{verb} {lease.key} as {lease.holder} (token {lease.token})")

    ttl_opt = click.option("--ttl", type=click.FloatRange(min=0), default=300.0, show_default=True,
                           help="Seconds until the claim expires (store clock).")

    @cli.command("claim")
    @click.argument("name")
    @ttl_opt
    @_json_opt
    @_opts
    def claim(ctx: Ctx, name: str, ttl: float, as_json: bool) -> None:
        """Claim NAME for this identity. Exit 3 if someone else holds it."""
        from dagcraft.primitives import lease

        _lease_out(lease.acquire(ctx.store, _claim_key(ctx, name), ctx.identity, ttl), as_json, "claimed")

    @cli.command("renew")
    @click.argument("name")
    @ttl_opt
    @_json_opt
    @_opts
    def renew(ctx: Ctx, name: str, ttl: float, as_json: bool) -> None:
        """Extend this identity's claim on NAME. Exit 3 if it was lost."""
        from dagcraft.primitives import lease

        key = _claim_key(ctx, name)
        _lease_out(lease.renew(ctx.store, lease.current(ctx.store, key, ctx.identity), ttl), as_json, "renewed")

    @cli.command("release")
    @click.argument("name")
    @_opts
    def release(ctx: Ctx, name: str) -> None:
        """Release this identity's claim on NAME. Exit 3 if it was lost."""
        from dagcraft.primitives import lease

        key = _claim_key(ctx, name)
        lease.release(ctx.store, lease.current(ctx.store, key, ctx.identity))

    # -- wait-for --------------------------------------------------------------------------
    @cli.command("wait-for")
    @click.argument("steps", nargs=-1, required=True)
    @click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Seconds (default: forever).")
    @_json_opt
    @_opts
    def wait_for(ctx: Ctx, steps: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
        """Wait until STEPS of the run are terminal: exit 0 satisfied, 1 failed upstream, 124 timeout."""
        from dagcraft.orchestrator.waiting import wait_for_steps

        if not ctx.run:
            raise InvalidInput("wait-for needs a run id (--run or $DAGCRAFT_RUN_ID)")
        try:  # every step id is validated before waiting
            done = wait_for_steps(ctx.reader, ctx.run, steps, timeout=timeout)
        except Failed as exc:
            if as_json:
                _out({"satisfied": False, "error": str(exc)})
            raise
        if as_json:
            _out({"satisfied": True, "steps": done})
        else:
            click.echo("satisfied: " + ", ".join(f"{k}={v}" for k, v in done.items()))
