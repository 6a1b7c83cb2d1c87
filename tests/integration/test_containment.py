"""Containment with real agents (`manage.py runagent` processes): the limits a pipeline sets,
steps run as another user, an agent that cannot keep a promise refusing to start, and a
cancel in each containment mode ending every process the step started."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from builds import services
from builds.models import JobRun
from tests.processes import ROOT
from tests.support import make_pipeline, process_alive, wait_for_build, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def pipeline_of(name: str, run: str, runs_on: str = "linux", **options: str):
    """One job `j` of one step running the script `run`, with step options (max-memory)."""
    lines = "".join(
        f"            {key.replace('_', '-')}: {value}\n" for key, value in options.items()
    )
    script = textwrap.indent(textwrap.dedent(run).strip(), " " * 14)
    definition = (
        "stages:\n  - name: s\n    jobs:\n"
        f"      - id: j\n        runs-on: {runs_on}\n        steps:\n"
        f"          - run: |\n{script}\n{lines}"
    )
    return make_pipeline(name, definition)


@pytest.mark.usefixtures("workers")
def test_a_step_over_its_max_memory_fails_saying_the_oom_killer_ended_it():
    grow = f"{sys.executable} -c 'b = bytearray(400 * 1024 ** 2)'\necho survived"
    build = services.trigger_build(pipeline_of("oom", grow, max_memory="64M"))
    assert wait_for_build(build).status == "FAILED"
    job = JobRun.objects.get(build=build)
    said = "killed by the kernel's OOM killer: over its max-memory of 64 MiB"
    assert job.reason == f"step 'step 1' ended FAILED: {said}"
    log = services.step_log(job.steps.get())
    assert said in log
    assert "survived" not in log


@pytest.mark.usefixtures("workers")
def test_a_step_within_its_limits_succeeds():
    build = services.trigger_build(
        pipeline_of(
            "within", "for i in 1 2 3; do true & done; wait", max_processes=50, max_memory="256M"
        )
    )
    assert wait_for_build(build).status == "SUCCEEDED"


@pytest.fixture
def reachable_root():
    """A workspace root every user can reach (pytest's own temporary folders are root's)."""
    root = Path(tempfile.mkdtemp(prefix="ciproject-step-user-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


def test_a_step_run_as_another_user_cannot_read_the_agents_secrets(
    dedicated, workers, reachable_root
):
    secret = f"agent-secret-{secrets.token_hex(8)}"
    settings_file = reachable_root / "agent.env"  # as /etc/ciproject/*.env: the agent's alone
    settings_file.write_text(f"SECRET_KEY={secret}\n")
    settings_file.chmod(0o600)
    env = {"AGENT_WORKSPACE_ROOT": str(reachable_root / "ws"), "SECRET_KEY": secret}
    dedicated("agent-user", "as-user", env=env, args=["--step-user", "nobody"])
    agent = workers.procs["agent-user"].pid
    run = f"""
        id -un
        echo made > file && cat file
        echo "parent: $PPID"
        cat /proc/$PPID/environ || echo "environ: denied"
        cat {settings_file} || echo "settings: denied"
        ls /proc/$PPID/fd > /dev/null || echo "fds: denied"
        tr '\\0' '\\n' < /proc/self/environ | cut -d= -f1 | sort | tr '\\n' ' '
    """
    build = services.trigger_build(pipeline_of("as-user", run, runs_on="as-user"))
    assert wait_for_build(build).status == "SUCCEEDED"
    log = services.step_log(JobRun.objects.get(build=build).steps.get())
    assert log.splitlines()[:3] == ["nobody", "made", f"parent: {agent}"]  # the agent's child
    for denied in ("environ", "settings", "fds"):
        assert f"{denied}: denied" in log
    assert secret not in log
    assert "SECRET_KEY" not in log
    assert "DATABASE_URL" not in log


def runagent(worker_env, *args, env=None):
    return subprocess.run(
        [sys.executable, "manage.py", "runagent", "--name", "refusing", *args],
        cwd=ROOT,
        env={**worker_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_agent_that_cannot_enforce_its_default_limits_refuses_to_start(worker_env, tmp_path):
    result = runagent(
        worker_env, env={"AGENT_STEP_MAX_MEMORY": "512M", "AGENT_CGROUP_ROOT": str(tmp_path)}
    )
    assert result.returncode != 0
    assert "AGENT_STEP_MAX_*: max-memory: this agent cannot enforce it" in result.stderr


def test_an_agent_whose_step_user_cannot_reach_the_workspaces_refuses_to_start(
    worker_env, tmp_path
):
    os.chmod(tmp_path, 0o700)  # nobody cannot reach a workspace below
    result = runagent(
        worker_env, "--step-user", "nobody", env={"AGENT_WORKSPACE_ROOT": str(tmp_path / "ws")}
    )
    assert result.returncode != 0
    assert "--step-user nobody: a step could not run as that user" in result.stderr


def test_an_unknown_step_user_is_refused(worker_env):
    result = runagent(worker_env, "--step-user", "no-such-user-here")
    assert result.returncode != 0
    assert "--step-user 'no-such-user-here': no such user on this machine" in result.stderr


@pytest.mark.parametrize("mode", ["cgroup v2", "process group and step token"])
def test_a_cancel_ends_what_the_step_started_however_it_detached(
    dedicated, workers, tmp_path, mode
):
    name = "agent-cg" if mode == "cgroup v2" else "agent-token"
    # A folder that is no cgroup makes the agent fall back.
    dedicated(name, name, env={} if mode == "cgroup v2" else {"AGENT_CGROUP_ROOT": str(tmp_path)})
    assert f"steps are contained by {mode}" in (workers.log_dir / f"{name}.log").read_text()
    pids = tmp_path / "pids"
    run = f"""
        setsid sleep 600 & echo $! >> {pids}
        nohup sh -c 'sleep 600' > /dev/null 2>&1 & echo $! >> {pids}
        sh -c 'setsid sh -c "sleep 600 & echo \\$! >> {pids}" &'
        sleep 600
    """
    build = services.trigger_build(pipeline_of(f"detach-{name}", run, runs_on=name))
    wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 3, timeout=30)
    started = [int(pid) for pid in pids.read_text().split()]
    services.request_cancel(build.pk)
    assert wait_for_build(build).status == "CANCELED"
    assert [pid for pid in started if process_alive(pid)] == []
