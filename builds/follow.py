"""The streamed step log (`GET /api/builds/{id}/steps/{step_id}/log/?follow=1`), as a small
ASGI application beside the WSGI one (ciproject.asgi routes these requests here).

The request is first put to the WSGI application, in a few threads of its own: the API's
log action authenticates it, checks the permission and the step as for the plain log, and
answers an error as the API does, or (seeing the request marked as one that will stream)
FollowAllowed. Only then does the stream start, on the event loop: a follower is a
coroutine of builds.logstream, holding no thread and no database connection of its own."""

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

from a2wsgi.wsgi import build_environ

from builds import logstream
from builds.api import STREAMING, FollowAllowed

AUTHORIZING_THREADS = 4  # each holds its database connection (CONN_MAX_AGE) between uses
_authorizing = ThreadPoolExecutor(AUTHORIZING_THREADS, thread_name_prefix="log-follow")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # no proxy buffering: each event at once
]


def streams(django_wsgi):
    """The ASGI application of the streams, authorising with `django_wsgi`."""

    async def app(scope, receive, send):
        environ = build_environ(scope, io.BytesIO())
        environ[STREAMING] = True
        environ["HTTP_ACCEPT"] = "application/json"  # the API's errors, not an event stream
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(_authorizing, _authorize, django_wsgi, environ)
        if not isinstance(answer, FollowAllowed):
            status, headers, body = answer
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        after = _last_event_id(environ.get("HTTP_LAST_EVENT_ID", ""))
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        events = logstream.hub().follow(answer.step_id, answer.attempt, after)
        streaming = asyncio.create_task(_send_all(events, send))
        gone = asyncio.create_task(_disconnected(receive))
        await asyncio.wait([streaming, gone], return_when=asyncio.FIRST_COMPLETED)
        for task in (streaming, gone):
            task.cancel()
        await asyncio.gather(streaming, gone, return_exceptions=True)
        if streaming.done() and not streaming.cancelled() and streaming.exception():
            raise streaming.exception()

    return app


def _authorize(django_wsgi, environ):
    """FollowAllowed, or the answer to relay: (status, headers, body)."""
    started = []
    response = django_wsgi(environ, lambda status, headers, exc_info=None: started.append(
        (int(status.split()[0]), [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                  for k, v in headers])
    ))  # fmt: skip
    try:
        if isinstance(response, FollowAllowed):
            return response
        body = b"".join(response)
    finally:
        response.close()  # request_finished: the thread's connection is looked after
    status, headers = started[0]
    return status, headers, body


async def _send_all(events, send) -> None:
    async for chunk in events:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _last_event_id(value: str) -> int:
    """The seq the client had last (a resumed stream starts after it); -1: from the start."""
    return int(value) if value.strip().isdecimal() and len(value) < 12 else -1
