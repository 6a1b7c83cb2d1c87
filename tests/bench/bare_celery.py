"""The reference of the latency benchmarks: bare Celery on the same broker. A task
published here and started by a worker process of its own (no Django, no database), which
writes when it started into a Redis list. `celery -A tests.bench.bare_celery worker`."""

import os
import subprocess
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery

QUEUE = "bare-reference"
STARTS = "bare-reference:started"


def broker_beside(url: str) -> str:
    """A Redis database of its own, four below the suite's (a parallel suite takes those just
    below: tests/conftest.py)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{(int(parts.path.strip('/') or 0) - 4) % 16}"))


app = Celery("bare", broker=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_default_queue=QUEUE, worker_prefetch_multiplier=1, task_ignore_result=True)


@app.task(name="bare.started")
def started(n: int) -> None:
    redis.Redis.from_url(app.conf.broker_url).rpush(STARTS, f"{n} {time.time()}")


def reference_ms(broker: str, count: int = 200) -> list[float]:
    """Publish-to-start of `count` bare tasks, one at a time, each waited for (ms)."""
    client = redis.Redis.from_url(broker)
    client.flushdb()
    env = {**os.environ, "BARE_BROKER_URL": broker}
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.bench.bare_celery", "worker", "--pool",
         "solo", "-Q", QUEUE, "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--loglevel", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        app.conf.broker_url = broker
        latencies = []
        for n in range(count + 10):
            sent = time.time()
            started.delay(n)
            popped = client.blpop(STARTS, timeout=30)
            assert popped is not None, "the bare Celery worker did not start the task in 30 s"
            if n >= 10:  # the first warm the connections
                latencies.append((float(popped[1].split()[1]) - sent) * 1000)
        return latencies
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        client.flushdb()
