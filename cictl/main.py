"""cictl, ciproject's command-line client: trigger builds, watch them, read their logs,
cancel and retry them, through the REST API only.

Configuration: CICTL_URL and CICTL_TOKEN, else `url` and `token` in a TOML file
($CICTL_CONFIG, else ~/.config/cictl/config.toml); the environment wins, one key at a time.
The token is sent as `Authorization: Token ...` and never printed.

Exit codes (stable: scripts may branch on them):

    0  success; with --wait (or logs --follow): the build SUCCEEDED
    1  the build ended, but not SUCCEEDED (FAILED, CANCELED, QUEUE_TIMEOUT)
    2  usage error: a bad option or argument
    3  refused: the server answered 4xx (`error CODE: detail`), or a
       pipeline or step name matched nothing (or several steps)
    4  server unreachable, or it answered 5xx or something unreadable
    5  not configured: no URL or token, or an unreadable config file
  130  interrupted (Ctrl-C) while waiting; the build goes on

Errors go to stderr as `error CODE: detail`; with --json, stdout holds JSON only.
"""

import functools
import os
import sys
from typing import Annotated

import typer

from cictl import __version__, commands, session
from cictl.errors import INTERRUPTED, CictlError, Interrupted

EXIT_CODES = __doc__.split("Exit codes", 1)[1].split("\n\n", 2)[1]

app = typer.Typer(
    help="ciproject's client: trigger builds, watch them, read their logs, cancel and retry"
    " them (through the REST API). Configure it with CICTL_URL and CICTL_TOKEN, or `url` and"
    " `token` in ~/.config/cictl/config.toml (or the file $CICTL_CONFIG names).",
    epilog="\b\nExit codes:\n" + EXIT_CODES,  # \b: click keeps the lines as they are
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    # Typer's pretty tracebacks show local variables, which may hold the token.
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"cictl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Print each request and answer on stderr (never the token)."
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    ctx.call_on_close(session.start(verbose=verbose).close)


def command(function, name: str | None = None) -> None:
    """Register a command: a CictlError becomes `error CODE: detail` on stderr and its exit
    code, Ctrl-C exit 130."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        out = session.current().out
        try:
            return function(*args, **kwargs)
        except CictlError as exc:
            out.error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            out.error(Interrupted("INTERRUPTED", "stopped"))
            raise typer.Exit(INTERRUPTED) from None
        except BrokenPipeError:
            # Whoever read stdout (`| head`) stopped: nothing more to say, to anyone.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
            raise typer.Exit(0) from None

    app.command(name)(run)


for function, name in [
    (commands.trigger, None),
    (commands.status, None),
    (commands.logs, None),
    (commands.cancel, None),
    (commands.retry, None),
    (commands.retry_step, "retry-step"),
    (commands.config, None),
    (commands.version, None),
]:
    command(function, name)
