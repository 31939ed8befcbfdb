"""The embedded bus: everything in this process, no broker (``evcore demo``, a single-box edge).

It behaves like the NATS bus as far as components can tell: the same subjects and wildcards, queue
groups, request/reply, streams with limits and a duplicate window, durable consumers that resume
where they left off (within this process's life) and acknowledge only after the handler returned.
Nothing survives the process: a single-box edge keeps its durable records in its store, not here.

A publish is on the control path, so what a subject resolves to (validated, which stream stores it,
which live subscriptions it reaches) is worked out once per subject and cached (bounded; the
subscriptions part is redone after any subscription starts or stops).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from evcore.bus.api import (
    AckState,
    BusMessage,
    BusStats,
    BusTimeout,
    Handler,
    NoResponders,
    Payload,
    ProcessedIdStore,
    StreamSpec,
    event_id_for,
    run_handler,
    to_bytes,
)
from evcore.bus.streams import RouteCache, durable_stream, stream_for_subject
from evcore.bus.subjects import Subjects, subject_matches, validate_queue, validate_subject
from evcore.clock import Clock, WallClock

log = logging.getLogger("evcore.bus.inprocess")

# How long a durable consumer's stop() waits for the message in hand before cancelling it (as
# the NATS bus: its fetch expiry and 2 s).
_STOP_WAIT_S = 3.0


@dataclass
class _Stored:
    seq: int
    subject: str
    data: bytes
    event_id: str
    stored_at: float


@dataclass
class _Stream:
    spec: StreamSpec
    msgs: deque[_Stored] = field(default_factory=deque)
    last_seq: int = 0
    bytes: int = 0
    recent_ids: OrderedDict[str, float] = field(default_factory=OrderedDict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def trim(self, now: float) -> None:
        s = self.spec
        while self.msgs and (
            (s.max_msgs > 0 and len(self.msgs) > s.max_msgs)
            or (s.max_bytes > 0 and self.bytes > s.max_bytes)
            or (s.max_age_s > 0 and now - self.msgs[0].stored_at > s.max_age_s)
        ):
            old = self.msgs.popleft()
            self.bytes -= len(old.data)
        while self.recent_ids:
            first_id, t = next(iter(self.recent_ids.items()))
            if now - t <= s.duplicate_window_s:
                break
            del self.recent_ids[first_id]


@dataclass(slots=True)
class _Route:
    """A concrete subject, resolved: validated, its stream (None: live only) and, as of
    ``subs_version``, the subscriptions it reaches (plain ones and one tuple per queue group)."""

    stream: _Stream | None
    subs_version: int = -1
    plain: tuple[_LiveSub, ...] = ()
    groups: tuple[tuple[_LiveSub, ...], ...] = ()


class _LiveSub:
    def __init__(
        self,
        bus: InProcessBus,
        pattern: str,
        handler: Handler,
        queue: str | None,
        maxsize: int,
    ) -> None:
        self._bus = bus
        self._pattern = pattern
        self.queue_group = queue
        self._handler = handler
        self._inbox: deque[BusMessage] = deque()
        self._maxsize = maxsize
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def subject(self) -> str:
        return self._pattern

    def matches(self, subject: str) -> bool:
        return subject_matches(self._pattern, subject)

    def offer(self, msg: BusMessage) -> None:
        if len(self._inbox) >= self._maxsize:
            self._inbox.popleft()
            self._bus.stats.slow_consumer_dropped += 1
        self._inbox.append(msg)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"bus-sub:{self._pattern}"
        )

    async def _run(self) -> None:
        while not self.closed:
            if not self._inbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            msg = self._inbox.popleft()
            await run_handler(self._handler, msg, self._bus.stats, f"subscribe {self._pattern}")

    async def stop(self) -> None:
        self.closed = True
        self._bus._remove_sub(self)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class _Durable:
    """A durable consumer's position: everything below ``next_seq`` is acknowledged."""

    def __init__(self, stream: _Stream, pattern: str) -> None:
        self.stream = stream
        self.pattern = pattern
        self.next_seq = 1
        self.deliveries: dict[int, int] = {}
        self.active = False


