"""The fault stack's tests keep to one worker of a parallel run (conftest.py): two of them at
once on the machine's one RabbitMQ node made each other fail (one stopped the node's app while
the other added its virtual host)."""

import os


def test_the_fault_stack_tests_are_one_group(postgres, request):
    assert request.node.get_closest_marker("xdist_group").args == ("fault-stack",)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: the scheduler groups by the id
        assert request.node.nodeid.endswith("@fault-stack"), request.node.nodeid
