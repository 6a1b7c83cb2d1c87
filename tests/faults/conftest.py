import pytest

from tests.faults.stack import PostgresServer, RedisServer, running_stack


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
    server.stop()


@pytest.fixture(scope="package")
def stack(postgres, broker, tmp_path_factory):
    """The whole stack on its own PostgreSQL and Redis. A test that kills or restarts a part
    brings it back before it ends, so the next one finds the stack whole."""
    with running_stack(postgres.url("faults"), broker.url, tmp_path_factory) as stack:
        yield stack


@pytest.fixture
def runs(tmp_path):
    """A file the test's steps append `job/attempt/step` to, a line each time one starts."""
    path = tmp_path / "runs.log"
    path.touch()
    return path


STACK_FIXTURES = {"postgres", "broker", "stack"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the group into the id
def pytest_collection_modifyitems(items):
    """In a parallel run (`make test`: pytest-xdist, --dist loadgroup) the tests on the fault
    stack run on one worker, one after the other: they share the package's stack (one per
    worker that ran any), and some stop the machine's RabbitMQ node for everyone.
    (test_grouping.py checks that they do.)"""
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("fault-stack"))
