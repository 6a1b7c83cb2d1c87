"""Artifacts on real agents and a real web: files a job makes on one build node reach the jobs
that need it on another, with a workspace root of its own, through the server only; a
download whose bytes were corrupted in storage is refused; `artifacts: false` opts out; a
`required` pattern that matches nothing fails its job, naming the pattern."""

import hashlib
import re
from pathlib import Path

import pytest

from artifacts.models import Artifact
from builds import services
from builds.models import JobRun, StepRun
from tests.support import make_pipeline, wait_for_build, wait_until

pytestmark = [pytest.mark.usefixtures("workers"), pytest.mark.django_db(transaction=True)]

# What the producing step writes, known here so the consuming step can check its sha256.
WHEEL = "".join(f"{n}\n" for n in range(1, 20001)).encode()
WHEEL_SHA = hashlib.sha256(WHEEL).hexdigest()
MAKES = (
    "mkdir -p dist reports/unit && seq 1 20000 > dist/app.whl"
    " && echo ok > reports/unit/junit.xml && echo scratch > notes.txt"
)


def by_key(build) -> dict[str, JobRun]:
    return {job.key: job for job in build.jobs.all()}


def log_of(build, job: str) -> str:
    steps = StepRun.objects.filter(job__build=build, job__key=job).order_by("index")
    return "".join(services.step_log(step, step.attempt) for step in steps)


def test_artifacts_reach_a_needing_job_on_another_agent_with_another_workspace_root(
    dedicated, tmp_path, worker_env
):
    root = tmp_path / "elsewhere-workspaces"
    dedicated("agent-elsewhere", "elsewhere", env={"AGENT_WORKSPACE_ROOT": str(root)})
    definition = f"""
stages:
  - name: build
    jobs:
      - id: make
        runs-on: default
        artifacts: {{paths: [dist/*.whl, "reports/**"], expire-in: 2d}}
        steps:
          - {{name: makes, run: "{MAKES}"}}
  - name: use
    jobs:
      - id: use
        runs-on: elsewhere
        needs: [make]
        steps:
          - name: checks
            run: >-
              pwd && test "$(sha256sum dist/app.whl | cut -c1-64)" = {WHEEL_SHA}
              && cat reports/unit/junit.xml && test ! -e notes.txt
      - id: optout
        runs-on: elsewhere
        needs: [make]
        artifacts: false
        steps:
          - {{name: none, run: 'test ! -e dist/app.whl && echo "nothing here"'}}
"""
    build = wait_for_build(services.trigger_build(make_pipeline("carries", definition)), 90)
    jobs = by_key(build)
    assert build.status == "SUCCEEDED", [(j.key, j.status, j.reason) for j in jobs.values()]
    assert jobs["use"].agent == "agent-elsewhere"
    assert jobs["make"].agent != "agent-elsewhere"
    made = {a.path: a for a in Artifact.objects.filter(build=build)}
    assert sorted(made) == ["dist/app.whl", "reports/unit/junit.xml"]
    wheel = made["dist/app.whl"]
    assert (wheel.job.key, wheel.attempt, wheel.size, wheel.sha256) == (
        "make", 1, len(WHEEL), WHEEL_SHA,
    )  # fmt: skip
    assert (wheel.expires_at - wheel.created_at).total_seconds() == pytest.approx(2 * 86400, abs=5)
    stored = Path(worker_env["ARTIFACTS_ROOT"]) / wheel.stored_as
    assert stored.read_bytes() == WHEEL
    assert "[ciproject] uploaded 2 artifacts" in log_of(build, "make")
    use = log_of(build, "use")
    assert "[ciproject] downloaded 2 artifacts" in use
    assert str(root) in use  # its workspace is under the other agent's root
    assert "nothing here" in log_of(build, "optout")


