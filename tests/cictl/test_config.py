"""cictl's configuration (environment, config file), its errors and exit codes when it is
not configured, cannot reach the server, or the server refuses the token; and that the
token is never printed."""

import json
import re
import subprocess
import sys

import pytest

from builds.models import Build
from cictl import main
from tests.cictl.conftest import Cictl, make_user
from tests.processes import ROOT, free_port
from tests.support import make_pipeline, one_step


@pytest.fixture
def offline(tmp_path) -> Cictl:
    """cictl with a token and a URL where nothing listens."""
    home = tmp_path / "home"
    home.mkdir()
    return Cictl(home, f"http://127.0.0.1:{free_port()}", "0123456789abcdef0123456789abcdef")


def write_config(path, **values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    path.chmod(0o600)


def test_help_lists_the_exit_codes(offline):
    result = offline("--help")
    assert result.code == 0
    block = result.out[result.out.index("Exit codes:") :]
    # The same block as the module's docstring, code for code.
    assert [line.strip() for line in block.splitlines()[1:]] == [
        line.strip() for line in main.EXIT_CODES.strip("\n").splitlines()
    ]
    for code in ("0", "1", "2", "3", "4", "5", "130"):
        assert re.search(rf"^\s+{code}  ", block, re.MULTILINE), code
    assert offline("version").out == "cictl 0.1.0\n"
    assert json.loads(offline("version", "--json").out) == {"version": "0.1.0"}


def test_not_configured_exits_5(offline):
    path = offline.home / ".config" / "cictl" / "config.toml"
    result = offline("status", "1", CICTL_URL=None, CICTL_TOKEN=None)
    assert (result.code, result.out) == (5, "")
    assert result.err == f"error NOT_CONFIGURED: no server URL: set CICTL_URL, or url in {path}\n"
    result = offline("status", "1", CICTL_TOKEN=None)
    assert (result.code, result.out) == (5, "")
    assert (
        result.err == f"error NOT_CONFIGURED: no API token: set CICTL_TOKEN, or token in {path}\n"
    )
    result = offline("status", "1", CICTL_URL="ftp://example.com")
    assert (result.code, result.out) == (5, "")
    assert result.err == (
        "error CONFIG_INVALID: the server URL (from CICTL_URL) must be http:// or https://"
        " with a host\n"
    )
    missing = offline.home / "elsewhere.toml"
    result = offline("status", "1", CICTL_CONFIG=str(missing))
    assert (result.code, result.err) == (
        5,
        f"error CONFIG_NOT_FOUND: {missing} (named by CICTL_CONFIG) does not exist\n",
    )
    path.parent.mkdir(parents=True)
    path.write_text('url = "http://x\n')
    result = offline("status", "1", CICTL_URL=None)
    assert result.code == 5
    assert result.err.startswith(f"error CONFIG_INVALID: {path} is not valid TOML: ")


def test_unreachable_server_exits_4(offline):
    result = offline("status", "1")
    assert (result.code, result.out) == (4, "")
    assert (
        result.err
        == f"error UNREACHABLE: cannot reach {offline.url}: [Errno 111] Connection refused\n"
    )
    result = offline("trigger", "hello", "-p", "A=1", "--json")
    assert (result.code, result.out) == (4, "")
    assert result.err.startswith("error UNREACHABLE: ")


@pytest.mark.django_db(transaction=True)
def test_config_file_and_environment(cictl):
    pipeline = make_pipeline("hello", one_step("echo hi"))
    assert cictl("trigger", "hello", "--wait").code == 0
    build = Build.objects.get()
    path = cictl.home / ".config" / "cictl" / "config.toml"
    write_config(path, url=cictl.url, token=cictl.token)

    # The file alone.
    result = cictl("status", str(build.pk), CICTL_URL=None, CICTL_TOKEN=None)
    assert (result.code, result.err) == (0, "")
    assert result.out.startswith(f"build {build.pk}  hello #1  SUCCEEDED")
    result = cictl("config", CICTL_URL=None, CICTL_TOKEN=None)
    assert (result.code, result.err) == (0, "")
    assert result.out == (
        f"url    {cictl.url}  (from {path})\ntoken  set  (from {path})\nfile   {path}\n"
    )

    # The environment wins, key by key: a wrong token in it is refused, though the file's
    # is right; a URL in it is used, though the file's leads nowhere.
    result = cictl("status", str(build.pk), CICTL_URL=None, CICTL_TOKEN="wrong-token-1234")
    assert (result.code, result.out) == (3, "")
    assert result.err == (
        "error AUTHENTICATION_FAILED: Invalid token.\n"
        "  (the API token, from CICTL_TOKEN, was not accepted)\n"
    )
    write_config(path, url=f"http://127.0.0.1:{free_port()}", token=cictl.token)
    result = cictl("status", str(build.pk), CICTL_TOKEN=None)
    assert (result.code, result.err) == (0, "")
    assert json.loads(cictl("config", "--json", CICTL_TOKEN=None).out) == {
        "url": cictl.url,
        "url_from": "CICTL_URL",
        "token_from": str(path),
        "file": str(path),
        "file_exists": True,
    }

    # $CICTL_CONFIG names another file; one others may read is used, with a warning.
    other = cictl.home / "ci.toml"
    write_config(other, url=cictl.url, token=cictl.token)
    other.chmod(0o644)
    env = {"CICTL_URL": None, "CICTL_TOKEN": None, "CICTL_CONFIG": str(other)}
    result = cictl("trigger", str(pipeline.pk), "--json", **env)
    assert result.code == 0
    assert (
        result.err == f"warning: {other} holds a token and others can read it: chmod 600 {other}\n"
    )
    assert json.loads(result.out)["number"] == 2


@pytest.mark.django_db(transaction=True)
def test_the_token_is_never_printed(cictl):
    make_pipeline("hello", one_step("echo hi"))
    first = cictl("-v", "trigger", "hello", "--wait")
    assert first.code == 0
    build = str(Build.objects.get().pk)
    outputs = [first.out + first.err]
    for env in ({}, {"CICTL_TOKEN": "wrong-but-secret-0042"}):
        for args in (
            ("-v", "trigger", "hello", "--wait"),
            ("-v", "status", build, "--json"),
            ("-v", "logs", build),
            ("-v", "logs", build, "--follow"),
            ("-v", "config"),
        ):
            result = cictl(*args, **env)
            outputs.append(result.out + result.err)
    assert "Authorization" not in "".join(outputs)
    for text in outputs:
        assert cictl.token not in text
        assert "wrong-but-secret-0042" not in text
    assert "cictl: GET " in outputs[1]  # -v shows the requests


@pytest.mark.django_db(transaction=True)
def test_a_user_without_the_permission_is_refused(cictl):
    make_pipeline("hello", one_step("echo hi"))
    reader = make_user("reader", ["view_pipeline", "view_build"])
    result = cictl("trigger", "hello", CICTL_TOKEN=reader)
    assert (result.code, result.out) == (3, "")
    assert result.err == ("error PERMISSION_DENIED: you may not trigger here\n")
    assert not Build.objects.exists()


def test_cictl_imports_nothing_of_the_server():
    """cictl runs on developers' machines and speaks to the REST API only: it loads no
    Django and none of ciproject's server packages."""
    server = ["django", "rest_framework", "celery", "agents", "artifacts", "builds"]
    server += ["ciproject", "concurrency", "dispatch", "forge", "vault"]
    probe = (
        "import sys, cictl.main\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {server!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout == "[]\n"
