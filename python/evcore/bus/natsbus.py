"""The bus on NATS with JetStream (``nats-py``).

* Streams (per site: events and telemetry) are created or updated by :meth:`NatsBus.start`.
* Every stored publish carries ``Nats-Msg-Id`` = the event id, so a retried publish is stored once.
* Critical events go through the disk-backed :class:`~evcore.bus.outbox.Outbox` and a pump sends
  them in order, removing each only after JetStream acknowledged it; the pump waits out broker
  outages.
* Telemetry is coalesced per subject (latest wins) while the sender is behind or the broker is away;
  other events wait in a bounded queue. ``publish`` therefore never waits on the network.
* Durable consumers are pull consumers with explicit acks, acknowledged after the handler returned.
* What the outbox accepted and will never send is told, never dropped in silence
  (``OutboxReports``): an entry the broker can never take goes to the publisher's
  ``on_set_aside`` listener; an outbox file found unreadable is an ``OutboxLoss``, and the pump
  sends nothing after one until it has noted where each stream stood, so that
  ``last_stored(..., before_loss=)`` tells the publisher from where to send its own copies again.

The first connection is made in the background: an edge starts and keeps controlling while the
broker is down, and subscriptions/consumers registered meanwhile are attached once it is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.js import api as jsapi

from evcore.bus.api import (
    AckState,
    BusError,
    BusMessage,
    BusStats,
    BusTimeout,
    BusUnavailable,
    Handler,
    NoResponders,
    Payload,
    PayloadTooLarge,
    ProcessedIdStore,
    SetAsideListener,
    StreamSpec,
    event_id_for,
    run_handler,
    to_bytes,
)
from evcore.bus.config import BusConfig, check_creds_file
from evcore.bus.outbox import Outbox, OutboxEntry, OutboxLoss, SetAside
from evcore.bus.streams import RouteCache, durable_stream, stream_for_subject
from evcore.bus.subjects import (
    CRITICAL_KINDS,
    SAMPLED_KINDS,
    Subjects,
    escape_token,
    name_token,
    subject_matches,
    subject_too_long,
    validate_queue,
    validate_subject,
)
from evcore.clock import Clock, WallClock

log = logging.getLogger("evcore.bus.nats")

MSG_ID = "Nats-Msg-Id"
_PUMP_WINDOW = 64
_SEND_WINDOW = 128
_FETCH_EXPIRY_S = 1.0
# Messages per pull. A consumer may have no more than this many unacknowledged (max_ack_pending):
# the loop acknowledges a whole batch before it pulls again, so this costs nothing, and a batch
# lost on its way (a stream leader dying mid-delivery) blocks later messages until it is
# redelivered after ack_wait, instead of letting them overtake it: delivery stays in order.
_FETCH_BATCH = 64
# Idle pulls (each _FETCH_EXPIRY_S) between checks that a durable still exists on the broker.
_IDLE_PULLS_PER_CHECK = 10
# A durable another consumer pulls: how long to look again (a pull request of a process just gone
# lasts its expiry at most; a live consumer has pulled again by then), and how long a consumer
# that found it in use waits before it tries again.
_IN_USE_RECHECK_S = _FETCH_EXPIRY_S + 0.25
# Looks again, this far apart, when none saw a pull waiting: a consumer between two pulls has
# none for an instant, longer when its process is busy (a loaded edge: 1 run in 4 of
# test_deploy_second_edge, two looks 0.1 s apart both fell in such a gap).
_IN_USE_LOOK_AGAIN_S = 0.25
_IN_USE_LOOKS = 3
_IN_USE_RETRY_S = 2.0
# nats-server's default max_payload, used until the broker's own figure is known (first connect;
# the outbox file keeps the last figure learnt, for a start while the broker is away).
_DEFAULT_MAX_PAYLOAD = 1024 * 1024
_MAX_PAYLOAD_KEY = "broker_max_payload"
# Stream sequences remembered per (stream, subject, event id) for ack_state (oldest go first).
_SEQS_KEPT = 16_384
# Header bytes besides the ids: "NATS/1.0\r\n", the two header names, separators, final CRLF.
_HEADER_OVERHEAD = 64
# Tries at noting where the streams stand after an outbox loss before the pump goes on without
# (an edge user without $JS.API.STREAM.INFO must not hold every critical event back for ever).
_PLACE_LOSS_TRIES = 10
# Critical kinds whose publisher keeps its own copy and sends a refused event again (the audit
# log: its store): refused first when the outbox nears its cap (outbox.YIELDING_SHARE).
YIELDING_KINDS = frozenset({"audit"})
# Back-off between offers of set-aside entries a listener did not deal with (doubling to the last).
_REPORT_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# An event the sender has taken from its queues: (from the normal queue?, (subject, data, id,
# stream or None)).
_Unsent = tuple[bool, tuple[str, bytes, str, str | None]]


def _cancel_all(futs: Sequence[asyncio.Future[Any] | None]) -> None:
    for f in futs:
        if f is not None:
            f.cancel()


async def _await_acks(futs: Sequence[asyncio.Future[Any]], timeout_s: float) -> list[Any]:
    """JetStream acks of a window, waited for under one deadline: each entry is the ack or the
    error. Unanswered futures are cancelled, which returns their slot to nats-py's pending-publish
    limit (a future left pending would hold it forever). So at most one sender window and one
    pump window (192) hold slots, far below nats-py's 4000, and ``publish_async`` is called with
    ``wait_stall=None``: a timeout there would wrap every publish in a task of its own (several
    times slower)."""
    if futs:
        try:
            _, pending = await asyncio.wait(futs, timeout=timeout_s)
        except asyncio.CancelledError:
            _cancel_all(futs)
            raise
        _cancel_all(list(pending))
    out: list[Any] = []
    for f in futs:
        if f.cancelled():
            out.append(TimeoutError(f"no JetStream ack within {timeout_s} s"))
        elif f.exception() is not None:
            out.append(f.exception())
        else:
            out.append(f.result())
    return out


async def _end_tasks(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again every 0.1 s those still
    running. Before Python 3.12, ``asyncio.wait_for`` swallows a cancellation that arrives as the
    awaitable it wraps completes; nats-py runs each connection attempt under one, and a refused
    attempt completes at once: the connect task took the cancellation for a failed attempt and
    tried the next, and ``close()`` waited for it for ever (1 close in 2 while the broker was
    down, with ``reconnect_wait_s`` 0)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    await asyncio.gather(*tasks, return_exceptions=True)


def _reconnects(nc: NatsClient | None) -> int:
    """How often this connection reconnected so far (a changed count: the broker may be new)."""
    return int(nc.stats.get("reconnects", 0)) if nc is not None else 0


class _NatsSub:
    def __init__(self, bus: NatsBus, pattern: str, handler: Handler, queue: str | None) -> None:
        self._bus = bus
        self._pattern = pattern
        self._handler = handler
        self._queue = queue or ""
        self._sub: Any = None
        self._attaching = False
        self.closed = False

    @property
    def subject(self) -> str:
        return self._pattern

    async def _on_msg(self, m: NatsMsg) -> None:
        headers = dict(m.headers or {})
        responder: Callable[[bytes], Awaitable[None]] | None = None
        if m.reply:
            nc = self._bus._nc
            reply = m.reply

            async def responder(data: bytes) -> None:
                if nc is None:
                    raise BusUnavailable("not connected; cannot respond")
                await nc.publish(reply, data)

        msg = BusMessage(
            subject=m.subject,
            data=m.data,
            event_id=headers.get(MSG_ID, ""),
            reply_to=m.reply or "",
            headers=headers,
            _responder=responder,
        )
        await run_handler(self._handler, msg, self._bus.stats, f"subscribe {self._pattern}")

    async def attach(self, nc: NatsClient) -> None:
        # Marked before the await: the connect loop and subscribe() may both try to attach.
        if self.closed or self._attaching:
            return
        self._attaching = True
        self._sub = await nc.subscribe(
            self._pattern,
            queue=self._queue,
            cb=self._on_msg,
            pending_msgs_limit=self._bus.config.subscriber_queue_size,
        )

    async def stop(self) -> None:
        self.closed = True
        self._bus._subs.discard(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class DurableFilterMismatch(ValueError):
    """A durable consumer exists on the broker with another filter than the one asked for."""


class DurableInUse(ValueError):
    """Another consumer (another process: a second edge of one site) is pulling the durable now.
    JetStream would share its messages between the two, each getting only part of them and out
    of order across the two; the in-process bus refuses a second consumer of a durable too."""


class _NatsConsumer:
    def __init__(
        self,
        bus: NatsBus,
        pattern: str,
        stream: str,
        durable: str,
        handler: Handler,
        dedupe: ProcessedIdStore | None,
    ) -> None:
        self._bus = bus
        self._pattern = pattern
        self._stream = stream
        self._durable = durable
        self._handler = handler
        self._dedupe = dedupe
        self._task: asyncio.Task[None] | None = None
        self._reconnects_seen = -1
        self._dedupe_failures = 0
        self._in_use_seen = 0
        # True from a pull's start until its batch is handled or handed back: what stop() waits
        # for. Otherwise (waiting for the broker, attaching, backing off) nothing is in hand and
        # stop() cancels the task at once.
        self._in_hand = False
        self._pull_sub: Any = None  # the last bound, for a stop that cancels the task
        #: Set once the durable is bound and pulled from (``consume`` waits for it).
        self.attached = asyncio.Event()
        self.closed = False

    @property
    def subject(self) -> str:
        return self._pattern

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"bus-consume:{self._durable}"
            )

    async def _subscribe(self) -> Any:
        bus = self._bus
        await bus._ready.wait()
        assert bus._js is not None
        cfg = jsapi.ConsumerConfig(
            durable_name=self._durable,
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            deliver_policy=jsapi.DeliverPolicy.ALL,
            ack_wait=bus.ack_wait_s,
            max_ack_pending=_FETCH_BATCH,
            filter_subject=self._pattern,
        )
        self._reconnects_seen = _reconnects(bus._nc)
        await self.check_filter()
        await self.check_free()
        await self._update_ack_settings(cfg)
        return await bus._js.pull_subscribe(
            self._pattern, durable=self._durable, stream=self._stream, config=cfg
        )

    async def check_filter(self) -> None:
        """``ValueError`` when the durable exists on the broker with another filter (as the
        in-process bus refuses it). Bound to as it was, it went on delivering what its old
        filter took to a handler written for the new one (a transaction to a status handler)
        and nothing the new filter names; and a change of ack settings made it take the new
        filter in silence, skipping what the old one had not acknowledged."""
        try:
            info = await self._bus._js.consumer_info(self._stream, self._durable)
        except nats.js.errors.NotFoundError:
            return
        have = info.config.filter_subject or ", ".join(info.config.filter_subjects or ())
        if have != self._pattern:
            raise DurableFilterMismatch(
                f"durable {self._durable!r} on stream {self._stream} already filters "
                f"{have or '(everything)'!r}, not {self._pattern!r} (another consumer's name, "
                "or a changed filter: give it a durable name of its own)"
            )

    async def check_free(self) -> None:
        """:class:`DurableInUse` when another consumer is pulling the durable (a pull request
        waiting on the broker: ``num_waiting``, looked at again after a pull's expiry so that a
        process just gone is not taken for a live one) or a push consumer of that name is bound
        (``push_bound``). Before, a second process bound to it and JetStream shared the messages
        between the two."""
        js = self._bus._js
        seen = False  # a look saw another consumer: confirmed by one a pull's expiry later
        looks = 0
        while True:
            if looks:
                # (Broker time: real, not the bus's clock.)
                await asyncio.sleep(_IN_USE_RECHECK_S if seen else _IN_USE_LOOK_AGAIN_S)
            looks += 1
            try:
                info = await js.consumer_info(self._stream, self._durable)
            except nats.js.errors.NotFoundError:
                return
            if info.num_waiting or info.push_bound:
                if seen:
                    break
                seen = True
            elif seen or looks >= _IN_USE_LOOKS:
                return  # free at every look, or what was seen was a pull of a process gone
        raise DurableInUse(
            f"durable {self._durable!r} on stream {self._stream} is being consumed by another "
            f"consumer ({info.num_waiting or 0} pull request(s) waiting"
            f"{', a push subscriber bound' if info.push_bound else ''}): another process of "
            "this site (a second edge with the same site file?) or a tool; JetStream would share "
            "the messages between the two, each getting part of them. Stop the other, or give "
            "this one a site id of its own"
        )

    def _in_use_meanwhile(self, info: Any) -> None:
        """Say so when another consumer pulls the durable beside this one (both attached while
        neither saw the other: at one instant, or while this one was busy with a batch)."""
        if not getattr(info, "num_waiting", 0):
            return
        self._in_use_seen += 1
        n = self._in_use_seen
        if n in (1, 10) or n % 100 == 0:
            log.error(
                "consumer %s on %s: another consumer pulls this durable too (%d pull request(s) "
                "waiting besides this one's; seen %d time(s)): each gets only part of its "
                "messages. Stop the other process (a second edge of this site?)",
                self._durable,
                self._stream,
                info.num_waiting,
                n,
            )

    async def _update_ack_settings(self, cfg: jsapi.ConsumerConfig) -> None:
        """An existing durable (made by an earlier version, or with another ack_wait) gets this
        bus's ack settings: pull_subscribe binds to it as it is, so a durable made before
        max_ack_pending went from 1024 to 64 (ordering through a stream leader's failover) kept
        1024 for ever."""
        js = self._bus._js
        try:
            info = await js.consumer_info(self._stream, self._durable)
        except nats.js.errors.NotFoundError:
            return  # pull_subscribe creates it with cfg
        have = info.config
        if have.max_ack_pending == cfg.max_ack_pending and (
            have.ack_wait is not None and abs(have.ack_wait - float(cfg.ack_wait or 0)) < 1e-3
        ):
            return
        try:
            await js.add_consumer(self._stream, cfg.evolve(name=self._durable))
        except nats.js.errors.APIError as exc:
            log.warning(
                "consumer %s on %s: could not bring its ack settings to max_ack_pending %s, "
                "ack_wait %s s (%s); it keeps %s, %s s",
                self._durable,
                self._stream,
                cfg.max_ack_pending,
                cfg.ack_wait,
                exc.description or repr(exc),
                have.max_ack_pending,
                have.ack_wait,
            )
        else:
            log.info(
                "consumer %s on %s: ack settings brought from max_ack_pending %s, ack_wait %s s "
                "to %s, %s s",
                self._durable,
                self._stream,
                have.max_ack_pending,
                have.ack_wait,
                cfg.max_ack_pending,
                cfg.ack_wait,
            )

    async def _gone(self, sub: Any, idle: int) -> bool:
        """Whether the durable no longer exists on the broker (it came back without its store,
        or someone deleted it). A pull on a missing consumer only ever times out, so ask after
        each reconnect and on every tenth idle pull."""
        reconnects = _reconnects(self._bus._nc)
        if reconnects == self._reconnects_seen and idle % _IDLE_PULLS_PER_CHECK:
            return False
        self._reconnects_seen = reconnects
        try:
            # (Asked after a pull of ours expired: a pull request waiting is another's.)
            self._in_use_meanwhile(await sub.consumer_info())
        except nats.js.errors.NotFoundError:
            log.warning(
                "consumer %s on %s: gone from the broker; creating it again",
                self._durable,
                self._stream,
            )
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            return True
        except Exception:
            return False  # the broker is away: the next check tells
        return False

    async def _run(self) -> None:
        bus = self._bus
        stats = bus.stats
        sub: Any = None
        attempt = 0
        idle = 0
        failures = 0  # handler failures in a row (on the message at the head)
        while not self.closed:
            try:
                if sub is None:
                    sub = self._pull_sub = await self._subscribe()
                    self.attached.set()
                if self.closed:
                    break  # stopped while attaching: no pull started
                self._in_hand = True
                try:
                    msgs = await sub.fetch(batch=_FETCH_BATCH, timeout=_FETCH_EXPIRY_S)
                except nats.errors.TimeoutError:
                    self._in_hand = False
                    idle += 1
                    if await self._gone(sub, idle):
                        sub = None
                    continue
                attempt = 0
                idle = 0
                if self.closed:
                    # Stopping: hand the batch back at once so the next consumer gets it in order.
                    for m in msgs:
                        with contextlib.suppress(Exception):
                            await m.nak()
                    break
                for i, m in enumerate(msgs):
                    if self.closed:
                        # Stopped while handling the batch: the message in hand is done; hand
                        # the rest back (it went on through the batch until stop() cancelled it
                        # mid-handler, and the rest waited for ack_wait).
                        for rest in msgs[i:]:
                            with contextlib.suppress(Exception):
                                await rest.nak()
                        break
                    outcome = await self._handle(m, stats)
                    if outcome == "error":
                        # Keep order: hand back this one and the rest of the batch, then back off
                        # (doubling from 0.2 s to 30 s while the same message keeps failing: a
                        # store outage must not turn into a busy loop). A message a handler can
                        # never take must raise BadPayload (dropped, counted): anything else is
                        # taken as transient and holds the messages behind it, so say so.
                        failures += 1
                        delay = min(0.2 * 2 ** min(failures - 1, 8), 30.0)
                        if failures in (1, 10) or failures % 100 == 0:
                            log.warning(
                                "consumer %s on %s: the handler failed %d time(s) in a row on "
                                "%s (event %s); the messages behind it wait, next try in %.1f s "
                                "(a message that can never be handled must raise BadPayload)",
                                self._durable,
                                self._stream,
                                failures,
                                m.subject,
                                dict(m.headers or {}).get(MSG_ID, ""),
                                delay,
                            )
                        # Handed back at once (no nak delay): while this loop sleeps no pull is
                        # open, and the next pull gets the handed-back messages first, in order
                        # (a nak delay let a later message, not yet delivered, overtake them).
                        for rest in msgs[i:]:
                            with contextlib.suppress(Exception):
                                await rest.nak()
                        self._in_hand = False
                        await bus.clock.sleep(delay)
                        break
                    failures = 0
                self._in_hand = False
            except asyncio.CancelledError:
                raise
            except DurableFilterMismatch as exc:
                # The durable filters other subjects (attached once the broker came back): its
                # messages are not this handler's. Nothing is taken; the consumer ends.
                log.error("consumer %s on %s: %s; not consuming", self._durable, self._stream, exc)
                self.closed = True
                bus._consumers.discard(self)
                break
            except DurableInUse as exc:
                # Found in use when it attaches (the broker was away at consume()): it takes
                # nothing and tries again, taking over once the other stops (a standby).
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    log.error(
                        "consumer %s on %s: %s; not consuming, trying again every %.0f s",
                        self._durable,
                        self._stream,
                        exc,
                        _IN_USE_RETRY_S,
                    )
                await bus.clock.sleep(_IN_USE_RETRY_S)
            except Exception as exc:
                self._in_hand = False
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    log.warning("consumer %s on %s: %r; retrying", self._durable, self._stream, exc)
                if isinstance(exc, nats.js.errors.NotFoundError):
                    sub = None  # the consumer or stream vanished (e.g. a memory-only restart)
                    await bus._restore_streams(exc)
                await bus.clock.sleep(min(bus.config.reconnect_wait_s * attempt, 2.0))
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _handle(self, m: NatsMsg, stats: BusStats) -> str:
        headers = dict(m.headers or {})
        event_id = headers.get(MSG_ID, "")
        try:
            delivered = int(m.metadata.num_delivered)
        except Exception:
            delivered = 1
        try:
            seen = self._dedupe is not None and bool(event_id) and self._dedupe.contains(event_id)
        except Exception as exc:
            # The id store failing (a locked SQLite file) left the fetched batch neither handled
            # nor handed back: nothing came for ack_wait (30 s). As in-process: an error, the
            # message and those behind it tried again after a back-off, in order.
            return self._dedupe_failed(exc, stats, m)
        if seen:
            stats.duplicates_dropped += 1
            await m.ack()
            return "ok"
        msg = BusMessage(
            subject=m.subject,
            data=m.data,
            event_id=event_id,
            delivery_count=delivered,
            headers=headers,
        )
        outcome = await run_handler(self._handler, msg, stats, f"consume {self._durable}")
        if outcome == "error":
            return outcome
        if outcome == "ok" and self._dedupe is not None and event_id:
            try:
                self._dedupe.add(event_id)
            except Exception as exc:
                # Not booked: delivered again (at least once), as in-process.
                return self._dedupe_failed(exc, stats, m)
        if outcome == "rejected":
            await m.term()
        else:
            await m.ack()
        return outcome

    def _dedupe_failed(self, exc: Exception, stats: BusStats, m: NatsMsg) -> str:
        stats.handler_errors += 1
        self._dedupe_failures += 1
        n = self._dedupe_failures
        if n in (1, 10) or n % 100 == 0:
            log.warning(
                "consumer %s on %s: processed-id store failed on %s (%d time(s) so far): %r; "
                "the message is tried again",
                self._durable,
                self._stream,
                m.subject,
                n,
                exc,
            )
        return "error"

    async def stop(self) -> None:
        """Finish the message in hand, return any fetched ones, then stop (the durable stays).
        With nothing in hand (waiting for the broker, attaching, backing off) the task is
        cancelled at once: it waited 3 s, an edge whose broker never came up took that long to
        stop."""
        self.closed = True
        self._bus._consumers.discard(self)
        task = self._task
        if task is not None and task is not asyncio.current_task() and not self._in_hand:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sub, self._pull_sub = self._pull_sub, None
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        elif task is not None and task is not asyncio.current_task():
            # A pull request in flight may still bring messages: let the loop receive and nak
            # them (bounded by the fetch expiry) rather than leave them to the ack timeout.
            try:
                await asyncio.wait_for(asyncio.shield(task), _FETCH_EXPIRY_S + 2.0)
            except (TimeoutError, Exception):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


#: JetStream's error code for a stream its storage cannot hold.
_INSUFFICIENT_STORAGE = 10047


def stream_error(spec: StreamSpec, exc: nats.js.errors.APIError) -> str:
    """What the broker said about creating or updating ``spec``, in words an operator can act on
    (nats-py's own repr of a ServerError is empty)."""
    what = f"stream {spec.name}: {exc.description or type(exc).__name__} (err_code {exc.err_code})"
    if exc.err_code == _INSUFFICIENT_STORAGE:
        size = f"{spec.max_bytes} bytes" if spec.max_bytes > 0 else "no byte limit"
        what += (
            f"; JetStream reserves each stream's max_bytes out of the server's storage "
            f"(this one: {size}): lower [bus] telemetry_max_bytes, raise the server's "
            f"jetstream max_file_store, or delete streams of sites no longer served "
            f"(docs/bus.md, Sizing)"
        )
    return what


# JetStream's longest stream name; the file system's longest file name (bytes), which must also
# hold the outbox's "-wal" file beside it.
_MAX_STREAM_NAME = 255
_MAX_FILE_NAME = 255 - len("-wal")


def _check_name_lengths(site_id: str, specs: Sequence[StreamSpec], outbox: Path) -> None:
    """Refuse a site id whose stream names or outbox file name NATS or the file system cannot
    hold (it was taken: the streams were refused and retried for ever, every critical event
    waiting in the outbox; or the outbox did not open, 'unable to open database file')."""
    problems = [
        f"stream name {spec.name} has {len(spec.name)} characters (JetStream allows "
        f"{_MAX_STREAM_NAME})"
        for spec in specs
        if len(spec.name) > _MAX_STREAM_NAME
    ]
    size = len(outbox.name.encode("utf-8", "surrogateescape"))
    if size > _MAX_FILE_NAME:
        problems.append(
            f"outbox file name {outbox.name} has {size} bytes (the file system allows 255, "
            f"with its -wal file {_MAX_FILE_NAME})"
        )
    if problems:
        raise ValueError(
            f"site id {site_id!r} ({len(site_id)} characters) is too long for the NATS bus: "
            + "; ".join(problems)
            + ": use a shorter site id (each character outside A-Z a-z 0-9 - takes 3 to 12)"
        )


def _without_userinfo(url: str) -> str:
    """``url`` without a user and password (``nats://user:pass@host``): never logged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


class _ConnectionErrors:
    """What nats-py hands the error callback (a refused token, a creds file it cannot read, a
    permissions violation, a broker that cannot be reached), logged at WARNING on the 1st, 10th
    and every 100th of a kind since the last connect; it logged them at DEBUG, so a bus with a
    wrong token never connected and said nothing."""

    def __init__(self, cfg: BusConfig) -> None:
        self._servers = ", ".join(_without_userinfo(u) for u in cfg.urls)
        self._retry_s = cfg.reconnect_wait_s
        self._seen: dict[str, int] = {}

    def connected(self) -> None:
        self._seen.clear()

    def note(self, exc: Exception, connected: bool) -> None:
        kind = type(exc).__name__
        n = self._seen[kind] = self._seen.get(kind, 0) + 1
        if n not in (1, 10) and n % 100:
            return
        log.warning(
            "bus: NATS at %s: %s (%s, %d time(s)%s)%s",
            self._servers,
            str(exc) or kind,
            kind,
            n,
            "" if connected else f"; retrying every {self._retry_s:g} s",
            "" if connected else "; critical events wait in the outbox until it connects",
        )


def _connect_options(cfg: BusConfig, callbacks: Any) -> dict[str, Any]:
    """nats-py ``connect`` options for ``cfg``; ``callbacks`` has the three ``*_cb`` methods."""
    opts: dict[str, Any] = {
        "servers": list(cfg.urls),
        "name": cfg.name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": cfg.reconnect_wait_s,
        "connect_timeout": cfg.connect_timeout_s,
        "error_cb": callbacks._error_cb,
        "disconnected_cb": callbacks._disconnected_cb,
        "reconnected_cb": callbacks._reconnected_cb,
        "pending_size": 8 * 1024 * 1024,
    }
    if cfg.token:
        opts["token"] = cfg.token
    if cfg.creds_file:
        opts["user_credentials"] = cfg.creds_file
    return opts


class NatsConnection:
    """One NATS connection that several sites' buses share (``NatsBus(..., connection=)``).

    The cloud reads the audit streams of every site it serves: one connection (and its
    reconnect loop, its pings) per site does not scale to hundreds of sites. The buses that share
    it keep their own streams, consumers and outboxes; the connection's events (disconnected,
    reconnected, slow consumer) reach every one of them. Closing a bus leaves the connection to
    the others; ``close()`` ends it."""

    def __init__(self, config: BusConfig) -> None:
        check_creds_file(config)
        self.config = config
        self._errors = _ConnectionErrors(config)
        self._nc: NatsClient | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._buses: set[NatsBus] = set()

    @property
    def buses(self) -> int:
        """How many buses use the connection now."""
        return len(self._buses)

    async def wait(self, bus: NatsBus) -> NatsClient:
        """The connection, for ``bus``, once connected (the first caller starts connecting)."""
        self._buses.add(bus)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._connect(), name="bus-nats-shared-connect"
            )
        await self._connected.wait()
        assert self._nc is not None
        return self._nc

    def leave(self, bus: NatsBus) -> None:
        self._buses.discard(bus)

    async def _connect(self) -> None:
        nc = NatsClient()
        # With max_reconnect_attempts=-1, connect() keeps trying until a server answers.
        await nc.connect(**_connect_options(self.config, self))
        self._nc = nc
        self._errors.connected()
        self._connected.set()

    async def _error_cb(self, exc: Exception) -> None:
        if not isinstance(exc, nats.errors.SlowConsumerError):
            # Logged once for the connection, not once per site.
            self._errors.note(exc, self._nc is not None and bool(self._nc.is_connected))
            return
        for bus in list(self._buses):
            await bus._error_cb(exc)
            return  # counted once

    async def _disconnected_cb(self) -> None:
        for bus in list(self._buses):
            await bus._disconnected_cb()

    async def _reconnected_cb(self) -> None:
        self._errors.connected()
        for bus in list(self._buses):
            await bus._reconnected_cb()

    async def close(self) -> None:
        if self._task is not None:
            await _end_tasks([self._task])
            self._task = None
        nc, self._nc = self._nc, None
        self._connected.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


class NatsBus:
    """The bus over NATS JetStream. See :class:`evcore.bus.api.Bus` for the contract."""

    def __init__(
        self,
        site_id: str,
        config: BusConfig | None = None,
        *,
        clock: Clock | None = None,
        streams: Sequence[StreamSpec] | None = None,
        outbox_path: Path | None = None,
        ack_wait_s: float = 30.0,
        route_cache_size: int = 16_384,
        connection: NatsConnection | None = None,
    ) -> None:
        self._site_id = site_id
        # A connection shared with other sites' buses, or None: this bus connects on its own.
        self._shared = connection
        self.config = config or BusConfig(kind="nats")
        if connection is None:
            check_creds_file(self.config)
        self._errors = _ConnectionErrors(self.config)
        self.subjects = Subjects(site_id)
        self.clock: Clock = clock or WallClock()
        self._stats = BusStats()
        self._max_payload = _DEFAULT_MAX_PAYLOAD
        # The figure kept in the outbox file (None: none; the default is then only assumed).
        self._max_payload_kept: int | None = None
        # (subject pattern, listener) told of set-aside entries; woken when there may be more.
        self._set_aside_listeners: list[tuple[str, SetAsideListener]] = []
        self._report_wake = asyncio.Event()
        # Losses of unreadable outbox files whose stream positions are not noted yet: the pump
        # sends nothing before it has noted them.
        self._losses_to_place: list[OutboxLoss] = []
        self._specs = list(streams) if streams is not None else self.config.streams(site_id)
        path = outbox_path or self.config.outbox_dir / f"{escape_token(site_id)}.sqlite"
        _check_name_lengths(site_id, self._specs, path)
        self.outbox = Outbox(path, max_bytes=self.config.outbox_max_bytes)
        self.ack_wait_s = ack_wait_s
        self._nc: NatsClient | None = None
        self._js: Any = None
        self._ready = asyncio.Event()
        self._subs: set[_NatsSub] = set()
        self._consumers: set[_NatsConsumer] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._latest: OrderedDict[str, tuple[bytes, str, str | None]] = OrderedDict()
        self._queue: deque[tuple[str, bytes, str, str | None]] = deque()
        self._send_wake = asyncio.Event()
        self._in_flight = 0
        self._streams_lock = asyncio.Lock()
        # Set by delete_streams(): the site is being decommissioned; never re-create its streams.
        self._streams_deleted = False
        self._started = False
        self._closing = False
        # subject -> (kind token, stream storing it or None), validated once; bounded.
        self._routes: RouteCache[tuple[str, StreamSpec | None]] = RouteCache(route_cache_size)
        # (stream, subject, event id) -> stream sequence, from the pump's acks and ack_state's
        # look-ups (checked against the stream before use: a stream made again renumbers).
        self._seqs: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        # Per (stream, subject): the highest sequence ack_state has read through (the ids up to
        # it are in _seqs, or were dropped from it as the oldest).
        self._scanned: dict[tuple[str, str], int] = {}

    @property
    def site_id(self) -> str:
        return self._site_id

    @property
    def stats(self) -> BusStats:
        self._stats.outbox_pending = self.outbox.pending
        self._stats.outbox_bytes = self.outbox.held_bytes
        self._stats.outbox_refused = self.outbox.refused
        return self._stats

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._ready.is_set() and bool(self._nc.is_connected)

    @property
    def streams(self) -> list[StreamSpec]:
        return list(self._specs)

    @property
    def max_payload(self) -> int:
        """The broker's max_payload that ``publish`` checks against: the connected broker's,
        else the last one a broker gave (kept in the outbox file), else nats-server's default
        (``max_payload_known`` False: a guess until a broker answers)."""
        nc = self._nc
        return int(nc.max_payload) if nc is not None and nc.max_payload else self._max_payload

    @property
    def max_payload_known(self) -> bool:
        nc = self._nc
        return bool(nc is not None and nc.max_payload) or self._max_payload_kept is not None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        await self.outbox.open()
        with contextlib.suppress(Exception):  # unknown: the default
            known = await self.outbox.recall(_MAX_PAYLOAD_KEY)
            if known is not None and int(known) > 0:
                self._max_payload = self._max_payload_kept = int(known)
        try:
            losses = await self.outbox.losses()
        except Exception as exc:  # the notes are in the file just opened; a read failing is odd
            log.error("bus: cannot read the outbox's loss notes: %r", exc)
            losses = []
        self._losses_to_place = [x for x in losses if x.stream_last_seq is None]
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._connect_loop(), name="bus-nats-connect"),
            loop.create_task(self._pump(), name="bus-nats-outbox"),
            loop.create_task(self._sender(), name="bus-nats-sender"),
            loop.create_task(self._report_set_aside(), name="bus-nats-set-aside"),
        ]
        # Wait briefly for the broker; without it the bus still accepts events (outbox, queues).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self.config.connect_timeout_s)

    async def _error_cb(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._stats.slow_consumer_dropped += 1
            return
        self._errors.note(exc, self._nc is not None and bool(self._nc.is_connected))

    async def _disconnected_cb(self) -> None:
        log.info("bus: disconnected from NATS; critical events wait in the outbox")

    async def _learn_max_payload(self) -> None:
        """Keep the broker's max_payload (its INFO, on every connect) for a start without it."""
        nc = self._nc
        if nc is None or not nc.max_payload or nc.max_payload == self._max_payload_kept:
            return
        self._max_payload = int(nc.max_payload)
        try:
            await self.outbox.remember(_MAX_PAYLOAD_KEY, str(self._max_payload))
        except Exception as exc:  # the figure is only a default for the next start
            log.warning("bus: could not keep the broker's max_payload: %r", exc)
        else:
            # Kept even when it is nats-server's default: the next start without a broker then
            # knows it rather than assumes it.
            self._max_payload_kept = self._max_payload

    async def _reconnected_cb(self) -> None:
        log.info("bus: reconnected to NATS")
        self._errors.connected()
        await self._learn_max_payload()
        self.outbox.nonempty.set() if self.outbox.pending else None
        self._send_wake.set()

    async def _connect_loop(self) -> None:
        cfg = self.config
        if self._shared is not None:
            nc = await self._shared.wait(self)
        else:
            nc = NatsClient()
            # With max_reconnect_attempts=-1, connect() keeps trying until a server answers.
            try:
                await nc.connect(**_connect_options(cfg, self))
            except Exception as exc:
                # What nats-py does not retry (a URL it cannot use) ended this task without a
                # word: the bus never connected.
                log.error(
                    "bus: cannot connect to NATS at %s: %s; the bus stays unconnected, critical "
                    "events wait in the outbox (fix [bus] and restart)",
                    ", ".join(_without_userinfo(u) for u in cfg.urls),
                    str(exc) or type(exc).__name__,
                )
                raise
        self._nc = nc
        self._errors.connected()
        self._js = nc.jetstream(timeout=cfg.publish_timeout_s, domain=cfg.jetstream_domain or None)
        await self._learn_max_payload()
        if cfg.manage_streams and not self._closing and not self._streams_deleted:
            # Tried at the reconnect pace for up to connect_timeout_s (a cluster still electing
            # its leaders refuses for a few seconds: start() then returns with the streams made).
            deadline = asyncio.get_running_loop().time() + cfg.connect_timeout_s
            failed: Exception | None = None
            while True:
                try:
                    async with self._streams_lock:
                        if not self._streams_deleted:
                            await self._ensure_streams()
                    failed = None
                    break
                except Exception as error:
                    failed = error
                    if self._closing or asyncio.get_running_loop().time() >= deadline:
                        break
                    await self.clock.sleep(cfg.reconnect_wait_s)
            if failed is not None:
                # One stream refused (the broker's JetStream storage full, say) must not keep the
                # others idle: the bus goes ready with the streams it has (a publish or consumer
                # on a missing one retries and restores it) and keeps trying in the background.
                # Before, the whole bus stayed not ready: no audit record left, no grid signal
                # came in, while the EVENTS stream existed.
                log.warning(
                    "bus: creating streams failed: %s; working with the streams there are and "
                    "trying again in the background",
                    failed,
                )
                self._tasks.append(
                    asyncio.get_running_loop().create_task(
                        self._ensure_streams_later(), name="bus-nats-streams"
                    )
                )
        # Ready first: a subscribe() from now on attaches itself; then attach the earlier ones.
        self._ready.set()
        self._send_wake.set()
        for s in list(self._subs):
            await s.attach(nc)

    async def _ensure_streams_later(self) -> None:
        """Retry creating the site's streams (every ``reconnect_wait_s`` for 20 tries, then
        doubling to 30 s; the warning on the 1st, 10th and every 100th failure) until all
        exist."""
        attempt = 0
        while not self._closing and not self._streams_deleted:
            attempt += 1
            # At the connect loop's old pace for the first minute's worth of tries (a cluster
            # still electing its leaders refuses for a few seconds), then backing off to 30 s.
            wait = self.config.reconnect_wait_s
            delay = wait if attempt <= 20 else min(wait * 2 ** min(attempt - 20, 10), 30.0)
            await self.clock.sleep(delay)
            try:
                async with self._streams_lock:
                    if self._streams_deleted:
                        # delete_streams() while this waited: never make them again (it went on
                        # and made the deleted streams again while one was refused).
                        return
                    created = await self._ensure_streams()
            except Exception as exc:
                if attempt in (1, 10) or attempt % 100 == 0:
                    log.warning("bus: creating streams still fails (attempt %d): %s", attempt, exc)
                continue
            log.warning("bus: the streams exist now (created %s)", created or "none")
            return

    async def _ensure_streams(self) -> list[str]:
        """Create the site's streams, or update them to this configuration; the names created.
        Each stream is tried; ``BusError`` naming every one that failed."""
        assert self._js is not None
        created: list[str] = []
        failed: list[str] = []
        for spec in self._specs:
            conf = jsapi.StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                retention=jsapi.RetentionPolicy.LIMITS,
                discard=jsapi.DiscardPolicy.OLD,
                max_age=spec.max_age_s if spec.max_age_s > 0 else None,
                max_msgs=spec.max_msgs,
                max_bytes=spec.max_bytes,
                duplicate_window=spec.duplicate_window_s,
                num_replicas=spec.replicas,
                storage=jsapi.StorageType.FILE
                if spec.storage == "file"
                else jsapi.StorageType.MEMORY,
            )
            try:
                try:
                    await self._js.stream_info(spec.name)
                except nats.js.errors.NotFoundError:
                    await self._js.add_stream(conf)
                    created.append(spec.name)
                else:
                    await self._js.update_stream(conf)
            except nats.js.errors.APIError as exc:
                failed.append(stream_error(spec, exc))
        if failed:
            raise BusError("; ".join(failed))
        return created

    async def _restore_streams(self, error: BaseException | None) -> None:
        """A publish found no stream for its subject, or a durable consumer its stream: the broker
        came back without its JetStream store (a memory-storage stream, a lost or replaced store).
        Create the site's streams again, or critical events would wait in the outbox for ever on a
        connected broker."""
        if (
            not self.config.manage_streams
            or self._streams_deleted
            or not isinstance(
                error, nats.js.errors.NoStreamResponseError | nats.js.errors.NotFoundError
            )
        ):
            return
        async with self._streams_lock:
            if self._streams_deleted:
                return
            try:
                created = await self._ensure_streams()
            except Exception as exc:
                log.warning("bus: re-creating the streams failed: %s", exc)
            else:
                if created:
                    log.warning("bus: the broker had lost stream(s) %s; created again", created)

    async def delete_streams(self) -> None:
        """Remove this site's streams (tests and decommissioning only); this bus will not
        create them again."""
        self._streams_deleted = True
        if self._js is None:
            return
        # Under the lock: a creation in progress (the background retry, a restore) finishes
        # first, and none starts after (each checks the flag under it).
        async with self._streams_lock:
            for spec in self._specs:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self._js.delete_stream(spec.name)

    async def close(self) -> None:
        if not self._started:
            return
        self._closing = True
        for c in list(self._consumers):
            await c.stop()
        for s in list(self._subs):
            await s.stop()
        if self.connected:
            await self.flush(timeout_s=self.config.publish_timeout_s)
        await _end_tasks(self._tasks)
        self._tasks = []
        self._drop_unsent()
        nc, self._nc = self._nc, None
        if self._shared is not None:
            self._shared.leave(self)  # the connection stays for the other buses
        elif nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await self.outbox.close()
        self._ready.clear()
        self._started = False

    def _drop_unsent(self) -> None:
        """At close: the normal events and telemetry still in memory (broker away, or slower than
        the flush) are lost with the process; count them as dropped and say so (they went
        without a word), with the critical events that wait in the outbox for the next start."""
        events, samples = len(self._queue), len(self._latest)
        self._queue.clear()
        self._latest.clear()
        self._stats.queue_dropped += events
        self._stats.telemetry_dropped += samples
        if events or samples:
            log.warning(
                "bus: closing with %d event(s) and %d telemetry sample(s) not sent (broker %s): "
                "dropped; %d critical event(s) wait in the outbox %s for the next start",
                events,
                samples,
                "connected, the flush timed out" if self.connected else "unreachable",
                self.outbox.pending,
                self.outbox.path,
            )
        elif self.outbox.pending:
            log.info(
                "bus: closing; %d critical event(s) wait in the outbox %s for the next start",
                self.outbox.pending,
                self.outbox.path,
            )

    # -- publishing ------------------------------------------------------------------------------
    def _route(self, subject: str) -> tuple[str, StreamSpec | None]:
        """A concrete subject's kind and stream, resolved once (``ValueError`` if invalid)."""
        return self._routes.get(
            subject, lambda s: (self.subjects.kind_of(s), stream_for_subject(self._specs, s))
        )

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("bus not started: call await bus.start() first")

    def _check_size(self, subject: str, data: bytes, eid: str, stream: StreamSpec | None) -> None:
        """Refuse, at acceptance, a message the broker could never take (headers plus payload
        above its ``max_payload``): queued, it would be retried for ever and hold back every
        event behind it (the outbox sends in order), and each retry would keep one of nats-py's
        publish slots."""
        why = self._too_large(subject, data, eid, stream.name if stream else None)
        if why is not None:
            raise PayloadTooLarge(why + "; split it")

    def _too_large(self, subject: str, data: bytes, eid: str, stream: str | None) -> str | None:
        """Why the broker cannot take this message (headers plus payload above its
        max_payload: the connected broker's, else the last one learnt), or None."""
        limit = self.max_payload
        headers = _HEADER_OVERHEAD + len(eid.encode()) + (len(stream) if stream else 0)
        if len(data) + headers <= limit:
            return None
        nc = self._nc
        if nc is not None and nc.max_payload:
            whose = ""
        elif self._max_payload_kept is not None:
            whose = " (the figure it gave last, kept in the outbox: it is away)"
        else:
            whose = " (nats-server's default: no broker has answered yet)"
        return (
            f"payload of {len(data)} bytes on {subject!r} (event {eid}) exceeds the broker's "
            f"max_payload of {limit} bytes{whose} with {headers} bytes of headers"
        )

    async def publish(
        self,
        subject: str,
        payload: Payload,
        *,
        event_id: str | None = None,
        critical: bool = False,
    ) -> str:
        self._require_started()
        kind, stream = self._route(subject)
        data = to_bytes(payload)
        eid = event_id_for(payload, event_id)
        self._check_size(subject, data, eid, stream)
        if critical or kind in CRITICAL_KINDS:
            if stream is None:
                raise ValueError(f"critical event on {subject!r}, which no stream stores")
            # Audit records are in the audit log's store before they are offered (it sends a
            # refused one again): they yield the outbox's last room to events with no copy.
            await self.outbox.append(
                subject, eid, data, self.clock.now(), yields=kind in YIELDING_KINDS
            )
            self._stats.published += 1
            return eid
        self._stats.published += 1
        stream_name = stream.name if stream is not None else None
        if kind in SAMPLED_KINDS:
            if subject in self._latest:
                self._stats.telemetry_dropped += 1
                # Latest wins, but the subject keeps its turn in the queue.
            self._latest[subject] = (data, eid, stream_name)
        else:
            if len(self._queue) >= self.config.send_queue_size:
                self._queue.popleft()
                self._stats.queue_dropped += 1
            self._queue.append((subject, data, eid, stream_name))
        self._send_wake.set()
        return eid

    async def publish_many(
        self, items: Sequence[tuple[str, Payload, str | None]], *, critical: bool = False
    ) -> list[str]:
        self._require_started()
        rows: list[tuple[str, str, bytes, float]] = []
        yields = True  # every critical row's publisher keeps a copy of its own
        ids: list[str] = []
        rest: list[tuple[str, bytes, str]] = []
        now = self.clock.now()
        for subject, payload, event_id in items:
            kind, stream = self._route(subject)
            data = to_bytes(payload)
            eid = event_id_for(payload, event_id)
            self._check_size(subject, data, eid, stream)
            ids.append(eid)
            if critical or kind in CRITICAL_KINDS:
                if stream is None:
                    raise ValueError(f"critical event on {subject!r}, which no stream stores")
                rows.append((subject, eid, data, now))
                yields = yields and kind in YIELDING_KINDS
            else:
                rest.append((subject, data, eid))
        if rows:
            await self.outbox.append_many(rows, yields=yields)
            self._stats.published += len(rows)
        for subject, data, eid in rest:
            await self.publish(subject, data, event_id=eid)
        return ids

    async def _sender(self) -> None:
        """Sends telemetry (latest per subject) and normal events in pipelined windows; never
        blocks publish(). Normal events and telemetry subjects take turns."""
        turn = 0
        while True:
            if not (self._latest or self._queue) or not self.connected:
                self._send_wake.clear()
                if not self.connected:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._send_wake.wait(), 0.5)
                else:
                    await self._send_wake.wait()
                continue
            batch: list[_Unsent] = []
            while len(batch) < _SEND_WINDOW and (self._queue or self._latest):
                take_queue = bool(self._queue) and (not self._latest or turn % 2 == 0)
                turn += 1
                if take_queue:
                    batch.append((True, self._queue.popleft()))
                else:
                    subject, (data, eid, stream) = self._latest.popitem(last=False)
                    batch.append((False, (subject, data, eid, stream)))
            batch = self._without_oversize(batch)
            self._in_flight += len(batch)
            try:
                failed, error = await self._send_window(batch)
            finally:
                self._in_flight -= len(batch)
            self._stats.sent += len(batch) - len(failed)
            if failed:
                self._stats.send_failures += len(failed)
                self._requeue(failed)
                await self._restore_streams(error)
                await self.clock.sleep(self.config.reconnect_wait_s)

    def _without_oversize(self, batch: list[_Unsent]) -> list[_Unsent]:
        """``batch`` less the events the connected broker can never take (accepted against a
        larger max_payload: the default before any broker answered, or one lowered since):
        dropped, counted and logged. Sent, each failed its window and went back to the head of
        its queue for ever (nats-py's MaxPayloadError): nothing behind it left. Critical events
        are set aside by the pump instead (they are on disk)."""
        kept: list[_Unsent] = []
        for item in batch:
            from_queue, (subject, data, eid, stream) = item
            why = self._too_large(subject, data, eid, stream)
            if why is None:
                kept.append(item)
                continue
            if from_queue:
                self._stats.queue_dropped += 1
            else:
                self._stats.telemetry_dropped += 1
            log.error(
                "bus: %s: the broker can never take it; dropped (not a critical event: no "
                "outbox keeps it), the events after it go on. Raise the broker's max_payload "
                "(docs/bus.md)",
                why,
            )
        return kept

    async def _send_window(
        self, batch: list[_Unsent]
    ) -> tuple[list[_Unsent], BaseException | None]:
        """Publish a window at once, then wait for JetStream's acks; returns what failed, in
        order, and the first JetStream error."""
        futs: list[asyncio.Future[Any] | None] = []
        try:
            for _, (subject, data, eid, stream) in batch:
                headers = {MSG_ID: eid}
                if stream is None:
                    assert self._nc is not None
                    await self._nc.publish(subject, data, headers=headers)
                    futs.append(None)
                else:
                    futs.append(
                        await self._js.publish_async(
                            subject,
                            data,
                            wait_stall=None,  # see _await_acks
                            stream=stream,
                            headers=headers,
                        )
                    )
        except asyncio.CancelledError:
            _cancel_all(futs)
            raise
        except Exception as exc:
            log.debug("bus: send failed after %d of %d: %r", len(futs), len(batch), exc)
        outcomes = await _await_acks(
            [f for f in futs if f is not None], self.config.publish_timeout_s
        )
        failed: list[_Unsent] = []
        first_error: BaseException | None = None
        it = iter(outcomes)
        for i, item in enumerate(batch):
            if i >= len(futs):
                failed.append(item)
            elif futs[i] is not None:
                outcome = next(it)
                if isinstance(outcome, BaseException):
                    log.debug("bus: send on %s failed: %r", item[1][0], outcome)
                    failed.append(item)
                    first_error = first_error or outcome
        return failed, first_error

    def _requeue(self, failed: list[_Unsent]) -> None:
        """Put unsent events back at the front, in their order; what no longer fits is dropped
        and counted."""
        for from_queue, item in reversed(failed):
            if from_queue:
                if len(self._queue) >= self.config.send_queue_size:
                    self._stats.queue_dropped += 1
                else:
                    self._queue.appendleft(item)
            elif item[0] not in self._latest:
                self._latest[item[0]] = (item[1], item[2], item[3])
                self._latest.move_to_end(item[0], last=False)
            else:
                self._stats.telemetry_dropped += 1  # a newer sample arrived meanwhile

    async def _pump(self) -> None:
        """Sends the outbox in order; an entry leaves the outbox only after JetStream stored it
        and every entry before it."""
        ob = self.outbox
        failures = 0
        window = _PUMP_WINDOW
        while True:
            if self._losses_to_place:
                # Before anything is sent after an outbox loss: nothing of this outbox reached a
                # stream since, so what a stream holds now is all the lost entries could follow
                # (last_stored(..., before_loss=)).
                if not self.connected:
                    await self._wait_connected(0.5)
                    continue
                try:
                    await self._place_losses()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures = await self._pump_failed(failures, "noting the streams", exc)
                    if failures >= _PLACE_LOSS_TRIES:
                        await self._place_losses(unknown=True)
                        failures = 0
                else:
                    failures = 0
                continue
            if ob.pending == 0:
                ob.nonempty.clear()
                await ob.nonempty.wait()
                continue
            if not self.connected:
                await self._wait_connected(0.5)
                continue
            try:
                entries = await ob.peek(window)
                if not entries:
                    # The count says some are pending and the file holds none (another outbox
                    # on the same file took them): count again rather than ask 100 times a second.
                    await ob.recount()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # An outbox read failing (a locked file, an I/O error) ended this task for good,
                # silently: nothing more left while publish() went on accepting.
                failures = await self._pump_failed(failures, "read", exc)
                continue
            if not entries:
                await self.clock.sleep(0.01)
                continue
            futs: list[asyncio.Future[Any]] = []
            error: BaseException | None = None
            # An entry the connected broker can never take (its max_payload is below it: lowered
            # since the entry was accepted, or learnt only now; or its subject is too long):
            # sent after what is before it, then set aside. Before, it was retried for ever and
            # nothing behind it left.
            oversize: tuple[OutboxEntry, str] | None = None
            try:
                # Order in the stream: a window normally reaches the socket in one write (nats-py
                # does not yield between these publishes), so if the broker lost entry i it lost
                # every later one too. Should the loop yield and the connection drop meanwhile,
                # stop: later entries would sit in nats-py's reconnect buffer and be stored
                # after the reconnect, ahead of entry i's retry.
                for e in entries:
                    if self._nc is None or not self._nc.is_connected:
                        break
                    stream = stream_for_subject(self._specs, e.subject)
                    # A subject too long for the broker's protocol line (accepted by an earlier
                    # version) cut the connection at each try: nothing behind it ever left.
                    why = subject_too_long(e.subject) or self._too_large(
                        e.subject, e.payload, e.event_id, stream.name if stream else None
                    )
                    if why is not None:
                        oversize = (e, why)
                        break
                    futs.append(
                        await self._js.publish_async(
                            e.subject,
                            e.payload,
                            wait_stall=None,  # see _await_acks
                            stream=stream.name if stream else None,
                            headers={MSG_ID: e.event_id},
                        )
                    )
            except asyncio.CancelledError:
                _cancel_all(futs)
                raise
            except Exception as exc:
                error = exc
            done_seq = 0
            for e, outcome in zip(
                entries, await _await_acks(futs, self.config.publish_timeout_s), strict=False
            ):
                if isinstance(outcome, BaseException):
                    error = outcome
                    break
                if not getattr(outcome, "duplicate", False):
                    self._stats.sent += 1
                # A repeat's ack carries the sequence of the copy the stream holds.
                self._remember_seq(outcome.stream, e.subject, e.event_id, outcome.seq)
                done_seq = e.seq
            if done_seq:
                try:
                    await ob.remove_through(done_seq)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Sent but still in the outbox: sent again later under the same event ids
                    # (the stream drops the repeats).
                    error = exc
            if error is None and oversize is not None and len(futs) == entries.index(oversize[0]):
                try:
                    await self._set_aside(*oversize)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = exc
                else:
                    failures = 0
                    continue
            elif error is None and len(futs) == len(entries):
                failures = 0
                window = _PUMP_WINDOW
                continue
            window = 1  # after a failure, go one by one until the broker confirms again
            await self._restore_streams(error)
            failures = await self._pump_failed(failures, "publish", error)

    async def _set_aside(self, entry: OutboxEntry, why: str) -> None:
        await self.outbox.set_aside(entry.seq, self.clock.now(), why)
        self._stats.set_aside += 1
        self._report_wake.set()
        log.error(
            "bus: %s: the broker can never take it; set aside in %s (table outbox_set_aside), "
            "the events after it go on%s.%s (docs/bus.md)",
            why,
            self.outbox.path,
            ""
            if any(subject_matches(p, entry.subject) for p, _ in self._set_aside_listeners)
            else " (no publisher listens for it yet: it is offered to the first that does)",
            " Raise the broker's max_payload" if "max_payload" in why else "",
        )

    # -- what the outbox will never send ---------------------------------------------------------
    def on_set_aside(self, subject_pattern: str, listener: SetAsideListener) -> None:
        validate_subject(subject_pattern, wildcards=True)
        self._set_aside_listeners.append((subject_pattern, listener))
        self._report_wake.set()

    async def _report_set_aside(self) -> None:
        """Offer every set-aside entry nobody has dealt with to the listeners of its subject; those
        a listener did not deal with again after a back-off (real time: the broker and the
        publisher's store are real even under a simulated clock)."""
        failures = 0
        while True:
            self._report_wake.clear()
            left = await self._offer_set_aside() if self._set_aside_listeners else False
            if not left:
                failures = 0
                await self._report_wake.wait()
                continue
            failures += 1
            delay = _REPORT_BACKOFF_S[min(failures, len(_REPORT_BACKOFF_S)) - 1]
            # Not asyncio.wait_for: before Python 3.12 it can swallow the task's cancellation
            # when the event is set in the same turn, and close() then waited for ever.
            woken = asyncio.ensure_future(self._report_wake.wait())
            try:
                await asyncio.wait({woken}, timeout=delay)
            finally:
                woken.cancel()

    async def _offer_set_aside(self) -> bool:
        """One pass over the entries not dealt with; whether some matching one is left."""
        left = False
        after = 0
        while True:
            try:
                batch = await self.outbox.unreported_set_aside(after)
            except Exception as exc:
                log.warning("bus: reading the set-aside entries failed: %r", exc)
                return True
            if not batch:
                return left
            for entry in batch:
                after = entry.seq
                if not await self._offer(entry):
                    left = True

    async def _offer(self, entry: SetAside) -> bool:
        """Hand ``entry`` to each listener of its subject; True once all dealt with it (an
        entry no listener matches is left for one that will)."""
        listeners = [f for p, f in self._set_aside_listeners if subject_matches(p, entry.subject)]
        if not listeners:
            return True
        dealt = True
        for listener in listeners:
            try:
                dealt = bool(await listener(entry)) and dealt
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "bus: a listener failed on set-aside event %s (%s); offered again",
                    entry.event_id,
                    entry.subject,
                )
                dealt = False
        if dealt:
            try:
                await self.outbox.mark_reported(entry.seq, self.clock.now())
            except Exception as exc:  # offered again: a listener takes a repeat
                log.warning("bus: marking set-aside entry %d dealt with failed: %r", entry.seq, exc)
                return False
        return dealt

    async def outbox_losses(self) -> list[OutboxLoss]:
        self._require_started()
        return await self.outbox.losses()

    async def _place_losses(self, *, unknown: bool = False) -> None:
        """Note, for every loss not placed yet, where each stream stands now (``unknown``: that
        it cannot be told: the broker refused to say)."""
        positions: dict[str, int] = {}
        if not unknown:
            assert self._js is not None
            for spec in self._specs:
                try:
                    info = await self._js.stream_info(spec.name)
                except nats.js.errors.NotFoundError:
                    positions[spec.name] = 0  # (a stream not there holds nothing)
                    continue
                positions[spec.name] = int(info.state.last_seq or 0)
        for loss in self._losses_to_place:
            await self.outbox.note_stream_positions(loss.id, positions)
            log.warning(
                "bus: outbox loss %s (%s entries read back): the streams stood at %s when the "
                "broker was reached again; what a publisher keeps a copy of and no stream held "
                "then is for it to send again (last_stored)",
                loss.id,
                loss.salvaged,
                positions or "an unknown place (the broker did not say)",
            )
        self._losses_to_place = []

    async def last_stored(
        self, subject: str, *, before_loss: OutboxLoss | None = None
    ) -> BusMessage | None:
        self._require_started()
        _, spec = self._route(subject)
        if spec is None:
            raise ValueError(f"no stream stores {subject!r}; nothing there is stored")
        upto: int | None = None
        if before_loss is not None:
            noted = {x.id: x for x in await self.outbox.losses()}.get(before_loss.id)
            if noted is None:
                raise BusError(f"outbox loss {before_loss.id} is no longer noted")
            if noted.stream_last_seq is None:
                raise BusUnavailable(
                    f"the broker has not been reached since outbox loss {noted.id}: where the "
                    "streams stood is not known yet"
                )
            if spec.name not in noted.stream_last_seq:
                raise BusError(
                    f"where stream {spec.name} stood at outbox loss {noted.id} is not known "
                    "(the broker did not say)"
                )
            upto = noted.stream_last_seq[spec.name]
        if not self.connected or self._js is None:
            raise BusUnavailable(f"broker unreachable; cannot ask about {subject!r}")
        try:
            m = await self._last_on_subject(spec.name, subject, upto)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if isinstance(exc, nats.js.errors.APIError) and not isinstance(
                exc, nats.js.errors.ServiceUnavailableError
            ):
                raise BusError(f"last_stored on {subject!r}: {exc.description or exc!r}") from exc
            raise BusUnavailable(f"last_stored on {subject!r}: {exc!r}") from exc
        if m is None:
            return None
        headers = dict(m.headers or {})
        return BusMessage(
            subject=str(m.subject or subject),
            data=bytes(m.data or b""),
            event_id=headers.get(MSG_ID, ""),
            headers=headers,
        )

    async def _last_on_subject(self, stream: str, subject: str, upto: int | None) -> Any:
        """The stream's last message on ``subject`` at a sequence up to ``upto`` (None: any), or
        None: the newest by subject, else a search (the first message at or after a sequence,
        halving the range: a few dozen requests however long the stream)."""
        js = self._js
        try:
            last = await js.get_msg(stream, subject=subject)
        except nats.js.errors.NotFoundError:
            return None
        if upto is None or int(last.seq or 0) <= upto:
            return last
        best: Any = None
        lo, hi = 1, upto
        while lo <= hi:
            mid = (lo + hi) // 2
            try:
                m = await js.get_msg(stream, seq=mid, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                m = None
            found = int(m.seq or 0) if m is not None else 0
            if m is None or found > upto or found < mid:
                hi = mid - 1
            else:
                best, lo = m, found + 1
        return best

    async def _pump_failed(self, failures: int, what: str, error: BaseException | None) -> int:
        """Count an outbox pump failure (``what``: read or publish), log the 1st, 10th and every
        100th in a row, and back off; returns the failures in a row."""
        failures += 1
        self._stats.send_failures += 1
        if failures in (1, 10) or failures % 100 == 0:
            log.warning("bus: outbox %s failed (%d pending): %r", what, self.outbox.pending, error)
        await self.clock.sleep(min(self.config.reconnect_wait_s * failures, 2.0))
        return failures

    async def _wait_connected(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        if not self.connected:
            await self.clock.sleep(min(timeout_s, 0.1))

    async def flush(self, timeout_s: float = 5.0) -> bool:
        async def drained() -> None:
            # Polls several sources (outbox count, queues, in-flight sends); not control timing.
            while self.outbox.pending or self._latest or self._queue or self._in_flight:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            if self._nc is not None and self.connected:
                await self._nc.flush(timeout=max(1, int(timeout_s)))

        try:
            await asyncio.wait_for(drained(), timeout_s)
        except (TimeoutError, nats.errors.Error):
            return False
        return True

    # -- acknowledgements ------------------------------------------------------------------------
    def _remember_seq(
        self, stream: str | None, subject: str, event_id: str, seq: int | None
    ) -> None:
        if not stream or not seq or not event_id:
            return
        key = (stream, subject, event_id)
        self._seqs[key] = int(seq)
        self._seqs.move_to_end(key)
        while len(self._seqs) > _SEQS_KEPT:
            (old_stream, old_subject, _), _ = self._seqs.popitem(last=False)
            # An id read through and then forgotten is found again only from the start.
            self._scanned.pop((old_stream, old_subject), None)

    async def _stored_seq(self, stream: str, subject: str, event_id: str) -> int:
        """The stream sequence of the message on ``subject`` with ``event_id`` (0: none held).
        Remembered (from the pump's ack or an earlier look-up) and checked; else the subject's
        last message; else the subject's messages not read before, one request each (every id
        seen is remembered, and where the reading got to: a miss asked again reads only the
        messages stored since; from the first again once a remembered id of the subject was
        dropped as the oldest)."""
        js = self._js
        key = (stream, subject, event_id)
        known = self._seqs.get(key)
        if known:
            try:
                m = await js.get_msg(stream, seq=known)
            except nats.js.errors.NotFoundError:
                m = None
            if m is not None and m.subject == subject and (m.headers or {}).get(MSG_ID) == event_id:
                return known
            self._seqs.pop(key, None)
        try:
            last = await js.get_msg(stream, subject=subject)
        except nats.js.errors.NotFoundError:
            return 0
        last_seq = int(last.seq or 0)
        self._remember_seq(stream, subject, (last.headers or {}).get(MSG_ID, ""), last_seq)
        if (last.headers or {}).get(MSG_ID) == event_id:
            return last_seq
        # Only what was not read before: a stream appends, so an id not seen up to the sequence
        # read last is later than it (or not there).
        scan = (stream, subject)
        seq = self._scanned.get(scan, 0) + 1
        while seq < last_seq:
            try:
                m = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return 0
            found = int(m.seq or 0)
            if found <= 0 or found >= last_seq:
                break
            eid = (m.headers or {}).get(MSG_ID, "")
            self._remember_seq(stream, subject, eid, found)
            self._scanned[scan] = found
            if eid == event_id:
                return found
            seq = found + 1
        self._scanned[scan] = max(self._scanned.get(scan, 0), last_seq)
        return 0

    async def ack_state(self, subject: str, event_id: str, *, durable: str) -> AckState:
        self._require_started()
        _, spec = self._route(subject)
        if spec is None:
            raise ValueError(f"no stream stores {subject!r}; nothing there is acknowledged")
        if not self.connected or self._js is None:
            raise BusUnavailable(
                f"broker unreachable; cannot ask about {event_id!r} on {subject!r}"
            )
        try:
            try:
                info = await self._js.consumer_info(spec.name, name_token(durable))
            except nats.js.errors.NotFoundError:
                consumer, floor = False, 0
            else:
                consumer = True
                floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
            seq = await self._stored_seq(spec.name, subject, event_id)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            if isinstance(exc, nats.js.errors.APIError) and not isinstance(
                exc, nats.js.errors.ServiceUnavailableError
            ):
                raise BusError(f"ack_state on {subject!r}: {exc.description or exc!r}") from exc
            raise BusUnavailable(f"ack_state on {subject!r}: {exc!r}") from exc
        return AckState(seq, consumer, floor)

    # -- receiving -------------------------------------------------------------------------------
    async def subscribe(
        self, subject_pattern: str, handler: Handler, *, queue: str | None = None
    ) -> _NatsSub:
        self._require_started()
        validate_subject(subject_pattern, wildcards=True)
        validate_queue(queue)
        sub = _NatsSub(self, subject_pattern, handler, queue)
        self._subs.add(sub)
        if self._ready.is_set() and self._nc is not None:
            await sub.attach(self._nc)
            await self._nc.flush()
        return sub

    async def request(self, subject: str, payload: Payload, *, timeout_s: float) -> bytes:
        self._require_started()
        validate_subject(subject, wildcards=False)
        if not self.connected or self._nc is None:
            raise BusUnavailable(f"broker unreachable; cannot request {subject!r}")
        try:
            reply = await self._nc.request(subject, to_bytes(payload), timeout=timeout_s)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(f"no responder on {subject!r}") from exc
        except nats.errors.TimeoutError as exc:
            raise BusTimeout(f"no reply on {subject!r} within {timeout_s} s") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
            raise BusUnavailable(f"broker connection lost during request on {subject!r}") from exc
        return bytes(reply.data)

    async def consume(
        self,
        subject_pattern: str,
        *,
        durable: str,
        handler: Handler,
        dedupe: ProcessedIdStore | None = None,
    ) -> _NatsConsumer:
        self._require_started()
        spec = durable_stream(self._specs, subject_pattern, durable)
        c = _NatsConsumer(self, subject_pattern, spec.name, name_token(durable), handler, dedupe)
        if self.connected:
            # A durable of another filter is refused here, as in-process (the broker away: when
            # the consumer attaches, logged and not consumed); so is one another consumer pulls
            # (the broker away: when it attaches, logged, and it waits for the durable).
            with contextlib.suppress(BusError, nats.errors.Error, TimeoutError):
                await c.check_filter()
                await c.check_free()
        self._consumers.add(c)
        c.start()
        if self.connected and c._task is not None:
            # Returned once attached (the durable made and pulled from), so that a second process
            # started after this one returned finds it in use.
            attached = asyncio.ensure_future(c.attached.wait())
            try:
                await asyncio.wait(
                    {attached, c._task},
                    timeout=self.config.connect_timeout_s + _IN_USE_RECHECK_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                attached.cancel()
        return c

    def new_inbox(self) -> str:
        return f"_INBOX.{uuid.uuid4().hex}"
