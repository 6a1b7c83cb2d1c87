"""The order of a build's jobs. A job waits for the jobs it `needs` (each run of a matrix
job), or, without `needs`, for every job of the earlier stages. Once what it waits for has
ended, its condition decides: it starts, or it is SKIPPED with a reason. Pure: the build
services read the rows, ask `plan`, and write what it says."""

import graphlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from builds import conditions
from builds.statuses import RUN_FAILED, RUN_FINAL, RunStatus

LIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
ENDED_BADLY = (RunStatus.FAILED, RunStatus.TIMED_OUT)  # what fail-fast reacts to
FAIL_FAST = "fail-fast: "  # the reason of the runs it cancels


class CycleError(ValueError):
    pass


class VariablesUnavailable(Exception):
    """What `plan`'s variables reader raises when the build's variables cannot be read; the
    runs whose condition needs them are skipped, with this as their reason."""


def check_acyclic(needs: Mapping[str, Iterable[str]]) -> None:
    """Raise CycleError naming the jobs of a cycle of `needs` (job id -> the ids it needs)."""
    try:
        graphlib.TopologicalSorter(needs).prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]  # [a, b, ..., a], each needing the one before it
        raise CycleError(" -> ".join(reversed(cycle))) from None


def _reach(starts: Iterable[str], following: Callable[[str], Iterable[str]]) -> set[str]:
    """Everything `following` leads to from `starts`, through any number of steps."""
    found, todo = set(), list(starts)
    while todo:
        for other in following(todo.pop()):
            if other not in found:
                found.add(other)
                todo.append(other)
    return found


def ancestors(job: str, needs: Mapping[str, list[str] | None], stage: Mapping[str, int]) -> set:
    """Every job `job` waits for, directly or through others (needs of acyclic `needs`)."""

    def waited_for(current: str) -> Iterable[str]:
        direct = needs[current]
        return [o for o in stage if stage[o] < stage[current]] if direct is None else direct

    return _reach([job], waited_for)


@dataclass(frozen=True)
class Run:
    key: str  # unique in the build: the job's id, or a matrix run's name
    job: str  # the job's id in the definition
    stage: int
    status: str
    needs: tuple[str, ...] | None = None  # job ids; None: every job of the earlier stages
    condition: str = ""  # "": success()
    matrix: Mapping[str, str] = field(default_factory=dict)


def dependents(runs: list[Run], keys: Iterable[str]) -> set[str]:
    """Every run that waits for one of `keys`, directly or through others."""
    by_key = {run.key: run for run in runs}

    def waiting_for(key: str) -> Iterable[str]:
        current = by_key[key]
        return [
            other.key
            for other in runs
            if (
                current.job in other.needs
                if other.needs is not None
                else other.stage > current.stage
            )
        ]

    return _reach(keys, waiting_for)


@dataclass(frozen=True)
class MatrixRule:
    max_parallel: int | None = None
    fail_fast: bool = True


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)  # PENDING runs to queue now
    skip: dict[str, str] = field(default_factory=dict)  # PENDING runs to skip, with reasons
    cancel: dict[str, str] = field(default_factory=dict)  # fail-fast, a cancel: runs to end, why
    clean: list[str] = field(default_factory=list)  # QUEUED runs that go on after the cancel
    outcome: str | None = None  # SUCCEEDED or FAILED once every run has ended


def plan(
    runs: list[Run],
    matrices: Mapping[str, MatrixRule] | None = None,
    variables: Callable[[], Mapping[str, str]] = dict,
    cancelled: bool = False,
) -> Plan:
    """What to do now with a RUNNING build's runs, or a `cancelled` one's: then only the runs
    whose condition holds after a cancel (always(), cancelled()) start, or go on if queued
    (`clean`), once what they wait for has ended; the others are cancelled. `variables` is
    called only when a condition reads them (the build's variables as they are now)."""
    matrices = matrices or {}
    result = Plan()
    status = {run.key: run.status for run in runs}
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job].append(run)
    if not cancelled:
        _fail_fast(by_job, matrices, status, result)
    live = {job: sum(status[r.key] in LIVE for r in group) for job, group in by_job.items()}
    read_variables = _once(variables)
    # The first failed run each run comes after (itself if it failed), if any: failure() is
    # about everything before a job, through skipped and succeeded jobs alike.
    failure: dict[str, str | None] = {}
    earlier = _Earlier()  # every run of the stages before the current one
    for stage in _stages_in_order(runs, by_job):
        for run in stage:
            explicit = run.needs is not None
            waited = [r.key for job in run.needs for r in by_job[job]] if explicit else []
            failure[run.key] = _first(
                [run.key] if status[run.key] in RUN_FAILED else [],
                (failure[key] for key in waited),
                [earlier.failure] if not explicit else [],
            )
            waiting = status[run.key] == RunStatus.PENDING
            if not waiting and not (cancelled and status[run.key] == RunStatus.QUEUED):
                continue
            over = not waiting or (
                all(status[key] in RUN_FINAL for key in waited) and (explicit or earlier.final)
            )
            if cancelled:
                holds = _after_cancel(run, over, waited, status, failure, read_variables, result)
                if not holds or not waiting:  # cancelled, waiting, or queued: it goes on
                    if holds:
                        result.clean.append(run.key)
                    continue
            elif not over:
                continue
            elif reason := _skip_reason(run, waited, status, failure, read_variables):
                result.skip[run.key] = reason
                status[run.key] = RunStatus.SKIPPED
                continue
            limit = matrices.get(run.job, MatrixRule()).max_parallel
            if limit is not None and live[run.job] >= limit:
                continue  # a later decision starts it, when one of its siblings ends
            live[run.job] += 1
            result.start.append(run.key)
            status[run.key] = RunStatus.QUEUED
        earlier.add(stage, status, failure)
    if all(s in RUN_FINAL for s in status.values()):
        failed = any(s in RUN_FAILED for s in status.values())
        result.outcome = RunStatus.FAILED if failed else RunStatus.SUCCEEDED
    return result


