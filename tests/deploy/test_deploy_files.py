"""The deployment files (deploy/), checked without a Docker engine or systemd: none runs here.

- docker-compose.yml parses as YAML and validates against the official Compose Specification
  schema (compose-spec.json beside this file, schema/compose-spec.json of compose-spec/
  compose-spec at commit 00655e2222608fa6eaecdf12ac5195889ca2244a, verbatim); its services
  use the settings' names and the Procfile's commands.
- Dockerfile parses (dockerfile-parse), uses known instructions only and installs from
  requirements.lock.
- The systemd units parse as INI; their ExecStart lines run gunicorn, celery and manage.py as
  the Procfile does, and stop an agent the way its warm shutdown needs.
- env.example lists every setting ciproject/settings.py reads, with its default.
"""

import ast
import configparser
import io
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD = DEPLOY / "systemd"
SCHEMA = Path(__file__).with_name("compose-spec.json")

DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
# Options whose value may differ from the Procfile's (where to listen, where beat keeps state).
PLACE_OPTIONS = ("--bind", "--schedule")
SERVER_UNITS = ("ciproject-web.service", "ciproject-controller.service", "ciproject-beat.service")
AGENT_UNIT = "runagent@.service"
ENV_FILE = "/etc/ciproject/ciproject.env"


# --- what the project says: settings, Procfile, env.example ---------------------------------


def settings_reads() -> dict[str, object]:
    """{name: default} of every environment variable ciproject/settings.py reads (the default
    is ... when it is not a literal)."""
    tree = ast.parse((ROOT / "ciproject" / "settings.py").read_text())
    reads = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and _is_env_read(node.func):
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                reads[name.value] = _literal(node.args[1]) if len(node.args) > 1 else None
        elif (
            isinstance(node, ast.Subscript)
            and ast.unparse(node.value) == "os.environ"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.ctx, ast.Load)
        ):
            reads[node.slice.value] = None
    return reads


def _is_env_read(func: ast.expr) -> bool:
    return ast.unparse(func) in {"os.environ.get", "os.getenv", "env_int", "env_bool"}


ARITHMETIC = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop)


def _literal(node: ast.expr) -> object:
    """A constant or constant arithmetic (1024 * 1024); ... for anything else."""
    if not all(isinstance(n, ARITHMETIC) for n in ast.walk(node)):
        return ...
    return eval(compile(ast.Expression(node), "settings.py", "eval"), {"__builtins__": {}})


SETTINGS = settings_reads()
TEST_RUNNERS = {"PYTEST_XDIST_WORKER"}  # set by a parallel test run, never by an operator


def procfile() -> dict[str, list[str]]:
    processes = {}
    for line in (DEPLOY / "Procfile").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line.strip())
        if match:
            processes[match[1]] = shlex.split(match[2])
    return processes


def env_file(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=value"
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path.name}: {line!r}"
            pairs.append((key, value))
    return pairs


def command_differences(actual: list[str], expected: list[str]) -> list[str]:
    """What differs between two commands, option values of PLACE_OPTIONS aside."""

    def masked(tokens):
        return [
            "<place>" if i and tokens[i - 1] in PLACE_OPTIONS else token
            for i, token in enumerate(tokens)
        ]

    if masked(actual) == masked(expected):
        return []
    return [f"{shlex.join(actual)!r} is not the Procfile's {shlex.join(expected)!r}"]


def option(tokens: list[str], name: str) -> str:
    assert name in tokens, f"{name} missing from {shlex.join(tokens)}"
    return tokens[tokens.index(name) + 1]


def agent_commands() -> dict[str, list[str]]:
    """The Procfile's agents by their --name."""
    return {
        option(tokens, "--name"): tokens for tokens in procfile().values() if "runagent" in tokens
    }


