"""The agent's checkout against real git servers (tests.gitservers): the build's exact commit
in the workspace from a mirror per repository, whatever the ref (a branch, a tag, an older
commit, one rewritten by a force-push), shallow or with submodules; credentials that reach
git and nothing else; the step user's files; a stop; concurrent checkouts of one mirror."""

import fcntl
import os
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from agents.process import checkout, workspaces
from agents.process.step_user import StepUser
from tests.gitservers import GitDaemon, GitHttp, Repository, Silent, git

USER, PASSWORD = "ci-bot", "s3cr3t-Pa55word-9f2c71"
AUTH = {"username": USER, "password": PASSWORD}


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def daemon(served):
    with GitDaemon(served) as server:
        yield server


@pytest.fixture
def http(served):
    with GitHttp(served, USER, PASSWORD) as server:
        yield server


@pytest.fixture
def mirrors(tmp_path):
    return tmp_path / "mirrors"


@pytest.fixture
def fresh(tmp_path):
    """A new workspace path each call."""
    count = iter(range(1000))
    return lambda: tmp_path / f"ws{next(count)}"


def run(source, workspace, mirrors, user=None, stop=None, **kwargs) -> str:
    return checkout.checkout(source, workspace, mirrors, user, stop or threading.Event(), **kwargs)


def head(workspace: Path) -> str:
    return git("-C", workspace, "rev-parse", "HEAD")


def refs(workspace: Path) -> list[str]:
    return git("-C", workspace, "for-each-ref", "--format=%(refname)").split()


def a_repository(served: Path, name: str = "app") -> Repository:
    repo = Repository(served, name)
    repo.commit({"README": "one\n", "src/app.py": "print(1)\n"}, "one")
    repo.commit({"src/app.py": "print(2)\n"}, "two")
    repo.push("main")
    return repo


