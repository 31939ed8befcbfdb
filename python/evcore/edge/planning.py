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
local plan in force is dropped (as when nothing is left to plan): the allocator runs alone until the
next plan. A plan's rows apply to the sessions it was made for only (``PlanTargets.transactions``).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from evcore.edge.controller import EdgeController, PlanTargets
from evcore.edge.grid import Curtailment, PricePoint
from evcore.edge.state import ChargerState

log = logging.getLogger("evcore.edge.planning")

# planner_peak: the demand charge used in the objective, and the energy price as a tie-breaker only.
PEAK_WEIGHT_PER_KW = 50.0
PEAK_PRICE_SCALE = 0.01
# Energy first (the edge and the twin's planner, sim/twinplan.py, alike): a kWh not delivered costs
# far more than any price or demand charge saves. One kWh raises a demand window's average by at
# most 3600 / demand_window_s kW, so the penalty is kept NON_DELIVERY_MARGIN times above that
# demand charge plus the dearest price of the horizon, and never below NON_DELIVERY_PER_KWH. With
# the core's default (10 per kWh) against planner_peak's 50 per kW, a car leaving within about 5 h
# was planned 0 kWh and held at 0 A.
NON_DELIVERY_PER_KWH = 1000.0
NON_DELIVERY_MARGIN = 5.0
CHARGE_EARLY_PER_KWH = 1e-3
# Earliest deadline first among plans of equal cost and peak (PlanWeights.urgency_per_kwh): each
# car gets time for its taper. planner_peak at 0.002 left the twin's workplace-208v 1.4 kWh short.
URGENCY_PER_KWH = 0.02
# How often the edge reads its chargers' energy between plans, for the demand windows.
WINDOW_SAMPLE_S = 30.0

#: The store's ``meta`` key holding the demand windows (``DemandWindows.snapshot``).
WINDOWS_KEY = "edge.demand_windows"
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


def held_outside_plan(
    site: Any,
    chargers: Mapping[str, ChargerState],
    failsafe: Mapping[str, float],
    planned: Collection[str],
) -> dict[str, tuple[list[float], float]]:
    """Per node (its whole subtree): the line currents (A per site phase) and active power (kW)
    that chargers the plan does not control hold as the allocator counts them, so that a plan
    leaves that room free instead of promising it to sessions the allocator will not admit.

    The allocator counts an idle charger (no session) at the level its car could start at before
    the edge hears of it (its failsafe/TxDefault level, its maximum while it never accepted a
    TxDefault), and a faulted charger or one whose profiles are unknown at its maximum, on every
    terminal. On the twin's EU site 18 idle three-phase chargers at a 7.1 A failsafe level hold
    88 kW of its 110 kW cap: a plan blind to it asked for 100-118 kW while the allocator could
    grant 50-85."""
    out: dict[str, tuple[list[float], float]] = {n.id: ([0.0, 0.0, 0.0], 0.0) for n in site.nodes}
    parent = {n.id: n.parent for n in site.nodes}
    for spec in site.chargers:
        c = chargers.get(spec.id)
        if c is None or spec.id in planned:
            continue
        if c.faulted or c.profile_unknown:
            level = c.max_value
        elif c.transaction_id is None:
            level = c.idle_level(failsafe.get(spec.id, 0.0))
        else:
            continue  # a session the plan leaves out (leaving, energy in): the allocator alone
        if level <= 0.0:
            continue
        if spec.kind == "dc":
            line_a = spec.dc_line_a(level)
            amps = [line_a, line_a, line_a]
            kw = line_a * 3.0 * spec.voltage_v / 1000.0
        else:
            amps = [0.0, 0.0, 0.0]
            for ph in spec.phases:
                amps[ph] = max(amps[ph], level)
            per_a = spec.voltage_v * (3.0 if spec.wiring == "three_phase" else 1.0)
            kw = level * per_a / 1000.0
        node: str | None = spec.parent
        while node is not None:
            a, k = out[node]
            out[node] = ([x + y for x, y in zip(a, amps, strict=True)], k + kw)
            node = parent[node]
    return out


