"""The soak (`make faults`): SOAK_BUILDS (1,000) builds of a seeded random mix of pipelines on
four agents, with steps failing on purpose, automatic step retries, a concurrency policy with
a queue and agent reuse; meanwhile random cancels, step retries and build retries, and one
agent SIGKILLed a third of the way in and restarted once it is found lost. At the end every
build is final, each ended as its plan and the actions taken on it say it must, no step
attempt ran twice, and no lease, lease wait or concurrency slot is left held.

Each build's plan is decided at trigger time through its variables: FAIL_AT names the step
that fails while its attempt is <= FAIL_TIMES. FAIL_TIMES <= the step's `retry:` is a flaky
step its automatic retries recover; FAIL_TIMES = retry + 1 fails its first run and passes on
any retry (step attempts only grow); 99 fails every run."""

import json
import os
import random
import time
from collections import Counter, defaultdict

import pytest

from tests.faults.stack import FINAL, RECORD, RUN_FINAL, assert_settled
from tests.support import wait_until

BUILDS = int(os.environ.get("SOAK_BUILDS", "1000"))
SEED = int(os.environ.get("SOAK_SEED", random.SystemRandom().randrange(2**31)))
WINDOW = 24  # builds live at once: work for four agents, few enough for cancels to hit steps
MAX_RETRIES = 2  # retry requests per build, so the soak ends
P_CANCEL, P_STEP_RETRY, P_BUILD_RETRY = 0.08, 0.07, 0.07  # per build triggered
LIVE = ["QUEUED", "RUNNING", "CANCELLING"]
# The documented refusals, by action: anything else (a 5xx, another status, no code) fails.
REFUSALS = {
    "trigger": {"PIPELINE_QUEUE_FULL"},
    "cancel": {"BUILD_ALREADY_FINISHED"},
    "step retry": {"STEP_NOT_RETRYABLE"},
    "build retry": {"BUILD_NOT_RETRYABLE", "PIPELINE_QUEUE_FULL"},
}
POLICY = ("soak-queue", 2, 6)  # name, max_running, queue_length
TAKES = {"variables": dict.fromkeys(["FAIL_AT", "FAIL_TIMES", "SLEEP", "RUNS"], "")}


def step(name: str, retry: int = 0, sleep: bool = False) -> dict:
    run = (
        f"{RECORD.format(name=name)};"
        f' if [ "$FAIL_AT" = {name} ] && [ "$CI_STEP_ATTEMPT" -le "$FAIL_TIMES" ]; then exit 1; fi'
    )
    return {"name": name, "run": run + ('; sleep "$SLEEP"' if sleep else ""), "retry": retry}


def job(key: str, *steps: dict, **extra) -> dict:
    return {"id": key, **extra, "steps": list(steps)}


# name -> definition (JSON is YAML) and how often it is triggered.
PIPELINES = {
    "soak-stages": (
        {
            "stages": [
                {"name": "build", "jobs": [
                    job("compile", step("compile.1"), step("compile.2", retry=1)),
                    job("lint", step("lint.1"))]},
                {"name": "test", "jobs": [
                    job("unit", step("unit.1", retry=2), step("unit.2")),
                    job("integ", step("integ.1", sleep=True))]},
                {"name": "deploy", "jobs": [job("ship", step("ship.1"))]},
            ]
        },
        0.35,
    ),
    "soak-reuse": (
        {
            "stages": [
                {"name": "build", "jobs": [
                    job("make", step("make.1", retry=1)), job("docs", step("docs.1"))]},
                {"name": "use", "jobs": [
                    job("use", step("use.1", retry=1), step("use.2", sleep=True), reuse="make")]},
            ]
        },
        0.25,
    ),
    "soak-queue": (
        {
            "concurrency": POLICY[0],
            "stages": [
                {"name": "one", "jobs": [
                    job("a", step("a.1", sleep=True)), job("b", step("b.1", retry=1))]},
                {"name": "two", "jobs": [job("c", step("c.1"))]},
            ],
        },
        0.2,
    ),
    "soak-sleepy": (
        {
            "stages": [
                {"name": "nap", "jobs": [job("nap", step("nap.1", sleep=True))]},
                {"name": "after", "jobs": [job("after", step("after.1", retry=1))]},
            ]
        },
        0.2,
    ),
}  # fmt: skip


def retries_of(definition: dict) -> dict[str, int]:
    return {
        s["name"]: s["retry"] for stage in definition["stages"] for j in stage["jobs"]
        for s in j["steps"]
    }  # fmt: skip


