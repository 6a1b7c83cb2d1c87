"""Hostile variables at every door a variable comes in by: the API (JSON and raw bodies), the
admin's Trigger page (KEY=VALUE lines), `manage.py trigger --var` and a step's
`::set-variable` lines. Each is refused with a stable code and changes nothing, or reaches the
steps as plain environment data, byte for byte, and is never run: shown with the agent's own
executor and runner on a real bash. The test transactions never commit, so no message is
published and no worker is needed."""

import io
import json

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from agents import services as agents
from agents.process.agent import AgentProcess
from agents.process.runner import StepOutput, run_step, step_environment
from builds import services
from builds.definition import (
    MAX_VARIABLE_NAME,
    MAX_VARIABLE_VALUE,
    MAX_VARIABLES,
    MAX_VARIABLES_TOTAL,
)
from builds.models import Build, BuildVariable, JobRun
from tests.support import client_for, make_pipeline

pytestmark = pytest.mark.django_db

MARK = "@MARK@"  # the path of a file each payload would create, were it ever run by a shell
INJECTIONS = [
    "$(touch @MARK@)",
    "`touch @MARK@`",
    "; touch @MARK@",
    "x && touch @MARK@ || touch @MARK@",
    "| touch @MARK@",
    "'; touch @MARK@; '",
    '"; touch @MARK@; "',
    "\ntouch @MARK@\n",
    "\r\ntouch @MARK@",
    "${IFS}touch${IFS}@MARK@",
    "$'\\x74ouch' @MARK@",
    "() { :; }; touch @MARK@",  # shellshock
    "%s%n%x%%s $(touch @MARK@)",
    "\\$(touch @MARK@)\\",
    "> @MARK@",
    "-e touch @MARK@ --",
    "* ? [a-z] ~ $HOME $0 $$ !!",
    "::set-variable name=INJECTED::1",
    "\x1b[2J\x07\x7f\t touch @MARK@",
    "é 中文 🚀 \u202e\u2028\ufeff $(touch @MARK@)",
]
# Names the agent sets, or the shell, the loader or libc act on before the command runs.
RESERVED = [
    *("PATH", "HOME", "IFS", "ENV", "BASH_ENV", "BASH_FUNC_x", "BASHOPTS", "SHELLOPTS", "PS4"),
    *("PROMPT_COMMAND", "CDPATH", "GLOBIGNORE", "TMPDIR", "SHELL", "PWD", "LD_PRELOAD"),
    *("LD_LIBRARY_PATH", "LD_AUDIT", "GLIBC_TUNABLES", "LOCPATH", "GCONV_PATH", "CI_BUILD_ID"),
    *("CI_WORKSPACE", "CI_ANYTHING", "ci_build_id", "path", "Ld_Preload", "bash_env"),
]
# Names no door can take: not [A-Za-z_][A-Za-z0-9_]*, or too long.
BAD_NAMES = [
    *("1A", "A-B", "A B", "A.B", "A;B", "$(touch x)", "`id`", "A%%", "BASH_FUNC_f%%"),
    *("é", "\uff21"),  # not ASCII: a fullwidth A
    "x" * (MAX_VARIABLE_NAME + 1),
]


TAKES = dict.fromkeys(["A", "B", "N", "F", "ROCKET"], "")


@pytest.fixture
def pipeline(db):
    # The names the accepted triggers below set (a pipeline without parameters takes only its
    # own variables); the refused ones are refused before that rule, for what they are.
    variables = ", ".join(f"{name}: ''" for name in TAKES)
    return make_pipeline(
        "p",
        f"variables: {{{variables}}}\n"
        f"stages: [{{name: s, jobs: [{{id: j, steps: [{{run: x}}]}}]}}]",
    )


def nothing_triggered(pipeline) -> bool:
    pipeline.refresh_from_db()
    counts = (Build.objects.count(), JobRun.objects.count(), BuildVariable.objects.count())
    return pipeline.last_build_number == 0 and counts == (0, 0, 0)