def leave_held_room(
    nodes: Sequence[Any], held: Mapping[str, tuple[Sequence[float], float]]
) -> list[Any]:
    """``nodes`` (``PlanNode``) with what ``held_outside_plan`` found taken off their phase limits
    and kW caps, never below the node's own other load (the planner reports a limit that the
    forecast other load alone exceeds as ``infeasible``; a limit left just above that load plans
    0 there, which is what the allocator will grant)."""
    out = []
    for n in nodes:
        amps, kw = held.get(n.id, ((0.0, 0.0, 0.0), 0.0))
        if not any(amps) and kw == 0.0:
            out.append(n)
            continue
        limits = _per_phase_list(n.phase_limit_a)
        others = _per_phase_list(n.other_load_a)
        phase: list[Any] = [
            _less(lim, a, other) for lim, a, other in zip(limits, amps, others, strict=True)
        ]
        power = n.power_limit_kw
        if power is not None:
            power = _less(power, kw, n.other_load_kw)
        out.append(replace(n, phase_limit_a=phase, power_limit_kw=power))
    return out


def _per_phase_list(v: Any) -> list[Any]:
    return [float(v)] * 3 if isinstance(v, int | float) else list(v)


# A hair above the node's other load: a limit exactly at it plans 0 there (the planner before
# 2026-12-04 tightened it below that by its safety margin and refused the plan as infeasible);
# kept so that rounding in the subtraction never lands below it.
_ROOM_FLOOR = 1e-3


def _less(limit: Any, amount: float, floor: Any) -> Any:
    """``limit - amount`` (a number or a per-step series), never below ``floor`` (idem) plus
    ``_ROOM_FLOOR``."""
    if isinstance(limit, int | float) and isinstance(floor, int | float):
        return max(float(floor) + _ROOM_FLOOR, float(limit) - amount)
    n = len(limit) if not isinstance(limit, int | float) else len(floor)
    lims = [float(limit)] * n if isinstance(limit, int | float) else [float(x) for x in limit]
    floors = [float(floor)] * n if isinstance(floor, int | float) else [float(x) for x in floor]
    return [max(f + _ROOM_FLOOR, x - amount) for x, f in zip(lims, floors, strict=True)]


# Hand the room a plan leaves unused to its sessions (``schedule_rows``).
FILL_SPARE = True


def _rows(res: Any) -> dict[str, list[tuple[float, float, float]]]:
    """The schedule's targets per charger as (step_start, step_s, target), as planned."""
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
        if target is not None:
            rows.setdefault(cid, []).append((start.timestamp(), float(dur), float(target)))
    return rows


def _at(v: Any, k: int) -> float:
    return float(v) if isinstance(v, int | float) else float(v[k])


#: How far a schedule row's step start may be from the request's (s): the core returns them in
#: whole microseconds; every step is far longer.
STEP_MATCH_S = 1e-3


def step_index(starts: list[float], t: float) -> int | None:
    """The index of the step of ``starts`` (ascending) that starts within ``STEP_MATCH_S`` of
    ``t``, else None. Matched by rounding both to the millisecond before, a start within half a
    microsecond of a half millisecond rounded to two different milliseconds on the two sides
    (the core's microseconds and ours), and every row of the plan was dropped."""
    i = bisect.bisect_left(starts, t)
    best: int | None = None
    for k in (i - 1, i):
        if 0 <= k < len(starts) and abs(starts[k] - t) <= STEP_MATCH_S:
            if best is None or abs(starts[k] - t) < abs(starts[best] - t):
                best = k
    return best


def schedule_rows(
    req: Any, res: Any, *, fill: bool = True
) -> dict[str, list[tuple[float, float, float]]]:
    """The plan's targets per charger as (step_start, step_s, target), with the room the plan
    leaves unused handed out on top (``fill``).

    The allocator caps every session at its plan target, so capacity the plan leaves free in a
    step is wasted even when a session could use it: a car that falls behind its plan (it tapers
    near full, the allocator raises it only step by step from what it draws) catches up only if
    its cap lets it. So, step by step and earliest departure first, each session's target is
    raised into what is left under every node's phase limits (counted linearly, which is never
    below the exact phasor sum) and kW caps, under the plan's own site peak (a window average
    is at most its highest step, so the demand charge the plan chose holds), and only in a step
    no dearer than every later step the plan gives that session energy in (so the energy cost
    does not rise either: the car takes the energy earlier at the same or a lower price, and the
    re-plan sees it done). A raise is never below the charger's minimum (6 A rule) and never
    beyond the energy the session still wants."""
    cols = res.schedule.to_pydict()
    steps = [float(d) for d in req.step_s]
    start = _epoch_s(req.start)
    starts = [start]
    for d in steps[:-1]:
        starts.append(starts[-1] + d)
    n_steps = len(steps)
    # rate[s][k]: the planned target of session s in step k (only where it has a variable).
    rate: dict[str, dict[int, float]] = {}
    charger_of: dict[str, str] = {}
    for sid, cid, st, ta, tw in zip(
        cols["session_id"],
        cols["charger_id"],
        cols["step_start"],
        cols["target_a"],
        cols["target_w"],
        strict=True,
    ):
        target = tw if ta is None else ta
        if target is None:
            continue
        k = step_index(starts, st.timestamp())
        if k is None:
            continue
        rate.setdefault(sid, {})[k] = float(target)
        charger_of[sid] = cid
    if fill and rate:
        _fill_spare(req, res, rate, charger_of, starts, n_steps)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for sid, per_step in rate.items():
        cid = charger_of[sid]
        rows.setdefault(cid, []).extend(
            (starts[k], steps[k], per_step[k]) for k in sorted(per_step)
        )
    return rows


