"""Grid signals and plans from the bus (``evcore.v1`` protobuf) into the controller.

What this module owns: decoding ``GridSignal``, ``Plan`` and ``NodeLoadSample`` messages into
``Curtailment``, ``PricePoint``, ``PlanTargets`` and counted building load, with a ``BadPayload``
naming the field when a message is wrong (the bus logs and counts it, and the subscriber lives
on). It never decides a setpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evcore.bus import BadPayload, Bus, BusMessage, Subjects, Subscription, decode
from evcore.edge.controller import EdgeController, PlanTargets
from evcore.edge.grid import Curtailment, GridSignalError, PricePoint
from evcore.v1 import grid_pb2, meter_pb2, plan_pb2

log = logging.getLogger("evcore.edge")

#: The store's ``meta`` key holding the curtailment book (``CurtailmentBook.snapshot``).
BOOK_KEY = "edge.curtailments"


def _ts(msg: Any) -> float:
    return float(msg.seconds) + float(msg.nanos) * 1e-9


def apply_grid_signal(ctrl: EdgeController, data: bytes, *, redelivered: bool = False) -> str:
    """Decode one ``GridSignal`` and hand it to the controller; returns what it was.

    ``redelivered``: the bus delivers this message again (its first delivery's ack was lost).
    Revisions and cancels issued at the same instant apply in delivery order, which is stream
    order on a first delivery; a redelivery issued at the same instant as the revision or cancel
    applied last is older in the stream than that one and is ignored."""
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
        if redelivered and book.same_instant(sid, issued):
            log.info(
                "grid signal %s: redelivered, issued at the same instant as the revision of %s "
                "applied since; ignored",
                sig.signal_id,
                sid,
            )
            return "redelivered"
        held = book.get(sid)
        if c.cancelled:
            ends = [x.end for x in (held,) if x is not None]
            if c.HasField("end"):
                ends.append(_ts(c.end))
            ctrl.cancel_curtailment(sid)
            book.note_revision(sid, issued, max(ends, default=ctrl.clock.now()))
            return "cancelled"
        if not c.HasField("start") or not c.HasField("end"):
            raise BadPayload(f"curtailment {sid}: start and end are required")
        new = book.at_known_node(Curtailment(sid, c.node_id, c.max_kw, _ts(c.start), _ts(c.end)))
        try:
            ctrl.post_curtailment(new)
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


def apply_node_load(ctrl: EdgeController, data: bytes) -> str:
    """Decode one ``NodeLoadSample`` (a building meter's reading, ``evcore.<site>.node_load.
    <node>``) and hand it to the controller; returns what became of it."""
    msg = decode(meter_pb2.NodeLoadSample, data)
    if not msg.node_id:
        raise BadPayload("node load: node_id is required")
    if not msg.HasField("sampled_at"):
        raise BadPayload(f"node load {msg.node_id}: sampled_at is required")
    try:
        return ctrl.post_node_load(msg.node_id, list(msg.current_a), _ts(msg.sampled_at))
    except GridSignalError as exc:
        raise BadPayload(str(exc)) from exc


def plan_from_proto(data: bytes, received_at: float, known: Callable[[str], bool]) -> PlanTargets:
    plan = plan_pb2.Plan()
    try:
        plan.ParseFromString(data)
    except Exception as exc:
        raise BadPayload(f"plan: not a Plan ({exc})") from exc
    rows: dict[str, list[tuple[float, float, float]]] = {}
    transactions: dict[str, str] = {}
    for i, r in enumerate(plan.rows):
        if not known(r.charger_id):
            raise BadPayload(f"plan {plan.plan_id}: rows[{i}].charger_id {r.charger_id!r} unknown")
        target = r.target_a if r.HasField("target_a") else r.target_w
        if not (math.isfinite(target) and target >= 0 and math.isfinite(r.step_s) and r.step_s > 0):
            raise BadPayload(f"plan {plan.plan_id}: rows[{i}] target/step_s must be finite, >= 0")
        if r.transaction_id:
            other = transactions.setdefault(r.charger_id, r.transaction_id)
            if other != r.transaction_id:
                raise BadPayload(
                    f"plan {plan.plan_id}: rows[{i}].transaction_id {r.transaction_id!r}: the "
                    f"rows of charger {r.charger_id!r} are for transaction {other!r}"
                )
        rows.setdefault(r.charger_id, []).append((_ts(r.step_start), r.step_s, target))
    source = "local" if plan.source == "edge" else "cloud"
    return PlanTargets(
        source, f"{plan.plan_id}@{plan.plan_version}", received_at, rows, transactions
    )


#: The durable consumer ``evcore edge`` reads its grid subject with (one per site stream).
GRID_DURABLE = "edge-grid"


#: The local copy of the book kept while the store does not take it, beside the site file
#: (``book_fallback_path``).
FALLBACK_NAME = "evcore-curtailments.json"


def book_fallback_path(audit_journal: Path | None) -> Path | None:
    """Where the book is kept on local disk during a store outage: ``FALLBACK_NAME`` in the
    directory of the audit journal (None when the edge has no journal: no local fallback)."""
    return None if audit_journal is None else audit_journal.parent / FALLBACK_NAME


def _copy_order(text: str | None) -> tuple[float, float]:
    """How new a stored copy of the book is: its ``seq``, then its ``saved_at`` (copies written
    before ``seq`` existed). Unreadable: newest, so that ``restore`` names what is wrong."""
    if not text:
        return (-math.inf, -math.inf)
    try:
        data = json.loads(text)
        seq, t = data.get("seq"), data.get("saved_at")
    except (ValueError, AttributeError):
        return (math.inf, math.inf)

    def num(v: Any) -> float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else -math.inf

    return (num(seq), num(t))


async def _copies(store: Any, fallback: Path | None) -> tuple[str | None, str | None]:
    text = await store.get_meta(BOOK_KEY)
    local: str | None = None
    if fallback is not None:
        try:
            local = await asyncio.to_thread(fallback.read_text, encoding="utf-8")
        except FileNotFoundError:
            local = None
    return text, local


async def load_curtailments(ctrl: EdgeController, store: Any, fallback: Path | None = None) -> int:
    """Restore the curtailment book into ``ctrl``: the store's (``BOOK_KEY``) or, when it is
    newer (``seq``), the local copy a store outage left at ``fallback``. Call at start, before
    the first decision. Ended curtailments are not restored. Returns how many were."""
    text, local = await _copies(store, fallback)
    return _restore(ctrl, text, local, fallback)


def _restore(ctrl: EdgeController, text: str | None, local: str | None, fallback: Any) -> int:
    """``load_curtailments`` on the two copies already read (the store's, the local one)."""
    where = f"the store's meta key {BOOK_KEY!r}"
    if local and _copy_order(local) >= _copy_order(text):
        text, where = local, f"the local copy {str(fallback)!r}"
        log.warning("curtailment book restored from %s (newer than the store's)", fallback)
    if not text:
        return 0
    try:
        skipped = ctrl.curtailments.restore(text, ctrl.clock.now())
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # Fail closed (the edge does not start) with what to fix, not a bare JSON error.
        raise ValueError(
            f"{where} is not a curtailment book ({exc!r}): "
            f"fix it, or delete it to start with no stored "
            f"curtailments (those in force are lost until the grid operator sends them again)"
        ) from exc
    for what in skipped:
        log.warning("stored curtailment not restored: %s", what)
    if len(ctrl.curtailments):
        ctrl.notify("grid")
    return len(ctrl.curtailments)


def _book_text(ctrl: EdgeController, seq: int | None = None) -> str:
    ctrl.curtailments.prune(ctrl.clock.now())
    return ctrl.curtailments.snapshot(saved_at=ctrl.clock.now(), seq=seq)


# Local copies are written by worker threads: one at a time, and never one older (by ``seq``)
# than the one written last (a write whose task was cancelled goes on in its thread).
_LOCAL_WRITE = threading.Lock()
_LOCAL_SEQ: dict[Path, int] = {}


def _write_atomic(path: Path, text: str, seq: int) -> bool:
    """Write ``text`` to ``path`` (a private temporary file, fsync, rename, fsync of the
    directory); False when a copy with a later ``seq`` was written already."""
    with _LOCAL_WRITE:
        if _LOCAL_SEQ.get(path, -1) > seq:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        _LOCAL_SEQ[path] = seq
        return True


def _remove_local(path: Path) -> None:
    with _LOCAL_WRITE, contextlib.suppress(FileNotFoundError):
        path.unlink()


class BookWriter:
    """Keeps the stored curtailment book up to date without ever holding a signal back.

    A signal is applied to the in-memory book (the one decisions use) first; ``save`` then
    writes the whole book. A failed (or, past ``timeout_s``, hung) write is logged once per
    outage, counted (``failures``) and leaves the book ``dirty``; while ``failing`` the handlers
    do not wait on the store (``kick``: a retry beside them), and the next grid message, API post
    or ``run`` (every ``retry_s``) writes the whole book again until it succeeds. With
    ``fallback`` (a local file), what the store does not take is written there first (fsynced,
    renamed into place: ``keep_local``), and ``load`` restores whichever copy is newer: a restart
    during a store outage keeps what arrived in it. The file is removed once the store holds
    the book again. A tight curtailment is never delayed by the store."""

    def __init__(
        self,
        ctrl: EdgeController,
        store: Any,
        *,
        timeout_s: float = 2.0,
        retry_s: float = 2.0,
        fallback: Path | None = None,
    ) -> None:
        self.ctrl = ctrl
        self.store = store
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.fallback = fallback
        self.failures = 0
        self._warned = False
        self._lock = asyncio.Lock()
        self._local_lock = asyncio.Lock()
        self._retry: asyncio.Task[bool] | None = None
        # Changes seen (``kick``/``save``), the change the store holds, and the change the local
        # copy holds (-1: none).
        self._gen = 0
        self._stored_gen = 0
        self._local_gen = -1
        self._local_warned = False
        self._local_exists = False  # the local copy may be on disk (written or found at load)
        # ``seq`` of the last copy written (store or local), continued from the copies found at
        # ``load``: the newer copy is told by it, not by the wall clock (which can step back).
        self._seq = 0

    def _next_text(self) -> tuple[int, str]:
        self._seq += 1
        return self._seq, _book_text(self.ctrl, self._seq)

    @property
    def failing(self) -> bool:
        """The last write failed (an outage): the handlers do not wait on the store."""
        return self._warned

    @property
    def dirty(self) -> bool:
        """The store does not hold the book in force (a change not written yet, or a write in
        flight or failed)."""
        return self._stored_gen < self._gen

    @property
    def durable(self) -> bool:
        """A restart now would restore the book in force: the store holds it, or (in an
        outage) the local copy does."""
        return not self.dirty or self._local_gen >= self._gen

    async def load(self) -> int:
        """``load_curtailments`` from the store or the newer local copy; a book restored from
        the local copy is written to the store by the next retry."""
        text, local = await _copies(self.store, self.fallback)
        n = _restore(self.ctrl, text, local, self.fallback)
        seqs = [_copy_order(t)[0] for t in (text, local)]
        self._seq = max([self._seq, *(int(s) for s in seqs if math.isfinite(s))])
        if local is not None:
            self._local_exists = True
            self._gen += 1
            self._local_gen = self._gen
        return n

    def kick(self, *, changed: bool = True) -> None:
        """Mark the book dirty and retry the write in the background (one retry at a time);
        ``changed``: the book in memory changed since the last write."""
        if changed:
            self._gen += 1
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self.save(changed=False))

    async def aclose(self) -> None:
        if self._retry is not None and not self._retry.done():
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry

    async def keep_local(self) -> bool:
        """Write the book to the local fallback file now (fsynced); False when there is none or
        the write failed (logged once)."""
        if self.fallback is None:
            return False
        async with self._local_lock:
            gen = self._gen
            seq, text = self._next_text()
            try:
                # A cancel (shutdown) leaves the thread writing; ``_write_atomic`` keeps a later
                # write from being overwritten by it.
                await asyncio.to_thread(_write_atomic, self.fallback, text, seq)
            except OSError as exc:
                if not self._local_warned:
                    self._local_warned = True
                    log.warning(
                        "curtailment book: local copy %s not written (%r)", self.fallback, exc
                    )
                return False
            self._local_warned = False
            self._local_exists = True
            self._local_gen = max(self._local_gen, gen)
            return True

    async def _drop_local(self, gen: int) -> None:
        """The store holds the book of change ``gen``: the local copy is not needed unless a
        later change is only there."""
        if self.fallback is None or not self._local_exists:
            return
        async with self._local_lock:
            if self._gen == gen:
                await asyncio.to_thread(_remove_local, self.fallback)
                self._local_exists = False
                self._local_gen = -1

    async def save(self, *, changed: bool = True) -> bool:
        """Write the book now (serialised: the snapshot written last is the newest); returns
        whether the stored book is now the book in memory. In an outage the local copy is
        written first."""
        if changed:
            self._gen += 1
        async with self._lock:
            gen = self._gen
            if self._stored_gen >= gen:
                return True  # written by the call that held the lock, after this change
            if self._warned and self._local_gen < gen:
                await self.keep_local()
            try:
                _, text = self._next_text()
                await asyncio.wait_for(self.store.set_meta(BOOK_KEY, text), self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                if self._local_gen < gen:
                    await self.keep_local()
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "curtailment book not stored (%r): applied in memory%s; retrying every "
                        "%g s",
                        exc,
                        f", kept in {self.fallback}"
                        if self._local_gen >= gen
                        else ", not durable across a restart until the store takes it",
                        self.retry_s,
                    )
                return False
            self._stored_gen = max(self._stored_gen, gen)
            await self._drop_local(gen)
            if self._warned:
                self._warned = False
                log.warning("curtailment book stored again after %d failed write(s)", self.failures)
            return self._stored_gen >= self._gen

    async def save_if_dirty(self) -> bool:
        return await self.save(changed=False) if self.dirty else True

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
    ``cloud_plan_fresh_s``; so do building meter readings (``NodeLoadSample`` on
    ``node_load.<node>``): an old one would count for nothing."""
    subjects = Subjects(bus.site_id)
    if writer is None and store is not None:
        writer = BookWriter(ctrl, store)

    async def on_grid(msg: BusMessage) -> None:
        what = apply_grid_signal(ctrl, msg.data, redelivered=msg.delivery_count > 1)
        if writer is None:
            return
        if what in ("curtailment", "cancelled") and not writer.failing:
            await writer.save()  # stored before the ack (a failure is logged, never raised)
        elif what in ("curtailment", "cancelled"):
            # In an outage: never wait on the store (a retry beside the handler); the local
            # copy (fast, fsynced) is written before the ack.
            writer.kick()
            await writer.keep_local()
        elif writer.dirty:
            writer.kick(changed=False)

    async def on_plan(msg: BusMessage) -> None:
        plan = plan_from_proto(msg.data, ctrl.clock.now(), lambda cid: cid in ctrl.state.chargers)
        if plan.source == "cloud":
            ctrl.set_plan(plan)

    async def on_node_load(msg: BusMessage) -> None:
        apply_node_load(ctrl, msg.data)

    grid = (
        await bus.consume(subjects.grid, durable=grid_durable, handler=on_grid)
        if grid_durable is not None
        else await bus.subscribe(subjects.grid, on_grid)
    )
    # Meter readings stay live: an old one counts for nothing (it is stale).
    return [
        grid,
        await bus.subscribe(subjects.plan, on_plan),
        await bus.subscribe(subjects.node_load(), on_node_load),
    ]