# The doors. Each returns the error code of a refusal, or None for a build triggered.


def via_api(pipeline, variables: dict) -> str | None:
    body = json.dumps({"variables": variables})  # ASCII: a lone surrogate as a \uXXXX escape
    response = client_for("builds.add_build").post(
        f"/api/pipelines/{pipeline.pk}/builds/", body, content_type="application/json"
    )
    assert response.status_code in (201, 400), response.content
    return None if response.status_code == 201 else response.json()["code"]


def via_admin(pipeline, variables: dict, client) -> str | None:
    lines = "\r\n".join(f"{name}={value}" for name, value in variables.items())
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    response = client.post(url, {"variables": lines})
    if response.status_code == 302:
        return None
    assert response.status_code == 200  # the form again, with a message
    [message] = [str(m) for m in response.context["messages"]]
    assert response.context["form"]["variables"].value() == lines  # nothing typed is lost
    return message.split(":")[0]


def via_cli(pipeline, variables: dict) -> str | None:
    args = [f"--var={name}={value}" for name, value in variables.items()]
    try:
        call_command("trigger", pipeline.name, *args, stdout=io.StringIO())
    except CommandError as exc:
        return str(exc).split(":")[0]
    return None


DOORS = {"api": via_api, "admin": via_admin, "cli": via_cli}


@pytest.fixture
def admin_client(db):
    """A superuser's session (without the password hashing of pytest-django's fixture)."""
    client = Client()
    client.force_login(User.objects.create_superuser("root", password=None))
    return client


@pytest.fixture(params=DOORS)
def door(request):
    send = DOORS[request.param]
    if request.param == "admin":
        client = request.getfixturevalue("admin_client")
        return lambda pipeline, variables: send(pipeline, variables, client)
    return send