def _epoch_s(t: Any) -> float:
    return float(t) if isinstance(t, int | float) else float(t.timestamp())


def _fill_spare(
    req: Any,
    res: Any,
    rate: dict[str, dict[int, float]],
    charger_of: Mapping[str, str],
    starts: Sequence[float],
    n_steps: int,
) -> None:
    names = list(req.phase_names)
    parent = {n.id: n.parent for n in req.nodes}
    chargers = {c.id: c for c in req.chargers}
    sessions = {s.id: s for s in req.sessions}
    root = next(n for n in req.nodes if n.parent is None)

    def ancestors(node: str | None) -> list[str]:
        out = []
        while node is not None:
            out.append(node)
            node = parent[node]
        return out

    # Per charger: line amperes per site phase per unit of rate, kW per unit, its bounds.
    per_unit: dict[str, tuple[list[float], float, float, float, float, list[str]]] = {}
    for c in req.chargers:
        amps = [0.0, 0.0, 0.0]
        if c.kind == "dc":
            eff = c.efficiency or 0.95
            line = 1.0 / (eff * 3.0 * c.voltage_v)
            amps = [line, line, line]
            kw = 1.0 / eff / 1000.0
            kwh_per_h = 1.0 / 1000.0  # planned in W of output
            lo, hi = float(c.min_w or 0.0), float(c.max_w or 0.0)
        else:
            for p in c.phases:
                amps[p if isinstance(p, int) else names.index(p)] = 1.0
            kw = c.voltage_v * (3.0 if c.wiring == "three_phase" else 1.0) / 1000.0
            kwh_per_h = kw
            lo, hi = float(c.min_a or 6.0), float(c.max_a or 0.0)
        per_unit[c.id] = (amps, kw, kwh_per_h, lo, hi, ancestors(c.parent))

    def limit3(v: Any, k: int) -> list[float]:
        if isinstance(v, int | float):
            return [float(v)] * 3
        return [_at(x, k) for x in v]

    prices = [_at(req.price_per_kwh, k) for k in range(n_steps)]
    pv = [_at(req.pv_kw, k) for k in range(n_steps)] if req.pv_kw is not None else [0.0] * n_steps
    order = sorted(rate, key=lambda sid: (_epoch_s(sessions[sid].departure), sid))
    planned_kwh = {sid: 0.0 for sid in rate}

    def aux_w(sid: str) -> float:
        # A DC charger's auxiliary load, counted as the core planner counts it: in every step
        # a session with energy to deliver is connected, whether planned to charge or not.
        c = chargers[charger_of[sid]]
        if c.kind != "dc" or float(sessions[sid].energy_requested_kwh) <= 0.0:
            return 0.0
        return float(getattr(c, "aux_w", 0.0) or 0.0)

    # The site's import per step as planned (kW): the chargers' (with their auxiliary loads)
    # plus the root's other load, less PV.
    site_kw = [_at(root.other_load_kw, k) - pv[k] for k in range(n_steps)]
    for sid, per_step in rate.items():
        kw = per_unit[charger_of[sid]][1]
        for k, x in per_step.items():
            site_kw[k] += kw * x + aux_w(sid) / 1000.0
    demand = (
        _DemandBudget(req, starts, site_kw, _at(root.other_load_kw, n_steps - 1) - pv[-1])
        if float(req.demand_charge_per_kw) > 0
        else None
    )
    peak_kw = max(float(res.summary.get("peak_kw", 0.0)), float(req.peak_floor_kw or 0.0))
    for k in range(n_steps):
        step_h = float(req.step_s[k]) / 3600.0
        phase_room: dict[str, list[float]] = {}
        kw_room: dict[str, float] = {}
        for n in req.nodes:
            lim = limit3(n.phase_limit_a, k)
            other = limit3(n.other_load_a, k)
            phase_room[n.id] = [a - b for a, b in zip(lim, other, strict=True)]
            if n.power_limit_kw is not None:
                kw_room[n.id] = _at(n.power_limit_kw, k) - _at(n.other_load_kw, k)
        # The site's room in this step (kW): with a demand charge, what keeps every demand
        # window it falls in at or under the plan's billed peak (window averages, counting what
        # the window under way has imported); without, the plan's highest step.
        site_room = demand.room_kw(k) if demand is not None else peak_kw - site_kw[k]
        present = [sid for sid in order if k in rate[sid]]
        for sid in present:
            amps, kw, _, _, _, up = per_unit[charger_of[sid]]
            x = rate[sid][k]
            aux = aux_w(sid)
            aux_a = aux / (3.0 * chargers[charger_of[sid]].voltage_v) if aux > 0 else 0.0
            for nid in up:
                room = phase_room[nid]
                for p in range(3):
                    room[p] -= amps[p] * x + (aux_a if amps[p] > 0 else 0.0)
                if nid in kw_room:
                    kw_room[nid] -= kw * x + aux / 1000.0
        for sid in present:
            sess = sessions[sid]
            amps, kw, kwh_per_h, lo, hi, up = per_unit[charger_of[sid]]
            x = rate[sid][k]
            vmax = sess.max_w if chargers[charger_of[sid]].kind == "dc" else sess.max_a
            top = min(hi, float(vmax)) if vmax is not None else hi
            later = [prices[j] for j, r in rate[sid].items() if j > k and r > 0.0]
            want_kwh = float(sess.energy_requested_kwh) - planned_kwh[sid]
            if later and prices[k] > min(later) + 1e-12:
                top = x  # dearer than where the plan puts the energy: keep the plan
            room_units = top - x
            room_units = min(room_units, max(0.0, want_kwh) / (kwh_per_h * step_h) - x)
            room_units = min(room_units, site_room / kw if kw > 0 else room_units)
            for nid in up:
                for p in range(3):
                    if amps[p] > 0:
                        room_units = min(room_units, phase_room[nid][p] / amps[p])
                if nid in kw_room and kw > 0:
                    room_units = min(room_units, kw_room[nid] / kw)
            new = x + max(0.0, room_units)
            if x <= 0.0 and new < lo:
                new = x  # a paused session starts only at its minimum or more
            if new > x + 1e-9:
                d = new - x
                for nid in up:
                    for p in range(3):
                        phase_room[nid][p] -= amps[p] * d
                    if nid in kw_room:
                        kw_room[nid] -= kw * d
                site_room -= kw * d
                if demand is not None:
                    demand.add(k, kw * d)
                rate[sid][k] = new
            planned_kwh[sid] += rate[sid][k] * kwh_per_h * step_h


