"""kombu's Redis transport, with two fixes (settings use it for redis:// brokers).

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
    """Consumes a queue added, and stops consuming one cancelled, at once. kombu polls with
    one BRPOP over the consumed queues at a time, and one sent before the change waits on the
    old set for up to brpop_timeout (1 s): an agent freed by its build's lease came back to
    the shared queues a second late, most of a build's time in a busy pool. Ending that
    BRPOP with CLIENT UNBLOCK answers it as a timeout, with no message (Redis pops none from
    an unblocked client), and kombu sends the next one over the new set."""

    QoS = QoS
    _ended_brpop = None  # when the BRPOP this channel last ended was sent (kombu's stamp)

    def basic_consume(self, queue, *args, **kwargs):
        tag = super().basic_consume(queue, *args, **kwargs)
        self._end_brpop()
        return tag

    def _basic_cancel(self, consumer_tag):  # (basic_cancel defers this past a read)
        ret = super()._basic_cancel(consumer_tag)
        self._end_brpop()
        return ret

    def _end_brpop(self) -> None:
        blocked = self._in_poll  # the connection a BRPOP is outstanding on, if any
        # Its id is in the HELLO answer (RESP3, redis-py's default); without it, the wait.
        client_id = blocked and (blocked.handshake_metadata or {}).get(b"id")
        # Changing several queues at once (an agent's label and retry queues) ends it once.
        if not client_id or self._ended_brpop == self._brpop_sent_at:
            return
        try:
            with self.conn_or_acquire() as client:  # a pool connection, not the blocked one
                client.client_unblock(client_id)
            self._ended_brpop = self._brpop_sent_at
        except self.connection_errors:  # the BRPOP ends by its timeout, as before
            log.debug("could not end the pending BRPOP early", exc_info=True)


class Transport(redis.Transport):
    Channel = Channel