def test_procfile_has_what_the_deployment_files_copy():
    processes = procfile()
    assert processes["web"][:4] == [
        "gunicorn", "ciproject.asgi:application", "--worker-class", "ciproject.web.Worker"
    ]  # fmt: skip
    assert processes["controller"][:4] == ["celery", "-A", "ciproject", "worker"]
    assert processes["beat"][:5] == ["celery", "--quiet", "-A", "ciproject", "beat"]  # no banner
    assert sorted(agent_commands()) == ["agent-1", "agent-2"]


def test_command_differences_catches_a_changed_command():
    def differences(command):
        return command_differences(shlex.split(command), expected)

    expected = shlex.split("celery -A ciproject beat --schedule var/x")
    assert differences("celery -A ciproject beat --schedule /y") == []
    assert differences("celery -A ciproject beat -s /y")
    assert differences("celery -A other beat --schedule var/x")


# --- env.example ---------------------------------------------------------------------------


def test_settings_reads_are_found():
    # The parser finds each kind of read settings.py uses; a blind parser would pass the rest.
    assert {"DATABASE_URL", "DEBUG", "API_MAX_BODY_BYTES", "AGENT_SWEEP_SECONDS"} <= set(SETTINGS)
    assert SETTINGS["DEBUG"] is False
    assert SETTINGS["API_MAX_BODY_BYTES"] == 1024 * 1024
    assert SETTINGS["VAR_DIR"] is ...


def test_env_example_lists_every_setting_with_its_default():
    pairs = env_file(DEPLOY / "env.example")
    names = [key for key, _ in pairs]
    assert len(names) == len(set(names)), "a name is listed twice"
    missing = sorted(set(SETTINGS) - set(names) - TEST_RUNNERS)
    assert not missing, f"settings.py reads {missing}: add them to deploy/env.example"
    unknown = sorted(set(names) - set(SETTINGS) - {"PORT"})
    assert not unknown, f"deploy/env.example lists {unknown}, which settings.py never reads"
    wrong = []
    for key, value in pairs:
        default = SETTINGS.get(key, ...)
        if default is ... or default is None:
            continue
        if isinstance(default, bool):
            same = (value.strip().lower() in {"1", "true", "yes", "on"}) == default
        elif isinstance(default, int | float):
            same = float(value) == float(default)
        else:
            same = value == default
        if not same:
            wrong.append(f"{key}={value} (settings.py: {default!r})")
    assert not wrong, f"defaults differ from settings.py: {wrong}"


