"""The controller's decision records into the audit log and the store; recovery after a restart.

What this module owns: converting a decision record (``EdgeController._record``) into the audit
room's ``evcore.audit.Decision`` with ``evcore.v1.Setpoint`` messages, appending it (durable when
``append`` returns — the controller sends nothing before), remembering sent setpoints in the store,
and reading sessions and last setpoints back after a restart. It records; it never changes a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from evcore.edge.state import ChargerState, SiteState, priority_error
from evcore.v1 import setpoint_pb2

log = logging.getLogger("evcore.edge")

_KEEP_IDS = 4096

# Core binding codes (``evcore._core.binding_codes()``) → the contract's BindingReason.
_REASON = {
    "none": setpoint_pb2.BINDING_REASON_NONE,
    "demand": setpoint_pb2.BINDING_REASON_VEHICLE_DEMAND,
    "plan": setpoint_pb2.BINDING_REASON_PLAN_TARGET,
    "admission": setpoint_pb2.BINDING_REASON_MIN_CURRENT_OR_STEP,
    "hysteresis": setpoint_pb2.BINDING_REASON_SWITCHING_RULE,
    "disconnected": setpoint_pb2.BINDING_REASON_NO_SESSION,
    "fault": setpoint_pb2.BINDING_REASON_FAULTED,
    "charger_max": setpoint_pb2.BINDING_REASON_CHARGER_MAX,
    "min_current": setpoint_pb2.BINDING_REASON_MIN_CURRENT_OR_STEP,
    "step": setpoint_pb2.BINDING_REASON_MIN_CURRENT_OR_STEP,
    "ramp": setpoint_pb2.BINDING_REASON_SWITCHING_RULE,
    "node_phase": setpoint_pb2.BINDING_REASON_NODE_PHASE_LIMIT,
    "node_power": setpoint_pb2.BINDING_REASON_NODE_POWER_LIMIT,
    "unbalance": setpoint_pb2.BINDING_REASON_UNBALANCE_LIMIT,
    "stale_telemetry": setpoint_pb2.BINDING_REASON_STALE_TELEMETRY,
    "unconfirmed_decrease": setpoint_pb2.BINDING_REASON_NODE_PHASE_LIMIT,
    "unknown_profile": setpoint_pb2.BINDING_REASON_NODE_PHASE_LIMIT,
    "failsafe": setpoint_pb2.BINDING_REASON_FAILSAFE,
}


def _ts(msg: Any, seconds: float) -> None:
    whole = int(seconds // 1)
    msg.seconds = whole
    msg.nanos = min(999_999_999, round((seconds - whole) * 1e9))


def bindings_of(record: Mapping[str, Any]) -> list[Any]:
    """``ChargerBinding`` for each charger considered and left unchanged."""
    from evcore.v1.audit_pb2 import ChargerBinding

    return [
        ChargerBinding(
            charger_id=str(b["charger_id"]),
            binding=_REASON.get(
                str(b.get("code") or "none"), setpoint_pb2.BINDING_REASON_UNSPECIFIED
            ),
            reason=str(b.get("reason") or ""),
            binding_node_id=str(b.get("binding_node_id") or ""),
        )
        for b in record.get("bindings") or ()
    ]


def setpoints_of(record: Mapping[str, Any], decision_id: str) -> list[setpoint_pb2.Setpoint]:
    out: list[setpoint_pb2.Setpoint] = []
    for sp in record["setpoints"]:
        msg = setpoint_pb2.Setpoint(charger_id=sp["charger_id"], decision_id=decision_id)
        # The value the charger is told (after the central system's rounding); the decided one
        # goes into the reason when it differs.
        sent = float(sp.get("sent", sp["new"]))
        if sp["unit"] == "W":
            msg.setpoint_w = sent
        else:
            msg.setpoint_a = sent
        code = "failsafe" if sp["purpose"] == "tx_default" else sp.get("code", "none")
        msg.binding = _REASON.get(code, setpoint_pb2.BINDING_REASON_UNSPECIFIED)
        reason = sp.get("binding") or ""
        if sp["purpose"] == "tx_default":
            reason = f"TxDefault failsafe level {float(sp['new']):g} {sp['unit']}"
        msg.reason = reason or f"{sp['kind']} to {float(sp['new']):g} {sp['unit']}"
        if abs(sent - float(sp["new"])) > 1e-9:
            msg.reason += f" (decided {float(sp['new']):g} {sp['unit']}, sent {sent:g})"
        if sp.get("binding_node"):
            msg.binding_node_id = sp["binding_node"]
        _ts(msg.decided_at, float(record["at"]))
        if sp.get("valid_to") is not None:
            _ts(msg.valid_until, float(sp["valid_to"]))
        out.append(msg)
    return out


class AuditRecorder:
    """``AuditSink`` over ``evcore.audit.AuditLog`` (+ the store's last-setpoint table)."""

    def __init__(self, audit_log: Any, store: Any = None, *, edge_id: str = "edge") -> None:
        self.audit_log = audit_log
        self.store = store
        self.edge_id = edge_id
        self._tasks: set[asyncio.Task[None]] = set()
        self.store_failures = 0
        #: Decision numbers whose record is durable (for tests: nothing leaves before its record).
        self.durable: set[int] = set()
        #: Called with each record once durable (the facade's recent decisions and watchers).
        self.on_durable: Callable[[Mapping[str, Any]], None] | None = None
        self._ids: dict[int, str] = {}  # decision number -> decision id (recent ones)
        self.confirmations = 0
        # Last-setpoint bookkeeping waiting for the store, per charger (the latest wins): one
        # writer, one store operation at a time, so a decision's audit append never queues
        # behind hundreds of them on the store's connection (each is a durable commit).
        self._to_record: dict[str, tuple[setpoint_pb2.Setpoint, float]] = {}
        self._to_confirm: dict[str, tuple[str, float]] = {}
        self._writer: asyncio.Task[None] | None = None
        #: Store operations the writer performed (for tests and benchmarks).
        self.store_writes = 0

    async def append(self, record: Mapping[str, Any]) -> None:
        from evcore.audit.log import Decision

        decision_id = f"{self.edge_id}-{record['decision']}-{int(float(record['at']) * 1000)}"
        setpoints = setpoints_of(record, decision_id)
        plan_version = record.get("plan_version") or ""
        decision = Decision(
            decision_id=decision_id,
            trigger=str(record["trigger"]),
            decided_at_s=float(record["at"]),
            setpoints=setpoints,
            bindings=bindings_of(record),
            inputs_digest=str(record.get("inputs_digest", "")),
            plan_version=int(plan_version.rsplit("@", 1)[-1]) if "@" in plan_version else 0,
            config_version=str(record.get("config_version", "")),
            edge_id=self.edge_id,
        )
        await self.audit_log.append(decision)
        self.durable.add(int(record["decision"]))
        self._ids[int(record["decision"])] = decision_id
        while len(self._ids) > _KEEP_IDS:
            del self._ids[next(iter(self._ids))]
        if self.on_durable is not None:
            self.on_durable(record)
        if self.store is not None:
            # Last-setpoint bookkeeping is for restart recovery, not for this decision's safety
            # (the audit record above is): it runs beside the send, owned here.
            at = float(record["at"])
            for sp in setpoints:
                self._to_record[sp.charger_id] = (sp, at)
                self._to_confirm.pop(sp.charger_id, None)  # for an older decision: moot
            self._kick()

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
            self._tasks.add(self._writer)
            self._writer.add_done_callback(self._tasks.discard)

    async def _write(self) -> None:
        """Drain the bookkeeping into the store, one operation at a time: records first (a
        confirmation names the record's decision, so it follows it)."""
        while self._to_record or self._to_confirm:
            if self._to_record:
                cid = next(iter(self._to_record))
                sp, at = self._to_record.pop(cid)
                try:
                    await self.store.record_setpoint_sent(sp, at)
                except Exception:
                    self.store_failures += 1
                    log.exception("store: recording setpoint for %s failed", sp.charger_id)
            else:
                cid = next(iter(self._to_confirm))
                decision_id, at = self._to_confirm.pop(cid)
                await self.confirm(cid, decision_id, at)
            self.store_writes += 1

    async def confirm(self, charger_id: str, decision_id: str, at: float) -> None:
        if self.store is not None:
            try:
                if await self.store.confirm_setpoint(charger_id, decision_id, at):
                    self.confirmations += 1
            except Exception:
                self.store_failures += 1
                log.exception("store: confirming setpoint for %s failed", charger_id)

    def confirm_sent(self, charger_id: str, decision: int, at: float) -> None:
        """The charger accepted the setpoint of decision number ``decision``: record it beside
        the loop (after the setpoint itself was remembered)."""
        decision_id = self._ids.get(decision)
        if decision_id is None or self.store is None:
            return
        self._to_confirm[charger_id] = (decision_id, at)
        self._kick()

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def recover(state: SiteState, store: Any, keeper: SessionKeeper | None = None) -> int:
    """Load last setpoints and open sessions from the store into ``state``; returns how many.

    Recovered values are *unconfirmed*: the charger may have fallen back or rebooted since, so the
    envelope keeps counting each charger at least at its last value (or its maximum while its
    profile state is unknown) until the charger accepts a fresh profile.
    """
    n = 0
    last = await store.last_setpoints()
    for cid, rec in last.items():
        c = state.chargers.get(cid)
        if c is None:
            continue
        sp = rec.setpoint
        value = sp.setpoint_w if sp.HasField("setpoint_w") else sp.setpoint_a
        c.sent = float(value)
        c.accepted = False
        c.needs_resend = True
        n += 1
    with contextlib.suppress(Exception):
        for tx in await store.list_open_transactions():
            c = state.chargers.get(tx.charger_id)
            if c is not None and c.transaction_id is None:
                c.transaction_id = tx.transaction_id
                c.plugged = True
    # Open sessions: what the operator set comes back (a priority outside today's range does not).
    with contextlib.suppress(Exception):
        for rec in await store.list_open_sessions():
            c = state.chargers.get(rec.charger_id)
            if c is None or (c.transaction_id not in (None, rec.transaction_id)):
                continue
            if c.transaction_id is None and rec.transaction_id:
                c.transaction_id = rec.transaction_id
                c.plugged = True
            c.session_started_at = rec.started_at_s
            c.departure = rec.departure_s
            c.energy_requested_kwh = rec.energy_requested_kwh
            if priority_error(rec.priority) is None:
                c.priority = rec.priority
            if keeper is not None:
                keeper.open[rec.charger_id] = rec
    return n


class SessionKeeper:
    """Saves sessions in the store when they start, end or are steered (beside the loop)."""

    def __init__(self, store: Any, clock: Any) -> None:
        self.store = store
        self.clock = clock
        self.open: dict[str, Any] = {}  # charger id -> SessionRecord
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0

    def __call__(self, c: ChargerState, ended: str | None) -> None:
        from dataclasses import replace

        from evcore.store.base import SessionRecord

        now = float(self.clock.now())
        prev = self.open.get(c.charger_id)
        if ended is not None:
            if prev is None or prev.transaction_id != ended:
                return
            rec = replace(
                prev,
                ended_at_s=now,
                energy_delivered_kwh=prev.energy_delivered_kwh,
                updated_at_s=now,
            )
            del self.open[c.charger_id]
        else:
            tx = c.transaction_id or ""
            if prev is None or prev.transaction_id != tx:
                prev = SessionRecord(
                    session_id=f"{c.charger_id}:{tx}",
                    charger_id=c.charger_id,
                    started_at_s=float(c.session_started_at or now),
                    transaction_id=tx,
                )
            rec = replace(
                prev,
                departure_s=c.departure,
                energy_requested_kwh=c.energy_requested_kwh,
                priority=c.priority,
                energy_delivered_kwh=c.session_energy_wh / 1000.0,
                updated_at_s=now,
            )
            self.open[c.charger_id] = rec
        task = asyncio.ensure_future(self._save(rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _save(self, rec: Any) -> None:
        try:
            await self.store.upsert_session(rec)
        except Exception:
            self.failures += 1
            log.exception("store: saving session %s failed", rec.session_id)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
