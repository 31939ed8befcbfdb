"""Plain data from the ``EdgeFacade`` → ``evcore.v1`` API messages. Pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from evcore.v1 import edge_api_pb2 as pb


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    whole = math.floor(seconds)
    ts.seconds = int(whole)
    ts.nanos = min(999_999_999, round((seconds - whole) * 1e9))
    return ts


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TS_MIN_S = -62_135_596_800
_TS_MAX_S = 253_402_300_799


def checked_seconds(ts: Timestamp, field: str) -> float:
    """``seconds(ts)`` of a Timestamp a caller sent, or ValueError naming ``field`` when it is
    outside the Timestamp's range (a millisecond epoch sent as seconds) or its nanos are not in
    [0, 1e9)."""
    if not _TS_MIN_S <= ts.seconds <= _TS_MAX_S:
        raise ValueError(
            f"{field} is out of range: {ts.seconds} s is not between years 0001 and 9999 "
            "(milliseconds sent as seconds?)"
        )
    if not 0 <= ts.nanos < 1_000_000_000:
        raise ValueError(f"{field}.nanos must be in [0, 999999999], got {ts.nanos}")
    return seconds(ts)


def iso(seconds_: float) -> str:
    """A time as RFC 3339 UTC text (for messages)."""
    return timestamp(seconds_).ToJsonString()


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def phases(values: Any) -> list[float]:
    """Per-phase values in site order: empty when none is known, NaN for a phase not measured (the
    position of each phase must stay)."""
    out = [_num(x) for x in values or ()]
    if all(x is None for x in out):
        return []
    return [math.nan if x is None else x for x in out]


def _is_w(d: Mapping[str, Any]) -> bool:
    return str(d.get("unit") or "A").upper() == "W"


def charger_view(d: Mapping[str, Any]) -> pb.ChargerView:
    v = pb.ChargerView(
        charger_id=str(d.get("charger_id") or ""),
        ocpp_id=str(d.get("ocpp_id") or ""),
        online=bool(d.get("online")),
        status=str(d.get("status") or ""),
        plugged=bool(d.get("plugged")),
        available=bool(d.get("available", True)),
        transaction_id=str(d.get("transaction_id") or ""),
        accepted=bool(d.get("accepted")),
        suspect=bool(d.get("suspect")),
        faulted=bool(d.get("faulted")),
        fault_reason=str(d.get("fault_reason") or ""),
    )
    sp = _num(d.get("setpoint"))
    if sp is not None:
        if _is_w(d):
            v.setpoint_w = sp
        else:
            v.setpoint_a = sp
    vt = _num(d.get("valid_to"))
    if vt is not None:
        v.valid_until.CopyFrom(timestamp(vt))
    v.measured_current_a.extend(phases(d.get("measured_a")))
    mw = _num(d.get("measured_w"))
    if mw is not None:
        v.measured_power_w = mw
    age = _num(d.get("measurement_age_s"))
    if age is not None:
        v.measurement_age_s = age
    return v


def site_state(d: Mapping[str, Any], *, site_id: str, now_s: float) -> pb.SiteState:
    s = pb.SiteState(
        site_id=str(d.get("site_id") or site_id),
        policy=str(d.get("policy") or ""),
        decision_count=int(d.get("decisions") or 0),
        profiles_sent_count=int(d.get("profiles_sent") or 0),
    )
    s.observed_at.CopyFrom(timestamp(_num(d.get("at")) or now_s))
    chargers = [charger_view(c) for c in d.get("chargers") or ()]
    s.chargers.extend(chargers)
    dc = {c.charger_id for c in chargers if c.HasField("setpoint_w")}
    dc |= {str(c.get("charger_id")) for c in d.get("chargers") or () if _is_w(c)}
    for node_id, kw in sorted((d.get("curtailments_kw") or {}).items()):
        s.curtailments.append(pb.CurtailmentInForce(node_id=str(node_id), max_kw=float(kw)))
    for cid, level in sorted((d.get("failsafe") or {}).items()):
        f = pb.FailsafeLevel(charger_id=str(cid))
        value = _num(level)
        if value is not None:
            if cid in dc:
                f.level_w = value
            else:
                f.level_a = value
        s.failsafe_levels.append(f)
    for fault in d.get("faults") or ():
        s.faults.append(
            pb.FaultReport(
                charger_id=str(fault.get("charger_id") or ""), reason=str(fault.get("reason") or "")
            )
        )
    return s


def session_view(d: Mapping[str, Any]) -> pb.SessionView:
    v = pb.SessionView(
        charger_id=str(d.get("charger_id") or ""),
        transaction_id=str(d.get("transaction_id") or ""),
        energy_delivered_kwh=_num(d.get("energy_delivered_kwh")) or 0.0,
        priority=_num(d.get("priority")) or 1.0,
    )
    started = _num(d.get("started_at"))
    if started is not None:
        v.started_at.CopyFrom(timestamp(started))
    req = _num(d.get("energy_requested_kwh"))
    if req is not None:
        v.energy_requested_kwh = req
    dep = _num(d.get("departure"))
    if dep is not None:
        v.departure.CopyFrom(timestamp(dep))
    return v


def setpoint_view(d: Mapping[str, Any]) -> pb.SetpointView:
    v = pb.SetpointView(charger_id=str(d.get("charger_id") or ""), accepted=bool(d.get("accepted")))
    w = _is_w(d)
    sp = _num(d.get("setpoint"))
    if sp is not None:
        if w:
            v.setpoint_w = sp
        else:
            v.setpoint_a = sp
    fs = _num(d.get("failsafe"))
    if fs is not None:
        if w:
            v.failsafe_w = fs
        else:
            v.failsafe_a = fs
    vt = _num(d.get("valid_to"))
    if vt is not None:
        v.valid_until.CopyFrom(timestamp(vt))
    return v


def node_utilisation(d: Mapping[str, Any]) -> pb.NodeUtilisation:
    current = phases(d.get("current_a"))
    limit = phases(d.get("phase_limit_a"))
    n = pb.NodeUtilisation(node_id=str(d.get("node_id") or ""))
    n.current_a.extend(current)
    n.phase_limit_a.extend(limit)
    ratios = [
        abs(c) / lim for c, lim in zip(current, limit, strict=False) if lim > 0 and math.isfinite(c)
    ]
    pkw = _num(d.get("power_kw"))
    cap = _num(d.get("power_limit_kw"))
    if pkw is not None:
        n.power_kw = pkw
    if cap is not None:
        n.power_limit_kw = cap
        if pkw is not None and cap > 0:
            ratios.append(abs(pkw) / cap)
    n.utilisation_ratio = max(ratios, default=0.0)
    return n


def change(d: Mapping[str, Any], *, now_s: float) -> pb.Change:
    c = pb.Change(
        kind=str(d.get("kind") or ""),
        charger_id=str(d.get("charger_id") or ""),
        decision_id=str(d.get("decision_id") or d.get("decision") or ""),
        purpose=str(d.get("purpose") or ""),
        detail=str(d.get("detail") or ""),
    )
    c.observed_at.CopyFrom(timestamp(now_s))
    value = _num(d.get("value"))
    if value is not None:
        if _is_w(d):
            c.setpoint_w = value
        else:
            c.setpoint_a = value
    return c
