"""The agent process's own state and threads: the attempts it tracks, its heartbeats and its
shutdown (the heartbeat tests on the real database)."""

import threading
import time

import pytest
from celery.worker.control import Panel

import agents.tasks  # noqa: F401  (what a worker's task autodiscovery imports)
from agents import services
from agents.process import control
from agents.process.agent import AgentProcess
from ciproject.protocol import REVOKE_JOBS, STOP_JOB, SYNC_CONSUMERS


def test_a_stop_reaches_the_running_attempt_even_after_a_duplicate_delivery_ended():
    agent = AgentProcess("a1", ["unit-tests"])
    with agent.tracking(7, 2) as running:
        with agent.tracking(7, 2):  # a duplicate message, fenced off, ends at once
            pass
        assert not agent.request_stop(7, 1)  # another attempt: nothing stops
        assert not running.is_set()
        assert agent.request_stop(7, 2)
        assert running.is_set()
    assert not agent.request_stop(7, 2)  # gone once the real run ends


@pytest.mark.django_db(transaction=True)  # the heartbeat thread has its own connection
def test_a_heartbeat_in_flight_at_shutdown_does_not_bring_the_agent_back(monkeypatch, settings):
    settings.AGENT_HEARTBEAT_SECONDS = 0.01
    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    agent = AgentProcess("a1", labels=[])  # no shared queues to follow
    heartbeat, in_flight = services.heartbeat, threading.Event()

    def slow_heartbeat(name):
        """A beat that reaches the database late: after the agent is marked offline, if it
        is (else after 2 s)."""
        in_flight.set()
        deadline = time.monotonic() + 2
        while services.status_of(name) != "offline" and time.monotonic() < deadline:
            time.sleep(0.01)
        return heartbeat(name)

    monkeypatch.setattr(services, "heartbeat", slow_heartbeat)
    agent.beats.start()
    try:
        assert in_flight.wait(10), "no heartbeat"
        agent.shut_down()
    finally:
        agent.stopping.set()
        agent.beats.join(10)  # a beat still in flight lands now
    assert services.status_of("a1") == "offline"


def test_every_worker_that_imports_the_tasks_knows_the_agent_commands(monkeypatch):
    """The controller hears the server's broadcasts too: without the commands it would log
    a KeyError for each. With no agent installed they stop nothing; once an agent installs
    itself, they reach its attempts."""
    commands = {name: Panel.data.get(name) for name in (STOP_JOB, REVOKE_JOBS, SYNC_CONSUMERS)}
    assert all(commands.values()), commands
    monkeypatch.setattr(control, "_agent", None)
    assert commands[STOP_JOB](None, job_id=7, attempt=1) == {"ok": False}
    agent = AgentProcess("a1", ["unit-tests"])
    control.install(agent)
    with agent.tracking(7, 1) as running:
        assert commands[STOP_JOB](None, job_id=7, attempt=1) == {"ok": True}
        assert running.is_set()