class _DemandBudget:
    """The plan's clock-aligned demand windows (as the core builds them): each one's average
    import as planned, kept current as the fill raises steps, against the plan's billed peak
    (the highest window average, at least ``peak_floor_kw``). The fill raised every step up to
    the plan's highest STEP, and a plan that puts a window's energy into its first step has a
    highest step far above its billed peak: the billed peak doubled (review of session 13)."""

    def __init__(
        self, req: Any, starts: Sequence[float], site_kw: Sequence[float], tail_kw: float
    ) -> None:
        """``site_kw``: the planned import per step; ``tail_kw``: what the site imports after
        the horizon (the root's other load less PV of the last step)."""
        w = float(req.demand_window_s)
        steps = [float(d) for d in req.step_s]
        end = starts[-1] + steps[-1]
        start = starts[0]
        #: Per step: the windows it falls in, with the share of the window it covers.
        self.of_step: list[list[tuple[int, float]]] = [[] for _ in steps]
        self.avg: list[float] = []
        ws = math.floor(start / w) * w
        while ws < end:
            we = ws + w
            i = len(self.avg)
            # Energy already imported in the window under way, averaged over its whole length.
            avg = float(req.current_window_energy_kwh) * 3600.0 / w if ws < start else 0.0
            for k, (s0, d) in enumerate(zip(starts, steps, strict=True)):
                share = (min(s0 + d, we) - max(s0, ws)) / w
                if share > 0:
                    self.of_step[k].append((i, share))
                    avg += share * max(0.0, site_kw[k])
            if we > end:  # cut by the horizon: the site goes on importing after it (as the core)
                avg += max(0.0, tail_kw) * (we - end) / w
            self.avg.append(avg)
            ws = we
        self.peak_kw = max([float(req.peak_floor_kw or 0.0), *self.avg])

    def room_kw(self, k: int) -> float:
        """How much more step ``k`` may import (kW) with no window above the billed peak."""
        room = math.inf
        for i, share in self.of_step[k]:
            room = min(room, (self.peak_kw - self.avg[i]) / share)
        return max(0.0, room) if room != math.inf else 0.0

    def add(self, k: int, kw: float) -> None:
        for i, share in self.of_step[k]:
            self.avg[i] += share * kw


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