@pytest.mark.parametrize(
    "variables",
    [
        *({name: "x"} for name in RESERVED + BAD_NAMES),
        {"A": "x" * (MAX_VARIABLE_VALUE + 1)},
        {"A": "é" * (MAX_VARIABLE_VALUE // 2 + 1)},  # counted in UTF-8 bytes, not characters
        {f"V{i}": "x" for i in range(MAX_VARIABLES + 1)},
        {f"V{i}": "x" * 30_000 for i in range(MAX_VARIABLES_TOTAL // 30_000 + 1)},
        {"OK": "1", "PATH": "/tmp"},  # one bad variable refuses them all
    ],
    ids=lambda v: f"{len(v)}x{next(iter(v))[:24]}={len(next(iter(v.values())))}B",
)
def test_refused_at_every_door_and_nothing_is_stored(pipeline, door, variables):
    assert door(pipeline, variables) == "INVALID_VARIABLES"
    assert nothing_triggered(pipeline)


@pytest.mark.parametrize(
    ("door_name", "variables"),
    [
        ("api", {"A\n": "x"}),
        ("api", {"": "x"}),
        ("api", {"A\x00": "x"}),
        ("api", {"\ud800": "x"}),
        ("api", {"A": "\x00"}),
        ("api", {"A": "a\x00b"}),
        ("api", {"A": "\ud800"}),
        ("api", {"A": "a\udfffb"}),
        ("api", {"A": ["x"]}),
        ("api", {"A": {"B": "x"}}),
        ("cli", {"": "x"}),
        ("cli", {"A": "a\x00b"}),
        ("cli", {"\udcff": "x"}),  # what Python makes of a non-UTF-8 byte in argv
        ("cli", {"A": "\udcff"}),
    ],
)
def test_what_only_some_doors_can_carry_is_refused(pipeline, door_name, variables):
    assert DOORS[door_name](pipeline, variables) == "INVALID_VARIABLES"
    assert nothing_triggered(pipeline)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("A=1\r\nA=2", "INVALID_VARIABLES"),  # given twice
        ("=x", "INVALID_VARIABLES"),
        ("$(touch x)", "INVALID_VARIABLES"),  # no '='
        (" PATH =x", "INVALID_VARIABLES"),  # the name is trimmed, then refused
    ],
)
def test_admin_lines_that_cannot_be_read_are_refused(admin_client, pipeline, text, code):
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    response = admin_client.post(url, {"variables": text})
    [message] = [str(m) for m in response.context["messages"]]
    assert message.startswith(f"{code}: ")
    assert nothing_triggered(pipeline)


def test_admin_refuses_a_nul_character_as_a_form_error(admin_client, pipeline):
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    response = admin_client.post(url, {"variables": "A=a\x00b"})
    assert response.status_code == 200
    assert "Null characters are not allowed." in response.text
    assert nothing_triggered(pipeline)


def test_cli_refuses_a_variable_given_twice(pipeline):
    with pytest.raises(CommandError, match=r"^INVALID_VARIABLES: --var A given twice"):
        call_command("trigger", "p", "--var=A=1", "--var=A=2", stdout=io.StringIO())
    assert nothing_triggered(pipeline)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"variables": {"A": "\xff"}}', "PARSE_ERROR"),  # not UTF-8
        (b'{"variables": {"\xff": "x"}}', "PARSE_ERROR"),
        (b'{"variables": {"A": "\xed\xa0\x80"}}', "PARSE_ERROR"),  # a surrogate, encoded
        (b'{"variables": {"A": "\xc0\xaf"}}', "PARSE_ERROR"),  # an overlong '/'
        (b'{"variables": {"A": "\\ud800"}}', "INVALID_VARIABLES"),  # a lone surrogate, escaped
        (b'{"variables": {"A": "\\udc80\\ud800"}}', "INVALID_VARIABLES"),  # a pair reversed
        (b'{"variables": {"\\ud800": "x"}}', "INVALID_VARIABLES"),
        (b'{"variables": {"A": "\\u0000"}}', "INVALID_VARIABLES"),
        (b'{"variables": {"A": "1", "A": "2"}}', "PARSE_ERROR"),  # which one? refused
        (b'{"variables": {"A": 1e400}}', "INVALID_REQUEST"),  # inf: not JSON any more
        (b'{"variables": {"A": -1e400}}', "INVALID_REQUEST"),
        (b'{"variables": {"A": Infinity}}', "PARSE_ERROR"),
        (b'{"variables": {"A": ' + b"9" * 5000 + b"}}", "PARSE_ERROR"),  # int digits limit
    ],
)
def test_raw_bodies_are_refused_with_a_code(pipeline, body, code):
    response = client_for("builds.add_build").post(
        f"/api/pipelines/{pipeline.pk}/builds/", body, content_type="application/json"
    )
    assert (response.status_code, response.json()["code"]) == (400, code)
    assert nothing_triggered(pipeline)


def test_a_surrogate_pair_and_big_numbers_are_text(pipeline):
    body = b'{"variables": {"ROCKET": "\\ud83d\\ude80", "N": 12345678901234567890123, "F": 1.5}}'
    response = client_for("builds.add_build").post(
        f"/api/pipelines/{pipeline.pk}/builds/", body, content_type="application/json"
    )
    assert response.status_code == 201
    assert services.build_variables(response.json()["id"]) == TAKES | {
        "ROCKET": "🚀",
        "N": "12345678901234567890123",
        "F": "1.5",
    }


