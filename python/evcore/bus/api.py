"""The one bus interface every component talks to, and the types around it.

The bus moves bytes (usually serialised ``evcore.v1`` protobuf messages) between components; it
knows subjects and delivery, never meaning. Two implementations pass the same test suite:
:class:`evcore.bus.inprocess.InProcessBus` (embedded default, no broker) and
:class:`evcore.bus.natsbus.NatsBus` (NATS JetStream). Build one with
:func:`evcore.bus.bus_from_config`.

Delivery classes, chosen from the subject (``evcore.<site>.<kind>…``) or ``critical=True``:

* critical (``audit``, ``transaction``, ``setpoint``, ``station_event``): accepted only once
  fsynced to the disk outbox (NATS) or appended to the stream (in-process); published in order,
  never dropped;
* sampled (``telemetry``): the latest value per subject wins when the sender falls behind; every
  replaced sample is counted in ``stats.telemetry_dropped``;
* normal: a bounded queue; overflow drops the oldest and counts it.

``publish`` never waits on the network: the control path stays live when the broker is not.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from evcore.bus.outbox import OutboxLoss, SetAside

log = logging.getLogger("evcore.bus")

Payload = bytes | ProtoMessage


class BusError(Exception):
    """Base class of the bus's own errors."""


class BusUnavailable(BusError):
    """The broker cannot be reached (request/reply needs it; publish never raises this)."""


class BusTimeout(BusError, TimeoutError):
    """A request got no reply within its timeout."""


class NoResponders(BusError):
    """A request went to a subject nobody serves."""


class PayloadTooLarge(BusError, ValueError):
    """The broker could never take this message (payload plus headers above its
    ``max_payload``): retrying it cannot succeed."""


class BadPayload(BusError, ValueError):
    """A received payload is not what the subscriber expects.

    Raised from a handler, it is logged with its reason, counted in ``stats.rejected``, acknowledged
    (never redelivered), and the subscriber lives on."""


@dataclass
class BusMessage:
    """A message as a handler receives it."""

    subject: str
    data: bytes
    event_id: str
    # Number of times this message was delivered to a durable consumer (1 on first delivery).
    delivery_count: int = 1
    reply_to: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    _responder: Callable[[bytes], Awaitable[None]] | None = field(default=None, repr=False)

    async def respond(self, payload: Payload) -> None:
        """Answer a request (``bus.request``); an error when the message was not a request."""
        if self._responder is None:
            raise BusError(f"message on {self.subject!r} is not a request; nothing to respond to")
        await self._responder(to_bytes(payload))


Handler = Callable[[BusMessage], Awaitable[None]]


@runtime_checkable
class Subscription(Protocol):
    """A live subscription or durable consumer; ``stop`` ends delivery (a durable keeps its
    place)."""

    @property
    def subject(self) -> str: ...

    async def stop(self) -> None: ...


@runtime_checkable
class ProcessedIdStore(Protocol):
    """Where a consumer keeps the ids of events whose effects it stored
    (see ``dedupe.ProcessedIds``)."""

    def contains(self, event_id: str) -> bool: ...

    def add(self, event_id: str) -> object:
        """Remember ``event_id`` (the result, e.g. ``ProcessedIds.add``'s "was it new", is not
        used by the bus)."""
        ...


@dataclass
class BusStats:
    """Counters for monitoring and tests; all only ever increase except the gauges noted."""

    published: int = 0  # accepted by publish()
    sent: int = 0  # handed to the broker / stream and confirmed where it confirms
    delivered: int = 0  # handler invocations that returned normally
    rejected: int = 0  # payloads a handler rejected (BadPayload / DecodeError)
    handler_errors: int = 0  # other handler exceptions (durable consumers get a redelivery)
    duplicates_dropped: int = 0  # deliveries skipped because the event id was already processed
    telemetry_dropped: int = 0  # telemetry samples replaced by a newer one before being sent
    queue_dropped: int = 0  # normal events dropped because the send queue was full
    slow_consumer_dropped: int = 0  # messages a slow subscriber lost (its queue was full)
    send_failures: int = 0  # broker publish attempts that failed (retried for critical events)
    outbox_pending: int = 0  # gauge: critical events accepted but not yet confirmed by the broker
    set_aside: int = 0  # critical events the broker can never take (above its max_payload), kept
    outbox_refused: int = 0  # critical events refused at outbox_max_bytes (OutboxFull)
    outbox_bytes: int = 0  # gauge: what the outbox holds against outbox_max_bytes (bytes)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream (and its in-process equivalent): which subjects it stores, how long."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * 24 * 3600.0
    max_msgs: int = -1
    max_bytes: int = -1
    # Window in which JetStream drops a repeated Nats-Msg-Id (consumers dedupe beyond it).
    duplicate_window_s: float = 120.0
    replicas: int = 1
    storage: str = "file"  # "file" or "memory"


