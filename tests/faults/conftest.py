import pytest

from tests.faults.stack import PostgresServer, RedisServer, Stack


@pytest.fixture(scope="package")
def postgres():
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="package")
def broker(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="package")
def stack(postgres, broker, tmp_path_factory):
    """The whole stack on its own PostgreSQL and Redis. A test that kills or restarts a part
    brings it back before it ends, so the next one finds the stack whole."""
    stack = Stack(postgres.url("faults"), broker.url, tmp_path_factory.mktemp("stack-logs"))
    stack.prepare()
    try:
        stack.start_all()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def runs(stack, request):
    """A file the test's steps append `job/attempt/step` to, one line each time one runs."""
    path = stack.work / f"runs-{request.node.name}.log"
    path.touch()
    return path
