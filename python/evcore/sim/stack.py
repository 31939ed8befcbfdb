"""The twin on the real stack: edge controller + Rust core + OCPP central system over loopback
WebSockets, against the simulated charge points and vehicles, all on the virtual clock.

Per policy this builds, in one event loop: ``EdgeApp`` (central system on an ephemeral loopback
port, the controller with ``RustCore``, the embedded default: no broker, no database), a ``Fleet``
of simulated stations (``evcore.sim.chargepoint``) that connect to it over WebSockets, and the
twin's meter. The scenario plugs vehicles in and out of the simulated stations and injects faults
into them; grid signals, prices and cloud plans go to the edge as ``evcore.v1`` protobuf over an
``InProcessBus`` that the edge subscribes to. For the planner
policies the edge runs its own local planner (``evcore.edge.planning``), and the twin stands for
the cloud: it runs the core planner (``evcore.planner``) every ``plan_interval_s`` and on
arrivals/departures, knowing the billed peak so far, and hands the edge a *cloud* plan, which wins
while fresh. ``cloud_down`` stops the cloud's plans (the edge falls back to its local plan);
``broker_down`` holds everything that crosses the broker (cloud plans, grid signals announced
``notice_min`` ahead) until it is back. The embedded default has no broker process to stop, so
the twin holds these messages itself.

The meter samples the stations' terminal currents at every physics step of the stations (their
state is constant in between), so counting the 100 ms samples of each step is exact. Time is the
``VirtualClock``: it jumps only once every socket, queue and task has gone quiet.

What this module must never do: send a profile itself (every limit leaves through the edge and the
central system), or read the wall clock for anything but the progress bar.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evcore.clock import sleep_or_wake
from evcore.sim.arrivals import Arrivals, generate
from evcore.sim.scenario import CONTROLLED_POLICIES, FaultSpec, Scenario, SessionSpec
from evcore.sim.twin import (
    Comparison,
    LineModel,
    Meter,
    PolicyResult,
    _busiest_charger,
    _progress_bar,
)
from evcore.sim.vclock import VirtualClock

log = logging.getLogger("evcore.sim")

# Faults the stack backend injects. ``broker_down`` and ``cloud_down`` act on the link between the
# twin's cloud side (grid signals, plans) and the edge: the embedded default has no broker process
# to stop, so the twin holds what would cross it.
STACK_FAULTS = frozenset(
    {
        "charger_offline",
        "meter_stuck",
        "profile_ignored",
        "profiles_lost_on_reboot",
        "broker_down",
        "cloud_down",
        "edge_restart",
    }
)
IN_LOOP = (
    "edge controller (evcore.edge: dispatch, failsafe, faults, grid signals)",
    "Rust allocator + envelope (evcore._core via edge RustCore)",
    "OCPP 1.6J central system over loopback WebSockets (evcore.ocpp)",
    "simulated charge points + EV models (evcore.sim.chargepoint/ev/fleet)",
)


def available() -> tuple[bool, str]:
    """Whether this build has every part the stack backend needs (and why not)."""
    try:
        import evcore.edge.app
        import evcore.ocpp
        import evcore.sim.fleet  # noqa: F401
        from evcore.site import load_site  # noqa: F401
    except ImportError as e:
        return False, str(e)
    return True, ""


def edge_table(sc: Scenario, policy: str) -> dict[str, Any]:
    """The site file the twin's edge runs with: the scenario's site plus twin defaults for
    ``[ocpp]`` (loopback, ephemeral port, no auth on the closed loop) and ``[edge]``."""
    table: dict[str, Any] = copy.deepcopy(dict(sc.site.raw))
    ocpp = dict(table.get("ocpp", {}))
    ocpp.update(
        {
            "host": "127.0.0.1",
            "port": 0,
            "security_profile": 0,
            "sample_interval_s": max(1, round(sc.meter_interval_s)),
        }
    )
    table["ocpp"] = ocpp
    edge: dict[str, Any] = {
        "tick_s": sc.control_interval_s,
        "stale_after_s": max(30.0, 2.5 * sc.meter_interval_s),
        "failsafe_after_s": 600.0,
        "refresh_lead_s": 60.0,
        # The twin's planner stands for the cloud and plans every plan_interval_s: one late plan
        # must not drop the edge to the allocator alone.
        "cloud_plan_fresh_s": 2.0 * sc.plan_interval_s,
        # The edge's own planner solves in a worker thread; the virtual clock waits for it, so a
        # generous budget costs nothing in simulated time, and a plan cut short by a busy machine
        # would make the run depend on the machine.
        "plan_budget_s": 10.0,
        "settle_s": sc.settle_s,
    }
    edge.update(sc.edge)
    # "uncontrolled" is the twin's baseline, not a site policy: EdgeConfig.baseline (stack.run).
    edge["policy"] = "fair_share" if policy == "uncontrolled" else policy
    table["edge"] = edge
    # The twin runs the edge alone on loopback: no broker, database, API, metrics port (two
    # policies run at once with --jobs 2 would both bind it) or upload to a real cloud.
    for k in ("bus", "store", "api", "metrics", "cloud"):
        table.pop(k, None)
    return table


class StackRun:
    """One policy on the real stack (see the module docstring)."""

    def __init__(
        self,
        sc: Scenario,
        policy: str,
        arr: Arrivals,
        *,
        progress: Callable[[float], None] | None = None,
        series_points: int = 600,
        probes: Sequence[tuple[float, Callable[[StackRun], None]]] = (),
    ) -> None:
        """``probes``: (seconds after the start, callback) pairs called with this run at those
        simulated instants (for tests and tools)."""
        self.sc = sc
        self.probes = sorted(probes, key=lambda p: p[0])
        self.policy = policy
        self.arr = arr
        self.progress = progress
        self.clock = VirtualClock(sc.start)
        self.lines = LineModel(sc.site)
        self.tmap = self.lines.terminal_map()
        self.meter = Meter(sc, self.lines, max(sc.duration_s / series_points, 1.0))
        self.chosen = sc.report_charger or _busiest_charger(arr, sc.site)
        self.cids = [c.id for c in sc.site.chargers]
        self.chosen_k = self.cids.index(self.chosen)
        self.delivered: dict[str, float] = {}
        self.plugged: dict[str, tuple[SessionSpec, Any, float]] = {}
        self.faults_injected: list[str] = []
        self.not_wired = sorted({f.kind for f in sc.faults if f.kind not in STACK_FAULTS})
        self.notes: list[str] = []
        self.plans = 0
        self.plan_failures = 0
        self.plan_statuses: dict[str, int] = {}
        self._app: Any = None
        # The cloud side: outages in force, and what reached the edge when (s after the start).
        self.down: dict[str, int] = {"broker_down": 0, "cloud_down": 0}
        # Charger faults in force, by (kind, charger).
        self._faults_held: dict[tuple[str, str], int] = {}
        self.plan_log: list[float] = []
        self.signal_log: list[tuple[float, str]] = []
        self.plans_held = 0
        self._signals_delivered: list[Any] = []
        self._restart_subs: list[Any] = []
        self._bus: Any = None
        self._dc: set[str] = set()
        # Session id -> the metered energy told the edge when its DC battery reached its target.
        self._request_done: dict[str, float] = {}
        self._triggers: list[asyncio.Future[Any]] = []
        self._fleet: Any = None
        # The site meter: the instant (s after the start) recorded to, and the state held since.
        self._meter_t = 0.0
        self._meter_state: Any = None

    # -- the scenario's actions ------------------------------------------------------------------
    def _ev(self, s: SessionSpec) -> Any:
        from evcore.sim.ev import EV

        v = s.vehicle
        target = min(1.0, s.soc_arrival + s.energy_kwh / v.battery_kwh)
        return EV(
            capacity_kwh=v.battery_kwh,
            soc=s.soc_arrival,
            onboard_limit_a=v.max_a,
            phases=v.phases,
            target_soc=target,
            max_dc_power_w=v.max_dc_kw * 1000.0,
        )

    def _metered_request_kwh(self, s: SessionSpec) -> float:
        """The session's energy as the edge tracks it: the energy into the car, what a driver's
        app asks for. The edge counts a session by the charger's outlet register, which on a DC
        charger counts the energy into the car (its AC input, auxiliary load included, is the
        Inlet register: grid side). Before the central system read the register's location, the
        simulated DC register counted AC input and the request was over-asked to match (energy
        over the efficiency plus the auxiliary load over the whole stay); asked for the battery's
        energy then, all 24 depot buses left short."""
        done = self._request_done.get(s.id)
        return s.energy_kwh if done is None else done

    def _report_batteries_full(self) -> None:
        """A DC car whose battery reached its target: what the driver's app tells the edge then,
        the session's energy as metered so far (the battery may stop a hair short of the request
        as it tapers near full). An AC car's battery takes what the meter counts, so its request
        is met on the meter as the battery reaches its target."""
        for cid, (s, ev, _) in self.plugged.items():
            if cid not in self._dc or s.id in self._request_done or not ev.full:
                continue
            c = self._fleet.connector(cid)
            metered_kwh = max(0.0, c.register_wh - c.tx_start_register_wh) / 1000.0
            self._request_done[s.id] = metered_kwh
            self._app.controller.set_session(cid, energy_requested_kwh=metered_kwh)

    def _delivered_kwh(self, s: SessionSpec, ev: Any) -> float:
        return float(min(s.energy_kwh, max(0.0, (ev.soc - s.soc_arrival) * ev.capacity_kwh)))

    async def _sessions(self) -> None:
        events: list[tuple[float, int, str, SessionSpec]] = []
        for s in self.arr.sessions:
            events.append((s.arrival_s, 1, "arrive", s))
            events.append((s.departure_s, 0, "depart", s))
        events.sort(key=lambda e: (e[0], e[1]))
        ctrl = self._app.controller
        for at, _, kind, s in events:
            await self._sleep_until(at)
            if kind == "arrive":
                ev = self._ev(s)
                self._fleet.plug_in(s.charger_id, ev, id_tag=f"twin-{s.id}")
                self.plugged[s.charger_id] = (s, ev, at)
                # What a driver's app (or ISO 15118 / NotifyEVChargingNeeds) tells the edge.
                ctrl.set_session(
                    s.charger_id,
                    energy_requested_kwh=self._metered_request_kwh(s),
                    departure=self.sc.start + s.departure_s,
                )
                self._replan.set()
            else:
                self._meter_to_now()  # the load held until now, not until the next step
                got = self.plugged.pop(s.charger_id, None)
                self._fleet.unplug(s.charger_id)  # counts the car's energy up to now
                if got is not None:
                    self.delivered[s.id] = self._delivered_kwh(s, got[1])
                self._meter_state = self._sample_state()
                self._replan.set()

    async def _sleep_until(self, t_s: float) -> None:
        wait = self.sc.start + t_s - self.clock.now()
        if wait > 0:
            await self.clock.sleep(wait)

    async def _faults(self) -> None:
        evs: list[tuple[float, bool, FaultSpec]] = []
        for f in self.sc.faults:
            if f.kind not in STACK_FAULTS:
                continue
            evs.append((f.at_s, True, f))
            if f.duration_s > 0:
                evs.append((f.at_s + f.duration_s, False, f))
        evs.sort(key=lambda e: (e[0], not e[1]))
        for at, on, f in evs:
            await self._sleep_until(at)
            await self._fault(on, f)

    async def _fault(self, on: bool, f: FaultSpec) -> None:
        if on:
            self.faults_injected.append(f"{f.kind}@{f.at_s / 3600:.2f}h")
        if f.kind == "edge_restart":
            if on:
                await self._restart_edge()
            return
        if f.kind in ("broker_down", "cloud_down"):
            self.down[f.kind] += 1 if on else -1
            if not on and not self._link_down():
                self._link_up.set()
                self._replan.set()  # the cloud plans at once when it can reach the edge again
            return
        assert f.charger is not None
        sim, _ = self._fleet.station(f.charger)
        # Faults of one kind on one charger may touch or overlap: it misbehaves until the last
        # ends (the first one's end turned the station's flag off while another held it).
        key = (f.kind, f.charger)
        held = self._faults_held.get(key, 0) + (1 if on else -1)
        self._faults_held[key] = held
        if f.kind == "charger_offline" and on:
            await sim.go_offline(max(f.duration_s, 1.0))
        elif f.kind == "meter_stuck":
            # The station stops sending meter values (the edge sees them go stale).
            sim.misbehaviour.stop_reporting = held > 0
        elif f.kind == "profile_ignored":
            sim.misbehaviour.ignore_profiles = held > 0
        elif f.kind == "profiles_lost_on_reboot" and on:
            sim.misbehaviour.lose_profiles_on_reboot = True
            await sim.reboot()

    async def _restart_edge(self) -> None:
        """The edge process restarts: a new controller with empty state takes over the same
        central system; every station is asked to report its status and meter values again."""
        from evcore.edge.app import build_controller

        app = self._app
        old = app.controller
        old.stop()
        app.central.remove_listener(old.on_event)
        new = build_controller(
            app.site_table, core=app.core, gateway=app.central, clock=self.clock, cfg=old.cfg
        )
        # Open transactions come back from the central system's store in a real restart; the
        # embedded default has none, so the twin hands the new controller the central's own.
        from evcore.ocpp.events import TransactionEvent

        for st in app.central._stations.values():
            for tx in st.transactions.values():
                if tx.ended or tx.charger_id is None:
                    continue
                if st.active_tx.get(tx.evse_id) != tx.transaction_id:
                    continue
                new.on_event(
                    TransactionEvent(
                        charger_id=tx.charger_id,
                        ocpp_id=st.ocpp_id,
                        transaction_id=tx.transaction_id,
                        kind="started",
                        at=self.clock.now(),
                        id_tag=tx.id_tag,
                        meter_start_wh=tx.meter_start_wh,
                        meter_now_wh=tx.last_register_wh,
                        session_energy_wh=tx.session_energy_wh(),
                    )
                )
        for cid, (s, _, _) in self.plugged.items():
            # Session demand comes back from the store / the drivers' apps in a real restart. A
            # departure not after now is refused on a running session (7ae297a): a car still
            # plugged in at its departure (a restart at that instant) keeps its energy only.
            departure = self.sc.start + s.departure_s
            new.set_session(
                cid,
                energy_requested_kwh=self._metered_request_kwh(s),
                departure=departure if departure > self.clock.now() else None,
            )
        for c in self._signals_delivered:
            new.post_curtailment(self._curtailment(c))
        new.post_prices(self._prices())
        app.controller = new
        app.central.add_listener(new.on_event)
        if app.bus is not None:
            from evcore.edge.signals import subscribe_signals

            self._restart_subs.extend(await subscribe_signals(app.bus, new))
        self._edge_task = asyncio.ensure_future(new.run())
        old_planner = getattr(app, "planner", None)
        if old_planner is not None:
            from evcore.edge.planning import LocalPlanner, PlannerSection

            old_planner.stop()
            app.planner = LocalPlanner(
                app.site, new, PlannerSection.from_table(app.site_table.get("planner"))
            )
            self._edge_planner_task = asyncio.ensure_future(app.planner.run())
        for ocpp_id in list(self._fleet.stations):
            for msg in ("StatusNotification", "MeterValues"):
                self._triggers.append(
                    asyncio.ensure_future(app.central.trigger_message(ocpp_id, msg))
                )

    async def _probe(self) -> None:
        for at, fn in self.probes:
            await self._sleep_until(at)
            fn(self)

    def _link_down(self) -> bool:
        return any(self.down.values())

    async def _signals(self) -> None:
        """The grid operator's signals reach the edge ``notice_s`` before they start; over the
        broker, so while it is down they wait (and may arrive late)."""
        for g in sorted(self.sc.grid_signals, key=lambda g: (g.start_s - g.notice_s, g.start_s)):
            await self._sleep_until(max(0.0, g.start_s - g.notice_s))
            while self.down["broker_down"]:
                self._link_up.clear()
                await self._link_up.wait()
            await self._publish_grid(g)
            self._signals_delivered.append(g)
            self.signal_log.append((self.clock.now() - self.sc.start, f"{g.node}@{g.start_s:.0f}"))

    async def _building_meter(self) -> None:
        """Every ``building_meter_s`` each node's non-charger load as the twin draws it, over the
        broker (none while it is down: once the last reading is stale the edge counts the
        node's maximum)."""
        from evcore.v1 import meter_pb2

        every = self.sc.building_meter_s
        lines = self.lines
        metered = [
            (nid, [float(a) for a in lines.other_a[i]])
            for i, nid in enumerate(lines.node_ids)
            if float(np.max(lines.other_a[i])) > 0.0
        ]
        t = 0.0
        while metered and t < self.sc.duration_s:
            await self._sleep_until(t)
            if not self.down["broker_down"]:
                for nid, amps in metered:
                    msg = meter_pb2.NodeLoadSample(node_id=nid, current_a=amps)
                    msg.sampled_at.FromNanoseconds(int(self.clock.now() * 1e9))
                    await self._bus.publish(self._bus.subjects.node_load(nid), msg)
            t += every

    # -- the bus: what the grid operator and the cloud send the edge -----------------------------
    async def _publish_grid(self, g: Any) -> None:
        from evcore.v1 import grid_pb2

        sig = grid_pb2.GridSignal(signal_id=f"{g.node}@{g.start_s:.0f}")
        sig.issued_at.FromNanoseconds(int(self.clock.now() * 1e9))
        c = sig.curtailment
        c.curtailment_id = sig.signal_id
        c.node_id = g.node
        c.max_kw = g.limit_kw
        c.start.FromNanoseconds(int((self.sc.start + g.start_s) * 1e9))
        c.end.FromNanoseconds(int((self.sc.start + g.end_s) * 1e9))
        c.issuer = "twin"
        await self._bus.publish(self._bus.subjects.grid, sig)

    async def _publish_prices(self) -> None:
        from evcore.v1 import grid_pb2

        sig = grid_pb2.GridSignal(signal_id="tariff")
        sig.issued_at.FromNanoseconds(int(self.clock.now() * 1e9))
        tariff = sig.price_update.tariff
        tariff.tariff_id = "twin"
        tariff.currency = self.sc.tariff.currency
        points = self._prices()
        end = self.sc.start + self.sc.duration_s + self.sc.plan_horizon_h * 3600.0
        for p, nxt in zip(points, [q.start for q in points[1:]] + [end], strict=True):
            iv = tariff.prices.add()
            iv.start.FromNanoseconds(int(p.start * 1e9))
            iv.duration_s = nxt - p.start  # until the next change
            iv.price_per_kwh = p.price_per_kwh
        sig.price_update.issuer = "twin"
        await self._bus.publish(self._bus.subjects.grid, sig)

    async def _publish_plan(self, plan: Any) -> None:
        from evcore.v1 import plan_pb2

        msg = plan_pb2.Plan(
            plan_id="twin-cloud", plan_version=self.plans, source="cloud", solver_status="ok"
        )
        msg.computed_at.FromNanoseconds(int(self.clock.now() * 1e9))
        for cid, steps in sorted(plan.rows.items()):
            dc = cid in self._dc
            for start, step_s, target in steps:
                row = msg.rows.add(session_id=cid, charger_id=cid, step_s=step_s)
                row.step_start.FromNanoseconds(round(start * 1e9))
                if dc:
                    row.target_w = target
                else:
                    row.target_a = target
        await self._bus.publish(self._bus.subjects.plan, msg)

    def _curtailment(self, g: Any) -> Any:
        from evcore.edge.grid import Curtailment

        return Curtailment(
            signal_id=f"{g.node}@{g.start_s:.0f}",
            node_id=g.node,
            max_kw=g.limit_kw,
            start=self.sc.start + g.start_s,
            end=self.sc.start + g.end_s,
        )

    def _prices(self) -> list[Any]:
        """The tariff as price points at the instants it changes, from the start to the end of
        the run plus the plan horizon (what a planner at the end may look at). Sampled on a
        15-minute grid from the start, a change at 12:07 (or on the hour, with a start at 12:05)
        reached the edge up to 15 minutes late, and a shorter period between two grid points
        not at all."""
        from evcore.edge.grid import PricePoint

        end = self.sc.start + self.sc.duration_s + self.sc.plan_horizon_h * 3600.0
        return [PricePoint(t, price) for t, price in self.sc.tariff.changes(self.sc.start, end)]

    # -- planning (when the edge does not plan by itself) ---------------------------------------
    async def _planner(self) -> None:
        from evcore.sim import twinplan

        planner = twinplan.TwinPlanner(self.sc, self.policy)
        next_plan = 0.0
        while True:
            now = self.clock.now() - self.sc.start
            if (now >= next_plan or self._replan.is_set()) and self._link_down():
                # Cloud down: no plan is made; broker down: none reaches the edge. The edge keeps
                # a plan while it is fresh, then the allocator runs alone.
                self._replan.clear()
                self.plans_held += 1
                next_plan = now + self.sc.plan_interval_s
            elif now >= next_plan or self._replan.is_set():
                self._replan.clear()
                try:
                    floor_kw, window_kwh = self._metered_peak()
                    plan = planner.plan(
                        self.clock.now(),
                        self._app.controller.state,
                        peak_floor_kw=floor_kw,
                        window_energy_kwh=window_kwh,
                        mono_now=self.clock.monotonic(),
                        edge_site=self._app.site,
                        failsafe=self._app.controller.failsafe,
                    )
                except Exception as e:  # a planner error: the allocator runs alone (edge rule)
                    log.exception("twin planner failed")
                    planner.last_status = f"error: {type(e).__name__}: {e}"[:120]
                    plan = None
                if plan is not None:
                    self.plans += 1
                    self.plan_log.append(now)
                    await self._publish_plan(plan)
                elif planner.last_status != "no_sessions":
                    self.plans += 1
                    self.plan_failures += 1
                    self.plan_statuses[planner.last_status] = (
                        self.plan_statuses.get(planner.last_status, 0) + 1
                    )
                next_plan = now + self.sc.plan_interval_s
            await sleep_or_wake(self.clock, max(next_plan - now, 1.0), self._replan)

    def _metered_peak(self) -> tuple[float, float]:
        """What the site meter says for the planner, chargers only (the building's load is
        subtracted): the billed peak so far, and the energy in the current demand window."""
        m = self.meter
        other_kw = float(self.lines.other_acc_kw[self.lines.root])
        now = self.clock.now()
        w = int(now // m.window_s)
        elapsed_h = (now - max(w * m.window_s, self.sc.start)) / 3600.0
        window_kwh = m.window_kwh.get(w, 0.0) - other_kw * elapsed_h
        return max(0.0, m.demand_peak_kw() - other_kw), max(0.0, window_kwh)

    # -- the meter ---------------------------------------------------------------------------------
    def _sample_state(self) -> tuple[Any, Any, float, list[float], list[float]]:
        fleet = self._fleet
        n = len(self.cids)
        term = np.zeros((n, 3))
        power_kw = np.zeros(n)
        offered = [0.0] * n
        measured = [0.0] * n
        for k, cid in enumerate(self.cids):
            c = fleet.connector(cid)
            term[k] = c.terminal_a
            power_kw[k] = c.power_w / 1000.0
            offered[k] = float(c.offered)
            measured[k] = float(c.power_w if c.kind == "dc" else c.terminal_a[0])
        cur = self.lines.evaluate_terminals(term, self.tmap)
        kw = self.lines.membership @ power_kw + self.lines.other_acc_kw
        return cur, kw, float(power_kw.sum()), offered, measured

    def _limits_kw(self, t: float) -> Any:
        lim = self.lines.power_limit_kw.copy()
        for g in self.sc.grid_signals:
            if g.start_s <= t < g.end_s:
                i = self.lines.node_ids.index(g.node)
                lim[i] = min(lim[i], g.limit_kw)
        return lim

    def _meter_to_now(self) -> None:
        """Record [last metered instant, now) with the state held over it, and take the state
        again: at every physics step, and before a car leaves between two steps (its load ends
        then, not at the next step: the meter priced up to a step of load nobody drew)."""
        if self._meter_state is None:
            return  # the meter has not started
        t = min(self.clock.now() - self.sc.start, self.sc.duration_s)
        t_prev = self._meter_t
        if t > t_prev:
            cur, kw, charger_kw, _, _ = self._meter_state
            # A grid signal that starts or ends inside the interval splits it: its kW cap counts
            # from its own instant (taken at the step's start for the whole step, the samples of
            # a curtailment's first seconds were lost and those after its end counted).
            edges = sorted(
                {e for g in self.sc.grid_signals for e in (g.start_s, g.end_s) if t_prev < e < t}
            )
            for a, b in zip([t_prev, *edges], [*edges, t], strict=True):
                self.meter.interval(
                    a, b, np.zeros(0), self._limits_kw(a), charger_kw, node_currents=(cur, kw)
                )
            self._meter_t = t
        self._meter_state = self._sample_state()

    async def _metering(self, step_s: float) -> None:
        end = self.sc.duration_s
        self._meter_t = 0.0
        self._meter_state = self._sample_state()
        sample_every = max(end / 200.0, step_s)
        next_sample = 0.0
        t_step = 0.0
        while t_step < end - 1e-9:
            t_prev = t_step
            await self._sleep_until(min(t_step + step_s, end))
            t_step = self.clock.now() - self.sc.start
            _, _, _, offered, measured = self._meter_state
            self._meter_to_now()
            if t_prev >= next_sample:
                s = self.meter.series
                for _cid, (sess, ev, _) in self.plugged.items():
                    s.soc.setdefault(sess.id, []).append((t_prev, float(ev.soc)))
                s.chosen_t.append(t_prev)
                s.chosen_setpoint.append(offered[self.chosen_k])
                s.chosen_measured.append(measured[self.chosen_k])
                next_sample += sample_every
                if self.progress is not None:
                    self.progress(t_prev / end)
            self._report_batteries_full()

    # -- one run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        from evcore.edge.app import EdgeApp
        from evcore.edge.config import EdgeConfig
        from evcore.sim.fleet import Fleet
        from evcore.site import load_site

        loop = asyncio.get_running_loop()
        self.clock.install_executor(loop, inline=True)
        table = edge_table(self.sc, self.policy)
        site = load_site(table)
        cfg = EdgeConfig.from_site(table)
        if self.policy == "uncontrolled":
            cfg = dataclasses.replace(cfg, baseline=True)
        from evcore.bus.inprocess import InProcessBus

        self._bus = InProcessBus(str(table["site"]["id"]), clock=self.clock)
        self._dc = {c.id for c in self.sc.site.chargers if c.kind == "dc"}
        app = EdgeApp(site, table, clock=self.clock, cfg=cfg, bus=self._bus)
        self._app = app
        self._replan = asyncio.Event()
        app_task = asyncio.ensure_future(app.run())
        await asyncio.wait_for(app.ready.wait(), 30.0)
        self._link_up = asyncio.Event()
        await self._publish_prices()
        port = app.central.port
        step_s = self.sc.physics_step_s
        fleet = Fleet(
            site,
            url=f"ws://127.0.0.1:{port}/ocpp",
            clock=self.clock,
            version="1.6",
            apply_delay_s=self.sc.profile_delay_s,
            tick_s=step_s,
            sample_interval_s=self.sc.meter_interval_s,
            reconnect_delay_s=5.0,
        )
        self._fleet = fleet
        await fleet.start()
        await fleet.wait_connected(30.0)
        await self.clock.drain()
        tasks = [
            asyncio.ensure_future(self._sessions()),
            asyncio.ensure_future(self._faults()),
            asyncio.ensure_future(self._metering(step_s)),
            asyncio.ensure_future(self._signals()),
            asyncio.ensure_future(self._probe()),
        ]
        if self.sc.building_meter_s > 0:
            tasks.append(asyncio.ensure_future(self._building_meter()))
        if self.policy in ("planner_cost", "planner_peak"):
            tasks.append(asyncio.ensure_future(self._planner()))
        try:
            await self.clock.run_until(self.sc.start + self.sc.duration_s)
            await tasks[2]
            for t in tasks:
                # A twin task that died would leave the run quietly wrong: fail it instead.
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise RuntimeError(f"twin task failed: {t.exception()!r}") from t.exception()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for cid, (s, ev, _) in list(self.plugged.items()):
                self.delivered[s.id] = self._delivered_kwh(s, ev)
                del self.plugged[cid]
            await fleet.stop()
            for sub in self._restart_subs:
                await sub.stop()
            app.stop()
            edge_task = getattr(self, "_edge_task", None)
            if edge_task is not None:
                app.controller.stop()
                app.planner.stop()
                restarted = [edge_task, getattr(self, "_edge_planner_task", edge_task)]
                for _ in range(3600):
                    if all(t.done() for t in restarted):
                        break
                    await self.clock.advance(1.0)
                await asyncio.gather(*restarted, return_exceptions=True)
            # Shutting down may wait on the virtual clock (a planner between two solves): keep
            # simulated time moving until the edge has stopped.
            for _ in range(3600):
                if app_task.done():
                    break
                await self.clock.advance(1.0)
            await asyncio.wait_for(asyncio.gather(app_task, return_exceptions=True), 30.0)

    def result(self, wall_s: float) -> PolicyResult:
        in_loop: tuple[str, ...] = IN_LOOP
        if self.policy == "uncontrolled":
            in_loop = (
                "uncontrolled: the edge sends nothing; OCPP + simulated charge points in the loop",
            )
        elif self.policy.startswith("planner"):
            in_loop = (
                *IN_LOOP,
                "Rust planner (evcore.planner, Clarabel): the edge's local planner, and the twin's "
                "cloud planner whose plan wins while fresh",
            )
        ctrl = self._app.controller if self._app is not None else None
        sent = int(getattr(getattr(ctrl, "stats", None), "profiles_sent", 0))
        return self.meter.result(
            self.arr,
            self.delivered,
            policy=self.policy,
            backend="stack",
            in_loop=in_loop,
            setpoints_sent=sent,
            faults_injected=self.faults_injected,
            faults_not_wired=self.not_wired,
            wall_s=wall_s,
        )


def run_stack_policy(
    sc: Scenario, policy: str, arr: Arrivals, *, progress: bool = False, lines_only: bool = False
) -> tuple[PolicyResult, list[str]]:
    wall0 = time.monotonic()
    bar = _progress_bar(policy, progress, lines_only=lines_only)
    run = StackRun(sc, policy, arr, progress=bar)
    asyncio.run(run.run())
    if bar is not None:
        bar(1.0)
    return run.result(time.monotonic() - wall0), _plan_notes(run)


_SHARED_PROGRESS: Any = None  # a multiprocessing Array of per-policy fractions, set per pool


def _init_worker(shared: Any) -> None:
    global _SHARED_PROGRESS
    _SHARED_PROGRESS = shared
    logging.getLogger("evcore").setLevel(logging.ERROR)


def _run_one(args: tuple[Scenario, str, Arrivals, bool, int]) -> tuple[PolicyResult, list[str]]:
    sc, policy, arr, progress, slot = args
    shared = _SHARED_PROGRESS
    if not progress or shared is None:
        return run_stack_policy(sc, policy, arr, progress=False)
    wall0 = time.monotonic()

    def report(frac: float) -> None:
        shared[slot] = frac

    run = StackRun(sc, policy, arr, progress=report)
    asyncio.run(run.run())
    shared[slot] = 1.0
    return run.result(time.monotonic() - wall0), _plan_notes(run)


def _plan_notes(run: StackRun) -> list[str]:
    notes = list(run.notes)
    if run.plan_failures:
        notes.append(
            f"{run.policy}: {run.plan_failures} of {run.plans} plans not usable "
            f"({', '.join(f'{k} x{v}' for k, v in sorted(run.plan_statuses.items()))}); "
            "the allocator ran alone until the next plan"
        )
    return notes


def _draw_progress(policies: Sequence[str], shared: Any, done: Any) -> None:
    """One line on stderr for policies running in parallel (wall time for the bar only)."""
    import sys

    wall0 = time.monotonic()
    tty = sys.stderr.isatty()
    reported: set[int] = set()
    while True:
        finished = done.wait(0.5)
        fracs = [float(shared[i]) for i in range(len(policies))]
        if tty:
            parts = " ".join(
                f"{p} {int(f * 100):3d}%" for p, f in zip(policies, fracs, strict=True)
            )
            sys.stderr.write(f"\r{parts}  {time.monotonic() - wall0:5.1f}s")
            sys.stderr.flush()
        else:
            for i, f in enumerate(fracs):
                if f >= 1.0 and i not in reported:
                    reported.add(i)
                    sys.stderr.write(
                        f"{policies[i]:<14} done at {time.monotonic() - wall0:5.1f}s\n"
                    )
        if finished:
            if tty:
                sys.stderr.write("\n")
            return


def compare_stack(
    sc: Scenario, *, seed: int | None = None, progress: bool = False, jobs: int = 1
) -> Comparison:
    """Every policy of ``sc`` on the stack; ``jobs`` > 1 runs policies in parallel processes
    (each has its own event loop and virtual clock, so results do not depend on ``jobs``)."""
    ok, why = available()
    if not ok:
        raise ImportError(why)
    s = sc.seed if seed is None else seed
    arr = generate(sc, s)
    results: list[PolicyResult] = []
    notes: list[str] = []
    if jobs > 1 and len(sc.policies) > 1:
        import concurrent.futures
        import multiprocessing
        import threading

        ctx = multiprocessing.get_context("fork")  # no loop or thread runs yet here
        shared = ctx.Array("d", len(sc.policies), lock=False)
        done = threading.Event()
        drawer = None
        if progress:
            drawer = threading.Thread(
                target=_draw_progress, args=(sc.policies, shared, done), daemon=True
            )
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(shared,)
        ) as ex:
            args = [(sc, p, arr, progress, i) for i, p in enumerate(sc.policies)]
            results_it = ex.map(_run_one, args)  # submits at once: the workers fork here
            if drawer is not None:
                drawer.start()  # only now, so no worker inherits this thread's locks
            try:
                outs = list(results_it)
            finally:
                done.set()
                if drawer is not None:
                    drawer.join()
    else:
        outs = [run_stack_policy(sc, p, arr, progress=progress) for p in sc.policies]
    for r, n in outs:
        results.append(r)
        notes.extend(n)
    for r in results:
        if r.policy in CONTROLLED_POLICIES and r.violations:
            notes.append(f"{r.policy}: {r.violations} node-phase samples over a limit")
    chosen = sc.report_charger or _busiest_charger(arr, sc.site)
    return Comparison(sc, s, arr, results, chosen, notes)
