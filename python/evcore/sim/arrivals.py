"""Vehicle arrivals for a scenario: a seeded statistical model, a CSV list, or ACN-Data JSON.

Everything here is a pure function of the scenario and the seed: the same inputs give the same
sessions, in the same order, on any machine. Sessions are placed on the site's chargers; a charger
never holds two sessions at once (later overlapping sessions are moved to a free charger or
dropped, and the drop is reported).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from evcore.sim.acn import load_acn_sessions
from evcore.sim.scenario import (
    ChargerSpec,
    Scenario,
    ScenarioError,
    SessionSpec,
    VehicleModel,
    parse_time,
)

# A request is capped at this share of what the charger and car could deliver flat out in the stay,
# so that an uncontrolled charger meets it: the policies then differ by what the site limits allow.
_FEASIBLE_SHARE = 0.85


@dataclass(frozen=True)
class Arrivals:
    sessions: tuple[SessionSpec, ...]
    dropped: int  # sessions that found no free charger


def max_rate_kw(ch: ChargerSpec, v: VehicleModel) -> float:
    """The most a car can take on a charger, in kW (AC: per-phase current times phases used)."""
    if ch.kind == "dc":
        return min(ch.max_w / 1000.0, v.max_dc_kw)
    amps = min(ch.max_a, v.max_a)
    if ch.wiring == "three_phase":
        return amps * ch.voltage_v * min(3, v.phases) / 1000.0
    return amps * ch.voltage_v / 1000.0


def _pick_vehicle(rng: np.random.Generator, vehicles: tuple[VehicleModel, ...]) -> VehicleModel:
    w = np.array([v.weight for v in vehicles], dtype=np.float64)
    return vehicles[int(rng.choice(len(vehicles), p=w / w.sum()))]


def _capped_energy(
    energy: float, soc: float, v: VehicleModel, ch: ChargerSpec, stay_s: float
) -> float:
    room = v.battery_kwh * (1.0 - soc)
    flat_out = max_rate_kw(ch, v) * stay_s / 3600.0 * _FEASIBLE_SHARE
    return max(0.0, min(energy, room, flat_out))


def statistical(sc: Scenario, seed: int) -> Arrivals:
    a = sc.arrivals
    rng = np.random.default_rng([seed, a.seed_offset, 8])
    sessions: list[SessionSpec] = []
    end = sc.duration_s
    n = 0
    for ch in sc.site.chargers:
        t_free = 0.0
        for k in range(a.sessions_per_charger):
            busy = rng.random() < a.occupancy
            if k == 0:
                arrive = rng.normal(a.arrival_mean_h, a.arrival_sd_h) * 3600.0
            else:
                arrive = t_free + rng.exponential(max(a.gap_mean_h, 1e-6)) * 3600.0
            stay = max(a.stay_min_h, rng.normal(a.stay_mean_h, a.stay_sd_h)) * 3600.0
            energy = max(a.energy_min_kwh, rng.normal(a.energy_mean_kwh, a.energy_sd_kwh))
            soc = float(np.clip(rng.normal(a.soc_arrival_mean, 0.1), 0.05, 0.9))
            v = _pick_vehicle(rng, a.vehicles)
            arrive = max(arrive, t_free, 0.0)
            depart = min(arrive + stay, end)
            if not busy or depart - arrive < 600.0:
                continue
            e = _capped_energy(energy, soc, v, ch, depart - arrive)
            if e < 0.5:
                continue
            n += 1
            sessions.append(SessionSpec(f"s{n:04d}", ch.id, arrive, depart, round(e, 3), v, soc))
            t_free = depart + 60.0
    sessions.sort(key=lambda s: (s.arrival_s, s.charger_id))
    return Arrivals(tuple(sessions), 0)


def place(sc: Scenario, raw: list[SessionSpec]) -> Arrivals:
    """Put listed sessions on chargers: keep a named free charger, else the first free one."""
    order = [c.id for c in sc.site.chargers]
    free_at = dict.fromkeys(order, -math.inf)
    out: list[SessionSpec] = []
    dropped = 0
    twice = [sid for sid, n in Counter(s.id for s in raw).items() if n > 1]
    if twice:  # each session's delivered energy is kept by its id
        raise ScenarioError(f"[arrivals]: session id {twice[0]!r} is listed twice")
    for s in sorted(raw, key=lambda s: (s.arrival_s, s.id)):
        if s.departure_s <= 0 or s.arrival_s >= sc.duration_s:
            continue
        arrive = max(0.0, s.arrival_s)
        depart = min(sc.duration_s, s.departure_s)
        if depart - arrive < 60.0:
            continue
        target = s.charger_id if s.charger_id in free_at else None
        if target is None or free_at[target] > arrive:
            target = next((c for c in order if free_at[c] <= arrive), None)
        if target is None:
            dropped += 1
            continue
        ch = sc.site.charger(target)
        e = _capped_energy(s.energy_kwh, s.soc_arrival, s.vehicle, ch, depart - arrive)
        if e < 0.1:
            continue
        free_at[target] = depart + 1.0
        out.append(
            replace(s, charger_id=target, arrival_s=arrive, departure_s=depart, energy_kwh=e)
        )
    return Arrivals(tuple(out), dropped)


def from_csv(sc: Scenario) -> Arrivals:
    """CSV columns: ``arrival``/``departure`` (ISO 8601 UTC) or ``arrival_h``/``departure_h``
    (hours after the start), ``energy_kwh``; optional ``id``, ``charger``, ``vehicle`` (a name from
    ``[[arrivals.vehicles]]``) and ``soc_arrival``."""
    path = sc.arrivals.file
    assert path is not None
    vehicles = {v.name: v for v in sc.arrivals.vehicles}
    raw: list[SessionSpec] = []
    # Each session's delivered energy is kept by its id: one id twice shared one figure.
    rows_of: dict[str, int] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                w = f"{path.name} row {i + 2}"
                sid = row.get("id") or f"csv{i + 1:04d}"
                if sid in rows_of:
                    raise ScenarioError(f"{w}.id: {sid!r} is listed twice (row {rows_of[sid]})")
                rows_of[sid] = i + 2
                t0 = _csv_time(row, "arrival", w, sc.start)
                t1 = _csv_time(row, "departure", w, sc.start)
                if t1 <= t0:
                    raise ScenarioError(f"{w}: departure is not after arrival")
                if not row.get("energy_kwh"):
                    raise ScenarioError(f"{w}.energy_kwh: missing")
                energy = _csv_number(row, "energy_kwh", w, 0.0, math.inf)
                vname = row.get("vehicle") or sc.arrivals.vehicles[0].name
                if vname not in vehicles:
                    raise ScenarioError(f"{w}.vehicle: unknown vehicle {vname!r}")
                soc = (
                    _csv_number(row, "soc_arrival", w, 0.0, 1.0)
                    if row.get("soc_arrival")
                    else sc.arrivals.soc_arrival_mean
                )
                raw.append(
                    SessionSpec(
                        sid,
                        row.get("charger") or "",
                        t0,
                        t1,
                        energy,
                        vehicles[vname],
                        soc,
                    )
                )
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"[arrivals].file: cannot read {path}: {e}") from e
    return place(sc, raw)


def _csv_number(row: dict[str, str], key: str, where: str, lo: float, hi: float) -> float:
    """Column ``key`` of a CSV row as a finite number within [lo, hi]; a ScenarioError naming the
    file, row and column (``where`` is ``"<file> row <n>"``) and the value otherwise."""
    text = row[key]
    try:
        x = float(text)
    except ValueError as e:
        raise ScenarioError(f"{where}.{key}: not a number, got {text!r}") from e
    if not math.isfinite(x):
        raise ScenarioError(f"{where}.{key}: must be a finite number, got {text!r}")
    if not lo <= x <= hi:
        bounds = f">= {lo:g}" if math.isinf(hi) else f"within [{lo:g}, {hi:g}]"
        raise ScenarioError(f"{where}.{key}: must be {bounds}, got {text!r}")
    return x


def _csv_time(row: dict[str, str], key: str, where: str, start: float) -> float:
    if row.get(f"{key}_h"):
        return _csv_number(row, f"{key}_h", where, -math.inf, math.inf) * 3600.0
    if row.get(key):
        return parse_time(row[key], f"{where}.{key}") - start
    raise ScenarioError(f"{where}: missing {key!r} or {key + '_h'!r}")


def generate(sc: Scenario, seed: int | None = None) -> Arrivals:
    """The scenario's sessions for ``seed`` (default: the scenario's own)."""
    s = sc.seed if seed is None else seed
    if sc.arrivals.model == "statistical":
        return statistical(sc, s)
    if sc.arrivals.model == "csv":
        return from_csv(sc)
    assert sc.arrivals.file is not None
    raw = load_acn_sessions(
        sc.arrivals.file,
        start=sc.start,
        vehicle=sc.arrivals.vehicles[0],
        station_map=sc.arrivals.station_map,
        charger_ids=[c.id for c in sc.site.chargers],
        soc_arrival=sc.arrivals.soc_arrival_mean,
    )
    return place(sc, raw)
