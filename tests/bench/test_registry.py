"""The agent registry with 1,000 agents (`make bench`): the lost-agent sweep
(agents.services.mark_lost_agents, what the beat task agents.tasks.mark_lost_agents runs
every AGENT_SWEEP_SECONDS) and heartbeats (agents.services.heartbeat), as service calls, no
worker processes.

The 1,000 agents are registered through agents.services.register_agent, as agent processes
register (its time per agent is printed); RUNNING of them run a job each (started through
the build services), none of them among the stale ones. WRITERS threads, each on its own
database connection, beat their share of the agents at the rate AGENT_HEARTBEAT_SECONDS
implies, throughout. Printed:

- heartbeat latency p50/p99/max and writes/s, with the writers alone for HEARTBEAT_PHASE s,
  and while the sweeps below run;
- the sweep's time p50/p99/max over SWEEPS runs: all agents fresh; STALE of them stale (so
  it has work: they go offline; they are made fresh again between runs); STALE left
  offline (agents gone for good, which every later sweep meets again). Reference, measured
  in the same run before the 1,000 are registered: the same sweeps with REFERENCE agents
  (1 stale, 1 offline). Target: under 50 ms with 1,000 agents.
- the queries of one sweep of each kind (CaptureQueriesContext), grouped by statement with
  their time, and EXPLAIN (ANALYZE, BUFFERS) of its main statement with STALE agents stale
  (in a transaction rolled back).

Timings are printed, never asserted; what is asserted is that each sweep did its work."""

import re
import statistics
import threading
import time
from collections import defaultdict

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from agents import services
from agents.models import Agent, AgentStatus
from builds import services as builds
from builds.models import JobRun
from tests.support import make_pipeline, one_step, wait_until

AGENTS = 1000
REFERENCE = 10
STALE = 100
RUNNING = 100  # agents running a job (all fresh)
WRITERS = 8
HEARTBEAT_PHASE = 10  # s, writers alone
SWEEPS = 30
SWEEP_GAP = 0.05  # s between two sweeps of a series, for the writers to get a look in
LABEL = "bench-registry"  # no agent process serves it: the jobs' messages are never run


def percentiles(values_ms) -> str:
    values_ms = sorted(values_ms)
    p99 = values_ms[max(0, int(len(values_ms) * 0.99) - 1)]
    return (
        f"p50 {statistics.median(values_ms):.1f} ms, p99 {p99:.1f} ms, max {values_ms[-1]:.1f} ms"
    )


class Heartbeats:
    """WRITERS threads beating `names`, each agent once per AGENT_HEARTBEAT_SECONDS, a
    thread's agents spread evenly over the period; agents in `silent` are skipped. Each
    beat's latency is recorded under the current `phase`."""

    def __init__(self, names: list[str], phase: str):
        self.names = names
        self.silent: set[str] = set()
        self.phase = phase
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.spans: dict[str, list[float]] = {}  # phase: [first start, last end]
        self.behind = 0  # beats that started later than their schedule by a period or more
        self.errors: list[BaseException] = []
        self._beating: set[str] = set()  # agents whose beat is on its way
        self._guard = threading.Condition()  # over `silent` and `_beating`
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, args=(n, names[n::WRITERS]), daemon=True)
            for n in range(WRITERS)
        ]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self.errors:
            raise self.errors[0]

    def _write(self, n: int, share: list[str]) -> None:
        period = settings.AGENT_HEARTBEAT_SECONDS
        interval = period / len(share)
        next_at = time.monotonic() + interval * n / WRITERS
        try:
            while not self._stop.is_set():
                for name in share:
                    delay = next_at - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                    if -delay >= period:
                        self.behind += 1
                    next_at += interval
                    with self._guard:
                        if name in self.silent:
                            continue
                        self._beating.add(name)
                    phase = self.phase
                    started = time.perf_counter()
                    try:
                        status = services.heartbeat(name)
                    finally:
                        with self._guard:
                            self._beating.discard(name)
                            self._guard.notify_all()
                    ended = time.perf_counter()
                    assert status == AgentStatus.ONLINE, (name, status)
                    self.latencies[phase].append((ended - started) * 1000)
                    span = self.spans.setdefault(phase, [started, ended])
                    span[0], span[1] = min(span[0], started), max(span[1], ended)
        except BaseException as exc:  # shown by __exit__
            self.errors.append(exc)
        finally:
            connection.close()  # this thread's own connection

    def silence(self, names: list[str]) -> None:
        """The writers leave `names` (only) alone from now on, once a beat of theirs already
        on its way has landed."""
        with self._guard:
            self.silent = set(names)
            landed = self._guard.wait_for(lambda: not self._beating & self.silent, timeout=30)
        assert landed, f"beats of {sorted(self._beating & self.silent)} still on their way"

    def report(self, phase: str) -> str:
        values = self.latencies.get(phase)
        if not values:
            return f"heartbeats, {phase}: none"
        first, last = self.spans[phase]
        return (
            f"heartbeats, {phase}: {len(values)} beats, {len(values) / (last - first):.0f}"
            f" writes/s, latency {percentiles(values)}"
        )