@dataclass(frozen=True)
class AckState:
    """Where one stored event stands with one durable consumer (:meth:`Bus.ack_state`)."""

    # The event's sequence in its stream; 0 when the stream does not hold it (still in the
    # sender's outbox, never published on that subject, or aged out of the stream).
    stored_seq: int
    # Whether the durable consumer exists (it is created by its first ``consume``).
    consumer: bool
    # Every message of the durable's filter up to this stream sequence is acknowledged (0: none).
    ack_floor: int

    @property
    def stored(self) -> bool:
        return self.stored_seq > 0

    @property
    def acknowledged(self) -> bool:
        """The durable's ack floor is at or past the event (so it took every earlier one too)."""
        return self.consumer and 0 < self.stored_seq <= self.ack_floor


@runtime_checkable
class Bus(Protocol):
    """The bus interface. Subjects come from :class:`evcore.bus.subjects.Subjects`."""

    @property
    def site_id(self) -> str: ...

    @property
    def stats(self) -> BusStats: ...

    @property
    def connected(self) -> bool:
        """Whether the broker is reachable now (always true in-process)."""
        ...

    async def start(self) -> None:
        """Connect (in the background when the broker is down), create streams, resume outbox."""
        ...

    async def close(self) -> None:
        """Stop consumers and subscriptions, drain what can be sent, close."""
        ...

    async def publish(
        self,
        subject: str,
        payload: Payload,
        *,
        event_id: str | None = None,
        critical: bool = False,
    ) -> str:
        """Accept one event for delivery and return its event id (the ``Nats-Msg-Id``).

        ``event_id`` defaults to the ``event_id`` field of an ``evcore.v1.Event`` payload, else a
        new UUID. Critical events (by subject kind or ``critical=True``) are durable on return.
        """
        ...

    async def publish_many(
        self, items: Sequence[tuple[str, Payload, str | None]], *, critical: bool = False
    ) -> list[str]:
        """Publish several events in order; critical ones share one outbox commit (one fsync).

        ``items`` are ``(subject, payload, event_id or None)``. Use it for a decision's setpoints:
        one disk flush instead of one per charger.
        """
        ...

    async def subscribe(
        self, subject_pattern: str, handler: Handler, *, queue: str | None = None
    ) -> Subscription:
        """Live delivery of matching messages (at most once; nothing stored). With ``queue``, each
        message goes to one member of the group. A slow handler never stalls the publisher: its
        backlog is bounded and overflow is counted in ``stats.slow_consumer_dropped``."""
        ...

    async def request(self, subject: str, payload: Payload, *, timeout_s: float) -> bytes:
        """Send a request and wait for one reply.

        Raises BusTimeout, NoResponders, or BusUnavailable (NATS only)."""
        ...

    async def consume(
        self,
        subject_pattern: str,
        *,
        durable: str,
        handler: Handler,
        dedupe: ProcessedIdStore | None = None,
    ) -> Subscription:
        """Durable, at-least-once consumption of stored events, in order.

        Resumes from where ``durable`` left off. A message is acknowledged only after ``handler``
        returned; a handler exception makes it redelivered (``BadPayload`` is acknowledged and
        counted instead). With ``dedupe``, ids already in the store are skipped, and ids are added
        after the handler returned."""
        ...

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything accepted so far reached the broker/stream; False on timeout."""
        ...

    async def ack_state(self, subject: str, event_id: str, *, durable: str) -> AckState:
        """Whether the durable consumer ``durable`` (on the stream storing the concrete
        ``subject``) has acknowledged the event stored on ``subject`` under ``event_id``: its ack
        floor is at or past the event's stream sequence. Acknowledged means the consumer's
        handler returned (or rejected it as a bad payload), on any bus instance or process.

        ``BusUnavailable`` when the broker cannot be asked; ``ValueError`` for a subject no
        stream stores."""
        ...


#: Told of an event its bus set aside (the broker can never take it); True once the publisher
#: has dealt with it (sent it again in another form, or recorded that it is not on the bus).
SetAsideListener = Callable[[SetAside], Awaitable[bool]]


@runtime_checkable
class OutboxReports(Protocol):
    """What a bus with a disk outbox (NATS) tells a publisher that keeps its own copy of its
    events (the audit log and its store) about those it accepted and will never send. Not part
    of :class:`Bus`: the in-process bus never drops an accepted event; check with
    ``isinstance(bus, OutboxReports)``."""

    def on_set_aside(self, subject_pattern: str, listener: SetAsideListener) -> None:
        """Hand every event on a matching subject that the broker can never take (above its
        max_payload; accepted against an older figure or nats-server's default before any broker
        answered) to ``listener``, in the order they were set aside: those of earlier runs not
        yet dealt with, then each new one. An event is offered again, after a back-off and on
        the next start, until every matching listener returned True: a listener must take a
        repeat."""
        ...

    async def outbox_losses(self) -> list[OutboxLoss]:
        """The outbox files found unreadable and replaced, oldest first (see ``OutboxLoss``)."""
        ...

    async def last_stored(
        self, subject: str, *, before_loss: OutboxLoss | None = None
    ) -> BusMessage | None:
        """The last message the stream holds on the concrete ``subject`` (None: none), or with
        ``before_loss`` the last one it held when the broker was first reached after that loss:
        the events after it were in the unreadable outbox or came later. ``BusUnavailable``
        while the broker cannot be asked or has not been reached since the loss; ``BusError``
        when where the stream stood then is not known; ``ValueError`` for a subject no stream
        stores."""
        ...


def to_bytes(payload: Payload) -> bytes:
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, ProtoMessage):
        return payload.SerializeToString(deterministic=True)
    raise TypeError(f"payload must be bytes or a protobuf message, got {type(payload).__name__}")


def event_id_for(payload: Payload, event_id: str | None) -> str:
    """The id to publish under: the explicit one, an Event envelope's, or a new UUID."""
    if event_id is not None:
        if not event_id or any(c in event_id for c in "\r\n"):
            raise ValueError(f"event_id must be a non-empty single-line string, got {event_id!r}")
        return event_id
    if isinstance(payload, ProtoMessage):
        desc = payload.DESCRIPTOR
        if "event_id" in desc.fields_by_name:
            found = getattr(payload, "event_id", "")
            if isinstance(found, str) and found:
                return found
    return uuid.uuid4().hex


