"""A worker's local view of one run, kept current from the journal.

The view is a cache: every decision taken from it is confirmed by a compare-and-swap on the
record it changes, so a stale view costs at most a failed CAS, never a wrong transition.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from dagcraft.errors import CorruptRecord, InvalidInput, NotFound
from dagcraft.orchestrator import layout
from dagcraft.orchestrator.journal import JournalReader
from dagcraft.orchestrator.model import (
    ACTIVE,
    DETAIL_STATUSES,
    DONE_OK,
    OPEN,
    TERMINAL,
    Control,
    RunRecord,
    StepState,
    StepStatus,
    load_control,
    load_record,
    load_state,
)
from dagcraft.orchestrator.spill import Spill
from dagcraft.orchestrator.steptable import StepTable, read_run_record
from dagcraft.primitives.persist import Persistence
from dagcraft.primitives.store import Store
from dagcraft.tracing import REDACTED
from dagcraft.workflows import CompiledWorkflow, ConcreteStep, instance_key

#: how secret params reach a worker (never the store): ``DAGCRAFT_PARAM_<NAME>``
SECRET_ENV_PREFIX = "DAGCRAFT_PARAM_"


def secret_env_name(param: str) -> str:
    return SECRET_ENV_PREFIX + param.upper().replace("-", "_")


def without_secret_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less every ``DAGCRAFT_PARAM_*`` variable. The worker's environment carries every
    run's secrets; a step (its child process, its ``env`` template context) gets a secret only
    through its own templates, so neither ever sees these."""
    return {k: v for k, v in env.items() if not k.startswith(SECRET_ENV_PREFIX)}


def read_secrets(files: Sequence[str] = (), stdin_name: str | None = None,
                 stdin: TextIO | None = None) -> dict[str, str]:
    """Secret param values given out of the command line's sight: ``--secret-file NAME=PATH``
    (the file's text) and ``--secret-stdin NAME`` (all of ``stdin``); one trailing newline is
    stripped from each. InvalidInput (exit 2), naming the option, for a malformed option, an
    unreadable or empty file or stdin, or a name given twice. Values are never echoed."""
    from dagcraft.workflows.spec import ID_RE

    out: dict[str, str] = {}

    def put(name: str, value: str, what: str) -> None:
        if not ID_RE.match(name):
            raise InvalidInput(f"{what}: invalid parameter name {name!r}")
        if name in out:
            raise InvalidInput(f"{what}: secret {name!r} given twice")
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
        if not value:
            raise InvalidInput(f"{what}: the secret is empty")
        out[name] = value

    for item in files:
        name, sep, path = item.partition("=")
        what = f"--secret-file {item}"
        if not sep or not path:
            raise InvalidInput(f"--secret-file expects NAME=PATH, got {item!r}")
        try:
            text = Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise InvalidInput(f"{what}: cannot read {path}: {why}") from None
        put(name.strip(), text, what)
    if stdin_name is not None:
        what = f"--secret-stdin {stdin_name}"
        if stdin is None or stdin.isatty():
            raise InvalidInput(f"{what}: standard input is a terminal; pipe the secret in")
        put(stdin_name.strip(), stdin.read(), what)
    return out


def secret_env(values: Mapping[str, str]) -> dict[str, str]:
    """``{param: value}`` → the ``DAGCRAFT_PARAM_<NAME>`` variables a worker reads them from."""
    return {secret_env_name(name): value for name, value in values.items()}


def require_secrets(store: Store, run_id: str, environ: Mapping[str, str]) -> None:
    """InvalidInput (exit 2) naming the first secret param that ``run_id`` was submitted with
    and that ``environ`` (the workers' environment to be) does not provide: without it its
    steps would run with ``[redacted]`` in its place."""
    record, _ = load_run(store, run_id)
    for name in record.secret_params:
        if record.params.get(name) is not None and secret_env_name(name) not in environ:
            raise InvalidInput(f"run {run_id!r} needs secret parameter {name!r}: set {secret_env_name(name)}, "
                               f"or pass --secret-file {name}=PATH or --secret-stdin {name}")


