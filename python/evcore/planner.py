"""The horizon planner's typed facade over ``evcore._core.Planner``.

It owns turning typed requests into the core's input (one JSON document), and the core's answer
(one Arrow record batch plus a summary in its schema metadata) into a :class:`PlanResult`. It
never decides a setpoint: a plan's ``target_a``/``target_w`` go to the allocator, and everything
the allocator proposes still passes the envelope.

Bad input raises :class:`evcore.errors.InputError` naming the field (NaN and infinities here,
everything else in Rust). A plan that cannot be made is a status (``infeasible``, ``time_limit``,
``failed``) with an empty schedule; the caller then falls back to the allocator alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa

from evcore import _core
from evcore.errors import InputError
from evcore.site import Site

PLAN_METADATA_KEY = "evcore.plan"
#: The core refuses an energy price beyond this magnitude (per kWh; the plausibility bounds of
#: core/evcore-core/src/planner/input.rs, docs/planner.md). Prices may be negative. The edge API
#: refuses a price update beyond it, so that a price it takes is one the planner can use.
PRICE_BOUND_PER_KWH = 1e4
STATUSES = ("optimal", "suboptimal", "infeasible", "time_limit", "failed")

PerPhase = float | Sequence[float] | Sequence[Sequence[float]]
SeriesLike = float | Sequence[float]


def _epoch(t: float | datetime) -> float:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise InputError("datetime without a time zone; use UTC-aware datetimes")
        return t.timestamp()
    return float(t)


def _series(v: SeriesLike) -> list[float]:
    if isinstance(v, int | float):
        return [float(v)]
    return [float(x) for x in v]


def _per_phase(v: PerPhase) -> list[list[float]]:
    if isinstance(v, int | float):
        return [[float(v)] for _ in range(3)]
    items: list[float | Sequence[float]] = list(v)
    if len(items) != 3:
        raise InputError(f"per-phase values need 3 entries, got {len(items)}")
    return [_series(x) for x in items]


@dataclass(frozen=True)
class PlanNode:
    """A node of the site tree. ``phase_limit_a``: one number, 3 numbers (per site phase), or 3
    per-step series (curtailments); ``power_limit_kw``: a number or per-step series."""

    id: str
    phase_limit_a: PerPhase
    parent: str | None = None
    other_load_a: PerPhase = 0.0
    power_limit_kw: SeriesLike | None = None
    other_load_kw: SeriesLike = 0.0


@dataclass(frozen=True)
class PlanCharger:
    """A charger as in the site file: ``phases`` by site phase name or index (0..2)."""

    id: str
    parent: str
    wiring: Literal["three_phase", "line_to_neutral", "line_to_line"]
    phases: Sequence[str | int]
    voltage_v: float
    max_a: float | None = None
    min_a: float | None = None
    kind: Literal["ac", "dc"] = "ac"
    max_w: float | None = None
    min_w: float | None = None
    efficiency: float = 0.95
    #: DC only: auxiliary load (W) drawn from the grid while a session with energy to deliver
    #: is connected (counted as other load of the charger's node and those above it).
    aux_w: float = 0.0


@dataclass(frozen=True)
class PlanSession:
    """A session connected now (arrival in the past) or expected. ``energy_requested_kwh`` is
    what is still to deliver."""

    id: str
    charger_id: str
    arrival: float | datetime
    departure: float | datetime
    energy_requested_kwh: float
    max_a: float | None = None
    max_w: float | None = None
    priority: float = 1.0


@dataclass(frozen=True)
class PlanWeights:
    non_delivery_per_kwh: float = 10.0
    charge_early_per_kwh: float = 1e-3
    urgency_per_kwh: float = 0.0  # per kWh at the session's own departure: earliest deadline first
    equal_share: float = 1e-4
    smooth: float = 0.0  # off by default: it roughly doubles the solve time


@dataclass(frozen=True)
class PlannerSettings:
    """Clarabel tolerances (the benchmark gives cvxpy the same) and the limit safety margin."""

    tol_gap_abs: float = 1e-7
    tol_gap_rel: float = 1e-7
    tol_feas: float = 1e-7
    max_iter: int = 200
    limit_margin_rel: float = 1e-6
    # Clarabel's iterative refinement: off (half the solve time); a solve that ends short of
    # "solved" is retried once with it on.
    iterative_refinement: bool = False


@dataclass(frozen=True)
class PlanRequest:
    """One planning call. ``start`` is now; ``step_s`` the step lengths (see :func:`step_grid`);
    per-step inputs take one number or one value per step."""

    start: float | datetime
    step_s: Sequence[float]
    price_per_kwh: SeriesLike
    nodes: Sequence[PlanNode]
    chargers: Sequence[PlanCharger]
    sessions: Sequence[PlanSession]
    pv_kw: SeriesLike = 0.0
    demand_charge_per_kw: float = 0.0
    demand_window_s: float = 900.0
    peak_floor_kw: float = 0.0
    current_window_energy_kwh: float = 0.0
    weights: PlanWeights = field(default_factory=PlanWeights)
    phase_names: Sequence[str] = ("L1", "L2", "L3")


@dataclass(frozen=True)
class PlanResult:
    """The schedule (columns ``session_id``, ``charger_id``, ``step_start`` (UTC), ``step_s``,
    ``target_a``, ``target_w``) and the summary the core returned with it."""

    schedule: pa.RecordBatch
    summary: Mapping[str, Any]

    @property
    def status(self) -> str:
        return str(self.summary["status"])

    @property
    def ok(self) -> bool:
        return self.status in ("optimal", "suboptimal")

    @property
    def objective_relaxed(self) -> float:
        return float(self.summary["objective_relaxed"])

    @property
    def terms(self) -> Mapping[str, float]:
        return dict(self.summary["terms"])

    @property
    def binding(self) -> list[Mapping[str, Any]]:
        return list(self.summary["binding"])

    def targets_at(self, t: float | datetime) -> dict[str, tuple[float | None, float | None]]:
        """Per charger, the plan's (target_a, target_w) for the step containing ``t``."""
        ts = _epoch(t)
        out: dict[str, tuple[float | None, float | None]] = {}
        cols = self.schedule.to_pydict()
        for cid, start, dur, ta, tw in zip(
            cols["charger_id"],
            cols["step_start"],
            cols["step_s"],
            cols["target_a"],
            cols["target_w"],
            strict=True,
        ):
            s = start.timestamp()
            if s <= ts < s + dur:
                prev = out.get(cid, (None, None))
                a = None if ta is None else max(ta, prev[0] or 0.0)
                w = None if tw is None else max(tw, prev[1] or 0.0)
                out[cid] = (a, w)
        return out