class _DurableRun:
    def __init__(
        self,
        bus: InProcessBus,
        durable: _Durable,
        handler: Handler,
        dedupe: ProcessedIdStore | None,
        name: str,
    ) -> None:
        self._bus = bus
        self._d = durable
        self._handler = handler
        self._dedupe = dedupe
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def subject(self) -> str:
        return self._d.pattern

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"bus-consume:{self._name}"
        )

    def _next(self) -> _Stored | None:
        msgs = self._d.stream.msgs
        if not msgs:
            return None
        # Sequence numbers in the deque are contiguous: jump to the first unacknowledged one.
        if self._d.next_seq < msgs[0].seq:
            # The stream's limits dropped messages this durable had not taken: say so (it went
            # on silently).
            log.warning(
                "consumer %s: messages %d..%d of stream %s were dropped by its limits (age, "
                "count or bytes) before this consumer read them (those on its subjects are "
                "lost to it); it goes on from %d",
                self._name,
                self._d.next_seq,
                msgs[0].seq - 1,
                self._d.stream.spec.name,
                msgs[0].seq,
            )
            self._d.next_seq = msgs[0].seq
        start = max(0, self._d.next_seq - msgs[0].seq)
        for i in range(start, len(msgs)):
            m = msgs[i]
            if subject_matches(self._d.pattern, m.subject):
                return m
            self._d.next_seq = m.seq + 1  # not ours: never look at it again
        return None

    async def _run(self) -> None:
        stats = self._bus.stats
        attempt = 0
        while not self._stopping:
            m = self._next()
            if m is None:
                self._d.stream.changed.clear()
                # Re-check after clearing: a publish between _next() and clear() must not be missed.
                if self._next() is None:
                    await self._d.stream.changed.wait()
                continue
            try:
                seen = self._dedupe is not None and self._dedupe.contains(m.event_id)
            except Exception as exc:
                # The id store failing (a locked SQLite file) ended this task for good: nothing
                # more was delivered. As on NATS: the message waits and is tried again.
                attempt += 1
                self._dedupe_failed(exc, attempt)
                await self._back_off(attempt)
                continue
            if seen:
                stats.duplicates_dropped += 1
                self._d.next_seq = m.seq + 1
                continue
            count = self._d.deliveries.get(m.seq, 0) + 1
            self._d.deliveries[m.seq] = count
            msg = BusMessage(
                subject=m.subject, data=m.data, event_id=m.event_id, delivery_count=count
            )
            outcome = await run_handler(self._handler, msg, stats, f"consume {self._name}")
            if outcome == "ok" and self._dedupe is not None:
                try:
                    self._dedupe.add(m.event_id)
                except Exception as exc:
                    # Not booked: delivered again (at least once), as NATS redelivers it.
                    self._dedupe_failed(exc, attempt + 1)
                    outcome = "error"
            if outcome == "error":
                attempt += 1
                await self._back_off(attempt)
                continue
            attempt = 0
            self._d.deliveries.pop(m.seq, None)
            self._d.next_seq = m.seq + 1

    async def _back_off(self, attempt: int) -> None:
        """Wait before trying a message again: 0.1 s doubling per attempt, at most 1 s."""
        await self._bus.clock.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))

    def _dedupe_failed(self, exc: Exception, attempt: int) -> None:
        self._bus.stats.handler_errors += 1
        if attempt in (1, 10) or attempt % 100 == 0:
            log.warning("consumer %s: processed-id store failed: %r; retrying", self._name, exc)

    async def stop(self) -> None:
        """Finish the message in hand (for at most ``_STOP_WAIT_S``; it was cancelled at once,
        a store write cut short), then stop; the durable keeps its place."""
        self._d.active = False
        self._stopping = True
        task = self._task
        if task is not None and task is not asyncio.current_task():
            self._d.stream.changed.set()  # an idle loop wakes, sees it is stopping and ends
            try:
                await asyncio.wait_for(asyncio.shield(task), _STOP_WAIT_S)
            except (TimeoutError, Exception):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._bus._runs.discard(self)