def missing_secrets(wf: CompiledWorkflow, step: ConcreteStep, *, rollback: bool = False) -> list[str]:
    """Secret params that the templates of ``step``'s command (its compensation with
    ``rollback``) mention but this process was not given (their value is still the store's
    ``[redacted]`` placeholder): running it would pass the placeholder instead. A textual check
    of the raw templates, erring towards naming one."""
    command = [step.rollback] if rollback else [step.run, step.prompt]
    text = json.dumps([*command, step.env, step.workdir])
    return [name for name in wf.secret_params
            if wf.params.get(name) == REDACTED and secret_env_name(name) not in os.environ
            and re.search(rf"params\s*(?:\.\s*{re.escape(name)}\b|\[\s*['\"]{re.escape(name)}['\"])", text)]


def load_run(store: Store, run_id: str) -> tuple[RunRecord, CompiledWorkflow]:
    """The run record and its workflow, with secret params taken from this process's
    environment (``DAGCRAFT_PARAM_<NAME>``); secrets are never read from the store.
    The record's ``workflow`` is left empty: the returned model is the workflow, and its
    ``steps`` is a :class:`StepTable` (steps in submission order, each built on demand). The
    JSON is read one step at a time (:func:`read_run_record`): neither every step's parsed
    data nor every step's model is ever held at once, so a worker's memory does not follow
    the run's size. A record that does not read so is read again the way
    :func:`workflow_of` does, for its precise CorruptRecord."""
    key = layout.run_record(run_id)
    got = store.get(key)
    if got is None:
        raise NotFound(f"run {run_id!r} not found in {store.url}")
    try:
        text = got[0].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    data: bytes | None = None if text is not None else got[0]
    del got  # the bytes are not held while their text is parsed: at 10,000 steps, 6 MB each
    try:
        if text is None:
            raise ValueError("not UTF-8")
        fields, wf_fields, table = read_run_record(text)
        record = RunRecord.model_validate({**fields, "workflow": {}})
        wf = CompiledWorkflow.model_validate({**wf_fields, "steps": {}})
    except ValueError:  # malformed JSON, a field that does not validate (ValidationError), not UTF-8
        text = None
        if data is None:  # read again, for the precise error (a corrupt record only)
            again = store.get(key)
            if again is None:
                raise NotFound(f"run {run_id!r} not found in {store.url}") from None
            data = again[0]
        full = load_record(RunRecord, data, key, store.url)
        wf = workflow_of(full, store.url)
        table = StepTable()
        for step in wf.steps.values():
            table.add(step)
        wf.steps = table  # type: ignore[assignment]  # a read-only mapping of the same steps
        return full.model_copy(update={"workflow": {}}), wf
    del text
    for name in record.secret_params:
        if secret_env_name(name) in os.environ:
            wf.params = {**wf.params, name: os.environ[secret_env_name(name)]}
    if record.order and len(record.order) == len(table) and set(record.order) == set(table):
        table.reorder(record.order)
        record.order = list(table)  # the same id strings, not a second copy of each
    wf.steps = table  # type: ignore[assignment]  # a read-only mapping of the same steps
    return record, wf


def workflow_of(record: RunRecord, store_url: str, *, with_secrets: bool = True) -> CompiledWorkflow:
    """The compiled workflow of a run record, steps in submission order; with ``with_secrets``
    the secret params this process was given replace their ``[redacted]`` placeholders.
    CorruptRecord (naming the record's key) if the stored workflow is not valid."""
    data = dict(record.workflow)
    params = dict(data.get("params", {}))
    for name in record.secret_params if with_secrets else ():
        if secret_env_name(name) in os.environ:
            params[name] = os.environ[secret_env_name(name)]
    data["params"] = params
    steps = data.get("steps", {})
    if record.order and set(record.order) == set(steps):
        data["steps"] = {sid: steps[sid] for sid in record.order}
    try:
        return CompiledWorkflow.model_validate(data)
    except ValidationError as exc:
        key = layout.run_record(record.run_id)
        raise CorruptRecord(key, f"workflow is not valid ({exc.error_count()} error(s))", store_url) from None


def fan_in(instances: list[dict[str, Any]], status: str) -> dict[str, Any]:
    """``steps.<id>`` of a fan-out step from its ``instances`` (in instance order, each
    ``{id, key, matrix, item, outputs, artifacts, status}``): ``outputs`` and ``artifacts`` are
    lists with one entry per instance, ``by_key`` maps each instance key to its entry."""
    return {"outputs": [i["outputs"] for i in instances], "artifacts": [i["artifacts"] for i in instances],
            "status": status, "instances": instances, "by_key": {i["key"]: i for i in instances}}