def step_grid(
    horizon_s: float,
    segments: Sequence[tuple[float, float]] = ((300.0, 3600.0), (900.0, 14400.0), (3600.0, 0.0)),
) -> list[float]:
    """Step lengths growing with distance from now: ``segments`` are (step_s, until_s) pairs
    (until 0 = to the horizon), e.g. 5 min for the first hour, 15 min up to 4 h, then hourly."""
    steps: list[float] = []
    t = 0.0
    for step, until in segments:
        end = horizon_s if until <= 0 else min(until, horizon_s)
        while t + 1e-9 < end:
            d = min(step, horizon_s - t)
            steps.append(d)
            t += d
    return steps


def other_load_kw(site: Site, node: Any) -> float:
    """A node's non-charger load at its configured maximum in kW (each phase's amperes at the
    site's line-to-neutral voltage), as the envelope counts it against ``power_limit_kw``."""
    return float(sum(node.other_load_max_a)) * float(site.voltage_ln_v) / 1000.0


def network_from_site(
    site: Site, *, other_load: Literal["max", "none"] = "max"
) -> tuple[list[PlanNode], list[PlanCharger]]:
    """The site file's topology (``evcore.site.Site``) as planner nodes and chargers.

    ``other_load="max"`` takes each node's ``other_load_max_a`` as the forecast non-charger load
    (the envelope's assumption without a measurement); pass a forecast of your own by replacing
    ``other_load_a`` on the returned nodes. The planner does not model ``steps_a`` or the
    unbalance cap: the allocator and the envelope apply them to every setpoint."""
    nodes = [
        PlanNode(
            id=n.id,
            parent=n.parent,
            phase_limit_a=tuple(n.phase_limit_a),
            other_load_a=tuple(n.other_load_max_a) if other_load == "max" else 0.0,
            # ... and in kW against the node's kW cap, as the envelope counts it.
            other_load_kw=other_load_kw(site, n) if other_load == "max" else 0.0,
            power_limit_kw=n.power_limit_kw,
        )
        for n in site.nodes
    ]
    chargers = [
        PlanCharger(
            id=c.id,
            parent=c.parent,
            wiring=c.wiring,
            phases=tuple(c.phases),
            voltage_v=c.voltage_v,
            kind=c.kind,
            min_a=c.min_a if c.kind == "ac" else None,
            max_a=c.max_a if c.kind == "ac" else None,
            min_w=c.min_w if c.kind == "dc" else None,
            max_w=c.max_w if c.kind == "dc" else None,
            efficiency=c.efficiency if c.efficiency is not None else 0.95,
            aux_w=float(c.aux_w or 0.0) if c.kind == "dc" else 0.0,
        )
        for c in site.chargers
    ]
    return nodes, chargers


