"""A whole edge on loopback: controller + central system + simulated fleet + site physics.

What this module owns: starting and stopping, in one event loop, the real parts of a site for the
edge's tests and the control-loop benchmark — the OCPP central system on a real socket, the Rust
core, the controller, the OCPP room's simulated charge points (``evcore.sim.Fleet``) connecting over
real WebSockets, and ``SitePhysics`` counting violations. Nothing here decides a setpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from evcore.clock import Clock, WallClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController, SentProfile
from evcore.edge.coreio import RustCore
from evcore.edge.planning import LocalPlanner, PlannerSection
from evcore.edge.ports import AuditSink


class EdgeRig:
    def __init__(
        self,
        table: Mapping[str, Any],
        *,
        clock: Clock | None = None,
        cfg: EdgeConfig | None = None,
        audit: AuditSink | None = None,
        version: str = "1.6",
        apply_delay_s: float = 1.0,
        apply_delays_s: Mapping[str, float] | None = None,
        sample_interval_s: float = 1.0,
        sim_tick_s: float = 0.1,
        with_edge: bool = True,
        on_sent: Callable[[SentProfile], None] | None = None,
        url: str | None = None,
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        from evcore.site import load_site

        self.table = dict(table)
        self.site = load_site(self.table)
        self.clock = clock or WallClock()
        self.cfg = cfg if cfg is not None else EdgeConfig.from_site(self.table)
        self.audit = audit
        self.version = version
        self.apply_delay_s = apply_delay_s
        #: Per charger id: the apply delay of its station instead of ``apply_delay_s`` (a station
        #: slower than the others to apply what it accepted).
        self.apply_delays_s = dict(apply_delays_s or {})
        self.sample_interval_s = sample_interval_s
        self.sim_tick_s = sim_tick_s
        self.with_edge = with_edge
        self.url = url
        #: Called with the fleet before its stations connect (plant what a station holds).
        self.prepare = prepare
        self.sent: list[SentProfile] = []
        self._on_sent = on_sent
        self.central: Any = None
        self.controller: EdgeController | None = None
        self.core: RustCore | None = None
        self.fleet: Any = None
        self.physics: Any = None
        self._loop_task: asyncio.Task[None] | None = None
        self._plan_task: asyncio.Task[None] | None = None
        self.planner: LocalPlanner | None = None

    def _record_sent(self, sent: SentProfile) -> None:
        self.sent.append(sent)
        if self._on_sent is not None:
            self._on_sent(sent)

    async def start(self, *, connect_timeout_s: float = 30.0) -> None:
        from evcore.ocpp import CentralSystem
        from evcore.sim.fleet import Fleet
        from evcore.sim.physics import SitePhysics

        if self.with_edge:
            self.central = CentralSystem(self.site, clock=self.clock)
            self.core = RustCore(self.site, self.table, clock_offset_s=self.central.clock_offset_s)
            self.controller = build_controller(
                self.table,
                core=self.core,
                gateway=self.central,
                clock=self.clock,
                cfg=self.cfg,
                audit=self.audit,
                on_sent=self._record_sent,
                clock_offset_s=self.central.clock_offset_s,
            )
            self.central.add_listener(self.controller.on_event)
            await self.central.start()
            prefix = self.central.config.path_prefix
            self.url = f"ws://127.0.0.1:{self.central.port}{prefix}"
            self._loop_task = asyncio.create_task(self.controller.run(), name="edge-loop")
            self.planner = LocalPlanner(
                self.site, self.controller, PlannerSection.from_table(self.table.get("planner"))
            )
            self._plan_task = asyncio.create_task(self.planner.run(), name="edge-planner")
        assert self.url is not None, "EdgeRig without an edge needs url="
        self.fleet = Fleet(
            self.site,
            url=self.url,
            clock=self.clock,
            version=self.version,
            apply_delay_s=self.apply_delay_s,
            tick_s=self.sim_tick_s,
            sample_interval_s=self.sample_interval_s,
        )
        for cid, delay_s in self.apply_delays_s.items():
            self.fleet.station(cid)[0].apply_delay_s = delay_s
        self.physics = SitePhysics(self.site, self.fleet.terminal_currents, clock=self.clock)
        self.physics.start()
        if self.prepare is not None:
            self.prepare(self.fleet)
        await self.fleet.start()
        await self.fleet.wait_connected(connect_timeout_s)

    async def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        if self.planner is not None:
            self.planner.stop()
        if self._plan_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._plan_task, 15.0)
        if self._loop_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._loop_task, 5.0)
        if self.physics is not None:
            await self.physics.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        if self.central is not None:
            await self.central.stop()

    async def __aenter__(self) -> EdgeRig:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- helpers for tests and the benchmark ---------------------------------------------------
    async def wait_for(
        self, cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05
    ) -> None:
        deadline = self.clock.monotonic() + timeout_s
        while not cond():
            if self.clock.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(poll_s)

    def limit_at(self, charger_id: str) -> float:
        sim, evse = self.fleet.station(charger_id)
        return float(sim.limit_at(evse, self.clock.now()))

    def tx_default_at_failsafe(self) -> bool:
        """Every charger accepted a TxDefault at its failsafe level (as told on the wire: the
        central system rounds both down to the same resolution)."""
        ctrl = self.controller
        assert ctrl is not None
        # Levels sized with a charger at its maximum (one whose first TxDefault is not known
        # applied) are on their way up: not the failsafe levels yet.
        return ctrl.failsafe_is_plain() and all(
            c.tx_default is not None
            and abs(ctrl.wire(cid, c.tx_default) - ctrl.wire(cid, ctrl.failsafe[cid])) < 1e-9
            for cid, c in ctrl.state.chargers.items()
        )

    def failsafe_applied(self) -> bool:
        """Every simulated charger enforces its failsafe level, as told on the wire (the
        TxDefault at that level is in force: accepted is not applied, and a lower one applied
        before it is not the failsafe level either)."""
        ctrl = self.controller
        assert ctrl is not None
        return self.tx_default_at_failsafe() and all(
            abs(self.limit_at(cid) - ctrl.wire(cid, ctrl.failsafe[cid])) < 1e-6
            for cid in self.fleet.charger_ids
        )

    def defaults_held(self) -> bool:
        """Every simulated station enforces a TxDefaultProfile (also without an in-process edge)."""
        now = self.clock.now()
        return all(
            any(p.purpose == "default" and (p.received_at or 0.0) <= now for p in sim.profiles)
            for sim in self.fleet.stations.values()
        )
