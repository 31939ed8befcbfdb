"""The digital twin: one scenario, one policy, simulated time, measured outcome.

``run_policy`` plays a scenario's sessions, tariff, grid signals and faults against a controller on
the virtual clock and measures what happened at the site: per-charger currents as the vehicles draw
them, every node's line currents (phasor sums, line-to-line loads included) sampled every 100 ms of
simulated time, energy, cost, the demand-charge peak and violations. ``compare`` runs several
policies on the same sessions.

Between two events (a control decision, a profile taking effect, an arrival, a departure, a meter
report, a fault, a curtailment edge, a car finishing) every current is constant, so the twin steps
from event to event and counts the 100 ms samples of each interval exactly rather than iterating
over them. Time comes from ``VirtualClock``; nothing here reads the wall clock except the progress
bar.

What the twin must never do: let a controller see the future (it sees meter reports with their
age, not the physics), or hide a violation by averaging.
"""

from __future__ import annotations

import asyncio
import cmath
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from evcore.clock import sleep_or_wake
from evcore.sim.arrivals import Arrivals, generate, max_rate_kw
from evcore.sim.chargepoint import offer
from evcore.sim.fleet import connector_for
from evcore.sim.scenario import (
    CONTROLLED_POLICIES,
    ChargerSpec,
    FaultSpec,
    GridSignal,
    Scenario,
    SessionSpec,
    SiteSpec,
)
from evcore.sim.vclock import VirtualClock

F64 = npt.NDArray[np.float64]
C128 = npt.NDArray[np.complex128]
SAMPLE_S = 0.1  # the physics samples every 100 ms of simulated time
OTHER_LOAD_SHARE = 0.5  # actual building load as a share of each node's configured maximum
_EPS_A = 1e-6


# ---------------------------------------------------------------------------------------------
# Site physics: line currents from charger currents
# ---------------------------------------------------------------------------------------------
class LineModel:
    """Every node's per-phase line current and active power from per-charger currents.

    A charger's contribution to each site line is a phasor per ampere of its per-phase current
    (unity power factor, balanced voltages): line-to-neutral on phase a adds 1∠θa to line a;
    line-to-line across a–b adds 1∠θab to line a and −1∠θab to line b; a three-phase charger adds
    1∠θp to each line its car draws on. Node line current = |Σ contributions of the subtree|.
    """

    def __init__(self, site: SiteSpec) -> None:
        self.site = site
        self.node_ids = [n.id for n in site.nodes]
        self.charger_ids = [c.id for c in site.chargers]
        n_nodes, n_ch = len(site.nodes), len(site.chargers)
        idx = {nid: i for i, nid in enumerate(self.node_ids)}
        parent = {n.id: n.parent for n in site.nodes}
        # membership[n, k] = 1 when charger k hangs anywhere under node n
        self.membership = np.zeros((n_nodes, n_ch), dtype=np.float64)
        for k, c in enumerate(site.chargers):
            node: str | None = c.parent
            while node is not None:
                self.membership[idx[node], k] = 1.0
                node = parent[node]
        self.limit_a = np.array([n.phase_limit_a for n in site.nodes], dtype=np.float64)
        self.power_limit_kw = np.array(
            [n.power_limit_kw if n.power_limit_kw is not None else math.inf for n in site.nodes],
            dtype=np.float64,
        )
        other = np.array([n.other_load_max_a for n in site.nodes], dtype=np.float64)
        # Building load that a node's children already carry is counted at the child only.
        self.other_a = other * OTHER_LOAD_SHARE
        self.other_acc_a = self.membership_nodes() @ self.other_a
        self.theta = np.array([0.0, -2 * math.pi / 3, 2 * math.pi / 3])
        self.unit = np.exp(1j * self.theta)
        self.other_acc_phasor = self.other_acc_a * self.unit[None, :]
        self.other_acc_kw = self.other_acc_a.sum(axis=1) * site.voltage_ln_v / 1000.0
        self.contrib = np.zeros((n_ch, 3), dtype=np.complex128)
        self.watts_per_a = np.zeros(n_ch, dtype=np.float64)
        self.root = idx[site.root.id]

    def membership_nodes(self) -> F64:
        """m[n, j] = 1 when node j is node n or below it."""
        nodes = self.site.nodes
        idx = {n.id: i for i, n in enumerate(nodes)}
        m = np.eye(len(nodes))
        for j, n in enumerate(nodes):
            p = n.parent
            while p is not None:
                m[idx[p], j] = 1.0
                p = next(x.parent for x in nodes if x.id == p)
        return m

    def plug(self, k: int, car_phases: int) -> None:
        """Set charger k's contribution for a car that draws on ``car_phases`` phases."""
        c = self.site.chargers[k]
        v = np.zeros(3, dtype=np.complex128)
        if c.kind == "dc":
            for p in c.phases:
                v[p] += self.unit[p]
            # DC current is handled as AC line current per phase, set in line_current_of.
            self.watts_per_a[k] = 3 * self.site.voltage_ln_v
        elif c.wiring == "line_to_neutral":
            v[c.phases[0]] += self.unit[c.phases[0]]
            self.watts_per_a[k] = c.voltage_v
        elif c.wiring == "line_to_line":
            a, b = c.phases
            u = self.unit[a] - self.unit[b]
            u = u / abs(u)
            v[a] += u
            v[b] -= u
            self.watts_per_a[k] = c.voltage_v
        else:
            used = c.phases[: max(1, min(3, car_phases))]
            for p in used:
                v[p] += self.unit[p]
            self.watts_per_a[k] = c.voltage_v * len(used)
        self.contrib[k] = v

    def terminal_map(self) -> C128:
        """(chargers, 3 terminals, 3 site lines): the phasor each terminal ampere adds per line."""
        site = self.site
        out = np.zeros((len(site.chargers), 3, 3), dtype=np.complex128)
        for k, c in enumerate(site.chargers):
            if c.kind == "dc" or c.wiring == "three_phase":
                for i, p in enumerate(c.phases):
                    out[k, i, p] += self.unit[p]
            elif c.wiring == "line_to_neutral":
                out[k, 0, c.phases[0]] += self.unit[c.phases[0]]
            else:
                a, b = c.phases
                u = self.unit[a] - self.unit[b]
                u = u / abs(u)
                out[k, 0, a] += u
                out[k, 0, b] -= u
        return out

    def evaluate_terminals(self, terminal_a: F64, tmap: C128) -> F64:
        """Node line currents (n_nodes, 3) from per-charger terminal currents (chargers, 3)."""
        per_charger = np.einsum("kt,ktl->kl", terminal_a, tmap)
        out: F64 = np.abs(self.membership @ per_charger + self.other_acc_phasor)
        return out

    def evaluate(self, line_a: F64, extra_kw: F64 | None = None) -> tuple[F64, F64]:
        """(node line currents (n_nodes, 3) in A, node active power (n_nodes,) in kW)."""
        ph = self.membership @ (self.contrib * line_a[:, None]) + self.other_acc_phasor
        kw = self.membership @ (self.watts_per_a * line_a) / 1000.0 + self.other_acc_kw
        return np.abs(ph), kw


