"""Start-up checks: settings that would let a cut-off agent's steps outlive the moment the
server gives their slot away are refused, by every manage.py command (runagent included)."""

import os
import subprocess
import sys

from ciproject import checks


def test_the_defaults_keep_the_fencing_rule():
    assert checks.fencing_beats_the_lost_agent_timeout(None) == []


def test_a_fence_time_too_long_for_the_lost_agent_timeout_is_refused(settings):
    settings.AGENT_OFFLINE_AFTER_SECONDS = 30
    settings.STEP_KILL_GRACE_SECONDS = 10
    settings.AGENT_FENCE_SECONDS = 20  # 20 + 10 + 1 > 30
    assert [e.id for e in checks.fencing_beats_the_lost_agent_timeout(None)] == ["ciproject.E001"]
    settings.AGENT_FENCE_SECONDS = 19
    assert checks.fencing_beats_the_lost_agent_timeout(None) == []


def test_runagent_refuses_to_start_with_them():
    env = {**os.environ, "AGENT_OFFLINE_AFTER_SECONDS": "10", "STEP_KILL_GRACE_SECONDS": "10"}
    done = subprocess.run(
        [sys.executable, "manage.py", "runagent", "--name", "never", "--labels", "unit-tests"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ciproject.E001" in done.stderr
    assert "AGENT_FENCE_SECONDS (-1) + STEP_KILL_GRACE_SECONDS (10)" in done.stderr
