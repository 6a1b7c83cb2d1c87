"""The gunicorn worker class of web (deploy/Procfile): uvicorn's, serving ciproject.asgi."""

from uvicorn_worker import UvicornWorker


class Worker(UvicornWorker):
    # A follower's stream never ends by itself: on shutdown, give open responses this long,
    # then close them (the streams resume from Last-Event-ID on another worker).
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "timeout_graceful_shutdown": 3}