def test_admin_undecodable_bytes_become_replacement_characters(admin_client, pipeline):
    # Django decodes form data with errors="replace": stored as U+FFFD, never a 500.
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    body = "variables=A%3Da%FFb%0D%0AB%3D%ED%A0%80"
    response = admin_client.post(url, body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 302
    build = Build.objects.get()
    assert services.build_variables(build.pk) == TAKES | {"A": "a\ufffdb", "B": "\ufffd" * 3}


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029"])
def test_admin_values_keep_characters_that_are_not_line_breaks(admin_client, pipeline, separator):
    url = reverse("admin:builds_pipeline_trigger", args=(pipeline.pk,))
    value = f"a{separator}B=c"  # str.splitlines() would have made this two variables
    assert admin_client.post(url, {"variables": f"A={value}"}).status_code == 302
    assert services.build_variables(Build.objects.get().pk) == TAKES | {"A": value}


# What reaches the step ----------------------------------------------------------------------


@pytest.fixture
def agent(settings, tmp_path):
    settings.AGENT_WORKSPACE_ROOT = str(tmp_path / "workspaces")
    agents.register_agent("a1", "host", ["unit-tests"], 1, "1")


def steps_pipeline(*commands: str, takes=()):
    """A pipeline of one job of `commands`, whose trigger may set the variables `takes`."""
    steps = ", ".join(f"{{run: {_yaml(c)}}}" for c in commands)
    variables = ", ".join(f"{name}: ''" for name in takes)
    return make_pipeline(
        f"run{Build.objects.count()}",
        f"variables: {{{variables}}}\n"
        f"stages: [{{name: s, jobs: [{{id: j, runs-on: unit-tests, steps: [{steps}]}}]}}]",
    )


def _yaml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def run_build(build) -> str:
    return AgentProcess("a1", ["unit-tests"]).run_job(JobRun.objects.get(build=build).pk, 1)


def test_injections_reach_the_steps_as_data_through_every_door(agent, admin_client, tmp_path):
    """Triggered through each door, then set again by a step for the next one: every value
    arrives byte for byte, and no payload runs."""
    marker, out = tmp_path / "pwned", tmp_path / "out"
    out.mkdir()
    values = {f"V{i}": v.replace(MARK, str(marker)) for i, v in enumerate(INJECTIONS)}
    one_line = {n: v for n, v in values.items() if "\n" not in v and "\r" not in v}
    first = [f'printf %s "${n}" > {out}/$CI_BUILD_ID-{n}' for n in values]
    # The step prints them back as set-variable lines, and invalid UTF-8 and a NUL besides.
    first += [f"printf '::set-variable name=S{n}::%s\\n' \"${n}\"" for n in one_line]
    first.append(r"printf '::set-variable name=RAW::a\377\355\240\200\000b\n'")
    second = [f'printf %s "$S{n}" > {out}/$CI_BUILD_ID-S{n}' for n in one_line]
    second.append(f'printf %s "$RAW" > {out}/$CI_BUILD_ID-RAW')
    pipeline = steps_pipeline("\n".join(first), "\n".join(second), takes=values)
    set_by_step = {f"S{n}": v for n, v in one_line.items()}
    set_by_step["RAW"] = "a" + "\ufffd" * 5 + "b"  # each undecodable byte, and the NUL

    sent = {}
    for trigger, variables in [
        (via_api, values),
        (via_cli, values),
        (lambda p, v: via_admin(p, v, admin_client), one_line),  # one line per variable
    ]:
        assert trigger(pipeline, variables) is None
        sent[Build.objects.latest("id")] = variables
    for build, variables in sent.items():
        assert run_build(build) == "SUCCEEDED"
        expected = {**dict.fromkeys(values, ""), **variables, **set_by_step}
        got = {n: (out / f"{build.pk}-{n}").read_bytes() for n in expected}
        assert got == {n: v.encode() for n, v in expected.items()}
        assert services.build_variables(build.pk) == expected
    assert not marker.exists()


def test_values_at_the_limits_reach_the_step_whole(agent, tmp_path):
    out = tmp_path / "out"
    size = (MAX_VARIABLES_TOTAL - MAX_VARIABLE_VALUE - 2000) // (MAX_VARIABLES - 1) - 4
    values = {f"V{i:03}": str(i % 10) * size for i in range(MAX_VARIABLES - 1)}
    values["B" * MAX_VARIABLE_NAME] = "é" * (MAX_VARIABLE_VALUE // 2)  # 32 KiB exactly
    assert sum(len(n) + len(v.encode()) for n, v in values.items()) <= MAX_VARIABLES_TOTAL
    pipeline = steps_pipeline(
        f'printf %s "${"B" * MAX_VARIABLE_NAME}" > {out}-big; env | grep -c "^V[0-9]" > {out}-n',
        takes=values,
    )
    build = services.trigger_build(pipeline, values)
    assert run_build(build) == "SUCCEEDED"
    assert (tmp_path / "out-big").read_text() == "é" * (MAX_VARIABLE_VALUE // 2)
    assert (tmp_path / "out-n").read_text() == f"{MAX_VARIABLES - 1}\n"


def test_reserved_names_in_stored_rows_never_reach_bash(agent, tmp_path):
    """Refused at every door; a row holding one anyway (an older build) is still only data."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.sh"
    evil.write_text(f"touch {marker}\n")
    build = services.trigger_build(steps_pipeline(f"env > {tmp_path}/env"))
    rows = {
        "BASH_ENV": str(evil),
        "BASH_FUNC_env%%": f"() {{ touch {marker}; }}",
        "SHELLOPTS": "xtrace",
        "LD_PRELOAD": "/nonexistent/evil.so",
        "PATH": str(tmp_path),
    }
    BuildVariable.objects.bulk_create(
        BuildVariable(build=build, build_created_at=build.created_at, name=n, value=v)
        for n, v in rows.items()
    )
    assert run_build(build) == "SUCCEEDED"
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert not marker.exists()
    assert not {"BASH_ENV", "BASH_FUNC_env%%", "SHELLOPTS", "LD_PRELOAD"} & set(env)
    assert env["PATH"] != str(tmp_path)


# Names that change what runs, each proven live: given to bash as is, it has an effect (a
# marker file, or output from a command that prints nothing); through step_environment, none.
LIVE = {
    "BASH_ENV": ({"BASH_ENV": "@EVIL@"}, "true"),  # sourced before the command
    "BASH_FUNC": ({"BASH_FUNC_true%%": "() { touch @MARK@; }"}, "true"),  # an exported function
    "SHELLOPTS": ({"SHELLOPTS": "xtrace"}, "true"),  # prints "+ true"
    "PATH": ({"PATH": "@DIR@"}, "ls /dev/null >/dev/null"),  # @DIR@/ls is ours
    "LD_PRELOAD": ({"LD_PRELOAD": "/nonexistent/evil.so"}, "true"),  # ld.so complains
    "LD_AUDIT": ({"LD_AUDIT": "/nonexistent/evil.so"}, "true"),
}


@pytest.mark.parametrize(("variables", "command"), LIVE.values(), ids=LIVE)
def test_names_that_would_change_what_runs_are_dropped(tmp_path, variables, command):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.sh").write_text(f"touch {marker}\n")
    (tmp_path / "ls").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (tmp_path / "ls").chmod(0o755)
    subst = {"@MARK@": str(marker), "@EVIL@": str(tmp_path / "evil.sh"), "@DIR@": str(tmp_path)}
    for key, path in subst.items():
        variables = {n: v.replace(key, path) for n, v in variables.items()}

    def effect(env) -> bool:
        output = StepOutput(1 << 20)
        run_step(command, cwd=str(tmp_path), env=env, timeout=10, output=output, grace=1)
        return marker.exists() or output.take() != ""

    assert not effect(step_environment(variables, {"CI": "true"}))
    assert effect({"PATH": "/usr/bin:/bin", **variables})  # the payload is live


@pytest.mark.parametrize("name", RESERVED + BAD_NAMES)
def test_a_step_cannot_set_what_no_door_takes(name):
    output = StepOutput(1 << 20)
    output.feed(f"::set-variable name={name}::$(touch x)\n".encode())
    output.close()
    assert output.variables == {}
    [warning] = output.warnings
    assert warning.startswith("set-variable ignored: ")


def test_a_step_cannot_set_too_large_a_value():
    output = StepOutput(1 << 20)
    output.feed(b"::set-variable name=A::" + b"x" * (MAX_VARIABLE_VALUE + 1) + b"\n")
    output.close()
    assert output.variables == {}
    assert output.warnings == [f"set-variable ignored: A is over {MAX_VARIABLE_VALUE} bytes"]
