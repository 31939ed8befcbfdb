"""Grid signals and plans from the bus (``evcore.v1`` protobuf) into the controller.

What this module owns: decoding ``GridSignal`` and ``Plan`` messages into ``Curtailment``,
``PricePoint`` and ``PlanTargets``, with a ``BadPayload`` naming the field when a message is wrong
(the bus logs and counts it, and the subscriber lives on). It never decides a setpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from evcore.bus import BadPayload, Bus, BusMessage, Subjects, Subscription
from evcore.edge.controller import EdgeController, PlanTargets
from evcore.edge.grid import Curtailment, GridSignalError, PricePoint
from evcore.v1 import grid_pb2, plan_pb2

log = logging.getLogger("evcore.edge")

#: The store's ``meta`` key holding the curtailment book (``CurtailmentBook.snapshot``).
BOOK_KEY = "edge.curtailments"


def _ts(msg: Any) -> float:
    return float(msg.seconds) + float(msg.nanos) * 1e-9


def apply_grid_signal(ctrl: EdgeController, data: bytes) -> str:
    """Decode one ``GridSignal`` and hand it to the controller; returns what it was."""
    sig = grid_pb2.GridSignal()
    try:
        sig.ParseFromString(data)
    except Exception as exc:
        raise BadPayload(f"grid signal: not a GridSignal ({exc})") from exc
    kind = sig.WhichOneof("signal")
    if kind == "curtailment":
        c = sig.curtailment
        sid = c.curtailment_id or sig.signal_id
        book = ctrl.curtailments
        issued = _ts(sig.issued_at) if sig.HasField("issued_at") else None
        if book.revision_is_older(sid, issued):
            # A redelivered older revision (its ack was lost while later ones went through),
            # or a cancel older than the revision held: the newer one stands.
            log.info(
                "grid signal %s: older than the revision of %s held; ignored", sig.signal_id, sid
            )
            return "older"
        if c.cancelled:
            held = book.get(sid)
            ends = [x.end for x in (held,) if x is not None]
            if c.HasField("end"):
                ends.append(_ts(c.end))
            ctrl.cancel_curtailment(sid)
            book.note_revision(sid, issued, max(ends, default=ctrl.clock.now()))
            return "cancelled"
        if not c.HasField("start") or not c.HasField("end"):
            raise BadPayload(f"curtailment {sid}: start and end are required")
        try:
            ctrl.post_curtailment(Curtailment(sid, c.node_id, c.max_kw, _ts(c.start), _ts(c.end)))
        except GridSignalError as exc:
            raise BadPayload(str(exc)) from exc
        book.note_revision(sid, issued, _ts(c.end))
        return "curtailment"
    if kind == "price_update":
        points = []
        for i, p in enumerate(sig.price_update.tariff.prices):
            if not math.isfinite(p.price_per_kwh):
                raise BadPayload(f"price_update.tariff.prices[{i}].price_per_kwh: not finite")
            points.append(PricePoint(_ts(p.start), p.price_per_kwh))
        try:
            ctrl.post_prices(points)
        except GridSignalError as exc:
            raise BadPayload(str(exc)) from exc
        return "price_update"
    raise BadPayload(f"grid signal {sig.signal_id!r}: no curtailment or price_update")


def plan_from_proto(data: bytes, received_at: float, known: Callable[[str], bool]) -> PlanTargets:
    plan = plan_pb2.Plan()
    try:
        plan.ParseFromString(data)
    except Exception as exc:
        raise BadPayload(f"plan: not a Plan ({exc})") from exc
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for i, r in enumerate(plan.rows):
        if not known(r.charger_id):
            raise BadPayload(f"plan {plan.plan_id}: rows[{i}].charger_id {r.charger_id!r} unknown")
        target = r.target_a if r.HasField("target_a") else r.target_w
        if not (math.isfinite(target) and target >= 0 and math.isfinite(r.step_s) and r.step_s > 0):
            raise BadPayload(f"plan {plan.plan_id}: rows[{i}] target/step_s must be finite, >= 0")
        rows.setdefault(r.charger_id, []).append((_ts(r.step_start), r.step_s, target))
    source = "local" if plan.source == "edge" else "cloud"
    return PlanTargets(source, f"{plan.plan_id}@{plan.plan_version}", received_at, rows)


#: The durable consumer ``evcore edge`` reads its grid subject with (one per site stream).
GRID_DURABLE = "edge-grid"


async def load_curtailments(ctrl: EdgeController, store: Any) -> int:
    """Restore the curtailment book the store holds (``BOOK_KEY``) into ``ctrl``: call at start,
    before the first decision. Ended curtailments are not restored. Returns how many were."""
    text = await store.get_meta(BOOK_KEY)
    if not text:
        return 0
    for what in ctrl.curtailments.restore(text, ctrl.clock.now()):
        log.warning("stored curtailment not restored: %s", what)
    if len(ctrl.curtailments):
        ctrl.notify("grid")
    return len(ctrl.curtailments)


async def store_curtailments(ctrl: EdgeController, store: Any) -> None:
    """Write the curtailment book (held curtailments not ended, revision marks) to the store."""
    ctrl.curtailments.prune(ctrl.clock.now())
    await store.set_meta(BOOK_KEY, ctrl.curtailments.snapshot())


async def subscribe_signals(
    bus: Bus, ctrl: EdgeController, *, grid_durable: str | None = None, store: Any = None
) -> list[Subscription]:
    """Grid signals and cloud plans over the bus (the handlers only update the controller: never
    block the loop).

    With ``grid_durable`` the grid subject is read by that durable consumer (``Bus.consume``):
    what was published while the edge was down (a fleet curtailment's share) is delivered when
    it starts, in order (a repeated id replaces, a cancel removes; one that ended meanwhile never
    applies: the book drops it at the next decision; a revision or cancel issued before the one
    held is ignored). With ``store`` the book is written to it before the handler returns (so
    before the message is acknowledged; a failed write raises, and the message is redelivered):
    ``load_curtailments`` restores it at the next start. Without ``grid_durable``, a live
    subscription (signals published while the edge is down are missed until they are published
    again). Plans stay live: a cloud plan is worth only ``cloud_plan_fresh_s``."""
    subjects = Subjects(bus.site_id)

    async def on_grid(msg: BusMessage) -> None:
        what = apply_grid_signal(ctrl, msg.data)
        if store is not None and what in ("curtailment", "cancelled"):
            await store_curtailments(ctrl, store)

    async def on_plan(msg: BusMessage) -> None:
        plan = plan_from_proto(msg.data, ctrl.clock.now(), lambda cid: cid in ctrl.state.chargers)
        if plan.source == "cloud":
            ctrl.set_plan(plan)

    grid = (
        await bus.consume(subjects.grid, durable=grid_durable, handler=on_grid)
        if grid_durable is not None
        else await bus.subscribe(subjects.grid, on_grid)
    )
    return [grid, await bus.subscribe(subjects.plan, on_plan)]
