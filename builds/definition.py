"""The pipeline definition: YAML in, a validated, normalized dict out.

Anything wrong is an InvalidPipeline naming the place (`stages[0].jobs[1].steps[0].timeout`);
nothing else escapes, whatever the input.
"""

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from builds import conditions, dag, matrix, parameters
from builds.errors import InvalidPipeline, InvalidVariables
from ciproject.sizes import parse_size
from concurrency import keys
from forge import cron

MAX_DEFINITION_BYTES = 256 * 1024
MAX_STAGES = 50
MAX_JOBS = 500
MAX_JOB_RUNS = 1000  # with every combination of the matrices
DEFAULT_CLEANUP_TIMEOUT, MAX_CLEANUP_TIMEOUT = 300, 3600  # seconds
MAX_KILL_GRACE = 300  # seconds
MAX_STEPS_PER_JOB = 100
MAX_VARIABLES = 200
MAX_PRIORITY = 100  # a build's priority in its concurrency group's queue: 0..100
MAX_VARIABLE_NAME = 128
MAX_VARIABLE_VALUE = 32 * 1024
MAX_VARIABLES_TOTAL = 256 * 1024
# A step's own limits (agents.process.containment enforces them with cgroup controllers).
MAX_STEP_PROCESSES = 4 * 1024 * 1024  # the kernel's pid_max at most
MIN_STEP_MEMORY, MAX_STEP_MEMORY = 1024**2, 1024**4
# Artifacts: how long they are kept (`expire-in`), and how many patterns a job may give.
DEFAULT_ARTIFACT_EXPIRY, MAX_ARTIFACT_EXPIRY = 30 * 86400, 365 * 86400  # seconds
MAX_ARTIFACT_PATHS = 100
MAX_REF_PATTERNS, MAX_SCHEDULES = 50, 20
MAX_CHECKOUT_DEPTH = 1_000_000
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Names a build may not set: ours (CI_*), and those the shell, the dynamic linker or every
# program resolve before the step's own command runs, which would turn data into code.
RESERVED_PREFIXES = ("CI_", "BASH_", "LD_")
RESERVED_NAMES = frozenset(
    {"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH"}
    | {"GLOBIGNORE", "PATH", "HOME", "SHELL", "USER", "LOGNAME", "TMPDIR", "PWD", "OLDPWD"}
    # These three glibc variables act on every program, bash included: loader tunables,
    # locale files (read as bash starts) and charset modules (shared objects).
    | {"GLIBC_TUNABLES", "LOCPATH", "GCONV_PATH"}
    # What the server decides in a concurrency group key (${pipeline_id}, ...).
    | {name.upper() for name in keys.SERVER_NAMES}
)

VARIABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
JOB_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$"
LABEL_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"

Scalar = str | int | float | bool


class _Strict(BaseModel):
    # Not pydantic's strict mode: every YAML scalar arrives as text (see _StrictLoader), and
    # "300" or "false" must still become numbers and booleans where the schema wants them.
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


# What a retry rule may retry: FAILED, TIMED_OUT, and a job whose agent was lost while the
# step ran (the job runs again from its first step, elsewhere: builds.services.lost_agents).
RETRY_ON = ("failure", "timeout", "agent-lost")
MAX_RETRY_BACKOFF = 600  # seconds: the doubling wait between retries stops growing here
# `retry: N`'s rule (stored as None): any failure or timeout, at once.
DEFAULT_RETRY_ON = ["failure", "timeout"]
DEFAULT_RETRY_RULE = {"on": DEFAULT_RETRY_ON, "on_exit_codes": None, "backoff": 0}


