"""What an edge exposes to Prometheus, read at scrape time from the running ``EdgeApp``.

What this module owns: turning the edge's live objects into metric families — the controller's
``stats`` and ``state`` (decisions, chargers, setpoints), node currents as the facade's
``node_utilisation`` computes them, the curtailment book and its ``BookWriter``, the
``AuditRecorder``'s journal, the bus's ``BusStats`` and the central system's connections. Every
name is in docs/metrics.md.

A scrape runs in two steps: ``read_edge`` copies plain values out of the live objects in the event
loop (about 2 µs a charger), then ``build_families`` makes the families from that copy — called
through ``edge_collector``, where ``render`` iterates them, in a worker thread — so a site of
thousands of chargers does not hold the control loop for the formatting.

What it must never do: change any of those objects or keep state between scrapes. Labels are
bounded by the site file (one series per charger, node and phase); nothing per decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ocpp.v16.enums import Measurand as _Measurand16
from ocpp.v201.enums import MeasurandEnumType as _Measurand201

from evcore.edge.dispatch import wire_value
from evcore.edge.faults import is_suspect
from evcore.metrics.exposition import MetricFamily
from evcore.ocpp.validation import UNKNOWN_MEASURAND

__all__ = [
    "BUS_COUNTERS",
    "BUS_GAUGES",
    "SKIPPED_MEASURANDS",
    "ChargerReading",
    "EdgeReading",
    "api_families",
    "build_families",
    "edge_collector",
    "edge_families",
    "node_utilisation",
    "read_edge",
]

#: ``BusStats`` counters and what each counts (``BUS_GAUGES`` are gauges, below).
BUS_COUNTERS: dict[str, str] = {
    "published": "Messages accepted by publish().",
    "sent": "Messages handed to the broker or stream (and confirmed where it confirms).",
    "delivered": "Handler invocations that returned normally.",
    "rejected": "Payloads a handler rejected as malformed (acknowledged, not redelivered).",
    "handler_errors": "Other handler exceptions (a durable consumer gets a redelivery).",
    "duplicates_dropped": "Deliveries skipped because the event id was already processed.",
    "telemetry_dropped": "Telemetry samples replaced by a newer one before they were sent.",
    "queue_dropped": "Normal events dropped because the send queue was full.",
    "slow_consumer_dropped": "Messages a slow subscriber lost (its queue was full).",
    "send_failures": "Broker publish attempts that failed (critical events are retried).",
    "set_aside": "Critical events the broker can never take (above its max_payload), kept aside.",
    "outbox_refused": "Critical events the outbox refused at [bus] outbox_max_bytes (OutboxFull).",
}
#: ``BusStats`` gauges (not counters): read as they are at the scrape.
BUS_GAUGES = ("outbox_pending", "outbox_bytes")

#: The ``measurand`` labels of ``evcore_ocpp_values_skipped_total``: every measurand OCPP 1.6 or
#: 2.0.1 names (a value the central system reads, or one the schema refused, counted under its
#: own) and ``unknown`` (refused, naming none the version has). Before, only the five it reads
#: (``metering.PLAUSIBLE``) passed: the counts of schema-refused values of other measurands and
#: of ``unknown`` were held by the central system and never scraped.
SKIPPED_MEASURANDS: frozenset[str] = frozenset(
    {*(m.value for m in _Measurand16), *(m.value for m in _Measurand201), UNKNOWN_MEASURAND}
)

# A charger "draws" when its latest meter values show at least this on some phase.
_DRAWING_A = 1.0
_QUANTILES = (0.5, 0.9, 0.99, 1.0)

_Phases = tuple[float | None, float | None, float | None]


class ChargerReading(NamedTuple):
    charger_id: str
    is_dc: bool
    online: bool
    plugged: bool
    in_session: bool
    faulted: bool
    suspect: bool
    profile_unknown: bool
    sent: float | None  # the last limit told (A or W); None while unknown
    accepted: bool
    failsafe: float | None
    measured_a: _Phases  # per site phase
    #: Seconds since its latest meter values arrived; None before the first.
    meter_age_s: float | None = None


@dataclass(slots=True)
class EdgeReading:
    """Plain values copied out of one ``EdgeApp`` at one instant (``read_edge``)."""

    site: Any
    phase_names: tuple[str, str, str]
    site_id: str
    policy: str
    config_version: str
    decisions: int
    profiles_sent: int
    core_failures: int
    failsafe_failures: int
    audit_failures: int
    faults_reported: int
    last_decision_s: float
    recent_decision_s: list[float]
    last_setpoint_age_s: float | None
    failsafe_plain: bool
    chargers: list[ChargerReading]
    #: Terminal currents (A) in ``site.chargers`` order, as the facade reads them.
    terminal_a: list[tuple[float, float, float]]
    caps_kw: dict[str, float]
    curtailments_active: int
    curtailments_booked: int
    book_durable: bool | None = None
    book_failures: int = 0
    recorder: dict[str, int] | None = None
    bus: dict[str, int] | None = None
    stations: int = 0
    stations_connected: int = 0
    #: What the central system rounds limits down to (``EdgeController.wire``).
    resolution_a: float = 0.0
    resolution_w: float = 0.0
    #: API calls refused, by (method, reason); None without an API.
    api_refused: dict[tuple[str, str], int] | None = None
    #: Sampled values the central system skipped, by (ocpp_id, measurand)
    #: (``CentralSystem.skipped_values``), those of the site file's stations and
    #: ``SKIPPED_MEASURANDS`` only.
    ocpp_skipped: dict[tuple[str, str], int] | None = None

    def wire(self, c: ChargerReading, value: float) -> float:
        """``value`` as ``c`` is told it (``EdgeController.wire``)."""
        res = self.resolution_w if c.is_dc else self.resolution_a
        return wire_value(value, res) if res > 0 else value


def read_edge(app: Any) -> EdgeReading:
    """Copy what a scrape shows out of ``app`` (an ``evcore.edge.app.EdgeApp``); call it in the
    event loop that runs the edge."""
    ctrl = app.controller
    stats = ctrl.stats
    cfg = ctrl.cfg
    now_m = ctrl.clock.monotonic()
    now_w = ctrl.clock.now()
    failsafe = ctrl.failsafe
    chargers: list[ChargerReading] = []
    newest_sent: float | None = None
    for c in ctrl.state.chargers.values():
        chargers.append(
            ChargerReading(
                c.charger_id,
                c.is_dc,
                c.online,
                c.plugged,
                c.transaction_id is not None,
                c.faulted,
                is_suspect(c, now_m, cfg),
                c.profile_unknown,
                c.sent,
                c.accepted,
                failsafe.get(c.charger_id),
                c.measured_a,
                None if c.measured_at is None else max(0.0, now_m - c.measured_at),
            )
        )
        if c.sent_at is not None and (newest_sent is None or c.sent_at > newest_sent):
            newest_sent = c.sent_at
    site = app.site
    terminal: list[tuple[float, float, float]] = []
    states = ctrl.state.chargers
    for spec in site.chargers:
        c = states.get(spec.id)
        t = (None, None, None) if c is None else c.terminal_a
        terminal.append((t[0] or 0.0, t[1] or 0.0, t[2] or 0.0))
    book = ctrl.curtailments
    out = EdgeReading(
        site=site,
        phase_names=_phase_names(site),
        site_id=str(app.site_table.get("site", {}).get("id", "")),
        policy=str(cfg.policy),
        config_version=str(ctrl.config_version),
        decisions=stats.decisions,
        profiles_sent=stats.profiles_sent,
        core_failures=stats.core_failures,
        failsafe_failures=stats.failsafe_failures,
        audit_failures=stats.audit_failures,
        faults_reported=len(stats.faults_reported),
        last_decision_s=stats.last_decision_s,
        recent_decision_s=list(stats.decision_s.values()),
        last_setpoint_age_s=None if newest_sent is None else max(0.0, now_m - newest_sent),
        failsafe_plain=bool(ctrl.failsafe_is_plain()),
        chargers=chargers,
        terminal_a=terminal,
        caps_kw=dict(book.caps_kw(now_w)),
        curtailments_active=len(book.in_force(now_w)),
        curtailments_booked=len(book),
        resolution_a=float(cfg.resolution_a),
        resolution_w=float(cfg.resolution_w),
    )
    if app.book is not None:
        out.book_durable = bool(app.book.durable)
        out.book_failures = int(getattr(app.book, "failures", 0))
    rec = app.recorder
    if rec is not None:
        out.recorder = {
            "journal_pending": int(rec.journal_pending),
            **{
                k: int(getattr(rec, k, 0))
                for k in ("journaled", "journal_moved", "journal_failures", "store_failures")
            },
        }
        audit_log = getattr(rec, "audit_log", None)
        out.recorder["bus_publish_failures"] = int(getattr(audit_log, "publish_failures", 0))
        out.recorder["too_large_for_bus"] = len(getattr(audit_log, "too_large_for_bus", ()))
    if app.bus is not None:
        stats_now = app.bus.stats
        out.bus = {k: int(getattr(stats_now, k, 0)) for k in (*BUS_COUNTERS, *BUS_GAUGES)}
        # The outbox's cap (a NatsBus's [bus] outbox_max_bytes; the in-process bus has none).
        cap = getattr(getattr(app.bus, "config", None), "outbox_max_bytes", None)
        if isinstance(cap, int) and not isinstance(cap, bool):
            out.bus["outbox_max_bytes"] = cap
    out.stations = len({c.ocpp_id for c in states.values()})
    out.stations_connected = len(app.central.connected())
    # Bounded by the site file and OCPP: only its stations connect and the central system counts
    # a measurand the version names or ``unknown``; the labels come from what stations send, so
    # the bound is enforced here too.
    stations = {spec.ocpp_id for spec in site.chargers}
    out.ocpp_skipped = {
        (ocpp_id, measurand): int(n)
        for (ocpp_id, measurand), n in getattr(app.central, "skipped_values", {}).items()
        if ocpp_id in stations and measurand in SKIPPED_MEASURANDS
    }
    auth = getattr(getattr(app, "api", None), "auth", None)
    if auth is not None:
        out.api_refused = dict(auth.refused)
    return out


def edge_collector(app: Any) -> Callable[[], Iterable[MetricFamily]]:
    """A ``Registry`` collector for ``app``: reads when called, builds where iterated."""

    def collect() -> Iterator[MetricFamily]:
        return _built_when_iterated(read_edge(app))

    return collect


def _built_when_iterated(r: EdgeReading) -> Iterator[MetricFamily]:
    yield from build_families(r)


def build_families(r: EdgeReading) -> list[MetricFamily]:
    """Every family of one reading (touches nothing live: safe in a worker thread)."""
    return [
        *_controller_families(r),
        *_charger_families(r),
        *_node_families(r),
        *_store_families(r),
        *_bus_families(r),
        *_ocpp_families(r),
        *api_families(r.api_refused),
    ]


def edge_families(app: Any) -> list[MetricFamily]:
    """Read and build at once (tests, tools)."""
    return build_families(read_edge(app))


def _gauge(name: str, help: str, value: float | None = None) -> MetricFamily:
    fam = MetricFamily(name, "gauge", help)
    if value is not None:
        fam.add(value)
    return fam


def _counter(name: str, help: str, value: float) -> MetricFamily:
    return MetricFamily(name, "counter", help).add(value)


def _phase_names(site: Any) -> tuple[str, str, str]:
    names = getattr(site, "phase_names", None)
    if names is None or len(names) != 3:
        return ("L1", "L2", "L3")
    return (str(names[0]), str(names[1]), str(names[2]))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _controller_families(r: EdgeReading) -> list[MetricFamily]:
    out = [
        MetricFamily(
            "evcore_edge_info",
            "gauge",
            "Always 1; labels: the site, the allocation policy and the site file's hash.",
        ).add(1, {"site_id": r.site_id, "policy": r.policy, "config_version": r.config_version}),
        _counter(
            "evcore_decisions_total",
            "Decisions made (allocator and envelope, or the failsafe fallback).",
            r.decisions,
        ),
        _counter(
            "evcore_profiles_sent_total",
            "Charging profiles (TxProfile and TxDefault) handed to the central system.",
            r.profiles_sent,
        ),
        _counter(
            "evcore_core_decision_failures_total",
            "Decisions the core refused; every charger then fell back to its failsafe level.",
            r.core_failures,
        ),
        _counter(
            "evcore_failsafe_recompute_failures_total",
            "Failsafe level recomputations that failed (the previous levels stayed in force).",
            r.failsafe_failures,
        ),
        _counter(
            "evcore_audit_append_failures_total",
            "Decisions whose audit record was not durable in time: nothing of them was sent.",
            r.audit_failures,
        ),
        _counter(
            "evcore_faults_reported_total",
            "Chargers marked faulted (drawing above their profile for fault_after_s).",
            r.faults_reported,
        ),
        _gauge(
            "evcore_last_decision_duration_seconds",
            "The last decision that sent something: from its start until its last TxProfile "
            "was handed to the central system (0 before the first).",
            r.last_decision_s,
        ),
    ]
    summary = MetricFamily(
        "evcore_decision_duration_seconds",
        "summary",
        "Quantiles of the same duration over the last 64 decisions that sent something "
        "(a sliding window: no _sum or _count).",
    )
    recent = sorted(r.recent_decision_s)
    if recent:
        summary.add_summary({q: _quantile(recent, q) for q in _QUANTILES})
    out.append(summary)
    out.append(
        _gauge(
            "evcore_last_setpoint_age_seconds",
            "Seconds since the newest limit left (a TxProfile, or an idle charger's TxDefault "
            "once accepted); absent before the first.",
            r.last_setpoint_age_s,
        )
    )
    out.append(
        _gauge(
            "evcore_failsafe_levels_plain",
            "1 when the failsafe levels in force count no charger at its maximum (every "
            "charger holds a TxDefault of ours, known applied), else 0.",
            1 if r.failsafe_plain else 0,
        )
    )
    return out


def _charger_families(r: EdgeReading) -> list[MetricFamily]:
    chargers = r.chargers

    def count(name: str, help: str, pred: Callable[[ChargerReading], bool]) -> MetricFamily:
        return _gauge(name, help, sum(1 for c in chargers if pred(c)))

    def drawing(c: ChargerReading) -> bool:
        return c.in_session and any(v is not None and v >= _DRAWING_A for v in c.measured_a)

    out = [
        _gauge("evcore_chargers", "Chargers in the site file.", len(chargers)),
        count("evcore_chargers_online", "Chargers whose station is connected.", lambda c: c.online),
        count(
            "evcore_chargers_plugged", "Chargers with a vehicle plugged in.", lambda c: c.plugged
        ),
        count(
            "evcore_chargers_in_session",
            "Chargers with a transaction in progress.",
            lambda c: c.in_session,
        ),
        count(
            "evcore_chargers_charging",
            f"Chargers in a session whose latest meter values show at least {_DRAWING_A:g} A "
            "on some phase.",
            drawing,
        ),
        count("evcore_chargers_faulted", "Chargers the edge marked faulted.", lambda c: c.faulted),
        count(
            "evcore_chargers_suspect",
            "Chargers drawing above their profile for at least ignore_after_s.",
            lambda c: c.suspect,
        ),
        count(
            "evcore_chargers_profile_unknown",
            "Chargers whose enforced profile is unknown (counted at their maximum).",
            lambda c: c.profile_unknown,
        ),
    ]
    online = MetricFamily("evcore_charger_online", "gauge", "1 when the station is connected.")
    faulted = MetricFamily("evcore_charger_faulted", "gauge", "1 when the edge marked it faulted.")
    sp_a = MetricFamily(
        "evcore_charger_setpoint_amperes",
        "gauge",
        "AC: the limit per phase the edge counts the charger as told (its TxProfile in a "
        "session, its TxDefault when idle, what the station reported at connect), as sent on "
        "the wire; absent while unknown.",
    )
    sp_w = MetricFamily(
        "evcore_charger_setpoint_watts",
        "gauge",
        "DC: the last limit the charger was told, as sent on the wire; absent while unknown.",
    )
    confirmed = MetricFamily(
        "evcore_charger_setpoint_confirmed",
        "gauge",
        "1 when the charger accepted the last limit it was told, 0 while it is pending or "
        "was refused.",
    )
    fs_a = MetricFamily(
        "evcore_charger_failsafe_amperes",
        "gauge",
        "AC: the failsafe level (what the charger falls back to without the edge).",
    )
    fs_w = MetricFamily("evcore_charger_failsafe_watts", "gauge", "DC: the failsafe level.")
    current = MetricFamily(
        "evcore_charger_current_amperes",
        "gauge",
        "The charger's current per site phase in its latest meter values (kept when stale).",
    )
    age = MetricFamily(
        "evcore_charger_meter_age_seconds",
        "gauge",
        "Seconds since the charger's latest meter values arrived (what its current shows); "
        "absent before the first.",
    )
    phases = r.phase_names
    for c in chargers:
        cid = {"charger_id": c.charger_id}
        if c.meter_age_s is not None:
            age.add(c.meter_age_s, cid)
        online.add(1 if c.online else 0, cid)
        faulted.add(1 if c.faulted else 0, cid)
        if c.sent is not None:
            (sp_w if c.is_dc else sp_a).add(r.wire(c, c.sent), cid)
            confirmed.add(1 if c.accepted else 0, cid)
        if c.failsafe is not None:
            (fs_w if c.is_dc else fs_a).add(r.wire(c, c.failsafe), cid)
        for name, value in zip(phases, c.measured_a, strict=True):
            if value is not None:
                current.add(value, {"charger_id": c.charger_id, "phase": name})
    out += [online, faulted, sp_a, sp_w, confirmed, fs_a, fs_w, current, age]
    return out


def node_utilisation(r: EdgeReading) -> list[dict[str, Any]]:
    """``ControllerFacade.node_utilisation`` on the reading: per node the line current per
    phase from the latest measurements (stale ones included), its limits, power and the lower
    of its power limit and a curtailment in force."""
    from evcore.edge.facade import utilisation_rows

    if r.site is None or not r.terminal_a:
        return []
    return utilisation_rows(r.site, r.terminal_a, r.caps_kw)


def _node_families(r: EdgeReading) -> list[MetricFamily]:
    phases = r.phase_names
    current = MetricFamily(
        "evcore_node_current_amperes",
        "gauge",
        "Line current through the node per site phase, from the chargers' latest meter "
        "values (stale ones included; other loads are not measured).",
    )
    limit = MetricFamily(
        "evcore_node_phase_limit_amperes",
        "gauge",
        "The node's continuous per-phase limit from the site file.",
    )
    ratio = MetricFamily(
        "evcore_node_utilisation_ratio",
        "gauge",
        "evcore_node_current_amperes / evcore_node_phase_limit_amperes.",
    )
    power = MetricFamily(
        "evcore_node_power_watts", "gauge", "Active power through the node (unity power factor)."
    )
    power_limit = MetricFamily(
        "evcore_node_power_limit_watts",
        "gauge",
        "The lower of the node's power limit in the site file and a curtailment in force; "
        "absent when it has neither.",
    )
    for row in node_utilisation(r):
        node = {"node_id": str(row["node_id"])}
        for name, amps, lim in zip(phases, row["current_a"], row["phase_limit_a"], strict=True):
            labels = {**node, "phase": name}
            current.add(float(amps), labels)
            limit.add(float(lim), labels)
            if lim > 0:
                ratio.add(float(amps) / float(lim), labels)
        power.add(float(row["power_kw"]) * 1000.0, node)
        if row["power_limit_kw"] is not None:
            power_limit.add(float(row["power_limit_kw"]) * 1000.0, node)
    caps = MetricFamily(
        "evcore_node_curtailment_cap_watts",
        "gauge",
        "The tightest grid curtailment in force at the node (from curtail_lead_s before its "
        "start); absent without one.",
    )
    for node_id, kw in sorted(r.caps_kw.items()):
        caps.add(kw * 1000.0, {"node_id": node_id})
    return [
        current,
        limit,
        ratio,
        power,
        power_limit,
        caps,
        _gauge(
            "evcore_curtailments_active",
            "Curtailments in force now (from curtail_lead_s before their start).",
            r.curtailments_active,
        ),
        _gauge(
            "evcore_curtailments_booked",
            "Curtailments in the book (in force or still to come).",
            r.curtailments_booked,
        ),
    ]


def _store_families(r: EdgeReading) -> list[MetricFamily]:
    out: list[MetricFamily] = []
    if r.book_durable is not None:
        out.append(
            _gauge(
                "evcore_curtailment_book_durable",
                "1 when a restart now would restore the curtailments in force (the store, or "
                "in an outage its local copy, holds them), else 0.",
                1 if r.book_durable else 0,
            )
        )
        out.append(
            _counter(
                "evcore_curtailment_book_store_failures_total",
                "Writes of the curtailment book to the store that failed or timed out.",
                r.book_failures,
            )
        )
    rec = r.recorder
    if rec is not None:
        out.append(
            _gauge(
                "evcore_audit_journal_pending_records",
                "Audit records in the local journal, not yet in the audit log.",
                rec["journal_pending"],
            )
        )
        for key, name, help in (
            (
                "journaled",
                "evcore_audit_journaled_records_total",
                "Records written to the journal.",
            ),
            (
                "journal_moved",
                "evcore_audit_journal_moved_records_total",
                "Journaled records moved into the audit log.",
            ),
            (
                "journal_failures",
                "evcore_audit_journal_failures_total",
                "Records durable nowhere (the store and the journal write both failed).",
            ),
            (
                "store_failures",
                "evcore_audit_store_failures_total",
                "Audit appends the store failed or did not take in time.",
            ),
            (
                "bus_publish_failures",
                "evcore_audit_bus_publish_failures_total",
                "Audit records the bus refused for a while (each retried in order).",
            ),
            (
                "too_large_for_bus",
                "evcore_audit_too_large_for_bus_total",
                "Audit records too large for the broker even compressed (in the store and the "
                "cloud upload only; raise the broker's max_payload).",
            ),
        ):
            out.append(_counter(name, help, rec[key]))
    return out


def _bus_families(r: EdgeReading) -> list[MetricFamily]:
    if r.bus is None:
        return []
    out = [
        _counter(f"evcore_bus_{key}_total", help, r.bus[key]) for key, help in BUS_COUNTERS.items()
    ]
    out.append(
        _gauge(
            "evcore_bus_outbox_pending_messages",
            "Critical events accepted but not yet confirmed by the broker.",
            r.bus["outbox_pending"],
        )
    )
    out.append(
        _gauge(
            "evcore_bus_outbox_bytes",
            "What the outbox holds (bytes), counted against [bus] outbox_max_bytes.",
            r.bus["outbox_bytes"],
        )
    )
    if "outbox_max_bytes" in r.bus:
        out.append(
            _gauge(
                "evcore_bus_outbox_max_bytes",
                "[bus] outbox_max_bytes: past it critical events are refused (audit at 90 %).",
                r.bus["outbox_max_bytes"],
            )
        )
    return out


def _ocpp_families(r: EdgeReading) -> list[MetricFamily]:
    skipped = MetricFamily(
        "evcore_ocpp_values_skipped_total",
        "counter",
        "Sampled values the central system skipped (not a number, outside what a meter "
        "reads, or refused by the schema), by station and measurand (unknown: one OCPP does "
        "not name); the rest of their reading was taken.",
    )
    for (ocpp_id, measurand), n in sorted((r.ocpp_skipped or {}).items()):
        skipped.add(n, {"ocpp_id": ocpp_id, "measurand": measurand})
    return [
        _gauge("evcore_ocpp_stations", "Stations in the site file.", r.stations),
        _gauge(
            "evcore_ocpp_stations_connected",
            "Stations connected to the central system now.",
            r.stations_connected,
        ),
        skipped,
    ]


def api_families(refused: Mapping[tuple[str, str], int] | None) -> list[MetricFamily]:
    """The edge API's refused calls (``EdgeApiServer.auth.refused``); none without an API."""
    if refused is None:
        return []
    fam = MetricFamily(
        "evcore_api_calls_refused_total",
        "counter",
        "Edge API calls refused for what the caller sent, by method and reason (the status "
        "code: unauthenticated, permission_denied, invalid_argument, not_found, "
        "failed_precondition, out_of_range, resource_exhausted).",
    )
    for (method, reason), n in sorted(refused.items()):
        fam.add(n, {"method": method, "reason": reason})
    return [fam]