M = TypeVar("M", bound=ProtoMessage)


def decode(message_type: type[M], data: bytes) -> M:
    """Parse ``data`` as ``message_type``; a clear :class:`BadPayload` when it is not one."""
    msg = message_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise BadPayload(
            f"payload of {len(data)} bytes is not a valid "
            f"{message_type.DESCRIPTOR.full_name}: {exc}"
        ) from exc
    if msg.DESCRIPTOR.full_name == "evcore.v1.Event":
        if not getattr(msg, "event_id", ""):
            raise BadPayload("evcore.v1.Event without event_id")
        if msg.WhichOneof("payload") is None:
            raise BadPayload(f"evcore.v1.Event {getattr(msg, 'event_id', '')!r} has no payload")
    return msg


def decoded(message_type: type[M], handler: Callable[[BusMessage, M], Awaitable[None]]) -> Handler:
    """Adapt a typed handler: the bus hands it the parsed message; bad payloads are rejected."""

    async def _handle(msg: BusMessage) -> None:
        await handler(msg, decode(message_type, msg.data))

    return _handle


async def run_handler(handler: Handler, msg: BusMessage, stats: BusStats, where: str) -> str:
    """Run a handler with the bus's error policy. Returns "ok", "rejected" or "error"."""
    try:
        await handler(msg)
    except (BadPayload, DecodeError) as exc:
        stats.rejected += 1
        log.warning(
            "bus %s: rejected payload on %s (event %s): %s", where, msg.subject, msg.event_id, exc
        )
        return "rejected"
    except Exception:
        stats.handler_errors += 1
        log.exception("bus %s: handler failed on %s (event %s)", where, msg.subject, msg.event_id)
        return "error"
    stats.delivered += 1
    return "ok"
