"""The agent's caches on their own: keys from the workspace's files, a round trip of the
workspace's and the home's paths (links kept as links), nothing taken through a link out,
nothing written through one, the least recently used evicted past the cap."""

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from agents.process import caches


@pytest.fixture
def cache_root(tmp_path, settings):
    settings.AGENT_CACHE_ROOT = tmp_path / "caches"
    settings.AGENT_CACHE_MAX_BYTES = 10 * 1024 * 1024
    return settings.AGENT_CACHE_ROOT


def a_workspace(root: Path) -> Path:
    ws = root / "ws"
    (ws / ".venv" / "bin").mkdir(parents=True)
    (ws / ".venv" / "lib.py").write_text("print('cached')\n")
    (ws / ".venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (ws / "requirements.lock").write_text("django==5.2\n")
    return ws


def cache_for(ws: Path, home: Path | None, key="deps-{hash:requirements.lock}", paths=None):
    spec = {"key": key, "paths": paths or [".venv", "~/.cache/pip"]}
    cache = caches.for_job(spec, ws, "agent-a", 7)
    cache.home = home
    return cache


def test_the_key_hashes_the_workspaces_file(tmp_path, cache_root):
    ws = a_workspace(tmp_path)
    digest = hashlib.sha256(b"django==5.2\n").hexdigest()
    assert caches.key_of("deps-{hash:requirements.lock}-v1", ws) == f"deps-{digest}-v1"
    with pytest.raises(caches.CacheError, match=r"\{hash:missing.txt\}: no such file"):
        caches.key_of("deps-{hash:missing.txt}", ws)
    (ws / "out.lock").symlink_to("/etc/hostname")  # a link out: not a file of the workspace
    with pytest.raises(caches.CacheError, match="no such file in the workspace"):
        caches.key_of("deps-{hash:out.lock}", ws)
    entry = cache_for(ws, None).entry
    assert entry.parent == cache_root / "agent-a"
    assert entry.name == hashlib.sha256(f"7\0deps-{digest}".encode()).hexdigest() + ".tar"
    other_pipeline = caches.for_job(
        {"key": "deps-{hash:requirements.lock}", "paths": ["a"]}, ws, "agent-a", 8
    )
    assert other_pipeline.entry != entry


def test_a_saved_cache_comes_back_in_a_new_workspace_and_home(tmp_path, cache_root):
    ws, home = a_workspace(tmp_path), tmp_path / "home"
    (home / ".cache" / "pip").mkdir(parents=True)
    (home / ".cache" / "pip" / "wheel.whl").write_bytes(b"w" * 5000)
    cache = cache_for(ws, home)
    assert caches.restore(cache) is None  # a miss
    note = caches.save(cache)
    assert note.startswith(f"cache {cache.key}: saved 3 files (")
    assert cache.entry.is_file()

    fresh, fresh_home = tmp_path / "ws2", tmp_path / "home2"
    fresh.mkdir()
    fresh_home.mkdir()
    (fresh / "requirements.lock").write_text("django==5.2\n")  # same key
    again = cache_for(fresh, fresh_home)
    assert again.entry == cache.entry
    note = caches.restore(again)
    assert note.startswith(f"cache {cache.key}: hit, restored 3 files (")
    assert (fresh / ".venv" / "lib.py").read_text() == "print('cached')\n"
    assert os.readlink(fresh / ".venv" / "bin" / "python") == "/usr/bin/python3"
    assert (fresh_home / ".cache" / "pip" / "wheel.whl").read_bytes() == b"w" * 5000


def test_nothing_is_taken_through_a_link_out(tmp_path, cache_root):
    ws, secret = a_workspace(tmp_path), tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "key").write_text("not the step's")
    (ws / "deps").symlink_to(secret)
    with pytest.raises(caches.CacheError, match="deps/key: leads out of the workspace"):
        caches.save(cache_for(ws, None, paths=["deps/key"]))
    caches.save(cache_for(ws, None, paths=["deps"]))  # the link itself: kept as a link
    restored = tmp_path / "ws2"
    restored.mkdir()
    (restored / "requirements.lock").write_text("django==5.2\n")
    caches.restore(cache_for(restored, None, paths=["deps"]))
    assert os.readlink(restored / "deps") == str(secret)


def test_a_restore_never_writes_through_a_link(tmp_path, cache_root):
    ws, outside = a_workspace(tmp_path), tmp_path / "outside"
    outside.mkdir()
    cache = cache_for(ws, None, paths=[".venv"])
    caches.save(cache)
    victim = tmp_path / "ws2"
    victim.mkdir()
    (victim / "requirements.lock").write_text("django==5.2\n")
    (victim / ".venv").symlink_to(outside)  # a step's earlier link, where the cache goes
    with pytest.raises(caches.CacheError, match="not restored"):
        caches.restore(cache_for(victim, None, paths=[".venv"]))
    assert list(outside.iterdir()) == []


def test_the_least_recently_used_entries_go_past_the_cap(tmp_path, cache_root, settings):
    ws = a_workspace(tmp_path)
    (ws / "blob").write_bytes(os.urandom(1_000_000))
    made = []
    for n in range(3):
        cache = cache_for(ws, None, key=f"k{n}", paths=["blob"])
        caches.save(cache)
        os.utime(cache.entry, (1000 + n, 1000 + n))  # saved in this order
        made.append(cache)
    settings.AGENT_CACHE_MAX_BYTES = 2_500_000  # room for two
    assert caches.restore(made[0]) is not None  # used again: now the most recent
    note = caches.save(cache_for(ws, None, key="k3", paths=["blob"]))
    assert note.endswith(", 2 older entries evicted")
    assert [c.entry.exists() for c in made] == [True, False, False]
    settings.AGENT_CACHE_MAX_BYTES = 100_000
    with pytest.raises(caches.CacheError, match=r"not saved, .* is over AGENT_CACHE_MAX_BYTES"):
        caches.save(cache_for(ws, None, key="big", paths=["blob"]))
    assert not cache_for(ws, None, key="big").entry.exists()


def test_with_a_step_user_only_its_files_go_in_and_come_back_its(tmp_path, cache_root):
    # Files of another user: made as root, as the suite runs (and the agent with --step-user).
    user = SimpleNamespace(uid=65534, gid=65534, home=str(tmp_path / "home"))
    ws = a_workspace(tmp_path)
    (ws / "deep" / "er").mkdir(parents=True)
    (ws / "deep" / "er" / "mine").write_text("the step's")
    (ws / "deep" / "er" / "agents").write_text("the agent's")  # root's: never archived
    for path in [ws / "deep", ws / "deep" / "er", ws / "deep" / "er" / "mine"]:
        os.chown(path, user.uid, user.gid)
    Path(user.home).mkdir()
    cache = caches.for_job({"key": "k", "paths": ["deep/er"]}, ws, "agent-a", 7, user)
    assert caches.save(cache).startswith("cache k: saved 1 files")
    fresh = tmp_path / "ws2"
    fresh.mkdir()
    caches.restore(caches.for_job({"key": "k", "paths": ["deep/er"]}, fresh, "agent-a", 7, user))
    assert (fresh / "deep" / "er" / "mine").read_text() == "the step's"
    assert not (fresh / "deep" / "er" / "agents").exists()
    for path in [fresh / "deep", fresh / "deep" / "er", fresh / "deep" / "er" / "mine"]:
        assert (path.stat().st_uid, path.stat().st_gid) == (user.uid, user.gid), path