class RetrySpec(_Strict):
    """`retry: {max: 3, on: [failure, agent-lost], on-exit-codes: [1, 75], backoff: 10}`;
    `retry: N` is `{max: N}`: any failure or timeout, at once."""

    max: Annotated[int, Field(ge=0, le=10)]
    on: Annotated[list[Literal[RETRY_ON]], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON)
    )
    on_exit_codes: (
        Annotated[list[Annotated[int, Field(ge=1, le=255)]], Field(min_length=1, max_length=50)]
        | None
    ) = Field(default=None, alias="on-exit-codes")
    backoff: Annotated[int, Field(ge=0, le=MAX_RETRY_BACKOFF)] = 0  # seconds, doubling

    @model_validator(mode="after")
    def _exit_codes_need_failure(self) -> "RetrySpec":
        if self.on_exit_codes is not None and "failure" not in self.on:
            raise ValueError("on-exit-codes: only a failure has an exit code; add it to `on`")
        return self


def _condition(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return conditions.parse(value).text
    except conditions.InvalidCondition as exc:
        raise ValueError(str(exc)) from None


class StepSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    run: Annotated[str, Field(min_length=1, max_length=64 * 1024)]
    if_: str | None = Field(default=None, alias="if")
    _if = field_validator("if_", mode="before")(_condition)
    timeout: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 3600
    retry: RetrySpec = Field(default_factory=lambda: RetrySpec(max=0))
    continue_on_error: bool = Field(default=False, alias="continue-on-error")
    # Seconds between SIGTERM and SIGKILL when the step is stopped (None: the agent's
    # STEP_KILL_GRACE_SECONDS).
    kill_grace: Annotated[int, Field(ge=0, le=MAX_KILL_GRACE)] | None = Field(
        default=None, alias="kill-grace"
    )

    @field_validator("retry", mode="before")
    @classmethod
    def _retry_count(cls, value: Any) -> Any:
        return value if isinstance(value, dict) else {"max": value}  # `retry: 2`

    max_processes: Annotated[int, Field(ge=1, le=MAX_STEP_PROCESSES)] | None = Field(
        default=None, alias="max-processes"
    )
    max_memory: int | None = Field(default=None, alias="max-memory")  # bytes

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int | None:
        if value is None:
            return None
        size = parse_size(value)  # `512M`, `2G`
        if not MIN_STEP_MEMORY <= size <= MAX_STEP_MEMORY:
            raise ValueError(f"{value!r} is out of range: from 1M to 1T")
        return size


def workspace_pattern_refusal(pattern: str) -> str | None:
    """Why `pattern` (an artifact or cache path) does not name something inside the
    workspace, or None. The agent checks again where the files really lead (symlinks)."""
    if not pattern or "\\" in pattern or pattern.startswith(("/", "~")):
        return f"{pattern!r}: a path relative to the workspace (no /, ~ or \\ in front)"
    if ".." in pattern.split("/"):
        return f"{pattern!r}: '..' would leave the workspace"
    return None


def parse_duration(text: str) -> int:
    """Seconds from `7d`, `12h`, `30m`, `2w`, `90s` or a number of seconds."""
    match = re.fullmatch(r"(\d+)\s*([smhdw]?)", str(text).strip())
    if not match:
        raise ValueError(f"{str(text)[:40]!r} is not a duration: a number with s, m, h, d or w")
    return int(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


WorkspacePattern = Annotated[str, Field(min_length=1, max_length=1000)]


def _workspace_patterns(value: list[str]) -> list[str]:
    for pattern in value:
        if why := workspace_pattern_refusal(pattern):
            raise ValueError(why)
    if len(set(value)) != len(value):
        raise ValueError("a path is listed twice")
    return value


class ArtifactsSpec(_Strict):
    """`artifacts: {paths: [dist/*.whl, "reports/**"], when: on_success, expire-in: 7d}`:
    what the agent uploads after the job's steps, for the jobs that need it."""

    paths: Annotated[list[WorkspacePattern], Field(min_length=1, max_length=MAX_ARTIFACT_PATHS)]
    _paths = field_validator("paths")(_workspace_patterns)
    when: Literal["on_success", "on_failure", "always"] = "on_success"
    expire_in: int = Field(default=DEFAULT_ARTIFACT_EXPIRY, alias="expire-in")  # seconds
    # A pattern matching nothing is an error (else it uploads what matched, maybe nothing).
    required: bool = False

    @field_validator("expire_in", mode="before")
    @classmethod
    def _expiry(cls, value: Any) -> int:
        seconds = parse_duration(value)
        if not 60 <= seconds <= MAX_ARTIFACT_EXPIRY:
            raise ValueError(
                f"{value!r} is out of range: from 1m to {MAX_ARTIFACT_EXPIRY // 86400}d"
            )
        return seconds


class CacheSpec(_Strict):
    """`cache: {key: "deps-{hash:requirements.lock}", paths: [.venv, ~/.cache/pip]}`: kept
    on each build node, restored before the job's first step when the key matches."""

    key: Annotated[str, Field(min_length=1, max_length=200)]
    paths: Annotated[list[Annotated[str, Field(min_length=1, max_length=1000)]],
                     Field(min_length=1, max_length=MAX_ARTIFACT_PATHS)]  # fmt: skip

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not CACHE_KEY_RE.fullmatch(value):
            raise ValueError(
                f"{value[:40]!r}: letters, digits, . _ - and {{hash:FILE}} (FILE in the workspace)"
            )
        for name in CACHE_HASH_RE.findall(value):
            if why := workspace_pattern_refusal(name):
                raise ValueError(f"{{hash:...}}: {why}")
        return value

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        # `~/x` is the step user's home; anything else is in the workspace.
        return _workspace_patterns([p.removeprefix("~/") for p in value]) and value


class CheckoutSpec(_Strict):
    """`checkout: {depth: 1, submodules: true}`: how the agent puts the build's commit in the
    job's workspace (agents.process.checkout)."""

    depth: Annotated[int, Field(ge=1, le=MAX_CHECKOUT_DEPTH)] | None = None  # None: all
    submodules: bool = False


# A branch or tag glob of `on:` (forge.filters): `*` within a name part, `**` across `/`.
RefPattern = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\s\x00-\x1f]+$")]
RefPatterns = Annotated[list[RefPattern], Field(min_length=1, max_length=MAX_REF_PATTERNS)]


class PushFilter(_Strict):
    """`push: {branches: [main, "release/*"], tags: ["v*"]}`: which pushes build. Giving
    only one of the two builds only that kind (as GitHub Actions does); neither, every push."""

    branches: RefPatterns | None = None
    tags: RefPatterns | None = None


class PullRequestFilter(_Strict):
    """`pull_request: {branches: [main]}`: pull requests into those branches build."""

    branches: RefPatterns | None = None


class OnSpec(_Strict):
    """`on:`: which forge events make a build (forge.filters). Without `on:`, every push and
    pull request does; with it, only the events it lists."""

    push: PushFilter | None = None
    pull_request: PullRequestFilter | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys_given(cls, value: Any) -> Any:
        if isinstance(value, dict):  # `push:` alone is a key with a null value: every push
            return {k: {} if v is None else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _some_event(self) -> "OnSpec":
        if self.push is None and self.pull_request is None:  # no forge event would build
            raise ValueError("lists no event: give push or pull_request (no on: builds both)")
        return self


class ScheduleSpec(_Strict):
    """`schedules: [{cron: "0 3 * * *", timezone: Europe/Berlin, branch: main}]`: builds by
    the clock (forge.cron; beat fires them)."""

    cron: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    # The branch whose head it builds (None: the repository's default branch; a pipeline
    # without a repository builds no commit).
    branch: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    variables: dict[str, Scalar] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _when(self) -> "ScheduleSpec":
        if why := cron.validate(self.cron, self.timezone):
            raise ValueError(why)
        return self


# The tags of a union's members, left out of an error's place: `artifacts.paths`, not
# `artifacts.uploads.paths`.
_UPLOADS, _TAKES_NONE = "uploads", "takes-none"
_CHECKS_OUT, _NO_CHECKOUT = "checks-out", "no-checkout"
UNION_TAGS = {_UPLOADS, _TAKES_NONE, _CHECKS_OUT, _NO_CHECKOUT}
CACHE_HASH_RE = re.compile(r"\{hash:([^{}]+)\}")
CACHE_KEY_RE = re.compile(r"(?:[A-Za-z0-9._-]|\{hash:[^{}]+\})+")


class JobSpec(_Strict):
    id: Annotated[str, Field(pattern=JOB_ID_PATTERN)]
    # A label; a matrix job's may name its axes: `linux-${matrix.db}`.
    runs_on: Annotated[str, Field(max_length=200)] = Field(default="default", alias="runs-on")
    # What it waits for (None: every job of the earlier stages); any job of its own stage or
    # an earlier one.
    needs: (
        Annotated[list[Annotated[str, Field(pattern=JOB_ID_PATTERN)]], Field(max_length=MAX_JOBS)]
        | None
    ) = None
    if_: str | None = Field(default=None, alias="if")
    _if = field_validator("if_", mode="before")(_condition)
    # Run on the agent that ran this job (one it waits for), in the same workspace.
    reuse: Annotated[str, Field(pattern=JOB_ID_PATTERN)] | None = None
    # All its steps together, automatic retries included (each step keeps its own too).
    timeout: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] | None = None
    # What its steps that run after a cancel (always(), cancelled()) may take, together.
    cleanup_timeout: Annotated[int, Field(ge=1, le=MAX_CLEANUP_TIMEOUT)] = Field(
        default=DEFAULT_CLEANUP_TIMEOUT, alias="cleanup-timeout"
    )
    # Expanded into its runs (builds.matrix.expand).
    matrix: dict[str, Any] | None = None
    # The secrets its steps get in their environment (vault): those named, and no others.
    secrets: Annotated[list[str], Field(max_length=MAX_VARIABLES)] = []
    # What it uploads for the jobs that need it; `false`: it takes none of theirs.
    artifacts: (
        Annotated[
            Annotated[ArtifactsSpec, Tag(_UPLOADS)] | Annotated[Literal[False], Tag(_TAKES_NONE)],
            Discriminator(lambda v: _TAKES_NONE if v in (False, "false") else _UPLOADS),
        ]
        | None
    ) = None

    @field_validator("artifacts", mode="before")
    @classmethod
    def _no_artifacts(cls, value: Any) -> Any:
        if value in (False, "false"):  # YAML scalars arrive as text
            return False
        if value is not None and not isinstance(value, dict):
            raise ValueError("a mapping (paths, when, expire-in, required), or false")
        return value

    cache: CacheSpec | None = None
    # The build's commit in its workspace before the first step (a build from a forge);
    # `false`: none.
    checkout: Annotated[
        Annotated[CheckoutSpec, Tag(_CHECKS_OUT)] | Annotated[Literal[False], Tag(_NO_CHECKOUT)],
        Discriminator(lambda v: _NO_CHECKOUT if v in (False, "false") else _CHECKS_OUT),
    ] = Field(default_factory=lambda: CheckoutSpec())

    @field_validator("checkout", mode="before")
    @classmethod
    def _no_checkout(cls, value: Any) -> Any:
        if value in (False, "false"):  # YAML scalars arrive as text
            return False
        if value is None or value in (True, "true"):
            return {}
        if not isinstance(value, dict):
            raise ValueError("a mapping (depth, submodules), or false")
        return value

    steps: Annotated[list[StepSpec], Field(min_length=1, max_length=MAX_STEPS_PER_JOB)]

    @field_validator("runs_on")
    @classmethod
    def _label(cls, value: str) -> str:
        if not re.fullmatch(LABEL_PATTERN, matrix.REFERENCE_RE.sub("x", value)):
            raise ValueError(
                f"{value!r} is not a label (letters, digits, _ . -, up to 64), with"
                " ${matrix.NAME} where a matrix job's label takes its values"
            )
        return value

    @field_validator("needs")
    @classmethod
    def _needs_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a job is listed twice")
        return value

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if why := secret_name_refusal(name):
                raise ValueError(why)
        if len(set(value)) != len(value):
            raise ValueError("a secret is listed twice")
        return value

    @field_validator("matrix", mode="before")
    @classmethod
    def _matrix(cls, value: Any, info) -> dict | None:
        if value is None:
            return None
        if "id" not in info.data or "runs_on" not in info.data:
            raise ValueError("needs a valid id and runs-on")
        return matrix.expand(value, info.data["id"], info.data["runs_on"], _text)

    @model_validator(mode="after")
    def _labels(self) -> "JobSpec":
        runs = self.matrix["runs"] if self.matrix else [{"runs_on": self.runs_on}]
        for run in runs:
            if not re.fullmatch(LABEL_PATTERN, run["runs_on"]):
                raise ValueError(
                    f"runs-on: {run['runs_on']!r} is not a label"
                    + (" (${matrix.NAME} needs a matrix)" if not self.matrix else "")
                )
        return self


class StageSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)]
    jobs: Annotated[list[JobSpec], Field(min_length=1, max_length=MAX_JOBS)]


