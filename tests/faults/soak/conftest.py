import pytest

from tests.faults.stack import RedisServer, running_stack

AGENTS = {f"soak-{n}": "linux,default" for n in range(1, 5)}


@pytest.fixture(scope="package")
def soak_stack(postgres, tmp_path_factory):
    """A stack of four agents on a database and a Redis of its own: the fault suite's stack
    (two agents on the package's Redis) may be up beside it, and must never take its jobs."""
    broker = RedisServer(tmp_path_factory.mktemp("soak-redis"))
    broker.start()
    try:
        with running_stack(postgres.url("soak"), broker.url, tmp_path_factory, agents=AGENTS) as s:
            yield s
    finally:
        broker.stop()
