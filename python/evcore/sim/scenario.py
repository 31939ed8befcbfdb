"""Scenario files for the digital twin: what site, which vehicles, what prices, which faults.

A scenario is one TOML file (reference: docs/twin.md). It is a site file plus twin sections: the
site's ``[site]``/``[[nodes]]``/``[[chargers]]`` tables inline, or ``[scenario] site_file = PATH``;
then ``[arrivals]``, ``[tariff]``, ``[demand_charge]``, ``[[grid_signals]]`` and ``[[faults]]``.
This module parses and validates all of it into frozen dataclasses; every error is a
``ScenarioError`` naming the section and field. It never runs anything.
"""

from __future__ import annotations

import bisect
import csv
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from evcore.site.sections import Key, Section

POLICIES: tuple[str, ...] = (
    "uncontrolled",
    "fair_share",
    "least_laxity",
    "planner_cost",
    "planner_peak",
)
CONTROLLED_POLICIES = frozenset(POLICIES) - {"uncontrolled"}

FAULT_KINDS: tuple[str, ...] = (
    "charger_offline",
    "meter_stuck",
    "profile_ignored",
    "profiles_lost_on_reboot",
    "broker_down",
    "cloud_down",
    "edge_restart",
)

Wiring = Literal["three_phase", "line_to_neutral", "line_to_line"]


class ScenarioError(ValueError):
    """A scenario file (or a file it points to) is invalid; the message names where."""


# The keys each twin section may hold: any other is refused (a typo such as ``durration_h``
# would otherwise leave the default in force without a word). The site's own tables
# (``[site]``, ``[[nodes]]``, ``[[chargers]]``) are the site file's: the core checks them.
_SITE_FILE_SECTIONS = ("site", "nodes", "chargers", "ocpp", "edge", "planner")
_SITE_FILE_SERVICES = ("bus", "store", "api", "metrics", "cloud")  # the twin leaves these out
_TWIN_SECTIONS = ("scenario", "arrivals", "tariff", "demand_charge", "grid_signals", "faults")
_KEYS: dict[str, tuple[str, ...]] = {
    "": _SITE_FILE_SECTIONS + _SITE_FILE_SERVICES + _TWIN_SECTIONS,
    "[scenario]": (
        "name",
        "description",
        "site_file",
        "start",
        "duration_h",
        "seed",
        "meter_interval_s",
        "control_interval_s",
        "profile_delay_s",
        "settle_s",
        "physics_step_s",
        "plan_interval_s",
        "plan_step_s",
        "plan_horizon_h",
        "policies",
        "report_charger",
        "building_meter_s",
    ),
    "[arrivals]": (
        "model",
        "file",
        "station_map",
        "seed_offset",
        "occupancy",
        "sessions_per_charger",
        "arrival_mean_h",
        "arrival_sd_h",
        "gap_mean_h",
        "stay_mean_h",
        "stay_sd_h",
        "stay_min_h",
        "energy_mean_kwh",
        "energy_sd_kwh",
        "energy_min_kwh",
        "soc_arrival_mean",
        "vehicles",
    ),
    "[[arrivals.vehicles]]": ("name", "battery_kwh", "max_a", "phases", "max_dc_kw", "weight"),
    "[tariff]": ("currency", "default_price_per_kwh", "file", "periods"),
    "[[tariff.periods]]": ("start_h", "end_h", "price_per_kwh"),
    "[demand_charge]": ("price_per_kw", "window_min", "peak_floor_kw"),
    "[[grid_signals]]": ("node", "start_h", "start", "end_h", "end", "limit_kw", "notice_min"),
    "[[faults]]": ("kind", "charger", "at_h", "at", "duration_min"),
}
_ANY = Key("any")


def _known(table: Any, section: str, where: str | None = None) -> Mapping[str, Any]:
    """``table`` as a mapping whose keys ``section`` knows (``evcore.site.sections`` wording:
    ``[arrivals].stay_sdd_h: unknown key; known keys: ...``); ``where`` names an entry of an
    array of tables (``[[faults]][2]``)."""
    label = where if where is not None else section
    if not isinstance(table, Mapping):
        raise ScenarioError(f"{label or 'scenario'}: expected a table, got {table!r}")
    note = (
        " (a scenario holds a site file's sections and the twin's: docs/twin.md)"
        if section == ""
        else ""
    )
    keys = {k: _ANY for k in _KEYS[section]}
    Section(label, keys, ScenarioError, note).refuse_unknown(table)
    return table