class ParameterSpec(_Strict):
    """What a trigger may set (builds.parameters)."""

    description: Annotated[str, Field(max_length=500)] = ""
    default: Scalar | None = None
    required: bool = False
    choices: (
        Annotated[list[Scalar], Field(min_length=1, max_length=parameters.MAX_CHOICES)] | None
    ) = None
    pattern: Annotated[str, Field(min_length=1, max_length=parameters.MAX_PATTERN)] | None = None

    @field_validator("default")
    @classmethod
    def _default(cls, value: Scalar | None) -> str | None:
        return None if value is None else _text(value)

    @field_validator("choices")
    @classmethod
    def _choices(cls, value: list[Scalar] | None) -> list[str] | None:
        if value is None:
            return None
        texts = [_text(choice) for choice in value]
        if len(set(texts)) != len(texts):
            raise ValueError("a choice is listed twice")
        return texts

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            parameters.compile_pattern(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ParameterSpec":
        if self.choices is not None and self.pattern is not None:
            raise ValueError("choices or pattern, not both")
        if self.required and self.default is not None:
            raise ValueError("a required parameter has no default")
        if self.default is not None and (
            why := parameters.refusal(self.model_dump(), self.default)
        ):
            raise ValueError(f"default: {why}")
        return self


def _text(value: Scalar) -> str:
    try:
        return scalar_text(value)
    except InvalidVariables as exc:
        raise ValueError(exc.detail) from None


class PipelineSpec(_Strict):
    variables: dict[str, Scalar] = Field(default_factory=dict)
    parameters: dict[str, ParameterSpec] = Field(default_factory=dict)
    concurrency: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    # Its builds get no secrets (code from outside the team runs in them).
    untrusted: bool = False
    # Its builds' place in their concurrency group's queue (higher first); a trigger may ask
    # for up to max-priority (by default, only the pipeline's own).
    priority: Annotated[int, Field(ge=0, le=MAX_PRIORITY)] = 0
    max_priority: Annotated[int, Field(ge=0, le=MAX_PRIORITY)] | None = Field(
        default=None, alias="max-priority"
    )
    on: OnSpec | None = None
    schedules: Annotated[list[ScheduleSpec], Field(max_length=MAX_SCHEDULES)] = []
    stages: Annotated[list[StageSpec], Field(min_length=1, max_length=MAX_STAGES)]

    @field_validator("variables")
    @classmethod
    def _variables(cls, value: dict[str, Scalar]) -> dict[str, str]:
        try:
            return normalize_variables(value)
        except InvalidVariables as exc:
            raise ValueError(exc.detail) from None

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, value: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        try:  # named as variables are: a parameter becomes one
            normalize_variables(dict.fromkeys(value, ""), "parameters")
        except InvalidVariables as exc:
            raise ValueError(exc.detail.removeprefix("parameters: ")) from None
        return value

    @model_validator(mode="after")
    def _parameters_apart(self) -> "PipelineSpec":
        if both := sorted(set(self.variables) & set(self.parameters)):
            raise ValueError(
                f"parameters.{both[0]}: also in variables; a parameter's default is its default"
            )
        if len(self.variables) + len(self.parameters) > MAX_VARIABLES:
            raise ValueError(f"parameters: with the variables, at most {MAX_VARIABLES} names")
        return self

    @model_validator(mode="after")
    def _priorities(self) -> "PipelineSpec":
        if self.max_priority is not None and self.max_priority < self.priority:
            raise ValueError(f"max-priority: below the pipeline's priority of {self.priority}")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineSpec":
        stage_names, stage_of = set(), {}
        for s, stage in enumerate(self.stages):
            if stage.name in stage_names:
                raise ValueError(f"stages[{s}].name: duplicate stage name {stage.name!r}")
            stage_names.add(stage.name)
            for j, job in enumerate(stage.jobs):
                if job.id in stage_of:
                    raise ValueError(f"stages[{s}].jobs[{j}].id: duplicate job id {job.id!r}")
                stage_of[job.id] = s
        if len(stage_of) > MAX_JOBS:
            raise ValueError(f"stages: {len(stage_of)} jobs in all; at most {MAX_JOBS} are allowed")
        runs = sum(len(job.matrix["runs"]) if job.matrix else 1 for job in self._jobs())
        if runs > MAX_JOB_RUNS:
            raise ValueError(
                f"stages: {runs} job runs in all, with the matrices' combinations; at most"
                f" {MAX_JOB_RUNS} are allowed"
            )
        return self

    @model_validator(mode="after")
    def _order(self) -> "PipelineSpec":
        """`needs` and `reuse` name jobs a job may wait for, without a cycle."""
        stage_of = {job.id: s for s, stage in enumerate(self.stages) for job in stage.jobs}
        needs = {job.id: job.needs for job in self._jobs()}
        for s, j, job in self._placed_jobs():
            for n, needed in enumerate(job.needs or ()):
                where = f"stages[{s}].jobs[{j}].needs[{n}]"
                if needed == job.id:
                    raise ValueError(f"{where}: a job cannot need itself")
                if needed not in stage_of:
                    raise ValueError(f"{where}: {needed!r} is not a job of this pipeline")
                if stage_of[needed] > s:
                    raise ValueError(
                        f"{where}: {needed!r} is in a later stage; a job needs jobs of its own"
                        " stage or earlier ones"
                    )
        try:
            dag.check_acyclic({key: value or () for key, value in needs.items()})
        except dag.CycleError as exc:
            raise ValueError(f"stages: the needs form a cycle: {exc}") from None
        matrix_jobs = {job.id for job in self._jobs() if job.matrix}
        for s, j, job in self._placed_jobs():
            where = f"stages[{s}].jobs[{j}].reuse"
            if job.reuse is None:
                continue
            if job.id in matrix_jobs or job.reuse in matrix_jobs:
                raise ValueError(f"{where}: a matrix job cannot reuse or be reused")
            if job.reuse not in stage_of or job.reuse not in dag.ancestors(job.id, needs, stage_of):
                raise ValueError(
                    f"{where}: {job.reuse!r} is not a job this one waits for (of an earlier"
                    " stage, or in its needs)"
                )
        return self

    def _jobs(self) -> Iterable[JobSpec]:
        return (job for stage in self.stages for job in stage.jobs)

    def _placed_jobs(self) -> Iterable[tuple[int, int, JobSpec]]:
        return (
            (s, j, job) for s, stage in enumerate(self.stages) for j, job in enumerate(stage.jobs)
        )


_STR, _NULL = "tag:yaml.org,2002:str", "tag:yaml.org,2002:null"
_PLAIN_TAGS = {_STR, _NULL, "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads plain scalars as text (no YAML 1.1 surprises: `1.10` stays
    "1.10", `no` stays "no", `0777` stays "0777"), and refuses explicit tags, aliases (no
    "billion laughs"), duplicate keys and NUL characters."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag == _NULL]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        if any(tag == _NULL for tag, _ in resolvers)
    }

    def construct_object(self, node, deep=False):
        if node.tag not in _PLAIN_TAGS:
            raise yaml.constructor.ConstructorError(
                None, None, f"tags such as {node.tag!r} are not allowed", node.start_mark
            )
        value = super().construct_object(node, deep=deep)
        if isinstance(value, str) and "\x00" in value:
            raise yaml.constructor.ConstructorError(
                None, None, "NUL characters are not allowed", node.start_mark
            )
        return value

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "aliases (*name) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_definition(text: Any) -> dict:
    """Validate a YAML definition; return its normalized form (stored as Pipeline.spec)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidPipeline("definition: must be a non-empty YAML document")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DEFINITION_BYTES:
        raise InvalidPipeline(f"definition: larger than {MAX_DEFINITION_BYTES // 1024} KiB")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise InvalidPipeline(f"definition: not valid YAML: {exc}") from None
    except Exception as exc:  # PyYAML raises more than YAMLError on hostile input
        raise InvalidPipeline(f"definition: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InvalidPipeline("definition: the top level must be a mapping with 'stages'")
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        raise InvalidPipeline("; ".join(errors[:5]), errors=errors) from None
    normalized = _normalize(spec)
    for n, schedule in enumerate(normalized["schedules"]):
        try:  # a schedule's variables are a trigger's: refused now rather than at 3 a.m.
            schedule["variables"] = normalize_variables(schedule["variables"])
            parameters.bind(normalized, schedule["variables"])
        except InvalidVariables as exc:
            raise InvalidPipeline(f"schedules[{n}].{exc.detail}") from None
    return normalized


def _describe(error: dict) -> str:
    path = ""
    for part in error["loc"]:
        if part in UNION_TAGS:
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required"
    if message.startswith(("stages[", "stages:", "parameters.", "parameters:", "max-priority:")):
        return message
    return f"{path or 'definition'}: {message}"


def _normalize(spec: PipelineSpec) -> dict:
    return {
        "variables": spec.variables,
        "parameters": {name: p.model_dump() for name, p in spec.parameters.items()},
        "concurrency": spec.concurrency,
        "untrusted": spec.untrusted,
        "priority": spec.priority,
        "max_priority": spec.priority if spec.max_priority is None else spec.max_priority,
        "on": spec.on.model_dump() if spec.on else None,
        "schedules": [schedule.model_dump() for schedule in spec.schedules],
        "stages": [
            {
                "name": stage.name,
                "jobs": [
                    {
                        "id": job.id,
                        "runs_on": job.runs_on,
                        "reuse": job.reuse,
                        "needs": job.needs,
                        "if": job.if_,
                        "matrix": job.matrix,
                        "timeout": job.timeout,
                        "cleanup_timeout": job.cleanup_timeout,
                        "secrets": job.secrets,
                        "artifacts": _artifacts(job.artifacts),
                        "cache": job.cache.model_dump() if job.cache else None,
                        "checkout": job.checkout and job.checkout.model_dump(),
                        "steps": [
                            {
                                "name": step.name or f"step {n + 1}",
                                "run": step.run,
                                "if": step.if_,
                                "timeout": step.timeout,
                                **_retry(step.retry),
                                "continue_on_error": step.continue_on_error,
                                "kill_grace": step.kill_grace,
                                "max_processes": step.max_processes,
                                "max_memory": step.max_memory,
                            }
                            for n, step in enumerate(job.steps)
                        ],
                    }
                    for job in stage.jobs
                ],
            }
            for stage in spec.stages
        ],
    }


def _artifacts(artifacts: ArtifactsSpec | Literal[False] | None) -> dict | bool | None:
    return artifacts.model_dump() if isinstance(artifacts, ArtifactsSpec) else artifacts


def _retry(retry: RetrySpec) -> dict:
    """`retry` (the count) and `retry_rule` (what to retry and how long to wait; None, the
    default: any failure or timeout, at once)."""
    rule = {"on": sorted(set(retry.on)), "on_exit_codes": retry.on_exit_codes}
    rule["backoff"] = retry.backoff
    return {"retry": retry.max, "retry_rule": None if rule == DEFAULT_RETRY_RULE else rule}


def secret_name_refusal(name) -> str | None:
    """Why `name` cannot name a secret (it becomes an environment variable), or None."""
    if not isinstance(name, str) or not VARIABLE_NAME_RE.fullmatch(name):
        return f"{str(name)[:40]!r} is not a valid secret name ([A-Za-z_][A-Za-z0-9_]*)"
    if len(name) > MAX_VARIABLE_NAME:
        return f"{name[:40]}...: a secret's name is at most {MAX_VARIABLE_NAME} characters"
    if is_reserved_variable_name(name):
        return f"{name}: reserved (set by the agent, or changes how the shell runs)"
    return None


def is_reserved_variable_name(name: str) -> bool:
    upper = name.upper()
    return upper in RESERVED_NAMES or upper.startswith(RESERVED_PREFIXES)


def normalize_variables(variables: Any, where: str = "variables") -> dict[str, str]:
    """Check names and sizes; scalars become strings. Raises InvalidVariables."""
    if not isinstance(variables, dict):
        raise InvalidVariables(f"{where}: must be a mapping of names to values")
    if len(variables) > MAX_VARIABLES:
        raise InvalidVariables(f"{where}: {len(variables)} variables; at most {MAX_VARIABLES}")
    result, total = {}, 0
    for name, value in variables.items():
        if not isinstance(name, str) or not VARIABLE_NAME_RE.fullmatch(name):
            raise InvalidVariables(
                f"{where}: {name!r} is not a valid name"
                " (letters, digits and _, not starting with a digit)"
            )
        if len(name) > MAX_VARIABLE_NAME:
            raise InvalidVariables(f"{where}.{name[:40]}...: name longer than {MAX_VARIABLE_NAME}")
        if is_reserved_variable_name(name):
            raise InvalidVariables(
                f"{where}.{name}: reserved (CI_*, BASH_*, LD_*, PATH, HOME, IFS, ... are set by"
                " the agent or change how the shell runs; pipeline_id and pipeline_name by the"
                " server)"
            )
        value = scalar_text(value, f"{where}.{name}")
        total += len(value.encode("utf-8")) + len(name)
        result[name] = value
    if total > MAX_VARIABLES_TOTAL:
        raise InvalidVariables(f"{where}: {total} bytes in all; at most {MAX_VARIABLES_TOTAL}")
    return result


def scalar_text(value: Any, where: str = "") -> str:
    """A variable's value as text (booleans as true and false); InvalidVariables, prefixed
    with `where`, for anything a variable cannot hold."""
    place = f"{where}: " if where else ""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int | float):
        value = str(value)
    elif not isinstance(value, str):
        raise InvalidVariables(f"{place}must be a string, number or boolean")
    if "\x00" in value:
        raise InvalidVariables(f"{place}contains a NUL byte")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidVariables(f"{place}not valid UTF-8 text") from None
    if size > MAX_VARIABLE_VALUE:
        raise InvalidVariables(f"{place}value larger than {MAX_VARIABLE_VALUE} bytes")
    return value


def parse_assignments(
    items: Iterable[tuple[str, str]],
    *,
    unreadable: str = "{place}: expected KEY=VALUE, got {text!r}",
    twice: str = "{place}: {name} is given twice",
) -> dict[str, str]:
    """`KEY=VALUE` texts as a mapping. Each item is (place, text), the place naming the text
    in messages ("variables, line 2", "--var"); the name is trimmed, the value is the rest of
    the text as it is. Raises InvalidVariables with `unreadable` (formatted with place and
    text) for a text without `=` or a name, with `twice` (place and name) for a name given a
    second time. The names and sizes are normalize_variables' to check."""
    variables: dict[str, str] = {}
    for place, text in items:
        name, equals, value = text.partition("=")
        name = name.strip()
        if not equals or not name:
            raise InvalidVariables(unreadable.format(place=place, text=text))
        if name in variables:
            raise InvalidVariables(twice.format(place=place, name=name))
        variables[name] = value
    return variables