def test_a_branch_commit_through_git_daemon(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    repo.switch("feature", create=True)
    feature = repo.commit({"feature.txt": "f\n"}, "feature")
    repo.tag("f1", "feature 1")
    repo.push("feature", "f1")
    repo.switch("main")
    # Builds of another branch and a tag first: the mirror has them, a later workspace not.
    run(checkout.Source(daemon.url("app"), feature, "refs/heads/feature"), fresh(), mirrors)
    run(checkout.Source(daemon.url("app"), feature, "refs/tags/f1"), fresh(), mirrors)

    sha, ws = repo.sha("main"), fresh()
    note = run(checkout.Source(daemon.url("app"), sha, "refs/heads/main"), ws, mirrors)
    assert note.startswith(f"checkout {sha[:12]} (refs/heads/main): mirror updated, fetched in")
    assert (ws / "src" / "app.py").read_text() == "print(2)\n"
    assert not (ws / "feature.txt").exists()
    assert head(ws) == sha
    detached = subprocess.run(["git", "-C", ws, "symbolic-ref", "-q", "HEAD"], check=False)
    assert detached.returncode == 1  # HEAD names no branch
    assert git("-C", ws, "status", "--porcelain") == ""
    assert git("-C", ws, "remote", "get-url", "origin") == daemon.url("app")
    assert refs(ws) == ["refs/heads/main", "refs/remotes/origin/main"]
    assert git("-C", ws, "rev-parse", "main") == sha


def test_a_new_mirror_is_said_so(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    note = run(checkout.Source(daemon.url("app"), repo.sha(), "refs/heads/main"), fresh(), mirrors)
    assert note.startswith(f"checkout {repo.sha()[:12]} (refs/heads/main): new mirror, fetched")
    assert ", cloned in " in note
    mirror = checkout.mirror_path(mirrors, daemon.url("app"))
    assert git("-C", mirror, "rev-parse", "refs/heads/main") == repo.sha()


def test_a_tag_and_an_older_commit_of_a_branch(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    first = repo.sha("main~1")
    repo.git("tag", "-m", "release 1", "v1", first)
    repo.commit({"src/app.py": "print(3)\n"}, "three")
    repo.push("main", "v1")
    url = daemon.url("app")

    tagged = fresh()
    run(checkout.Source(url, first, "refs/tags/v1"), tagged, mirrors)
    assert head(tagged) == first
    assert (tagged / "src" / "app.py").read_text() == "print(1)\n"
    assert git("-C", tagged, "describe") == "v1"  # the annotated tag itself is there
    assert refs(tagged) == ["refs/tags/v1"]

    older, middle = fresh(), repo.sha("main~1")
    run(checkout.Source(url, middle, "refs/heads/main"), older, mirrors)
    assert head(older) == middle
    assert git("-C", older, "rev-parse", "main") == middle  # the build's branch, at its commit


def test_a_force_push_and_a_commit_no_longer_anywhere(served, daemon, mirrors, fresh):
    repo, url = a_repository(served), daemon.url("app")
    before = repo.sha()
    run(checkout.Source(url, before, "refs/heads/main"), fresh(), mirrors)

    repo.reset("main~1")
    rewritten = repo.commit({"src/app.py": "print('rewritten')\n"}, "two, again")
    repo.push("main", force=True)
    ws = fresh()
    note = run(checkout.Source(url, rewritten, "refs/heads/main"), ws, mirrors)
    assert "mirror updated" in note
    assert head(ws) == rewritten
    assert (ws / "src" / "app.py").read_text() == "print('rewritten')\n"

    # Pushed, then rewritten away and collected before this node ever fetched it.
    gone = repo.commit({"gone.txt": "x\n"}, "gone")
    repo.push("main")
    repo.reset("main~1")
    repo.push("main", force=True)
    repo.forget_unreachable()
    with pytest.raises(checkout.CheckoutError) as failed:
        run(checkout.Source(url, gone, "refs/heads/main"), fresh(), mirrors)
    message = str(failed.value)
    assert message.startswith(f"commit {gone} (refs/heads/main) could not be fetched from {url}: ")
    assert "fatal: " in message  # git's own words


def test_a_commit_the_ref_no_longer_leads_to_is_fetched_by_its_id(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    repo.switch("elsewhere", create=True)
    aside = repo.commit({"aside.txt": "a\n"}, "aside")
    repo.push("elsewhere")
    ws = fresh()
    run(checkout.Source(daemon.url("app"), aside, "refs/heads/main"), ws, mirrors)
    assert head(ws) == aside
    assert (ws / "aside.txt").read_text() == "a\n"


def test_a_mirror_left_by_a_killed_git_still_works(served, daemon, mirrors, fresh):
    repo, url = a_repository(served), daemon.url("app")
    repo.push("HEAD:refs/heads/release")
    run(checkout.Source(url, repo.sha(), "refs/heads/release"), fresh(), mirrors)
    mirror = checkout.mirror_path(mirrors, url)
    (mirror / "refs" / "heads" / "main.lock").write_text("")  # a fetch killed mid-update
    # release deleted upstream and release/2 made: the mirror's release is in the way.
    repo.push(":release")
    sha = repo.commit({"two.txt": "2\n"}, "release 2")
    repo.push("HEAD:refs/heads/release/2", "main")
    ws = fresh()
    run(checkout.Source(url, sha, "refs/heads/release/2"), ws, mirrors)
    assert head(ws) == sha
    ws = fresh()
    run(checkout.Source(url, sha, "refs/heads/main"), ws, mirrors)  # main.lock was stale
    assert head(ws) == sha
    assert git("-C", mirror, "for-each-ref", "--format=%(refname)", "refs/heads").split() == [
        "refs/heads/main",
        "refs/heads/release/2",
    ]


def test_http_with_basic_auth_and_no_credential_left_anywhere(
    served, http, mirrors, fresh, tmp_path, monkeypatch
):
    # Every git command the checkout runs, through a wrapper that records its arguments.
    calls = tmp_path / "argv"
    wrapper = tmp_path / "git-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {calls}\nexec git "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(checkout, "GIT", str(wrapper))
    repo, url = a_repository(served), http.url("app")

    ws = fresh()
    run(checkout.Source(url, repo.sha(), "refs/heads/main", **AUTH), ws, mirrors)
    assert head(ws) == repo.sha()
    assert http.requests[0].status == 401  # asked, then answered through the askpass
    assert {r.credentials for r in http.requests if r.status == 200} == {(USER, PASSWORD)}

    wrong = checkout.Source(
        url, repo.sha(), "refs/heads/main", username=USER, password="Wr0ng-pass"
    )
    with pytest.raises(checkout.CheckoutError) as failed:
        run(wrong, fresh(), mirrors)
    assert "Authentication failed" in str(failed.value)
    assert "Wr0ng-pass" not in str(failed.value)
    assert "Wr0ng-pass" not in repr(wrong)

    assert calls.read_text().count("fetch") >= 2  # the hook saw the commands
    for secret in (PASSWORD, "Wr0ng-pass"):
        assert secret not in calls.read_text()
        assert secret not in str(os.environ)
        for root in (ws, mirrors):
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    assert secret.encode() not in path.read_bytes(), path
    assert git("-C", ws, "remote", "get-url", "origin") == url


def test_a_clone_url_with_credentials_in_it_is_refused(mirrors, fresh):
    for url in ("https://ci-bot:pw@forge.example/app.git", "https://token@forge.example/a.git"):
        with pytest.raises(checkout.CheckoutError, match="carries credentials"):
            run(checkout.Source(url, "a" * 40, "refs/heads/main"), fresh(), mirrors)
    for url in ("file:///etc", "ext::sh", "-uhelp", "ssh://forge.example/a.git"):
        with pytest.raises(checkout.CheckoutError, match="not a clone URL"):
            run(checkout.Source(url, "a" * 40, "refs/heads/main"), fresh(), mirrors)
    url = "https://forge.example/app.git"
    for sha, ref, match in (
        ("abc123", "refs/heads/main", "not a full commit id"),
        ("a" * 40, "main", "not a full ref name"),
        ("a" * 40, "refs/heads/a..b", "not a full ref name"),
    ):
        with pytest.raises(checkout.CheckoutError, match=match):
            run(checkout.Source(url, sha, ref), fresh(), mirrors)
    assert not mirrors.exists()  # refused before anything ran


def test_credentials_go_to_the_clone_urls_host_only(served, http, mirrors, fresh, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with GitHttp(other, USER, PASSWORD, host="127.0.0.2") as elsewhere:
        library = a_repository(other, "library")
        repo = a_repository(served)
        repo.add_submodule("lib", library, elsewhere.url("library"))
        repo.push("main")
        source = checkout.Source(
            http.url("app"), repo.sha(), "refs/heads/main", submodules=True,
            username=USER, password=PASSWORD,
        )  # fmt: skip
        with pytest.raises(checkout.CheckoutError, match="could not read Username for 'http://127"):
            run(source, fresh(), mirrors)
        assert elsewhere.requests  # it was asked, and got no credential
        assert all(request.credentials is None for request in elsewhere.requests)


def test_a_second_checkout_fetches_only_what_is_new(served, http, mirrors, fresh):
    repo = Repository(served, "app")
    repo.commit({"big.bin": os.urandom(300_000)}, "big")
    repo.push("main")
    url = http.url("app")
    run(checkout.Source(url, repo.sha(), "refs/heads/main", **AUTH), fresh(), mirrors)
    first = sum(http.sent())
    assert first > 300_000

    repo.commit({"small.txt": "small\n"}, "small")
    repo.push("main")
    ws = fresh()
    note = run(checkout.Source(url, repo.sha(), "refs/heads/main", **AUTH), ws, mirrors)
    assert "mirror updated" in note
    assert sum(http.sent()) - first < 20_000
    assert (ws / "small.txt").read_text() == "small\n"
    assert (ws / "big.bin").stat().st_size == 300_000


def test_a_shallow_workspace(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    repo.commit({"three.txt": "3\n"}, "three")
    repo.push("main")
    url = daemon.url("app")

    ws = fresh()
    note = run(checkout.Source(url, repo.sha(), "refs/heads/main", depth=1), ws, mirrors)
    assert "shallow clone (depth 1)" in note
    assert git("-C", ws, "rev-parse", "--is-shallow-repository") == "true"
    assert git("-C", ws, "rev-list", "--count", "HEAD") == "1"
    assert head(ws) == repo.sha()
    assert git("-C", ws, "remote", "get-url", "origin") == url

    older, sha = fresh(), repo.sha("main~1")  # not the tip: asked of the mirror by its id
    run(checkout.Source(url, sha, "refs/heads/main", depth=2), older, mirrors)
    assert head(older) == sha
    assert git("-C", older, "rev-list", "--count", "HEAD") == "2"
    assert not (older / "three.txt").exists()

    full = fresh()
    run(checkout.Source(url, repo.sha(), "refs/heads/main"), full, mirrors)
    assert git("-C", full, "rev-parse", "--is-shallow-repository") == "false"
    assert git("-C", full, "rev-list", "--count", "HEAD") == "3"


def test_submodules_when_asked(served, daemon, mirrors, fresh):
    library = Repository(served, "library")
    library.commit({"lib.py": "LIB = 1\n"}, "library")
    library.push("main")
    repo = a_repository(served)
    repo.add_submodule("vendor/lib", library, "../library.git")  # by the superproject's URL
    repo.push("main")
    url = daemon.url("app")

    with_them = fresh()
    source = checkout.Source(url, repo.sha(), "refs/heads/main", submodules=True)
    note = run(source, with_them, mirrors)
    assert ", submodules in " in note
    assert (with_them / "vendor" / "lib" / "lib.py").read_text() == "LIB = 1\n"
    assert git("-C", with_them / "vendor" / "lib", "rev-parse", "HEAD") == library.sha()

    without = fresh()
    run(checkout.Source(url, repo.sha(), "refs/heads/main"), without, mirrors)
    assert (without / "vendor" / "lib").is_dir()
    assert not any((without / "vendor" / "lib").iterdir())


def test_a_submodule_by_a_local_path_is_refused(served, daemon, mirrors, fresh):
    library = a_repository(served, "library")
    repo = a_repository(served)
    repo.add_submodule("lib", library, str(library.bare))  # a path on the build node
    repo.push("main")
    source = checkout.Source(daemon.url("app"), repo.sha(), "refs/heads/main", submodules=True)
    with pytest.raises(checkout.CheckoutError, match="transport 'file' not allowed"):
        run(source, fresh(), mirrors)


@pytest.mark.parametrize("depth", [None, 1])
def test_the_step_users_files_and_the_agents_mirror(served, daemon, mirrors, depth):
    repo = a_repository(served)
    user = StepUser("nobody")
    with tempfile.TemporaryDirectory() as top:  # a folder the step user can reach
        os.chmod(top, 0o755)
        ws = Path(top) / "build-1" / "job"
        workspaces.make(ws, user)
        source = checkout.Source(daemon.url("app"), repo.sha(), "refs/heads/main", depth=depth)
        umask = os.umask(0o077)  # an agent's strict umask: the mirror is still readable
        try:
            run(source, ws, mirrors, user)
        finally:
            os.umask(umask)

        shared = []
        for path in [ws, *ws.rglob("*")]:
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:  # the mirror's own objects
                assert (ws / ".git" / "objects") in path.parents
                assert (info.st_uid, stat.S_IMODE(info.st_mode) & 0o222) == (0, 0), path
                shared.append(path)
            else:
                assert (info.st_uid, info.st_gid) == (user.uid, user.gid), path
        assert bool(shared) == (depth is None)  # a full clone hardlinks the mirror's

        assert stat.S_IMODE(mirrors.stat().st_mode) == 0o700
        assert all(path.lstat().st_uid == 0 for path in [mirrors, *mirrors.rglob("*")])

        def as_user(*argv):
            env = user.environment({"PATH": os.defpath, "GIT_CONFIG_NOSYSTEM": "1"})
            return subprocess.run(user.argv(list(argv)), env=env, capture_output=True, text=True)

        status = as_user("git", "-C", str(ws), "status", "--porcelain")
        assert (status.returncode, status.stdout) == (0, ""), status.stderr
        commit = ("git", "-C", str(ws), "-c", "user.name=n", "-c", "user.email=n@example.com")
        assert as_user(*commit, "commit", "--allow-empty", "-qm", "x").returncode == 0
        if shared:
            assert as_user("sh", "-c", 'echo x >> "$0"', str(shared[0])).returncode != 0


def test_a_stop_ends_the_checkout(mirrors, fresh):
    with Silent() as silent:
        source = checkout.Source(silent.url("app"), "a" * 40, "refs/heads/main")
        stop = threading.Event()
        stop.set()
        with pytest.raises(checkout.Stopped, match="stopped before git"):
            run(source, fresh(), mirrors, stop=stop)

        # Over http, git's helper (git-remote-http) holds the connection: it goes too.
        stop, failures = threading.Event(), []
        over_http = checkout.Source(silent.url("app", "http"), "a" * 40, "refs/heads/main")

        def fetch():
            try:
                run(over_http, fresh(), mirrors, stop=stop)
            except checkout.CheckoutError as exc:
                failures.append(exc)

        fetching = threading.Thread(target=fetch)
        fetching.start()
        deadline = threading.Event()
        for _ in range(200):  # git connected: it is waiting for the server's answer
            if silent.connections or deadline.wait(0.05):
                break
        assert silent.connections
        stop.set()
        fetching.join(5)
        assert not fetching.is_alive()
        assert [type(exc) for exc in failures] == [checkout.Stopped]
        assert "stopped while git fetch ran" in str(failures[0])
        connection = silent.connections[0]
        connection.settimeout(5)
        while connection.recv(4096):  # until git's end of the connection closes: it is gone
            pass

        with pytest.raises(checkout.CheckoutError, match="did not finish within"):
            run(source, fresh(), mirrors, timeout=0.5)


def test_checkouts_of_one_repository_at_once(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    source = checkout.Source(daemon.url("app"), repo.sha(), "refs/heads/main")
    spaces, notes, errors = [fresh(), fresh()], [], []
    start = threading.Barrier(2)

    def one(ws):
        start.wait()
        try:
            notes.append(run(source, ws, mirrors))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(ws,)) for ws in spaces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(note.split(": ")[1].startswith("new mirror") for note in notes) == [False, True]
    assert all(head(ws) == repo.sha() for ws in spaces)


def test_a_checkout_waits_for_the_mirrors_lock(served, daemon, mirrors, fresh):
    repo = a_repository(served)
    url = daemon.url("app")
    mirrors.mkdir(mode=0o700)
    lock = checkout.lock_path(checkout.mirror_path(mirrors, url))
    notes = []
    with open(lock, "a") as held:  # as another agent on the host would hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(
            target=lambda: notes.append(
                run(checkout.Source(url, repo.sha(), "refs/heads/main"), fresh(), mirrors)
            )
        )
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()
        assert not checkout.mirror_path(mirrors, url).exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    waiting.join(10)
    assert len(notes) == 1
    assert "new mirror after waiting" in notes[0]


def test_a_workspace_that_is_not_empty_is_refused(mirrors, fresh):
    ws = fresh()
    ws.mkdir()
    (ws / "left.txt").write_text("x")
    source = checkout.Source("https://forge.example/app.git", "a" * 40, "refs/heads/main")
    with pytest.raises(checkout.CheckoutError, match="is not empty"):
        run(source, ws, mirrors)


def test_past_the_cap_the_least_recently_used_mirrors_go(served, daemon, mirrors, fresh):
    sources = {}
    for name in ("one", "two", "three"):
        repo = a_repository(served, name)
        sources[name] = checkout.Source(daemon.url(name), repo.sha(), "refs/heads/main")
        run(sources[name], fresh(), mirrors)
    mirror = {name: checkout.mirror_path(mirrors, s.url) for name, s in sources.items()}
    run(sources["one"], fresh(), mirrors)  # used again: "two" is now the least recent
    sizes = {name: checkout._size(path) for name, path in mirror.items()}
    assert all(sizes.values())

    # Room for all but one: only the least recently used goes, not the one checked out now.
    cap = sum(sizes.values()) - 1
    note = run(sources["three"], fresh(), mirrors, max_bytes=cap)
    assert note.endswith("; 1 mirror least recently used evicted"), note
    assert {name for name, path in mirror.items() if path.exists()} == {"one", "three"}
    assert checkout.lock_path(mirror["two"]).exists()  # kept: a waiting checkout locks it

    # No room at all: every other mirror goes, but not one another checkout holds.
    with open(checkout.lock_path(mirror["one"]), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        note = run(sources["two"], fresh(), mirrors, max_bytes=1)
    assert note.startswith(f"checkout {sources['two'].sha[:12]} (refs/heads/main): new mirror")
    assert note.endswith("; 1 mirror least recently used evicted"), note
    assert {name for name, path in mirror.items() if path.exists()} == {"one", "two"}
    assert not list(mirrors.glob("*.evicted"))

    ws = fresh()  # an evicted mirror is made anew
    assert "new mirror" in run(sources["three"], ws, mirrors)
    assert head(ws) == sources["three"].sha
