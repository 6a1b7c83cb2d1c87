"""cictl's commands. Each takes what it needs from the REST API only; the session (output,
API client) comes from the root command (main.py)."""

import uuid
from typing import Annotated

import typer

from cictl import __version__, lookup, render, watch
from cictl import logs as step_logs
from cictl.config import default_path, display_url
from cictl.errors import BUILD_NOT_SUCCEEDED
from cictl.session import Session
from cictl.session import current as session

BuildId = Annotated[int, typer.Argument(metavar="BUILD", help="The build's id.", min=1)]
Json = Annotated[
    bool, typer.Option("--json", help="Print the API's JSON (nothing else on stdout).")
]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Wait until the build has ended, showing its progress; exit 0 only if it"
        " SUCCEEDED, else 1.",
    ),
]


def trigger(
    pipeline: Annotated[
        str, typer.Argument(metavar="PIPELINE", help="The pipeline's name, or its id.")
    ],
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="KEY=VALUE",
            help="A variable (or parameter) of the build; again for each.",
        ),
    ] = None,
    wait: Wait = False,
    as_json: Json = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            metavar="KEY",
            help="The same trigger sent again with KEY makes no other build: it prints the"
            " one the first made. (Without it, cictl makes one per run, so its own"
            " retries after a lost answer are safe.)",
        ),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(help="Its place in its concurrency group's queue (0 to max-priority)."),
    ] = None,
) -> None:
    """Trigger a build of PIPELINE; print its id, number and status."""
    s = session()
    variables = parse_params(params or [])
    found = lookup.pipeline(s.api, pipeline)
    s.remember_pipeline(found)
    body: dict = {"variables": variables}
    if priority is not None:
        body["priority"] = priority
    build, response = s.api.post(
        f"/api/pipelines/{found['id']}/builds/",
        body,
        headers={"Idempotency-Key": idempotency_key or str(uuid.uuid4())},
        safe=True,
    )
    if idempotency_key and response.headers.get("Idempotent-Replayed") == "true":
        s.out.note(f"build {build['id']} was made earlier by a trigger with this key")
    if wait:
        finish(s, build, as_json)
    elif as_json:
        s.out.json(build)
    else:
        s.out.line(render.heading(build, found["name"]))


def status(build: BuildId, as_json: Json = False, wait: Wait = False) -> None:
    """Print the build's tree: its stages, jobs and steps, with their statuses, attempts,
    durations and reasons."""
    s = session()
    found = s.api.get(f"/api/builds/{build}/")
    if wait:
        finish(s, found, as_json, announce=False)
    elif as_json:
        s.out.json(found)
    else:
        show_tree(s, found)


def logs(
    build: BuildId,
    step: Annotated[
        str | None,
        typer.Option(
            "--step",
            metavar="STEP",
            help="Only this step: its name (in every job that has it), job/step, or its id.",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Stream the logs as they are written, step after step, until the build"
            " ends; exit 0 only if it SUCCEEDED, else 1.",
        ),
    ] = False,
    attempt: Annotated[
        int | None,
        typer.Option(min=1, help="That attempt's log of each step (default: the latest)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help='JSON lines: {"event": "log", "step_id", "job", "step", "attempt",'
            ' "text", ...}; with --follow, one per chunk (with its "seq"), an "end" per'
            ' attempt (its "status") and a last "build" (its "status").',
        ),
    ] = False,
) -> None:
    """Print the logs of the build's steps in order (stage, job, step), each headed
    `==> job/step`."""
    if follow and attempt is not None:
        raise typer.BadParameter("--follow streams the latest attempts", param_hint="--attempt")
    s = session()
    found = s.api.get(f"/api/builds/{build}/")
    refs = lookup.matching(found, step) if step else lookup.steps(found)
    printer = step_logs.Printer(s, as_json)
    if not follow:
        step_logs.print_logs(s, found, refs, attempt, printer)
        return
    final = step_logs.follow(s, found, refs, printer)
    exit_by_status(final)


