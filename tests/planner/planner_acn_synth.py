"""Synthetic ACN-like data (test and benchmark only, seeded): 54 line-to-line Level 2 chargers on
a 208 V three-phase transformer with two panels, a time-of-use price, a day of sessions, and
random feasible planning problems of any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from evcore.planner import (
    PlanCharger,
    PlanNode,
    PlanRequest,
    PlanSession,
    PlanWeights,
    step_grid,
    to_core_input,
)

DAY0 = 1_764_806_400.0  # 2025-12-04T00:00:00Z, clock-aligned
PAIRS = (("A", "B"), ("B", "C"), ("C", "A"))
PHASES = ("A", "B", "C")


def acn_network(
    n_chargers: int = 54,
    transformer_a: float = 240.0,
    panel_a: float = 160.0,
    max_a: float = 32.0,
) -> tuple[list[PlanNode], list[PlanCharger]]:
    """Transformer (line limit) → two panels; chargers alternate between the panels and cycle
    through AB, BC, CA."""
    nodes = [
        PlanNode("transformer", transformer_a),
        PlanNode("panel-1", panel_a, parent="transformer"),
        PlanNode("panel-2", panel_a, parent="transformer"),
    ]
    chargers = [
        PlanCharger(
            f"evse-{i:03d}",
            "panel-1" if i % 2 == 0 else "panel-2",
            "line_to_line",
            PAIRS[(i // 2) % 3],
            208.0,
            max_a=max_a,
        )
        for i in range(n_chargers)
    ]
    return nodes, chargers


def tou_price(t: float) -> float:
    """SCE-like time of use ($/kWh): super off-peak 8-16 h... simplified: night 0.08,
    day 0.12, peak 16-21 h 0.30."""
    h = ((t - DAY0) / 3600.0) % 24.0
    if 16.0 <= h < 21.0:
        return 0.30
    if 8.0 <= h < 16.0:
        return 0.12
    return 0.08


@dataclass
class DaySession:
    id: str
    charger_id: str
    arrival_s: float
    departure_s: float
    energy_kwh: float


def acn_day(seed: int, n_sessions: int = 110, n_chargers: int = 54) -> list[DaySession]:
    """A workplace day: arrivals peak at 8-9 h, dwell 2-10 h, requests 5-40 kWh. A car that finds
    no free charger leaves."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(
        np.concatenate(
            [
                rng.normal(8.5, 1.2, size=int(n_sessions * 0.7)),
                rng.uniform(10.0, 19.0, size=n_sessions - int(n_sessions * 0.7)),
            ]
        )
    )
    arrivals = np.clip(arrivals, 5.0, 21.0)
    free_at = np.full(n_chargers, -math.inf)
    out: list[DaySession] = []
    for i, a_h in enumerate(arrivals):
        a = DAY0 + float(a_h) * 3600.0
        a = round(a / 60.0) * 60.0
        dwell_h = float(np.clip(rng.lognormal(math.log(5.0), 0.45), 1.5, 11.0))
        d = a + round(dwell_h * 60.0) * 60.0
        energy = float(np.clip(rng.gamma(3.0, 4.5), 4.0, 40.0))
        free = np.flatnonzero(free_at <= a)
        if free.size == 0:
            continue
        c = int(rng.choice(free))
        free_at[c] = d
        out.append(DaySession(f"sess-{i:04d}", f"evse-{c:03d}", a, d, energy))
    return out


