"""Test-only closed loop on a synthetic ACN-like day: a simple stepped car park (cars draw what
they are allowed until full, leave at departure) under three controllers:

- ``llf``: least-laxity-first as acnportal's sorted algorithms do it — sessions in laxity order,
  each given the highest rate in ``[min_a, max_a]`` (or 0) that keeps every node's exact line
  currents within their limits, given the rates already handed out; no price, no peak;
- ``allocator``: the Rust allocator alone (``evcore.allocator.allocate``, no plan);
- ``planner``: the planner (``evcore.planner``) re-planned every control step over the connected
  sessions (receding horizon, one planner object, growing steps, the day's peak so far as the
  demand floor and the energy already in the current window), its current-step targets handed
  to the allocator as ``target_a`` — the allocator's output (which has passed the envelope) is
  what the cars get;
- ``planner_envelope``: the same plans, their current-step targets sent through the envelope
  (``evcore.envelope.enforce``) alone: the plan's own quality, without the allocator's model.

The stepping is deliberately simple (no OCPP, no bus: the digital twin does that); it measures
energy, energy cost, the 15-minute clock-aligned peak at the meter and every node's line
currents, the latter checked independently of the controllers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from evcore.allocator import AllocatorParams, allocate
from evcore.envelope import enforce
from evcore.planner import (
    Planner,
    PlanRequest,
    PlanResult,
    PlanSession,
    PlanWeights,
    network_from_site,
    step_grid,
)
from evcore.site import Site, load_site
from planner_acn_synth import PHASES, DaySession, acn_day, acn_network, tou_price
from planner_cvxpy_reference import phasors

CONTROL_S = 300.0
WINDOW_S = 900.0
DEMAND_CHARGE_PER_KW = 0.5  # per kW of the day's peak window (a monthly charge / ~30)
PLAN_HORIZON_S = 12 * 3600.0
CHARGE_EARLY_PER_KWH = 1e-3


def acn_site(transformer_a: float, panel_a: float) -> tuple[Site, dict[str, Any]]:
    """The synthetic network as a site (for the allocator and the envelope) and, through
    ``network_from_site``, as the planner's nodes and chargers."""
    nodes, chargers = acn_network(54, transformer_a=transformer_a, panel_a=panel_a)
    table = {
        "site": {"id": "acn-synth", "phase_names": list(PHASES), "voltage_ln_v": 120.0},
        "nodes": [
            {"id": n.id, "phase_limit_a": n.phase_limit_a}
            | ({"parent": n.parent} if n.parent else {})
            for n in nodes
        ],
        "chargers": [
            {
                "id": c.id,
                "parent": c.parent,
                "wiring": c.wiring,
                "phases": list(c.phases),
                "voltage_v": c.voltage_v,
                "min_a": 6.0,
                "max_a": c.max_a,
            }
            for c in chargers
        ],
    }
    site = load_site(table)
    plan_nodes, plan_chargers = network_from_site(site)
    return site, {"nodes": plan_nodes, "chargers": plan_chargers}