def dc_line_current_a(c: ChargerSpec, power_w: float, v_ln: float) -> float:
    """AC line current per phase of a DC charger delivering ``power_w``."""
    if power_w <= 0:
        return 0.0
    return (power_w / c.efficiency + c.aux_w) / (3.0 * v_ln)


# ---------------------------------------------------------------------------------------------
# Vehicles (the twin's own simple model for the in-process loop)
# ---------------------------------------------------------------------------------------------
@dataclass
class Car:
    session: SessionSpec
    charger: ChargerSpec
    delivered_kwh: float = 0.0
    ignores_profile: bool = False

    @property
    def remaining_kwh(self) -> float:
        return max(0.0, self.session.energy_kwh - self.delivered_kwh)

    @property
    def soc(self) -> float:
        v = self.session.vehicle
        return min(1.0, self.session.soc_arrival + self.delivered_kwh / v.battery_kwh)

    def taper(self) -> float:
        """CC-CV: full current up to 80 % state of charge, then falling linearly to 10 % at full."""
        s = self.soc
        return 1.0 if s <= 0.8 else max(0.1, (1.0 - s) / 0.2)

    def draw(self, allowed: float) -> float:
        """Per-phase current (AC, A) or DC power (W) the car takes when allowed ``allowed``."""
        if self.remaining_kwh <= 1e-9:
            return 0.0
        c, v = self.charger, self.session.vehicle
        if c.kind == "dc":
            cap = min(c.max_w, v.max_dc_kw * 1000.0) * self.taper()
            return cap if self.ignores_profile else min(allowed, cap)
        cap = min(c.max_a, v.max_a) * self.taper()
        if self.ignores_profile:
            return cap
        if allowed < 6.0 - 1e-9:  # IEC 61851: below 6 A the car does not charge
            return 0.0
        return min(allowed, cap)


# ---------------------------------------------------------------------------------------------
# What a controller sees and returns
# ---------------------------------------------------------------------------------------------
@dataclass
class SiteView:
    """The controller's knowledge at one instant: reports with their age, never the physics."""

    now: float
    connected: npt.NDArray[np.bool_]
    session_ids: list[str | None]
    energy_requested_kwh: F64
    energy_delivered_kwh: F64  # from the last meter report
    departure: F64  # unix s; +inf when no session
    arrival: F64
    measured: F64  # per-phase current (AC, A) or power (DC, W) in the last report
    measured_age_s: F64
    last_setpoint: F64
    node_power_limit_kw: dict[str, float]  # grid signals in force (and coming, for planners)
    curtailments: list[tuple[float, float, str, float]]  # (start, end, node, limit_kw), unix s
    events: list[str] = field(default_factory=list)  # why this decision was triggered


class Controller(Protocol):
    name: str
    in_loop: tuple[str, ...]  # the real parts taking part, e.g. ("rust allocator", "rust envelope")

    def decide(self, view: SiteView) -> F64:
        """Setpoint per charger: A per phase for AC, W for DC. 0 = pause."""
        ...


ControllerFactory = Callable[[str, Scenario], Controller]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
@dataclass
class Series:
    t: list[float] = field(default_factory=list)
    site_kw: list[float] = field(default_factory=list)
    limit_kw: list[float] = field(default_factory=list)
    price: list[float] = field(default_factory=list)
    node_util: list[list[float]] = field(default_factory=list)  # per node: max over phases
    soc: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    chosen_t: list[float] = field(default_factory=list)
    chosen_setpoint: list[float] = field(default_factory=list)
    chosen_measured: list[float] = field(default_factory=list)