class _Earlier:
    final, failure = True, None

    def add(self, stage: list[Run], status: dict, failure: dict) -> None:
        self.final = self.final and all(status[run.key] in RUN_FINAL for run in stage)
        self.failure = self.failure or _first(failure[run.key] for run in stage)


def _first(*groups: Iterable[str | None]) -> str | None:
    return next((key for group in groups for key in group if key), None)


def _once(read: Callable[[], Mapping[str, str]]) -> Callable[[], Mapping[str, str]]:
    cache: list[Mapping[str, str]] = []

    def read_once() -> Mapping[str, str]:
        if not cache:
            cache.append(read())
        return cache[0]

    return read_once


def _fail_fast(by_job, matrices, status: dict, result: Plan) -> None:
    for job, group in by_job.items():
        if not matrices.get(job, MatrixRule()).fail_fast or len(group) < 2:
            continue
        failed = next((r for r in group if status[r.key] in ENDED_BADLY), None)
        if failed is None:
            continue
        reason = f"{FAIL_FAST}{failed.key!r} ended {status[failed.key]}"
        for run in group:
            if status[run.key] not in RUN_FINAL:
                result.cancel[run.key] = reason
                if status[run.key] != RunStatus.RUNNING:  # a running one ends on its agent
                    status[run.key] = RunStatus.CANCELED


def _stages_in_order(runs: list[Run], by_job) -> list[list[Run]]:
    """The runs stage by stage, each after the runs it needs."""
    sorter = graphlib.TopologicalSorter()
    for run in runs:
        needed = () if run.needs is None else (r.key for j in run.needs for r in by_job[j])
        sorter.add(run.key, *needed)
    position = {key: n for n, key in enumerate(sorter.static_order())}
    stages: dict[int, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda run: (run.stage, position[run.key])):
        stages[run.stage].append(run)
    return list(stages.values())


CANCELLED = "the build was cancelled"


def _after_cancel(run: Run, over: bool, waited, status, failure, read_variables, result) -> bool:
    """A cancelled build's run that has not started: True once its wait is over and its
    condition holds after the cancel (it starts, or goes on if queued); False while it waits
    for that, or once it is cancelled (in `result`)."""
    condition = conditions.stored(run.condition)
    explicit = bool(run.condition) and condition.calls_status  # always(), !success(), ...
    if explicit and not over:
        return False  # what it waits for is being stopped; then its condition decides
    if explicit:
        try:
            context = _context(run, waited, status, failure, read_variables, cancelled=True)
        except VariablesUnavailable as exc:
            result.cancel[run.key], status[run.key] = f"{CANCELLED}; {exc}", RunStatus.CANCELED
            return False
        if condition.evaluate(context):
            return True
    unless = f", and if: {run.condition} was false" if explicit else ""
    result.cancel[run.key], status[run.key] = CANCELLED + unless, RunStatus.CANCELED
    return False


def _context(run: Run, waited, status, failure, read_variables, cancelled=False):
    """What the run's condition sees, once its wait is over. Through `needs`, a skipped job
    stops what needs it (its default condition); a stage's skipped job does not stop the
    stages after it: it was not wanted, as a rule that does not match."""
    unmet = next((key for key in waited if status[key] != RunStatus.SUCCEEDED), None)
    condition = conditions.stored(run.condition)
    reads_vars = any(kind == "vars" for kind, _ in condition.names())
    return conditions.Context(
        failed=failure[run.key] is not None,
        cancelled=cancelled,
        skipped=unmet is not None,
        vars=read_variables() if reads_vars else {},
        matrix=run.matrix,
    )


def _skip_reason(run: Run, waited: list[str], status: dict, failure: dict, read_variables) -> str:
    """Why a run whose wait is over does not start ("" if it starts)."""
    upstream = failure[run.key]
    unmet = next((key for key in waited if status[key] != RunStatus.SUCCEEDED), None)
    condition = conditions.stored(run.condition)
    try:
        context = _context(run, waited, status, failure, read_variables)
    except VariablesUnavailable as exc:
        return str(exc)
    if condition.evaluate(context):
        return ""
    if run.condition and (condition.calls_status or not (upstream or unmet)):
        return f"if: {run.condition} was false"
    if unmet is None:  # without needs: an earlier stage failed
        return f"waited for the earlier stages, where {upstream!r} ended {status[upstream]}"
    if status[unmet] in RUN_FAILED:
        return f"needs {unmet!r}, which ended {status[unmet]}"
    after = f" after {upstream!r} ended {status[upstream]}" if upstream else ""
    return f"needs {unmet!r}, which was {status[unmet]}{after}"