def plan(rng: random.Random, retries: dict[str, int]) -> tuple[str, dict]:
    """A build's kind (clean, flaky, transient, permanent) and the variables that make it."""
    roll, at = rng.random(), rng.choice(sorted(retries))
    flaky = sorted(name for name, r in retries.items() if r)
    if roll < 0.5:
        kind, at, times = "clean", "", 0
    elif roll < 0.65:
        at = rng.choice(flaky)
        kind, times = "flaky", rng.randint(1, retries[at])
    elif roll < 0.85:
        kind, times = "transient", retries[at] + 1
    else:
        kind, times = "permanent", 99
    sleep = rng.choice(["0.5", "1", "2"]) if rng.random() < 0.3 else "0"
    return kind, {"FAIL_AT": at, "FAIL_TIMES": str(times), "SLEEP": sleep}


class Soak:
    """Acts through the API as users would, and remembers what was accepted for each build."""

    def __init__(self, stack, seed: int):
        self.stack = stack
        self.mix, self.rng = random.Random(seed), random.Random(seed + 1)  # mix apart from timing
        self.outcomes: Counter = Counter()  # (action, "done" or the refusal's code)
        self.builds: dict[int, dict] = {}  # id -> pipeline, kind, variables, accepted actions
        self.retry_requests: Counter = Counter()
        self.window: tuple[float, float] | None = None  # the killed agent's downtime
        self.runs = stack.work / "runs.log"
        self.runs.touch()

    def call(self, action: str, method: str, path: str, body=None):
        try:
            status, answer = self.stack.api(method, path, body, timeout=30)
        except ValueError as exc:  # not JSON: no stable code either
            pytest.fail(f"{method} {path} answered something that is not JSON: {exc}")
        if status < 300:
            self.outcomes[action, "done"] += 1
            return answer
        code = answer.get("code") if isinstance(answer, dict) else None
        refused = (status, code in REFUSALS[action])
        assert refused == (409, True), f"{method} {path}: {status} {answer}"
        self.outcomes[action, code] += 1
        return None

    def accepted(self, build_id: int, action: str) -> None:
        self.builds[build_id]["acts"].append((action, time.monotonic()))

    def trigger(self, pipelines: dict) -> None:
        names = sorted(pipelines)
        name = self.mix.choices(names, [PIPELINES[n][1] for n in names])[0]
        pipeline_id, retries = pipelines[name]
        kind, variables = plan(self.mix, retries)
        body = {"variables": {**variables, "RUNS": str(self.runs)}}
        build = self.call("trigger", "POST", f"/api/pipelines/{pipeline_id}/builds/", body)
        if build:
            self.builds[build["id"]] = {"pipeline": name, "kind": kind, "vars": variables,
                                        "acts": [("trigger", time.monotonic())]}  # fmt: skip

    def pick(self, query: str, *args):
        rows = [r for r in self.stack.sql(query, *args) if self.retry_requests[r[0]] < MAX_RETRIES]
        return self.rng.choice(sorted(rows)) if rows else None

    def cancel(self) -> None:
        # Mostly a build with a job running (so its step is stopped), else any queued or running.
        live = "SELECT id FROM builds_build WHERE status IN ('QUEUED', 'RUNNING')"
        if self.rng.random() < 0.6:
            live = "SELECT DISTINCT build_id FROM builds_jobrun WHERE status = 'RUNNING'"
        live = self.stack.sql(live)
        if live:
            (build_id,) = self.rng.choice(sorted(live))
            if self.call("cancel", "POST", f"/api/builds/{build_id}/cancel/") is not None:
                self.accepted(build_id, "cancel")

    def retry_step(self) -> None:
        found = self.pick(
            "SELECT j.build_id, s.id FROM builds_steprun s JOIN builds_jobrun j ON j.id = s.job_id"
            " WHERE s.status = 'FAILED'"
        )
        if found:
            build_id, step_id = found
            self.retry_requests[build_id] += 1
            path = f"/api/builds/{build_id}/steps/{step_id}/retry/"
            if self.call("step retry", "POST", path) is not None:
                self.accepted(build_id, "step retry")

    def retry_build(self) -> None:
        failed_only = self.rng.random() < 0.7
        # Mostly failed or cancelled builds; now and then a SUCCEEDED one: run again in full,
        # or refused (BUILD_NOT_RETRYABLE) when only its failed jobs are asked for.
        statuses = ["SUCCEEDED"] if self.rng.random() < 0.15 else ["FAILED", "CANCELED"]
        found = self.pick("SELECT id FROM builds_build WHERE status = ANY(%s)", statuses)
        if found:
            (build_id,) = found
            self.retry_requests[build_id] += 1
            path = f"/api/builds/{build_id}/retry/"
            if self.call("build retry", "POST", path, {"failed_only": failed_only}) is not None:
                self.accepted(build_id, "build retry")

    def expected(self, build_id: int, tainted: set[int], running_at_kill: set[int]) -> set[str]:
        """The statuses build `build_id` may have ended with, from its plan and what was done
        to it. The kill makes the builds it touched less certain; so do cancels for a build
        whose failing step may or may not have run before it was cancelled."""
        build = self.builds[build_id]
        acts = [action for action, _ in build["acts"]]
        if acts[-1] == "cancel":  # CANCELLING only ever ends CANCELED
            return {"CANCELED"}
        if build_id in tainted:
            after_kill = [at for _, at in build["acts"] if at > self.window[0]]
            if build_id in running_at_kill and not after_kill:
                return {"FAILED"}  # its job on the agent was lost
            return {"SUCCEEDED", "FAILED"}
        kind, retried = build["kind"], {"step retry", "build retry"} & set(acts)
        if kind in ("clean", "flaky"):
            return {"SUCCEEDED"}
        if kind == "permanent":
            return {"FAILED"}
        if "cancel" in acts:  # transient: did its first run fail before the cancel?
            return {"SUCCEEDED", "FAILED"}
        return {"SUCCEEDED"} if retried else {"FAILED"}