@dataclass
class PolicyResult:
    policy: str
    backend: str
    in_loop: tuple[str, ...]
    sessions: int
    sessions_met: int
    energy_requested_kwh: float
    energy_delivered_kwh: float
    energy_cost: float
    currency: str
    peak_kw: float  # highest demand-window average at the site meter
    peak_instant_kw: float
    site_limit_kw: float
    demand_charge: float
    max_utilisation: float  # highest node-phase current / limit over every sample
    max_utilisation_at: str
    violations: int  # node-phase samples (100 ms) over the phase limit
    violations_kw: int  # node samples over a kW cap (site file or grid signal)
    setpoints_sent: int
    faults_injected: tuple[str, ...]
    faults_not_wired: tuple[str, ...]
    sim_seconds: float
    wall_seconds: float
    series: Series = field(repr=False, default_factory=Series)

    def row(self) -> dict[str, Any]:
        """The report's row (JSON-ready, no time series)."""
        return {
            "policy": self.policy,
            "backend": self.backend,
            "in_loop": list(self.in_loop),
            "sessions": self.sessions,
            "sessions_met": self.sessions_met,
            "energy_requested_kwh": round(self.energy_requested_kwh, 3),
            "energy_delivered_kwh": round(self.energy_delivered_kwh, 3),
            "energy_cost": round(self.energy_cost, 2),
            "currency": self.currency,
            "peak_kw": round(self.peak_kw, 2),
            "peak_instant_kw": round(self.peak_instant_kw, 2),
            "site_limit_kw": round(self.site_limit_kw, 2)
            if math.isfinite(self.site_limit_kw)
            else None,
            "demand_charge": round(self.demand_charge, 2),
            "total_cost": round(self.energy_cost + self.demand_charge, 2),
            "max_utilisation": round(self.max_utilisation, 4),
            "max_utilisation_at": self.max_utilisation_at,
            "violations": self.violations,
            "violations_kw": self.violations_kw,
            "setpoints_sent": self.setpoints_sent,
            "faults_injected": list(self.faults_injected),
            "faults_not_wired": list(self.faults_not_wired),
            "sim_hours": round(self.sim_seconds / 3600.0, 3),
            "wall_seconds": round(self.wall_seconds, 3),
        }


def _samples_in(t0: float, t1: float) -> int:
    """Number of 100 ms sample instants k·0.1 s (relative to the start) in [t0, t1)."""
    return max(0, math.ceil(t1 / SAMPLE_S - 1e-9) - math.ceil(t0 / SAMPLE_S - 1e-9))