class StepStates(Mapping[str, tuple[StepState, "str | None"]]):
    """Step id → (state, etag) of each step a view knows a version of.

    Held in the smallest form that answers what the scheduler asks of it every cycle:

    - a step known only by the status and rev a journal entry announced (never read by this
      view): just that pair, built on access as the state a fresh record would have with that
      status (etag None: it is stale until read);
    - a finished step without children (read, or written by this view): its status, rev,
      etag and parent in memory, and its record's JSON, compressed, in a :class:`Spill` file;
      the model is rebuilt on access (the last :attr:`UNPACKED` are kept);
    - any other step: its model.

    A worker of a large run so keeps about a hundred bytes, not a model, per finished step.
    A record replaced by a newer version leaves its old bytes in the spill file (disk, not
    memory: a run's transitions bound it)."""

    UNPACKED = 64

    def __init__(self) -> None:
        self._full: dict[str, tuple[StepState, str | None]] = {}
        self._brief: dict[str, tuple[StepStatus, int]] = {}
        #: compressed records, each a handle of ``_spill``: a worker holds ~100 bytes per
        #: finished step instead of ~500 (its record is read back when asked for)
        self._packed: dict[str, tuple[int | bytes, str | None, StepStatus, int, str | None]] = {}
        self._spill = Spill("dagcraft-records-")
        self._unpacked: OrderedDict[str, StepState] = OrderedDict()

    def __getitem__(self, sid: str) -> tuple[StepState, str | None]:
        got = self._full.get(sid)
        if got is not None:
            return got
        packed = self._packed.get(sid)
        if packed is not None:
            st = self._unpacked.get(sid)
            if st is None:
                st = self._unpacked[sid] = StepState.model_validate_json(zlib.decompress(self._spill.get(packed[0])))
                if len(self._unpacked) > self.UNPACKED:
                    self._unpacked.popitem(last=False)
            else:
                self._unpacked.move_to_end(sid)
            return st, packed[1]
        status, rev = self._brief[sid]
        return StepState(step_id=sid, status=status, rev=rev), None

    def __setitem__(self, sid: str, value: tuple[StepState, str | None]) -> None:
        self._drop(sid)
        st, etag = value
        if st.status in TERMINAL and not st.children:
            # compressed: a record's JSON is mostly repeated field names (~900 B → ~400 B)
            packed = self._spill.add(zlib.compress(st.model_dump_json().encode(), 1))
            self._packed[sid] = (packed, etag, st.status, st.rev, st.parent)
        else:
            self._full[sid] = value

    def set_brief(self, sid: str, status: StepStatus, rev: int) -> None:
        self._drop(sid)
        self._brief[sid] = (status, rev)

    def _drop(self, sid: str) -> None:
        self._full.pop(sid, None)
        self._brief.pop(sid, None)
        self._packed.pop(sid, None)
        self._unpacked.pop(sid, None)

    def __contains__(self, sid: object) -> bool:
        return sid in self._full or sid in self._packed or sid in self._brief

    def __iter__(self) -> Iterator[str]:
        yield from self._full
        yield from self._packed
        yield from self._brief

    def __len__(self) -> int:
        return len(self._full) + len(self._packed) + len(self._brief)

    def has_record(self, sid: str) -> bool:
        """Whether the full state (read, or written by this view) is held for ``sid``."""
        return sid in self._full or sid in self._packed

    def status(self, sid: str) -> StepStatus | None:
        got = self._full.get(sid)
        if got is not None:
            return got[0].status
        packed = self._packed.get(sid)
        if packed is not None:
            return packed[2]
        brief = self._brief.get(sid)
        return brief[0] if brief is not None else None

    def rev(self, sid: str) -> int | None:
        got = self._full.get(sid)
        if got is not None:
            return got[0].rev
        packed = self._packed.get(sid)
        if packed is not None:
            return packed[3]
        brief = self._brief.get(sid)
        return brief[1] if brief is not None else None

    def etag(self, sid: str) -> str | None:
        got = self._full.get(sid)
        if got is not None:
            return got[1]
        packed = self._packed.get(sid)
        return packed[1] if packed is not None else None

    def children(self, sid: str) -> list[str]:
        got = self._full.get(sid)
        return got[0].children if got is not None else []  # packed: only steps without children

    def parent(self, sid: str) -> str | None:
        got = self._full.get(sid)
        if got is not None:
            return got[0].parent
        packed = self._packed.get(sid)
        return packed[4] if packed is not None else None


