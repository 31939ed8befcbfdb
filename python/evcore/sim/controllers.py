"""Controllers the twin's in-process loop can drive, one per policy.

``make_controller(policy, scenario)`` picks the realest implementation available in this build:

1. the Rust core (``evcore._core`` allocator + envelope, and its planner for the planner policies),
   called exactly as the edge calls it, per tick, on the twin's ``SiteView``;
2. otherwise a plain numpy **reference** of the same ideas (water-filling under linear per-phase
   limits, least-laxity admission, an LP plan through cvxpy). The reference is a stand-in so the
   twin and the report can run before the core is built; every result row says which parts were in
   the loop (``in_loop``), and the demo prints it.

``uncontrolled`` is the site without any controller: every charger at its maximum.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from evcore.sim.scenario import ChargerSpec, Scenario, SiteSpec
from evcore.sim.twin import F64, Controller, SiteView

REFERENCE_TAG = "numpy reference (not the Rust core)"
PLAN_RATE_SHARE = 0.8
PLAN_FINISH_EARLY_S = 3600.0


def _upper(c: ChargerSpec) -> float:
    return c.max_w if c.kind == "dc" else c.max_a


def _lower(c: ChargerSpec) -> float:
    return c.min_w if c.kind == "dc" else c.min_a


class Uncontrolled:
    name = "uncontrolled"
    baseline = True  # the twin sends nothing: chargers allow their own maximum
    in_loop: tuple[str, ...] = ("no controller: chargers at their maximum",)

    def __init__(self, site: SiteSpec) -> None:
        self._max = np.array([_upper(c) for c in site.chargers], dtype=np.float64)

    def decide(self, view: SiteView) -> F64:
        return self._max.copy()


class LinearLimits:
    """Per-unit-setpoint loads on every node-phase and node-kW row, counted conservatively
    (a line-to-line charger's current on both of its lines, a three-phase charger on all three,
    building load at its configured maximum)."""

    def __init__(self, site: SiteSpec) -> None:
        self.site = site
        nodes = site.nodes
        idx = {n.id: i for i, n in enumerate(nodes)}
        parent = {n.id: n.parent for n in nodes}
        n_nodes, n_ch = len(nodes), len(site.chargers)
        below = np.zeros((n_nodes, n_ch))
        for k, c in enumerate(site.chargers):
            p: str | None = c.parent
            while p is not None:
                below[idx[p], k] = 1.0
                p = parent[p]
        other = np.zeros((n_nodes, 3))
        for nd in nodes:  # a node carries the building load of its subtree
            q: str | None = nd.id
            while q is not None:
                other[idx[q]] += np.array(nd.other_load_max_a)
                q = parent[q]
        per_phase = np.zeros((n_ch, 3))
        kw_per_unit = np.zeros(n_ch)
        # What reaches the battery per unit of setpoint (kW): a DC setpoint is the DC output.
        battery_kw_per_unit = np.zeros(n_ch)
        self.aux_a = np.zeros(n_ch)
        self.aux_kw = np.zeros(n_ch)
        for k, c in enumerate(site.chargers):
            if c.kind == "dc":
                for ph in c.phases:
                    per_phase[k, ph] = 1.0 / (c.efficiency * 3.0 * site.voltage_ln_v)
                kw_per_unit[k] = 1.0 / (c.efficiency * 1000.0)
                battery_kw_per_unit[k] = 1.0 / 1000.0
                self.aux_a[k] = c.aux_w / (3.0 * site.voltage_ln_v)
                self.aux_kw[k] = c.aux_w / 1000.0
            else:
                for ph in c.phases:
                    per_phase[k, ph] = 1.0
                kw_per_unit[k] = c.voltage_v * len(c.phases) / 1000.0
                if c.wiring == "line_to_line":
                    kw_per_unit[k] = c.voltage_v / 1000.0
                battery_kw_per_unit[k] = kw_per_unit[k]
        rows = []
        caps = []
        self.row_names: list[str] = []
        for i, nd in enumerate(nodes):
            for ph in range(3):
                rows.append(below[i] * per_phase[:, ph])
                caps.append(nd.phase_limit_a[ph] - other[i, ph])
                self.row_names.append(f"{nd.id}/{site.phase_names[ph]}")
        self.n_phase_rows = len(rows)
        for i, nd in enumerate(nodes):
            rows.append(below[i] * kw_per_unit)
            lim = nd.power_limit_kw if nd.power_limit_kw is not None else math.inf
            caps.append(lim - other[i].sum() * site.voltage_ln_v / 1000.0)
            self.row_names.append(f"{nd.id}/kW")
        self.G = np.array(rows)
        self.base_caps = np.array(caps)
        self.node_ids = [nd.id for nd in nodes]
        self.below = below
        self.kw_per_unit = kw_per_unit
        self.battery_kw_per_unit = battery_kw_per_unit
        self.other_kw = other.sum(axis=1) * site.voltage_ln_v / 1000.0

    def caps(self, view: SiteView, node_kw: dict[str, float] | None = None) -> F64:
        b = self.base_caps.copy()
        lims = view.node_power_limit_kw if node_kw is None else node_kw
        for node, lim in lims.items():
            i = self.node_ids.index(node)
            r = self.n_phase_rows + i
            b[r] = min(b[r], lim - self.other_kw[i])
        # DC auxiliary load of connected DC chargers, on the phases and on the kW caps: the site
        # meter counts it (the kW rows once left it out and let a DC site exceed a kW cap by it).
        aux = self.below @ (self.aux_a * view.connected)
        aux_kw = self.below @ (self.aux_kw * view.connected)
        for i in range(len(self.node_ids)):
            b[3 * i : 3 * i + 3] -= aux[i]
            b[self.n_phase_rows + i] -= aux_kw[i]
        out: F64 = np.maximum(b, 0.0)
        return out


def step_inputs(
    sc: Scenario,
    curtailments: Sequence[tuple[float, float, str, float]],
    t0: float,
    step_s: float,
    steps: int,
) -> tuple[F64, list[dict[str, float]]]:
    """Per plan step from ``t0``: the tariff's time-weighted mean price over it, and per node
    the lowest kW cap of the curtailments ((start, end, node, kW), unix s) in force at any
    moment of it. At the step's midpoint a price change or a curtailment away from it was
    missed, and of two curtailments on one node the later listed won, not the lower."""
    prices = np.array(
        [sc.tariff.mean_price(t0 + t * step_s, t0 + (t + 1) * step_s) for t in range(steps)]
    )
    lims: list[dict[str, float]] = []
    for t in range(steps):
        a, b = t0 + t * step_s, t0 + (t + 1) * step_s
        step: dict[str, float] = {}
        for start, end, node, kw in curtailments:
            if start < b and a < end:
                step[node] = min(kw, step.get(node, math.inf))
        lims.append(step)
    return prices, lims


def _water_fill(G: F64, b: F64, upper: F64, weight: F64, active: npt.NDArray[np.bool_]) -> F64:
    """Weighted max-min fair rates: raise every unfrozen rate with one level until a row binds."""
    n = len(upper)
    s = np.zeros(n)
    frozen = ~active | (upper <= 0)
    lam = 0.0
    for _ in range(n + G.shape[0] + 1):
        if frozen.all():
            break
        free = ~frozen

        def load(level: float, free: npt.NDArray[np.bool_] = free, s: F64 = s) -> F64:
            x = s.copy()
            x[free] = np.minimum(upper[free], weight[free] * level)
            return x

        hi = float(np.max(upper[free] / weight[free]))
        if np.all(G @ load(hi) <= b + 1e-9):
            lam = hi
        else:
            lo = lam
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                if np.all(G @ load(mid) <= b + 1e-9):
                    lo = mid
                else:
                    hi = mid
            lam = lo
        s = load(lam)
        slack = b - G @ s
        tight = slack <= 1e-6 * np.maximum(1.0, np.abs(b))
        newly = free & (s >= upper - 1e-9)
        if tight.any():
            newly |= free & (G[tight] > 0).any(axis=0)
        if not newly.any():
            break
        frozen |= newly
    return s


def _round_to_steps(c: ChargerSpec, a: float) -> float:
    if c.kind == "dc" or not c.steps_a or a <= 0:
        return a
    ok = [x for x in c.steps_a if x <= a + 1e-9]
    return ok[-1] if ok else 0.0


class ReferenceController:
    """Fair share, least laxity first, or a plan followed per tick — in numpy (see module doc)."""

    def __init__(self, policy: str, sc: Scenario) -> None:
        self.name = policy
        self.sc = sc
        self.site = sc.site
        self.lin = LinearLimits(sc.site)
        self.upper = np.array([_upper(c) for c in sc.site.chargers])
        self.lower = np.array([_lower(c) for c in sc.site.chargers])
        self.in_loop: tuple[str, ...] = (f"{policy}: {REFERENCE_TAG}",)
        if policy.startswith("planner"):
            self.in_loop = (f"{policy}: cvxpy LP plan + {REFERENCE_TAG}",)
        self._plan: dict[str, Any] | None = None
        self._plan_t = -math.inf

    def restart(self) -> None:
        self._plan = None
        self._plan_t = -math.inf

    def _demand(self, view: SiteView) -> tuple[npt.NDArray[np.bool_], F64, F64]:
        remaining = np.maximum(view.energy_requested_kwh - view.energy_delivered_kwh, 0.0)
        active = view.connected & (remaining > 0.01)
        rate_kw = self.upper * self.lin.battery_kw_per_unit  # remaining is battery energy
        hours_left = np.maximum((view.departure - view.now) / 3600.0, 1e-6)
        laxity = np.where(active, hours_left - remaining / np.maximum(rate_kw, 1e-9), np.inf)
        return active, remaining, laxity

    def decide(self, view: SiteView) -> F64:
        active, remaining, laxity = self._demand(view)
        b = self.lin.caps(view)
        upper = np.where(active, self.upper, 0.0)
        # Do not hand out what a car measurably does not take (headroom reclaimed, with a margin).
        fresh = view.measured_age_s <= 2.5 * self.sc.meter_interval_s
        drawing_less = fresh & (view.measured > 0) & (view.last_setpoint - view.measured > 1.0)
        upper = np.where(drawing_less, np.minimum(upper, view.measured + 2.0), upper)
        if self.name == "least_laxity":
            s = self._llf(upper, b, laxity, active)
        else:
            if self.name.startswith("planner"):
                upper = np.minimum(upper, self._targets(view, active, remaining))
            s = self._fair(upper, b, laxity, active)
        return np.array(
            [_round_to_steps(c, float(x)) for c, x in zip(self.site.chargers, s, strict=True)]
        )

    def _fair(self, upper: F64, b: F64, laxity: F64, active: npt.NDArray[np.bool_]) -> F64:
        act = active & (upper > 0)
        weight = np.ones_like(upper)
        while True:
            s = _water_fill(self.lin.G, b, upper, weight, act)
            short = act & (s < self.lower - 1e-9)
            if not short.any():
                return np.where(act, s, 0.0)
            # 6 A rule: pause the session with the most laxity among those short of their minimum
            cand = np.where(short, laxity, -np.inf)
            act[int(np.argmax(cand))] = False

    def _llf(self, upper: F64, b: F64, laxity: F64, active: npt.NDArray[np.bool_]) -> F64:
        s = np.zeros_like(upper)
        G = self.lin.G
        for k in np.argsort(np.where(active, laxity, np.inf), kind="stable"):
            if not active[k] or upper[k] <= 0:
                continue
            slack = b - G @ s
            col = G[:, k]
            room = np.where(col > 0, slack / np.where(col > 0, col, 1.0), np.inf)
            x = min(float(upper[k]), float(room.min()))
            s[k] = x if x >= self.lower[k] - 1e-9 else 0.0
        return s

    # -- the reference plan --------------------------------------------------------------------
    def _targets(self, view: SiteView, active: npt.NDArray[np.bool_], remaining: F64) -> F64:
        if (
            self._plan is None
            or view.now - self._plan_t >= self.sc.plan_interval_s
            or any(e.startswith(("arrive", "depart", "grid")) for e in view.events)
        ):
            self._plan = self._solve(view, active, remaining)
            self._plan_t = view.now
        plan = self._plan
        pos = (view.now - plan["t0"]) / plan["step_s"]
        step = int(pos)
        out = np.full_like(self.upper, 0.0)
        rates = plan["rates"]
        dt_h = plan["step_s"] / 3600.0
        for k in range(len(out)):
            if rates is None:
                out[k] = self.upper[k]
                continue
            if 0 <= step < rates.shape[1]:
                out[k] = rates[k, step]
                # A session behind its plan (more left than the plan still delivers) is not held
                # to the target: the allocator's rule, so the plan never costs energy.
                future = (rates[k, step] * (step + 1 - pos) + rates[k, step + 1 :].sum()) * dt_h
                if remaining[k] > future * self.lin.battery_kw_per_unit[k] + 0.05:
                    out[k] = self.upper[k]
        # A session behind its plan may take more than the target (allocator rule); at the 6 A
        # floor a small target rounds up so that planned energy is not lost to the pilot minimum.
        out = np.where((out > 0.5) & (out < self.lower), self.lower, out)
        return np.where(active, out, 0.0)

    def _solve(
        self, view: SiteView, active: npt.NDArray[np.bool_], remaining: F64
    ) -> dict[str, Any]:
        cp: Any = importlib.import_module("cvxpy")  # untyped

        sc = self.sc
        step_s = sc.plan_step_s
        t0 = view.now
        T = max(1, math.ceil(sc.plan_horizon_h * 3600.0 / step_s))
        ks = [k for k in range(len(self.upper)) if active[k]]
        if not ks:
            return {"t0": t0, "step_s": step_s, "rates": np.zeros((len(self.upper), T))}
        dt_h = step_s / 3600.0
        x = cp.Variable((len(ks), T), nonneg=True)
        cons = []
        mask = np.zeros((len(ks), T))
        for j, k in enumerate(ks):
            last = (view.departure[k] - PLAN_FINISH_EARLY_S - t0) / step_s
            for t in range(T):
                # the fraction of step t before departure
                mask[j, t] = float(np.clip(last - t, 0.0, 1.0))
        # Plan below the chargers' maximum and finish before departure: cars taper near full,
        # and a plan that needs the last minutes at full power loses energy.
        cons.append(x <= PLAN_RATE_SHARE * self.upper[ks][:, None] * mask)
        G = self.lin.G[:, ks]
        prices, step_lims = step_inputs(sc, view.curtailments, t0, step_s, T)
        B = np.empty((G.shape[0], T))
        for t in range(T):
            B[:, t] = self.lin.caps(view, step_lims[t])
        rows = np.isfinite(B).all(axis=1) & (G > 0).any(axis=1)
        cons.append(G[rows] @ x <= B[rows])
        kwp = self.lin.kw_per_unit[ks]  # grid side, for cost and peak
        # ``remaining`` is what the batteries still want: a DC setpoint's kW reach the battery,
        # its grid-side kW (over the efficiency) do not (the plan once fell short by 1 - eff).
        energy = cp.multiply(self.lin.battery_kw_per_unit[ks][:, None], x) @ np.ones(T) * dt_h
        unmet = cp.pos(remaining[ks] - energy)
        cons.append(energy <= remaining[ks] + 1e-6)
        site_kw = kwp @ x
        peak = cp.Variable(nonneg=True)
        cons.append(site_kw <= peak)
        big = 10.0 * (float(prices.max()) + sc.demand_charge.price_per_kw + 1.0)
        cost = (kwp @ x * dt_h) @ prices
        early = cp.sum(cp.multiply(np.arange(T)[None, :] * 1e-4 * dt_h, x))
        if self.name == "planner_peak":
            obj = big * cp.sum(unmet) + peak * (sc.demand_charge.price_per_kw + 1.0) + 1e-3 * cost
        else:
            obj = big * cp.sum(unmet) + cost + sc.demand_charge.price_per_kw * peak + early
        prob = cp.Problem(cp.Minimize(obj), cons)
        try:
            prob.solve(solver=cp.CLARABEL)
        except Exception:  # solver failure: fall back to the allocator alone
            return {"t0": t0, "step_s": step_s, "rates": None}
        if x.value is None:
            return {"t0": t0, "step_s": step_s, "rates": None}
        rates = np.zeros((len(self.upper), T))
        rates[ks] = np.maximum(x.value, 0.0)
        return {"t0": t0, "step_s": step_s, "rates": rates}


def make_controller(policy: str, sc: Scenario) -> Controller:
    """The realest controller for ``policy`` in this build (see the module docstring)."""
    if policy == "uncontrolled":
        return Uncontrolled(sc.site)
    return ReferenceController(policy, sc)


def describe(controllers: Sequence[Controller]) -> list[str]:
    out: list[str] = []
    for c in controllers:
        for part in c.in_loop:
            if part not in out:
                out.append(part)
    return out
