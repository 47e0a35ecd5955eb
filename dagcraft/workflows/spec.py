"""Pydantic models: the spec as written (``Spec``) and the compiled workflow (``CompiledWorkflow``).

The spec models mirror the YAML one to one (``extra="forbid"`` everywhere, so a misspelt field
is an error, never ignored). The compiled models are what the run engine executes; they carry
no positions and no unexpanded matrix, and serialise to canonical JSON for the spec hash.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import networkx as nx

ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|h|m|s))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

PARAM_TYPES = ("string", "int", "float", "bool", "list", "object")
ADAPTERS = ("claude", "codex", "generic")


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid id (``^[A-Za-z_][A-Za-z0-9_-]*$``), else raise ValueError."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '_' and '-', starting with a letter or '_'")
    return value


def parse_duration(value: Any) -> float:
    """Seconds from ``2s``, ``15m``, ``1h``, ``1h30m``, ``500ms`` or a non-negative number."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    if isinstance(value, str):
        s = value.strip()
        try:
            return parse_duration(float(s))
        except ValueError:
            pass
        if _DURATION_RE.match(s):
            return sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(s))
    raise ValueError(f"invalid duration {value!r}: use e.g. 30s, 15m, 1h30m or a number of seconds")


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|h|m|s))+$|^\d+(\.\d+)?$"},
    ],
    "description": "seconds, or e.g. 30s, 15m, 1h30m, 500ms",
}
_COMMAND_SCHEMA = {
    "anyOf": [
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "argv, no shell"},
        {"type": "string", "description": "shell script, run by bash -c (template values are passed as env vars)"},
        {"type": "null"},
    ]
}
_MATRIX_ENTRIES_SCHEMA = {
    "anyOf": [{"type": "array", "items": {"type": "object", "minProperties": 1}},
              {"type": "string", "description": "a '${{ }}' expression giving such a list"}],
}
_MATRIX_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "minProperties": 1,
            "properties": {
                "include": {**_MATRIX_ENTRIES_SCHEMA, "description": "combinations to add, or to extend "
                            "the combinations whose axis values they match (as in GitHub Actions)"},
                "exclude": {**_MATRIX_ENTRIES_SCHEMA, "description": "remove the combinations matching "
                            "all the given keys"},
            },
            "additionalProperties": {
                "anyOf": [{"type": "array", "minItems": 1}, {"type": "string"}],
                "description": "an axis: its values, or a '${{ }}' expression giving them",
            },
        },
        {"type": "null"},
    ]
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Command = Annotated[Any, WithJsonSchema(_COMMAND_SCHEMA)]


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _str_map(value: Any) -> Any:
    # YAML turns `PORT: 8080` into an int; env values are strings, so scalars are accepted and stringified.
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not ENV_NAME_RE.match(k):
                raise ValueError(f"invalid environment variable name {k!r}: use letters, digits and '_', "
                                 "not starting with a digit")
            if k.startswith("DAGCRAFT_"):
                raise ValueError(f"environment variable name {k!r}: the DAGCRAFT_ prefix is reserved")
            if isinstance(v, str) and "\x00" in v:
                raise ValueError(f"env.{k}: NUL bytes cannot be passed to a command")
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, (int, float)):
                v = str(v)
            out[k] = v
        return out
    return value


EnvMap = Annotated[dict[str, str], BeforeValidator(_str_map)]


