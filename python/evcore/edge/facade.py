"""``EdgeFacade``: what the edge API (``evcore.api``) reads and steers, over the running controller.

What this module owns: plain-data views of the controller's state (site, sessions, setpoints, node
caps, faults, recent decisions) and the operator's levers (availability, priority, departure, grid
signals). Every lever goes through the controller as an event, so the next decision — allocator and
envelope — applies it; nothing here sets a setpoint. Authentication and roles are the API's job.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

from evcore.api.facade import FacadeError, NotApplicable, UnknownTarget
from evcore.edge.controller import EdgeController, SentProfile
from evcore.edge.faults import is_suspect
from evcore.edge.grid import Curtailment, GridSignalError, PricePoint, UnknownNode
from evcore.edge.signals import BookWriter
from evcore.edge.state import priority_error

__all__ = ["AuditTee", "ControllerFacade", "FacadeError", "UnknownTarget"]


class ControllerFacade:
    """``evcore.api.facade.EdgeFacade`` over one ``EdgeController``."""

    def __init__(
        self,
        controller: EdgeController,
        *,
        site: Any = None,
        keep_decisions: int = 1000,
        book: BookWriter | None = None,
        store: Any = None,
    ) -> None:
        self.ctrl = controller
        self.site = site
        #: Where the chargers an operator made unavailable are kept across restarts (None: not).
        self.store = store
        self._availability_saves = asyncio.Lock()  # one at a time: the last one holds them all
        #: Writes the curtailment book to the edge's store after an API grid signal (None: none).
        self.book = book
        self._decisions: deque[dict[str, Any]] = deque(maxlen=keep_decisions)
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        #: Decision number -> the audit trail's decision id, for the recent decisions (a record
        #: is durable before anything of its decision is sent, so a setpoint finds its id here).
        self._decision_ids: dict[int, str] = {}
        self._keep_ids = max(1, keep_decisions)
        prev = controller.on_sent

        def _on_sent(sent: SentProfile) -> None:
            if prev is not None:
                prev(sent)
            self._broadcast(
                {
                    "kind": "setpoint",
                    "charger_id": sent.charger_id,
                    "purpose": sent.purpose,
                    "value": sent.value,
                    "decision": sent.decision,
                    **self._decision_id(sent.decision),
                }
            )

        controller.on_sent = _on_sent

    # ---- reads --------------------------------------------------------------------------------
    def site_state(self) -> dict[str, Any]:
        ctrl = self.ctrl
        now_w = ctrl.clock.now()
        return {
            "site_id": "" if self.site is None else str(self.site.id),
            "at": now_w,
            "policy": ctrl.cfg.policy,
            "decisions": ctrl.stats.decisions,
            "profiles_sent": ctrl.stats.profiles_sent,
            "curtailments_kw": ctrl.curtailments.caps_kw(now_w),
            "failsafe": dict(ctrl.failsafe),
            "chargers": [self.charger(cid) for cid in ctrl.state.chargers],
            # The chargers faulted now (``stats.faults_reported`` is every fault reported since
            # the start: one an operator cleared stayed listed, a repeat was listed again).
            "faults": [
                {"charger_id": c.charger_id, "reason": c.fault_reason}
                for c in ctrl.state.chargers.values()
                if c.faulted
            ],
        }

    def charger(self, charger_id: str) -> dict[str, Any]:
        c = self._get(charger_id)
        now_m = self.ctrl.clock.monotonic()
        return {
            "charger_id": c.charger_id,
            "ocpp_id": c.ocpp_id,
            "online": c.online,
            "status": c.status,
            "plugged": c.plugged,
            "available": c.available,
            "transaction_id": c.transaction_id,
            "unit": "W" if c.is_dc else "A",
            "setpoint": c.sent,
            "accepted": c.accepted,
            "tx_default": c.tx_default,
            "valid_to": c.expires_at,
            "measured_a": list(c.measured_a),
            "measured_w": c.measured_w,
            "measurement_age_s": None if c.measured_at is None else c.age_s(now_m),
            "suspect": is_suspect(c, now_m, self.ctrl.cfg),
            "faulted": c.faulted,
            "fault_reason": c.fault_reason,
        }

    def sessions(self) -> list[dict[str, Any]]:
        return [
            {
                "charger_id": c.charger_id,
                "transaction_id": c.transaction_id,
                "started_at": c.session_started_at,
                "energy_delivered_kwh": c.session_energy_wh / 1000.0,
                "energy_requested_kwh": c.energy_requested_kwh,
                "departure": c.departure,
                "priority": c.priority,
            }
            for c in self.ctrl.state.chargers.values()
            if c.transaction_id is not None
        ]

    def setpoints(self) -> list[dict[str, Any]]:
        return [
            {
                "charger_id": c.charger_id,
                "unit": "W" if c.is_dc else "A",
                "setpoint": c.sent,
                "accepted": c.accepted,
                "valid_to": c.expires_at,
                "failsafe": self.ctrl.failsafe.get(c.charger_id),
            }
            for c in self.ctrl.state.chargers.values()
        ]

    def node_utilisation(self) -> list[dict[str, Any]]:
        """Per node the line current from the latest measurements (stale ones included) and its
        limits; the kW cap is the lower of the site file's and a curtailment in force."""
        if self.site is None:
            return []
        import numpy as np

        st = self.ctrl.state
        terminal = np.zeros((len(self.site.chargers), 3))
        for i, spec in enumerate(self.site.chargers):
            c = st.chargers.get(spec.id)
            if c is not None:
                terminal[i] = [0.0 if v is None else float(v) for v in c.terminal_a]
        return utilisation_rows(
            self.site, terminal, self.ctrl.curtailments.caps_kw(self.ctrl.clock.now())
        )

    def recent_decisions(
        self, *, charger_id: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in reversed(self._decisions):
            if charger_id is None or any(s["charger_id"] == charger_id for s in d["setpoints"]):
                out.append(d)
                if len(out) >= limit:
                    break
        return out

    def record_decision(self, record: Mapping[str, Any]) -> None:
        """Called with every audit record the controller appends (see ``AuditTee``), once
        durable; its ``decision_id`` (when it has one: the audit trail's) names the decision on
        the watch, for this record's change and its setpoints' (else the counter does)."""
        self._decisions.append(dict(record))
        number, decision_id = record.get("decision"), record.get("decision_id")
        if isinstance(number, int) and decision_id:
            self._decision_ids[number] = str(decision_id)
            while len(self._decision_ids) > self._keep_ids:
                del self._decision_ids[next(iter(self._decision_ids))]
        self._broadcast({"kind": "decision", "decision": number, **self._decision_id(number)})

    def _decision_id(self, number: Any) -> dict[str, str]:
        """``{"decision_id": ...}`` of decision ``number`` when its audit id is known."""
        found = self._decision_ids.get(number) if isinstance(number, int) else None
        return {} if found is None else {"decision_id": found}

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """Changes as they happen (setpoints sent, decisions); ends when the consumer stops."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._watchers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._watchers.discard(q)

    def _broadcast(self, item: dict[str, Any]) -> None:
        for q in list(self._watchers):
            if q.full():
                # A slow watcher loses its oldest item, never stalls the loop.
                q.get_nowait()
            q.put_nowait(item)

    # ---- steering -----------------------------------------------------------------------------
    def set_availability(self, charger_id: str, available: bool) -> Awaitable[None] | None:
        """In force at once (the next decision holds the charger at 0 A or gives it back);
        with ``store``, answered once the store keeps it (``StoreUnavailable`` when it does
        not: the caller sets it again). Kept only in memory, a restart gave the charger back."""
        self._get(charger_id)
        self.ctrl.set_session(charger_id, available=available)
        if self.store is None:
            return None
        return self._save_unavailable()

    async def _save_unavailable(self) -> None:
        from evcore.edge.recording import save_unavailable

        async with self._availability_saves:
            await save_unavailable(self.store, self.ctrl.state)

    def clear_fault(self, charger_id: str, note: str = "") -> str:
        """Reset a fault the edge marked (operator); returns the reason it had been faulted."""
        self._get(charger_id)
        try:
            return self.ctrl.clear_fault(charger_id, note)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from exc

    def set_priority(
        self, charger_id: str, priority: float, *, transaction_id: str | None = None
    ) -> None:
        self._bound(charger_id, transaction_id)
        if (why := priority_error(priority)) is not None:
            raise FacadeError(f"{charger_id}: {why}")
        self.ctrl.set_session(charger_id, priority=priority)

    def set_departure(
        self,
        charger_id: str,
        departure: float,
        energy_requested_kwh: float | None = None,
        *,
        transaction_id: str | None = None,
    ) -> None:
        self._bound(charger_id, transaction_id)
        try:
            self.ctrl.set_session(
                charger_id, departure=departure, energy_requested_kwh=energy_requested_kwh
            )
        except ValueError as exc:
            raise FacadeError(str(exc)) from exc

    async def post_curtailment(
        self, signal_id: str, node_id: str, max_kw: float, start: float, end: float
    ) -> None:
        """Applied to the book at once, then the book is stored (``book``) before answering; a
        store that is down never refuses the signal (``curtailments_durable`` says so)."""
        try:
            self.ctrl.post_curtailment(Curtailment(signal_id, node_id, max_kw, start, end))
        except UnknownNode as exc:
            raise UnknownTarget(str(exc)) from exc
        except GridSignalError as exc:
            raise FacadeError(str(exc)) from exc
        await self._store_book()

    async def cancel_curtailment(self, signal_id: str) -> bool:
        found = self.ctrl.cancel_curtailment(signal_id)
        if found:
            await self._store_book()
        return found

    def curtailments_durable(self) -> bool | None:
        """Whether a restart now would restore the curtailment book in force: the store holds
        it, or in a store outage its local copy does (None: no store)."""
        return None if self.book is None else self.book.durable

    async def _store_book(self) -> None:
        if self.book is not None:
            if self.book.failing:
                # In an outage: answer once the local copy is written, the retry stores it.
                self.book.kick()
                await self.book.keep_local()
            else:
                await self.book.save()

    def post_prices(self, points: list[tuple[float, float]]) -> None:
        try:
            self.ctrl.post_prices([PricePoint(t, p) for t, p in points])
        except GridSignalError as exc:
            raise FacadeError(str(exc)) from exc

    def _bound(self, charger_id: str, transaction_id: str | None) -> Any:
        """The charger, checked (when ``transaction_id`` is given) to hold that session now, in
        the same step as the change that follows: the car it was meant for may have left, and
        the next one come, since the caller looked (``NotApplicable`` naming both)."""
        c = self._get(charger_id)
        if transaction_id is not None and c.transaction_id != transaction_id:
            now = (
                "no session is at the charger"
                if c.transaction_id is None
                else f"it now has transaction {c.transaction_id!r}"
            )
            raise NotApplicable(
                f"transaction {transaction_id!r} is no longer at charger {charger_id!r}: {now}"
            )
        return c

    def _get(self, charger_id: str) -> Any:
        c = self.ctrl.state.chargers.get(charger_id)
        if c is None:
            raise UnknownTarget(f"unknown charger_id {charger_id!r}")
        return c


class AuditTee:
    """Audit sink that appends to the durable log first, then shows the record to the facade."""

    def __init__(self, log: Any, facade: ControllerFacade) -> None:
        self._log = log
        self._facade = facade

    async def append(self, decision: Mapping[str, Any]) -> None:
        if self._log is not None:
            res = self._log.append(decision)
            if asyncio.iscoroutine(res) or isinstance(res, asyncio.Future):
                await res
        self._facade.record_decision(decision)


def utilisation_rows(
    site: Any, terminal_a: Any, caps_kw: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Per node of ``site``: the line current per phase from the chargers' terminal currents
    (``terminal_a``, one row of 3 per charger in the site's order), its phase limits, its power,
    and the lower of its power limit and a curtailment in force (``caps_kw``). One computation
    for the API's GetNodeUtilisation and the metrics endpoint."""
    import numpy as np

    from evcore.checker import node_phase_currents, node_power_kw

    terminal = np.asarray(terminal_a, dtype=np.float64)
    currents = np.asarray(node_phase_currents(site, terminal))
    power = np.asarray(node_power_kw(site, terminal))
    out: list[dict[str, Any]] = []
    for j, node in enumerate(site.nodes):
        limits = [x for x in (node.power_limit_kw, caps_kw.get(node.id)) if x is not None]
        out.append(
            {
                "node_id": node.id,
                "current_a": [float(x) for x in currents[j]],
                "phase_limit_a": list(node.phase_limit_a),
                "power_kw": float(power[j]),
                "power_limit_kw": min(limits) if limits else None,
            }
        )
    return out
