"""The edge's local planner: the core planner (``evcore.planner``) on the edge's own state.

What this module owns: building a ``PlanRequest`` from the site (topology), the controller's view of
the sessions (energy still wanted, departure, priority), its price points and curtailments and the
``[planner]`` section of the site file (a flat price and demand charge when nothing else is known),
running it on its own schedule (``replan_every_s``) and whenever the controller asks for a re-plan
(session start/stop, grid signal, price update, operator change), and handing the result to the
controller as a *local* ``PlanTargets``. A fresh cloud plan still wins
(``EdgeController._targets``).

What it must never do: send or decide a setpoint (the plan's targets go to the allocator, whose
output passes the envelope), or block the control loop: the solve runs in a worker thread (the core
releases the GIL) bounded by ``plan_budget_s``; a failed, infeasible or late plan is logged and the
allocator carries on with the last valid plan or alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evcore.edge.controller import EdgeController, PlanTargets
from evcore.edge.grid import price_at
from evcore.edge.state import ChargerState

log = logging.getLogger("evcore.edge.planning")

# planner_peak: the demand charge used in the objective, and the energy price as a tie-breaker only.
PEAK_WEIGHT_PER_KW = 50.0
PEAK_PRICE_SCALE = 0.01
# Sessions that leave within this long, or want less than this, are not planned (allocator only).
_MIN_LEFT_S = 60.0
_MIN_KWH = 0.01
_MIN_GAP_S = 2.0


class PlannerConfigError(ValueError):
    """The ``[planner]`` section is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class PlannerSection:
    """``[planner]``: what the edge plans with when the bus sends no prices."""

    price_per_kwh: float = 0.25
    demand_charge_per_kw: float = 0.0
    demand_window_s: float = 900.0
    horizon_h: float = 24.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None) -> PlannerSection:
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise PlannerConfigError(f"[planner]: expected a table, got {type(table).__name__}")
        known = set(cls.__dataclass_fields__)
        kwargs: dict[str, float] = {}
        for key, value in table.items():
            if key not in known:
                raise PlannerConfigError(
                    f"[planner].{key}: unknown key; known keys: {', '.join(sorted(known))}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PlannerConfigError(f"[planner].{key}: expected a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise PlannerConfigError(
                    f"[planner].{key}: must be a finite number >= 0, got {value!r}"
                )
            kwargs[key] = float(value)
        out = cls(**kwargs)
        if out.horizon_h <= 0 or out.demand_window_s <= 0:
            raise PlannerConfigError("[planner].horizon_h and demand_window_s must be positive")
        return out


def without_pauses(
    steps: list[tuple[float, float, float]], c: ChargerState
) -> list[tuple[float, float, float]]:
    """A session's steps with no pause after its first charging step (T2; after the twin's rule,
    sim/twinplan.py): a pause there becomes the charger's minimum (the edge still stops the
    session when its energy is in). An LP plan pauses and resumes between 5-minute steps as
    prices move; each pause counts against the session's switch cap, and a session at the cap
    stays paused. Unlike the twin, a plan may still defer a session that is charging now (the
    edge starts every car at its TxDefault level before any plan): that is one switch, and
    moving energy to cheap hours is the plan's purpose."""
    steps = sorted(steps)
    on = [i for i, (_, _, t) in enumerate(steps) if t > 0.0]
    if not on:
        return steps
    low = max(c.min_value, 1e-3)
    return [(s, d, max(t, low) if on[0] <= i else t) for i, (s, d, t) in enumerate(steps)]


class LocalPlanner:
    """Plans for one controller; ``await run()`` beside the control loop until ``stop()``."""

    def __init__(
        self,
        site: Any,
        controller: EdgeController,
        section: PlannerSection | None = None,
        *,
        planner: Any = None,
    ) -> None:
        from evcore.planner import Planner

        self.site = site
        self.ctrl = controller
        self.section = section or PlannerSection()
        self.planner = planner if planner is not None else Planner()
        self.version = 0
        self.plans = 0
        self.failures = 0
        self.last_status = ""
        self._stopping = False
        self._stopped = asyncio.Event()
        self._busy = False

    @property
    def active(self) -> bool:
        return self.ctrl.cfg.policy in ("planner_cost", "planner_peak")

    # ---- the request ---------------------------------------------------------------------------
    def request(self, now: float) -> Any | None:
        """The ``PlanRequest`` for ``now``, or None when no session can be planned."""
        from evcore.planner import (
            PlanNode,
            PlanRequest,
            PlanSession,
            network_from_site,
            step_grid,
        )

        sessions = []
        departures: list[float] = []
        for cid, c in sorted(self.ctrl.state.chargers.items()):
            if (
                c.transaction_id is None
                or c.energy_requested_kwh is None
                or c.departure is None
                or c.faulted
                or not c.available
            ):
                continue
            remaining = max(0.0, c.energy_requested_kwh - c.session_energy_wh / 1000.0)
            if remaining < _MIN_KWH or c.departure <= now + _MIN_LEFT_S:
                continue
            departures.append(float(c.departure))
            sessions.append(
                PlanSession(
                    id=str(c.transaction_id),
                    charger_id=cid,
                    arrival=now,
                    departure=float(c.departure),
                    energy_requested_kwh=remaining,
                    priority=float(c.priority),
                )
            )
        if not sessions:
            return None
        sec = self.section
        last_departure = max(departures)
        horizon = min(sec.horizon_h * 3600.0, max(900.0, last_departure - now))
        steps = step_grid(horizon)
        mids: list[float] = []
        t = now
        for d in steps:
            mids.append(t + d / 2)
            t += d
        points = self.ctrl.prices
        prices = [p if (p := price_at(points, m)) is not None else sec.price_per_kwh for m in mids]
        demand_charge = sec.demand_charge_per_kw
        if self.ctrl.cfg.policy == "planner_peak":
            prices = [p * PEAK_PRICE_SCALE for p in prices]
            demand_charge = max(demand_charge, PEAK_WEIGHT_PER_KW)
        curtailments = list(self.ctrl.curtailments)
        nodes = []
        for n in self.site.nodes:
            caps = [
                min(
                    [c.max_kw for c in curtailments if c.node_id == n.id and c.start <= m < c.end]
                    + ([float(n.power_limit_kw)] if n.power_limit_kw is not None else [math.inf])
                )
                for m in mids
            ]
            power: float | list[float] | None = None
            if any(math.isfinite(c) for c in caps):
                power = [c if math.isfinite(c) else 1e6 for c in caps]
            nodes.append(
                PlanNode(
                    id=n.id,
                    parent=n.parent,
                    phase_limit_a=list(n.phase_limit_a),
                    # Planning ahead: non-charger load at its configured maximum.
                    other_load_a=list(n.other_load_max_a),
                    power_limit_kw=power,
                )
            )
        chargers = network_from_site(self.site)[1]
        return PlanRequest(
            start=now,
            step_s=steps,
            price_per_kwh=prices,
            nodes=nodes,
            chargers=chargers,
            sessions=sessions,
            demand_charge_per_kw=demand_charge,
            demand_window_s=sec.demand_window_s,
            phase_names=self.site.phase_names,
        )

    def _solve(self, req: Any, budget_s: float) -> Any:
        return self.planner.plan(req, budget_s)

    def _targets(self, res: Any, received_at: float) -> PlanTargets:
        cols = res.schedule.to_pydict()
        rows: dict[str, list[tuple[float, float, float]]] = {}
        for cid, start, dur, ta, tw in zip(
            cols["charger_id"],
            cols["step_start"],
            cols["step_s"],
            cols["target_a"],
            cols["target_w"],
            strict=True,
        ):
            target = tw if ta is None else ta
            if target is None:
                continue
            rows.setdefault(cid, []).append((start.timestamp(), float(dur), float(target)))
        for cid, steps in rows.items():
            c = self.ctrl.state.chargers.get(cid)
            if c is not None:
                rows[cid] = without_pauses(steps, c)
        self.version += 1
        return PlanTargets("local", f"edge-local@{self.version}", received_at, rows)

    # ---- one plan ------------------------------------------------------------------------------
    async def plan_now(self) -> PlanTargets | None:
        """Plan once (in a worker thread, bounded) and hand a valid plan to the controller."""
        if self._busy:
            return None  # the previous solve is still running (it was late): skip this round
        now = self.ctrl.clock.now()
        try:
            req = self.request(now)
        except Exception:
            self.failures += 1
            log.exception("local plan: building the request failed")
            return None
        if req is None:
            self.last_status = "no_sessions"
            return None
        budget = self.ctrl.cfg.plan_budget_s
        self._busy = True
        task = asyncio.ensure_future(asyncio.to_thread(self._solve, req, budget))
        task.add_done_callback(self._solved)
        try:
            # The core stops itself at the budget; the grace covers the thread hand-over on a
            # busy machine. Past it the loop goes on without this plan.
            res = await asyncio.wait_for(asyncio.shield(task), budget + 2.0)
        except TimeoutError:
            self.failures += 1
            self.last_status = "late"
            log.warning("local plan: no answer within %.1f s; allocator alone", budget + 2.0)
            return None
        except Exception:
            self.failures += 1
            self.last_status = "failed"
            log.exception("local plan failed; allocator alone")
            return None
        self.last_status = res.status
        if not res.ok:
            self.failures += 1
            log.warning("local plan %s; allocator alone", res.status)
            return None
        plan = self._targets(res, self.ctrl.clock.now())
        self.plans += 1
        self.ctrl.set_plan(plan)
        return plan

    def _solved(self, task: asyncio.Future[Any]) -> None:
        self._busy = False
        if not task.cancelled():
            task.exception()  # retrieved: a late failure is not an unhandled-exception warning

    # ---- the schedule --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()
        self.ctrl.replan_wanted.set()

    async def _sleep(self, seconds: float, *also: asyncio.Event) -> None:
        """Sleep on the controller's clock; wake early on ``stop()`` or any of ``also``."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.ctrl.clock.sleep(seconds))]
        waits += [asyncio.ensure_future(e.wait()) for e in (self._stopped, *also)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                if not t.done():
                    t.cancel()

    async def run(self) -> None:
        """Re-plan every ``replan_every_s`` and whenever the controller asks, until ``stop()``."""
        if not self.active:
            return
        ctrl = self.ctrl
        while not self._stopping:
            ctrl.replan_wanted.clear()
            started = ctrl.clock.monotonic()
            await self.plan_now()
            # Events come in bursts (many sessions start at once): at most one plan per gap.
            gap = min(_MIN_GAP_S, ctrl.cfg.replan_every_s) - (ctrl.clock.monotonic() - started)
            if gap > 0 and not self._stopping:
                await self._sleep(gap)
            if self._stopping:
                break
            await self._sleep(ctrl.cfg.replan_every_s, ctrl.replan_wanted)
