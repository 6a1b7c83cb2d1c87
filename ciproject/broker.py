"""kombu's Redis transport, with one fix (settings use it for redis:// brokers).

When the connection to Redis is lost while tasks run (acks_late: their messages are not yet
acknowledged), the worker closes the channel, and the channel tries to put those messages
back through a connection kombu has already dropped, as does acknowledging a task that ends
after that: kombu 5.7 raises AttributeError ("'NoneType' object has no attribute
'hostname'", or "'client'"), and Celery stops the whole worker ("Unrecoverable error").
tests/faults found it: Redis restarting under a running task killed the controller. Those
messages need no settling from this side: Redis keeps them in its unacknowledged set and
puts them back after the visibility timeout (the redelivery is fenced off like any
duplicate), and if Redis lost them the reconcile sweep re-drives their work."""

import logging

from kombu.transport import redis

log = logging.getLogger(__name__)


class QoS(redis.QoS):
    """Settles what it can; what a lost connection leaves unsettled, Redis redelivers."""

    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except AttributeError:  # the connection is gone: see the module's docstring
            self._left(len(self._delivered))
            self._delivered.clear()
            return None

    def ack(self, delivery_tag):
        try:
            super().ack(delivery_tag)
        except AttributeError:  # a task that ended after its channel was closed
            self._left(1)
            self._quick_ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        try:
            super().reject(delivery_tag, requeue)
        except AttributeError:
            self._left(1)
            self._quick_ack(delivery_tag)

    def _left(self, count: int) -> None:
        log.warning(
            "broker connection lost: %d unacknowledged message(s) left for Redis to redeliver"
            " after the visibility timeout (a redelivery is fenced off)",
            count,
        )


class Channel(redis.Channel):
    QoS = QoS


class Transport(redis.Transport):
    Channel = Channel
