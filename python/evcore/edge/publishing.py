"""What the edge itself tells the bus: faults it marked and the plans it made.

What this module owns: turning a charger the controller marked faulted (it ignores its profile)
into an ``evcore.v1.ChargerStatus`` with ``faulted_by_edge`` on ``evcore.<site>.status.<charger>``
(critical: an operator must see it), and a local plan into an ``evcore.v1.Plan`` with source
``edge`` on ``evcore.<site>.plan`` (the edge's own subscriber applies only ``cloud`` plans, so it
does not read it back). Each publication runs beside the loop, in a task owned here; the loop never
waits for the bus. It never decides a setpoint.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from evcore.bus import Subjects
from evcore.clock import Clock
from evcore.edge.controller import EdgeController, PlanTargets
from evcore.v1 import plan_pb2, status_pb2

log = logging.getLogger("evcore.edge")


def _ts(msg: Any, seconds: float) -> None:
    whole = int(seconds // 1)
    msg.seconds = whole
    msg.nanos = min(999_999_999, round((seconds - whole) * 1e9))


def fault_status(
    ctrl: EdgeController, charger_id: str, reason: str, now: float, *, faulted: bool = True
) -> Any:
    c = ctrl.state.chargers[charger_id]
    msg = status_pb2.ChargerStatus(
        charger_id=charger_id,
        connected=bool(c.online),
        faulted_by_edge=faulted,
        fault_reason=reason,
    )
    _ts(msg.received_at, now)
    return msg


def plan_message(ctrl: EdgeController, plan: PlanTargets, now: float) -> Any:
    msg = plan_pb2.Plan(plan_id=plan.version.split("@", 1)[0], source="edge")
    tail = plan.version.rsplit("@", 1)[-1]
    if tail.isdigit():
        msg.plan_version = int(tail)
    _ts(msg.computed_at, plan.received_at)
    ends = plan.ends_at()
    if ends > 0:
        _ts(msg.valid_until, ends)
    for cid in sorted(plan.rows):
        c = ctrl.state.chargers.get(cid)
        # The transaction the rows were planned for (else the one on the charger now).
        tx = plan.transactions.get(cid) or (c.transaction_id if c is not None else None)
        for start, step_s, target in sorted(plan.rows[cid]):
            row = msg.rows.add(charger_id=cid, step_s=float(step_s))
            if tx:
                row.session_id = f"{cid}:{tx}"
                row.transaction_id = str(tx)
            _ts(row.step_start, start)
            if c is not None and c.is_dc:
                row.target_w = float(target)
            else:
                row.target_a = float(target)
    return msg


class EdgePublisher:
    """Hooks for ``EdgeController.on_fault`` / ``on_plan`` that publish on the bus."""

    def __init__(self, bus: Any, site_id: str, ctrl: EdgeController, clock: Clock) -> None:
        self.bus = bus
        self.subjects = Subjects(site_id)
        self.ctrl = ctrl
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0
        self.published = 0

    def install(self) -> None:
        previous = self.ctrl.on_fault

        def on_fault(charger_id: str, reason: str) -> None:
            if previous is not None:
                previous(charger_id, reason)
            self.fault(charger_id, reason)

        self.ctrl.on_fault = on_fault
        self.ctrl.on_fault_cleared = self.fault_cleared
        self.ctrl.on_plan = self.plan

    def fault(self, charger_id: str, reason: str) -> None:
        msg = fault_status(self.ctrl, charger_id, reason, self.clock.now())
        self._spawn(self.subjects.status(charger_id), msg, critical=True)

    def fault_cleared(self, charger_id: str, note: str) -> None:
        msg = fault_status(
            self.ctrl,
            charger_id,
            f"cleared: {note}" if note else "cleared",
            self.clock.now(),
            faulted=False,
        )
        self._spawn(self.subjects.status(charger_id), msg, critical=True)

    def plan(self, plan: PlanTargets) -> None:
        if plan.source != "local":
            return
        msg = plan_message(self.ctrl, plan, self.clock.now())
        self._spawn(self.subjects.plan, msg, critical=False)

    def _spawn(self, subject: str, msg: Any, *, critical: bool) -> None:
        task = asyncio.ensure_future(self._publish(subject, msg, critical))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, subject: str, msg: Any, critical: bool) -> None:
        # A critical status (a fault an operator must see) that the bus refuses (its outbox's
        # disk full, say) is tried again under the same event id (a repeat is dropped), after a
        # back-off doubling to 30 s, until it is taken or the edge stops; before, one refusal
        # lost it.
        event_id = uuid.uuid4().hex
        data = msg.SerializeToString()
        attempt = 0
        while True:
            try:
                await self.bus.publish(subject, data, event_id=event_id, critical=critical)
                self.published += 1
                return
            except Exception:
                self.failures += 1
                attempt += 1
                if not critical:
                    log.exception("publishing on %s failed", subject)
                    return
                if attempt in (1, 10) or attempt % 100 == 0:
                    log.exception("publishing on %s failed (try %d); retrying", subject, attempt)
                await asyncio.sleep(min(0.5 * 2 ** min(attempt - 1, 6), 30.0))

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the publishes in flight (a critical one still refused after ``timeout_s``
        is given up, logged)."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
                log.error("publishing stopped with a status not taken by the bus (stopping)")
            await asyncio.gather(*pending, return_exceptions=True)