def _phase_index(p: str | int, names: Sequence[str], where: str) -> int:
    if isinstance(p, int):
        return p
    try:
        return list(names).index(p)
    except ValueError:
        msg = f"{where}: unknown phase {p!r}; site phases are {list(names)}"
        raise InputError(msg) from None


def to_core_input(req: PlanRequest) -> dict[str, Any]:
    """The JSON document the core (and the cvxpy reference in tests/planner) read."""
    nodes = []
    for n in req.nodes:
        d: dict[str, Any] = {
            "id": n.id,
            "parent": n.parent,
            "phase_limit_a": _per_phase(n.phase_limit_a),
            "other_load_a": _per_phase(n.other_load_a),
            "other_load_kw": _series(n.other_load_kw),
        }
        if n.power_limit_kw is not None:
            d["power_limit_kw"] = _series(n.power_limit_kw)
        nodes.append(d)
    chargers = []
    for i, c in enumerate(req.chargers):
        d = {k: v for k, v in asdict(c).items() if v is not None}
        d["phases"] = [
            _phase_index(p, req.phase_names, f"chargers[{i}]({c.id}).phases") for p in c.phases
        ]
        chargers.append(d)
    sessions = []
    for s in req.sessions:
        skip = ("arrival", "departure")
        d = {k: v for k, v in asdict(s).items() if v is not None and k not in skip}
        d["arrival_s"] = _epoch(s.arrival)
        d["departure_s"] = _epoch(s.departure)
        sessions.append(d)
    doc = {
        "start_s": _epoch(req.start),
        "step_s": [float(x) for x in req.step_s],
        "price_per_kwh": _series(req.price_per_kwh),
        "pv_kw": _series(req.pv_kw),
        "demand_charge_per_kw": float(req.demand_charge_per_kw),
        "demand_window_s": float(req.demand_window_s),
        "peak_floor_kw": float(req.peak_floor_kw),
        "current_window_energy_kwh": float(req.current_window_energy_kwh),
        "weights": asdict(req.weights),
        "nodes": nodes,
        "chargers": chargers,
        "sessions": sessions,
    }
    check_finite(doc)
    return doc


def _label(doc: Any, key: str | int, path: str) -> str:
    if isinstance(key, int):
        item = doc[key]
        ident = item.get("id") if isinstance(item, dict) else None
        return f"{path}[{key}]" + (f"({ident})" if ident else "")
    return f"{path}.{key}" if path else key


def check_finite(doc: Any, path: str = "") -> None:
    """Refuse NaN and infinities anywhere in a core input, naming the field as the core does."""
    if isinstance(doc, float):
        if not math.isfinite(doc):
            err = InputError(f"{path}: must be a finite number, got {doc}")
            err.column = path
            err.row = None
            raise err
    elif isinstance(doc, dict):
        for k, v in doc.items():
            check_finite(v, _label(doc, k, path))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            check_finite(v, _label(doc, i, path))


class Planner:
    """A receding-horizon planner. Keep one per site: a re-plan with the same structure reuses the
    Clarabel solver (data updates, no new setup)."""

    def __init__(self, settings: PlannerSettings | None = None) -> None:
        self.settings = settings or PlannerSettings()
        self._inner = _core.Planner(json.dumps(asdict(self.settings)))

    def plan(self, request: PlanRequest | Mapping[str, Any], budget_s: float) -> PlanResult:
        """Plan within ``budget_s`` seconds of wall clock. ``request`` may also be the core's JSON
        document (a mapping, as :func:`to_core_input` returns)."""
        if isinstance(request, PlanRequest):
            doc = to_core_input(request)
        else:
            doc = dict(request)
            check_finite(doc)
        if not math.isfinite(budget_s):
            check_finite(budget_s, "budget_s")
        batch = self._inner.plan(json.dumps(doc), float(budget_s))
        meta = batch.schema.metadata or {}
        summary = json.loads(meta[PLAN_METADATA_KEY.encode()])
        return PlanResult(schedule=batch, summary=summary)
