"""A job run in-process by the agent's executor, on the real database: whatever fails on the
agent after the job has started, the job ends (FAILED, naming the agent), never stays
RUNNING on an agent that goes on heartbeating."""

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from django.db import OperationalError, connection

from agents import services as agents
from agents.process import workspaces
from agents.process.agent import AgentProcess
from agents.process.executor import workspace_for
from builds import services as builds
from builds.models import JobRun
from tests.support import make_pipeline, one_step, process_alive, raw_connection, wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def agent(settings, tmp_path):
    settings.AGENT_WORKSPACE_ROOT = str(tmp_path / "workspaces")
    settings.AGENT_DB_RETRY_SECONDS = 0  # a failed write is given up at once
    agents.register_agent("a1", "host", ["unit-tests"], 1, "1")


def queued_job(run: str = "true") -> JobRun:
    pipeline = make_pipeline(f"p{JobRun.objects.count()}", one_step(run, runs_on="unit-tests"))
    build = builds.trigger_build(pipeline)
    return JobRun.objects.get(build=build)


def test_an_error_before_the_steps_fails_the_job_naming_the_agent(monkeypatch):
    def unreadable(build_id):
        raise RuntimeError("variables unreadable")

    monkeypatch.setattr(builds, "build_variables", unreadable)  # read in JobExecution()
    job = queued_job()
    assert AgentProcess("a1", ["unit-tests"]).run_job(job.pk, 1) == "FAILED"
    job.refresh_from_db()
    assert (job.status, job.reason) == (
        "FAILED",
        "agent error on a1: RuntimeError: variables unreadable",
    )
    assert job.steps.get().status == "SKIPPED"
    assert builds.advance_build(job.build_id) == "FAILED"  # the build moves on


def test_a_result_that_cannot_be_recorded_still_ends_the_job(monkeypatch):
    finish_job, calls = builds.finish_job, []

    def database_gone_once(*args):  # PostgreSQL is away beyond AGENT_DB_RETRY_SECONDS
        calls.append(args[1])
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return finish_job(*args)

    monkeypatch.setattr(builds, "finish_job", database_gone_once)
    job = queued_job()
    assert AgentProcess("a1", ["unit-tests"]).run_job(job.pk, 1) == "FAILED"
    assert calls == ["SUCCEEDED", "FAILED"]
    job.refresh_from_db()
    assert job.status == "FAILED"
    assert job.reason.startswith("agent error on a1: OperationalError: server closed")


def test_an_error_while_a_step_runs_kills_its_group_and_fails_the_job(
    monkeypatch, settings, tmp_path
):
    pid_file = tmp_path / "pid"
    append_log = builds.append_log

    def log_store_broken(*args):  # the step is running: its log cannot be written
        if pid_file.exists():
            raise RuntimeError("log store broken")
        return append_log(*args)

    monkeypatch.setattr(builds, "append_log", log_store_broken)
    settings.STEP_LOG_FLUSH_SECONDS = 0
    job = queued_job(f"sleep 600 & echo $! > {pid_file}; echo started; wait")
    assert AgentProcess("a1", ["unit-tests"]).run_job(job.pk, 1) == "FAILED"
    job.refresh_from_db()
    assert job.reason == "agent error on a1: RuntimeError: log store broken"
    assert job.steps.get().status == "FAILED"
    wait_until(
        lambda: not process_alive(int(pid_file.read_text())), timeout=5, message="group to die"
    )


def test_a_job_whose_end_was_never_recorded_is_ended_by_the_heartbeat(monkeypatch):
    finish_job = builds.finish_job

    def database_gone(*args):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(builds, "finish_job", database_gone)
    orphan = queued_job()
    a1 = AgentProcess("a1", ["unit-tests"])
    assert a1.run_job(orphan.pk, 1) == "FAILED"  # logged, not recorded
    orphan.refresh_from_db()
    assert orphan.status == "RUNNING"
    monkeypatch.setattr(builds, "finish_job", finish_job)  # the database is back

    running = builds.start_job(queued_job().pk, 1, "a1")
    with a1.tracking(running.pk, running.attempt):  # still running here: left alone
        assert a1.end_orphaned_jobs() == [orphan.pk]
    orphan.refresh_from_db()
    assert (orphan.status, orphan.reason) == (
        "FAILED",
        "agent error on a1: its end could not be recorded (see the agent's log)",
    )
    running.refresh_from_db()
    assert running.status == "RUNNING"


def running_in_a_thread(tmp_path):
    """A job whose step runs for ever on agent a1, started in a thread of its own (with its
    own connection, closed when the job ends): the agent, the job, the thread, the list the
    job's final status goes to, and the file holding the step's pid."""
    pid_file = tmp_path / "pid"
    job = queued_job(f"sleep 600 & echo $! > {pid_file}; wait")
    agent, ended = AgentProcess("a1", ["unit-tests"]), []

    def run():
        try:
            ended.append(agent.run_job(job.pk, 1))
        finally:
            connection.close()

    running = threading.Thread(target=run)
    running.start()
    wait_until(pid_file.exists, timeout=10, message="the step to start")
    return agent, job, running, ended, pid_file


