"""Web as one ASGI application: the streamed logs (`?follow=1`, Server-Sent Events) are the
small ASGI application of builds.follow, each follower a coroutine waiting on
builds.logstream's wake-ups, never a thread; everything else is the WSGI application, run
by a2wsgi in a pool of threads as gunicorn's threads ran it (Django's own ASGI handler runs
each request's sync code in a thread of its own, which a stream would hold for as long as
it is followed). gunicorn runs it with ciproject.web.Worker."""

import os
import re
from urllib.parse import parse_qs

from a2wsgi import WSGIMiddleware
from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ciproject.settings")
django_wsgi = get_wsgi_application()  # django.setup(), before the models' modules load

from builds.follow import streams  # noqa: E402

# The log action's URL: builds.follow has the action authorise the stream.
STREAM_PATH = re.compile(r"/api/builds/[0-9]+/steps/[0-9]+/log/")

wsgi = WSGIMiddleware(django_wsgi, workers=settings.WEB_THREADS)
follow = streams(django_wsgi)


def is_stream(scope) -> bool:
    if scope["type"] != "http" or not STREAM_PATH.fullmatch(scope["path"]):
        return False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("follow", [""])[-1] not in ("", "0", "false")


async def application(scope, receive, send):
    if scope["type"] == "lifespan":  # nothing to start or stop
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await (follow if is_stream(scope) else wsgi)(scope, receive, send)