def _entries(raw: Any, section: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The entries of an array of tables, each checked for unknown keys, with its label."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ScenarioError(f"{section}: expected an array of tables, got {raw!r}")
    return [(f"{section}[{i}]", _known(t, section, f"{section}[{i}]")) for i, t in enumerate(raw)]


# ---------------------------------------------------------------------------------------------
# The site, as much of it as the twin's physics and metrics need. The authoritative validation is
# the core's (``evcore._core``); this copy computes line currents for the twin's own measurements.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    id: str
    parent: str | None
    phase_limit_a: tuple[float, float, float]
    power_limit_kw: float | None
    unbalance_limit_a: float | None
    other_load_max_a: tuple[float, float, float]


@dataclass(frozen=True)
class ChargerSpec:
    id: str
    ocpp_id: str
    parent: str
    kind: Literal["ac", "dc"]
    wiring: Wiring
    phases: tuple[int, ...]  # indices of site phases
    voltage_v: float
    min_a: float
    max_a: float
    steps_a: tuple[float, ...]
    max_w: float
    min_w: float
    efficiency: float
    aux_w: float


@dataclass(frozen=True)
class SiteSpec:
    id: str
    phase_names: tuple[str, str, str]
    voltage_ln_v: float
    nodes: tuple[NodeSpec, ...]
    chargers: tuple[ChargerSpec, ...]
    raw: Mapping[str, Any]  # the site tables as written, for the core's loader

    @property
    def root(self) -> NodeSpec:
        return next(n for n in self.nodes if n.parent is None)

    def charger(self, charger_id: str) -> ChargerSpec:
        for c in self.chargers:
            if c.id == charger_id:
                return c
        raise ScenarioError(f"unknown charger {charger_id!r}")


@dataclass(frozen=True)
class VehicleModel:
    name: str
    battery_kwh: float
    max_a: float  # onboard charger limit per phase (AC)
    phases: int  # 1 or 3: phases the onboard charger uses
    max_dc_kw: float  # DC acceptance
    weight: float = 1.0


@dataclass(frozen=True)
class SessionSpec:
    id: str
    charger_id: str
    arrival_s: float  # seconds after scenario start
    departure_s: float
    energy_kwh: float  # requested
    vehicle: VehicleModel
    soc_arrival: float


@dataclass(frozen=True)
class ArrivalsSpec:
    model: Literal["statistical", "csv", "acn"]
    seed_offset: int = 0
    # statistical
    occupancy: float = 1.0
    sessions_per_charger: int = 1
    arrival_mean_h: float = 1.0
    arrival_sd_h: float = 0.5
    stay_mean_h: float = 8.0
    stay_sd_h: float = 1.0
    stay_min_h: float = 1.0
    gap_mean_h: float = 1.0
    energy_mean_kwh: float = 30.0
    energy_sd_kwh: float = 10.0
    energy_min_kwh: float = 2.0
    soc_arrival_mean: float = 0.3
    vehicles: tuple[VehicleModel, ...] = ()
    # csv / acn
    file: Path | None = None
    station_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TouPeriod:
    start_h: float  # hour of day (UTC), inclusive
    end_h: float  # exclusive; may be < start_h to wrap midnight
    price_per_kwh: float


@dataclass(frozen=True)
class TariffSpec:
    currency: str
    periods: tuple[TouPeriod, ...] = ()
    series: tuple[tuple[float, float], ...] = ()  # (unix seconds, price) sorted
    default_price_per_kwh: float = 0.0

    def next_change(self, t: float) -> float:
        """The first instant after unix time ``t`` where the price may change (+inf: never)."""
        if self.series:
            i = bisect.bisect_right(self.series, t, key=lambda x: x[0])
            return self.series[i][0] if i < len(self.series) else math.inf
        day = math.floor(t / 86_400.0) * 86_400.0
        edges = (
            d + h * 3600.0
            for d in (day, day + 86_400.0)
            for p in self.periods
            for h in (p.start_h, p.end_h)
        )
        return min((e for e in edges if e > t), default=math.inf)

    def changes(self, t0: float, t1: float) -> list[tuple[float, float]]:
        """(instant, price per kWh): the price at ``t0``, then each change before ``t1`` at its
        own instant (neighbours of equal price merged)."""
        out = [(t0, self.price_at(t0))]
        t = t0
        while (t := self.next_change(t)) < t1:
            price = self.price_at(t)
            if price != out[-1][1]:
                out.append((t, price))
        return out

    def mean_price(self, t0: float, t1: float) -> float:
        """The time-weighted mean price per kWh over [``t0``, ``t1``) (the price at ``t0`` for
        an empty span): what a constant load over it pays per kWh."""
        if t1 <= t0:
            return self.price_at(t0)
        pts = self.changes(t0, t1)
        ends = [t for t, _ in pts[1:]] + [t1]
        return sum(p * (b - a) for (a, p), b in zip(pts, ends, strict=True)) / (t1 - t0)

    def price_at(self, t: float) -> float:
        """Energy price per kWh at unix time ``t``."""
        if self.series:
            lo, hi = 0, len(self.series)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.series[mid][0] <= t:
                    lo = mid
                else:
                    hi = mid
            return self.series[lo][1] if self.series[lo][0] <= t else self.series[0][1]
        hour = (t % 86_400.0) / 3600.0
        for p in self.periods:
            inside = (
                p.start_h <= hour < p.end_h
                if p.start_h <= p.end_h
                else (hour >= p.start_h or hour < p.end_h)
            )
            if inside:
                return p.price_per_kwh
        return self.default_price_per_kwh


@dataclass(frozen=True)
class DemandChargeSpec:
    price_per_kw: float = 0.0
    window_min: int = 15
    peak_floor_kw: float = 0.0  # peak already reached this billing period


@dataclass(frozen=True)
class GridSignal:
    node: str
    start_s: float
    end_s: float
    limit_kw: float
    notice_s: float = 3600.0  # announced this long before start_s (at the earliest at t = 0)


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    at_s: float
    duration_s: float
    charger: str | None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: Path | None
    start: float  # unix seconds
    duration_s: float
    seed: int
    meter_interval_s: float
    control_interval_s: float
    profile_delay_s: float
    settle_s: float
    plan_interval_s: float
    plan_step_s: float
    plan_horizon_h: float
    policies: tuple[str, ...]
    report_charger: str | None
    physics_step_s: float
    site: SiteSpec
    arrivals: ArrivalsSpec
    tariff: TariffSpec
    demand_charge: DemandChargeSpec
    grid_signals: tuple[GridSignal, ...]
    faults: tuple[FaultSpec, ...]
    edge: Mapping[str, Any] = field(default_factory=dict)  # [edge] overrides for the stack
    #: Building meters: every this many seconds each node's non-charger load as the twin draws
    #: it reaches the edge on ``node_load.<node>`` (stack backend; 0: none, the edge counts each
    #: node's ``other_load_max_a``).
    building_meter_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# parsing helpers
# ---------------------------------------------------------------------------------------------
def _num(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None = None,
    *,
    minimum: float | None = None,
    positive: bool = False,
) -> float:
    if key not in table:
        if default is None:
            raise ScenarioError(f"{where}: missing required field {key!r}")
        return default
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ScenarioError(f"{where}.{key}: expected a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ScenarioError(f"{where}.{key}: must be finite, got {v!r}")
    if positive and f <= 0:
        raise ScenarioError(f"{where}.{key}: must be > 0, got {v!r}")
    if minimum is not None and f < minimum:
        raise ScenarioError(f"{where}.{key}: must be >= {minimum}, got {v!r}")
    return f


def _seed(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    """A random seed: numpy's generators take only whole numbers >= 0."""
    f = _num(table, key, where, float(default), minimum=0.0)
    if not f.is_integer():
        raise ScenarioError(f"{where}.{key}: must be a whole number >= 0, got {table[key]!r}")
    v = table.get(key, default)
    return v if isinstance(v, int) else int(f)  # an integer as given, above 2**53 too


def _whole(table: Mapping[str, Any], key: str, where: str, default: int) -> int:
    """A count (windows in minutes, sessions): a whole number >= 1. ``int()`` of a fraction
    made a 0.5-minute demand window 0 (the run died dividing by it) and 0.5 sessions none."""
    f = _num(table, key, where, float(default))
    if not f.is_integer() or f < 1:
        raise ScenarioError(f"{where}.{key}: must be a whole number >= 1, got {table[key]!r}")
    return int(f)


def _twice(names: Sequence[Any]) -> str:
    """The first name that ``names`` holds twice, quoted."""
    seen: set[Any] = set()
    for n in names:
        if n in seen:
            return repr(n)
        seen.add(n)
    raise ValueError("no name is listed twice")


def _str(table: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in table:
        if default is None:
            raise ScenarioError(f"{where}: missing required field {key!r}")
        return default
    v = table[key]
    if not isinstance(v, str) or not v:
        raise ScenarioError(f"{where}.{key}: expected a non-empty string, got {v!r}")
    return v


def _three(v: Any, where: str) -> tuple[float, float, float]:
    if isinstance(v, int | float) and not isinstance(v, bool):
        vals = [float(v)] * 3
    elif isinstance(v, list) and len(v) == 3:
        vals = [float(x) if isinstance(x, int | float) else math.nan for x in v]
    else:
        raise ScenarioError(f"{where}: expected a number or 3 numbers, got {v!r}")
    for x in vals:
        if not math.isfinite(x) or x < 0:
            raise ScenarioError(f"{where}: limits must be finite and >= 0, got {v!r}")
    return (vals[0], vals[1], vals[2])


def parse_time(v: Any, where: str) -> float:
    """A UTC timestamp (TOML datetime or ISO 8601 string) as unix seconds."""
    if isinstance(v, datetime):
        dt = v if v.tzinfo else v.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(v, str):
        s = v.strip()
        if s.endswith("Z"):
            s = s[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(s)
        except ValueError as e:
            raise ScenarioError(f"{where}: not an ISO 8601 time: {v!r}") from e
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    raise ScenarioError(f"{where}: expected a time, got {v!r}")


def _offset_s(table: Mapping[str, Any], key_h: str, where: str, start: float) -> float:
    """A time inside the scenario: ``<key>_h`` hours after the start, or ``<key>`` as a time."""
    base = key_h[:-2]
    if key_h in table:
        return _num(table, key_h, where, minimum=0.0) * 3600.0
    if base in table:
        return parse_time(table[base], f"{where}.{base}") - start
    raise ScenarioError(f"{where}: missing {key_h!r} (hours after the start) or {base!r} (a time)")


# ---------------------------------------------------------------------------------------------
# the site
# ---------------------------------------------------------------------------------------------
def parse_site(doc: Mapping[str, Any], where: str = "site") -> SiteSpec:
    """The twin's view of a site file's topology (the core validates the same tables fully)."""
    site = doc.get("site")
    if not isinstance(site, dict):
        raise ScenarioError(f"{where}: missing [site] table")
    sid = _str(site, "id", "[site]")
    names_raw = site.get("phase_names", ["L1", "L2", "L3"])
    if not (isinstance(names_raw, list) and len(names_raw) == 3 and len(set(names_raw)) == 3):
        raise ScenarioError(f"[site].phase_names: expected 3 distinct names, got {names_raw!r}")
    names = (str(names_raw[0]), str(names_raw[1]), str(names_raw[2]))
    v_ln = _num(site, "voltage_ln_v", "[site]", 230.0, positive=True)
    nodes_raw = doc.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ScenarioError(f"{where}: needs at least one [[nodes]] entry")
    nodes: list[NodeSpec] = []
    ids: set[str] = set()
    for i, n in enumerate(nodes_raw):
        w = f"[[nodes]][{i}]"
        nid = _str(n, "id", w)
        w = f"node {nid!r}"
        if nid in ids:
            raise ScenarioError(f"{w}: duplicate id")
        ids.add(nid)
        if "phase_limit_a" in n and "breaker_rating_a" in n:
            raise ScenarioError(f"{w}: give phase_limit_a or breaker_rating_a, not both")
        if "phase_limit_a" in n:
            lim = _three(n["phase_limit_a"], f"{w}.phase_limit_a")
        elif "breaker_rating_a" in n:
            rating = _three(n["breaker_rating_a"], f"{w}.breaker_rating_a")
            der = _num(n, "continuous_derating", w, 0.8, positive=True)
            if der > 1:
                raise ScenarioError(f"{w}.continuous_derating: must be in (0, 1], got {der}")
            lim = (rating[0] * der, rating[1] * der, rating[2] * der)
        else:
            raise ScenarioError(f"{w}: missing phase_limit_a (or breaker_rating_a)")
        pl = _num(n, "power_limit_kw", w, positive=True) if "power_limit_kw" in n else None
        ub = _num(n, "unbalance_limit_a", w, positive=True) if "unbalance_limit_a" in n else None
        other = _three(n.get("other_load_max_a", 0.0), f"{w}.other_load_max_a")
        parent = n.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ScenarioError(f"{w}.parent: expected a string, got {parent!r}")
        nodes.append(NodeSpec(nid, parent, lim, pl, ub, other))
    roots = [n.id for n in nodes if n.parent is None]
    if len(roots) != 1:
        raise ScenarioError(f"{where}: exactly one node must have no parent, found {roots}")
    for n in nodes:
        if n.parent is not None and n.parent not in ids:
            raise ScenarioError(f"node {n.id!r}.parent: unknown node {n.parent!r}")
    chargers: list[ChargerSpec] = []
    for i, c in enumerate(doc.get("chargers") or []):
        w = f"[[chargers]][{i}]"
        cid = _str(c, "id", w)
        w = f"charger {cid!r}"
        if cid in ids:
            raise ScenarioError(f"{w}: duplicate id")
        ids.add(cid)
        parent = _str(c, "parent", w)
        if parent not in {n.id for n in nodes}:
            raise ScenarioError(f"{w}.parent: unknown node {parent!r}")
        kind = _str(c, "kind", w, "ac")
        if kind not in ("ac", "dc"):
            raise ScenarioError(f"{w}.kind: expected 'ac' or 'dc', got {kind!r}")
        wiring = _str(c, "wiring", w, "three_phase")
        if wiring not in ("three_phase", "line_to_neutral", "line_to_line"):
            raise ScenarioError(f"{w}.wiring: unknown wiring {wiring!r}")
        want = {"three_phase": 3, "line_to_neutral": 1, "line_to_line": 2}[wiring]
        ph_raw = c.get("phases", list(names) if wiring == "three_phase" else None)
        if not isinstance(ph_raw, list) or len(ph_raw) != want:
            raise ScenarioError(f"{w}.phases: {wiring} needs {want} site phases, got {ph_raw!r}")
        try:
            phases = tuple(names.index(p) for p in ph_raw)
        except ValueError as e:
            raise ScenarioError(f"{w}.phases: {ph_raw!r} names a phase not in {names}") from e
        default_v = v_ln * math.sqrt(3) if wiring == "line_to_line" else v_ln
        voltage = _num(c, "voltage_v", w, default_v, positive=True)
        if kind == "dc":
            max_w = _num(c, "max_w", w, positive=True)
            chargers.append(
                ChargerSpec(
                    cid,
                    _str(c, "ocpp_id", w, cid),
                    parent,
                    "dc",
                    "three_phase",
                    phases,
                    voltage,
                    0.0,
                    0.0,
                    (),
                    max_w,
                    _num(c, "min_w", w, 0.0, minimum=0.0),
                    _num(c, "efficiency", w, 0.95, positive=True),
                    _num(c, "aux_w", w, 0.0, minimum=0.0),
                )
            )
            continue
        min_a = _num(c, "min_a", w, 6.0, minimum=6.0)
        max_a = _num(c, "max_a", w, positive=True)
        if min_a > max_a:
            raise ScenarioError(f"{w}: min_a {min_a} is above max_a {max_a}")
        steps = tuple(sorted(float(s) for s in c.get("steps_a", [])))
        chargers.append(
            ChargerSpec(
                cid,
                _str(c, "ocpp_id", w, cid),
                parent,
                "ac",
                wiring,  # type: ignore[arg-type]
                phases,
                voltage,
                min_a,
                max_a,
                steps,
                0.0,
                0.0,
                1.0,
                0.0,
            )
        )
    if not chargers:
        raise ScenarioError(f"{where}: needs at least one [[chargers]] entry")
    raw = {k: doc[k] for k in ("site", "nodes", "chargers") if k in doc}
    return SiteSpec(sid, names, v_ln, tuple(nodes), tuple(chargers), raw)


# ---------------------------------------------------------------------------------------------
# the scenario
# ---------------------------------------------------------------------------------------------
_DEFAULT_VEHICLES = (
    VehicleModel("car-3ph-11kw", 60.0, 16.0, 3, 50.0),
    VehicleModel("car-1ph-7kw", 50.0, 32.0, 1, 50.0),
)


def _vehicles(raw: Any, where: str) -> tuple[VehicleModel, ...]:
    if raw is None:
        return _DEFAULT_VEHICLES
    if not isinstance(raw, list) or not raw:
        raise ScenarioError(f"{where}: expected a non-empty list of [[arrivals.vehicles]]")
    out = []
    for w, v in _entries(raw, "[[arrivals.vehicles]]"):
        name = _str(v, "name", w)
        phases_f = _num(v, "phases", w, 3.0)
        if phases_f not in (1.0, 3.0):
            raise ScenarioError(f"{w}.phases: must be 1 or 3, got {v['phases']!r}")
        phases = int(phases_f)
        out.append(
            VehicleModel(
                name,
                _num(v, "battery_kwh", w, positive=True),
                _num(v, "max_a", w, 32.0, positive=True),
                phases,
                _num(v, "max_dc_kw", w, 50.0, positive=True),
                _num(v, "weight", w, 1.0, positive=True),
            )
        )
    return tuple(out)


def _arrivals(raw: Any, base: Path | None) -> ArrivalsSpec:
    if raw is None:
        raise ScenarioError("scenario: missing [arrivals] table")
    w = "[arrivals]"
    raw = _known(raw, w)
    model = _str(raw, "model", w, "statistical")
    if model not in ("statistical", "csv", "acn"):
        raise ScenarioError(f"{w}.model: expected statistical, csv or acn, got {model!r}")
    file: Path | None = None
    if model in ("csv", "acn"):
        fname = _str(raw, "file", w)
        file = _resolve(fname, base)
        if not file.is_file():
            raise ScenarioError(f"{w}.file: no such file {str(file)!r}")
    smap = raw.get("station_map", {})
    if not isinstance(smap, dict):
        raise ScenarioError(f"{w}.station_map: expected a table of station id = charger id")
    occ = _num(raw, "occupancy", w, 1.0, minimum=0.0)
    if occ > 1:
        raise ScenarioError(f"{w}.occupancy: must be in [0, 1], got {occ}")
    soc = _num(raw, "soc_arrival_mean", w, 0.3, minimum=0.0)
    if soc >= 1:
        raise ScenarioError(f"{w}.soc_arrival_mean: must be below 1, got {soc}")
    return ArrivalsSpec(
        model=model,  # type: ignore[arg-type]
        seed_offset=_seed(raw, "seed_offset", w, 0),
        occupancy=occ,
        sessions_per_charger=_whole(raw, "sessions_per_charger", w, 1),
        arrival_mean_h=_num(raw, "arrival_mean_h", w, 1.0, minimum=0.0),
        arrival_sd_h=_num(raw, "arrival_sd_h", w, 0.5, minimum=0.0),
        stay_mean_h=_num(raw, "stay_mean_h", w, 8.0, positive=True),
        stay_sd_h=_num(raw, "stay_sd_h", w, 1.0, minimum=0.0),
        stay_min_h=_num(raw, "stay_min_h", w, 1.0, positive=True),
        gap_mean_h=_num(raw, "gap_mean_h", w, 1.0, minimum=0.0),
        energy_mean_kwh=_num(raw, "energy_mean_kwh", w, 30.0, positive=True),
        energy_sd_kwh=_num(raw, "energy_sd_kwh", w, 10.0, minimum=0.0),
        energy_min_kwh=_num(raw, "energy_min_kwh", w, 2.0, positive=True),
        soc_arrival_mean=soc,
        vehicles=_vehicles(raw.get("vehicles"), "[[arrivals.vehicles]]"),
        file=file,
        station_map={str(k): str(v) for k, v in smap.items()},
    )


def _resolve(name: str, base: Path | None) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    if base is not None and (base / p).exists():
        return base / p
    builtin = resources.files("evcore.sim") / "scenarios" / name
    if builtin.is_file():
        return Path(str(builtin))
    return (base or Path.cwd()) / p


def _tariff(raw: Any, base: Path | None, start: float, end: float) -> TariffSpec:
    if raw is None:
        return TariffSpec(currency="EUR", default_price_per_kwh=0.0)
    w = "[tariff]"
    raw = _known(raw, w)
    currency = _str(raw, "currency", w, "EUR")
    default = _num(raw, "default_price_per_kwh", w, 0.0, minimum=0.0)
    if "file" in raw:
        path = _resolve(_str(raw, "file", w), base)
        series = load_price_series(path)
        if series[0][0] > start or series[-1][0] < start:
            raise ScenarioError(f"{w}.file: prices in {path} do not cover the scenario start")
        return TariffSpec(currency, series=tuple(series), default_price_per_kwh=default)
    periods = []
    for pw, p in _entries(raw.get("periods"), "[[tariff.periods]]"):
        sh = _num(p, "start_h", pw, minimum=0.0)
        eh = _num(p, "end_h", pw, minimum=0.0)
        if sh > 24 or eh > 24:
            raise ScenarioError(f"{pw}: start_h/end_h are hours of the day (0-24)")
        periods.append(TouPeriod(sh, eh, _num(p, "price_per_kwh", pw, minimum=0.0)))
    return TariffSpec(currency, periods=tuple(periods), default_price_per_kwh=default)


def load_price_series(path: Path) -> list[tuple[float, float]]:
    """A price series CSV: columns ``time`` (ISO 8601 UTC) and ``price_per_kwh``."""
    out: list[tuple[float, float]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                w = f"{path.name} row {i + 2}"
                if "time" not in row or "price_per_kwh" not in row:
                    raise ScenarioError(f"{w}: needs columns 'time' and 'price_per_kwh'")
                try:
                    price = float(row["price_per_kwh"])
                except ValueError as e:
                    raise ScenarioError(f"{w}.price_per_kwh: not a number") from e
                if not math.isfinite(price):
                    raise ScenarioError(f"{w}.price_per_kwh: must be finite")
                out.append((parse_time(row["time"], f"{w}.time"), price))
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"[tariff].file: cannot read {path}: {e}") from e
    if not out:
        raise ScenarioError(f"[tariff].file: {path} holds no prices")
    out.sort()
    return out


def parse_scenario(doc: Mapping[str, Any], *, path: Path | None = None) -> Scenario:
    """Validate a scenario document (the parsed TOML)."""
    base = path.parent if path is not None else None
    _known(doc, "")
    sc = doc.get("scenario")
    if sc is None:
        raise ScenarioError("scenario: missing [scenario] table")
    w = "[scenario]"
    sc = _known(sc, w)
    name = _str(sc, "name", w)
    if "site_file" in sc:
        if "site" in doc or "nodes" in doc:
            raise ScenarioError(f"{w}.site_file: give the site inline or as a file, not both")
        spath = _resolve(_str(sc, "site_file", w), base)
        try:
            sdoc = tomllib.loads(spath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ScenarioError(f"{w}.site_file: cannot load {spath}: {e}") from e
        site = parse_site(sdoc, str(spath))
    else:
        site = parse_site(doc, "scenario (inline site)")
    start = parse_time(sc.get("start", "2026-01-05T16:00:00Z"), f"{w}.start")
    duration_s = _num(sc, "duration_h", w, 24.0, positive=True) * 3600.0
    meter = _num(sc, "meter_interval_s", w, 60.0, positive=True)
    control = _num(sc, "control_interval_s", w, 30.0, positive=True)
    policies = sc.get("policies", list(POLICIES))
    if not isinstance(policies, list) or not policies:
        raise ScenarioError(f"{w}.policies: expected a non-empty list")
    for p in policies:
        if p not in POLICIES:
            raise ScenarioError(
                f"{w}.policies: unknown policy {p!r} (known: {', '.join(POLICIES)})"
            )
    if len(set(policies)) != len(policies):
        raise ScenarioError(f"{w}.policies: {_twice(policies)} is listed twice")
    report_charger = sc.get("report_charger")
    if report_charger is not None and report_charger not in {c.id for c in site.chargers}:
        ids = [c.id for c in site.chargers]
        listed = ", ".join(ids[:5]) + (f", ... ({len(ids)} chargers)" if len(ids) > 5 else "")
        raise ScenarioError(
            f"{w}.report_charger: unknown charger {report_charger!r} (site: {listed})"
        )
    end = start + duration_s
    tariff = _tariff(doc.get("tariff"), base, start, end)
    dc_raw = _known(doc.get("demand_charge", {}), "[demand_charge]")
    dc = DemandChargeSpec(
        price_per_kw=_num(dc_raw, "price_per_kw", "[demand_charge]", 0.0, minimum=0.0),
        window_min=_whole(dc_raw, "window_min", "[demand_charge]", 15),
        peak_floor_kw=_num(dc_raw, "peak_floor_kw", "[demand_charge]", 0.0, minimum=0.0),
    )
    node_ids = {n.id for n in site.nodes}
    signals = []
    for gw, g in _entries(doc.get("grid_signals"), "[[grid_signals]]"):
        node = _str(g, "node", gw, site.root.id)
        if node not in node_ids:
            raise ScenarioError(f"{gw}.node: unknown node {node!r}")
        s0 = _offset_s(g, "start_h", gw, start)
        s1 = _offset_s(g, "end_h", gw, start)
        if s1 <= s0:
            raise ScenarioError(f"{gw}: end is not after start")
        signals.append(
            GridSignal(
                node,
                s0,
                s1,
                _num(g, "limit_kw", gw, minimum=0.0),
                _num(g, "notice_min", gw, 60.0, minimum=0.0) * 60.0,
            )
        )
    charger_ids = {c.id for c in site.chargers}
    faults = []
    for fw, f in _entries(doc.get("faults"), "[[faults]]"):
        kind = _str(f, "kind", fw)
        if kind not in FAULT_KINDS:
            raise ScenarioError(
                f"{fw}.kind: unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})"
            )
        ch = f.get("charger")
        if kind in ("charger_offline", "meter_stuck", "profile_ignored", "profiles_lost_on_reboot"):
            if ch not in charger_ids:
                raise ScenarioError(f"{fw}.charger: {kind} needs a known charger, got {ch!r}")
        faults.append(
            FaultSpec(
                kind,
                _offset_s(f, "at_h", fw, start),
                _num(f, "duration_min", fw, 30.0, minimum=0.0) * 60.0,
                str(ch) if ch is not None else None,
            )
        )
    scenario = Scenario(
        name=name,
        description=str(sc.get("description", "")),
        path=path,
        start=start,
        duration_s=duration_s,
        seed=_seed(sc, "seed", w, 1),
        meter_interval_s=meter,
        control_interval_s=control,
        profile_delay_s=_num(sc, "profile_delay_s", w, 2.0, minimum=0.0),
        settle_s=_num(sc, "settle_s", w, 5.0, minimum=0.0),
        plan_interval_s=_num(sc, "plan_interval_s", w, 900.0, positive=True),
        plan_step_s=_num(sc, "plan_step_s", w, 900.0, positive=True),
        plan_horizon_h=_num(sc, "plan_horizon_h", w, 24.0, positive=True),
        policies=tuple(str(p) for p in policies),
        physics_step_s=_num(sc, "physics_step_s", w, 5.0, positive=True),
        report_charger=str(report_charger) if report_charger is not None else None,
        building_meter_s=_num(sc, "building_meter_s", w, 0.0, minimum=0.0),
        site=site,
        arrivals=_arrivals(doc.get("arrivals"), base),
        tariff=tariff,
        demand_charge=dc,
        grid_signals=tuple(signals),
        faults=tuple(faults),
        edge=_edge_table(doc.get("edge")),
    )
    ids = [c.id for c in site.chargers]
    for station, charger in scenario.arrivals.station_map.items():
        if charger not in charger_ids:
            # Kept, every session of the station went to the first free charger instead.
            listed = ", ".join(ids[:5]) + (f", ... ({len(ids)} chargers)" if len(ids) > 5 else "")
            raise ScenarioError(
                f"[arrivals].station_map.{station}: unknown charger {charger!r} (site: {listed})"
            )
    _check_edge(scenario)
    return scenario


def _edge_table(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ScenarioError("[edge]: expected a table")
    if "policy" in raw:
        raise ScenarioError(
            "[edge].policy: the twin sets the policy; list them in [scenario].policies"
        )
    return dict(raw)


def _check_edge(sc: Scenario) -> None:
    """The ``[edge]`` the twin's edge will run with (the twin's defaults, this scenario's
    overrides, a policy) checked by ``EdgeConfig`` now, so that a bad override is an error that
    names its key at load rather than a traceback once the run starts."""
    from evcore.edge.config import EdgeConfig, EdgeConfigError
    from evcore.sim.stack import edge_table

    try:
        EdgeConfig.from_site(edge_table(sc, "fair_share"))
    except EdgeConfigError as e:
        raise ScenarioError(str(e)) from e


def load_scenario(ref: str | Path) -> Scenario:
    """Load a scenario file by path, or a shipped one by name (``depot``, ``workplace-208v``, …)."""
    path = Path(ref)
    if not path.is_file():
        name = str(ref)
        cand = (
            resources.files("evcore.sim")
            / "scenarios"
            / (name if name.endswith(".toml") else f"{name}.toml")
        )
        if not cand.is_file():
            raise ScenarioError(
                f"no scenario file {str(ref)!r} (shipped: {', '.join(shipped_scenarios())})"
            )
        path = Path(str(cand))
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not UTF-8 text as TOML must be ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from e
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e}") from e
    return parse_scenario(doc, path=path)


def shipped_scenarios() -> list[str]:
    d = resources.files("evcore.sim") / "scenarios"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


def with_overrides(
    sc: Scenario,
    *,
    seed: int | None = None,
    duration_h: float | None = None,
    policies: Sequence[str] | None = None,
) -> Scenario:
    """A copy with the command line's overrides applied (and checked)."""
    from dataclasses import replace

    out = sc
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ScenarioError(f"--seed must be a whole number >= 0, got {seed!r}")
        out = replace(out, seed=seed)
    if duration_h is not None:
        if not (duration_h > 0 and math.isfinite(duration_h)):
            raise ScenarioError(f"--hours must be a positive number, got {duration_h!r}")
        out = replace(out, duration_s=duration_h * 3600.0)
    if policies is not None:
        for p in policies:
            if p not in POLICIES:
                raise ScenarioError(f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
        if not policies:
            raise ScenarioError("no policy given")
        if len(set(policies)) != len(policies):
            raise ScenarioError(f"--policies: {_twice(policies)} is listed twice")
        out = replace(out, policies=tuple(policies))
    return out