class InProcessBus:
    """The bus inside one process. See :class:`evcore.bus.api.Bus` for the contract."""

    def __init__(
        self,
        site_id: str,
        *,
        clock: Clock | None = None,
        streams: Sequence[StreamSpec] | None = None,
        subscriber_queue_size: int = 10_000,
        max_msgs_per_stream: int = 100_000,
        route_cache_size: int = 16_384,
        max_bytes_per_stream: int = 64 * 1024 * 1024,
    ) -> None:
        from evcore.bus.config import default_streams

        self._site_id = site_id
        self.subjects = Subjects(site_id)
        self.clock: Clock = clock or WallClock()
        self._stats = BusStats()
        specs = list(streams) if streams is not None else default_streams(site_id)
        # Memory, not disk: cap every stream by count and by bytes as well (the oldest go
        # first). Without the byte cap, the EVENTS stream held 30 days or 100,000 of the edge's
        # audit records: about 550 MB for a 100-charger site (5.3 KB a record).
        self._specs = [
            dataclasses.replace(
                s,
                max_msgs=s.max_msgs if s.max_msgs > 0 else max_msgs_per_stream,
                max_bytes=min(s.max_bytes, max_bytes_per_stream)
                if s.max_bytes > 0
                else max_bytes_per_stream,
            )
            for s in specs
        ]
        self._streams: dict[str, _Stream] = {}
        self._subs: list[_LiveSub] = []
        self._durables: dict[tuple[str, str], _Durable] = {}
        self._runs: set[_DurableRun] = set()
        self._rr = itertools.count()
        self._queue_size = subscriber_queue_size
        self._started = False
        # subject -> _Route, at most route_cache_size of them (0: resolve on every publish).
        self._routes: RouteCache[_Route] = RouteCache(route_cache_size)
        # Bumped whenever the set of live subscriptions changes: cached fan-outs are then redone.
        self._subs_version = 0

    @property
    def site_id(self) -> str:
        return self._site_id

    @property
    def stats(self) -> BusStats:
        return self._stats

    @property
    def connected(self) -> bool:
        return self._started

    @property
    def streams(self) -> list[StreamSpec]:
        return list(self._specs)

    async def start(self) -> None:
        for spec in self._specs:
            self._streams.setdefault(spec.name, _Stream(spec))
        self._routes.clear()
        self._started = True

    async def close(self) -> None:
        for run in list(self._runs):
            await run.stop()
        for sub in list(self._subs):
            await sub.stop()
        self._started = False

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("bus not started: call await bus.start() first")

    def _remove_sub(self, sub: _LiveSub) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._subs_version += 1

    def _new_route(self, subject: str) -> _Route:
        spec = stream_for_subject(self._specs, subject)
        return _Route(self._streams[spec.name] if spec is not None else None)

    def _route(self, subject: str) -> _Route:
        """Resolve a concrete subject (raises ``ValueError`` for an invalid one, never cached)."""
        route = self._routes.get(subject, self._new_route)
        if route.subs_version != self._subs_version:
            plain: list[_LiveSub] = []
            groups: dict[str, list[_LiveSub]] = {}
            for sub in self._subs:
                if sub.matches(subject):
                    if sub.queue_group:
                        groups.setdefault(sub.queue_group, []).append(sub)
                    else:
                        plain.append(sub)
            route.plain = tuple(plain)
            route.groups = tuple(tuple(members) for members in groups.values())
            route.subs_version = self._subs_version
        return route

    def _fan_out(self, msg: BusMessage, route: _Route) -> int:
        for sub in route.plain:
            sub.offer(msg)
        for members in route.groups:
            members[next(self._rr) % len(members)].offer(msg)
        return len(route.plain) + len(route.groups)

    async def publish(
        self,
        subject: str,
        payload: Payload,
        *,
        event_id: str | None = None,
        critical: bool = False,
    ) -> str:
        self._require_started()
        route = self._route(subject)
        data = to_bytes(payload)
        eid = event_id_for(payload, event_id)
        self._stats.published += 1
        st = route.stream
        if st is not None:
            now = self.clock.now()
            st.trim(now)
            if eid in st.recent_ids:
                return eid  # a retried publish: stored once, like JetStream's duplicate window
            st.last_seq += 1
            st.msgs.append(_Stored(st.last_seq, subject, data, eid, now))
            st.bytes += len(data)
            st.recent_ids[eid] = now
            st.trim(now)
            st.changed.set()
        self._stats.sent += 1
        self._fan_out(BusMessage(subject=subject, data=data, event_id=eid), route)
        return eid

    async def publish_many(
        self, items: Sequence[tuple[str, Payload, str | None]], *, critical: bool = False
    ) -> list[str]:
        self._require_started()
        for subject, _, _ in items:
            self._route(subject)  # validates every subject before anything is published
        return [
            await self.publish(subject, payload, event_id=eid, critical=critical)
            for subject, payload, eid in items
        ]

    async def subscribe(
        self, subject_pattern: str, handler: Handler, *, queue: str | None = None
    ) -> _LiveSub:
        self._require_started()
        validate_subject(subject_pattern, wildcards=True)
        validate_queue(queue)
        sub = _LiveSub(self, subject_pattern, handler, queue, self._queue_size)
        self._subs.append(sub)
        self._subs_version += 1
        sub.start()
        return sub

    async def request(self, subject: str, payload: Payload, *, timeout_s: float) -> bytes:
        self._require_started()
        route = self._route(subject)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def respond(data: bytes) -> None:
            if not fut.done():
                fut.set_result(data)

        inbox = f"_INBOX.{uuid.uuid4().hex}"
        msg = BusMessage(
            subject=subject,
            data=to_bytes(payload),
            event_id=uuid.uuid4().hex,
            reply_to=inbox,
            _responder=respond,
        )
        if self._fan_out(msg, route) == 0:
            raise NoResponders(f"no responder on {subject!r}")
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError as exc:
            raise BusTimeout(f"no reply on {subject!r} within {timeout_s} s") from exc

    async def consume(
        self,
        subject_pattern: str,
        *,
        durable: str,
        handler: Handler,
        dedupe: ProcessedIdStore | None = None,
    ) -> _DurableRun:
        self._require_started()
        spec = durable_stream(self._specs, subject_pattern, durable)
        key = (spec.name, durable)
        d = self._durables.get(key)
        if d is None:
            d = _Durable(self._streams[spec.name], subject_pattern)
            self._durables[key] = d
        elif d.pattern != subject_pattern:
            raise ValueError(
                f"durable {durable!r} on stream {spec.name} already filters {d.pattern!r}, "
                f"not {subject_pattern!r}"
            )
        if d.active:
            raise ValueError(f"durable {durable!r} on stream {spec.name} is already being consumed")
        d.active = True
        run = _DurableRun(self, d, handler, dedupe, durable)
        self._runs.add(run)
        run.start()
        return run

    async def flush(self, timeout_s: float = 5.0) -> bool:
        return True

    async def ack_state(self, subject: str, event_id: str, *, durable: str) -> AckState:
        self._require_started()
        st = self._route(subject).stream
        if st is None:
            raise ValueError(f"no stream stores {subject!r}; nothing there is acknowledged")
        # Newest first: the event asked about is usually the last one published on the subject.
        seq = next(
            (m.seq for m in reversed(st.msgs) if m.event_id == event_id and m.subject == subject),
            0,
        )
        d = self._durables.get((st.spec.name, durable))
        if d is None:
            return AckState(seq, False, 0)
        # Everything below next_seq was acknowledged or was not the durable's.
        return AckState(seq, True, d.next_seq - 1)
