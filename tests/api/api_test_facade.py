"""The one fake the API tests use: an ``EdgeFacade`` over a real store with in-memory chargers.

Sessions and setpoints are read from the store; steering writes the store (sessions) or the
in-memory charger/grid state, and every change is offered to watchers, as the edge would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from evcore.api import FacadeError, NotApplicable, UnknownTarget
from evcore.clock import Clock
from evcore.store import SqlStore


class StoreFacade:
    def __init__(self, store: SqlStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.chargers: dict[str, dict[str, Any]] = {
            "C1": {
                "charger_id": "C1",
                "ocpp_id": "cp.1",
                "online": True,
                "status": "Charging",
                "plugged": True,
                "available": True,
                "unit": "A",
                "measured_a": [15.0, 15.5, 16.0],
            },
            "C2": {
                "charger_id": "C2",
                "ocpp_id": "cp.2",
                "online": True,
                "status": "Available",
                "plugged": False,
                "available": True,
                "unit": "A",
                "measured_a": [],
            },
            "DC1": {
                "charger_id": "DC1",
                "ocpp_id": "dc*1",
                "online": False,
                "status": "Charging",
                "plugged": True,
                "available": True,
                "unit": "W",
                "measured_w": 48_000.0,
            },
        }
        self.curtailments: dict[str, tuple[str, float, float, float]] = {}
        self.prices: list[tuple[float, float]] = []
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.broken = False

    def emit(self, item: dict[str, Any]) -> None:
        for q in list(self._watchers):
            q.put_nowait(item)

    # -- reads ----------------------------------------------------------------------------------
    async def site_state(self) -> Mapping[str, Any]:
        last = await self.store.last_setpoints()
        chargers = []
        for cid, c in sorted(self.chargers.items()):
            view = dict(c)
            rec = last.get(cid)
            if rec is not None:
                sp = rec.setpoint
                view["setpoint"] = sp.setpoint_w if sp.HasField("setpoint_w") else sp.setpoint_a
                view["accepted"] = rec.confirmed
            sessions = await self.store.list_open_sessions(cid)
            view["transaction_id"] = sessions[0].transaction_id if sessions else None
            chargers.append(view)
        now = self.clock.now()
        return {
            "at": now,
            "policy": "fair",
            "decisions": len(await self.store.audit_records()),
            "curtailments_kw": {
                node: kw
                for node, kw, start, end in self.curtailments.values()
                if start <= now < end
            },
            "failsafe": {"C1": 6.0, "C2": 0.0, "DC1": 0.0},
            "chargers": chargers,
            "faults": [],
        }

    async def sessions(self) -> Sequence[Mapping[str, Any]]:
        return [
            {
                "charger_id": s.charger_id,
                "transaction_id": s.transaction_id,
                "started_at": s.started_at_s,
                "energy_delivered_kwh": s.energy_delivered_kwh,
                "energy_requested_kwh": s.energy_requested_kwh,
                "departure": s.departure_s,
                "priority": s.priority,
            }
            for s in await self.store.list_open_sessions()
        ]

    async def setpoints(self) -> Sequence[Mapping[str, Any]]:
        out = []
        for cid, rec in (await self.store.last_setpoints()).items():
            w = rec.setpoint.HasField("setpoint_w")
            out.append(
                {
                    "charger_id": cid,
                    "unit": "W" if w else "A",
                    "setpoint": rec.setpoint.setpoint_w if w else rec.setpoint.setpoint_a,
                    "accepted": rec.confirmed,
                    "valid_to": rec.sent_at_s + 300,
                    "failsafe": 6.0 if not w else 0.0,
                }
            )
        return out

    def node_utilisation(self) -> Sequence[Mapping[str, Any]]:
        if self.broken:
            raise RuntimeError("node model not loaded")
        c1 = self.chargers["C1"]["measured_a"]
        return [
            {
                "node_id": "GRID",
                "current_a": list(c1),
                "phase_limit_a": [100.0] * 3,
                "power_kw": 59.0,
                "power_limit_kw": 60.0,
            },
            {"node_id": "F1", "current_a": list(c1), "phase_limit_a": [32.0, 32.0, 16.0]},
        ]

    def recent_decisions(
        self, *, charger_id: str | None = None, limit: int = 50
    ) -> Sequence[Mapping[str, Any]]:
        raise AssertionError("the API reads decisions from the store when it has one")

    async def watch(self) -> AsyncIterator[Mapping[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._watchers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._watchers.discard(q)

    # -- steering -------------------------------------------------------------------------------
    def _charger(self, charger_id: str) -> dict[str, Any]:
        if charger_id not in self.chargers:
            raise UnknownTarget(f"unknown charger_id {charger_id!r}")
        return self.chargers[charger_id]

    async def set_availability(self, charger_id: str, available: bool) -> None:
        self._charger(charger_id)["available"] = available

    async def clear_fault(self, charger_id: str, note: str) -> str:
        c = self._charger(charger_id)
        if not c.get("faulted"):
            raise NotApplicable(f"charger {charger_id!r} is not faulted")
        was = str(c.get("fault_reason") or "")
        c["faulted"], c["fault_reason"] = False, None
        return was

    async def _session(self, charger_id: str, transaction_id: str | None = None) -> Any:
        """The open session at ``charger_id``; when ``transaction_id`` is given, only if it is
        that one (read in the same step as the change that follows)."""
        self._charger(charger_id)
        open_ = await self.store.list_open_sessions(charger_id)
        if not open_:
            raise FacadeError(f"no session at {charger_id}")
        if transaction_id is not None and open_[0].transaction_id != transaction_id:
            raise NotApplicable(
                f"transaction {transaction_id!r} is no longer at charger {charger_id!r} (now "
                f"{open_[0].transaction_id!r})"
            )
        return open_[0]

    async def set_priority(
        self, charger_id: str, priority: float, *, transaction_id: str | None = None
    ) -> None:
        s = await self._session(charger_id, transaction_id)
        await self.store.upsert_session(
            replace(s, priority=priority, updated_at_s=self.clock.now())
        )

    async def set_departure(
        self,
        charger_id: str,
        departure: float,
        energy_requested_kwh: float | None = None,
        *,
        transaction_id: str | None = None,
    ) -> None:
        s = await self._session(charger_id, transaction_id)
        if departure <= s.started_at_s:
            raise FacadeError(f"departure for {charger_id} is before the session started")
        energy = s.energy_requested_kwh if energy_requested_kwh is None else energy_requested_kwh
        await self.store.upsert_session(
            replace(s, departure_s=departure, energy_requested_kwh=energy)
        )

    def post_curtailment(
        self, signal_id: str, node_id: str, max_kw: float, start: float, end: float
    ) -> None:
        if node_id not in ("GRID", "F1"):
            raise UnknownTarget(f"unknown node_id {node_id!r}")
        self.curtailments[signal_id] = (node_id, max_kw, start, end)

    def cancel_curtailment(self, signal_id: str) -> bool:
        return self.curtailments.pop(signal_id, None) is not None

    def post_prices(self, points: list[tuple[float, float]]) -> None:
        self.prices = list(points)