@pytest.mark.django_db(transaction=True)  # the job runs in a thread of its own
def test_an_agent_cut_off_from_the_database_fences_itself(settings, tmp_path):
    """No heartbeat has reached the database for longer than AGENT_FENCE_SECONDS: the agent
    stops its running steps itself (before the server may give their slot away) and its job
    ends FAILED saying so."""
    settings.AGENT_FENCE_SECONDS = 5
    settings.STEP_KILL_GRACE_SECONDS = 1
    agent, job, running, ended, pid_file = running_in_a_thread(tmp_path)
    assert agent.check_fence() == []  # renewed just now: nothing is stopped
    agent.renewed_at -= 6  # as if no heartbeat had reached the database for 6 s
    assert agent.check_fence() == [(job.pk, 1)]
    running.join(timeout=15)
    assert ended == ["FAILED"]
    assert not process_alive(int(pid_file.read_text()))
    job.refresh_from_db()
    assert job.reason.startswith(
        "agent a1 fenced itself: no heartbeat reached the database for 6 s"
    ), job.reason
    assert job.steps.get().status == "CANCELED"


@pytest.mark.django_db(transaction=True)  # the job runs in a thread of its own
def test_a_job_the_server_ended_is_stopped_by_the_next_heartbeat(settings, tmp_path):
    """The server failed the job (its agent was taken for lost) and its stop message never
    arrived: the agent's heartbeat finds the job is no longer its own and stops its step."""
    settings.STEP_KILL_GRACE_SECONDS = 1
    agent, job, running, _, pid_file = running_in_a_thread(tmp_path)
    assert agent.stop_jobs_ended_elsewhere() == []  # still its own
    assert builds.fail_jobs_on_agent("a1", "agent a1 was lost: it stopped heartbeating") == [job.pk]
    assert agent.stop_jobs_ended_elsewhere() == [(job.pk, 1)]
    running.join(timeout=15)
    assert not running.is_alive()
    assert not process_alive(int(pid_file.read_text()))
    job.refresh_from_db()
    assert (job.status, job.reason) == ("FAILED", "agent a1 was lost: it stopped heartbeating")


@pytest.mark.django_db(transaction=True)  # the job runs in a thread of its own
def test_a_job_of_a_build_being_cancelled_is_stopped_by_the_next_heartbeat(settings, tmp_path):
    """The cancel's stop message never reached the agent (a broker cut, say): its heartbeat
    finds the job's build CANCELLING and stops the step, so the cancel ends on its own."""
    settings.STEP_KILL_GRACE_SECONDS = 1
    agent, job, running, ended, pid_file = running_in_a_thread(tmp_path)
    builds.request_cancel(job.build_id)  # no controller here: nothing else tells the agent
    assert agent.stop_jobs_ended_elsewhere() == [(job.pk, 1)]
    running.join(timeout=15)
    assert ended == ["CANCELED"]
    assert not process_alive(int(pid_file.read_text()))
    assert builds.advance_build(job.build_id) == "CANCELED"


def test_a_fenced_agent_takes_no_job(settings):
    """Its lease has lapsed (no heartbeat got through for AGENT_FENCE_SECONDS): a job sent to
    it goes back to its queue untouched, for an agent in touch with the server."""
    settings.AGENT_FENCE_SECONDS = 5
    agent, job = AgentProcess("a1", ["unit-tests"]), queued_job()
    agent.renewed_at -= 6
    assert agent.run_job(job.pk, 1) is None
    job.refresh_from_db()
    assert (job.status, job.agent) == ("QUEUED", "")


@pytest.mark.django_db(transaction=True)  # the heartbeat waits on another session's lock
def test_a_slow_heartbeat_renews_from_when_it_was_sent(settings):
    """The database records a heartbeat when it runs it, which may be long after it was sent
    (a slow link, a lock): the agent's lease counts from the sending, never later than the
    server's count."""
    agent = AgentProcess("a1", ["unit-tests"])
    agent.renewed_at = 0
    locked = threading.Event()

    def hold_the_agent_row():
        with raw_connection() as locker, locker.transaction():
            locker.execute("SELECT 1 FROM agents_agent WHERE name = 'a1' FOR UPDATE")
            locked.set()
            time.sleep(1)  # how long the heartbeat is held up

    holder = threading.Thread(target=hold_the_agent_row)
    holder.start()
    assert locked.wait(10)
    sent = time.monotonic()
    agent.beat()
    holder.join()
    assert time.monotonic() - sent >= 1  # it waited on the lock
    assert sent <= agent.renewed_at < sent + 0.5
    connection.close()


NEEDS_STEP_ZERO = """
variables: {FLAG: ""}
stages:
  - name: s
    jobs:
      - id: j
        runs-on: unit-tests
        steps:
          - run: echo made > out
          - run: cat out && test -f "$FLAG"
"""


