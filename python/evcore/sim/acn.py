"""Sessions from the ACN-Data JSON format (Caltech Adaptive Charging Network).

The format is the one the ACN-Data API returns: ``{"_items": [session, ...], "_meta": {...}}`` where
a session has ``sessionID``, ``stationID``, ``connectionTime`` and ``disconnectTime`` (RFC 1123,
e.g. ``"Wed, 25 Apr 2018 11:08:04 GMT"``), ``kWhDelivered`` and optionally ``userInputs`` (a list
whose last entry's ``kWhRequested`` is the driver's request). A bare list of sessions is accepted
too. The sessions are moved to the scenario's day keeping their time of day. No ACN data ships with
evcore; the tests use a small file written for this project.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from evcore.sim.scenario import ScenarioError, SessionSpec, VehicleModel


def _acn_time(v: Any, where: str) -> float:
    if not isinstance(v, str) or not v:
        raise ScenarioError(f"{where}: expected an RFC 1123 time string, got {v!r}")
    try:
        dt = parsedate_to_datetime(v)
    except (TypeError, ValueError):
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError as e:
            raise ScenarioError(f"{where}: not a time: {v!r}") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def load_acn_sessions(
    path: Path,
    *,
    start: float,
    vehicle: VehicleModel,
    station_map: Mapping[str, str],
    charger_ids: Sequence[str],
    soc_arrival: float,
) -> list[SessionSpec]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScenarioError(f"[arrivals].file: cannot read ACN JSON {path}: {e}") from e
    items = doc.get("_items") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ScenarioError(f"{path.name}: expected '_items' (a list of sessions)")
    parsed: list[tuple[str, str, float, float, float]] = []
    for i, it in enumerate(items):
        w = f"{path.name} _items[{i}]"
        if not isinstance(it, dict):
            raise ScenarioError(f"{w}: expected an object")
        sid = str(it.get("sessionID") or f"acn{i + 1}")
        station = str(it.get("stationID") or "")
        t0 = _acn_time(it.get("connectionTime"), f"{w}.connectionTime")
        t1 = _acn_time(it.get("disconnectTime"), f"{w}.disconnectTime")
        if t1 <= t0:
            raise ScenarioError(f"{w}: disconnectTime is not after connectionTime")
        energy = it.get("kWhDelivered")
        inputs = it.get("userInputs")
        if isinstance(inputs, list) and inputs and isinstance(inputs[-1], dict):
            req = inputs[-1].get("kWhRequested")
            if isinstance(req, int | float) and not isinstance(req, bool):
                energy = req
        if not isinstance(energy, int | float) or isinstance(energy, bool):
            raise ScenarioError(f"{w}: needs kWhDelivered or userInputs[-1].kWhRequested")
        kwh = float(energy)
        if not (math.isfinite(kwh) and kwh >= 0):
            raise ScenarioError(f"{w}: energy must be a finite number >= 0, got {energy!r}")
        parsed.append((sid, station, t0, t1, kwh))
    if not parsed:
        return []
    # Keep the time of day: shift whole days so that the first session's day is the start's day.
    first_day = math.floor(min(p[2] for p in parsed) / 86_400.0) * 86_400.0
    start_day = math.floor(start / 86_400.0) * 86_400.0
    shift = start_day - first_day
    stations = sorted({p[1] for p in parsed})
    auto = {st: charger_ids[k % len(charger_ids)] for k, st in enumerate(stations)}
    out = []
    for sid, station, t0, t1, kwh in parsed:
        charger = station_map.get(station, auto[station])
        out.append(
            SessionSpec(
                sid, charger, t0 + shift - start, t1 + shift - start, kwh, vehicle, soc_arrival
            )
        )
    return out
