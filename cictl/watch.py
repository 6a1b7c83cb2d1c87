"""Waiting for a build to end: polling `GET /api/builds/{id}/`, with a live tree of its
stages, jobs and steps on a terminal, nothing meanwhile otherwise."""

import time
from collections.abc import Callable

from rich.live import Live

from cictl import render
from cictl.errors import Interrupted, ServerFailed
from cictl.session import Session

INTERVAL = 0.5  # seconds between polls, at first
SLOW_INTERVAL = 2.0  # once nothing has changed for SLOW_AFTER
SLOW_AFTER = 30.0
OUTAGE = 60.0  # the server may be out of reach this long (a restart) before waiting fails


class Poller:
    """Reads the build again and again; rides out a server that is away for a while."""

    def __init__(self, session: Session, build_id: int):
        self.session, self.build_id = session, build_id
        self.last: dict | None = None
        self.changed_at = self.answered_at = time.monotonic()
        self.trouble = ""  # why the last poll failed, while it is being ridden out

    def read(self) -> dict:
        try:
            build = self.session.api.get(f"/api/builds/{self.build_id}/")
        except ServerFailed as exc:
            if self.last is None or time.monotonic() - self.answered_at > OUTAGE:
                raise
            self.trouble = f"{exc.code}: {exc.detail} (still trying)"
            return self.last
        now = time.monotonic()
        self.answered_at, self.trouble = now, ""
        if build != self.last:
            self.last, self.changed_at = build, now
        return build

    def interval(self) -> float:
        quiet = time.monotonic() - self.changed_at
        return SLOW_INTERVAL if quiet > SLOW_AFTER else INTERVAL


def wait(session: Session, build_id: int, *, live: bool, first: str = "") -> dict:
    """Poll until the build is final; return it as the API last answered. `first`: a line
    to print before (where there is no live display)."""
    poller = Poller(session, build_id)
    try:
        if first:
            session.out.line(first)
        if not live:
            return _loop(poller, lambda build: None)
        name = None
        with Live(console=session.out.console, refresh_per_second=8, transient=False) as display:

            def show(build: dict) -> None:
                nonlocal name
                name = name or session.pipeline_name(build["pipeline"])
                running = build["status"] not in render.BUILD_FINAL
                node = render.tree(build, name)
                height = session.out.console.size.height if running else None
                shown = render.rich_tree(node, spinning=running, note=poller.trouble, height=height)
                display.update(shown)

            return _loop(poller, show)
    except KeyboardInterrupt:
        raise Interrupted(
            "INTERRUPTED",
            f"stopped waiting; build {build_id} goes on (`cictl cancel {build_id}` stops it)",
        ) from None


def _loop(poller: Poller, show: Callable[[dict], None]) -> dict:
    while True:
        build = poller.read()
        show(build)
        if build["status"] in render.BUILD_FINAL:
            return build
        time.sleep(poller.interval())
