"""Where run state lives in the store. Every key is built here, from validated segments only.

```
runs-index/<ulid>~<run_id>                        one entry per submitted run (never rewritten)
runs-wake                                         rewritten after every runs-index entry (journal.py)
runs/<run>/run.json                               immutable submitted run (RunRecord)
runs/<run>/control.json                           run-level status, changed only by CAS (Control)
runs/<run>/status.json                            a sealed run's status summary (statusrows.StatusSummary)
runs/<run>/journal/<ulid>~<step|@control>         append-only change notifications
runs/<run>/steps/<step>/state.json                step state, changed only by CAS (StepState)
runs/<run>/steps/<step>/attempts/<n>/trace.jsonl  per-attempt trace (+ stdout.log, stderr.log)
runs/<run>/steps/<step>/artifacts/<name>          artifact pointers (blobs in blobs/sha256/)
runs/<run>/spend/<step>/<n>                       an attempt's spend (budget.Spend), written by its worker only
runs/<run>/supervisor                             supervisor lease
runs/<run>/semaphores/parallel/<i>                max_parallel slots
shared/semaphores/agent-<name>/<i>                per-agent concurrency caps, across runs and hosts
cache/<sha256>                                    step cache entries
corrupt/<run>                                     a worker found a record of the run unreadable
workers/<worker id>~<ulid>                        a running worker's registration (registry.py)
```
"""

from __future__ import annotations

from dagcraft.primitives.keys import validate_run_id, validate_segment

CONTROL_MARK = "@control"


def run_prefix(run_id: str) -> str:
    return f"runs/{validate_run_id(run_id)}"


def run_record(run_id: str) -> str:
    return f"{run_prefix(run_id)}/run.json"


def control(run_id: str) -> str:
    return f"{run_prefix(run_id)}/control.json"


def journal_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/journal/"


def journal_entry(run_id: str, ulid: str, subject: str, rev: int | None = None, status: str | None = None) -> str:
    """``<ulid>~@control``, or ``<ulid>~<rev>~<status>~<step>``: the key alone tells a reader
    which version of a step changed to what status, so most changes cost it no GET."""
    if subject == CONTROL_MARK or rev is None or status is None:
        if subject != CONTROL_MARK:
            validate_segment(subject, "step id")
        return f"{journal_prefix(run_id)}{ulid}~{subject}"
    validate_segment(subject, "step id")
    return f"{journal_prefix(run_id)}{ulid}~{int(rev)}~{validate_segment(status, 'status')}~{subject}"


def parse_journal_key(key: str) -> tuple[str, str, int | None, str | None]:
    """(ulid, subject, rev, status) of a journal key; rev and status are None for control
    entries and for entries that carry no status."""
    name = key.rsplit("/", 1)[-1]
    parts = name.split("~", 3)
    if len(parts) == 4 and parts[1].isdigit():
        return parts[0], parts[3], int(parts[1]), parts[2]
    ulid, _, subject = name.partition("~")
    return ulid, subject, None, None


def step_prefix(run_id: str, step_id: str) -> str:
    return f"{run_prefix(run_id)}/steps/{validate_segment(step_id, 'step id')}"


def step_state(run_id: str, step_id: str) -> str:
    return f"{step_prefix(run_id, step_id)}/state.json"


def steps_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/steps/"


def attempt_prefix(run_id: str, step_id: str, attempt: int | str) -> str:
    return f"{step_prefix(run_id, step_id)}/attempts/{validate_segment(str(attempt), 'attempt')}"


def step_scope(run_id: str, step_id: str) -> str:
    """Artifact scope of a step: pointers live at ``<scope>/artifacts/<name>``."""
    return step_prefix(run_id, step_id)


def spend_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/spend/"


def spend_entry(run_id: str, step_id: str, attempt: int) -> str:
    """One run attempt's spend: one key per attempt, so it is counted once whoever reads it."""
    return f"{spend_prefix(run_id)}{validate_segment(step_id, 'step id')}/{int(attempt)}"


def supervisor(run_id: str) -> str:
    return f"{run_prefix(run_id)}/supervisor"


def parallel_semaphore(run_id: str) -> str:
    return f"{run_prefix(run_id)}/semaphores/parallel"


def agent_semaphore(agent: str) -> str:
    return f"shared/semaphores/agent-{validate_segment(agent, 'agent name')}"


RUNS_INDEX = "runs-index/"


def runs_index_entry(ulid: str, run_id: str) -> str:
    return f"{RUNS_INDEX}{ulid}~{validate_run_id(run_id)}"


#: a tiny key rewritten after every runs-index entry: idle workers GET it instead of listing
RUNS_WAKE = "runs-wake"


def parse_runs_index_key(key: str) -> str:
    """The run id of a ``runs-index/`` entry (everything after the ULID and its ``~``)."""
    return key.rsplit("/", 1)[-1].partition("~")[2]


CORRUPT_PREFIX = "corrupt/"


def corrupt_note(run_id: str) -> str:
    """Marker of a run a worker found a corrupt record in (see ``model.CorruptNote``)."""
    return f"{CORRUPT_PREFIX}{validate_run_id(run_id)}"


def cache_entry(digest: str) -> str:
    return f"cache/{validate_segment(digest, 'cache key')}"


def report(run_id: str) -> str:
    return f"{run_prefix(run_id)}/report.html"


def status_summary(run_id: str) -> str:
    """What ``status`` shows of the sealed run (``orchestrator.statusrows``), written by the
    transition that sealed it; rewritten each time the run is sealed again."""
    return f"{run_prefix(run_id)}/status.json"


WORKERS_PREFIX = "workers/"


def worker_record(worker_id: str, instance: str) -> str:
    """A worker process's registration (``registry.WorkerRecord``), rewritten by its own beats
    only. ``instance`` (a ULID per process start) keeps two processes that share an id apart."""
    return f"{WORKERS_PREFIX}{validate_segment(worker_id + '~' + instance, 'worker id')}"