def test_a_download_corrupted_in_storage_is_refused(worker_env, tmp_path):
    gate = tmp_path / "go"
    definition = f"""
stages:
  - name: build
    jobs:
      - id: make
        artifacts: {{paths: [dist/app.whl]}}
        steps:
          - {{name: makes, run: "{MAKES}"}}
      - id: hold
        steps:
          - {{name: waits, run: 'until [ -e {gate} ]; do sleep 0.1; done'}}
  - name: use
    jobs:
      - id: use
        steps:
          - {{name: never, run: 'echo ran'}}
"""
    build = services.trigger_build(make_pipeline("corrupted", definition))
    wait_until(lambda: Artifact.objects.filter(build=build).exists(), 60, message="the upload")
    stored = Path(worker_env["ARTIFACTS_ROOT"]) / Artifact.objects.get(build=build).stored_as
    stored.write_bytes(WHEEL.replace(b"777", b"666"))  # same size, other bytes
    gate.touch()
    build = wait_for_build(build, 60)
    use = by_key(build)["use"]
    assert (build.status, use.status) == ("FAILED", "FAILED")
    assert use.reason.startswith("artifacts: dist/app.whl")
    assert "do not match the sha256 recorded at its upload" in use.reason
    assert StepRun.objects.get(job=use).status != "SUCCEEDED"  # no step ran with bad inputs


def test_a_required_pattern_that_matches_nothing_fails_the_job_naming_it():
    definition = """
stages:
  - name: build
    jobs:
      - id: make
        artifacts: {paths: [dist/*.whl, "reports/**"], required: true, when: always}
        steps:
          - {name: makes, run: 'mkdir -p dist && touch dist/app.whl'}
"""
    build = wait_for_build(services.trigger_build(make_pipeline("missing", definition)), 60)
    make = by_key(build)["make"]
    assert (build.status, make.status) == ("FAILED", "FAILED")
    assert make.reason.startswith("artifacts: reports/**: matches nothing in the workspace")
    assert "[ciproject] artifacts not uploaded: reports/**: matches nothing" in log_of(
        build, "make"
    )
    assert not Artifact.objects.filter(build=build).exists()  # all or nothing, checked first


def test_a_cache_misses_then_saves_then_hits_on_its_agent_and_never_saves_a_failure(
    dedicated, tmp_path
):
    root = tmp_path / "caches"
    dedicated("agent-cached", "cached", env={"AGENT_CACHE_ROOT": str(root)})
    definition = """
stages:
  - name: lock
    jobs:
      - id: lock
        runs-on: cached
        artifacts: {paths: [requirements.lock]}
        steps:
          - {name: locks, run: 'echo "django==5.2" > requirements.lock'}
  - name: test
    jobs:
      - id: test
        runs-on: cached
        cache: {key: "deps-{hash:requirements.lock}", paths: [.venv]}
        steps:
          - name: installs
            run: >-
              if [ -e .venv/installed ]; then echo "from the cache: $(cat .venv/installed)";
              else mkdir -p .venv && echo "build $BUILD" > .venv/installed && sleep 1; fi
"""
    pipeline = make_pipeline("cached", definition.replace("$BUILD", "one"))
    first = wait_for_build(services.trigger_build(pipeline), 60)
    assert first.status == "SUCCEEDED", [(j.key, j.status, j.reason) for j in first.jobs.all()]
    key = f"deps-{hashlib.sha256(b'django==5.2' + bytes([10])).hexdigest()}"
    miss = log_of(first, "test")
    assert f"[ciproject] cache {key}: miss\n" in miss
    assert re.search(rf"\[ciproject\] cache {key}: saved 1 files \(.*\) in \d+\.\d\d s", miss)
    assert "from the cache" not in miss
    services.save_pipeline("cached", definition.replace("$BUILD", "two"), pipeline)
    second = wait_for_build(services.trigger_build(pipeline), 60)
    hit = log_of(second, "test")
    assert re.search(
        rf"\[ciproject\] cache {key}: hit, restored 1 files \(.*\) in \d+\.\d\d s", hit
    )
    assert "from the cache: build one" in hit  # what the first build installed
    assert "saved" not in hit  # a hit is not saved again
    assert len(list((root / "agent-cached").glob("*.tar"))) == 1

    failing = make_pipeline("cache-fails", definition.replace("sleep 1", "exit 3"))
    failed = wait_for_build(services.trigger_build(failing), 60)
    assert failed.status == "FAILED"
    assert f"[ciproject] cache {key}: miss\n" in log_of(failed, "test")  # its pipeline's own
    assert len(list((root / "agent-cached").glob("*.tar"))) == 1  # and saved nothing
