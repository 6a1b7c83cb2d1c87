"""The REST API, over httpx: the token in the Authorization header, errors turned into
CictlErrors (the server's `code` and `detail`), reads retried through short outages."""

import contextlib
import json
import time

import httpx
from httpx_sse import connect_sse

from cictl import __version__
from cictl.config import Config, display_url
from cictl.errors import Refused, ServerFailed, Unreachable
from cictl.output import Output

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# A log stream is quiet while its step prints nothing, but for the server's keepalives:
# past this with no byte at all, the connection is taken for dropped (and resumed).
STREAM_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=90.0)
TRIES = 3  # per request, where trying again is safe
RETRY_STATUSES = frozenset({502, 503, 504})  # a proxy or the database out for a moment
MAX_PAUSE = 10.0  # seconds, whatever Retry-After asks


class Api:
    def __init__(self, config: Config, output: Output):
        output.hide(config.token)
        self.url, self.out = config.url, output
        self.token_from = config.sources.get("token", "the configuration")
        self.http = httpx.Client(
            base_url=f"{config.url}/",
            headers={
                "Authorization": f"Token {config.token}",
                "Accept": "application/json",
                "User-Agent": f"cictl/{__version__}",
            },
            timeout=TIMEOUT,
            follow_redirects=False,  # a redirect elsewhere is a configuration to fix
        )

    def close(self) -> None:
        self.http.close()

    # Requests: each returns a 2xx response or raises a CictlError.
    def get(self, path: str, params=None):
        return self.json(self.request("GET", path, params=params, safe=True), path)

    def get_text(self, path: str, params=None) -> str:
        return self.request("GET", path, params=params, safe=True).text

    def post(self, path: str, body=None, *, headers=None, safe: bool = False):
        """POST JSON. `safe`: sending it twice does what once does (a trigger with its
        Idempotency-Key), so a lost answer is asked again; else only what certainly did
        nothing is (a refused connection, DATABASE_BUSY)."""
        response = self.request("POST", path, json=body or {}, headers=headers, safe=safe)
        return self.json(response, path), response

    def request(self, method: str, path: str, *, safe: bool, **kwargs) -> httpx.Response:
        for attempt in range(1, TRIES + 1):
            last = attempt == TRIES
            try:
                response = self.send(method, path, **kwargs)
            except httpx.TransportError as exc:
                # A refused connection never reached the server: any request may go again.
                if last or not (safe or isinstance(exc, httpx.ConnectError)):
                    raise self.transport_error(exc, path) from None
                self.pause(attempt, None, f"{type(exc).__name__}")
                continue
            if 200 <= response.status_code < 300:
                return response
            error = self.status_error(response, path)
            again = safe or error.code == "DATABASE_BUSY"  # "nothing was done: retry"
            if last or response.status_code not in RETRY_STATUSES or not again:
                raise error
            self.pause(attempt, response.headers.get("Retry-After"), error.code)
        raise AssertionError("unreachable")  # the loop returns or raises

    def send(self, method: str, path: str, **kwargs) -> httpx.Response:
        started = time.monotonic()
        self.out.debug(f"{method} {display_url(self.url)}{path}{query(kwargs.get('params'))}")
        response = self.http.request(method, path, **kwargs)
        took = (time.monotonic() - started) * 1000
        self.out.debug(f"  {response.status_code} {content_type(response)} ({took:.0f} ms)")
        return response

    def pause(self, attempt: int, retry_after: str | None, why: str) -> None:
        try:
            seconds = min(float(retry_after), MAX_PAUSE) if retry_after else 0.0
        except ValueError:  # an HTTP date: not worth parsing for a pause this short
            seconds = 0.0
        seconds = seconds or 0.5 * 2 ** (attempt - 1)
        self.out.debug(f"  {why}: trying again in {seconds:g} s")
        time.sleep(seconds)

    # The log stream (Server-Sent Events).
    @contextlib.contextmanager
    def events(self, path: str, params: dict, last_event_id: int | None):
        """The events of a stream, from after `last_event_id` (None: from the start)."""
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        self.out.debug(
            f"GET {display_url(self.url)}{path}{query(params)} (stream"
            f"{'' if last_event_id is None else f', from event {last_event_id}'})"
        )
        try:
            with connect_sse(
                self.http, "GET", path, params=params, headers=headers, timeout=STREAM_TIMEOUT
            ) as source:
                response = source.response
                self.out.debug(f"  {response.status_code} {content_type(response)}")
                if not 200 <= response.status_code < 300:
                    response.read()
                    raise self.status_error(response, path)
                if content_type(response) != "text/event-stream":
                    raise ServerFailed(
                        "NO_LOG_STREAM",
                        f"the server does not stream logs: {path}?follow=1 answered"
                        f" {content_type(response) or 'no content type'}, not"
                        " text/event-stream (an older server?); `cictl logs` without"
                        " --follow prints the logs as they are",
                        status=response.status_code,
                    )
                yield source.iter_sse()
        except httpx.TransportError as exc:
            raise self.transport_error(exc, path) from None

    # Errors.
    def transport_error(self, exc: httpx.TransportError, path: str) -> Unreachable:
        where = display_url(self.url)
        if isinstance(exc, httpx.TimeoutException):
            return Unreachable("TIMEOUT", f"{where} did not answer in time ({path})")
        reason = str(exc) or type(exc).__name__
        return Unreachable("UNREACHABLE", f"cannot reach {where}: {reason}")

    def status_error(self, response: httpx.Response, path: str):
        status = response.status_code
        if 300 <= status < 400:
            return ServerFailed(
                "REDIRECTED",
                f"{path} is redirected to {response.headers.get('Location', '?')}:"
                " set the server URL (CICTL_URL) to where the API is",
                status=status,
            )
        body = None
        with contextlib.suppress(ValueError):
            body = response.json()
        if isinstance(body, dict) and isinstance(body.get("code"), str):
            code, detail = body["code"], str(body.get("detail", ""))
            extra = {k: v for k, v in body.items() if k not in ("code", "detail")}
            for key, value in extra.items():
                detail += f"\n  {key}: {json.dumps(value, ensure_ascii=False)}"
        else:  # not the API's answer: a proxy's page, or not a ciproject server
            code = f"HTTP_{status}"
            detail = f"{response.reason_phrase} ({path})"
            if content_type(response) == "text/plain":
                detail += f": {' '.join(response.text.split())[:200]}"
            else:
                detail += (
                    f", not in the API's error format ({content_type(response) or 'no type'}):"
                    f" is {display_url(self.url)} the ciproject server?"
                )
        if status == 401:
            detail += f"\n  (the API token, from {self.token_from}, was not accepted)"
        error = ServerFailed if status >= 500 else Refused
        return error(code, detail, status=status, body=body)

    def json(self, response: httpx.Response, path: str):
        try:
            return response.json()
        except ValueError:
            raise ServerFailed(
                "BAD_RESPONSE",
                f"{path} answered {content_type(response) or 'no content type'}, not JSON:"
                f" is {display_url(self.url)} a ciproject server?",
                status=response.status_code,
            ) from None


def content_type(response: httpx.Response) -> str:
    return response.headers.get("Content-Type", "").partition(";")[0].strip()


def query(params) -> str:
    return f"?{httpx.QueryParams(params)}" if params else ""