class Meter:
    """Accumulates the site's outcome over piecewise-constant intervals."""

    def __init__(self, sc: Scenario, lines: LineModel, series_step_s: float) -> None:
        self.sc = sc
        self.lines = lines
        self.window_s = sc.demand_charge.window_min * 60.0
        self.window_kwh: dict[int, float] = {}
        self.energy_cost = 0.0
        self.peak_instant_kw = 0.0
        self.max_util = 0.0
        self.max_util_at = ""
        self.violations = 0
        self.violations_kw = 0
        self.series = Series()
        self.series_step_s = series_step_s
        self._next_series = 0.0
        self._charger_energy_kwh = 0.0

    def interval(
        self,
        t0: float,
        t1: float,
        line_a: F64,
        kw_limit: F64,
        charger_kw: float,
        *,
        node_currents: tuple[F64, F64] | None = None,
    ) -> None:
        """Record [t0, t1) (seconds after the start) with constant charger currents ``line_a``
        (or the node line currents and kW given directly). ``charger_kw`` is the chargers' load
        as the grid sees it (a DC charger's AC input, auxiliary load included): what is priced."""
        if t1 <= t0:
            return
        cur, kw = node_currents if node_currents is not None else self.lines.evaluate(line_a)
        n = _samples_in(t0, t1)
        with np.errstate(divide="ignore", invalid="ignore"):
            util = np.where(
                self.lines.limit_a > 0, cur / self.lines.limit_a, np.where(cur > 0, np.inf, 0.0)
            )
        over = cur > self.lines.limit_a + _EPS_A
        if n:
            self.violations += int(over.sum()) * n
            self.violations_kw += int((kw > kw_limit + 1e-6).sum()) * n
            u = float(util.max())
            if u > self.max_util:
                self.max_util = u
                ni, pi = np.unravel_index(int(util.argmax()), util.shape)
                self.max_util_at = (
                    f"{self.lines.node_ids[int(ni)]}/{self.sc.site.phase_names[int(pi)]}"
                )
        site_kw = float(kw[self.lines.root])
        self.peak_instant_kw = max(self.peak_instant_kw, site_kw)
        dt_h = (t1 - t0) / 3600.0
        self._charger_energy_kwh += charger_kw * dt_h
        # Cost and demand windows use the site meter price times charger energy for cost (the
        # building's own energy is not the fleet's), the whole site meter for the peak. Pieces
        # end at window edges and at price changes (priced at the piece's start, a change inside
        # an interval was billed from the interval's end).
        tariff = self.sc.tariff
        t = t0
        while t < t1:
            w = int((self.sc.start + t) // self.window_s)
            w_end = (w + 1) * self.window_s - self.sc.start
            seg_end = min(t1, w_end, tariff.next_change(self.sc.start + t) - self.sc.start)
            seg_end = max(seg_end, t + 1e-9)  # float noise at an edge: never stall
            h = (min(seg_end, t1) - t) / 3600.0
            self.window_kwh[w] = self.window_kwh.get(w, 0.0) + site_kw * h
            price = tariff.price_at(self.sc.start + t)
            self.energy_cost += charger_kw * h * price
            t = seg_end
        while self._next_series < t1:
            ts = self._next_series
            s = self.series
            s.t.append(ts)
            s.site_kw.append(site_kw)
            s.limit_kw.append(float(kw_limit[self.lines.root]))
            s.price.append(self.sc.tariff.price_at(self.sc.start + ts))
            s.node_util.append([float(x) for x in util.max(axis=1)])
            self._next_series += self.series_step_s

    def demand_peak_kw(self) -> float:
        """The billed peak: the highest clock-aligned window average (a partial window at either
        end is averaged over the full window, as a meter would), at least the period's floor."""
        peak = self.sc.demand_charge.peak_floor_kw
        for kwh in self.window_kwh.values():
            peak = max(peak, kwh / (self.window_s / 3600.0))
        return peak

    def result(
        self,
        arr: Arrivals,
        delivered: Mapping[str, float],
        *,
        policy: str,
        backend: str,
        in_loop: tuple[str, ...],
        setpoints_sent: int,
        faults_injected: Sequence[str],
        faults_not_wired: Sequence[str],
        wall_s: float,
    ) -> PolicyResult:
        """The run's outcome: the site as metered here, each session of ``arr`` against the energy
        ``delivered`` to it (kWh by session id). Both backends report through this one place."""
        sessions = arr.sessions
        req_total = float(sum(s.energy_kwh for s in sessions))
        del_total = float(sum(delivered.get(s.id, 0.0) for s in sessions))
        met = sum(1 for s in sessions if delivered.get(s.id, 0.0) >= s.energy_kwh - 0.05)
        peak = self.demand_peak_kw()
        return PolicyResult(
            policy=policy,
            backend=backend,
            in_loop=in_loop,
            sessions=len(sessions),
            sessions_met=met,
            energy_requested_kwh=req_total,
            energy_delivered_kwh=del_total,
            energy_cost=float(self.energy_cost),
            currency=self.sc.tariff.currency,
            peak_kw=float(peak),
            peak_instant_kw=float(self.peak_instant_kw),
            site_limit_kw=float(self.lines.power_limit_kw[self.lines.root]),
            demand_charge=float(peak * self.sc.demand_charge.price_per_kw),
            max_utilisation=float(self.max_util),
            max_utilisation_at=self.max_util_at,
            violations=self.violations,
            violations_kw=self.violations_kw,
            setpoints_sent=setpoints_sent,
            faults_injected=tuple(faults_injected),
            faults_not_wired=tuple(faults_not_wired),
            sim_seconds=self.sc.duration_s,
            wall_seconds=wall_s,
            series=self.series,
        )


# ---------------------------------------------------------------------------------------------
# The in-process loop
# ---------------------------------------------------------------------------------------------
WIRED_FAULTS = (
    "charger_offline",
    "meter_stuck",
    "profile_ignored",
    "profiles_lost_on_reboot",
    "edge_restart",
)


@dataclass
class Point:
    """One charger as the plant holds it: its profiles, its car, its meter."""

    car: Car | None = None
    tx: float | None = None  # TxProfile value (only while a transaction runs)
    tx_valid_to: float | None = None  # s after start
    tx_final: float | None = None  # level after valid_to
    default: float | None = None  # TxDefaultProfile value
    pending: list[tuple[float, str, float, float | None, float | None]] = field(
        default_factory=list
    )  # (apply at, purpose, value, valid_to, final)
    offline: bool = False
    meter_stuck: bool = False
    transaction: str | None = None
    reported: float = 0.0  # per-phase A (AC) or W (DC) in the last report
    reported_kwh: float = 0.0
    report_t: float = -math.inf


PlantListener = Callable[[str, int, Any], None]


class SitePlant:
    """The simulated site on the virtual clock: chargers that hold profiles, cars that draw
    current, the scenario's arrivals, faults and grid signals, and the meter.

    Drivers (a controller loop, or the edge over a gateway) send profiles with ``send_profile``
    and hear about the site through ``listeners`` — ``("plug"|"unplug"|"meter"|"fault"|
    "fault_end"|"signal", charger index, payload)`` — exactly what a charger would report.
    """

    def __init__(
        self,
        sc: Scenario,
        arr: Arrivals,
        clock: VirtualClock,
        *,
        series_points: int = 600,
        chosen: str | None = None,
    ) -> None:
        self.sc = sc
        self.arr = arr
        self.clock = clock
        self.site = sc.site
        self.n = len(sc.site.chargers)
        self.cidx = {c.id: k for k, c in enumerate(sc.site.chargers)}
        self.lines = LineModel(sc.site)
        self.meter = Meter(sc, self.lines, max(sc.duration_s / series_points, 1.0))
        self.points = [Point() for _ in range(self.n)]
        # Each charger's electrical data as a simulated OCPP station holds it: what it offers
        # under a limit is the stations' rule (``offered_of``).
        self.connectors = [connector_for(c) for c in sc.site.chargers]
        self.delivered: dict[str, float] = {}
        self.chosen = chosen or _busiest_charger(arr, sc.site)
        self.chosen_k = self.cidx[self.chosen]
        self.listeners: list[PlantListener] = []
        self.profiles_received = 0
        self.faults_injected: list[str] = []
        self._faults_held: dict[tuple[str, int], int] = {}
        self.not_wired = sorted({f.kind for f in sc.faults if f.kind not in WIRED_FAULTS})
        self.node_index = {nid: i for i, nid in enumerate(self.lines.node_ids)}
        self._t = 0.0
        self._wake = asyncio.Event()
        self._next_meter = 0.0
        self._next_sample = 0.0
        self._sample_every = max(sc.duration_s / 200.0, 1.0)
        self._tx_seq = 0
        events: list[tuple[float, int, str, Any]] = []
        for s in arr.sessions:
            events.append((s.arrival_s, 1, "arrive", s))
            events.append((s.departure_s, 0, "depart", s))
        for f in sc.faults:
            if f.kind in WIRED_FAULTS:
                events.append((f.at_s, 2, "fault", f))
                if f.duration_s > 0:
                    events.append((f.at_s + f.duration_s, 2, "fault_end", f))
        for g in sc.grid_signals:
            # The controllers hear of a cap early enough to have it in force by its start.
            events.append((g.start_s - cap_lead_s(sc, g), 3, "signal", g))
            events.append((g.end_s, 3, "signal", g))
        events.sort(key=lambda e: (e[0], e[1]))
        self._events = events
        self._ev_i = 0
        self.progress: Callable[[float], None] | None = None

    # -- what the chargers and cars do -----------------------------------------------------------
    def now_s(self) -> float:
        return self.clock.now() - self.sc.start

    def limit_of(self, k: int, t: float) -> float:
        """The current (A) or power (W) charger k allows now (its composite schedule)."""
        p = self.points[k]
        c = self.site.chargers[k]
        if p.car is not None and p.car.ignores_profile:
            return math.inf
        if p.transaction is not None and p.tx is not None:
            if p.tx_valid_to is None or t < p.tx_valid_to:
                return p.tx
            if p.tx_final is not None:
                return p.tx_final
        if p.default is not None:
            return p.default
        return c.max_w if c.kind == "dc" else c.max_a

    def offered_of(self, k: int, t: float) -> float:
        """What charger k offers its car now under its limit, as a simulated OCPP station does
        (``evcore.sim.chargepoint.offer``): AC the highest of its steps at or below it, nothing
        below the 6 A pilot; DC nothing between 0 and its ``min_w``. (The limit as it was let a
        14 A setpoint be drawn at 14 A between 13 A and 16 A steps, and 3 kW under a 5 kW DC
        minimum.)"""
        return offer(self.connectors[k], self.limit_of(k, t))

    def draw(self, k: int, t: float) -> float:
        car = self.points[k].car
        return 0.0 if car is None else car.draw(self.offered_of(k, t))

    def _currents(self, t: float) -> tuple[F64, float, list[float]]:
        """Per-charger line current (A), the chargers' load in kW as the site meter counts it
        (a DC charger's AC input: its output over the efficiency plus its auxiliary load, as
        the stack's charge points meter it), and each car's draw (A per phase, or DC W)."""
        la = np.zeros(self.n, dtype=np.float64)
        kw = 0.0
        draws = [0.0] * self.n
        v_ln = self.site.voltage_ln_v
        for k, p in enumerate(self.points):
            if p.car is None:
                continue
            d = p.car.draw(self.offered_of(k, t))
            draws[k] = d
            ch = self.site.chargers[k]
            la[k] = dc_line_current_a(ch, d, v_ln) if ch.kind == "dc" else d
            # The same figure LineModel.evaluate puts on the site meter: cost, peak and kW caps
            # count one load. (The DC output alone left out 1/efficiency and aux_w: the depot's
            # uncontrolled energy cost was 4.3 % under what the grid billed.)
            kw += la[k] * self.lines.watts_per_a[k] / 1000.0
        return la, kw, draws

    def _limits_kw(self, t: float) -> F64:
        lim = self.lines.power_limit_kw.copy()
        for g in self.sc.grid_signals:
            if g.start_s <= t < g.end_s:
                i = self.node_index[g.node]
                lim[i] = min(lim[i], g.limit_kw)
        return lim

    def _advance(self) -> None:
        """Account for [last instant, now) with the currents that held over it."""
        t1 = self.now_s()
        t0 = self._t
        if t1 <= t0:
            return
        la, charger_kw, draws = self._currents(t0)
        self.meter.interval(t0, t1, la, self._limits_kw(t0), charger_kw)
        dt_h = (t1 - t0) / 3600.0
        for k, p in enumerate(self.points):
            car = p.car
            if car is None or draws[k] <= 0:
                continue
            e = _car_kw(car, la[k], self.lines.watts_per_a[k], self.site.voltage_ln_v) * dt_h
            car.delivered_kwh = min(car.session.energy_kwh, car.delivered_kwh + e)
        while self._next_sample <= t1 and self._next_sample < self.sc.duration_s:
            ts = self._next_sample
            s = self.meter.series
            for p in self.points:
                if p.car is not None:
                    s.soc.setdefault(p.car.session.id, []).append((ts, p.car.soc))
            ck = self.points[self.chosen_k]
            s.chosen_t.append(ts)
            s.chosen_setpoint.append(self.limit_of(self.chosen_k, ts) if ck.car else 0.0)
            s.chosen_measured.append(draws[self.chosen_k])
            self._next_sample += self._sample_every
            if self.progress is not None:
                self.progress(ts / self.sc.duration_s)
        self._t = t1

    def _next_change(self, t: float) -> float:
        nxt = min(self._next_meter, self.sc.duration_s)
        if self._ev_i < len(self._events):
            nxt = min(nxt, self._events[self._ev_i][0])
        la, _, draws = self._currents(t)
        for k, p in enumerate(self.points):
            for at, *_ in p.pending:
                nxt = min(nxt, at)
            if p.tx_valid_to is not None and p.tx_valid_to > t:
                nxt = min(nxt, p.tx_valid_to)
            car = p.car
            if car is not None and draws[k] > 0:
                p_kw = _car_kw(car, la[k], self.lines.watts_per_a[k], self.site.voltage_ln_v)
                if p_kw > 0:
                    nxt = min(nxt, t + car.remaining_kwh / p_kw * 3600.0 + 1e-6)
                    # CC-CV: the taper changes the draw continuously; re-sample it each minute.
                    if car.soc > 0.8:
                        nxt = min(nxt, t + 60.0)
        return max(nxt, t + 1e-3)

    # -- inputs from drivers ---------------------------------------------------------------------
    def send_profile(
        self,
        k: int,
        purpose: str,
        value: float,
        *,
        delay_s: float,
        valid_to_s: float | None = None,
        final: float | None = None,
    ) -> bool:
        """A profile reaches charger k; it takes effect ``delay_s`` later. False if offline."""
        p = self.points[k]
        if p.offline:
            return False
        self._advance()
        self.profiles_received += 1
        t = self.now_s()
        # A newer profile of the same purpose replaces one not yet in effect.
        p.pending = [x for x in p.pending if x[1] != purpose]
        p.pending.append((t + delay_s, purpose, value, valid_to_s, final))
        self._wake.set()
        return True

    def _emit(self, kind: str, k: int, payload: Any) -> None:
        for cb in list(self.listeners):
            cb(kind, k, payload)

    def report(self, k: int) -> dict[str, Any]:
        """What charger k's meter says now (frozen while its meter is stuck)."""
        p = self.points[k]
        t = self.now_s()
        if not p.meter_stuck:
            p.reported = self.draw(k, t)
            p.reported_kwh = p.car.delivered_kwh if p.car is not None else 0.0
            p.report_t = t
        ch = self.site.chargers[k]
        phase_a = [0.0, 0.0, 0.0]
        if p.car is not None and p.reported > 0:
            line = (
                dc_line_current_a(ch, p.reported, self.site.voltage_ln_v)
                if ch.kind == "dc"
                else p.reported
            )
            mags = np.abs(self.lines.contrib[k]) * line
            phase_a = [float(x) for x in mags]
        power_w = p.reported if ch.kind == "dc" else p.reported * float(self.lines.watts_per_a[k])
        soc = p.car.soc * 100.0 if p.car is not None else None
        return {
            "site_phase_a": tuple(phase_a),
            "power_w": power_w if p.car is not None else 0.0,
            "session_energy_wh": p.reported_kwh * 1000.0,
            "soc_percent": soc,
            "transaction_id": p.transaction,
            "value": p.reported,
        }

    # -- the loop --------------------------------------------------------------------------------
    def _process_due(self, t: float) -> None:
        for p in self.points:
            if p.pending:
                keep = []
                for item in p.pending:
                    at, purpose, value, vt, fin = item
                    if at <= t + 1e-9:
                        if purpose == "tx_default":
                            p.default = value
                        elif p.transaction is not None:
                            p.tx, p.tx_valid_to, p.tx_final = value, vt, fin
                    else:
                        keep.append(item)
                p.pending = keep
        while self._ev_i < len(self._events) and self._events[self._ev_i][0] <= t + 1e-9:
            _, _, kind, payload = self._events[self._ev_i]
            self._ev_i += 1
            if kind == "arrive":
                s: SessionSpec = payload
                k = self.cidx[s.charger_id]
                p = self.points[k]
                p.car = Car(s, self.site.chargers[k])
                self._tx_seq += 1
                p.transaction = f"tx{self._tx_seq}"
                p.tx = p.tx_valid_to = p.tx_final = None
                self.lines.plug(k, s.vehicle.phases)
                self.delivered[s.id] = 0.0
                self._emit("plug", k, s)
            elif kind == "depart":
                s = payload
                k = self.cidx[s.charger_id]
                p = self.points[k]
                if p.car is not None and p.car.session.id == s.id:
                    self.delivered[s.id] = p.car.delivered_kwh
                    p.car = None
                    tx = p.transaction
                    p.transaction = None
                    p.tx = p.tx_valid_to = p.tx_final = None
                    self._emit("unplug", k, (s, tx))
            elif kind in ("fault", "fault_end"):
                self._fault(kind == "fault", payload)
            elif kind == "signal":
                self._emit("signal", -1, payload)
        if t >= self._next_meter - 1e-9:
            for k in range(self.n):
                if not self.points[k].offline:
                    self._emit("meter", k, self.report(k))
            self._next_meter += self.sc.meter_interval_s

    def _fault(self, on: bool, f: FaultSpec) -> None:
        k = self.cidx[f.charger] if f.charger else -1
        if on:
            self.faults_injected.append(f"{f.kind}@{f.at_s / 3600:.2f}h")
        p = self.points[k] if k >= 0 else None
        # Faults of one kind on one charger may touch or overlap: it misbehaves until the last
        # ends (the first one's end turned it off while another held it).
        key = (f.kind, k)
        self._faults_held[key] = self._faults_held.get(key, 0) + (1 if on else -1)
        held = self._faults_held[key] > 0
        if f.kind == "charger_offline" and p is not None:
            p.offline = held
        elif f.kind == "meter_stuck" and p is not None:
            p.meter_stuck = held
        elif f.kind == "profile_ignored" and p is not None and p.car is not None:
            p.car.ignores_profile = held
        elif f.kind == "profiles_lost_on_reboot" and p is not None and on:
            # The charger reboots and forgets every profile: it allows its maximum until told.
            p.tx = p.tx_valid_to = p.tx_final = p.default = None
            p.pending.clear()
        self._emit("fault" if on else "fault_end", k, f)

    async def run(self) -> None:
        end = self.sc.duration_s
        while True:
            self._advance()
            t = self.now_s()
            self._process_due(t)
            if t >= end - 1e-9:
                break
            nxt = self._next_change(t)
            self._wake.clear()
            await sleep_or_wake(self.clock, nxt - t, self._wake)
        for p in self.points:
            if p.car is not None:
                self.delivered[p.car.session.id] = p.car.delivered_kwh

    def result(
        self, policy: str, backend: str, in_loop: tuple[str, ...], wall_s: float
    ) -> PolicyResult:
        return self.meter.result(
            self.arr,
            self.delivered,
            policy=policy,
            backend=backend,
            in_loop=in_loop,
            setpoints_sent=self.profiles_received,
            faults_injected=self.faults_injected,
            faults_not_wired=self.not_wired,
            wall_s=wall_s,
        )


def _progress_bar(
    label: str, enabled: bool, *, lines_only: bool = False
) -> Callable[[float], None] | None:
    if not enabled:
        return None
    wall0 = time.monotonic()  # wall time for the bar only, never for the model
    tty = sys.stderr.isatty() and not lines_only
    last = [-1]

    def show(frac: float) -> None:
        pct = int(frac * 100)
        if pct == last[0]:
            return
        last[0] = pct
        if not tty:
            if frac >= 1.0:
                sys.stderr.write(f"{label:<14} done in {time.monotonic() - wall0:5.1f}s\n")
            return
        filled = int(frac * 30)
        sys.stderr.write(
            f"\r{label:<14} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}% "
            f"{time.monotonic() - wall0:5.1f}s"
        )
        if frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cap_lead_s(sc: Scenario, g: GridSignal) -> float:
    """How long before a grid signal's start the in-process controllers hold its cap: a profile
    delay and a second, so that the lower profile is in force by the start (a grid operator's
    cap must be), within the signal's notice. From its start alone, every curtailment was
    exceeded for the profile delay (eu-three-phase: 20 samples over its 45 kW cap)."""
    return min(max(0.0, g.notice_s), sc.profile_delay_s + 1.0)


class TickDriver:
    """Runs a ``Controller`` (``decide(SiteView)``) on the plant: on every plug, unplug, fault and
    grid signal at once, and every ``control_interval_s``. Lower before raise: decreases take
    effect after the profile delay, increases only after the settle time on top."""

    def __init__(self, plant: SitePlant, controller: Controller) -> None:
        self.plant = plant
        self.controller = controller
        self.sc = plant.sc
        self.last_sent = np.full(plant.n, -1.0)
        self._wake = asyncio.Event()
        self._reasons: list[str] = ["start"]
        plant.listeners.append(self._on_plant)

    def _on_plant(self, kind: str, k: int, payload: Any) -> None:
        if kind in ("plug", "unplug", "fault", "fault_end", "signal"):
            if kind == "plug":
                self._reasons.append(f"arrive {payload.id}")
                self.last_sent[k] = -1.0
            elif kind == "unplug":
                self._reasons.append(f"depart {payload[0].id}")
                self.last_sent[k] = -1.0
            elif kind == "signal":
                self._reasons.append("grid signal")
            else:
                self._reasons.append(f"{kind} {payload.kind}")
                if kind == "fault" and payload.kind == "edge_restart":
                    restart = getattr(self.controller, "restart", None)
                    if callable(restart):
                        restart()
                if kind == "fault_end" and payload.kind in ("charger_offline",):
                    self.last_sent[k] = -1.0
            self._wake.set()

    def view(self) -> SiteView:
        pl = self.plant
        sc = self.sc
        now = sc.start + pl.now_s()
        pts = pl.points
        return SiteView(
            now=now,
            connected=np.array([p.car is not None for p in pts]),
            session_ids=[p.car.session.id if p.car else None for p in pts],
            energy_requested_kwh=np.array(
                [p.car.session.energy_kwh if p.car else 0.0 for p in pts]
            ),
            energy_delivered_kwh=np.array([p.reported_kwh for p in pts]),
            departure=np.array(
                [sc.start + p.car.session.departure_s if p.car else math.inf for p in pts]
            ),
            arrival=np.array(
                [sc.start + p.car.session.arrival_s if p.car else math.inf for p in pts]
            ),
            measured=np.array([p.reported for p in pts]),
            measured_age_s=np.array([now - (sc.start + p.report_t) for p in pts]),
            last_setpoint=self.last_sent.copy(),
            node_power_limit_kw=self._caps_in_force(now - sc.start),
            # Those announced by now (notice_min ahead): a planner has no other foresight.
            curtailments=[
                (sc.start + g.start_s, sc.start + g.end_s, g.node, g.limit_kw)
                for g in sc.grid_signals
                if max(0.0, g.start_s - g.notice_s) <= now - sc.start
            ],
            events=list(self._reasons),
        )

    def _caps_in_force(self, t: float) -> dict[str, float]:
        """Per node, the lowest cap of the grid signals to hold at ``t`` (s after the start):
        those in force, and those starting within their lead (``cap_lead_s``). The one listed
        last won (a 10 kW curtailment inside a 20 kW one was controlled to 20 kW), and a cap
        counted only from its start was in force a profile delay late."""
        sc = self.plant.sc
        caps: dict[str, float] = {}
        for g in sc.grid_signals:
            if g.start_s - cap_lead_s(sc, g) <= t < g.end_s:
                caps[g.node] = min(g.limit_kw, caps.get(g.node, math.inf))
        return caps

    async def run(self) -> None:
        pl = self.plant
        # Commissioning: every charger holds a TxDefault of 0 until its first decision, so a car
        # never draws before the controller has counted it.
        if getattr(self.controller, "baseline", False):
            return  # no controller at all: every charger allows its own maximum
        if True:
            for k in range(pl.n):
                pl.send_profile(k, "tx_default", 0.0, delay_s=0.0)
        next_tick = 0.0
        while pl.now_s() < self.sc.duration_s - 1e-9:
            t = pl.now_s()
            if t >= next_tick - 1e-9:
                next_tick += self.sc.control_interval_s
            sp = np.asarray(self.controller.decide(self.view()), dtype=np.float64)
            self._reasons = []
            for k in range(pl.n):
                p = pl.points[k]
                new = float(sp[k])
                if p.offline or p.car is None:
                    continue
                if self.last_sent[k] >= 0 and abs(new - self.last_sent[k]) < 0.05:
                    continue
                current = pl.limit_of(k, t)
                delay = self.sc.profile_delay_s + (0.0 if new <= current else self.sc.settle_s)
                if pl.send_profile(k, "tx", new, delay_s=delay):
                    self.last_sent[k] = new
            self._wake.clear()
            await sleep_or_wake(pl.clock, max(next_tick - t, 1e-3), self._wake)


async def drive(clock: VirtualClock, plant: SitePlant, *drivers: Any) -> None:
    """Run the plant and its drivers until the scenario ends, on the virtual clock."""
    loop = asyncio.get_running_loop()
    clock.install_executor(loop)
    plant_task = asyncio.ensure_future(plant.run())
    tasks = [asyncio.ensure_future(d.run()) for d in drivers]
    try:
        await clock.run_until(plant.sc.start + plant.sc.duration_s)
        await plant_task
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers:
            close = getattr(d, "close", None)
            if close is not None:
                res = close()
                if asyncio.iscoroutine(res):
                    await res


def run_policy(
    sc: Scenario,
    policy: str,
    controller: Controller,
    *,
    arrivals: Arrivals | None = None,
    seed: int | None = None,
    progress: bool = False,
    series_points: int = 600,
    backend: str = "in-process",
) -> PolicyResult:
    """Play ``sc`` against ``controller`` (called per tick and on events) and measure the site."""
    wall0 = time.monotonic()
    arr = arrivals if arrivals is not None else generate(sc, seed)
    clock = VirtualClock(sc.start)
    plant = SitePlant(sc, arr, clock, series_points=series_points, chosen=sc.report_charger)
    plant.progress = _progress_bar(policy, progress)
    driver = TickDriver(plant, controller)
    asyncio.run(drive(clock, plant, driver))
    if plant.progress is not None:
        plant.progress(1.0)
    return plant.result(policy, backend, controller.in_loop, time.monotonic() - wall0)


def _car_kw(car: Car, line_a: float, watts_per_a: float, v_ln: float) -> float:
    ch = car.charger
    if ch.kind == "dc":
        # line current back to DC power delivered to the battery
        return max(0.0, (line_a * 3.0 * v_ln - ch.aux_w) * ch.efficiency) / 1000.0
    return line_a * watts_per_a / 1000.0


def _record_soc(series: Series, cars: Sequence[Car | None], t: float) -> None:
    for car in cars:
        if car is not None:
            series.soc.setdefault(car.session.id, []).append((t, car.soc))


def _busiest_charger(arr: Arrivals, site: SiteSpec) -> str:
    if not arr.sessions:
        return site.chargers[0].id
    by: dict[str, float] = {}
    for s in arr.sessions:
        by[s.charger_id] = by.get(s.charger_id, 0.0) + s.energy_kwh
    return max(sorted(by), key=lambda c: by[c])


@dataclass
class Comparison:
    scenario: Scenario
    seed: int
    arrivals: Arrivals
    results: list[PolicyResult]
    chosen_charger: str
    notes: list[str]

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]


