"""Step logs: as they are (`GET .../log/`, text/plain), or followed as they grow (`GET
.../log/?follow=1`, Server-Sent Events: `log` events with an increasing id and
`{"text": ...}`, then one `end` event with the attempt's status), step after step, until
the build is final. A dropped stream is resumed with Last-Event-ID."""

import json
import time

from cictl import render
from cictl.errors import ServerFailed, Unreachable
from cictl.lookup import StepRef
from cictl.session import Session
from cictl.watch import INTERVAL, OUTAGE, Poller

MAX_RECONNECT_PAUSE = 5.0


class Printer:
    """Log text on stdout, each step headed `==> job/step` (with its attempt past the
    first), or JSON lines with --json."""

    def __init__(self, session: Session, as_json: bool):
        self.out, self.as_json = session.out, as_json
        self.at_line_start = True

    def head(self, ref: StepRef, attempt: int) -> None:
        if self.as_json:
            return
        self.close_line()
        self.out.line(f"==> {ref.label}{f' (attempt {attempt})' if attempt > 1 else ''}")

    def text(self, ref: StepRef, attempt: int, text: str, **fields) -> None:
        if self.as_json:
            self.out.json_line({"event": "log", **where(ref, attempt), **fields, "text": text})
        elif text:
            self.out.write(text)
            self.at_line_start = text.endswith("\n")

    def end(self, ref: StepRef, attempt: int, status: str) -> None:
        if self.as_json:
            self.out.json_line({"event": "end", **where(ref, attempt), "status": status})

    def build(self, build: dict) -> None:
        if self.as_json:
            self.out.json_line({"event": "build", "id": build["id"], "status": build["status"]})
        self.close_line()

    def close_line(self) -> None:
        """End the text with a newline, if a log left it in the middle of a line."""
        if not self.as_json and not self.at_line_start:
            self.out.write("\n")
            self.at_line_start = True


def where(ref: StepRef, attempt: int) -> dict:
    return {"step_id": ref.id, "job": ref.job["key"], "step": ref.step["name"], "attempt": attempt}


def log_path(build_id: int, ref: StepRef) -> str:
    return f"/api/builds/{build_id}/steps/{ref.id}/log/"


def print_logs(session: Session, build: dict, refs: list[StepRef], attempt: int | None, printer):
    """The logs as they are now, of the steps that have started."""
    for ref in refs:
        step = ref.step
        if step["started_at"] is None and step["status"] in render.NOT_STARTED | {"SKIPPED"}:
            session.out.debug(f"{ref.label}: {step['status']}, no log")
            continue
        if attempt is not None and attempt > step["attempt"]:
            session.out.debug(f"{ref.label}: no attempt {attempt}")
            continue
        shown = attempt or step["attempt"]
        params = {"attempt": attempt} if attempt else None
        text = session.api.get_text(log_path(build["id"], ref), params)
        if not text and step["started_at"] is None:
            continue  # ended without running (cancelled while it waited): nothing to head
        printer.head(ref, shown)
        printer.text(ref, shown, text, status=step["status"] if shown == step["attempt"] else None)
    printer.close_line()


def follow(session: Session, build: dict, refs: list[StepRef], printer: Printer) -> dict:
    """Stream each step's log in turn, waiting for those not started yet, until the build
    is final; return the final build."""
    poller = Poller(session, build["id"])
    for ref in refs:
        step = _started(poller, ref)
        if step is None:
            continue  # it never ran, and now will not
        if step["started_at"] is None:  # it ended without running: what it says, if anything
            print_logs(session, build, [StepRef(ref.stage, ref.job, step)], None, printer)
            continue
        attempt = step["attempt"]
        while attempt is not None:
            printer.head(ref, attempt)
            status = _stream(session, build["id"], ref, attempt, printer)
            printer.end(ref, attempt, status)
            attempt = _next_attempt(poller, ref, attempt)
    final = poller.read()
    while final["status"] not in render.BUILD_FINAL:
        time.sleep(poller.interval())
        final = poller.read()
    printer.build(final)
    return final


def _current(build: dict, ref: StepRef) -> dict:
    for stage in build["stages"]:
        for job in stage["jobs"]:
            for step in job["steps"]:
                if step["id"] == ref.id:
                    return step
    raise ServerFailed("BAD_RESPONSE", f"step {ref.id} is gone from build {build['id']}")


def _started(poller: Poller, ref: StepRef) -> dict | None:
    """The step once it has started or ended; None if it was skipped, or the build ended
    while it waited."""
    while True:
        build = poller.read()
        step = _current(build, ref)
        if step["started_at"] is not None or step["status"] not in render.NOT_STARTED:
            return None if step["status"] == "SKIPPED" and not step["started_at"] else step
        if build["status"] in render.BUILD_FINAL:
            return None
        time.sleep(INTERVAL)


def _next_attempt(poller: Poller, ref: StepRef, ended: int) -> int | None:
    """After attempt `ended` of the step: the next one if it retries automatically (the
    step stays RUNNING between its attempts), else None."""
    while True:
        build = poller.read()
        step = _current(build, ref)
        if step["attempt"] > ended:
            return step["attempt"]
        if step["status"] in render.RUN_FINAL or build["status"] in render.BUILD_FINAL:
            return None
        time.sleep(INTERVAL)


def _stream(session: Session, build_id: int, ref: StepRef, attempt: int, printer) -> str:
    """Print one attempt's log as it streams; return its final status (the end event's)."""
    last_seq: int | None = None
    base = pause = INTERVAL  # until the server says (`retry:`)
    trouble_since = None
    params = {"follow": 1, "attempt": attempt}
    while True:
        try:
            with session.api.events(log_path(build_id, ref), params, last_seq) as events:
                for event in events:
                    if event.retry:
                        base = pause = event.retry / 1000
                    if event.event == "end":
                        return json.loads(event.data or "{}").get("status", "")
                    if event.event != "log":
                        continue
                    seq = int(event.id) if event.id.isdecimal() else None
                    if seq is not None and last_seq is not None and seq <= last_seq:
                        continue  # sent again after a reconnect
                    printer.text(ref, attempt, json.loads(event.data)["text"], seq=seq)
                    last_seq = seq if seq is not None else last_seq
                    pause, trouble_since = base, None
            why = "the stream closed before its end event"
        except ServerFailed as exc:
            if not isinstance(exc, Unreachable) and (exc.status or 0) < 500:
                raise  # not an outage: no stream here (NO_LOG_STREAM), a redirect
            why = f"{exc.code}: {exc.detail}"
        trouble_since = trouble_since or time.monotonic()
        if time.monotonic() - trouble_since > OUTAGE:
            raise ServerFailed("STREAM_LOST", f"the log of {ref.label} stopped: {why}")
        session.out.debug(f"{ref.label}: {why}; resuming after event {last_seq} in {pause:g} s")
        time.sleep(pause)
        pause = min(pause * 2, MAX_RECONNECT_PAUSE)