@pytest.mark.timeout(3600)
def test_soak(soak_stack):
    stack, soak = soak_stack, Soak(soak_stack, SEED)
    print(f"\nsoak: {BUILDS} builds on {len(stack.AGENTS)} agents, SOAK_SEED={SEED}")
    stack.policy(*POLICY)
    pipelines = {
        name: (stack.pipeline(name, json.dumps(TAKES | definition)), retries_of(definition))
        for name, (definition, _) in PIPELINES.items()
    }
    governed = pipelines["soak-queue"][0]
    started = time.monotonic()
    killed = restarted = None
    running_at_kill: set[int] = set()
    tainted: set[int] = set()

    def lost(agent: str) -> bool:  # its running jobs were failed: restart it
        query = "SELECT count(*) FROM builds_jobrun WHERE agent = %s AND status = 'RUNNING'"
        assert time.monotonic() - soak.window[0] < 60, f"{agent} not found lost in 60 s"
        return stack.sql(query, agent)[0][0] == 0

    while len(soak.builds) < BUILDS:
        [(live, slots)] = stack.sql(
            "SELECT count(*) FILTER (WHERE status = ANY(%s)), count(*) FILTER (WHERE"
            " pipeline_id = %s AND (status = 'RUNNING' OR status = 'CANCELLING'"
            " AND started_at IS NOT NULL)) FROM builds_build",
            LIVE, governed,
        )  # fmt: skip
        assert slots <= POLICY[1], f"{slots} builds hold the policy's {POLICY[1]} slots"
        if killed is None and len(soak.builds) >= BUILDS // 3:
            killed, running_at_kill, tainted = kill_an_agent(stack, soak)
        if killed and not restarted and lost(killed):
            stack.restart(killed)
            restarted = time.monotonic()
            soak.window = (soak.window[0], restarted)
        if live >= WINDOW:
            time.sleep(0.05)  # pacing: let the agents catch up
            continue
        soak.trigger(pipelines)
        for chance, act in [(P_CANCEL, soak.cancel), (P_STEP_RETRY, soak.retry_step),
                            (P_BUILD_RETRY, soak.retry_build)]:  # fmt: skip
            if soak.rng.random() < chance:
                act()
    if not restarted:  # a short soak may end its triggers before the agent is found lost
        wait_until(lambda: lost(killed), timeout=60, interval=0.2, message=f"{killed} lost")
        stack.restart(killed)
        soak.window = (soak.window[0], time.monotonic())

    ids = sorted(soak.builds)
    statuses = stack.wait_final(ids, timeout=600)
    duration = time.monotonic() - started
    assert_settled(stack, soak.runs, timeout=120)  # no job/step live, no lease, no lease wait

    # The builds the kill touched: running on it or bound to it then, retried while it was
    # down (a retried job may be bound to it), or with a job failed for its loss.
    start, end = soak.window
    tainted |= {
        b for b, info in soak.builds.items()
        if any(a != "cancel" and start <= t <= end for a, t in info["acts"][1:])
    }  # fmt: skip
    named = "SELECT build_id FROM builds_jobrun WHERE reason LIKE %s OR reason LIKE %s"
    lost_jobs = stack.sql(named, f"%agent {killed} was lost%", f"%, {killed}, is gone%")
    tainted |= {b for (b,) in lost_jobs}

    # Counts add up: every build triggered is in the database, final, each status counted.
    by_status = Counter(statuses.values())
    in_db = stack.sql("SELECT status, count(*) FROM builds_build GROUP BY status")
    assert dict(in_db) == dict(by_status), (in_db, by_status)
    assert sum(by_status[s] for s in FINAL) == len(ids) == BUILDS
    # Each build ended as its plan and the accepted actions say.
    wrong, exact = {}, 0
    for build_id in ids:
        allowed = soak.expected(build_id, tainted, running_at_kill)
        exact += len(allowed) == 1
        if statuses[build_id] not in allowed:
            wrong[build_id] = (statuses[build_id], allowed, soak.builds[build_id])
    assert not wrong, describe(stack, wrong)
    # Every step that SUCCEEDED ran, as the attempt it is recorded as.
    recorded = set(soak.runs.read_text().splitlines())
    succeeded = stack.sql(
        "SELECT s.job_id || '/' || s.attempt || '/' || s.name FROM builds_steprun s"
        " WHERE s.status = 'SUCCEEDED'"
    )
    unrecorded = [line for (line,) in succeeded if line not in recorded]
    assert not unrecorded, f"SUCCEEDED steps that never ran: {unrecorded[:20]}"
    stopped = "SELECT count(*) FROM builds_steprun WHERE status = 'CANCELED'"
    stopped += " AND started_at IS NOT NULL"  # cancelled while running
    print(f"soak: {exact} of {len(ids)} builds had exactly one status to end with")
    summary(soak, by_status, duration, killed, tainted, len(recorded), stack.sql(stopped)[0][0])