def failed_then_retried(tmp_path):
    """Step 1 needs what step 0 left in the workspace, and fails the first time: the job
    fails on agent a1, then step 1 is retried. Returns the agent, the job and its steps."""
    build = builds.trigger_build(
        make_pipeline(f"ws{JobRun.objects.count()}", NEEDS_STEP_ZERO), {"FLAG": str(tmp_path / "f")}
    )
    job = JobRun.objects.get(build=build)
    agent = AgentProcess("a1", ["unit-tests"])
    assert agent.run_job(job.pk, 1) == "FAILED"
    assert builds.advance_build(build.pk) == "FAILED"
    (tmp_path / "f").touch()
    first, second = job.steps.order_by("index")
    builds.retry_step(build.pk, second.pk)
    return agent, job, first, second


def test_a_failed_jobs_workspace_is_kept_for_its_step_retry(tmp_path):
    """The agent keeps the failed job's workspace, the server knows where (the retry is sent
    there), and the retried step finds what step 0 made; step 0 does not run again."""
    agent, job, first, second = failed_then_retried(tmp_path)
    job.refresh_from_db()
    assert job.kept_workspace_on == "a1"
    assert agent.run_job(job.pk, 2) == "SUCCEEDED"
    job.refresh_from_db()
    assert (job.reason, job.kept_workspace_on) == ("", "")
    first.refresh_from_db()
    assert (first.status, first.attempt) == ("SUCCEEDED", 1)
    second.refresh_from_db()
    assert "made" in builds.step_log(second)
    assert not workspace_for("a1", job).exists()  # succeeded: removed


def test_a_kept_workspace_is_removed_when_its_time_is_up(settings, tmp_path):
    settings.AGENT_KEEP_FAILED_WORKSPACE_SECONDS = 60
    agent, job, *_ = failed_then_retried(tmp_path)
    kept = workspace_for("a1", job)
    assert workspaces.prune(agent.workspace_root) == []  # not yet
    assert (kept / "out").exists()
    assert workspaces.prune(agent.workspace_root, now=time.time() + 61) == [kept]
    assert not kept.exists()


def test_a_step_retry_whose_workspace_is_gone_reruns_the_job_from_its_first_step(tmp_path):
    """The kept workspace is gone (its time was up, or the retry ran elsewhere): step 0 runs
    again first, and the job and step 0's log say why; never does step 1 run without it."""
    agent, job, first, second = failed_then_retried(tmp_path)
    workspaces.prune(agent.workspace_root, now=time.time() + 10**6)

    assert agent.run_job(job.pk, 2) == "SUCCEEDED"
    job.refresh_from_db()
    assert job.reason.startswith("re-run from its first step: the workspace"), job.reason
    first.refresh_from_db()
    assert (first.status, first.attempt) == ("SUCCEEDED", 2)
    assert "re-run from its first step" in builds.step_log(first)
    second.refresh_from_db()
    assert "made" in builds.step_log(second)


def test_what_an_earlier_run_of_the_agent_left_is_adopted_then_pruned(tmp_path):
    root = tmp_path / "a1"
    (root / "build-7" / "j").mkdir(parents=True)
    (root / ".steps").mkdir()
    assert workspaces.adopt(root, 60) == [root / "build-7" / "j"]
    assert workspaces.adopt(root, 60) == []  # kept already
    assert workspaces.prune(root) == []
    assert workspaces.prune(root, now=time.time() + 61) == [root / "build-7" / "j"]
    assert not (root / "build-7").exists()
    assert (root / ".steps").exists()


def as_unprivileged(function, *args) -> int:
    """Run `function(*args)` as `nobody` when the tests run as root (root ignores permission
    bits, an agent running as a plain user does not); returns its exit status."""
    if os.geteuid() != 0:
        function(*args)
        return 0
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, do it, leave without running pytest's exit
        try:
            os.setgid(65534)
            os.setuid(65534)
            function(*args)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def open_tmp():
    """A folder an unprivileged user may reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ciproject-ws-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_workspace_is_removed_whatever_its_steps_made_read_only(open_tmp):
    """What a step leaves: a read-only folder with files in it, a read-only file, a folder
    nobody may enter. All of it goes with the workspace, and the build's folder after it."""
    owner = 65534 if os.geteuid() == 0 else os.geteuid()
    build = open_tmp / "agent" / "build-1"
    workspace = build / "j"
    (workspace / "sub").mkdir(parents=True)
    (workspace / "sub" / "made").write_text("x")
    (workspace / "locked").mkdir()
    (workspace / "locked" / "inside").write_text("x")
    (workspace / "ro.txt").write_text("x")
    for path in [open_tmp, open_tmp / "agent", build, *build.rglob("*")]:
        os.chown(path, owner, owner)
    (workspace / "ro.txt").chmod(0o444)
    (workspace / "sub").chmod(0o555)
    (workspace / "locked").chmod(0o000)
    assert as_unprivileged(workspaces.remove, workspace) == 0
    assert not build.exists()
