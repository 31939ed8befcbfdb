"""Local planning for the twin's planner policies, on the core planner (``evcore.planner``).

Builds a ``PlanRequest`` from the scenario (topology, tariff, demand charge, grid signals) and the
edge's view of the sessions (``SiteState``: energy still wanted, departure), and turns the plan into
the edge's ``PlanTargets``. ``planner_cost`` minimises energy cost plus the demand charge;
``planner_peak`` minimises the site peak first (the price only breaks ties).

It never sends anything: the targets go to the edge's allocator, whose output still passes the
envelope. The solver's wall-clock budget is generous on purpose — a plan cut short by a busy
machine would make a twin run depend on the machine, and the twin must be reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from evcore.edge.planning import PEAK_PRICE_SCALE, PEAK_WEIGHT_PER_KW, energy_first
from evcore.sim.scenario import Scenario

PLAN_BUDGET_S = 10.0
# Plan to finish before departure: the plan does not know the CC-CV taper, and a car that enters
# it late never finishes (least laxity, charging as early as it can, does). 30 % of the time left,
# at most 1.5 h: at a quarter / 1 h workplace-208v and depot fell 1-3 kWh short of least laxity.
FINISH_EARLY_SHARE = 0.3
FINISH_EARLY_MAX_S = 5400.0
# Plan 50 % more energy than is still wanted: the targets are caps, and the edge stops each session
# at its own energy; the extra raises the caps and gives the allocator room to catch up (at 10 %
# the depot's planner_cost fell 0.4 kWh short of least laxity; at 25 %, once increases waited for
# decreases to take effect, workplace-208v's planners fell 0.1 kWh short: 470.96/470.98 against
# 471.08; at 40 % they led by 0.004 kWh, at 50 % by 0.03-0.04 kWh).
PLAN_ENERGY_MARGIN = 1.5
# Energy first, the peak so far and the window under way: as the edge plans
# (``evcore.edge.planning.energy_first``).
# A single-phase car on a three-phase charger is planned on three phases with three times its
# energy (as the allocator counts it); weigh its planned kWh at a third (one real kWh per three).
REAL_KWH_PRIORITY = True
# Leave the room chargers outside the plan hold in the allocator's counting (edge.planning).
HOLD_ROOM = True
# Plan under 90 % of each kW cap: the allocator counts a node's power more conservatively than
# the planner (on the EU scenario it holds the site about 6 kW under a 110 kW cap the planner
# fills), and a session planned on power the allocator will not grant falls behind for good.
# Taken of the cap less the room held outside the plan (idle chargers at their failsafe level,
# counted as the allocator counts them), never below the node's other load: as before when
# nothing is held. Taken of the whole cap and the held room subtracted after (until 2026-12-06),
# the margin could exceed what was left: on the depot, 23 idle chargers at 27.44 kW each hold
# 631.2 kW of the 700 kW cap and the building is planned at 41.4 kW; 630 kW less both is
# nothing, so the first four cloud plans (17:40-17:58) planned 0 kWh for the whole night and
# held the first bus at 0 W for 26 minutes while the allocator alone granted it 48 kW (now
# 0.9 x 68.8 - 41.4 = 20.5 kW AC, 19.4 kW DC). On eu-three-phase (91 kW held of 110, a 12.7 kW
# building) the first three plans were 0 kWh too (now a first car at 6.4 A).
KW_MARGIN = 0.9
# A car that draws clearly less than its charger allows (its onboard charger, the CC-CV taper) is
# planned at what it draws plus this much: a plan that counts on the charger's maximum reserves
# capacity the car never takes and expects energy it never gets.
DRAW_SLACK_A = 1.0
DRAW_SLACK_W = 1000.0
# ... judged only on a measurement this long after the setpoint went out (the charger applies a
# profile a few seconds after accepting it, the car follows within about 5 s).
DRAW_SETTLE_S = 20.0
# A step without a kW cap on a node that has one in other steps.
_NO_CAP_KW = 1e6
_ROOM_FLOOR_KW = 1e-3  # as evcore.edge.planning's _ROOM_FLOOR


def _with_kw_margin(node: Any) -> Any:
    """``node`` (``PlanNode``) with its kW caps at ``KW_MARGIN`` of what is left of them once
    ``leave_held_room`` has taken off what chargers outside the plan hold, never below the
    node's other load (plus the hair ``leave_held_room`` keeps: a limit at it plans 0 there)."""
    caps = node.power_limit_kw
    if caps is None:
        return node
    other = float(node.other_load_kw)
    out = [
        c if c >= _NO_CAP_KW else max(other + _ROOM_FLOOR_KW, c * KW_MARGIN)
        for c in ([caps] if isinstance(caps, int | float) else caps)
    ]
    return replace(node, power_limit_kw=out if not isinstance(caps, int | float) else out[0])