class Network:
    """Exact line currents of every node for a vector of charger currents (numpy phasors)."""

    def __init__(self, site: Site) -> None:
        n_nodes, n_ch = len(site.nodes), len(site.chargers)
        self.limits = np.array([n.phase_limit_a for n in site.nodes])  # (nodes, 3)
        # M[node, phase, charger]: complex line current per ampere of the charger.
        self.m = np.zeros((n_nodes, 3, n_ch), dtype=complex)
        ix = {n.id: i for i, n in enumerate(site.nodes)}
        for j, c in enumerate(site.chargers):
            coeff, _, _ = phasors(
                {"kind": c.kind, "wiring": c.wiring, "phases": list(c.phases), "voltage_v": 1.0}
            )
            node: str | None = c.parent
            while node is not None:
                self.m[ix[node], :, j] += coeff
                node = site.nodes[ix[node]].parent
        self.site_kw_per_a = np.array([c.voltage_v / 1000.0 for c in site.chargers])

    def currents(self, rates: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.abs(self.m @ rates)
        return out

    def fits(self, rates: np.ndarray) -> bool:
        return bool(np.all(self.currents(rates) <= self.limits + 1e-6))


@dataclass
class DayResult:
    delivered_kwh: float = 0.0
    requested_kwh: float = 0.0
    energy_cost: float = 0.0
    peak_kw: float = 0.0
    limit_violations: int = 0
    plan_statuses: dict[str, int] = field(default_factory=dict)
    plans_reusing_solver: int = 0
    plan_solve_s: list[float] = field(default_factory=list)
    site_kw: list[tuple[float, float]] = field(default_factory=list)

    @property
    def cost(self) -> float:
        return self.energy_cost + DEMAND_CHARGE_PER_KW * self.peak_kw


def llf_rates(
    net: Network,
    active: list[tuple[int, DaySession, float]],
    now: float,
    min_a: float,
    max_a: float,
    v: float,
) -> np.ndarray:
    """acnportal-style least laxity first with the exact network check (bisection per session)."""
    rates = np.zeros(net.m.shape[2])

    def laxity(item: tuple[int, DaySession, float]) -> float:
        _, s, left = item
        return (s.departure_s - now) - left / (max_a * v / 1000.0) * 3600.0

    for j, _s, left in sorted(active, key=laxity):
        cap = min(max_a, left / (v / 1000.0) / (CONTROL_S / 3600.0))
        if cap < min_a:
            # A nearly full car still takes the minimum (the car stops by itself when full).
            cap = min_a
        rates[j] = min_a
        if not net.fits(rates):
            rates[j] = 0.0
            continue
        lo, hi = min_a, cap
        rates[j] = hi
        if not net.fits(rates):
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                rates[j] = mid
                if net.fits(rates):
                    lo = mid
                else:
                    hi = mid
            rates[j] = lo
    return rates


def plan_request(
    now: float,
    active: list[tuple[int, DaySession, float]],
    planner_net: dict[str, Any],
    peak_floor_kw: float,
    window_kwh: float,
) -> PlanRequest:
    last = max(s.departure_s for _, s, _ in active)
    horizon = min(PLAN_HORIZON_S, max(CONTROL_S, last - now))
    steps = step_grid(horizon)
    mids = np.cumsum([0.0, *steps[:-1]]) + np.array(steps) / 2 + now
    return PlanRequest(
        start=now,
        step_s=steps,
        price_per_kwh=[tou_price(float(t)) for t in mids],
        nodes=planner_net["nodes"],
        chargers=planner_net["chargers"],
        sessions=[
            PlanSession(s.id, s.charger_id, s.arrival_s, s.departure_s, left)
            for _, s, left in active
        ],
        demand_charge_per_kw=DEMAND_CHARGE_PER_KW,
        demand_window_s=WINDOW_S,
        peak_floor_kw=peak_floor_kw,
        current_window_energy_kwh=window_kwh,
        weights=PlanWeights(charge_early_per_kwh=CHARGE_EARLY_PER_KWH),
        phase_names=PHASES,
    )


def run_day(
    policy: str,
    *,
    seed: int = 11,
    n_sessions: int = 110,
    transformer_a: float = 240.0,
    panel_a: float = 160.0,
    plan_budget_s: float = 30.0,
) -> DayResult:
    site, planner_net = acn_site(transformer_a, panel_a)
    net = Network(site)
    day = acn_day(seed, n_sessions)
    ch_ix = {c.id: j for j, c in enumerate(site.chargers)}
    n_ch = len(site.chargers)
    v = site.chargers[0].voltage_v
    min_a, max_a = site.chargers[0].min_a, site.chargers[0].max_a
    left = {s.id: s.energy_kwh for s in day}
    out = DayResult(requested_kwh=sum(left.values()))
    planner = Planner() if policy.startswith("planner") else None
    last_sent = np.zeros(n_ch)
    on_since = np.full(n_ch, math.nan)
    off_since = np.full(n_ch, math.nan)
    switches = np.zeros(n_ch, dtype=np.int64)
    window_kwh: dict[float, float] = {}  # clock-aligned window start -> kWh imported

    t = math.floor(min(s.arrival_s for s in day) / CONTROL_S) * CONTROL_S
    end = max(s.departure_s for s in day)
    while t < end:
        present = [s for s in day if s.arrival_s <= t < s.departure_s]
        active = [(ch_ix[s.charger_id], s, left[s.id]) for s in present if left[s.id] > 1e-9]
        rates = np.zeros(n_ch)
        if active and policy == "llf":
            rates = llf_rates(net, active, t, min_a, max_a, v)
        elif active:
            target = np.full(n_ch, math.nan)
            if planner is not None:
                w0 = math.floor(t / WINDOW_S) * WINDOW_S
                peak_floor = out.peak_kw
                req = plan_request(t, active, planner_net, peak_floor, window_kwh.get(w0, 0.0))
                res: PlanResult = planner.plan(req, plan_budget_s)
                out.plan_statuses[res.status] = out.plan_statuses.get(res.status, 0) + 1
                out.plans_reusing_solver += bool(res.summary["reused_solver"])
                out.plan_solve_s.append(float(res.summary["total_time_s"]))
                if res.ok:
                    for cid, (ta, _) in res.targets_at(t + 1.0).items():
                        target[ch_ix[cid]] = ta if ta is not None else math.nan
                    for j, _, _ in active:
                        if math.isnan(target[j]):
                            target[j] = 0.0
            if policy == "planner_envelope":
                req_a = np.where(np.isnan(target), 0.0, target)
                eb = enforce(site, {"requested_a": req_a, "last_sent_a": last_sent}, explain=False)
                rates = np.asarray(eb.column("setpoint_a").to_numpy(zero_copy_only=False))
            connected = np.zeros(n_ch, dtype=bool)
            wanted = np.zeros(n_ch)
            departure = np.full(n_ch, math.nan)
            for j, s, e in active:
                connected[j] = True
                wanted[j] = e
                departure[j] = s.departure_s
            batch = (
                None
                if policy == "planner_envelope"
                else allocate(
                    site,
                    {
                        "requested_a": np.full(n_ch, max_a),
                        "connected": connected,
                        "energy_wanted_kwh": wanted,
                        "departure_s": departure,
                        "target_a": target,
                        "last_sent_a": last_sent,
                        "on_since_s": on_since,
                        "off_since_s": off_since,
                        "switches": switches,
                    },
                    params=AllocatorParams(now_s=t),
                    explain=False,
                )
            )
            if batch is not None:
                rates = np.asarray(batch.column("setpoint_a").to_numpy(zero_copy_only=False))
        # Book-keeping of on/off for the allocator's min on/off times.
        for j in range(n_ch):
            if rates[j] > 0 and last_sent[j] == 0:
                on_since[j] = t
                switches[j] += 1
            elif rates[j] == 0 and last_sent[j] > 0:
                off_since[j] = t
                switches[j] += 1
        last_sent = rates.copy()
        if not net.fits(rates):
            out.limit_violations += 1
        # Cars draw what they are allowed until full.
        kw = 0.0
        for j, s, e in active:
            dt = min(CONTROL_S, s.departure_s - t)
            kwh = min(e, rates[j] * v / 1000.0 * dt / 3600.0)
            left[s.id] = e - kwh
            out.delivered_kwh += kwh
            kw += kwh * 3600.0 / CONTROL_S
        out.site_kw.append((t, kw))
        out.energy_cost += tou_price(t + 1.0) * kw * CONTROL_S / 3600.0
        w0 = math.floor(t / WINDOW_S) * WINDOW_S
        window_kwh[w0] = window_kwh.get(w0, 0.0) + kw * CONTROL_S / 3600.0
        out.peak_kw = max(out.peak_kw, window_kwh[w0] * 3600.0 / WINDOW_S)
        # Sessions that ended: reset the charger's state.
        for j, s, _ in active:
            if s.departure_s <= t + CONTROL_S:
                last_sent[j] = 0.0
                on_since[j] = off_since[j] = math.nan
                switches[j] = 0
        t += CONTROL_S
    return out


def main() -> None:
    """Print the day's figures for every policy (docs/planner.md quotes them)."""
    for policy in ("llf", "allocator", "planner", "planner_envelope"):
        r = run_day(policy, transformer_a=416.0, panel_a=416.0)
        solve = sorted(r.plan_solve_s)
        med = f" plan median {solve[len(solve) // 2] * 1e3:.0f} ms" if solve else ""
        print(
            f"{policy:17s} delivered {r.delivered_kwh:7.1f} of {r.requested_kwh:.1f} kWh"
            f"  energy cost {r.energy_cost:6.2f}  peak {r.peak_kw:5.1f} kW"
            f"  cost with demand charge {r.cost:6.2f}  violations {r.limit_violations}"
            f"  plans {r.plan_statuses}{med}"
        )


if __name__ == "__main__":
    main()