# --- docker-compose.yml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # It says "https://json-schema.org/draft-07/schema", which jsonschema does not recognize
    # without the trailing "#": name the draft.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, document) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def ciproject_services(compose: dict) -> dict[str, dict]:
    """The services built from deploy/Dockerfile (the rest are postgres and redis)."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def command_of(service: dict) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def test_compose_file_follows_the_compose_specification(compose, schema_validator):
    errors = schema_errors(schema_validator, compose)
    assert not errors, "\n".join(errors)


def test_the_schema_refuses_what_compose_would_refuse(compose, schema_validator):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["web"]["restart_policy"] = "always"  # not a service key
    broken["services"]["web"]["depends_on"] = {"postgres": {"condition": "healthy"}}
    errors = schema_errors(schema_validator, broken)
    assert len(errors) == 2, errors


def test_compose_services(compose):
    services = compose["services"]
    assert set(services) == {
        "postgres", "redis", "migrate", "web", "controller", "beat", "agent-1", "agent-2",
    }  # fmt: skip
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"
    assert set(ciproject_services(compose)) == set(services) - {"postgres", "redis"}
    assert "8000:8000" in services["web"]["ports"]
    assert services["migrate"]["restart"] == "no"


def test_compose_builds_the_image_of_deploy_dockerfile(compose):
    for name, service in ciproject_services(compose).items():
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE, name


def test_compose_start_order(compose):
    for name, service in ciproject_services(compose).items():
        conditions = {dep: spec["condition"] for dep, spec in service["depends_on"].items()}
        expected = {"postgres": "service_healthy", "redis": "service_healthy"}
        if name != "migrate":
            expected["migrate"] = "service_completed_successfully"
        assert conditions == expected, name


def test_compose_environment_uses_the_settings_names(compose):
    # ensureadmin's arguments, agentrole's password
    bootstrap = {"migrate": {"ADMIN_USER", "ADMIN_PASSWORD", "AGENT_DB_PASSWORD"}}
    interpolated_extra = {"POSTGRES_PASSWORD", "ADMIN_USER", "ADMIN_PASSWORD"}
    interpolated_extra |= {"REDIS_PASSWORD", "AGENT_DB_PASSWORD"}
    for name, service in ciproject_services(compose).items():
        env = service["environment"]
        assert isinstance(env, dict), name
        unknown = set(env) - set(SETTINGS) - bootstrap.get(name, set())
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of settings.py"
        assert {"DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY"} <= set(env), name
        assert urlsplit(env["DATABASE_URL"]).hostname == "postgres", name
        assert urlsplit(env["CELERY_BROKER_URL"]).hostname == "redis", name
        for value in map(str, env.values()):
            for variable in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", value):
                assert variable in set(SETTINGS) | interpolated_extra, f"{name}: ${variable}"


def test_compose_agents_run_the_procfile_agents(compose):
    services = ciproject_services(compose)
    agents = {n: command_of(s) for n, s in services.items() if "runagent" in command_of(s)}
    expected = agent_commands()
    assert {option(tokens, "--name") for tokens in agents.values()} == set(expected)
    for name, tokens in agents.items():
        assert tokens == expected[option(tokens, "--name")], name
        service = services[name]
        workspaces = service["environment"]["AGENT_WORKSPACE_ROOT"]
        volume = next(v for v in service["volumes"] if v.split(":")[1] == workspaces)
        assert volume.split(":")[0] in compose["volumes"], f"{name}: a named volume"
        assert service["stop_grace_period"], f"{name}: a warm shutdown needs time"


def test_compose_agents_run_steps_as_their_own_user_with_their_own_role(compose, dockerfile):
    services = ciproject_services(compose)
    added = [
        command.split()
        for run in instructions(dockerfile, "RUN")
        for command in re.findall(r"useradd ([^&]*)", run)
    ]
    uids = {tokens[-1]: option(tokens, "--uid") for tokens in added}
    server_user = instructions(dockerfile, "USER")[-1].split(":")[0]
    migrate = " ".join(command_of(services["migrate"]))
    assert "manage.py agentrole ciagent" in migrate
    agents = [s for s in services.values() if "runagent" in command_of(s)]
    assert agents
    for service in agents:
        env = service["environment"]
        assert service["user"] == "0:0"  # root in the container: it switches to the step user
        assert uids[env["AGENT_STEP_USER"]] not in {server_user, "0"}
        assert urlsplit(env["DATABASE_URL"]).username == "ciagent"
        assert urlsplit(env["CELERY_BROKER_URL"]).password == "${REDIS_PASSWORD}"


def test_compose_redis_requires_its_password(compose):
    redis_service = compose["services"]["redis"]
    assert "--requirepass" in " ".join(redis_service["command"])
    assert redis_service["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert "$$REDIS_PASSWORD" in " ".join(redis_service["healthcheck"]["test"])


def test_compose_server_processes_run_the_procfile_commands(compose):
    services, processes = compose["services"], procfile()
    for name in ("web", "controller", "beat"):
        tokens = command_of(services[name])
        assert not command_differences(tokens, processes[name]), name
    bind = option(command_of(services["web"]), "--bind")
    assert services["web"]["ports"] == [f"{bind.rsplit(':', 1)[1]}:{bind.rsplit(':', 1)[1]}"]
    schedule = option(command_of(services["beat"]), "--schedule")
    assert schedule.startswith(services["beat"]["environment"]["VAR_DIR"] + "/")


def test_compose_migrate_prepares_like_make_run(compose):
    script = " ".join(command_of(compose["services"]["migrate"]))
    for step in ("migrate --noinput", "ensureadmin", "loadpipeline", "examples/*.yaml"):
        assert step in script


# --- Dockerfile ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def test_dockerfile_parses_into_known_instructions(dockerfile):
    used = {i["instruction"] for i in dockerfile.structure} - {"COMMENT"}
    assert used, "no instruction parsed"
    assert used <= DOCKERFILE_INSTRUCTIONS, used - DOCKERFILE_INSTRUCTIONS
    assert instructions(dockerfile, "FROM") == ["python:3.11-slim"]
    assert dockerfile.baseimage == "python:3.11-slim"


def test_dockerfile_installs_from_the_lock_file(dockerfile):
    copied = " ".join(instructions(dockerfile, "COPY")).split()
    assert "requirements.lock" in copied
    installs = [run for run in instructions(dockerfile, "RUN") if "pip install" in run]
    assert installs, "nothing is installed with pip"
    assert all("requirements.lock" in run for run in installs), installs
    for run in installs:
        assert "[dev]" not in run, "a dev-only install"
        assert "pytest" not in run, "a dev-only install"
    for source in copied[:-1]:  # every COPY source but "." exists
        assert source == "." or (ROOT / source).exists(), source


def test_dockerfile_runs_as_a_user_with_bash_and_static_files(dockerfile):
    runs = instructions(dockerfile, "RUN")
    assert any("apt-get install" in run and re.search(r"\bbash\b", run) for run in runs)
    collect = [run for run in runs if "manage.py collectstatic" in run]
    assert collect, "no collectstatic at build time"
    assert "SECRET_KEY=" in collect[0]
    user = instructions(dockerfile, "USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    last_user = max(i["startline"] for i in dockerfile.structure if i["instruction"] == "USER")
    assert all(
        i["startline"] < last_user for i in dockerfile.structure if i["instruction"] == "RUN"
    ), "a RUN after USER runs as the app user, not as root: keep them before it"


def test_dockerfile_starts_web_by_default(dockerfile):
    entrypoint = json.loads(instructions(dockerfile, "ENTRYPOINT")[-1])
    cmd = json.loads(instructions(dockerfile, "CMD")[-1])
    assert entrypoint[0].endswith("tini")
    assert not command_differences(cmd, procfile()["web"])
    port = option(cmd, "--bind").rsplit(":", 1)[1]
    assert instructions(dockerfile, "EXPOSE") == [port]


def test_dockerignore_keeps_local_state_out():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


# --- systemd units -------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text(), source=name)
    return parser


def unit_values(name: str, key: str) -> list[str]:
    """Every value of a key that may repeat (ExecStart, EnvironmentFile, Environment)."""
    return [
        line.split("=", 1)[1].strip()
        for line in (SYSTEMD / name).read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


def exec_start(name: str) -> list[list[str]]:
    return [shlex.split(line) for line in unit_values(name, "ExecStart")]


def unescaped(tokens: list[str]) -> list[str]:
    return [token.replace("%%", "%") for token in tokens]


def test_every_unit_parses_as_ini():
    names = sorted(p.name for p in SYSTEMD.glob("*.service"))
    assert set(SERVER_UNITS) | {AGENT_UNIT} <= set(names)
    for name in names:
        parsed = unit(name)
        assert {"Unit", "Service"} <= set(parsed.sections()), name
        if name != AGENT_UNIT:  # the agent is root, to run its steps as their own user
            assert parsed["Service"]["User"] not in {"", "root"}, name
        assert ENV_FILE in unit_values(name, "EnvironmentFile"), name
        assert exec_start(name), name


@pytest.mark.parametrize("name", [*SERVER_UNITS, AGENT_UNIT])
def test_long_running_units_restart_and_stop_cleanly(name):
    service = unit(name)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > 0
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert "WantedBy" in unit(name)["Install"]


def test_units_use_only_the_specifiers_they_mean():
    for path in SYSTEMD.glob("*.service"):
        for tokens in exec_start(path.name):
            line = " ".join(tokens).replace("%%", "")
            allowed = "i" if "@" in path.name else ""
            stray = [m for m in re.findall(r"%(.)", line) if m not in allowed]
            assert not stray, f"{path.name}: systemd expands %{stray[0]} (write %% for a %)"


def test_units_define_the_variables_their_commands_use():
    for path in SYSTEMD.glob("*.service"):
        defined = {
            pair.split("=", 1)[0]
            for value in unit_values(path.name, "Environment")
            for pair in shlex.split(value)
        }
        assert defined <= set(SETTINGS) | {"PORT", "AGENT_LABELS", "AGENT_CAPACITY"}, path.name
        for tokens in exec_start(path.name):
            used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", " ".join(tokens)))
            assert used <= defined, f"{path.name}: {sorted(used - defined)} has no default"


def _venv_program(name: str, tokens: list[str], program: str) -> None:
    workdir = unit(name)["Service"]["WorkingDirectory"]
    assert tokens[0] == f"{workdir}/.venv/bin/{program}", f"{name}: {tokens[0]}"


def test_server_units_run_the_procfile_commands():
    processes = procfile()
    for name, process, program in [
        ("ciproject-web.service", "web", "gunicorn"),
        ("ciproject-controller.service", "controller", "celery"),
        ("ciproject-beat.service", "beat", "celery"),
    ]:
        (tokens,) = exec_start(name)
        _venv_program(name, tokens, program)
        tokens = unescaped(tokens)
        assert not command_differences([program, *tokens[1:]], processes[process]), name
    (beat,) = exec_start("ciproject-beat.service")
    assert option(beat, "--schedule").startswith("${VAR_DIR}/")


def test_agent_unit_runs_runagent_for_its_instance():
    (tokens,) = exec_start(AGENT_UNIT)
    _venv_program(AGENT_UNIT, tokens, "python")
    workdir = unit(AGENT_UNIT)["Service"]["WorkingDirectory"]
    assert tokens[1:3] == [f"{workdir}/manage.py", "runagent"]
    assert option(tokens, "--name") == "%i"
    assert option(tokens, "--labels") == "${AGENT_LABELS}"
    assert "/etc/ciproject/agent-%i.env" in {
        f.lstrip("-") for f in unit_values(AGENT_UNIT, "EnvironmentFile")
    }
    assert "/etc/ciproject/agent.env" in unit_values(AGENT_UNIT, "EnvironmentFile")
    assert option(tokens, "--step-user") == "ciagent"  # not root, nor any server process's
    assert unit(AGENT_UNIT)["Service"]["User"] == "root"
    example = dict(env_file(SYSTEMD / "agent.env.example"))
    assert set(example) == {"AGENT_LABELS", "AGENT_CAPACITY"}


def test_agent_unit_waits_for_the_warm_shutdown():
    from agents.process.agent import SHUTDOWN_JOIN_SECONDS
    from builds.definition import StepSpec

    default_step_timeout = StepSpec.model_fields["timeout"].default
    grace = float(SETTINGS["STEP_KILL_GRACE_SECONDS"])
    needed = default_step_timeout + grace + SHUTDOWN_JOIN_SECONDS
    assert int(unit(AGENT_UNIT)["Service"]["TimeoutStopSec"]) >= needed


def test_migrate_unit_prepares_the_server():
    steps = [tokens[1:] for tokens in exec_start("ciproject-migrate.service")]
    assert unit("ciproject-migrate.service")["Service"]["Type"] == "oneshot"
    assert [step[1] for step in steps] == ["checkservices", "migrate", "collectstatic"]
    for name in SERVER_UNITS:
        assert "ciproject-migrate.service" in unit(name)["Unit"]["After"].split()
