"""Builds from a forge (`make bench`), on a repository of 1,000 commits on main served by
`git daemon`:

1. webhook to first step started with a warm mirror: signed GitHub pushes to the live web,
   each of a new commit pushed to the served repository first (so each checkout fetches one
   new commit into the agent's mirror), after two warm-up builds; the build's created_at to
   its first step's started_at (both recorded by this machine's processes), the webhook POST
   to the same start, and the POST's answer. Target: p50 under 300 ms. Reference, same run:
   the same measure for a pipeline of `checkout: false`, interleaved with it.
2. a checkout (agents.process.checkout, called here) into a new workspace through a cold
   mirror (a fresh clone into a new mirror root) and through the warm mirror after one new
   commit; reference: a plain `git clone` of the same URL."""

import re
import statistics
import subprocess
import threading
import time

import pytest

from agents.process import checkout
from builds import services
from builds.models import Build, StepRun
from forge.services import repositories
from tests.gitservers import GIT_ENV, GitDaemon, Repository, git
from tests.integration.test_forge import deliver, push_payload
from tests.support import make_pipeline, wait_for_build, wait_until

COMMITS = 1000
FILES = 12  # a few files: src/f00.txt ..., each commit rewrites three of them
WARM_UP = 2
BUILDS = 20
CHECKOUTS = 5
TARGET_MS = 300
LABEL = "benchforge"  # only this test's agent has it: its mirror root is the test's own
NOTE_RE = re.compile(r"checkout \w+ \(refs/heads/main\): (mirror updated|new mirror)[^,]*,"
                     r" fetched in ([\d.]+) s, cloned in ([\d.]+) s")  # fmt: skip


def pipeline_yaml(with_checkout: bool) -> str:
    checkout_line = "" if with_checkout else "        checkout: false\n"
    return (
        "stages:\n  - name: build\n    jobs:\n      - id: j\n"
        f"        runs-on: {LABEL}\n{checkout_line}"
        "        steps: [{run: 'true'}]\n"
    )


def file_text(commit: int, name: int) -> bytes:
    """About 2 KB that differ from one commit to the next (deltas, as real history has)."""
    lines = [f"file {name} line {n}: commit {commit if n % 7 == 0 else 0}\n" for n in range(60)]
    return "".join(lines).encode()


