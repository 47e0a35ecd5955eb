"""Records that cross process boundaries: the submitted run, run control, step state.

Each is JSON in the store. ``RunRecord`` is written once (If-None-Match) and never changed;
``Control`` and ``StepState`` change only by compare-and-swap on their etag, so two workers can
never both move the same record from the same version.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

StepStatus = Literal[
    "pending",  # waiting for its needs, or ready
    "retrying",  # a failed attempt; eligible again once the store clock passes not_before
    "running",  # claimed: attempt n, worker, lease
    "expanded",  # a foreach parent whose children run in its place
    "succeeded",
    "failed",  # failed for good
    "skipped",
    "cancelled",
    "rolling_back",  # compensation claimed
    "rolled_back",
]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "skipped", "cancelled", "rolled_back"})
#: a journal entry announcing one of these makes readers fetch the whole state: its details
#: (children, retry time, a reset's cleared fields) drive scheduling decisions
DETAIL_STATUSES: frozenset[str] = frozenset({"pending", "retrying", "expanded"})
#: a step in one of these states counts as done for its dependents
DONE_OK: frozenset[str] = frozenset({"succeeded", "rolled_back", "rolling_back"})

RunStatus = Literal["running", "cancelling", "rolling_back", "succeeded", "failed", "cancelled", "rolled_back"]
RUN_FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "rolled_back"})


class RunRecord(BaseModel):
    """The immutable submitted run: compiled spec snapshot (secret params redacted)."""

    run_id: str
    name: str
    spec_hash: str
    workflow: dict[str, Any]
    #: step ids in the compiled (topological) order; JSON objects do not keep order
    order: list[str] = Field(default_factory=list)
    params: dict[str, Any]
    secret_params: list[str] = Field(default_factory=list)
    spec_dir: str | None = None
    submitted_by: str
    submitted_at: float


class Control(BaseModel):
    """Run-level status. ``generation`` bumps whenever the run is reopened (resume/retry)."""

    status: RunStatus = "running"
    reason: str | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    generation: int = 0


class AttemptInfo(BaseModel):
    attempt: int
    status: str  # running | succeeded | failed | cancelled | lost | fenced | interrupted | cached
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    kind: Literal["run", "rollback"] = "run"


class RollbackInfo(BaseModel):
    status: Literal["running", "done", "failed"]
    attempt: int = 1
    worker: str | None = None
    lease_expires_at: float | None = None
    exit_code: int | None = None


class StepState(BaseModel):
    step_id: str
    status: StepStatus = "pending"
    attempt: int = 0
    failures: int = 0  # failed attempts, counted against the retry limit
    lost_attempts: int = 0  # attempts whose worker vanished
    worker: str | None = None
    lease_expires_at: float | None = None
    not_before: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cached_from: str | None = None
    #: foreach children, in item order (set when a foreach parent expands)
    children: list[str] = Field(default_factory=list)
    #: a dynamically created step (foreach child) carries its own definition
    definition: dict[str, Any] | None = None
    parent: str | None = None
    rollback: RollbackInfo | None = None
    history: list[AttemptInfo] = Field(default_factory=list)
    #: bumps on every write so that two writes never produce the same bytes
    rev: int = 0

    def dump(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()


def load_state(data: bytes) -> StepState:
    return StepState.model_validate_json(data)


def load_control(data: bytes) -> Control:
    return Control.model_validate_json(data)


def dump(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True).encode()
