"""The Redis transport (ciproject.broker) against the real Redis, driven by kombu's event
loop as a Celery worker drives it."""

import threading
import uuid

from kombu import Connection, Consumer, Queue
from kombu.asynchronous import Hub

from tests.conftest import TEST_BROKER_URL
from tests.support import wait_until

BRPOP_SECONDS = 20  # the pending BRPOP's own timeout: far past the test's deadline


def test_a_queue_consumed_while_a_brpop_waits_is_served_at_once_and_nothing_is_lost():
    first, added = (Queue(f"broker-test-{name}-{uuid.uuid4().hex}") for name in ("a", "b"))
    received = []
    hub = Hub()
    connection = Connection(
        TEST_BROKER_URL,
        transport="ciproject.broker:Transport",
        transport_options={"polling_interval": BRPOP_SECONDS},
    )
    with connection:
        channel = connection.default_channel
        connection.register_with_event_loop(hub)
        for queue in (first, added):
            queue(channel).declare()
        on_message = lambda body, message: (received.append(body), message.ack())  # noqa: E731
        consumers = [Consumer(channel, [first], callbacks=[on_message])]
        consumers[0].consume()
        stop = threading.Event()

        def loop():
            cycle = hub.create_loop()
            while not stop.is_set():
                next(cycle)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        wait_until(lambda: channel._in_poll, timeout=10, message="a BRPOP on the first queue")

        def consume_added():  # as Celery's add_consumer does: on the loop's thread
            consumers.append(Consumer(channel, [added], callbacks=[on_message]))
            consumers[1].consume()

        hub.call_soon(consume_added)
        wait_until(lambda: len(consumers) == 2, timeout=10, message="the added consumer")
        producer = connection.Producer()
        # To the added queue alone: the pending BRPOP, on the first queue, would not see it.
        producer.publish({"n": 0}, routing_key=added.name)
        wait_until(lambda: received, timeout=BRPOP_SECONDS / 4, message="the added queue's message")
        for n in range(1, 20):
            producer.publish({"n": n}, routing_key=(added if n % 2 else first).name)
        wait_until(lambda: len(received) == 20, timeout=10, message=f"20 messages; got {received}")
        stop.set()
        hub.call_soon(lambda: None)  # wakes the loop to see the stop
        thread.join(10)
        hub.close()
        for consumer in consumers:  # ends the BRPOP left pending, which closing would await
            consumer.cancel()
    assert sorted(body["n"] for body in received) == list(range(20))
