"""The one place where OCPP events become contract messages on the bus and rows in the store.

Converts :mod:`evcore.ocpp.events` to ``evcore.v1`` protobuf messages, publishes them on
``Subjects(site).telemetry|status|transaction(charger)`` and ``station_event(station)`` (security
events, firmware / diagnostics / log status) and hands them to the store.
Switching bus or store implementations is a change here only. It never alters an event (a
station's string in an event id is escaped there, ``oneline.id_part``; the message keeps it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import Any, Protocol

from evcore.bus.outbox import OutboxFull
from evcore.ocpp.events import (
    MeterSample,
    NotificationEvent,
    OcppEvent,
    SecurityEvent,
    StatusEvent,
    TransactionEvent,
)
from evcore.ocpp.oneline import id_part
from evcore.store.base import StoreUnavailable

LOG = logging.getLogger("evcore.ocpp")


class TelemetryStore(Protocol):
    """What the central system needs from the store (``evcore.store``)."""

    async def append_meter_samples(self, samples: Any) -> Any: ...

    async def record_status(self, status: Any) -> Any: ...

    async def record_transaction(self, tx: Any) -> Any: ...

    async def record_station_event(self, event: Any) -> Any: ...


class BusLike(Protocol):
    async def publish(
        self, subject: str, payload: Any, *, event_id: str | None = None, critical: bool = False
    ) -> Any: ...


_STATE = {
    "Available": 1,
    "Preparing": 2,
    "Charging": 3,
    "SuspendedEV": 4,
    "SuspendedEVSE": 5,
    "Finishing": 6,
    "Reserved": 7,
    "Unavailable": 8,
    "Faulted": 9,
    "Occupied": 10,
}
_KIND = {"started": 1, "updated": 2, "ended": 3}
# Notification actions published as station events, and their StationEventKind.
STATION_EVENT_KINDS = {
    "FirmwareStatusNotification": 2,
    "SignedFirmwareStatusNotification": 2,
    "DiagnosticsStatusNotification": 3,
    "LogStatusNotification": 4,
}
_SECURITY = 1


def _ts(msg_field: Any, t: float) -> None:
    msg_field.FromNanoseconds(round(t * 1e9))


def meter_to_proto(ev: MeterSample, received_at: float) -> Any:
    from evcore.v1 import meter_pb2

    m = meter_pb2.MeterSample(
        charger_id=ev.charger_id,
        transaction_id=ev.transaction_id or "",
        current_a=[math.nan if v is None else v for v in ev.site_phase_a],
    )
    _ts(m.sampled_at, ev.at)
    _ts(m.received_at, received_at)
    if ev.power_w is not None:
        m.power_w = ev.power_w
    if ev.energy_register_wh is not None:
        m.energy_register_wh = ev.energy_register_wh
    if ev.offered_a is not None:
        m.offered_current_a = ev.offered_a
    if ev.soc_percent is not None:
        m.soc_percent = ev.soc_percent
    return m


def meter_event_id(ev: MeterSample) -> str:
    """The bus event id of a meter sample: charger, time (ms) and a digest of what it measured.
    A station's resend of a message (our answer lost) measures the same: one id, kept once by
    the duplicate window. Two messages stamped alike that measure different things (the register
    in one, the phase currents in the next) are two readings: the id was charger and time only,
    and the bus dropped the second as a duplicate. The transaction is left out: a resend after
    the session ended names none, and is the same reading."""
    measured = (ev.site_phase_a, ev.power_w, ev.energy_register_wh, ev.offered_a, ev.soc_percent)
    digest = hashlib.blake2b(repr(measured).encode(), digest_size=6).hexdigest()
    return f"meter:{ev.charger_id}:{round(ev.at * 1000)}:{digest}"


def status_to_proto(ev: StatusEvent, received_at: float) -> Any:
    from evcore.v1 import status_pb2

    m = status_pb2.ChargerStatus(
        charger_id=ev.charger_id or ev.ocpp_id,
        evse_id=ev.evse_id,
        state=_STATE.get(ev.status, 0),  # type: ignore[arg-type]
        error_code="" if ev.error_code == "NoError" else ev.error_code,
        connected=True,
    )
    _ts(m.reported_at, ev.at)
    _ts(m.received_at, received_at)
    return m


def transaction_to_proto(ev: TransactionEvent, received_at: float, evse_id: int) -> Any:
    from evcore.v1 import transaction_pb2

    m = transaction_pb2.TransactionEvent(
        transaction_id=ev.transaction_id,
        charger_id=ev.charger_id,
        evse_id=evse_id,
        kind=_KIND[ev.kind],  # type: ignore[arg-type]
        id_tag=ev.id_tag or "",
        stop_reason=(ev.reason or "") if ev.kind == "ended" else "",
        offline=ev.offline,
    )
    if ev.meter_start_wh is not None:
        m.meter_start_wh = ev.meter_start_wh
    if ev.kind == "ended" and ev.meter_now_wh is not None:
        m.meter_stop_wh = ev.meter_now_wh
    # The station's own time (the record): ``at`` is bounded for the edge (``station_at``).
    _ts(m.occurred_at, ev.at if ev.station_at is None else ev.station_at)
    _ts(m.received_at, received_at)
    return m


def station_event_to_proto(ev: SecurityEvent | NotificationEvent, received_at: float) -> Any:
    """A security event or a firmware / diagnostics / log status as a ``StationEvent``."""
    from evcore.v1 import station_event_pb2

    m = station_event_pb2.StationEvent(station_id=ev.ocpp_id, ocpp_version=ev.version)
    if isinstance(ev, SecurityEvent):
        m.kind = _SECURITY  # type: ignore[assignment]
        m.code = ev.kind
        m.tech_info = ev.info or ""
        _ts(m.occurred_at, ev.at)
    else:
        m.kind = STATION_EVENT_KINDS[ev.action]  # type: ignore[assignment]
        m.code = str(ev.payload.get("status", ""))
        request_id = ev.payload.get("requestId")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            m.request_id = request_id
    _ts(m.received_at, received_at)
    return m


#: What a station is told when the store could not serve its message (``NotRecorded``).
STORE_UNAVAILABLE = "the central system's store is unavailable"


class NotRecorded(Exception):
    """An event the bus or the store could not take now (the bus outbox at its cap, the store
    unavailable): the message carrying it is answered CALLERROR ``InternalError`` naming
    ``why``, and the station's resend publishes what was not taken (same event id)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _GroupCommit:
    """Meter samples that arrive while a store write is running go to the store in one write.

    Every caller still waits until its own sample is stored; under load one write carries many
    samples (group commit), so storing costs one transaction per batch, not per frame.
    """

    def __init__(self, store: TelemetryStore, window_s: float) -> None:
        self.store = store
        self.window_s = window_s
        self._pending: list[tuple[Any, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, msg: Any) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((msg, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await fut

    async def _write(self) -> None:
        # Let the frames arriving within the window join the batch. This bounds I/O batching, not
        # control timing, so it waits on the event loop's own timer.
        await asyncio.sleep(self.window_s)
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.store.append_meter_samples([m for m, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)


class EventPublisher:
    """Publishes status, meter and transaction events; awaited before the CALLRESULT is sent."""

    def __init__(
        self,
        site_id: str,
        bus: BusLike | None,
        store: TelemetryStore | None,
        *,
        clock_now: Any = None,
        evse_of: Any = None,
        store_batch_window_s: float = 0.005,
    ) -> None:
        self.site_id = site_id
        self.bus = bus
        self.store = store
        self._subjects: Any = None
        self._telemetry_subject: dict[str, str] = {}
        self._meter_writer = (
            _GroupCommit(store, store_batch_window_s) if store is not None else None
        )
        self._now = clock_now
        self.evse_of = evse_of
        if bus is not None:
            from evcore.bus.subjects import Subjects

            self._subjects = Subjects(site_id)

    @property
    def active(self) -> bool:
        return self.bus is not None or self.store is not None

    async def publish(self, event: OcppEvent) -> None:
        """Publish ``event`` on the bus, then store it; returns once both took it. The bus
        first: a record in the store is one the bus took (a restart takes the store's
        transactions as published). Raises :class:`NotRecorded` when the bus outbox is at its
        cap or the store is unavailable (the station is told so, and resends)."""
        if self.bus is None and self.store is None:
            return
        try:
            await self._publish(event)
        except OutboxFull as exc:
            raise NotRecorded(
                "the central system's bus outbox is full (its broker has not taken what it holds)"
            ) from exc
        except StoreUnavailable as exc:
            raise NotRecorded(STORE_UNAVAILABLE) from exc

    async def _publish(self, event: OcppEvent) -> None:
        received = self._now() if self._now is not None else event.at  # type: ignore[union-attr]
        if isinstance(event, MeterSample):
            msg = meter_to_proto(event, received)
            if self.bus is not None:
                subject = self._telemetry_subject.get(event.charger_id)
                if subject is None:  # escaping costs more than the rest of a publish: once
                    subject = self._subjects.telemetry(event.charger_id)
                    self._telemetry_subject[event.charger_id] = subject
                await self.bus.publish(subject, msg, event_id=meter_event_id(event))
            if self._meter_writer is not None:
                await self._meter_writer.append(msg)
        elif isinstance(event, StatusEvent):
            msg = status_to_proto(event, received)
            charger = event.charger_id or event.ocpp_id
            if self.bus is not None:
                await self.bus.publish(
                    self._subjects.status(charger),
                    msg,
                    event_id=f"status:{charger}:{event.evse_id}:"
                    f"{round(event.at * 1000)}:{event.status}",
                )
            if self.store is not None:
                await self.store.record_status(msg)
        elif isinstance(event, TransactionEvent):
            evse = self.evse_of(event.charger_id) if self.evse_of is not None else 0
            msg = transaction_to_proto(event, received, evse)
            if self.bus is not None:
                await self.bus.publish(
                    self._subjects.transaction(event.charger_id),
                    msg,
                    # On the station's time: the same on every retry (``at`` is bounded by
                    # the time of receipt).
                    event_id=f"tx:{event.charger_id}:{id_part(event.transaction_id)}:{event.kind}:"
                    f"{round((event.at if event.station_at is None else event.station_at) * 1000)}",
                    critical=True,
                )
            if self.store is not None:
                await self.store.record_transaction(msg)
        elif isinstance(event, SecurityEvent) or (
            isinstance(event, NotificationEvent) and event.action in STATION_EVENT_KINDS
        ):
            # A status notification's time is when it came (a resend keeps the first's): the
            # record's too, as the store keys it by that time.
            at = event.at if isinstance(event, NotificationEvent) else received
            msg = station_event_to_proto(event, at)
            if self.bus is not None:
                await self.bus.publish(
                    self._subjects.station_event(event.ocpp_id),
                    msg,
                    event_id=f"station:{event.ocpp_id}:{msg.kind}:{id_part(msg.code)}:"
                    f"{round(event.at * 1000)}",
                    critical=True,
                )
            if self.store is not None:
                await self.store.record_station_event(msg)
