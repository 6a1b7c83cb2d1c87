"""The agent process's own threads, on the real database: its heartbeats and its shutdown."""

import threading
import time

import pytest

from agents import services, worker


@pytest.mark.django_db(transaction=True)  # the heartbeat thread has its own connection
def test_a_heartbeat_in_flight_at_shutdown_does_not_bring_the_agent_back(monkeypatch, settings):
    settings.AGENT_HEARTBEAT_SECONDS = 0.01
    services.register_agent("a1", "host", ["unit-tests"], 1, "1")
    monkeypatch.setattr(worker, "_me", worker.Identity("a1", "a1@host", pool_queues=[]))
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
    stop = threading.Event()
    beats = threading.Thread(target=worker._heartbeat_loop, args=(lambda: None, stop))
    beats.start()
    try:
        assert in_flight.wait(10), "no heartbeat"
        worker.shut_down("a1", stop, beats)
    finally:
        stop.set()
        beats.join(10)  # a beat still in flight lands now
    assert services.status_of("a1") == "offline"
