"""The agent-kill and broker-restart faults again, with RabbitMQ as the broker (users choose
either). RabbitMQ keeps the durable queues' persistent messages across its restart, and puts
back what was delivered but not acknowledged: the redeliveries are fenced like duplicates."""

import pytest

from tests.faults.stack import RabbitBroker, running_stack
from tests.faults.test_broker_restart import restart_broker_while_builds_run
from tests.faults.test_process_kills import kill_agent_mid_step


@pytest.fixture(scope="module")
def rabbitmq():
    broker = RabbitBroker()
    yield broker
    broker.remove()


@pytest.fixture(scope="module")
def rabbit_stack(postgres, rabbitmq, tmp_path_factory):
    with running_stack(postgres.url("faults_amqp"), rabbitmq.url, tmp_path_factory) as stack:
        yield stack


def test_agent_killed_mid_step(rabbit_stack, runs):
    kill_agent_mid_step(rabbit_stack, runs)


def test_rabbitmq_restart_while_builds_run(rabbit_stack, rabbitmq, runs):
    restart_broker_while_builds_run(rabbit_stack, rabbitmq, runs)