def random_request(
    rng: np.random.Generator,
    n_sessions: int,
    horizon_h: float,
    *,
    n_chargers: int | None = None,
    grid: list[float] | None = None,
    mixed_wiring: bool = True,
    demand_charge: bool = True,
) -> dict[str, Any]:
    """A random feasible planning problem as a core input document."""
    n_chargers = n_chargers or max(6, n_sessions)
    start = DAY0 + float(rng.integers(0, 96)) * 900.0 + float(rng.choice([0.0, 120.0, 450.0]))
    steps = grid or step_grid(horizon_h * 3600.0)
    T = len(steps)
    limit = float(rng.uniform(10.0, 20.0)) * n_chargers / 3.0
    other_kw = float(rng.uniform(0.0, 20.0))
    cap_kw = other_kw + rng.uniform(0.3, 1.0, T) * n_chargers * 6.6 / 4.0
    # Half the problems carry a curtailment: per-step phase limits dipping to half.
    root_limit: Any = (limit, limit * 1.1, limit * 0.9)
    if rng.random() < 0.5:
        dip = rng.uniform(0.5, 1.0, T)
        root_limit = [[float(v * f) for v in dip] for f in (limit, limit * 1.1, limit * 0.9)]
    nodes = [
        PlanNode(
            "root",
            root_limit,
            other_load_a=tuple(float(x) for x in rng.uniform(0.0, 10.0, 3)),
            other_load_kw=other_kw,
            power_limit_kw=[float(v) for v in cap_kw] if rng.random() < 0.5 else None,
        ),
        PlanNode("sub", limit * 0.6, parent="root"),
    ]
    chargers: list[PlanCharger] = []
    for i in range(n_chargers):
        parent = "sub" if i % 3 == 0 else "root"
        kind = int(rng.integers(0, 4)) if mixed_wiring else 1
        if kind == 0:
            chargers.append(
                PlanCharger(f"c{i}", parent, "line_to_neutral", [PHASES[i % 3]], 120.0, max_a=32.0)
            )
        elif kind == 1:
            chargers.append(
                PlanCharger(f"c{i}", parent, "line_to_line", PAIRS[i % 3], 208.0, max_a=32.0)
            )
        elif kind == 2:
            rot = [PHASES[(i + j) % 3] for j in range(3)]
            chargers.append(PlanCharger(f"c{i}", parent, "three_phase", rot, 120.0, max_a=16.0))
        else:
            chargers.append(
                PlanCharger(
                    f"c{i}",
                    parent,
                    "three_phase",
                    list(PHASES),
                    120.0,
                    kind="dc",
                    max_w=20_000.0,
                    min_w=2_000.0,
                )
            )
    end = start + sum(steps)
    sessions = []
    for j in range(n_sessions):
        a = start + float(rng.uniform(-3600.0, 0.6 * (end - start)))
        d = a + float(rng.uniform(0.5, 1.0)) * (end - start)
        sessions.append(
            PlanSession(
                f"s{j}",
                f"c{j % n_chargers}",
                a,
                d,
                float(rng.uniform(2.0, 40.0)),
                priority=float(rng.choice([1.0, 1.0, 2.0])),
            )
        )
    prices = [tou_price(start + sum(steps[:k])) for k in range(T)]
    req = PlanRequest(
        start=start,
        step_s=steps,
        price_per_kwh=prices,
        nodes=nodes,
        chargers=chargers,
        sessions=sessions,
        pv_kw=[float(v) for v in np.maximum(0.0, rng.normal(10.0, 5.0, T))],
        demand_charge_per_kw=float(rng.uniform(0.2, 1.0)) if demand_charge else 0.0,
        peak_floor_kw=float(rng.uniform(0.0, 30.0)),
        current_window_energy_kwh=float(rng.uniform(0.0, 5.0)),
        weights=PlanWeights(
            non_delivery_per_kwh=float(rng.uniform(1.0, 10.0)),
            charge_early_per_kwh=1e-3,
            equal_share=1e-3,
            smooth=1e-3,
        ),
        phase_names=PHASES,
    )
    return to_core_input(req)


def acn_case(
    seed: int,
    n_sessions: int = 50,
    horizon_h: float = 12.0,
    *,
    n_chargers: int = 54,
    now_h: float = 10.0,
    grid: list[float] | None = None,
) -> dict[str, Any]:
    """A busy moment on the ACN-like network: ``n_sessions`` connected sessions (several per
    charger over a long horizon when there are more sessions than chargers)."""
    rng = np.random.default_rng(seed)
    nodes, chargers = acn_network(
        n_chargers, transformer_a=240.0 * n_chargers / 54, panel_a=160.0 * n_chargers / 54
    )
    start = DAY0 + now_h * 3600.0
    steps = grid or step_grid(horizon_h * 3600.0)
    end = start + sum(steps)
    sessions = []
    per_charger = math.ceil(n_sessions / n_chargers)
    slot = (end - start + 2 * 3600.0) / per_charger
    for j in range(n_sessions):
        c = j % n_chargers
        k = j // n_chargers
        lo = start - 3 * 3600.0 + k * slot
        a = float(rng.uniform(lo, lo + 0.3 * slot)) if k else float(rng.uniform(lo, start))
        d = float(min(a + rng.uniform(0.5, 0.95) * slot + (3 * 3600.0 if k == 0 else 0.0), end))
        if d <= start:
            d = start + float(rng.uniform(1800.0, 4 * 3600.0))
        sessions.append(
            PlanSession(
                f"s{j}",
                chargers[c].id,
                a,
                d,
                float(np.clip(rng.gamma(3.0, 4.0), 3.0, 35.0)),
                priority=float(rng.choice([1.0, 1.0, 1.0, 2.0])),
            )
        )
    # One car per charger at a time (the planner refuses overlapping windows): a session leaves
    # when the next one on its charger arrives. Sessions of one charger arrive in order of j.
    for j in range(n_sessions - n_chargers):
        s, nxt = sessions[j], sessions[j + n_chargers]
        assert float(nxt.arrival) > float(s.arrival)
        if float(s.departure) > float(nxt.arrival):
            sessions[j] = replace(s, departure=nxt.arrival)
    prices = [tou_price(start + sum(steps[:k]) + 1.0) for k in range(len(steps))]
    req = PlanRequest(
        start=start,
        step_s=steps,
        price_per_kwh=prices,
        nodes=nodes,
        chargers=chargers,
        sessions=sessions,
        demand_charge_per_kw=0.5,
        peak_floor_kw=20.0,
        weights=PlanWeights(),
        phase_names=PHASES,
    )
    return to_core_input(req)