def go_silent(names: list[str]) -> None:
    """Their last heartbeat older than the timeout, by the database's clock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE agents_agent SET last_heartbeat = statement_timestamp()"
            " - make_interval(secs => %s) WHERE name = ANY(%s)",
            [settings.AGENT_OFFLINE_AFTER_SECONDS + 30, names],
        )


def come_back(names: list[str]) -> None:
    """Fresh and online again, as their next heartbeats would make them."""
    for name in names:
        assert services.heartbeat(name) == AgentStatus.ONLINE


def sweep_once(expected: int) -> float:
    started = time.perf_counter()
    lost = services.mark_lost_agents()
    elapsed = (time.perf_counter() - started) * 1000
    assert len(lost) == expected, lost
    return elapsed


def sweeps(beats: Heartbeats, phase: str, stale: list[str], expected: int) -> list[float]:
    """SWEEPS sweeps, with `stale` agents made stale before each one (silent meanwhile)
    and fresh again after it; `expected`: how many each must find lost."""
    beats.silence(stale)
    beats.phase = phase
    times = []
    for _ in range(SWEEPS):
        go_silent(stale)
        times.append(sweep_once(expected))
        if expected:
            come_back(stale)
        time.sleep(SWEEP_GAP)
    beats.silence([])
    return times


def shape(sql: str) -> str:
    """A statement with its literals and parameters taken out, to group the same ones."""
    sql = re.sub(r"'[^']*'", "?", sql)
    sql = re.sub(r"\b\d+\b", "N", sql)
    return re.sub(r'"agents_|"builds_', '"', sql)


def queries_of(run) -> str:
    """The queries run() makes on this thread's connection (CaptureQueriesContext), grouped
    by statement, the costliest first: how many, and how long from execute to its return
    (timed here: the captured times are rounded to the ms; BEGIN and COMMIT, which are no
    execute, with those); and run()'s whole time."""
    groups = defaultdict(lambda: [0, 0.0])

    def timed(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            group = groups[shape(sql)]
            group[0] += 1
            group[1] += (time.perf_counter() - started) * 1000

    with CaptureQueriesContext(connection) as captured, connection.execute_wrapper(timed):
        started = time.perf_counter()
        run()
        elapsed = (time.perf_counter() - started) * 1000
    in_database = sum(total for _, total in groups.values())
    unseen = defaultdict(lambda: [0, 0.0])  # BEGIN, COMMIT: no execute, captured only
    for query in captured.captured_queries:
        if re.match(r"(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b", query["sql"]):
            group = unseen[f"{shape(query['sql'])} (captured time, rounded to the ms)"]
            group[0] += 1
            group[1] += float(query["time"]) * 1000
    in_database += sum(total for _, total in unseen.values())
    groups.update(unseen)
    lines = [
        f"      {count:5d} x, {total:6.1f} ms: {sql[:140]}"
        for sql, (count, total) in sorted(groups.items(), key=lambda item: -item[1][1])
    ]
    return (
        f"{len(captured)} queries, {elapsed:.1f} ms, of which {in_database:.1f} ms in the"
        f" statements (the rest: Python, the ORM, waiting for the GIL)\n" + "\n".join(lines)
    )


def explain_main_statement() -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the sweep's first statement, its one UPDATE, as
    mark_lost_agents runs it (taken from a sweep, both in transactions rolled back: ANALYZE
    executes it)."""
    statements = []

    def record(execute, sql, params, many, context):
        statements.append((sql, params))
        return execute(sql, params, many, context)

    with transaction.atomic(), connection.execute_wrapper(record):
        services.mark_lost_agents()
        transaction.set_rollback(True)
    sql, params = statements[0]
    assert sql.startswith("UPDATE agents_agent"), sql
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)
        plan = "\n".join(f"      {row[0]}" for row in cursor.fetchall())
        transaction.set_rollback(True)
    return plan


def postgres_up_seconds() -> float:
    with connection.cursor() as cursor:
        cursor.execute("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
        return float(cursor.fetchone()[0])


def register(first: int, last: int) -> list[str]:
    names = [f"bench-agent-{n:04d}" for n in range(first, last)]
    for name in names:
        services.register_agent(name, f"host-{name}", ["linux", LABEL], 2, "bench")
    return names


def start_running_jobs(agents: list[str]) -> None:
    """A job RUNNING on each of `agents`, as an agent's start of it records."""
    pipeline = make_pipeline("bench-registry", one_step("sleep 600", runs_on=LABEL))
    for agent in agents:
        build = builds.trigger_build(pipeline)
        job = builds.start_job(JobRun.objects.get(build=build).pk, 1, agent)
        step = job.steps.get()
        step.job = job
        assert builds.start_step(step)


def measure(beats: Heartbeats, stale: list[str], label: str) -> dict[str, list[float]]:
    """The three series of sweeps while `beats` runs: all fresh, `stale` going offline,
    `stale` left offline."""
    result = {
        "all fresh": sweeps(beats, f"{label}, sweeps, all fresh", [], 0),
        f"{len(stale)} stale (going offline)": sweeps(
            beats, f"{label}, sweeps, {len(stale)} going offline", stale, len(stale)
        ),
    }
    beats.silence(stale)
    go_silent(stale)
    sweep_once(len(stale))  # now offline, and silent for good
    result[f"{len(stale)} left offline"] = sweeps(
        beats, f"{label}, sweeps, {len(stale)} left offline", stale, 0
    )
    come_back(stale)
    return result


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_lost_agent_sweep_and_heartbeats_with_1000_agents():
    # Silence counts from PostgreSQL's start at the latest (mark_lost_agents): a freshly
    # started one takes no agent for lost yet.
    wait_until(
        lambda: postgres_up_seconds() > settings.AGENT_OFFLINE_AFTER_SECONDS + 30,
        timeout=settings.AGENT_OFFLINE_AFTER_SECONDS + 60,
        interval=1,
        message="PostgreSQL to have been up long enough for an agent to be lost",
    )
    period = settings.AGENT_HEARTBEAT_SECONDS

    # The reference: REFERENCE agents, beaten as the 1,000 will be.
    reference_names = register(0, REFERENCE)
    with Heartbeats(reference_names, "10 agents, warm-up") as beats:
        time.sleep(period / 2)
        reference = measure(beats, reference_names[-1:], f"{REFERENCE} agents")

    started = time.perf_counter()
    names = reference_names + register(REFERENCE, AGENTS)
    registered = (time.perf_counter() - started) * 1000 / (AGENTS - REFERENCE)
    assert Agent.objects.filter(status=AgentStatus.ONLINE).count() == AGENTS
    stale = names[-STALE:]
    start_running_jobs(names[:RUNNING])

    # Without writers: one sweep of each kind, its queries.
    fresh_queries = queries_of(lambda: sweep_once(0))
    go_silent(stale)
    plan = explain_main_statement()
    stale_queries = queries_of(lambda: sweep_once(STALE))
    offline_queries = queries_of(lambda: sweep_once(0))
    come_back(stale)

    with Heartbeats(names, "writers alone") as beats:
        time.sleep(HEARTBEAT_PHASE)
        beats.silence(stale)
        go_silent(stale)
        stale_with_writers = queries_of(lambda: sweep_once(STALE))
        come_back(stale)
        measured = measure(beats, stale, f"{AGENTS} agents")

    print(
        f"\nagent registry, {AGENTS} agents ({RUNNING} running a job), {WRITERS} heartbeat"
        f" writer threads at AGENT_HEARTBEAT_SECONDS={period} ({AGENTS / period:.0f} beats/s"
        f" implied, {(AGENTS - STALE) / period:.0f} while {STALE} are silent),"
        f" AGENT_OFFLINE_AFTER_SECONDS={settings.AGENT_OFFLINE_AFTER_SECONDS}"
        f"\n  registration (register_agent, {AGENTS - REFERENCE} agents one after another):"
        f" {registered:.1f} ms per agent"
    )
    for phase in beats.latencies:
        print(f"  {beats.report(phase)}")
    print(f"  beats started a period or more behind their schedule: {beats.behind}")
    print(f"  sweep (mark_lost_agents), {SWEEPS} runs each, writers on; target < 50 ms:")
    for (kind, times), (reference_kind, reference_times) in zip(
        measured.items(), reference.items(), strict=True
    ):
        print(
            f"    {AGENTS} agents, {kind}: {percentiles(times)}\n      reference,"
            f" {REFERENCE} agents, {reference_kind}: {percentiles(reference_times)}"
        )
    print(
        f"  one sweep, {AGENTS} agents, all fresh, no writers: {fresh_queries}"
        f"\n  one sweep, {STALE} going offline, no writers: {stale_queries}"
        f"\n  one sweep, {STALE} going offline, writers on: {stale_with_writers}"
        f"\n  the next sweep, {STALE} left offline, no writers: {offline_queries}"
        f"\n  EXPLAIN (ANALYZE, BUFFERS) of its UPDATE, {STALE} of {AGENTS} stale:\n{plan}"
    )
