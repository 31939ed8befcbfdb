"""``AuditLog``: the edge's decision journal. ``append`` returns only once the record is durable.

The edge controller calls ``await audit.append(decision)`` after the Rust envelope produced the
setpoints and BEFORE any of them is sent; when it returns, the record (and the chain head) is
committed with full durability in the store. The record is then handed to the bus as a critical
event (disk outbox) on ``evcore.<site>.audit``, wrapped in an ``evcore.v1.Event`` whose id is
derived from the record's hash, so a republish after a crash is dropped by consumers as a repeat.

Publishing runs in one task the log owns, in seq order, after ``append`` has returned: the outbox's
own commit (a second fsync) is not on the control path, and a slow or failing bus never delays a
decision. The store is the source: what the bus had not accepted when the process died is
republished from it on the next start. ``flush()`` waits for the publisher; ``close()`` flushes.

The audit log records; it never changes a decision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from evcore.audit.chain import VerifyReport, seal, verify_chain
from evcore.bus.api import (
    BusError,
    BusMessage,
    BusUnavailable,
    OutboxReports,
    PayloadTooLarge,
)
from evcore.bus.outbox import OutboxLoss, SetAside
from evcore.bus.subjects import Subjects
from evcore.clock import Clock
from evcore.store.base import AuditChainConflict, Store
from evcore.v1.audit_pb2 import AuditRecord, ChargerBinding
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint

log = logging.getLogger("evcore.audit")

# Meta key holding the highest seq known to have been accepted by the bus.
PUBLISHED_MARK = "audit.published_seq"
#: Meta key holding the ids of the bus's outbox losses (``OutboxLoss.id``) the log has handled:
#: moved its mark back for and republished from, so that a restart does not do it again.
LOSSES_HANDLED = "audit.outbox_losses_handled"
#: The most an ``audit_zlib`` event is inflated to (as the cloud's consumer).
MAX_INFLATED_BYTES = 256 * 1024 * 1024
# How often the publish mark is written (republishing a few records after a crash is harmless).
PUBLISHED_MARK_EVERY = 32
#: A record larger than this (serialised) goes on the bus zlib-compressed (``Event.audit_zlib``):
#: a decision over 12,000 chargers is about 1.3 MB, above nats-server's default max_payload of
#: 1 MiB, and some 20 times smaller compressed.
COMPRESS_ABOVE_BYTES = 256 * 1024
#: Back-off between attempts to publish a record the bus refused (doubling up to the last).
REPUBLISH_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: Sealed records kept in memory for the bus, at most (serialised bytes; at least one record).
#: Past it the log keeps no copy: the publisher reads them back from the store, in seq order, a
#: batch at a time. A bus that refuses for days (a full outbox disk) must not grow the edge's
#: memory until it dies, nor a restart after such an outage read the whole backlog at once.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
#: Records read back from the store at a time for the bus.
REFILL_BATCH = 32


@dataclass(frozen=True)
class Decision:
    """One decision of the edge as it is handed to the audit log (before it is sealed)."""

    decision_id: str
    # What triggered it: "tick", "meter:C1", "status:C2", "grid:curtailment-7", "plan", "api:…".
    trigger: str
    # When it was decided; None takes the audit log's clock.
    decided_at_s: float | None = None
    # The setpoints that will be sent, each with its reason in words.
    setpoints: Sequence[Setpoint] = ()
    # Per charger considered, the constraint that bound it (also for unchanged chargers).
    bindings: Sequence[ChargerBinding] = ()
    inputs_digest: str = ""
    plan_version: int = 0
    config_version: str = ""
    edge_id: str = ""


def digest_inputs(inputs: Any) -> str:
    """SHA-256 hex of a decision's inputs: bytes as they are, anything else as canonical JSON
    (sorted keys; objects with ``tolist()``, e.g. numpy arrays, are converted)."""
    if isinstance(inputs, bytes | bytearray | memoryview):
        return hashlib.sha256(bytes(inputs)).hexdigest()

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "__dict__"):
            return vars(o)
        raise TypeError(f"cannot digest a {type(o).__name__}")

    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: The range of a ``google.protobuf.Timestamp`` (0001-01-01 .. 9999-12-31 UTC): a time outside it
#: cannot be written as JSON (``audit show --json``, the cloud's views) nor as a calendar date.
TIMESTAMP_MIN_S = -62_135_596_800
TIMESTAMP_MAX_S = 253_402_300_799


def _time_problem(ts: Timestamp) -> str | None:
    if not TIMESTAMP_MIN_S <= ts.seconds <= TIMESTAMP_MAX_S:
        return (
            f"{ts.seconds} s since 1970 is outside years 1..9999 (milliseconds taken for seconds?)"
        )
    if not 0 <= ts.nanos <= 999_999_999:
        return f"nanos {ts.nanos} is outside 0..999999999"
    return None


def _timestamp(seconds: float) -> Timestamp:
    if not math.isfinite(seconds) or not TIMESTAMP_MIN_S <= seconds < TIMESTAMP_MAX_S + 1:
        raise ValueError(
            f"time {seconds!r} (epoch seconds) is not a time a record can hold: it must be "
            "finite and within years 1..9999 (milliseconds taken for seconds?)"
        )
    ts = Timestamp()
    whole = int(seconds // 1)
    ts.seconds = whole
    ts.nanos = min(999_999_999, round((seconds - whole) * 1e9))
    return ts


def _plan_version(value: Any) -> int:
    """The controller names a plan ``"<plan id>@<version>"`` (or gives the number); the record
    keeps the version number, 0 when no plan was followed."""
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    tail = str(value).rsplit("@", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"plan_version must be N or '<plan id>@N', got {value!r}")
    return int(tail)


def record_from_mapping(decision: Mapping[str, Any], *, edge_id: str = "") -> AuditRecord:
    """The record for a decision in the edge controller's plain-data shape::

        {"decision": 42, "at": 1767225605.0, "trigger": "meter:C1", "config_version": "…",
         "plan_version": 3 | "plan-id@3" | "", "inputs_digest": "…", "policy": "…",
         "curtailments_kw": {…},
         "setpoints": [{"charger_id", "purpose", "kind", "old", "new", "unit": "A" | "W",
                        "valid_to", "failsafe", "binding": "held at 16 A: …"}, …],
         "bindings": [{"charger_id", "reason", "binding_node_id"}, …]}   # optional

    ``decision_id`` is ``"<decision>@<ISO time>"`` unless the mapping has a ``decision_id``: the
    controller's counter restarts with the process, the time makes the id unique across restarts.
    """
    try:
        at_s = float(decision["at"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"decision {decision.get('decision')!r}: 'at' (epoch seconds) missing"
        ) from None
    try:
        decided_at = _timestamp(at_s)
    except ValueError as exc:
        raise ValueError(f"decision {decision.get('decision')!r}: 'at': {exc}") from None
    decision_id = str(decision.get("decision_id") or "")
    if not decision_id:
        if decision.get("decision") is None:
            raise ValueError("decision mapping has neither 'decision_id' nor 'decision'")
        stamp = datetime.fromtimestamp(at_s, tz=UTC).isoformat(timespec="microseconds")
        decision_id = f"{decision['decision']}@{stamp.replace('+00:00', 'Z')}"
    plan_version = _plan_version(decision.get("plan_version"))
    record = AuditRecord(
        decision_id=decision_id,
        trigger=str(decision.get("trigger") or ""),
        inputs_digest=str(decision.get("inputs_digest") or ""),
        plan_version=plan_version,
        config_version=str(decision.get("config_version") or ""),
        edge_id=str(decision.get("edge_id") or edge_id),
    )
    record.decided_at.CopyFrom(decided_at)
    for i, sp in enumerate(decision.get("setpoints") or ()):
        cid = str(sp.get("charger_id") or "")
        if not cid:
            raise ValueError(f"decision {decision_id!r}: setpoint #{i} has no charger_id")
        out = Setpoint(charger_id=cid, decision_id=decision_id)
        new = sp.get("new")
        if new is not None:
            if str(sp.get("unit", "A")).upper() == "W":
                out.setpoint_w = float(new)
            else:
                out.setpoint_a = float(new)
        purpose = str(sp.get("purpose") or "tx")
        reason = str(sp.get("binding") or sp.get("reason") or "")
        old = sp.get("old")
        change = "" if old is None else f" (was {float(old):g})"
        out.reason = reason or f"{purpose} profile{change}: no binding constraint reported"
        if purpose not in ("", "tx") and reason:
            out.reason = f"{purpose}: {reason}"
        code = sp.get("binding_code")
        if isinstance(code, int):
            out.binding = code  # type: ignore[assignment]
        node = sp.get("binding_node_id")
        if node:
            out.binding_node_id = str(node)
        out.decided_at.CopyFrom(record.decided_at)
        valid_to = sp.get("valid_to")
        if valid_to is not None:
            try:
                out.valid_until.CopyFrom(_timestamp(float(valid_to)))
            except ValueError as exc:
                raise ValueError(
                    f"decision {decision_id!r}: setpoint for {cid!r}: 'valid_to': {exc}"
                ) from None
        record.setpoints.append(out)
    for b in decision.get("bindings") or ():
        record.bindings.append(
            ChargerBinding(
                charger_id=str(b.get("charger_id") or ""),
                reason=str(b.get("reason") or ""),
                binding_node_id=str(b.get("binding_node_id") or ""),
            )
        )
    return record


def build_record(
    decision: Decision | AuditRecord | Mapping[str, Any],
    *,
    edge_id: str = "",
    now_s: float | None = None,
) -> AuditRecord:
    """The unsealed record for a decision; raises ``ValueError`` naming what is missing."""
    if isinstance(decision, Mapping):
        record = record_from_mapping(decision, edge_id=edge_id)
    elif isinstance(decision, AuditRecord):
        record = AuditRecord()
        record.CopyFrom(decision)
        record.seq = 0
        record.prev_hash = ""
        record.hash = ""
    else:
        record = AuditRecord(
            decision_id=decision.decision_id,
            trigger=decision.trigger,
            inputs_digest=decision.inputs_digest,
            plan_version=decision.plan_version,
            config_version=decision.config_version,
            edge_id=decision.edge_id or edge_id,
        )
        decided_at_s = decision.decided_at_s if decision.decided_at_s is not None else now_s
        if decided_at_s is not None:
            record.decided_at.CopyFrom(_timestamp(decided_at_s))
        record.setpoints.extend(decision.setpoints)
        record.bindings.extend(decision.bindings)
    if not record.edge_id:
        record.edge_id = edge_id
    if not record.decision_id:
        raise ValueError("decision has no decision_id")
    if not record.trigger:
        raise ValueError(f"decision {record.decision_id!r} has no trigger")
    if not record.HasField("decided_at"):
        raise ValueError(f"decision {record.decision_id!r} has no decided_at")
    problem = _time_problem(record.decided_at)
    if problem is not None:
        raise ValueError(f"decision {record.decision_id!r}: decided_at {problem}")
    explained = {b.charger_id for b in record.bindings if b.reason}
    for i, sp in enumerate(record.setpoints):
        if not sp.charger_id:
            raise ValueError(f"decision {record.decision_id!r}: setpoint #{i} has no charger_id")
        if not sp.HasField("setpoint_a") and not sp.HasField("setpoint_w"):
            raise ValueError(
                f"decision {record.decision_id!r}: setpoint for {sp.charger_id!r} has neither "
                "setpoint_a nor setpoint_w"
            )
        if sp.decision_id and sp.decision_id != record.decision_id:
            raise ValueError(
                f"decision {record.decision_id!r}: setpoint for {sp.charger_id!r} belongs to "
                f"decision {sp.decision_id!r}"
            )
        for unit in ("setpoint_a", "setpoint_w"):
            value = getattr(sp, unit)
            if sp.HasField(unit) and not math.isfinite(value):
                # No charger can be told it (OCPP's JSON has no NaN or infinity): not a value.
                raise ValueError(
                    f"decision {record.decision_id!r}: setpoint for {sp.charger_id!r}: {unit} "
                    f"is {value!r}, not a finite number"
                )
        sp.decision_id = record.decision_id
        if not sp.HasField("decided_at"):
            sp.decided_at.CopyFrom(record.decided_at)
        for name in ("decided_at", "valid_until"):
            if sp.HasField(name):
                problem = _time_problem(getattr(sp, name))
                if problem is not None:
                    raise ValueError(
                        f"decision {record.decision_id!r}: setpoint for {sp.charger_id!r}: "
                        f"{name} {problem}"
                    )
        if not sp.reason and sp.charger_id not in explained:
            raise ValueError(
                f"decision {record.decision_id!r}: setpoint for {sp.charger_id!r} has no reason "
                "(every setpoint must say in words what bound it)"
            )
    return record


def _record_of(event: Event) -> AuditRecord | None:
    """The audit record an event carries (``audit``, or ``audit_zlib`` inflated), or None."""
    kind = event.WhichOneof("payload")
    if kind == "audit":
        return event.audit
    if kind != "audit_zlib":
        return None
    inflater = zlib.decompressobj()
    data = inflater.decompress(event.audit_zlib, MAX_INFLATED_BYTES)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("audit_zlib does not inflate to a whole record within 256 MiB")
    return AuditRecord.FromString(data)


def _backoff_s(failures: int) -> float:
    return REPUBLISH_BACKOFF_S[min(failures, len(REPUBLISH_BACKOFF_S)) - 1]


class AuditLog:
    """Append-only, hash-chained decision records in a :class:`Store`, mirrored to the bus."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        bus: Any | None = None,
        site_id: str = "",
        edge_id: str = "edge",
        max_queued_bytes: int | None = None,
    ) -> None:
        if bus is not None and not site_id:
            raise ValueError("AuditLog: site_id is required to publish on the bus")
        self._store = store
        self._clock = clock
        self._bus = bus
        self._site_id = site_id
        self._edge_id = edge_id
        self._max_queued_bytes = MAX_QUEUED_BYTES if max_queued_bytes is None else max_queued_bytes
        self._lock = asyncio.Lock()
        self._head_seq = -1
        self._head_hash = ""
        self._opened = False
        self._published_seq = -1
        self._mark_written = -1
        #: Attempts the bus refused (each is retried, in order, after a back-off).
        self.publish_failures = 0
        #: Seqs of records no broker could take even compressed (kept in the store and sent to
        #: the cloud by its gRPC upload; see docs/audit.md).
        self.too_large_for_bus: list[int] = []
        # Sealed records waiting for the bus, oldest first, and the one task that publishes them.
        # When ``_backlog_from`` is set, the records from that seq up to the head wait too, in
        # the store only (they follow every record in ``_outgoing``).
        self._outgoing: collections.deque[AuditRecord] = collections.deque()
        self._queued_bytes = 0
        self._backlog_from: int | None = None
        self._publisher: asyncio.Task[None] | None = None
        # Outbox losses of the bus not handled yet (None: not read yet): until the publisher has
        # moved the mark back for them, nothing newer goes to the bus (it would move the mark
        # past what was lost).
        self._losses: list[OutboxLoss] | None = []
        self._losses_handled: list[str] = []

    @property
    def head_seq(self) -> int:
        """Seq of the last durable record (-1 when the chain is empty)."""
        return self._head_seq

    @property
    def publish_backlog(self) -> int:
        """Records durable in the store and not yet taken by the bus (0 without a bus)."""
        if self._bus is None:
            return 0
        return max(0, self._head_seq - self._published_seq)

    async def open(self) -> None:
        """Load the chain head; republish records the bus may not have accepted before a crash.

        Optional: the first ``append`` does the same if ``open`` was not called."""
        async with self._lock:
            if not self._opened:
                await self._open_locked()

    async def _open_locked(self) -> None:
        await self._load_head()
        self._opened = True
        if self._bus is None:
            return
        self._published_seq = self._mark_written = await self._read_mark()
        if isinstance(self._bus, OutboxReports):
            # A record the broker turns out unable to take is set aside by the bus: sent again
            # compressed, or listed as too large (docs/bus.md, "What the outbox will never send").
            self._bus.on_set_aside(Subjects(self._site_id).audit, self._on_set_aside)
            # The losses are read by the publisher (retried there: a failure must not keep a
            # decision from being recorded); records appended meanwhile wait in the store.
            self._losses = None
            self._backlog_from = self._published_seq + 1
            self._start_publisher()
        if self._head_seq > self._published_seq:
            log.info(
                "audit: republishing %d record(s) the bus had not accepted",
                self._head_seq - self._published_seq,
            )
            # Read back from the store by the publisher, a batch at a time.
            self._backlog_from = self._published_seq + 1
            self._start_publisher()

    async def _read_mark(self) -> int:
        """The publish mark, or -1 (republish everything) when it cannot be right: it only saves
        republishing, so a bad one must never stop a decision from being recorded."""
        mark = await self._store.get_meta(PUBLISHED_MARK)
        if not mark:
            return -1
        try:
            seq = int(mark)
        except ValueError:
            log.error("audit: publish mark %r is not a seq; republishing every record", mark)
            return -1
        if seq > self._head_seq:
            await self._load_head()  # another writer may have appended and published since
        if seq > self._head_seq:
            # Records below it may never have reached the bus (a store restored without them).
            log.error(
                "audit: publish mark %d is past the chain's head (seq %d); republishing every "
                "record",
                seq,
                self._head_seq,
            )
            return -1
        return seq

    async def _read_losses_handled(self) -> list[str]:
        text = await self._store.get_meta(LOSSES_HANDLED)
        if not text:
            return []
        try:
            ids = json.loads(text)
        except ValueError:
            ids = None
        if not isinstance(ids, list):
            # Only saves redoing a loss (a republish consumers drop by event id): never fatal.
            log.error(
                "audit: %s %r is not a list of loss ids; handling every loss again",
                LOSSES_HANDLED,
                text,
            )
            return []
        return [str(x) for x in ids]

    async def _handle_losses(self) -> None:
        """Move the publish mark back to the last record the audit stream held before each of
        the bus's outbox losses not handled yet, so that the publisher sends again what the lost
        outbox file held (docs/bus.md); then note the losses as handled. Retried after a back-off
        while the bus cannot say where the stream stood (the broker not reached since)."""
        assert self._bus is not None
        if self._losses is None:
            self._losses_handled = await self._read_losses_handled()
            done = set(self._losses_handled)
            self._losses = [x for x in await self._bus.outbox_losses() if x.id not in done]
        subject = Subjects(self._site_id).audit
        failures = 0
        lowest = self._published_seq
        pending = list(self._losses)
        while pending:
            loss = pending[0]
            try:
                message = await self._bus.last_stored(subject, before_loss=loss)
            except BusUnavailable as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning(
                        "audit: cannot yet tell which records outbox loss %s took from the bus "
                        "(%s); records wait in the store",
                        loss.id,
                        exc,
                    )
                await asyncio.sleep(_backoff_s(failures))
                continue
            except BusError as exc:  # where the stream stood is not known: send everything
                log.error(
                    "audit: where the audit stream stood at outbox loss %s is not known (%s); "
                    "republishing every record",
                    loss.id,
                    exc,
                )
                seq = -1
            else:
                seq = self._seq_of(message)
            lowest = min(lowest, seq)
            pending.pop(0)
        if not self._losses:
            self._backlog_from = (
                self._published_seq + 1 if self._head_seq > self._published_seq else None
            )
            return
        if lowest < self._published_seq:
            log.warning(
                "audit: the bus lost part of its outbox (%s); republishing from seq %d",
                ", ".join(x.id for x in self._losses),
                lowest + 1,
            )
            # Straight to the store: _write_mark never lowers the mark.
            await self._store.set_meta(PUBLISHED_MARK, str(lowest))
            self._published_seq = self._mark_written = lowest
        # The backlog (records since the mark) is read back from the store by the publisher.
        self._backlog_from = (
            self._published_seq + 1 if self._head_seq > self._published_seq else None
        )
        # Only the ids the bus still notes are kept (it keeps the newest few).
        known = {x.id for x in await self._bus.outbox_losses()}
        handled = [i for i in self._losses_handled if i in known]
        handled += [x.id for x in self._losses if x.id not in handled]
        await self._store.set_meta(LOSSES_HANDLED, json.dumps(handled))
        self._losses_handled = handled
        self._losses = []

    @staticmethod
    def _seq_of(message: BusMessage | None) -> int:
        """The seq of the audit record a stored bus message carries; -1 for none (or one that
        cannot be read: everything is then republished, consumers drop the repeats)."""
        if message is None:
            return -1
        try:
            record = _record_of(Event.FromString(message.data))
        except (DecodeError, ValueError, zlib.error) as exc:
            log.error(
                "audit: the audit stream's message %s cannot be read (%s); republishing "
                "every record",
                message.event_id,
                exc,
            )
            return -1
        return -1 if record is None else record.seq

    async def _on_set_aside(self, entry: SetAside) -> bool:
        """The bus set aside a record of ours the broker can never take as it is (accepted
        against a larger max_payload than the broker's): send it compressed under the same
        event id, or list it in ``too_large_for_bus`` when even that is too large. True once
        dealt with; False (offered again by the bus) when the bus refused it for now."""
        assert self._bus is not None
        try:
            event = Event.FromString(entry.payload)
            kind = event.WhichOneof("payload")
            record = _record_of(event)
        except (DecodeError, ValueError, zlib.error) as exc:
            log.error(
                "audit: set-aside event %s is not an audit record (%s); not sent again, its "
                "payload dropped from the outbox (its outbox_set_aside row names it)",
                entry.event_id,
                exc,
            )
            return True
        if record is None:
            log.error(
                "audit: set-aside event %s carries no audit record (%s); not sent again, its "
                "payload dropped from the outbox (its outbox_set_aside row names it)",
                entry.event_id,
                kind,
            )
            return True
        if kind == "audit":
            compressed = Event()
            compressed.CopyFrom(event)
            data = record.SerializeToString()
            compressed.audit_zlib = await asyncio.to_thread(zlib.compress, data, 1)
            try:
                await self._bus.publish(
                    entry.subject, compressed, event_id=entry.event_id, critical=True
                )
            except PayloadTooLarge as exc:
                self._too_large(record, exc)
            except Exception:  # offered again by the bus after a back-off
                log.exception("audit: sending set-aside seq %d compressed failed", record.seq)
                return False
            else:
                log.warning(
                    "audit: record seq %d was set aside by the bus for its size (%s); sent "
                    "again compressed",
                    record.seq,
                    entry.reason,
                )
            return True
        self._too_large(record, entry.reason)
        return True

    def _too_large(self, record: AuditRecord, why: object) -> None:
        if record.seq not in self.too_large_for_bus:
            self.too_large_for_bus.append(record.seq)
        log.error(
            "audit: record seq %d (%d setpoints) is too large for the bus even compressed (%s); "
            "it is kept in the store and goes to the cloud by its upload only. Raise the NATS "
            "server's max_payload (docs/bus.md) to carry such records on the bus",
            record.seq,
            len(record.setpoints),
            why,
        )

    async def flush(self) -> None:
        """Wait until every record appended so far was handed to the bus (or failed to be)."""
        while self._publisher is not None and not self._publisher.done():
            await asyncio.shield(self._publisher)

    async def close(self, *, flush_timeout_s: float = 10.0) -> None:
        """Flush the publisher (for at most ``flush_timeout_s``: a stuck bus must not hold up a
        shutdown; what it did not take is republished on the next start), write the mark."""
        try:
            await asyncio.wait_for(self.flush(), flush_timeout_s)
        except TimeoutError:
            log.warning(
                "audit: bus did not take %d record(s) within %.0f s; they are republished on "
                "the next start",
                self.publish_backlog,
                flush_timeout_s,
            )
            if self._publisher is not None:
                self._publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._publisher
        async with self._lock:
            if self._bus is not None and self._opened:
                await self._write_mark(force=True)

    async def _load_head(self) -> None:
        head = await self._store.audit_head()
        self._head_seq = -1 if head is None else head.seq
        self._head_hash = "" if head is None else head.hash

    async def append(self, decision: Decision | AuditRecord | Mapping[str, Any]) -> AuditRecord:
        """Seal the decision onto the chain and make it durable; returns the stored record.

        Only after this returns may the decision's setpoints be sent.
        """
        record = build_record(decision, edge_id=self._edge_id, now_s=self._clock.now())
        async with self._lock:
            if not self._opened:
                await self._open_locked()
            sealed = seal(record, seq=self._head_seq + 1, prev_hash=self._head_hash)
            try:
                await self._store.append_audit(sealed)
            except AuditChainConflict:
                # Another writer moved the head, or an append of ours that timed out (the edge
                # gives up after audit_timeout_s) committed after all: reload once and retry.
                before = self._head_seq
                await self._load_head()
                if self._bus is not None and self._head_seq > before and self._backlog_from is None:
                    # Records this log did not see commit were never queued for the bus: the
                    # publisher reads them from the store after what is queued (a repeat of
                    # another writer's is dropped by its event id).
                    self._backlog_from = before + 1
                sealed = seal(record, seq=self._head_seq + 1, prev_hash=self._head_hash)
                await self._store.append_audit(sealed)
            self._head_seq = sealed.seq
            self._head_hash = sealed.hash
            if self._bus is not None:
                self._queue(sealed)
                self._start_publisher()
        return sealed

    def _queue(self, record: AuditRecord) -> None:
        """Keep a just-appended record for the bus, unless the memory budget is spent: it is then
        read back from the store in its turn."""
        if self._backlog_from is not None:
            return  # records before it wait in the store: so does this one, after them
        size = record.ByteSize()
        if self._outgoing and self._queued_bytes + size > self._max_queued_bytes:
            self._backlog_from = record.seq
            return
        self._outgoing.append(record)
        self._queued_bytes += size

    async def _refill(self) -> None:
        """Read the next batch of the backlog from the store into the (empty) queue."""
        start = self._backlog_from
        assert start is not None
        records = await self._store.audit_records(after_seq=start - 1, limit=REFILL_BATCH)
        # No await from here on: an append cannot slip in between the read and the switch (one
        # that committed but has not yet moved the head is queued by itself, so it is left out).
        taken: list[AuditRecord] = []
        for r in records:
            if not start <= r.seq <= self._head_seq:
                continue
            size = r.ByteSize()
            if taken and self._queued_bytes + size > self._max_queued_bytes:
                break  # read again in the next batch
            taken.append(r)
            self._outgoing.append(r)
            self._queued_bytes += size
        following = taken[-1].seq + 1 if taken else self._head_seq + 1
        first = taken[0].seq if taken else following
        if first != start:
            log.error(
                "audit: records seq %d..%d are missing from the store; they cannot be published",
                start,
                first - 1,
            )
        self._backlog_from = None if following > self._head_seq else following

    def _start_publisher(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(
                self._publish_pending(), name="evcore-audit-publish"
            )

    async def _publish_pending(self) -> None:
        failures = 0
        while self._losses is None or self._losses:
            try:
                await self._handle_losses()
            except Exception:  # the store or the bus: tried again after a back-off
                failures += 1
                log.exception("audit: handling the bus's outbox losses failed")
                await asyncio.sleep(_backoff_s(failures))
        failures = 0
        while self._outgoing or self._backlog_from is not None:
            if not self._outgoing:
                try:
                    await self._refill()
                except Exception:  # the store: tried again after a back-off
                    failures += 1
                    log.exception("audit: reading records for the bus from the store failed")
                    await asyncio.sleep(_backoff_s(failures))
                continue
            record = self._outgoing[0]
            if not await self._publish(record):
                # Retried in order (the mark moves only over a gap-free prefix), after a
                # back-off in real time (the bus is a real thing even under a simulated clock);
                # the records behind it wait (they are durable in the store).
                failures += 1
                await asyncio.sleep(_backoff_s(failures))
                continue
            failures = 0
            if self._outgoing and self._outgoing[0] is record:
                self._outgoing.popleft()
                self._queued_bytes -= record.ByteSize()
            try:
                await self._write_mark(force=False)
            except Exception:  # the mark only saves republishing; it is retried with the next
                log.exception("audit: writing the publish mark failed")

    async def _event(self, record: AuditRecord, *, compress: bool) -> Event:
        """The bus event carrying ``record``: as it is, or zlib-compressed (``audit_zlib``)."""
        event = Event(
            event_id=f"audit-{record.hash}",
            site_id=self._site_id,
            source=f"edge:{record.edge_id or self._edge_id}",
        )
        event.time.CopyFrom(record.decided_at)
        if compress:
            data = record.SerializeToString()
            event.audit_zlib = await asyncio.to_thread(zlib.compress, data, 1)
        else:
            event.audit.CopyFrom(record)
        return event

    async def _publish(self, record: AuditRecord) -> bool:
        """Hand one record to the bus; False when the bus refused it for now (to be retried)."""
        assert self._bus is not None
        subject = Subjects(self._site_id).audit
        compress = record.ByteSize() > COMPRESS_ABOVE_BYTES
        while True:
            event = await self._event(record, compress=compress)
            try:
                await self._bus.publish(subject, event, event_id=event.event_id, critical=True)
                break
            except PayloadTooLarge as exc:
                if not compress:
                    # A broker with a max_payload below COMPRESS_ABOVE_BYTES: the same record
                    # compressed (same event id) is a fraction of it.
                    compress = True
                    continue
                # No retry can succeed: the broker's max_payload is below even the compressed
                # record. Holding it would hold every later record off the bus for good.
                self._too_large(record, exc)
                break
            except Exception:  # the record is durable; retried after a back-off, in order
                self.publish_failures += 1
                log.exception("audit: publishing seq %d failed; it is retried", record.seq)
                return False
        self._published_seq = max(self._published_seq, record.seq)
        return True

    async def _write_mark(self, *, force: bool) -> None:
        # Records are handed over in seq order and a refused one is retried before any later
        # one, so everything up to _published_seq was taken (or is too large for any bus).
        due = self._published_seq - self._mark_written >= PUBLISHED_MARK_EVERY
        if self._published_seq > self._mark_written and (force or due):
            await self._store.set_meta(PUBLISHED_MARK, str(self._published_seq))
            self._mark_written = self._published_seq

    async def recent(
        self,
        *,
        charger_id: str | None = None,
        since_s: float | None = None,
        limit: int = 50,
    ) -> list[AuditRecord]:
        """The newest decisions first (optionally those concerning one charger)."""
        return await self._store.audit_records(
            charger_id=charger_id, since_s=since_s, limit=limit, newest_first=True
        )

    async def verify(self) -> VerifyReport:
        return await verify_chain(self._store)