def cancel(
    build: BuildId,
    as_json: Json = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the build has stopped (CANCELED).")
    ] = False,
) -> None:
    """Cancel the build: its running steps are stopped, the rest never start."""
    s = session()
    answer, _ = s.api.post(f"/api/builds/{build}/cancel/")
    if wait:
        final = watch.wait(s, build, live=s.out.tty and not as_json)
        if as_json:
            s.out.json(final)
        elif not s.out.tty:
            show_tree(s, final)
        return
    if as_json:
        s.out.json(answer)
    else:
        s.out.line(f"build {build}  {answer['status']}")


def retry(
    build: BuildId,
    failed: Annotated[
        bool,
        typer.Option(
            "--failed",
            help="Only the failed and cancelled jobs, and what waits for them (else every job).",
        ),
    ] = False,
    wait: Wait = False,
    as_json: Json = False,
) -> None:
    """Run a finished build again, as attempt + 1, with the variables it was triggered with."""
    s = session()
    answer, _ = s.api.post(f"/api/builds/{build}/retry/", {"failed_only": failed})
    if wait:
        finish(s, answer, as_json)
    elif as_json:
        s.out.json(answer)
    else:
        s.out.line(render.heading(answer, s.pipeline_name(answer["pipeline"])))


def retry_step(
    build: BuildId,
    step: Annotated[
        str, typer.Argument(metavar="STEP", help="The step: its id, name, or job/step.")
    ],
    wait: Wait = False,
    as_json: Json = False,
) -> None:
    """Run a failed, timed-out or cancelled step again, then the rest of its job and build."""
    s = session()
    ref = lookup.one_step(s.api.get(f"/api/builds/{build}/"), step)
    answer, _ = s.api.post(f"/api/builds/{build}/steps/{ref.id}/retry/")
    if wait:
        finish(s, s.api.get(f"/api/builds/{build}/"), as_json)
    elif as_json:
        s.out.json(answer)
    else:
        s.out.line(
            f"step {answer['id']}  {ref.label}  {answer['status']}  attempt {answer['attempt']}"
        )


def config(as_json: Json = False) -> None:
    """Print where cictl finds its server and token (never the token itself)."""
    s = session()
    loaded = s.config()
    path = default_path()
    shown = {
        "url": display_url(loaded.url),
        "url_from": loaded.sources["url"],
        "token_from": loaded.sources["token"],
        "file": str(path),
        "file_exists": path.exists(),
    }
    if as_json:
        s.out.json(shown)
        return
    s.out.line(f"url    {shown['url']}  (from {shown['url_from']})")
    s.out.line(f"token  set  (from {shown['token_from']})")
    s.out.line(f"file   {path}{'' if path.exists() else '  (none)'}")


def version(as_json: Json = False) -> None:
    """Print cictl's version."""
    if as_json:
        session().out.json({"version": __version__})
    else:
        session().out.line(f"cictl {__version__}")


# Helpers.
def parse_params(params: list[str]) -> dict[str, str]:
    variables: dict[str, str] = {}
    for param in params:
        key, sep, value = param.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{param!r} is not KEY=VALUE", param_hint="'-p'")
        if key in variables:
            raise typer.BadParameter(f"{key} is given twice", param_hint="'-p'")
        variables[key] = value
    return variables


def finish(s: Session, build: dict, as_json: bool, *, announce: bool = True) -> None:
    """--wait: wait for the build, show it, and exit 0 only if it SUCCEEDED."""
    live = s.out.tty and not as_json
    first = ""
    if announce and not live and not as_json:
        first = render.heading(build, s.pipeline_name(build["pipeline"]))
    final = watch.wait(s, build["id"], live=live, first=first)
    if as_json:
        s.out.json(final)
    elif not live:
        show_tree(s, final)
    exit_by_status(final)


def show_tree(s: Session, build: dict) -> None:
    node = render.tree(build, s.pipeline_name(build["pipeline"]))
    if s.out.tty:
        s.out.console.print(render.rich_tree(node))
    else:
        for line in render.plain_lines(node):
            s.out.line(line)


def exit_by_status(build: dict) -> None:
    if build["status"] != "SUCCEEDED":
        raise typer.Exit(BUILD_NOT_SUCCEEDED)