def step_prices(
    points: Sequence[PricePoint], spans: Sequence[tuple[float, float]], default: float
) -> list[float]:
    """Per step ``(start, end)``: the time-weighted mean of the price points (each holds from its
    start until the next; ``default`` before the first). A step's midpoint alone mispriced a
    step a price change falls in: 0.30 for 25 min and 0.08 for 35 min of an hour was 0.08."""
    pts = sorted((p.start, p.price_per_kwh) for p in points)
    out = []
    for a, b in spans:
        price = default
        for start, value in pts:
            if start > a:
                break
            price = value
        total, t = 0.0, a
        for start, value in pts:
            if start <= a:
                continue
            if start >= b:
                break
            total += price * (start - t)
            t, price = start, value
        total += price * (b - t)
        out.append(total / (b - a))
    return out


def step_caps(
    curtailments: Sequence[Curtailment],
    spans: Sequence[tuple[float, float]],
    lead_s: float,
    limit_kw: float,
) -> list[float]:
    """Per step ``(start, end)``: the lowest kW cap in force at any moment of it (``limit_kw``,
    every curtailment that overlaps the step, counted from ``lead_s`` before its start as the
    loop does). A cap is a limit: it must hold through the whole step, not only at its midpoint
    (a 15-minute 0 kW curtailment inside an hourly step was missing from the plan)."""
    return [
        min([c.max_kw for c in curtailments if c.start - lead_s < b and a < c.end] + [limit_kw])
        for a, b in spans
    ]


def non_delivery_per_kwh(req: Any) -> float:
    """The non-delivery penalty for ``req``: ``NON_DELIVERY_MARGIN`` times the most one kWh can
    cost in demand charge (3600 / demand_window_s kW of window average per kWh) and energy price
    (the dearest of the horizon, by magnitude), at least ``NON_DELIVERY_PER_KWH``."""
    prices = req.price_per_kwh
    pts = [float(prices)] if isinstance(prices, int | float) else [float(p) for p in prices]
    demand = float(req.demand_charge_per_kw) * 3600.0 / float(req.demand_window_s)
    worst = demand + max((abs(p) for p in pts), default=0.0)
    return max(NON_DELIVERY_PER_KWH, NON_DELIVERY_MARGIN * worst)


def energy_first(
    req: Any,
    *,
    peak_floor_kw: float = 0.0,
    window_energy_kwh: float = 0.0,
    urgency_per_kwh: float = URGENCY_PER_KWH,
) -> Any:
    """``req`` (``PlanRequest``) as the edge and the twin plan it: energy first
    (``non_delivery_per_kwh``), the peak already paid for this billing period as the floor of
    the demand term (it costs nothing more, so the plan may use it) and the energy already
    imported in the demand window under way (the window is averaged over its whole length)."""
    from evcore.planner import PlanWeights

    return replace(
        req,
        peak_floor_kw=max(0.0, peak_floor_kw),
        current_window_energy_kwh=max(0.0, window_energy_kwh),
        weights=PlanWeights(
            non_delivery_per_kwh=non_delivery_per_kwh(req),
            charge_early_per_kwh=CHARGE_EARLY_PER_KWH,
            urgency_per_kwh=urgency_per_kwh,
        ),
    )