def compare(
    sc: Scenario,
    factory: ControllerFactory,
    *,
    seed: int | None = None,
    progress: bool = False,
    backend: str = "in-process",
) -> Comparison:
    """Run every policy of ``sc`` on the same sessions."""
    s = sc.seed if seed is None else seed
    arr = generate(sc, s)
    results = []
    for p in sc.policies:
        ctl = factory(p, sc)
        results.append(
            run_policy(sc, p, ctl, arrivals=arr, seed=s, progress=progress, backend=backend)
        )
    chosen = sc.report_charger or _busiest_charger(arr, sc.site)
    notes = []
    if arr.dropped:
        notes.append(f"{arr.dropped} listed sessions found no free charger and were dropped")
    for r in results:
        if r.policy in CONTROLLED_POLICIES and r.violations:
            notes.append(f"{r.policy}: {r.violations} node-phase samples over a limit")
    return Comparison(sc, s, arr, results, chosen, notes)


def rate_kw_of(ch: ChargerSpec, sess: SessionSpec) -> float:
    return max_rate_kw(ch, sess.vehicle)


def phasor_line_current(i_ab: float, i_ca: float) -> float:
    """|I_A| for line-to-line loads AB and CA (for documentation and tests)."""
    a = cmath.rect(i_ab, math.radians(30)) - cmath.rect(i_ca, math.radians(150))
    return abs(a)
