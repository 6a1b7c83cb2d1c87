"""A local HTTP server standing in for a forge's API: it records each request and gives the
answers a test lines up, in order (the last one again once the line is used up)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Recorded:
    method: str
    path: str  # as sent, percent-encoding included
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)


@dataclass
class Answer:
    status: int = 201
    body: object = field(default_factory=lambda: {"id": 1})  # dict/list as JSON, str, bytes
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # answer nothing until the server stops


class StatusServer:
    """`with StatusServer() as server:` serves on 127.0.0.1 at `server.url`."""

    def __init__(self):
        self.requests: list[Recorded] = []
        self._answers: list[Answer] = [Answer()]
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        # serve_forever notices a shutdown() at its next poll: a short one keeps teardown quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def answer(self, *answers: Answer) -> None:
        """The answers to the next requests, in order."""
        with self._changed:
            self._answers = list(answers)

    def wait_for_requests(self, count: int, timeout: float = 5) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{len(self.requests)} requests arrived, not {count}")
                self._changed.wait(left)
            return list(self.requests)

    def __enter__(self) -> StatusServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()  # releases hanging answers
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _record(self, recorded: Recorded) -> Answer:
        with self._changed:
            self.requests.append(recorded)
            answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
            self._changed.notify_all()
            return answer

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self._serve()

            def do_GET(self):
                self._serve()

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                headers = {name.lower(): value for name, value in self.headers.items()}
                answer = server._record(
                    Recorded(self.command, self.path, headers, self.rfile.read(length))
                )
                if answer.hang:
                    server._stopping.wait(timeout=30)  # until the test ends, with a bound
                    return
                body = answer.body
                if isinstance(body, dict | list):
                    body, kind = json.dumps(body).encode(), "application/json"
                elif isinstance(body, str):
                    body, kind = body.encode(), "text/plain; charset=utf-8"
                else:
                    kind = "application/octet-stream"
                self.send_response(answer.status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # quiet: pytest shows failures
                pass

        return Handler