class DemandWindows:
    """The chargers' own demand windows as the edge counts them from their energy registers
    (the edge has no site meter): the energy in the clock-aligned window under way and the
    highest window average of the calendar month (UTC; the billing period the edge assumes).

    The windows are the grid's: a session's energy is the car's (the central system's session
    energy, docs/ocpp.md), and a DC charger's grid draws that over its efficiency plus its
    auxiliary load while it charges (``_grid_wh``). Read every ``WINDOW_SAMPLE_S`` and at every
    plan; the energy between two readings counts in the window of the later one (off by at most
    one reading's worth at a window's edge). With a
    store, ``LocalPlanner`` keeps the month's peak and the window under way in it
    (``snapshot`` / ``restore``): a restart used to forget the peak already paid for, and the
    plan then flattened more than it needed to."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.peak_kw = 0.0
        # charger -> (transaction, Wh read, when its reading came: ``measured_at``, monotonic)
        self._seen: dict[str, tuple[str, float, float | None]] = {}
        self._window: int | None = None
        self._window_wh = 0.0
        self._month: tuple[int, int] | None = None
        self._read = False
        self._last_at = 0.0  # the last sample's ``now``

    def sample(self, now: float, chargers: Mapping[str, ChargerState]) -> None:
        wh = 0.0
        seen: dict[str, tuple[str, float, float | None]] = {}
        in_window_s = now - math.floor(now / self.window_s) * self.window_s

        def this_window(grid_wh: float, interval_s: float) -> float:
            # Energy taken over more than a window (a charger whose readings stopped for hours,
            # its connection down, and came back with all of it): only this window's share of
            # the interval counts here; the windows before are closed. Counted whole, three
            # hours at 11 kW put 33 kWh into one 15-minute window, 132 kW, the month's peak.
            if interval_s <= self.window_s:
                return grid_wh
            return grid_wh * min(interval_s, in_window_s) / interval_s

        for cid, c in chargers.items():
            if c.transaction_id is None or not math.isfinite(c.session_energy_wh):
                continue
            tx = str(c.transaction_id)
            before = self._seen.get(cid)
            if before is not None and before[0] == tx:
                grown_wh = c.session_energy_wh - before[1]
                if before[2] is not None and c.measured_at is not None:
                    interval_s = c.measured_at - before[2]
                else:
                    interval_s = max(0.0, now - self._last_at) if self._last_at else 0.0
                wh += this_window(_grid_wh(c, grown_wh, interval_s), interval_s)
            elif self._read:
                # A session that started since the last read: its energy from its start.
                since_s = now - c.session_started_at if c.session_started_at is not None else 0.0
                wh += this_window(_grid_wh(c, c.session_energy_wh, since_s), since_s)
            seen[cid] = (tx, c.session_energy_wh, c.measured_at)
        self._last_at = now
        self._seen = seen
        self._read = True
        t = time.gmtime(now)
        month = (t.tm_year, t.tm_mon)
        window = math.floor(now / self.window_s)
        if window != self._window:
            if self._window is not None and month == self._month:
                self.peak_kw = max(self.peak_kw, self.window_kw())
            self._window, self._window_wh = window, 0.0
        if month != self._month:
            self._month, self.peak_kw = month, 0.0
        self._window_wh += wh

    def snapshot(self) -> str:
        """What a restart must not forget, as JSON: the month and its peak, the window under way
        and its energy so far."""
        return json.dumps(
            {
                "window_s": self.window_s,
                "month": list(self._month) if self._month is not None else None,
                "peak_kw": self.peak_kw,
                "window": self._window,
                "window_wh": self._window_wh,
            }
        )

    def restore(self, text: str, now: float) -> bool:
        """Take a ``snapshot`` back (before the first ``sample``): the peak if it is of this
        month, the window's energy if it is the window under way at ``now``. Returns whether the
        peak was taken; ``ValueError`` naming the field for one that does not parse."""
        try:
            data = json.loads(text)
            window_s = float(data["window_s"])
            month = data["month"]
            peak = float(data["peak_kw"])
            window = data["window"]
            window_wh = float(data["window_wh"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"demand windows snapshot: {exc!r}") from None
        t = time.gmtime(now)
        if window_s != self.window_s or month != [t.tm_year, t.tm_mon]:
            return False  # another window length, or last month's: nothing of it bills now
        if not (math.isfinite(peak) and peak >= 0 and math.isfinite(window_wh) and window_wh >= 0):
            raise ValueError(f"demand windows snapshot: peak_kw {peak}, window_wh {window_wh}")
        self._month, self.peak_kw = (t.tm_year, t.tm_mon), peak
        if window == math.floor(now / self.window_s):
            self._window, self._window_wh = int(window), window_wh
        return True

    def window_kw(self) -> float:
        """The average of the window under way, counted over its whole length."""
        return self._window_wh / 1000.0 * 3600.0 / self.window_s

    def window_kwh(self) -> float:
        return self._window_wh / 1000.0


def _grid_wh(c: ChargerState, car_wh: float, interval_s: float) -> float:
    """What the grid gave for ``car_wh`` into a car over ``interval_s`` (between two readings).
    AC: the same. DC: over the efficiency, plus the auxiliary load over the interval when the
    car took energy in it (an approximation: taken as drawn over the whole interval; none in an
    interval the session stood still, as the allocator counts it only for a setpoint above 0).
    The central system does not pass on an inlet register a station may report (the grid's own
    count): ``MeterSample`` carries the session's energy to the car only."""
    if car_wh <= 0.0:
        return 0.0
    if not c.is_dc:
        return car_wh
    return car_wh / c.dc_efficiency + c.dc_aux_w * max(0.0, interval_s) / 3600.0


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
        self.windows = DemandWindows(self.section.demand_window_s)
        #: Where the demand windows are kept across restarts (``load_windows``); None: not kept.
        self.store: Any = None
        self._saved = ""
        self._save_failed = False
        #: Per transaction: the fewest phases its car was seen drawing on (``_phase_scale``).
        self._phases_drawn: dict[str, int] = {}

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
            other_load_kw,
            step_grid,
        )

        sessions = []
        departures: list[float] = []
        live = {str(c.transaction_id) for c in self.ctrl.state.chargers.values()}
        self._phases_drawn = {k: v for k, v in self._phases_drawn.items() if k in live}
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
            # The planner counts a three-phase charger's current on all three phases: a car
            # drawing on fewer takes that much less energy per ampere, so it needs the plan's
            # current for longer (planned unscaled, a single-phase car got a third of the
            # energy it wanted planned and left 30 % short; review of session 13).
            remaining *= self._phase_scale(c)
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
        spans: list[tuple[float, float]] = []
        t = now
        for d in steps:
            spans.append((t, t + d))
            t += d
        prices = step_prices(self.ctrl.prices, spans, sec.price_per_kwh)
        demand_charge = sec.demand_charge_per_kw
        if self.ctrl.cfg.policy == "planner_peak":
            prices = [p * PEAK_PRICE_SCALE for p in prices]
            demand_charge = max(demand_charge, PEAK_WEIGHT_PER_KW)
        curtailments = list(self.ctrl.curtailments)
        lead = self.ctrl.cfg.curtail_lead_s
        nodes = []
        for n in self.site.nodes:
            caps = step_caps(
                [c for c in curtailments if c.node_id == n.id],
                spans,
                lead,
                float(n.power_limit_kw) if n.power_limit_kw is not None else math.inf,
            )
            power: float | list[float] | None = None
            if any(math.isfinite(c) for c in caps):
                power = [c if math.isfinite(c) else 1e6 for c in caps]
            nodes.append(
                PlanNode(
                    id=n.id,
                    parent=n.parent,
                    phase_limit_a=list(n.phase_limit_a),
                    # Planning ahead: non-charger load at its configured maximum, in A and
                    # in kW (the envelope counts it against the kW cap; the plan did not).
                    other_load_a=list(n.other_load_max_a),
                    other_load_kw=other_load_kw(self.site, n),
                    power_limit_kw=power,
                )
            )
        chargers = network_from_site(self.site)[1]
        # What chargers outside the plan hold in the allocator's counting is not the plan's.
        held = held_outside_plan(
            self.site,
            self.ctrl.state.chargers,
            self.ctrl.failsafe,
            {s.charger_id for s in sessions},
        )
        nodes = leave_held_room(nodes, held)
        req = PlanRequest(
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
        # The plan's site import counts the building at its maximum (the root's other load):
        # so must the peak already paid for and the energy of the window under way, which the
        # demand windows count of the chargers alone.
        building_kw = other_load_kw(self.site, next(n for n in self.site.nodes if n.parent is None))
        window_s = self.windows.window_s
        in_window_h = (now - math.floor(now / window_s) * window_s) / 3600.0
        return energy_first(
            req,
            peak_floor_kw=self.windows.peak_kw + building_kw,
            window_energy_kwh=self.windows.window_kwh() + building_kw * in_window_h,
            # No earliest-deadline tie-break here (the twin's 0.02): with it the spare room a
            # plan leaves goes to one of two equal sessions, a target the allocator's own node
            # margin does not let it follow (tests/edge/test_edge_planning.py).
            urgency_per_kwh=0.0,
        )

    def _phase_scale(self, c: ChargerState) -> float:
        """How many times the energy a session wants the planner must plan for it: 3 / the
        phases a car on a three-phase AC charger draws on (the fewest seen drawing in this
        session: paused, a car draws on none), else 1."""
        if c.is_dc or c.ac_phases != 3 or c.transaction_id is None:
            return 1.0
        key = str(c.transaction_id)
        seen = c.phases_drawing()
        if seen is not None:
            self._phases_drawn[key] = min(seen, self._phases_drawn.get(key, 3))
        drawn = self._phases_drawn.get(key, 3)
        return 3.0 / drawn

    def _solve(self, req: Any, budget_s: float) -> Any:
        return self.planner.plan(req, budget_s)

    def _targets(self, res: Any, received_at: float, req: Any = None) -> PlanTargets:
        rows = schedule_rows(req, res, fill=FILL_SPARE) if req is not None else _rows(res)
        for cid, steps in rows.items():
            c = self.ctrl.state.chargers.get(cid)
            if c is not None:
                rows[cid] = without_pauses(steps, c)
        self.version += 1
        sessions = {s.charger_id: s.id for s in req.sessions} if req is not None else {}
        return PlanTargets("local", f"edge-local@{self.version}", received_at, rows, sessions)

    # ---- the demand windows across restarts -----------------------------------------------------
    async def load_windows(self, timeout_s: float = 5.0) -> bool:
        """Restore the demand windows from the store (at start, before ``run``): the month's peak
        already paid for. Whether a peak was restored; a store that fails or holds an unreadable
        snapshot is logged and nothing is restored (the plan flattens more, never less)."""
        if self.store is None:
            return False
        try:
            text = await asyncio.wait_for(self.store.get_meta(WINDOWS_KEY), timeout_s)
            if text is None:
                return False
            restored = self.windows.restore(text, self.ctrl.clock.now())
        except Exception as exc:
            log.warning("demand windows not restored from the store: %s", exc)
            return False
        self._saved = text
        if restored:
            log.info("demand windows restored: the month's peak %.1f kW", self.windows.peak_kw)
        return restored

    async def save_windows(self, timeout_s: float = 2.0) -> None:
        """Write the demand windows to the store when they changed (never raises)."""
        if self.store is None:
            return
        text = self.windows.snapshot()
        if text == self._saved:
            return
        try:
            await asyncio.wait_for(self.store.set_meta(WINDOWS_KEY, text), timeout_s)
        except Exception as exc:
            if not self._save_failed:
                log.warning("demand windows not written to the store (retried): %s", exc)
            self._save_failed = True
            return
        if self._save_failed:
            log.info("demand windows written to the store again")
        self._save_failed = False
        self._saved = text

    # ---- one plan ------------------------------------------------------------------------------
    async def plan_now(self) -> PlanTargets | None:
        """Plan once (in a worker thread, bounded) and hand a valid plan to the controller."""
        if self._busy:
            return None  # the previous solve is still running (it was late): skip this round
        now = self.ctrl.clock.now()
        try:
            self.windows.sample(now, self.ctrl.state.chargers)
            await self.save_windows()
            req = self.request(now)
        except Exception:
            self.failures += 1
            self.last_status = "failed"
            log.exception("local plan: building the request failed")
            self.ctrl.drop_local_plan()
            return None
        if req is None:
            self.last_status = "no_sessions"
            self.ctrl.drop_local_plan()  # its sessions are gone or done: nothing to follow
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
            self.ctrl.drop_local_plan()
            return None
        except Exception:
            self.failures += 1
            self.last_status = "failed"
            log.exception("local plan failed; allocator alone")
            self.ctrl.drop_local_plan()
            return None
        self.last_status = res.status
        if not res.ok:
            self.failures += 1
            log.warning("local plan %s; allocator alone", res.status)
            # The old plan was made for what was then known (a price, a limit, a session that
            # has changed since): following it would hold cars to it until it goes stale.
            self.ctrl.drop_local_plan()
            return None
        try:
            plan = self._targets(res, self.ctrl.clock.now(), req)
        except Exception:
            # A plan that cannot be turned into targets is a failed plan. Unguarded, whatever
            # this raised ended the planner's task, and with it the edge's task group (the
            # control loop included).
            self.failures += 1
            self.last_status = "failed"
            log.exception("local plan: reading its schedule failed; allocator alone")
            self.ctrl.drop_local_plan()
            return None
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
            # Read the chargers' energy between plans (the demand windows' peak and the
            # window under way, ``DemandWindows``).
            due = ctrl.clock.monotonic() + ctrl.cfg.replan_every_s
            while not self._stopping and not ctrl.replan_wanted.is_set():
                left = due - ctrl.clock.monotonic()
                if left <= 0:
                    break
                await self._sleep(min(left, WINDOW_SAMPLE_S), ctrl.replan_wanted)
                try:
                    self.windows.sample(ctrl.clock.now(), ctrl.state.chargers)
                except Exception:  # (as in plan_now: a failed reading never ends the edge)
                    log.exception("demand windows: reading the chargers' energy failed")
                await self.save_windows()