def fast_import_stream(commits: int) -> bytes:
    out = bytearray()
    for n in range(1, commits + 1):
        message = f"commit {n}\n".encode()
        out += b"commit refs/heads/main\n"
        out += f"mark :{n}\n".encode()
        out += (
            f"committer Test Author <author@example.com> {1_700_000_000 + n * 60} +0000\n".encode()
        )
        out += f"data {len(message)}\n".encode() + message
        if n > 1:
            out += f"from :{n - 1}\n".encode()
        touched = range(FILES) if n == 1 else {n % FILES, (n * 5) % FILES, (n * 7 + 3) % FILES}
        for name in sorted(touched):
            content = file_text(n, name)
            out += f"M 100644 inline src/f{name:02}.txt\n".encode()
            out += f"data {len(content)}\n".encode() + content
        out += b"\n"
    return bytes(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The 1,000-commit repository (pushed to its bare copy) and `git daemon` serving it."""
    root = tmp_path_factory.mktemp("forge-bench")
    (root / "served").mkdir()
    source = Repository(root / "served", "o/big")
    subprocess.run(
        ["git", "-C", source.work, "fast-import", "--quiet"],
        input=fast_import_stream(COMMITS), env=GIT_ENV, check=True, timeout=120,
    )  # fmt: skip
    source.git("reset", "--quiet", "--hard", "main")
    source.push("main")
    assert git("-C", source.bare, "rev-list", "--count", "main") == str(COMMITS)
    with GitDaemon(root / "served") as daemon:
        yield source, daemon.url(source.name)


def new_commit(source: Repository, label: str) -> str:
    sha = source.commit({"src/f00.txt": f"{label} {time.time_ns()}\n"}, label)
    source.push("main")
    return sha


def percentile(sorted_values, fraction):
    return sorted_values[max(0, int(len(sorted_values) * fraction) - 1)]


def spread(values) -> str:
    values = sorted(values)
    return (
        f"p50 {statistics.median(values):.1f} ms, p90 {percentile(values, 0.9):.1f} ms,"
        f" max {values[-1]:.1f} ms"
    )


def first_step_started(build_id: int):
    return wait_until(
        lambda: (
            StepRun.objects.filter(job__build_id=build_id, started_at__isnull=False)
            .values_list("started_at", flat=True)
            .first()
        ),
        timeout=60,
        interval=0.02,  # the agent records the start: polling more often only loads the machine
        message=f"build {build_id}'s first step to start",
    )


def first_step_log(build: Build) -> str:
    step = StepRun.objects.filter(job__build=build).order_by("index").first()
    return services.step_log(step, step.attempt)


class Hook:
    """One pipeline with the served repository, and its measures per build delivered."""

    def __init__(self, name: str, with_checkout: bool, url: str, server: str):
        self.pipeline = make_pipeline(name, pipeline_yaml(with_checkout))
        _, self.secret = repositories.set_repository(
            self.pipeline, {"forge": "github", "clone_url": url, "default_branch": "main"}
        )
        self.url = f"{server}/api/pipelines/{self.pipeline.pk}/hooks/github/"
        self.with_checkout = with_checkout
        self.created_to_step, self.post_to_step, self.answers = [], [], []
        self.fetches, self.clones = [], []

    def build(self, sha: str, measured: bool) -> None:
        posted = time.time()
        started = time.perf_counter()
        answer = deliver(self.url, self.secret, push_payload(sha, f"bench {sha[:8]}"))
        answered = (time.perf_counter() - started) * 1000
        assert answer.status_code == 201, answer.text
        build_id = answer.json()["build"]
        step_start = first_step_started(build_id)
        build = wait_for_build(build_id, timeout=60)
        assert build.status == "SUCCEEDED", [(j.key, j.status, j.reason) for j in build.jobs.all()]
        assert build.source["sha"] == sha
        if self.with_checkout:
            note = NOTE_RE.search(first_step_log(build))
            assert note, first_step_log(build)
            if measured:  # every measured checkout went through the warm mirror
                assert note[1] == "mirror updated", note[0]
                self.fetches.append(float(note[2]) * 1000)
                self.clones.append(float(note[3]) * 1000)
        if measured:
            self.created_to_step.append((step_start - build.created_at).total_seconds() * 1000)
            self.post_to_step.append((step_start.timestamp() - posted) * 1000)
            self.answers.append(answered)


@pytest.mark.timeout(600)
@pytest.mark.django_db(transaction=True)
def test_webhook_to_first_step_with_a_warm_mirror(served, workers, dedicated, worker_env, tmp_path):
    source, url = served
    dedicated(
        f"agent-{LABEL}", f"linux,{LABEL}", env={"AGENT_MIRROR_ROOT": str(tmp_path / "mirrors")}
    )
    server = worker_env["AGENT_SERVER_URL"]
    with_checkout = Hook("bench-forge-checkout", True, url, server)
    without = Hook("bench-forge-no-checkout", False, url, server)
    for n in range(WARM_UP + BUILDS):
        measured = n >= WARM_UP
        sha = new_commit(source, f"build {n}")
        with_checkout.build(sha, measured)  # fetches the one new commit
        without.build(sha, measured)  # the same commit, never fetched
    fetch, clone = map(statistics.median, (with_checkout.fetches, with_checkout.clones))
    ratio = statistics.median(with_checkout.created_to_step) / statistics.median(
        without.created_to_step
    )
    print(
        f"\nwebhook -> first step started, {COMMITS}-commit repository via git daemon,"
        f" warm mirror, one new commit each, {BUILDS} builds (after {WARM_UP} warm-up):"
        f"\n  build created -> first step (DB): {spread(with_checkout.created_to_step)}"
        f" (target: p50 < {TARGET_MS} ms)"
        f"\n  webhook POST -> first step:       {spread(with_checkout.post_to_step)}"
        f"\n  webhook POST -> its answer:       {spread(with_checkout.answers)}"
        f"\n  of the checkout (agent's note): fetch p50 {fetch:.0f} ms,"
        f" clone from the mirror p50 {clone:.0f} ms"
        f"\n  reference, checkout: false, same run, interleaved:"
        f"\n  build created -> first step (DB): {spread(without.created_to_step)}"
        f"\n  webhook POST -> first step:       {spread(without.post_to_step)}"
        f"\n  webhook POST -> its answer:       {spread(without.answers)}"
        f"\n  ratio of the p50s (created -> first step), checkout / none: {ratio:.2f}"
    )


def timed_checkout(url: str, sha: str, workspace, mirror_root) -> tuple[float, str]:
    source = checkout.Source(url=url, sha=sha, ref="refs/heads/main")
    started = time.perf_counter()
    note = checkout.checkout(source, workspace, mirror_root, None, threading.Event())
    elapsed = (time.perf_counter() - started) * 1000
    assert git("-C", workspace, "rev-parse", "HEAD") == sha
    return elapsed, note


def median_ms(values) -> str:
    return f"{statistics.median(values):.0f} ms (min {min(values):.0f}, max {max(values):.0f})"


def test_second_checkout_against_a_fresh_clone(served, tmp_path):
    source, url = served
    sha = source.sha()
    cold, cold_notes = [], []
    for n in range(CHECKOUTS):
        elapsed, note = timed_checkout(url, sha, tmp_path / f"cold-ws-{n}", tmp_path / f"cold-{n}")
        assert "new mirror" in note, note
        cold.append(elapsed)
        cold_notes.append(note)

    warm_root = tmp_path / "warm"
    timed_checkout(url, sha, tmp_path / "warm-ws-first", warm_root)  # makes the mirror
    warm, warm_notes = [], []
    for n in range(CHECKOUTS):
        sha = new_commit(source, f"checkout {n}")
        elapsed, note = timed_checkout(url, sha, tmp_path / f"warm-ws-{n}", warm_root)
        assert "mirror updated" in note, note
        warm.append(elapsed)
        warm_notes.append(note)

    plain = []
    for n in range(CHECKOUTS):
        into = tmp_path / f"plain-{n}"
        started = time.perf_counter()
        git("clone", "--quiet", url, into)
        plain.append((time.perf_counter() - started) * 1000)
        assert git("-C", into, "rev-list", "--count", "HEAD") == git(
            "-C", source.bare, "rev-list", "--count", "main"
        )
    print(
        f"\ncheckout of a {COMMITS}-commit repository via git daemon, {CHECKOUTS} each,"
        " a new workspace each time:"
        f"\n  cold mirror (fresh clone, new mirror root): median {median_ms(cold)};"
        f" {parts(cold_notes)}"
        f"\n  warm mirror, one new commit:                median {median_ms(warm)};"
        f" {parts(warm_notes)}"
        f"\n  ratio warm / cold: {statistics.median(warm) / statistics.median(cold):.2f}"
        f"\n  reference, plain `git clone` of the URL:    median {median_ms(plain)}"
        f"\n  ratio warm / plain clone: {statistics.median(warm) / statistics.median(plain):.2f}"
    )


def parts(notes) -> str:
    """The medians of the fetch into the mirror and the clone from it, from checkout's notes."""
    found = [NOTE_RE.search(note) for note in notes]
    assert all(found), notes
    fetch = statistics.median(float(match[2]) * 1000 for match in found)
    clone = statistics.median(float(match[3]) * 1000 for match in found)
    return f"of which fetch {fetch:.0f} ms, clone from the mirror {clone:.0f} ms"
