"""Audit records arriving over the bus (``evcore.<site>.audit``, docs/bus.md), stored through the
same chain check as ``UploadAudit``.

One :class:`AuditConsumer` per site: a durable JetStream consumer (``cloud-audit`` by default) on
that site's bus, so the cloud resumes where it left off and every record is delivered at least
once. A message is acknowledged only after its record is committed (or recognised as a repeat,
which the store's (site, hash) key makes a no-op, so no separate id table is needed). A record that
breaks the chain is logged, counted and acknowledged (``BadPayload``): redelivering it could never
succeed and would hold up the records behind it. An unreachable store raises, so the bus
redelivers after its back-off.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from evcore.bus.api import BadPayload, Bus, BusMessage, Subscription
from evcore.bus.subjects import Subjects
from evcore.clock import Clock
from evcore.cloud.store import CloudStore
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event

log = logging.getLogger("evcore.cloud.consumer")

DEFAULT_DURABLE = "cloud-audit"
#: The largest audit record a compressed payload may expand to (a decision over 100,000 chargers
#: is about 10 MB): beyond it the payload is refused, not expanded (a zip bomb).
MAX_RECORD_BYTES = 256 * 1024 * 1024


@dataclass
class AuditConsumerStats:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0


def audit_record_of(data: bytes, site_id: str) -> AuditRecord:
    """The record of an ``Event`` with an ``audit`` or ``audit_zlib`` payload (what ``AuditLog``
    publishes) or of a bare ``AuditRecord``; ``BadPayload`` for anything else or an event of
    another site."""
    event = Event()
    try:
        event.ParseFromString(data)
    except DecodeError:
        event = Event()
    kind = event.WhichOneof("payload")
    if kind in ("audit", "audit_zlib"):
        if event.site_id and event.site_id != site_id:
            raise BadPayload(
                f"event {event.event_id!r} says site {event.site_id!r}, not {site_id!r}"
            )
        if kind == "audit":
            return event.audit
        return _inflate(event.audit_zlib, event.event_id)
    record = AuditRecord()
    try:
        record.ParseFromString(data)
    except DecodeError as exc:
        raise BadPayload(f"neither an audit Event nor an AuditRecord: {exc}") from exc
    if not record.hash:
        raise BadPayload("neither an audit Event nor a sealed AuditRecord (no hash)")
    return record


def _inflate(data: bytes, event_id: str) -> AuditRecord:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, MAX_RECORD_BYTES)
    except zlib.error as exc:
        raise BadPayload(f"event {event_id!r}: audit_zlib does not inflate: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise BadPayload(
            f"event {event_id!r}: audit_zlib is truncated or inflates beyond "
            f"{MAX_RECORD_BYTES} bytes"
        )
    record = AuditRecord()
    try:
        record.ParseFromString(raw)
    except DecodeError as exc:
        raise BadPayload(f"event {event_id!r}: audit_zlib holds no AuditRecord: {exc}") from exc
    return record


class AuditConsumer:
    """Stores one site's audit records from its bus into the cloud store."""

    def __init__(
        self, bus: Bus, store: CloudStore, *, clock: Clock, durable: str = DEFAULT_DURABLE
    ) -> None:
        self._bus = bus
        self._store = store
        self._clock = clock
        self._durable = durable
        self.site_id = bus.site_id
        self.stats = AuditConsumerStats()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._bus.consume(
            Subjects(self.site_id).audit, durable=self._durable, handler=self._handle
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.stop()
            self._sub = None

    async def _handle(self, msg: BusMessage) -> None:
        record = audit_record_of(msg.data, self.site_id)
        result = await self._store.put_audit(self.site_id, [record], now_s=self._clock.now())
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        if result.refused is not None:
            self.stats.refused += 1
            log.error(
                "cloud: audit record of site %r from the bus (event %s) refused: %s",
                self.site_id,
                msg.event_id,
                result.refused,
            )
            raise BadPayload(f"site {self.site_id!r}: {result.refused}")