def _command(value: Any, what: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{what} must not be empty")
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{what} must not be an empty list")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ValueError(f"{what}[{i}] must be a string, got {type(item).__name__}")
            out.append(item if isinstance(item, str) else str(item))
        return out
    raise ValueError(f"{what} must be a list of strings (argv, no shell) or a string (run by bash -c)")


#: matrix keys that are not axes: they remove (``exclude``) or add/extend (``include``) combinations
MATRIX_MODIFIERS = ("include", "exclude")


def check_matrix_entries(value: Any, what: str) -> Any:
    """A matrix ``include``/``exclude``: a list of non-empty mappings of ids to values, or a
    ``${{ }}`` expression (checked once evaluated). ValueError naming the entry otherwise."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"matrix.{what} must be a list of mappings (matrix key: value)")
    for j, entry in enumerate(value):
        if not isinstance(entry, dict) or not entry:
            raise ValueError(f"matrix.{what}[{j}] must be a non-empty mapping of matrix keys to values")
        for key in entry:
            if key in MATRIX_MODIFIERS:
                raise ValueError(f"matrix.{what}[{j}]: {key!r} cannot be a matrix key")
            check_id(key, "matrix key")
    return value


class _Model(BaseModel):
    # built on first use: a worker validates only the compiled models, never a YAML spec
    model_config = ConfigDict(extra="forbid", populate_by_name=True, defer_build=True)

    @classmethod
    def construct_trusted(cls: type[_M], **values: Any) -> _M:
        """What ``model_construct(**values)`` gives (fields set, defaults for the rest, no
        validation), for values keyed by field name: the compiler builds two models per step
        and ``model_construct``'s per-field alias lookups were most of a 10,000-step
        compile's model building. The values must be valid already."""
        plan = _CONSTRUCT_PLANS.get(cls)
        if plan is None:
            assert not cls.__private_attributes__ and not cls.__pydantic_post_init__  # what this skips
            template: dict[str, Any] = {}  # every field, in order: its default when it needs no copy
            fill = []  # the others: a factory, a default that is copied, or required
            for name, field in cls.__pydantic_fields__.items():
                d = field.default
                immutable = d is None or type(d) in (bool, int, float, str)
                template[name] = d if field.default_factory is None and immutable else _UNSET
                if template[name] is _UNSET:
                    fill.append((name, field))
            plan = _CONSTRUCT_PLANS[cls] = (template, tuple(fill))
        template, fill = plan
        if not values.keys() <= template.keys():
            raise TypeError(f"{cls.__name__}: no field(s) {sorted(set(values) - set(template))}")
        fields = dict(template)  # the fields' order (the serialised order) whatever the values' order
        fields.update(values)
        for name, field in fill:
            if name not in values:
                fields[name] = field.get_default(call_default_factory=True, validated_data=fields)
        m = cls.__new__(cls)
        object.__setattr__(m, "__dict__", fields)
        object.__setattr__(m, "__pydantic_fields_set__", set(values))
        object.__setattr__(m, "__pydantic_extra__", None)  # extra="forbid"
        object.__setattr__(m, "__pydantic_private__", None)
        return m


_M = TypeVar("_M", bound=_Model)
_UNSET = object()
_CONSTRUCT_PLANS: dict[type[BaseModel], tuple[dict[str, Any], tuple[tuple[str, Any], ...]]] = {}


# ----------------------------------------------------------------------------- spec as written


class ParamSpec(_Model):
    """A typed workflow parameter. Required when it has no default (unless ``required: false``)."""

    type: Literal["string", "int", "float", "bool", "list", "object"] = "string"
    default: Any = None
    required: bool | None = None
    choices: list[Any] | None = None
    description: str | None = None
    secret: bool = False

    @field_validator("default")
    @classmethod
    def _check_default(cls, v: Any, info: Any) -> Any:
        from dagcraft.workflows.params import check_type  # local: params imports this module

        typ = info.data.get("type")
        if v is not None and typ is not None:
            v = check_type(v, typ, "default")
        return v

    @field_validator("choices")
    @classmethod
    def _check_choices(cls, v: list[Any] | None, info: Any) -> list[Any] | None:
        from dagcraft.workflows.params import check_type

        typ = info.data.get("type")
        if v is None or typ is None:
            return v
        if not v:
            raise ValueError("choices must not be empty")
        return [check_type(c, typ, "choice") for c in v]

    @model_validator(mode="after")
    def _default_in_choices(self) -> ParamSpec:
        if self.has_default and self.choices is not None and self.default not in self.choices:
            raise ValueError(f"default {self.default!r} is not one of the choices {self.choices!r}")
        return self

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set and self.default is not None


def _regex(p: str) -> str:
    try:
        re.compile(p)
    except re.error as exc:
        raise ValueError(f"invalid pattern {p!r}: {exc}") from None
    return p


class RetryOnSpec(_Model):
    exit_codes: list[int] = []
    patterns: list[Annotated[str, AfterValidator(_regex)]] = []


class RetrySpec(_Model):
    """``retries: 2`` is shorthand for ``{limit: 2}``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=lambda schema: schema.update(
            {"description": "retries: N is shorthand for {limit: N}"}
        ),
    )

    limit: int = Field(default=0, ge=0, le=100)
    backoff: Duration = 1.0
    max_backoff: Duration = 60.0
    retry_on: RetryOnSpec = RetryOnSpec()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return {"limit": v}
        return v


class BudgetSpec(_Model):
    """``budget:`` limits (run, agent or step); every field optional. ``tokens`` counts
    tokens_in + tokens_out. Enforced by ``orchestrator.budget`` (docs/spec.md "Budgets")."""

    usd: float | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)


class PricesSpec(_Model):
    """An agent's ``prices:`` in USD per million tokens: its cost when its CLI reports tokens
    but no cost (and its running cost until the CLI reports one)."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)


class AgentDef(_Model):
    """A named agent CLI. ``command`` items are templates; ``${{ prompt }}`` is the step's prompt."""

    command: list[str] = Field(min_length=1)
    adapter: Literal["claude", "codex", "generic"] = "generic"
    env: EnvMap = {}
    max_concurrent: int | None = Field(None, ge=1)
    #: limits summed over every attempt of every step using this agent in the run
    budget: BudgetSpec | None = None
    prices: PricesSpec | None = None


def _empty(kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """An empty list/dict default that validation makes with a factory call: pydantic
    deep-copies an unhashable default value each time it applies it (5 deep copies per
    step of a 10,000-step spec). The schema still shows the default."""
    return Field(default_factory=kind, json_schema_extra={"default": kind()})


class OutputsSpec(_Model):
    values: list[Annotated[str, AfterValidator(lambda x: check_id(x, "output name"))]] = _empty(list)
    artifacts: list[Annotated[str, AfterValidator(lambda x: check_artifact_path(x, "artifact glob"))]] = _empty(list)


def check_relpath(value: str, what: str) -> str:
    """A relative path that stays inside its directory: not absolute, no ``..``, no NUL/``\\``."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\x00" in value or "\\" in value:
        raise ValueError(f"invalid {what} {value!r}: must be a relative path")
    parts = value.split("/")
    if any(p in ("..",) for p in parts) or any(p == "" for p in parts[:-1]):
        raise ValueError(f"invalid {what} {value!r}: must be a relative path without '..'")
    return value


def check_artifact_path(value: str, what: str) -> str:
    """:func:`check_relpath`, and every segment one valid store key segment (the rule of
    ``primitives.keys.validate_segment``, which the worker applies at run time): not empty,
    not ``.``, no control characters, at most 200 characters."""
    check_relpath(value, what)
    for part in value.split("/"):
        if part in ("", ".") or len(part) > 200 or any(unicodedata.category(c) == "Cc" for c in part):
            raise ValueError(f"invalid {what} {value!r}: each '/'-separated part must be 1-200 characters, "
                             "not '.', without control characters")
    return value


class InputSpec(_Model):
    from_: str = Field(alias="from")
    artifact: str
    as_: str | None = Field(None, alias="as")

    @field_validator("artifact")
    @classmethod
    def _artifact(cls, v: str) -> str:
        return check_artifact_path(v, "artifact name")

    @field_validator("as_")
    @classmethod
    def _dest(cls, v: str | None) -> str | None:
        return None if v is None else check_artifact_path(v, "input destination ('as')")


class ApprovalSpec(_Model):
    """``approval:``: the step waits for a human decision (``dagcraft approve|reject``) before
    it runs; a step with only ``approval:`` (no run/agent) is a pure gate."""

    prompt: str = ""
    #: after this long waiting, ``on_timeout`` decides (None: wait forever)
    timeout: Duration | None = None
    on_timeout: Literal["reject", "approve"] = "reject"

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("approval timeout must be positive")
        return v


#: the branch a worktree step gets when its spec names none: one per run, step and attempt
DEFAULT_WORKTREE_BRANCH = "dagcraft/${{ run.id }}/${{ step.id }}/${{ attempt }}"


class WorktreeSpec(_Model):
    """``worktree:`` — the step runs in its own git worktree on a fresh branch cut from
    ``base`` in ``repo`` (relative to the spec's directory). ``repo``, ``base`` and ``branch``
    may be templates (``step.id`` and ``attempt`` are available besides the step's context);
    the rendered branch must be a valid git branch name, checked before git sees it."""

    repo: str
    base: str = "HEAD"
    branch: str = DEFAULT_WORKTREE_BRANCH
    push: str | None = None
    delete_on_rollback: bool = False

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str) -> str:
        if "${{" in v or v.startswith("/"):
            return v
        return check_relpath(v.rstrip("/") or ".", "worktree repo")


class DefaultsSpec(_Model):
    retries: RetrySpec | None = None
    timeout: Duration | None = None
    env: EnvMap = {}
    workdir: str | None = None


class StepSpec(_Model):
    """One step as written. Exactly one of ``run`` or ``agent`` (+ ``prompt``)."""

    id: str
    needs: Annotated[list[str], WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]})] = _empty(list)
    run: Command = None
    agent: str | None = None
    prompt: str | None = None
    env: EnvMap = _empty(dict)
    workdir: str | None = None
    timeout: Duration | None = None
    retries: RetrySpec | None = None
    when: str | None = None
    matrix: Annotated[dict[str, Any] | None, WithJsonSchema(_MATRIX_SCHEMA)] = None
    foreach: str | None = None
    # a factory, not a default instance: pydantic deep-copies an unhashable default per step
    outputs: OutputsSpec = Field(default_factory=OutputsSpec,
                                 json_schema_extra={"default": {"values": [], "artifacts": []}})
    inputs: list[InputSpec] = _empty(list)
    rollback: Command = None
    #: an acceptance check run after the command exits 0, in the same workdir (docs/spec.md)
    check: Command = None
    worktree: WorktreeSpec | None = None
    cache: bool = False
    tags: list[str] = _empty(list)
    approval: ApprovalSpec | None = None
    #: a bounded loop: this step is a group of body steps run again until ``until`` holds
    loop: LoopSpec | None = None
    #: limits summed over all attempts of this step (each matrix/foreach instance on its own)
    budget: BudgetSpec | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v, "step id")

    @field_validator("needs", mode="before")
    @classmethod
    def _needs(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("run")
    @classmethod
    def _run(cls, v: Any) -> Any:
        return _command(v, "run")

    @field_validator("rollback")
    @classmethod
    def _rollback(cls, v: Any) -> Any:
        return _command(v, "rollback")

    @field_validator("check")
    @classmethod
    def _check(cls, v: Any) -> Any:
        return _command(v, "check")

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("matrix must have at least one key")
        for k, vals in v.items():
            check_id(k, "matrix key")
            if k in MATRIX_MODIFIERS:
                check_matrix_entries(vals, k)
            elif not isinstance(vals, (list, str)):
                raise ValueError(f"matrix.{k} must be a list or a '${{{{ ... }}}}' expression giving a list")
        if all(k in MATRIX_MODIFIERS for k in v) and "include" not in v:
            raise ValueError("matrix needs at least one axis or an 'include' list")
        return v

    @model_validator(mode="after")
    def _shape(self) -> StepSpec:
        if self.loop is not None:
            used = [f for f in ("run", "agent", "prompt", "matrix", "foreach", "approval", "rollback", "check",
                                "worktree") if getattr(self, f) is not None]
            if used:
                raise ValueError(f"a loop step runs its body steps; it cannot have {used[0]!r}")
            return self
        if self.run is None and self.agent is None and self.approval is None:
            raise ValueError("a step needs either 'run' or 'agent' (or only 'approval', a pure gate)")
        if self.run is not None and self.agent is not None:
            raise ValueError("'run' and 'agent' are mutually exclusive")
        if self.agent is not None and not self.prompt:
            raise ValueError("an agent step needs a 'prompt'")
        if self.prompt is not None and self.agent is None:
            raise ValueError("'prompt' is only valid with 'agent'")
        if self.matrix is not None and self.foreach is not None:
            raise ValueError("'matrix' and 'foreach' cannot be combined on one step")
        return self


#: the most iterations a loop may declare: each iteration is a set of stored step records
MAX_LOOP_ITERATIONS = 100


class LoopSpec(_Model):
    """``loop:`` — run ``steps`` (the body) as iteration 1, 2, … until ``until`` (evaluated
    over that iteration's body results) is true, at most ``max_iterations`` times; at the
    cap ``on_max`` decides: ``fail`` the loop, or ``continue`` with the last iteration's
    results. Body steps see ``loop.iteration`` (1-based) and ``loop.previous``."""

    max_iterations: int = Field(ge=1, le=MAX_LOOP_ITERATIONS)
    until: str
    on_max: Literal["fail", "continue"] = "fail"
    steps: list[StepSpec] = Field(min_length=1)


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema for spec files (``dagcraft schema``): accepts every shorthand the loader does."""
    schema = Spec.model_json_schema(by_alias=True)
    retry_ref = {"$ref": "#/$defs/RetrySpec"}
    for model in ("StepSpec", "DefaultsSpec"):
        schema["$defs"][model]["properties"]["retries"] = {
            "anyOf": [retry_ref, {"type": "integer", "minimum": 0}, {"type": "null"}]
        }
    for model in ("StepSpec", "DefaultsSpec", "AgentDef"):
        schema["$defs"][model]["properties"]["env"] = {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dagcraft workflow spec"
    return schema


class Spec(_Model):
    """A workflow spec as written. ``load_spec`` attaches source positions for error messages."""

    name: str
    description: str | None = None
    params: dict[str, ParamSpec] = {}
    agents: dict[str, AgentDef] = {}
    defaults: DefaultsSpec = DefaultsSpec()
    steps: list[StepSpec] = Field(min_length=1)
    finally_: list[StepSpec] = Field([], alias="finally")
    on_failure: Literal["stop", "rollback", "continue"] = "stop"
    max_parallel: int | None = Field(None, ge=1)
    #: run-level limits, summed over every attempt of the run
    budget: BudgetSpec | None = None

    # Filled by the loader: path tuple -> (line, col) of the value, and of the mapping key
    # (read only for an error message: the loader may fill them on first use).
    _positions: Mapping[tuple, tuple[int, int]] = PrivateAttr(default_factory=dict)
    _key_positions: Mapping[tuple, tuple[int, int]] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr("<spec>")
    _spec_dir: str | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_id(v, "workflow name")

    @field_validator("params", "agents")
    @classmethod
    def _keys(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        what = "param name" if info.field_name == "params" else "agent name"
        for k in v:
            check_id(k, what)
        return v


def instance_key(step_id: str, template_id: str) -> str:
    """The key of one instance of a fan-out step: the bracketed part of its concrete id
    (``reviewer=security`` of ``review[reviewer=security]``, ``2`` of foreach child
    ``implement[2]``). One path segment, unique among the step's instances (concrete ids are
    unique). A step that is not an instance is its own key."""
    if step_id.startswith(template_id + "[") and step_id.endswith("]"):
        return step_id[len(template_id) + 1 : -1]
    return step_id


# ----------------------------------------------------------------------------- compiled


class RetryPolicy(_Model):
    """Retries of a step. Both ``retry_on_*`` empty means any failure is retried."""

    limit: int = 0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    retry_on_exit_codes: list[int] = []
    retry_on_patterns: list[str] = []  # Python regexes, searched in the attempt's stderr/stdout


class InputDecl(_Model):
    """Artifact ``artifact`` of concrete step ``step`` is materialised at ``dest`` (workdir-relative)."""

    step: str
    artifact: str
    dest: str


class ConcreteStep(_Model):
    """One node of the compiled DAG. Template fields (run, prompt, env, ...) stay raw."""

    id: str
    template_id: str
    needs: list[str]
    run: list[str] | str | None = None
    agent: str | None = None
    prompt: str | None = None
    env: dict[str, str] = {}
    workdir: str | None = None
    timeout_s: float | None = None
    retries: RetryPolicy = RetryPolicy()
    when: str = "${{ success() }}"
    matrix: dict[str, Any] = {}
    foreach: str | None = None
    item: Any = None
    outputs_values: list[str] = []
    outputs_artifacts: list[str] = []
    inputs: list[InputDecl] = []
    rollback: list[str] | str | None = None
    check: list[str] | str | None = None
    worktree: WorktreeSpec | None = None
    cache: bool = False
    tags: list[str] = []
    is_finally: bool = False
    approval: ApprovalSpec | None = None
    #: a loop step: its compiled body (expanded per iteration at run time)
    loop: LoopDef | None = None
    #: a loop body step instance: the iteration it belongs to (1-based)
    iteration: int | None = None
    budget: BudgetSpec | None = None

    @property
    def compensates(self) -> bool:
        """True if a rollback has something to undo: a command, or a branch to delete."""
        return bool(self.rollback) or bool(self.worktree and self.worktree.delete_on_rollback)


class LoopDef(_Model):
    """A compiled loop. ``body`` steps have body-local ids and needs; iteration ``k`` runs them
    as children ``<loop>#<k>.<body id>`` (see :func:`loop_child_id`)."""

    max_iterations: int
    until: str
    on_max: Literal["fail", "continue"] = "fail"
    body: list[ConcreteStep]


def loop_child_id(loop_id: str, iteration: int, body_id: str) -> str:
    """The concrete id of body step ``body_id`` in iteration ``iteration`` of loop ``loop_id``:
    ``polish#2.review`` (``#`` and ``.`` never occur in a step id, so it cannot clash)."""
    return f"{loop_id}#{iteration}.{body_id}"


class CompiledWorkflow(_Model):
    """A validated, matrix-expanded workflow. ``steps`` is in a deterministic topological order."""

    name: str
    description: str | None = None
    spec_hash: str = ""
    params: dict[str, Any] = {}
    secret_params: list[str] = []
    agents: dict[str, AgentDef] = {}
    on_failure: Literal["stop", "rollback", "continue"] = "stop"
    max_parallel: int | None = None
    budget: BudgetSpec | None = None
    steps: dict[str, ConcreteStep] = {}
    # Not part of the hash: where the spec file lives (``run.spec_dir``) and how to name it.
    spec_dir: str | None = None
    source: str = "<spec>"

    def graph(self) -> nx.DiGraph:
        """Nodes are concrete step ids (attribute ``step``); an edge ``a -> b`` means b needs a."""
        import networkx as nx  # here, not at import: workers never build the graph

        g = nx.DiGraph()
        for sid, step in self.steps.items():
            g.add_node(sid, step=step)
        for sid, step in self.steps.items():
            for need in step.needs:
                g.add_edge(need, sid)
        return g

    def secret_values(self) -> list[str]:
        """String forms of every non-empty secret param value (for trace redaction)."""
        import json

        out: list[str] = []
        for name in self.secret_params:
            v = self.params.get(name)
            if v is None or v == "":
                continue
            out.append(v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        return out


class RenderContext(BaseModel):
    """Everything a template may see at run time (see docs/spec.md "Templates")."""

    params: dict[str, Any] = {}
    run: dict[str, Any] = {}
    steps: dict[str, dict[str, Any]] = {}
    matrix: dict[str, Any] = {}
    item: Any = None
    env: dict[str, str] = {}
    #: ``attempt.number`` and ``attempt.previous`` (None on attempt 1): only in a step's
    #: command, prompt, env and check (see docs/spec.md "check")
    attempt: dict[str, Any] | None = None
    #: ``loop.iteration`` and ``loop.previous`` (None in iteration 1): only in a loop body step
    loop: dict[str, Any] | None = None


class RenderedCommand(BaseModel):
    """A command ready to exec: ``argv`` is exec'd directly (``shell`` says it is ``bash -c``);
    ``env`` is merged into the child's environment (for a shell script it carries the
    ``DAGCRAFT_V_<n>`` template values the script refers to)."""

    argv: list[str]
    shell: bool
    env: dict[str, str] = {}
    adapter: str = "generic"
    workdir: str | None = None


# loops nest step models in step models: resolve the forward references now
for _m in (StepSpec, LoopSpec, Spec, ConcreteStep, LoopDef, CompiledWorkflow):
    _m.model_rebuild()