def kill_an_agent(stack, soak: Soak) -> tuple[str, set[int], set[int]]:
    """SIGKILL an agent that runs a job now. Returns it, the builds running a job on it, and
    every build it touched: those and the live builds bound to it (a job that must run on it,
    by reuse or as a retried lease-taking job, or its lease)."""
    query = "SELECT agent FROM builds_jobrun WHERE status = 'RUNNING' ORDER BY agent"
    busy = wait_until(lambda: stack.sql(query), timeout=60, message="a job running")
    agent = soak.rng.choice(busy)[0]
    stack.kill(agent)
    soak.window = (time.monotonic(), float("inf"))
    running = stack.sql(
        "SELECT DISTINCT build_id FROM builds_jobrun WHERE agent = %s AND status = 'RUNNING'",
        agent,
    )
    bound = stack.sql(
        "SELECT DISTINCT j.build_id FROM builds_jobrun j WHERE NOT j.status = ANY(%s)"
        " AND (j.agent = %s OR EXISTS (SELECT 1 FROM builds_jobrun t WHERE"
        " t.build_id = j.build_id AND t.key = j.reuse_of AND t.agent = %s))"
        " UNION SELECT l.build_id FROM agents_agentlease l"
        " JOIN agents_agent a ON a.id = l.agent_id WHERE a.name = %s",
        list(RUN_FINAL), agent, agent, agent,
    )  # fmt: skip
    running_ids = {b for (b,) in running}
    print(f"soak: killed {agent} with {len(soak.builds)} builds triggered;"
          f" {len(running_ids)} running a job on it")  # fmt: skip
    return agent, running_ids, running_ids | {b for (b,) in bound}


def describe(stack, wrong: dict) -> str:
    lines = [f"{len(wrong)} builds ended otherwise than planned; logs in {stack.log_dir}"]
    for build_id, (status, allowed, info) in sorted(wrong.items())[:20]:
        jobs = stack.sql(
            "SELECT key, status, attempt, agent, reason FROM builds_jobrun WHERE build_id = %s"
            " ORDER BY id",
            build_id,
        )
        acts = [action for action, _ in info["acts"]]
        lines.append(f"build {build_id} {info['pipeline']} {info['kind']} {info['vars']}"
                     f" {acts}: {status}, expected {sorted(allowed)}; jobs {jobs}")  # fmt: skip
    return "\n".join(lines)


def summary(soak, by_status: Counter, duration: float, killed, tainted, records, stopped) -> None:
    per_action = defaultdict(dict)
    for (action, outcome), n in sorted(soak.outcomes.items()):
        per_action[action][outcome] = n
    kinds = Counter(info["kind"] for info in soak.builds.values())
    print(
        f"soak: {len(soak.builds)} builds in {duration:.0f} s"
        f" ({len(soak.builds) / duration * 60:.0f} builds/min), seed {SEED}"
        f"\n  final: {dict(sorted(by_status.items()))}"
        f"\n  planned: {dict(sorted(kinds.items()))}"
        f"\n  actions (done, or refused by code): {dict(per_action)}"
        f"\n  killed {killed}; builds it touched: {len(tainted)}"
        f"\n  step attempts run: {records}, of which stopped by a cancel: {stopped}"
        f"\n  5xx: 0; left at the end: no live build, job or step, no lease or lease wait"
    )