class TwinPlanner:
    def __init__(self, sc: Scenario, policy: str) -> None:
        from evcore.planner import Planner

        if policy not in ("planner_cost", "planner_peak"):
            raise ValueError(f"TwinPlanner: not a planner policy: {policy!r}")
        self.sc = sc
        self.policy = policy
        self.planner = Planner()
        self.version = 0
        self.last_status = ""
        self.stale_after_s = max(30.0, 2.5 * sc.meter_interval_s)  # as the twin's edge
        self.phases_drawn: dict[str, int] = {}  # transaction id -> fewest phases seen drawing
        from dataclasses import fields

        from evcore.edge.config import EdgeConfig

        # The edge enforces a curtailment from this long before it starts: so does the plan.
        lead = next(f.default for f in fields(EdgeConfig) if f.name == "curtail_lead_s")
        self.curtail_lead_s = float(sc.edge.get("curtail_lead_s", lead))

    def other_kw(self, node: Any) -> float:
        """A node's building load at its configured maximum, in kW."""
        return float(sum(node.other_load_max_a)) * self.sc.site.voltage_ln_v / 1000.0

    def request(
        self,
        now: float,
        sessions: list[Any],
        held: Mapping[str, tuple[list[float], float]] | None = None,
    ) -> Any:
        """The plan's request at ``now``; with ``held`` (``held_outside_plan``) that room is
        left free, then each kW cap is taken at ``KW_MARGIN`` of what is left."""
        from evcore.edge.grid import Curtailment, PricePoint
        from evcore.edge.planning import leave_held_room, step_caps, step_prices
        from evcore.planner import PlanCharger, PlanNode, PlanRequest, step_grid

        sc = self.sc
        site = sc.site
        last_departure = max((float(s.departure) for s in sessions), default=now + 3600.0)
        horizon = min(sc.plan_horizon_h * 3600.0, max(900.0, last_departure - now))
        steps = step_grid(horizon)
        spans: list[tuple[float, float]] = []
        t = now
        for d in steps:
            spans.append((t, t + d))
            t += d
        # Each step at the tariff's time-weighted mean over it and under every cap in force at
        # any moment of it, as the edge plans (at the step's midpoint, a price change or a
        # curtailment away from it was missed).
        points = [PricePoint(at, price) for at, price in sc.tariff.changes(now, t)]
        prices = step_prices(points, spans, sc.tariff.price_at(now))
        dc = sc.demand_charge.price_per_kw
        if self.policy == "planner_peak":
            prices = [p * PEAK_PRICE_SCALE for p in prices]
            dc = max(dc, PEAK_WEIGHT_PER_KW)
        nodes = []
        for n in site.nodes:
            pl: float | list[float] | None = n.power_limit_kw
            caps = step_caps(
                [
                    Curtailment(
                        f"{g.node}@{g.start_s:.0f}",
                        g.node,
                        g.limit_kw,
                        sc.start + g.start_s,
                        sc.start + g.end_s,
                    )
                    for g in sc.grid_signals
                    # Only what the grid operator has announced by now (notice_min ahead).
                    if g.node == n.id and max(0.0, g.start_s - g.notice_s) <= now - sc.start
                ],
                spans,
                self.curtail_lead_s,
                n.power_limit_kw if n.power_limit_kw is not None else math.inf,
            )
            if any(math.isfinite(c) for c in caps):
                pl = [c if math.isfinite(c) else _NO_CAP_KW for c in caps]
            nodes.append(
                PlanNode(
                    id=n.id,
                    parent=n.parent,
                    phase_limit_a=list(n.phase_limit_a),
                    # At its maximum in amperes and in kW, also where the edge has a fresh
                    # meter reading (the depot): counting the reading up to the next re-plan
                    # raised the depot's night peak by 17-21 kW for the same energy, as the plan
                    # fills the room it is given (docs/twin.md, "the building at its maximum").
                    other_load_a=list(n.other_load_max_a),
                    other_load_kw=self.other_kw(n),
                    power_limit_kw=pl,
                )
            )
        chargers = []
        for c in site.chargers:
            if c.kind == "dc":
                chargers.append(
                    PlanCharger(
                        id=c.id,
                        parent=c.parent,
                        wiring="three_phase",
                        phases=list(c.phases),
                        voltage_v=c.voltage_v,
                        kind="dc",
                        max_w=c.max_w,
                        min_w=c.min_w or None,
                        efficiency=c.efficiency,
                        aux_w=float(c.aux_w or 0.0),
                    )
                )
            else:
                chargers.append(
                    PlanCharger(
                        id=c.id,
                        parent=c.parent,
                        wiring=c.wiring,
                        phases=list(c.phases),
                        voltage_v=c.voltage_v,
                        max_a=c.max_a,
                        min_a=c.min_a,
                    )
                )
        if held is not None:
            nodes = leave_held_room(nodes, held)
        nodes = [_with_kw_margin(n) for n in nodes]
        return PlanRequest(
            start=now,
            step_s=steps,
            price_per_kwh=prices,
            nodes=nodes,
            chargers=chargers,
            sessions=sessions,
            demand_charge_per_kw=dc,
            demand_window_s=sc.demand_charge.window_min * 60.0,
            phase_names=site.phase_names,
        )

    def vehicle_limit(self, c: Any, mono_now: float | None) -> float | None:
        """What the car takes at most now (A per phase, or W for DC), from a fresh measurement
        taken after the setpoint had time to apply, when it draws clearly less than allowed;
        None when unknown (the charger's maximum is planned)."""
        if (
            mono_now is None
            or c.measured_at is None
            or mono_now - c.measured_at > self.stale_after_s
            or c.sent is None
            or c.sent <= 0.0
            or c.sent_at is None
            or c.measured_at < c.sent_at + DRAW_SETTLE_S
        ):
            return None
        if c.is_dc:
            drawn_w = c.measured_w
            if drawn_w is None or not math.isfinite(drawn_w) or drawn_w <= 0.0:
                return None
            return float(drawn_w) + DRAW_SLACK_W if drawn_w < c.sent - DRAW_SLACK_W else None
        vals = [float(a) for a in c.terminal_a if a is not None and math.isfinite(a)]
        if not vals or max(vals) <= 0.5:
            return None
        drawn_a = max(vals)
        if drawn_a >= float(c.sent) - DRAW_SLACK_A:
            return None
        return max(drawn_a + DRAW_SLACK_A, float(c.min_value))

    def sessions_from_state(
        self, now: float, state: Any, mono_now: float | None = None
    ) -> list[Any]:
        from evcore.planner import PlanSession

        out = []
        for cid, c in sorted(state.chargers.items()):
            if (
                c.transaction_id is None
                or c.energy_requested_kwh is None
                or c.departure is None
                or c.faulted
                or not c.available
            ):
                continue  # the allocator does not control a faulted charger: nothing to plan
            remaining = max(0.0, c.energy_requested_kwh - c.session_energy_wh / 1000.0)
            if remaining <= 0.01 or c.departure <= now + 60.0:
                continue
            # The planner counts a three-phase charger's current on all three phases; a car that
            # draws on fewer (seen in its per-terminal meter values) takes that much less energy
            # per ampere, so it needs the plan's current for longer.
            ch = self.sc.site.charger(cid)
            per_kwh = 1.0
            if ch.kind == "ac" and ch.wiring == "three_phase":
                # Remembered per session: a paused car draws on no phase, and forgetting that it
                # is single-phase flips its plan on every re-plan (each flip a switch).
                seen = sum(1 for a in c.terminal_a if a is not None and a > 0.5)
                key = str(c.transaction_id)
                if seen > 0:
                    self.phases_drawn[key] = min(seen, self.phases_drawn.get(key, 3))
                drawn = self.phases_drawn.get(key, 0)
                if 0 < drawn < 3:
                    remaining *= 3.0 / drawn
                    per_kwh = drawn / 3.0 if REAL_KWH_PRIORITY else 1.0
            left = float(c.departure) - now
            depart = now + max(60.0, left - min(FINISH_EARLY_MAX_S, FINISH_EARLY_SHARE * left))
            limit = self.vehicle_limit(c, mono_now)
            out.append(
                PlanSession(
                    id=str(c.transaction_id),
                    charger_id=cid,
                    arrival=now,
                    departure=depart,
                    energy_requested_kwh=remaining * PLAN_ENERGY_MARGIN,
                    max_a=limit if limit is not None and not c.is_dc else None,
                    max_w=limit if limit is not None and c.is_dc else None,
                    priority=float(c.priority) * per_kwh,
                )
            )
        return out

    def _without_pauses(
        self, steps: list[tuple[float, float, float]], c: Any
    ) -> list[tuple[float, float, float]]:
        """A session's steps with no pause once it has started (a pause becomes the charger's
        minimum; the edge still stops the session when its energy is in): before its first
        charging step only, while it has not started yet.

        An LP plan is bang-bang: it pauses and resumes a session between 5-minute steps as
        prices move. The edge counts each pause against the session's switch cap (and the cars'
        minimum on/off times); a session that reaches the cap stays paused however far behind it
        is. Charging at the minimum instead costs a little money and keeps the session alive."""
        steps = sorted(steps)
        on = [i for i, (_, _, t) in enumerate(steps) if t > 0.0]
        if not on:
            return steps
        started = c.session_energy_wh > 0.0 or (c.sent is not None and c.sent > 0.0)
        first = 0 if started else on[0]
        low = max(c.min_value, 1e-3)
        return [(s, d, max(t, low) if first <= i else t) for i, (s, d, t) in enumerate(steps)]

    def plan(
        self,
        now: float,
        state: Any,
        *,
        peak_floor_kw: float = 0.0,
        window_energy_kwh: float = 0.0,
        mono_now: float | None = None,
        edge_site: Any = None,
        failsafe: Mapping[str, float] | None = None,
    ) -> Any | None:
        """A local ``PlanTargets`` for the edge, or None (no session, or the plan failed).

        ``peak_floor_kw`` is the chargers' share of the billed peak already set this period and
        ``window_energy_kwh`` their energy so far in the current demand window (both from the site
        meter): a peak already paid for costs nothing more, so the plan may use it. With the edge's
        ``edge_site`` and ``failsafe`` levels, the room that chargers outside the plan hold in the
        allocator's counting is left free (``evcore.edge.planning.held_outside_plan``)."""
        from evcore.edge import planning
        from evcore.edge.controller import PlanTargets
        from evcore.edge.planning import held_outside_plan, schedule_rows

        sessions = self.sessions_from_state(now, state, mono_now)
        if not sessions:
            self.last_status = "no_sessions"
            return None
        # The planner's site power includes the building at its maximum: so must the peak so far.
        other_kw = self.other_kw(self.sc.site.root)
        window_s = self.sc.demand_charge.window_min * 60.0
        in_window_h = (now - max(math.floor(now / window_s) * window_s, self.sc.start)) / 3600.0
        held = None
        if edge_site is not None and HOLD_ROOM:
            held = held_outside_plan(
                edge_site, state.chargers, failsafe or {}, {s.charger_id for s in sessions}
            )
        req = self.request(now, sessions, held)
        req = energy_first(
            req,
            peak_floor_kw=max(0.0, peak_floor_kw) + other_kw,
            window_energy_kwh=max(0.0, window_energy_kwh) + other_kw * in_window_h,
        )
        res = self.planner.plan(req, PLAN_BUDGET_S)
        self.last_status = res.status
        if not res.ok:
            return None
        rows = schedule_rows(req, res, fill=planning.FILL_SPARE)
        for cid, steps in rows.items():
            rows[cid] = self._without_pauses(steps, state.chargers[cid])
        self.version += 1
        # The twin's planner stands for the cloud: the edge uses its plan while fresh
        # (``cloud_plan_fresh_s``), then runs the allocator alone.
        # Each row is bound to the transaction it was planned for, as a cloud plan names it
        # (``PlanRow.transaction_id``): the next car on a charger does not inherit them.
        return PlanTargets(
            source="cloud",
            version=f"twin-{self.version}",
            received_at=now,
            rows=rows,
            transactions={s.charger_id: s.id for s in sessions if s.charger_id in rows},
        )
