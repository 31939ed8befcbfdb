"""Grid signals and plans from the bus (``evcore.v1`` protobuf) into the controller.

What this module owns: decoding ``GridSignal`` and ``Plan`` messages into ``Curtailment``,
``PricePoint`` and ``PlanTargets``, with a ``BadPayload`` naming the field when a message is wrong
(the bus logs and counts it, and the subscriber lives on). It never decides a setpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    try:
        skipped = ctrl.curtailments.restore(text, ctrl.clock.now())
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # Fail closed (the edge does not start) with what to fix, not a bare JSON error.
        raise ValueError(
            f"the store's meta key {BOOK_KEY!r} is not a curtailment book ({exc!r}): "
            f"fix it, or delete that row of the meta table to start with no stored "
            f"curtailments (those in force are lost until the grid operator sends them again)"
        ) from exc
    for what in skipped:
        log.warning("stored curtailment not restored: %s", what)
    if len(ctrl.curtailments):
        ctrl.notify("grid")
    return len(ctrl.curtailments)


async def store_curtailments(ctrl: EdgeController, store: Any) -> None:
    """Write the curtailment book (held curtailments not ended, revision marks) to the store."""
    ctrl.curtailments.prune(ctrl.clock.now())
    await store.set_meta(BOOK_KEY, ctrl.curtailments.snapshot())


class BookWriter:
    """Keeps the stored curtailment book up to date without ever holding a signal back.

    A signal is applied to the in-memory book (the one decisions use) first; ``save`` then
    writes the whole book. A failed (or, past ``timeout_s``, hung) write is logged once per
    outage, counted (``failures``) and leaves the book ``dirty``; while ``failing`` the handlers
    do not wait on the store (``kick``: a retry beside them), and the next grid message, API post
    or ``run`` (every ``retry_s``) writes the whole book again until it succeeds. Trade-off:
    during a store outage a restart loses what was received in the outage; a tight curtailment
    is never delayed by the store."""

    def __init__(
        self, ctrl: EdgeController, store: Any, *, timeout_s: float = 2.0, retry_s: float = 2.0
    ) -> None:
        self.ctrl = ctrl
        self.store = store
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.dirty = False
        self.failures = 0
        self._warned = False
        self._lock = asyncio.Lock()
        self._retry: asyncio.Task[bool] | None = None

    @property
    def failing(self) -> bool:
        """The last write failed (an outage): the handlers do not wait on the store."""
        return self._warned

    def kick(self) -> None:
        """Mark the book dirty and retry the write in the background (one retry at a time)."""
        self.dirty = True
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self.save())

    async def aclose(self) -> None:
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry

    async def save(self) -> bool:
        """Write the book now (serialised: the snapshot written last is the newest); returns
        whether the stored book is now the book in memory."""
        self.dirty = True
        async with self._lock:
            if not self.dirty:
                return True  # written by the call that held the lock, after this change
            self.dirty = False
            try:
                await asyncio.wait_for(store_curtailments(self.ctrl, self.store), self.timeout_s)
            except asyncio.CancelledError:
                self.dirty = True
                raise
            except Exception as exc:
                self.dirty = True
                self.failures += 1
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "curtailment book not stored (%r): applied in memory, not durable "
                        "across a restart until the store takes it; retrying every %g s",
                        exc,
                        self.retry_s,
                    )
                return False
            if self._warned:
                self._warned = False
                log.warning("curtailment book stored again after %d failed write(s)", self.failures)
            return True

    async def save_if_dirty(self) -> bool:
        return await self.save() if self.dirty else True

    async def run(self) -> None:
        """Retry a pending write every ``retry_s`` (a task of the app's task group)."""
        while True:
            await asyncio.sleep(self.retry_s)
            await self.save_if_dirty()


async def subscribe_signals(
    bus: Bus,
    ctrl: EdgeController,
    *,
    grid_durable: str | None = None,
    store: Any = None,
    writer: BookWriter | None = None,
) -> list[Subscription]:
    """Grid signals and cloud plans over the bus (the handlers only update the controller: never
    block the loop).

    With ``grid_durable`` the grid subject is read by that durable consumer (``Bus.consume``):
    what was published while the edge was down (a fleet curtailment's share) is delivered when
    it starts, in order (a repeated id replaces, a cancel removes; one that ended meanwhile never
    applies: the book drops it at the next decision; a revision or cancel issued before the one
    held is ignored). With ``store`` (or a ``writer`` over it) a signal is applied in memory
    first, then the book is written (``BookWriter.save``) before the handler returns; a failed
    write never holds the message back (it is acknowledged, the book stays dirty and is written
    at the next grid message or retry; while the store is failing the handler does not wait):
    ``load_curtailments`` restores it at the next start.
    Without ``grid_durable``, a live subscription (signals published while the edge is down are
    missed until they are published again). Plans stay live: a cloud plan is worth only
    ``cloud_plan_fresh_s``."""
    subjects = Subjects(bus.site_id)
    if writer is None and store is not None:
        writer = BookWriter(ctrl, store)

    async def on_grid(msg: BusMessage) -> None:
        what = apply_grid_signal(ctrl, msg.data)
        if writer is None:
            return
        if what in ("curtailment", "cancelled") and not writer.failing:
            await writer.save()  # stored before the ack (a failure is logged, never raised)
        elif what in ("curtailment", "cancelled") or writer.dirty:
            writer.kick()  # in an outage: never wait on the store, retry beside the handler

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
