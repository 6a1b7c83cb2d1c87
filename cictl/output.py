"""What cictl prints: results on stdout (plain text, or JSON with --json), everything else
(errors, warnings, -v's requests) on stderr. Every piece of text passes `redact` first, so
the API token is never printed, whatever it ends up in."""

import json
import sys

from rich.console import Console

from cictl.errors import CictlError

MASK = "***"


class Output:
    def __init__(self, *, verbose: bool = False):
        self.verbose = verbose
        self.secrets: list[str] = []
        self.stdout, self.stderr = sys.stdout, sys.stderr
        # The live display and trees on a terminal; plain text otherwise (no colours, no
        # cursor movement, no wrapping at 80 columns).
        self.tty = self.stdout.isatty()
        self.console = Console(file=self.stdout, highlight=False)

    def hide(self, secret: str) -> None:
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    # stdout: the command's result.
    def write(self, text: str) -> None:
        self.stdout.write(self.redact(text))
        self.stdout.flush()

    def line(self, text: str = "") -> None:
        self.write(f"{text}\n")

    def json(self, data) -> None:
        """One JSON document (--json)."""
        self.line(json.dumps(data, indent=2, ensure_ascii=False))

    def json_line(self, data) -> None:
        """One JSON value on a line of its own (--json with a stream: logs)."""
        self.line(json.dumps(data, ensure_ascii=False, separators=(",", ":")))

    # stderr: about the command.
    def note(self, text: str) -> None:
        self.stderr.write(self.redact(f"{text}\n"))
        self.stderr.flush()

    def warn(self, text: str) -> None:
        self.note(f"warning: {text}")

    def debug(self, text: str) -> None:
        if self.verbose:
            self.note(f"cictl: {text}")

    def error(self, exc: CictlError) -> None:
        self.note(f"error {exc.code}: {exc.detail}")
