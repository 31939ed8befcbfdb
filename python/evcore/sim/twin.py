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

import cmath
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from evcore.sim.arrivals import Arrivals, generate, max_rate_kw
from evcore.sim.scenario import (
    CONTROLLED_POLICIES,
    ChargerSpec,
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

    def evaluate(
        self, line_a: F64, extra_kw: F64 | None = None
    ) -> tuple[F64, F64]:
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
            "site_limit_kw": round(self.site_limit_kw, 2) if math.isfinite(self.site_limit_kw)
            else None,
            "demand_charge": round(self.demand_charge, 2),
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
    ) -> None:
        """Record [t0, t1) (seconds after the start) with constant charger currents ``line_a``."""
        if t1 <= t0:
            return
        cur, kw = self.lines.evaluate(line_a)
        n = _samples_in(t0, t1)
        with np.errstate(divide="ignore", invalid="ignore"):
            util = np.where(self.lines.limit_a > 0, cur / self.lines.limit_a, np.where(cur > 0, np.inf, 0.0))
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
        # building's own energy is not the fleet's), the whole site meter for the peak.
        t = t0
        while t < t1:
            w = int((self.sc.start + t) // self.window_s)
            w_end = (w + 1) * self.window_s - self.sc.start
            seg_end = min(t1, w_end)
            h = (seg_end - t) / 3600.0
            self.window_kwh[w] = self.window_kwh.get(w, 0.0) + site_kw * h
            price = self.sc.tariff.price_at(self.sc.start + t)
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


# ---------------------------------------------------------------------------------------------
# The in-process loop
# ---------------------------------------------------------------------------------------------
WIRED_FAULTS = ("charger_offline", "meter_stuck", "profile_ignored", "profiles_lost_on_reboot",
                "edge_restart")


@dataclass
class _ChargerState:
    applied: float = 0.0  # what the charger enforces now
    pending: list[tuple[float, float]] = field(default_factory=list)  # (apply at, value)
    last_sent: float = 0.0
    offline: bool = False
    meter_stuck: bool = False
    reported: float = 0.0
    reported_kwh: float = 0.0
    report_t: float = -math.inf


def _progress(label: str, frac: float, wall0: float, enabled: bool) -> None:
    if not enabled:
        return
    if not sys.stderr.isatty():  # a log file gets one line per policy, not a redrawn bar
        if frac >= 1.0:
            sys.stderr.write(f"{label:<14} done in {time.monotonic() - wall0:5.1f}s\n")
        return
    width = 30
    filled = int(frac * width)
    sys.stderr.write(
        f"\r{label:<14} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
        f"{time.monotonic() - wall0:5.1f}s"  # wall time for the bar only, never for the model
    )
    if frac >= 1.0:
        sys.stderr.write("\n")
    sys.stderr.flush()


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
    """Play ``sc`` against ``controller`` and measure the site."""
    wall0 = time.monotonic()
    clock = VirtualClock(sc.start)
    arr = arrivals if arrivals is not None else generate(sc, seed)
    site = sc.site
    n = len(site.chargers)
    cidx = {c.id: k for k, c in enumerate(site.chargers)}
    lines = LineModel(site)
    meter = Meter(sc, lines, max(sc.duration_s / series_points, 1.0))
    chosen = sc.report_charger or _busiest_charger(arr, site)
    chosen_k = cidx[chosen]
    state = [_ChargerState() for _ in range(n)]
    cars: list[Car | None] = [None] * n
    delivered: dict[str, float] = {}
    limits_kw = lines.power_limit_kw.copy()
    node_index = {nid: i for i, nid in enumerate(lines.node_ids)}
    curtail = [
        (sc.start + g.start_s, sc.start + g.end_s, g.node, g.limit_kw) for g in sc.grid_signals
    ]
    setpoints_sent = 0
    faults_injected: list[str] = []
    not_wired = sorted({f.kind for f in sc.faults if f.kind not in WIRED_FAULTS})

    # event list: (time s after start, order, kind, payload)
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
        events.append((g.start_s, 3, "signal", None))
        events.append((g.end_s, 3, "signal", None))
    events.sort(key=lambda e: (e[0], e[1]))
    ev_i = 0
    t = 0.0
    next_tick = 0.0
    next_meter = 0.0
    end = sc.duration_s
    progress_every = max(end / 100.0, 1.0)
    next_progress = 0.0
    decide_now = True
    reasons: list[str] = ["start"]

    def current_line_a() -> tuple[F64, float]:
        la = np.zeros(n, dtype=np.float64)
        kw = 0.0
        for k, car in enumerate(cars):
            if car is None:
                continue
            ch = site.chargers[k]
            st = state[k]
            allowed = math.inf if st.offline and car.ignores_profile else st.applied
            d = car.draw(allowed)
            if ch.kind == "dc":
                la[k] = dc_line_current_a(ch, d, site.voltage_ln_v)
                kw += d / 1000.0
            else:
                la[k] = d
                kw += d * lines.watts_per_a[k] / 1000.0
        return la, kw

    def report(k: int, now: float) -> None:
        st = state[k]
        car = cars[k]
        if st.offline or st.meter_stuck:
            return
        if car is None:
            st.reported, st.reported_kwh = 0.0, 0.0
        else:
            allowed = st.applied
            st.reported = car.draw(allowed)
            st.reported_kwh = car.delivered_kwh
        st.report_t = now

    def view() -> SiteView:
        now = sc.start + t
        connected = np.array([c is not None for c in cars])
        req = np.array([c.session.energy_kwh if c else 0.0 for c in cars])
        dep = np.array([sc.start + c.session.departure_s if c else math.inf for c in cars])
        arv = np.array([sc.start + c.session.arrival_s if c else math.inf for c in cars])
        measured = np.array([s.reported for s in state])
        age = np.array([now - (sc.start + s.report_t) for s in state])
        lims = {
            node: lim for (a, b, node, lim) in curtail if a <= now < b
        }
        return SiteView(
            now=now,
            connected=connected,
            session_ids=[c.session.id if c else None for c in cars],
            energy_requested_kwh=req,
            energy_delivered_kwh=np.array([s.reported_kwh for s in state]),
            departure=dep,
            arrival=arv,
            measured=measured,
            measured_age_s=age,
            last_setpoint=np.array([s.last_sent for s in state]),
            node_power_limit_kw=lims,
            curtailments=list(curtail),
            events=list(reasons),
        )

    while t < end - 1e-9:
        # 1. events due now
        while ev_i < len(events) and events[ev_i][0] <= t + 1e-9:
            _, _, kind, payload = events[ev_i]
            ev_i += 1
            if kind == "arrive":
                s: SessionSpec = payload
                k = cidx[s.charger_id]
                cars[k] = Car(s, site.chargers[k])
                lines.plug(k, s.vehicle.phases)
                delivered[s.id] = 0.0
                report(k, t)
                reasons.append(f"arrive {s.id}")
                decide_now = True
            elif kind == "depart":
                s = payload
                k = cidx[s.charger_id]
                car = cars[k]
                if car is not None and car.session.id == s.id:
                    delivered[s.id] = car.delivered_kwh
                    cars[k] = None
                    report(k, t)
                    reasons.append(f"depart {s.id}")
                    decide_now = True
            elif kind in ("fault", "fault_end"):
                f = payload
                on = kind == "fault"
                if on:
                    faults_injected.append(f"{f.kind}@{f.at_s / 3600:.2f}h")
                k = cidx[f.charger] if f.charger else -1
                if f.kind == "charger_offline":
                    state[k].offline = on
                elif f.kind == "meter_stuck":
                    state[k].meter_stuck = on
                elif f.kind == "profile_ignored":
                    car = cars[k]
                    if car is not None:
                        car.ignores_profile = on
                elif f.kind == "profiles_lost_on_reboot" and on:
                    # The charger reboots and forgets its profiles: it falls back to its own
                    # maximum until the controller re-sends (it learns of it from the report).
                    state[k].applied = site.chargers[k].max_a or site.chargers[k].max_w
                    state[k].pending.clear()
                    state[k].last_sent = -1.0
                    report(k, t)
                elif f.kind == "edge_restart" and on:
                    restart = getattr(controller, "restart", None)
                    if callable(restart):
                        restart()
                reasons.append(f"{kind} {f.kind}")
                decide_now = True
            elif kind == "signal":
                limits_kw = lines.power_limit_kw.copy()
                decide_now = True
                reasons.append("grid signal")
        now_abs = sc.start + t
        limits_kw = lines.power_limit_kw.copy()
        for a, b, node, lim in curtail:
            if a <= now_abs < b:
                i = node_index[node]
                limits_kw[i] = min(limits_kw[i], lim)
        # 2. profiles that take effect now
        for k in range(n):
            st = state[k]
            if st.pending:
                keep = []
                for at, val in st.pending:
                    if at <= t + 1e-9:
                        st.applied = val
                    else:
                        keep.append((at, val))
                st.pending = keep
        # 3. meter reports
        if t >= next_meter - 1e-9:
            for k in range(n):
                report(k, t)
            next_meter += sc.meter_interval_s
        # 4. control decision
        if t >= next_tick - 1e-9 or decide_now:
            if t >= next_tick - 1e-9:
                next_tick += sc.control_interval_s
                reasons.append("tick")
            clock.set_time(now_abs)
            sp = np.asarray(controller.decide(view()), dtype=np.float64)
            reasons = []
            decide_now = False
            for k in range(n):
                st = state[k]
                new = float(sp[k])
                if st.offline:
                    continue
                if abs(new - st.last_sent) < 0.05 and st.last_sent >= 0:
                    continue
                setpoints_sent += 1
                st.last_sent = new
                # Lower before you raise: decreases take effect after the profile delay,
                # increases only after the settle time on top.
                delay = sc.profile_delay_s + (0.0 if new <= st.applied else sc.settle_s)
                st.pending = [p for p in st.pending if p[1] < new and p[0] < t + delay]
                st.pending.append((t + delay, new))
        # 5. the next instant anything changes
        nxt = min(next_tick, next_meter, end)
        if ev_i < len(events):
            nxt = min(nxt, events[ev_i][0])
        for st in state:
            for at, _ in st.pending:
                nxt = min(nxt, at)
        la, charger_kw = current_line_a()
        for k, car in enumerate(cars):  # a car finishing its request changes the currents
            if car is None or la[k] <= 0:
                continue
            p_kw = _car_kw(car, la[k], lines.watts_per_a[k], site.voltage_ln_v)
            if p_kw > 0:
                nxt = min(nxt, t + car.remaining_kwh / p_kw * 3600.0 + 1e-6)
        nxt = max(nxt, t + 1e-3)
        meter.interval(t, nxt, la, limits_kw, charger_kw)
        dt_h = (nxt - t) / 3600.0
        for k, car in enumerate(cars):
            if car is None or la[k] <= 0:
                continue
            p_kw = _car_kw(car, la[k], lines.watts_per_a[k], site.voltage_ln_v)
            car.delivered_kwh = min(car.session.energy_kwh, car.delivered_kwh + p_kw * dt_h)
            sid = car.session.id
            meter.series.soc.setdefault(sid, [])
        if t >= next_progress:
            _record_soc(meter.series, cars, t)
            ck = cars[chosen_k]
            meter.series.chosen_t.append(t)
            meter.series.chosen_setpoint.append(state[chosen_k].applied if ck else 0.0)
            meter.series.chosen_measured.append(ck.draw(state[chosen_k].applied) if ck else 0.0)
            _progress(policy, t / end, wall0, progress)
            next_progress += progress_every
        t = nxt
    _progress(policy, 1.0, wall0, progress)
    for car in cars:
        if car is not None:
            delivered[car.session.id] = car.delivered_kwh
    req_total = float(sum(s.energy_kwh for s in arr.sessions))
    del_total = float(sum(delivered.get(s.id, 0.0) for s in arr.sessions))
    met = sum(1 for s in arr.sessions if delivered.get(s.id, 0.0) >= s.energy_kwh - 0.05)
    peak = meter.demand_peak_kw()
    series = meter.series
    return PolicyResult(
        policy=policy,
        backend=backend,
        in_loop=controller.in_loop,
        sessions=len(arr.sessions),
        sessions_met=met,
        energy_requested_kwh=req_total,
        energy_delivered_kwh=del_total,
        energy_cost=float(meter.energy_cost),
        currency=sc.tariff.currency,
        peak_kw=float(peak),
        peak_instant_kw=meter.peak_instant_kw,
        site_limit_kw=float(lines.power_limit_kw[lines.root]),
        demand_charge=float(peak * sc.demand_charge.price_per_kw),
        max_utilisation=float(meter.max_util),
        max_utilisation_at=meter.max_util_at,
        violations=meter.violations,
        violations_kw=meter.violations_kw,
        setpoints_sent=setpoints_sent,
        faults_injected=tuple(faults_injected),
        faults_not_wired=tuple(not_wired),
        sim_seconds=end,
        wall_seconds=time.monotonic() - wall0,
        series=series,
    )


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
