"""Live step logs for web's followers (`?follow=1`, builds.follow), as Server-Sent Events.

The log table stays the truth; PostgreSQL's LISTEN/NOTIFY only wakes (builds.services.logs
notifies on each append's commit, so a wake-up never comes before its chunk is readable, and
needs no broker of its own). Each web process has one Hub on its event loop: one connection
listening and one reading, whatever the number of followers. The chunks of a followed step
attempt are read once per wake-up into its Topic, from which every follower takes what it
has not sent; a follower behind what the topic holds (resuming from an old Last-Event-ID, or
slower than the topic's memory) reads the table itself, a page at a time. The step's status
is read for all topics at once every STATUS_SECONDS, which also makes up for a lost wake-up.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psycopg
from django.conf import settings

from builds.models import StepLogChunk, StepRun
from builds.services.logs import LOG_CHANNEL
from builds.statuses import RUN_FINAL

log = logging.getLogger(__name__)

STATUS_SECONDS = 1.0  # how often the followed steps' statuses are read (and chunks, anyway)
KEEPALIVE_SECONDS = 15.0  # a comment line on a quiet stream keeps proxies from closing it
RETRY_MS = 1000  # the client's reconnect delay (SSE `retry:`)
TOPIC_BYTES = 4 * 1024 * 1024  # what a topic keeps of its step's newest chunks
PAGE = 500  # chunks per read of the table
LISTEN_WAIT_SECONDS = 10.0  # a follower waits this long for PostgreSQL, then is refused
_CHUNKS = StepLogChunk._meta.db_table
_STEPS = StepRun._meta.db_table


@dataclass(eq=False)
class Topic:
    """One step attempt followed in this process."""

    step_id: int
    attempt: int
    followers: int = 0
    # Every chunk with a seq above `complete_after` is in `chunks` (oldest first).
    complete_after: int = -1
    chunks: list[tuple[int, str]] = field(default_factory=list)
    size: int = 0
    status: str = ""
    current_attempt: int = 0  # the step's attempt now (above ours once it was retried)
    gone: bool = False  # the step no longer exists (its build was purged)
    # The step's (status, attempt, gone) as last read, applied by the next refresh once the
    # chunks written before it are in: a follower never sees the end before the last chunk.
    seen: tuple[str, int, bool] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: bool = False  # a refresh is owed
    refreshing: bool = False

    @property
    def last_seq(self) -> int:
        return self.chunks[-1][0] if self.chunks else self.complete_after

    @property
    def ended(self) -> bool:
        return self.gone or self.current_attempt > self.attempt or self.status in RUN_FINAL

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def add(self, rows: list[tuple[int, str]]) -> None:
        self.chunks.extend(rows)
        self.size += sum(len(text) for _, text in rows)
        while self.size > TOPIC_BYTES and len(self.chunks) > 1:
            seq, text = self.chunks.pop(0)  # rare (4 MB of a step's newest): a list will do
            self.complete_after, self.size = seq, self.size - len(text)

    def after(self, seq: int) -> list[tuple[int, str]] | None:
        """The chunks after `seq`, or None if some of them are no longer (or not yet) here."""
        if seq < self.complete_after:
            return None
        return [chunk for chunk in self.chunks if chunk[0] > seq]


class Hub:
    """The followed topics of this process, kept up to date from PostgreSQL."""

    def __init__(self):
        self.topics: dict[tuple[int, int], Topic] = {}
        self._reader: psycopg.AsyncConnection | None = None
        self._reading = asyncio.Lock()  # one query at a time on the reading connection
        self._listening = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._refreshes: set[asyncio.Task] = set()

    @staticmethod
    def _conninfo() -> str:
        db = settings.DATABASES["default"]
        return psycopg.conninfo.make_conninfo(
            dbname=db["NAME"],
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            connect_timeout=db.get("OPTIONS", {}).get("connect_timeout", 5),
            application_name="ciproject-logstream",
        )

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def query(self, sql: str, params) -> list[tuple]:
        async with self._reading:
            for tries_left in (1, 0):
                try:
                    if self._reader is None or self._reader.closed:
                        self._reader = await psycopg.AsyncConnection.connect(
                            self._conninfo(), autocommit=True
                        )
                    cursor = await self._reader.execute(sql, params)
                    return await cursor.fetchall()
                except psycopg.OperationalError:
                    if self._reader is not None:
                        await self._reader.close()
                    self._reader = None
                    if not tries_left:
                        raise
        raise AssertionError("unreachable")

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo(), autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {LOG_CHANNEL}")
                    self._listening.set()
                    delay = 0.5
                    for topic in list(self.topics.values()):  # what came while we were away
                        self._refresh_soon(topic)
                    async for note in conn.notifies():
                        with contextlib.suppress(ValueError):
                            step_id, attempt = map(int, note.payload.split(":"))
                            if topic := self.topics.get((step_id, attempt)):
                                self._refresh_soon(topic)
            except (psycopg.Error, OSError) as exc:
                self._listening.clear()
                log.warning("log streams: listening lost (%s); again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(STATUS_SECONDS)
            topics = list(self.topics.values())
            if not topics:
                continue
            try:
                await self._read_statuses(topics)
            except (psycopg.Error, OSError) as exc:
                log.warning("log streams: statuses not read: %s", exc)
                continue
            for topic in topics:
                self._refresh_soon(topic)

    async def _read_statuses(self, topics: list[Topic]) -> None:
        rows = await self.query(
            f"SELECT id, status, attempt FROM {_STEPS} WHERE id = ANY(%s)",
            [sorted({topic.step_id for topic in topics})],
        )
        found = {step_id: (status, attempt) for step_id, status, attempt in rows}
        for topic in topics:
            status, attempt = found.get(topic.step_id, ("", 0))
            topic.seen = (status, attempt, topic.step_id not in found)

    def _refresh_soon(self, topic: Topic) -> None:
        topic.dirty = True
        if not topic.refreshing:
            topic.refreshing = True
            task = asyncio.create_task(self._refresh(topic))
            self._refreshes.add(task)  # (the loop keeps only a weak reference)
            task.add_done_callback(self._refreshes.discard)

    async def _refresh(self, topic: Topic) -> None:
        """The topic's new chunks, then the step's status read before them, for as long as
        refreshes are owed (a wake-up meanwhile is read by the next round)."""
        try:
            while topic.dirty:
                topic.dirty = False
                seen = topic.seen
                rows = await self._chunks(topic.step_id, topic.attempt, topic.last_seq, PAGE)
                topic.add(rows)
                topic.dirty |= len(rows) == PAGE  # more than a page came at once
                applied = (topic.status, topic.current_attempt, topic.gone)
                if seen is not None and seen != applied:
                    topic.status, topic.current_attempt, topic.gone = seen
                if rows or seen != applied:
                    topic.wake()
        except (psycopg.Error, OSError) as exc:  # the next poll tries again
            log.warning("log streams: step %s not read: %s", topic.step_id, exc)
        finally:
            topic.refreshing = False

    async def _chunks(self, step_id: int, attempt: int, after: int, limit: int, upto=None):
        bound = "" if upto is None else " AND seq <= %s"
        params = [step_id, attempt, after] + ([] if upto is None else [upto]) + [limit]
        rows = await self.query(
            f"SELECT seq, text FROM {_CHUNKS} WHERE step_id = %s AND attempt = %s AND seq > %s"
            f"{bound} ORDER BY seq LIMIT %s",
            params,
        )
        return [(seq, text) for seq, text in rows]

    async def subscribe(self, step_id: int, attempt: int) -> Topic:
        # Listening first: a chunk committed after the read below wakes the topic.
        await asyncio.wait_for(self._listening.wait(), LISTEN_WAIT_SECONDS)
        topic = self.topics.get((step_id, attempt))
        if topic is None:
            topic = Topic(step_id, attempt)
            await self._read_statuses([topic])
            rows = await self.query(
                f"SELECT max(seq) FROM {_CHUNKS} WHERE step_id = %s AND attempt = %s",
                [step_id, attempt],
            )
            topic.complete_after = -1 if rows[0][0] is None else rows[0][0]
            topic.status, topic.current_attempt, topic.gone = topic.seen
            # Another follower may have made it while we read: theirs is as good.
            topic = self.topics.setdefault((step_id, attempt), topic)
            self._refresh_soon(topic)  # a wake-up that came while it was not listed yet
        topic.followers += 1
        return topic

    def unsubscribe(self, topic: Topic) -> None:
        topic.followers -= 1
        if topic.followers <= 0:
            self.topics.pop((topic.step_id, topic.attempt), None)

    async def follow(self, step_id: int, attempt: int, after: int) -> AsyncIterator[bytes]:
        """The attempt's chunks after seq `after` as SSE events, then its end event."""
        topic = await self.subscribe(step_id, attempt)
        # The client's reconnect delay goes with the first event (alone it would be one).
        retry = f"retry: {RETRY_MS}\n".encode()
        try:
            while True:
                changed = topic.changed  # a wake-up while we read is not lost
                ended = topic.ended
                chunks = topic.after(after)
                if chunks is None:  # behind the topic: from the table, a page at a time
                    upto = topic.complete_after
                    chunks = await self._chunks(step_id, attempt, after, PAGE, upto=upto)
                    if not chunks:  # (an id of the client's that no chunk has)
                        after = upto
                        continue
                for seq, text in chunks:
                    yield retry + event("log", {"text": text}, seq)
                    after, retry = seq, b""
                if chunks:
                    continue
                if ended and after >= topic.last_seq:
                    yield retry + event("end", end_of(topic))
                    return
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keepalive\n\n"
        finally:
            self.unsubscribe(topic)


def end_of(topic: Topic) -> dict:
    if topic.gone:
        return {"status": None, "attempt": topic.attempt, "detail": "the step no longer exists"}
    if topic.current_attempt > topic.attempt:  # retried: its own status is not kept
        retried = {"status": "RETRIED", "attempt": topic.attempt}
        return retried | {"next_attempt": topic.current_attempt}
    return {"status": topic.status, "attempt": topic.attempt}


def event(kind: str, data: dict, event_id: int | None = None) -> bytes:
    """One SSE event; JSON keeps any newline or carriage return of the text in one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}


def hub() -> Hub:
    """This event loop's hub (uvicorn runs one loop per worker process)."""
    loop = asyncio.get_running_loop()
    if loop not in _hubs:
        _hubs[loop] = Hub()
        _hubs[loop].start()
    return _hubs[loop]
