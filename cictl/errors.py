"""cictl's exit codes and errors. The codes are part of cictl's interface: scripts branch on
them, so they never change meaning (tests/cictl checks each)."""

# The exit codes (main's docstring and `cictl --help` list them too).
OK = 0
BUILD_NOT_SUCCEEDED = 1  # the build ended, and not SUCCEEDED (FAILED, CANCELED, ...)
USAGE = 2  # click's and typer's own for bad arguments; ours for a bad -p
REFUSED = 3  # the server answered 4xx (its code printed), or a name matched nothing
SERVER = 4  # the server is unreachable, answered 5xx, or answered what cictl cannot read
NOT_CONFIGURED = 5  # no URL or token, or the config file cannot be read
INTERRUPTED = 130  # Ctrl-C: the build goes on


class CictlError(Exception):
    """An error cictl reports as `error CODE: detail` on stderr, exiting with `exit_code`."""

    exit_code = SERVER

    def __init__(self, code: str, detail: str, *, status: int | None = None, body=None):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail
        self.status = status  # the HTTP status, when the server answered
        self.body = body  # the server's error body (JSON), when it sent one


class Refused(CictlError):
    """The server refused the request (4xx), or what was named does not exist."""

    exit_code = REFUSED


class ServerFailed(CictlError):
    """The server could not be reached, failed (5xx), or answered something unreadable."""

    exit_code = SERVER


class Unreachable(ServerFailed):
    """No answer at all: a connection refused or dropped, a timeout. Safe to try again for
    a read."""


class NotConfigured(CictlError):
    exit_code = NOT_CONFIGURED


class UsageError(CictlError):
    exit_code = USAGE


class Interrupted(CictlError):
    exit_code = INTERRUPTED