def _reads_upstream(step: ConcreteStep) -> bool:
    if step.inputs or step.foreach or step.worktree is not None:
        return True
    approval = step.approval.model_dump(mode="json") if step.approval is not None else None
    text = json.dumps([step.run, step.prompt, step.env, step.workdir, step.when, step.rollback, step.check, approval])
    return "steps" in text or "artifacts" in text


class LocalView:
    """Step states and run control of one run, refreshed incrementally."""

    #: step states re-read per paced resync at most: its cost is bounded whatever the run's size
    RESYNC_BATCH = 32

    def __init__(self, store: Store, run_id: str, *, lookback_s: float = 30.0, resync_s: float = 60.0,
                 detail: bool = False, persist: Persistence | None = None,
                 resync_batch: int = RESYNC_BATCH) -> None:
        self.store = store
        self.run_id = run_id
        #: how long transitions made through this view ride out a store outage
        self.persist = persist or Persistence(limit_s=10.0)
        self.record, self.wf = load_run(store, run_id)
        #: the run's steps (shared with ``wf.steps``), built on demand: see :class:`StepTable`
        assert isinstance(self.wf.steps, StepTable)  # as load_run returns it
        self.steps: StepTable = self.wf.steps
        #: foreach children and loop body steps sort with their parent (other steps: by position)
        self._child_rank: dict[str, int] = {}
        #: the steps whose version this view knows; a step never changed since submission has
        #: no entry (it is pending), so a large run costs nothing per step until its steps move
        self.states = StepStates()
        self._defs: dict[str, dict[str, Any]] = {}
        self.open_ids: set[str] = set(self.steps)  # pending or retrying
        #: steps known only by the status their journal entry carried (details not read);
        #: ``fresh()`` reads them before anything depends on their details
        self.stale: set[str] = set()
        self.detail = detail  # read every changed record in full (progress displays, ops)
        self.active_ids: set[str] = set()  # running or compensating
        self.failed_ids: set[str] = set()
        self.waiting_ids: set[str] = set()  # approval gates waiting for a decision
        self.expanded_ids: set[str] = set()  # foreach parents waiting for their children
        #: steps whose status was (re)indexed since a consumer last drained this set (the
        #: scheduler: it re-checks only these and their dependents, never the whole DAG)
        self.touched: set[str] = set(self.steps)
        self.control: Control = Control()
        self.control_etag: str | None = None
        self.journal = JournalReader(store, run_id, lookback_s=lookback_s)
        self.resync_s = resync_s
        self.resync_batch = max(1, resync_batch)
        self._resync_cursor: tuple[int, str] | None = None  # where the paced scan of open steps is
        self._changed_at: dict[str, float] = {}  # step -> when this view last saw it change
        self._rng = random.Random()
        self._next_resync = time.monotonic() + self._resync_interval()
        self.changes = 0  # bumps on every observed change; lets callers skip needless work
        self._ctx_cache: tuple[int, dict[str, dict[str, Any]]] | None = None
        self._env: tuple[dict[bytes, bytes], dict[str, str]] | None = None  # see template_env
        self.refresh()
        if self.control_etag is None:  # no control entry in the journal: read it to be sure
            self.refresh_control()
            if self.control_etag is None:
                raise NotFound(f"run {run_id!r} not found in {store.url} (its submit did not complete)")

    # -- reading -------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Apply journal entries since the last call; every ``resync_s`` also make one paced
        resync (the safety net for a writer that died between its CAS and its journal entry)."""
        if time.monotonic() >= self._next_resync:
            try:
                self.paced_resync()
            finally:
                # paced from the end of the last one, with jitter: never back to back, and
                # many workers do not resync in step
                self._next_resync = time.monotonic() + self._resync_interval()
        changed = self.journal.poll()
        for subject, rev, status in changed:
            if subject == layout.CONTROL_MARK:
                self.refresh_control()
            elif (rev is None or status is None or self.detail or subject not in self.steps
                  or status in DETAIL_STATUSES):
                self.refresh_step(subject)
            else:
                self._note_status(subject, rev, status)
        return [c[0] for c in changed]

    def _note_status(self, step_id: str, rev: int, status: str) -> None:
        """Take a step's new status from its journal entry alone (no GET)."""
        step_id = self.steps.canonical(step_id)  # not a copy of the id per entry
        known = self.states.rev(step_id)
        if rev <= (known or 0):
            return  # we already know this version or a newer one
        if self.states.has_record(step_id):
            st = self.state(step_id).model_copy()
            st.status = StepStatus(status)
            st.rev = rev
            self.states[step_id] = (st, None)
        else:  # never read: its status and rev are all there is to keep
            self.states.set_brief(step_id, StepStatus(status), rev)
        self.stale.add(step_id)
        self._index(step_id, status)
        self.changes += 1

    def fresh(self, step_id: str) -> StepState:
        """The step's full, current-as-known state (read when only its status is known)."""
        if step_id in self.stale or self.etag(step_id) is None:
            return self.refresh_step(step_id)
        return self.state(step_id)

    def ensure_fresh(self, step_ids: Any) -> None:
        for sid in list(step_ids):
            if sid in self.stale:
                self.refresh_step(sid)

    def exact_states(self) -> Iterator[StepState]:
        """Every existing step record as committed, in step-id order: those this view wrote or
        read in full as held, those known only by status read now (64 at a time, in parallel)
        and yielded without being kept — the seal covers a 10,000-step run without holding
        10,000 records."""
        ids = sorted(self.states)
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dagcraft-seal") as pool:
            for i in range(0, len(ids), 64):
                batch = ids[i:i + 64]
                stale = [sid for sid in batch if not self.states.has_record(sid) or sid in self.stale
                         or self.states.etag(sid) is None]
                got = dict(zip(stale, pool.map(self.store.get, [layout.step_state(self.run_id, sid) for sid in stale]),
                               strict=True))
                for sid in batch:
                    if sid not in got:
                        yield self.states[sid][0]
                    elif (rec := got[sid]) is not None:
                        yield load_state(rec[0], layout.step_state(self.run_id, sid), self.store.url)

    def _resync_interval(self) -> float:
        return self.resync_s * self._rng.uniform(0.75, 1.25)

    def resync_picks(self) -> list[str]:
        """The steps the next paced resync re-reads, at most ``resync_batch``: first those held
        as running, compensating, waiting for approval or expanded that have not changed for
        ``resync_s`` (a change to one of those that no journal entry announced would stall the
        run; a step that changed recently is not suspect yet), then ``resync_batch // 8`` open
        steps, round robin from where the last resync stopped. Terminal steps are never
        re-read: what reopens them (resume, retry) writes control, which every resync re-reads.
        An open step changed without notice also heals on its own: whoever tries to claim or
        skip it loses the CAS and reads the record."""
        now = time.monotonic()
        quiet = [sid for sid in self.ids(self.active_ids | self.waiting_ids | self.expanded_ids)
                 if now - self._changed_at.get(sid, 0.0) >= self.resync_s]
        picks = quiet[:self.resync_batch]
        room = min(self.resync_batch - len(picks), max(1, self.resync_batch // 8))
        if room <= 0 or not self.open_ids:
            return picks
        ranked = sorted((self.rank(s), s) for s in self.open_ids)
        start = 0 if self._resync_cursor is None else bisect.bisect_right(ranked, self._resync_cursor)
        chosen = (ranked[start:] + ranked[:start])[:room]
        self._resync_cursor = chosen[-1]
        return picks + [sid for _, sid in chosen]

    def paced_resync(self) -> list[str]:
        """Re-read control and the :meth:`resync_picks` (one GET each, in parallel): at most
        ``resync_batch + 1`` GETs per ``resync_s`` (``resync_batch // 8 + 1`` while no running
        step is a minute old), whatever the run's size or length.
        Returns the steps re-read."""
        self.refresh_control()
        picks = self.resync_picks()
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dagcraft-resync") as pool:
            got = list(pool.map(self.store.get, [layout.step_state(self.run_id, sid) for sid in picks]))
        for sid, rec in zip(picks, got, strict=True):
            self.apply_record(sid, rec)
        return picks

    def full_resync(self) -> None:
        """Re-read control and every step state (reads in parallel: over S3 a large run would
        otherwise take one round trip per step, back to back)."""
        self.refresh_control()
        keys = [k for k in self.store.list(layout.steps_prefix(self.run_id)) if k.endswith("/state.json")]
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="dagcraft-resync") as pool:
            got = list(pool.map(self.store.get, keys))
        for key, rec in zip(keys, got, strict=True):
            self.apply_record(key.split("/")[-2], rec)

    def refresh_control(self) -> None:
        key = layout.control(self.run_id)
        got = self.store.get(key)
        if got is not None:
            self.control, self.control_etag = load_control(got[0], key, self.store.url), got[1]
            self.changes += 1

    def refresh_step(self, step_id: str) -> StepState:
        state = self.apply_record(step_id, self.store.get(layout.step_state(self.run_id, step_id)))
        assert state is not None
        return state

    def apply_record(self, step_id: str, got: tuple[bytes, str] | None) -> StepState | None:
        """Take a step's record as just read (None: never written, i.e. pending)."""
        if got is None:
            state, etag = StepState(step_id=step_id), None
        else:
            state, etag = load_state(got[0], layout.step_state(self.run_id, step_id), self.store.url), got[1]
        self.apply(state, etag)
        return state

    def apply(self, state: StepState, etag: str | None) -> None:
        sid = self.steps.canonical(state.step_id)  # keys share the table's id strings
        old_rev = self.states.rev(sid)
        if old_rev is not None and old_rev > state.rev and etag is not None and sid not in self.stale:
            return  # never go back to an older version than one we already saw
        self.states[sid] = (state, etag)
        self._index(sid, state.status)
        if etag is not None:
            self.stale.discard(state.step_id)
        if state.definition is not None and self._defs.get(state.step_id) != state.definition:
            # a foreach child: new, or revived by a re-expansion with a different item
            try:
                self.steps.add_data(state.definition)
            except ValidationError:
                raise CorruptRecord(layout.step_state(self.run_id, state.step_id),
                                    "its step definition is not valid", self.store.url) from None
            self._defs[state.step_id] = state.definition
            parent = state.parent or ""
            self._child_rank[sid] = self.rank(parent) if parent in self.steps else len(self.steps)
        for child in state.children:
            if child not in self.states:
                self.refresh_step(child)
        self.changes += 1

    def state(self, step_id: str) -> StepState:
        got = self.states.get(step_id)
        if got is None:
            if step_id in self.steps:
                # never changed since submission: pending (indexed so from the start), etag
                # unknown until read; built for the caller, not kept
                return StepState(step_id=step_id)
            got = self.states[step_id] = (StepState(step_id=step_id), None)
            self._index(step_id, "pending")
        return got[0]

    def etag(self, step_id: str) -> str | None:
        return self.states.etag(step_id)

    def status(self, step_id: str) -> str:
        got = self.states.status(step_id)
        if got is not None:
            return got
        return StepStatus.PENDING if step_id in self.steps else self.state(step_id).status

    def children(self, step_id: str) -> list[str]:
        """The step's foreach children or loop body steps as known (none for a step never read)."""
        return self.states.children(step_id)

    def parent(self, step_id: str) -> str | None:
        return self.states.parent(step_id)

    # -- derived -------------------------------------------------------------------------
    def needs(self, step_id: str) -> list[str]:
        return list(self.steps.needs_of(step_id)) if step_id in self.steps else list(self.steps[step_id].needs)

    def all_ids(self) -> list[str]:
        return sorted(self.steps, key=lambda s: (self.rank(s), s))

    def rank(self, step_id: str) -> int:
        """Where the step sorts in scheduling order (its submission position; a foreach child
        or loop body step, its parent's)."""
        got = self._child_rank.get(step_id)
        return got if got is not None else self.steps.position(step_id)

    def _index(self, step_id: str, status: str) -> None:
        if status in ACTIVE or status in (StepStatus.WAITING_APPROVAL, StepStatus.EXPANDED):
            self._changed_at[step_id] = time.monotonic()  # only these are judged by it
        else:
            self._changed_at.pop(step_id, None)
        # the scheduler and supervisor scan only these sets, not the whole DAG, every cycle
        self.touched.add(step_id)
        for members, wanted in ((self.open_ids, status in OPEN), (self.active_ids, status in ACTIVE),
                                (self.failed_ids, status == StepStatus.FAILED),
                                (self.expanded_ids, status == StepStatus.EXPANDED),
                                (self.waiting_ids, status == StepStatus.WAITING_APPROVAL)):
            if wanted:
                members.add(step_id)
            else:
                members.discard(step_id)

    def ids(self, members: set[str]) -> list[str]:
        """``members`` in scheduling order."""
        return sorted(members, key=lambda s: (self.rank(s), s))

    def is_terminal(self, step_id: str) -> bool:
        return self.status(step_id) in TERMINAL

    def needs_done(self, step_id: str) -> bool:
        return all(self.is_terminal(n) for n in self.needs(step_id))

    def needs_status(self, step_id: str) -> dict[str, str]:
        out = {}
        for n in self.needs(step_id):
            st = self.status(n)
            out[n] = "succeeded" if st in DONE_OK else st
        return out

    def failing(self) -> bool:
        return bool(self.failed_ids)

    def finished(self) -> bool:
        if self.open_ids or self.active_ids:
            return False  # the common case, answered without scanning the DAG
        return all(self.is_terminal(s) for s in self.steps)

    def blocked_on_approval(self) -> bool:
        """Nothing can happen without a person: no attempt runs, and every unfinished step is
        an approval gate without a timeout, or waits (transitively) for one. A run in this
        state may be left by its workers; ``resume`` after a decision continues it."""
        if not self.waiting_ids or self.active_ids:
            return False
        waiting = set(self.waiting_ids)
        for sid in self.waiting_ids:
            a = self.state(sid).approval
            if a is None or a.deadline is not None:
                return False  # its timeout will decide it: keep serving
        for sid in self.all_ids():
            if self.is_terminal(sid) or sid in waiting:
                continue
            if self.status(sid) not in OPEN or not (self.ancestors(sid) & waiting):
                return False
        return True

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for sid in self.steps:
            st = self.status(sid)
            out[st] = out.get(st, 0) + 1
        return out

    def pending_compensations(self) -> list[str]:
        """Steps whose compensation a rollback still has to run (or is running): succeeded,
        or compensating, with a ``rollback`` command. Finally steps are not among them: they
        run after the rollback."""
        return [sid for sid in self.all_ids()
                if self.status(sid) in (StepStatus.SUCCEEDED, StepStatus.ROLLING_BACK)
                and self.steps.attr(sid, "compensates") and not self.steps.attr(sid, "is_finally")]

    def rollback_due(self) -> bool:
        """A step failed for good under ``on_failure: rollback`` and compensations remain:
        finally steps wait for them (they report the rolled-back statuses)."""
        return self.wf.on_failure == "rollback" and self.failing() and bool(self.pending_compensations())

    def dependents(self) -> dict[str, set[str]]:
        deps: dict[str, set[str]] = {s: set() for s in self.steps}
        for sid in self.steps:
            for n in self.steps.needs_of(sid):
                deps.setdefault(n, set()).add(sid)
        # a foreach child precedes whatever follows its parent
        for sid in self.steps:
            parent = self.parent(sid)
            if parent:
                deps.setdefault(sid, set()).update(deps.get(parent, set()))
        return deps

    def descendants(self, step_id: str, deps: dict[str, set[str]] | None = None) -> set[str]:
        deps = deps if deps is not None else self.dependents()
        seen: set[str] = set()
        stack = list(deps.get(step_id, ()))
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            stack.extend(deps.get(cur, ()))
        return seen

    # -- template context ----------------------------------------------------------------
    def ancestors(self, step_id: str) -> set[str]:
        """Every step upstream of ``step_id`` (templates may reference only these)."""
        seen: set[str] = set()
        stack = list(self.needs(step_id))
        while stack:
            cur = stack.pop()
            if cur in seen or cur not in self.steps:
                continue
            seen.add(cur)
            stack.extend(self.steps.needs_of(cur))
        return seen

    def reads_upstream(self, step_id: str) -> bool:
        """Whether step ``step_id`` may read an upstream step's results (outputs, artifacts,
        fan-out instances): it declares inputs or a foreach, or its templates mention
        ``steps`` or ``artifacts``. A textual check of the raw templates, erring towards yes;
        made once per step shape (see :meth:`StepTable.of_shape`)."""
        if step_id in self.steps:
            return bool(self.steps.of_shape(step_id, _reads_upstream))
        return _reads_upstream(self.steps[step_id])

    def template_env(self) -> dict[str, str]:
        """``env`` of a template context: this process's environment less the secrets (see
        :func:`without_secret_env`), decoded again only when the environment changed."""
        raw = getattr(os.environ, "_data", None)  # CPython's undecoded copy: cheap to compare
        if not isinstance(raw, dict):
            return without_secret_env(os.environ)
        if self._env is None or self._env[0] != raw:
            self._env = (dict(raw), without_secret_env(os.environ))
        return dict(self._env[1])

    def context_ids(self, step_id: str) -> set[str]:
        """Ancestors plus their foreach children — read in full when the step may read their
        results (:meth:`reads_upstream`): what a template may see."""
        ids = self.ancestors(step_id)
        if not self.reads_upstream(step_id):
            # its statuses (all it can see) came with the journal entries: nothing to read,
            # so a pool of workers does not read every finished step once per worker
            for sid in list(ids):
                ids.update(self.children(sid))
            return ids
        for sid in list(ids):
            ids.update(self.children(sid))
        self.ensure_fresh(ids)
        # a parent read just now may list children we had not seen
        for sid in list(ids):
            ids.update(self.children(sid))
        self.ensure_fresh(ids)
        return ids

    def steps_context(self, artifact_paths: dict[str, dict[str, str]] | None = None,
                      only: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """``steps.<template_id>`` for templates: outputs/artifacts/status. A fan-out template
        (matrix instances, foreach children) gives every instance, in instance order: lists
        ``outputs`` and ``artifacts`` (one entry each), ``instances`` (see :func:`fan_in`) and
        ``by_key``; its ``status`` is the aggregate. ``only`` restricts it to those step ids (a
        step's ancestors: cost follows them)."""
        cacheable = artifact_paths is None and only is None
        if cacheable and self._ctx_cache is not None and self._ctx_cache[0] == self.changes:
            return self._ctx_cache[1]
        artifact_paths = artifact_paths or {}
        groups: dict[str, list[str]] = {}
        latest: dict[str, str] = {}  # loop body id -> its instance of the latest iteration asked for
        # read through the table's accessors: an ancestor's model is never built for this
        attr, template_id = self.steps.attr, self.steps.template_id_of
        for sid in (self.ids(only) if only is not None else self.all_ids()):  # instance order
            tid = template_id(sid)
            if self.parent(sid):
                iteration = attr(sid, "iteration")
                if iteration is not None:
                    prev = latest.get(tid)
                    if prev is None or (attr(prev, "iteration") or 0) < iteration:
                        latest[tid] = sid
                continue  # children are reported through their parent
            groups.setdefault(tid, []).append(sid)
        out: dict[str, dict[str, Any]] = {}
        for tid, sid in latest.items():
            st = self.state(sid)
            out[tid] = {"outputs": st.outputs, "artifacts": self._artifact_view(sid, artifact_paths),
                        "status": st.status, "iteration": attr(sid, "iteration")}
        for tid, ids in groups.items():
            if len(ids) == 1 and not attr(ids[0], "matrix") and not attr(ids[0], "foreach"):
                st = self.state(ids[0])
                out[tid] = {"outputs": st.outputs, "artifacts": self._artifact_view(ids[0], artifact_paths),
                            "status": st.status}
                continue
            members: list[str] = []
            for sid in ids:
                # a foreach parent stands for its children (none when skipped or given no items)
                members.extend(self.children(sid) if attr(sid, "foreach") else [sid])
            entries = [self._instance(tid, sid, artifact_paths) for sid in members]
            statuses = [e["status"] for e in entries] or [self.status(ids[0])]
            agg = "succeeded" if all(s in DONE_OK or s == "skipped" for s in statuses) else (
                "failed" if any(s == "failed" for s in statuses) else statuses[0])
            out[tid] = fan_in(entries, agg)
        if cacheable:
            self._ctx_cache = (self.changes, out)
        return out

    def _instance(self, tid: str, sid: str, artifact_paths: dict[str, dict[str, str]]) -> dict[str, Any]:
        st = self.state(sid)
        known = sid in self.steps
        return {"id": sid, "key": instance_key(sid, tid),
                "matrix": dict(self.steps.attr(sid, "matrix")) if known else {},
                "item": self.steps.attr(sid, "item") if known else None, "outputs": st.outputs,
                "artifacts": self._artifact_view(sid, artifact_paths), "status": st.status}

    def _artifact_view(self, step_id: str, artifact_paths: dict[str, dict[str, str]]) -> dict[str, str]:
        st = self.state(step_id)
        local = artifact_paths.get(step_id, {})
        return {name: local.get(name, ptr.get("digest", "")) for name, ptr in st.artifacts.items()}
