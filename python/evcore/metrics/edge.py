"""What an edge exposes to Prometheus, read at scrape time from the running ``EdgeApp``.

What this module owns: turning the edge's live objects into metric families — the controller's
``stats`` and ``state`` (decisions, chargers, setpoints), the facade's node utilisation, the
curtailment book and its ``BookWriter``, the ``AuditRecorder``'s journal, the bus's ``BusStats``
and the central system's connections. Every name is in docs/metrics.md.

What it must never do: change any of those objects or keep its own copy of their state. Labels
are bounded by the site file (one series per charger, node and phase); nothing per decision.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from evcore.edge.faults import is_suspect
from evcore.metrics.exposition import MetricFamily

__all__ = ["BUS_COUNTERS", "edge_families"]

#: ``BusStats`` counters and what each counts (``outbox_pending`` is a gauge, below).
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
}

# A charger "draws" when its latest meter values show at least this on some phase.
_DRAWING_A = 1.0


def _gauge(name: str, help: str, value: float | None = None) -> MetricFamily:
    fam = MetricFamily(name, "gauge", help)
    if value is not None:
        fam.add(value)
    return fam


def _counter(name: str, help: str, value: float) -> MetricFamily:
    return MetricFamily(name, "counter", help).add(value)


def edge_families(app: Any) -> list[MetricFamily]:
    """Every family of one edge (an ``evcore.edge.app.EdgeApp``), read now."""
    out: list[MetricFamily] = []
    out += _controller_families(app)
    out += _charger_families(app)
    out += _node_families(app)
    out += _store_families(app)
    out += _bus_families(app)
    out += _ocpp_families(app)
    return out


def _controller_families(app: Any) -> list[MetricFamily]:
    ctrl = app.controller
    stats = ctrl.stats
    site_id = str(app.site_table.get("site", {}).get("id", ""))
    now_m = ctrl.clock.monotonic()
    out = [
        MetricFamily(
            "evcore_edge_info",
            "gauge",
            "Always 1; labels: the site, the allocation policy and the site file's hash.",
        ).add(
            1,
            {"site_id": site_id, "policy": ctrl.cfg.policy, "config_version": ctrl.config_version},
        ),
        _counter(
            "evcore_decisions_total",
            "Decisions made (allocator and envelope, or the failsafe fallback).",
            stats.decisions,
        ),
        _counter(
            "evcore_profiles_sent_total",
            "Charging profiles (TxProfile and TxDefault) handed to the central system.",
            stats.profiles_sent,
        ),
        _counter(
            "evcore_core_decision_failures_total",
            "Decisions the core refused; every charger then fell back to its failsafe level.",
            stats.core_failures,
        ),
        _counter(
            "evcore_failsafe_recompute_failures_total",
            "Failsafe level recomputations that failed (the previous levels stayed in force).",
            stats.failsafe_failures,
        ),
        _counter(
            "evcore_audit_append_failures_total",
            "Decisions whose audit record was not durable in time: nothing of them was sent.",
            stats.audit_failures,
        ),
        _counter(
            "evcore_faults_reported_total",
            "Chargers marked faulted (drawing above their profile for fault_after_s).",
            len(stats.faults_reported),
        ),
        _gauge(
            "evcore_last_decision_duration_seconds",
            "The last decision that sent something: from its start until its last TxProfile "
            "was handed to the central system (0 before the first).",
            stats.last_decision_s,
        ),
    ]
    recent = sorted(stats.decision_s.values())
    summary = MetricFamily(
        "evcore_decision_duration_seconds",
        "summary",
        "Quantiles of the same duration over the last 64 decisions that sent something "
        "(a sliding window: no _sum or _count).",
    )
    if recent:
        summary.add_summary({q: _quantile(recent, q) for q in (0.5, 0.9, 0.99, 1.0)})
    out.append(summary)
    sent_at = [c.sent_at for c in ctrl.state.chargers.values() if c.sent_at is not None]
    out.append(
        _gauge(
            "evcore_last_setpoint_age_seconds",
            "Seconds since the newest TxProfile left (absent before the first).",
            max(0.0, now_m - max(sent_at)) if sent_at else None,
        )
    )
    out.append(
        _gauge(
            "evcore_failsafe_levels_plain",
            "1 when the failsafe levels in force count no charger at its maximum (every "
            "charger holds a TxDefault of ours, known applied), else 0.",
            1 if ctrl.failsafe_is_plain() else 0,
        )
    )
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _charger_families(app: Any) -> list[MetricFamily]:
    ctrl = app.controller
    cfg = ctrl.cfg
    now_m = ctrl.clock.monotonic()
    chargers = list(ctrl.state.chargers.values())
    phases = _phase_names(app)

    def count(name: str, help: str, pred: Any) -> MetricFamily:
        return _gauge(name, help, sum(1 for c in chargers if pred(c)))

    out = [
        _gauge("evcore_chargers", "Chargers in the site file.", len(chargers)),
        count("evcore_chargers_online", "Chargers whose station is connected.", lambda c: c.online),
        count(
            "evcore_chargers_plugged", "Chargers with a vehicle plugged in.", lambda c: c.plugged
        ),
        count(
            "evcore_chargers_in_session",
            "Chargers with a transaction in progress.",
            lambda c: c.transaction_id is not None,
        ),
        count(
            "evcore_chargers_charging",
            f"Chargers in a session whose latest meter values show at least {_DRAWING_A:g} A "
            "on some phase.",
            lambda c: c.transaction_id is not None and (c.measured_max_a() or 0.0) >= _DRAWING_A,
        ),
        count("evcore_chargers_faulted", "Chargers the edge marked faulted.", lambda c: c.faulted),
        count(
            "evcore_chargers_suspect",
            "Chargers drawing above their profile for at least ignore_after_s.",
            lambda c: is_suspect(c, now_m, cfg),
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
        "AC: the last limit the charger was told (TxProfile, or its TxDefault after a session), "
        "per phase, as sent on the wire; absent while unknown.",
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
    for c in chargers:
        cid = {"charger_id": c.charger_id}
        online.add(1 if c.online else 0, cid)
        faulted.add(1 if c.faulted else 0, cid)
        if c.sent is not None:
            (sp_w if c.is_dc else sp_a).add(ctrl.wire(c.charger_id, c.sent), cid)
            confirmed.add(1 if c.accepted else 0, cid)
        level = ctrl.failsafe.get(c.charger_id)
        if level is not None:
            (fs_w if c.is_dc else fs_a).add(ctrl.wire(c.charger_id, level), cid)
        for name, value in zip(phases, c.measured_a, strict=True):
            if value is not None:
                current.add(value, {"charger_id": c.charger_id, "phase": name})
    out += [online, faulted, sp_a, sp_w, confirmed, fs_a, fs_w, current]
    return out


def _phase_names(app: Any) -> tuple[str, str, str]:
    names = getattr(app.site, "phase_names", None)
    if names is None or len(names) != 3:
        return ("L1", "L2", "L3")
    return (str(names[0]), str(names[1]), str(names[2]))


def _node_families(app: Any) -> list[MetricFamily]:
    ctrl = app.controller
    phases = _phase_names(app)
    now_w = ctrl.clock.now()
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
    for row in app.facade.node_utilisation():
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
    book = ctrl.curtailments
    caps = MetricFamily(
        "evcore_node_curtailment_cap_watts",
        "gauge",
        "The tightest grid curtailment in force at the node (from curtail_lead_s before its "
        "start); absent without one.",
    )
    for node_id, kw in sorted(book.caps_kw(now_w).items()):
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
            len(book.in_force(now_w)),
        ),
        _gauge(
            "evcore_curtailments_booked",
            "Curtailments in the book (in force or still to come).",
            len(book),
        ),
    ]


def _store_families(app: Any) -> list[MetricFamily]:
    out: list[MetricFamily] = []
    book = app.book
    if book is not None:
        out.append(
            _gauge(
                "evcore_curtailment_book_durable",
                "1 when a restart now would restore the curtailments in force (the store, or "
                "in an outage its local copy, holds them), else 0.",
                1 if book.durable else 0,
            )
        )
        out.append(
            _counter(
                "evcore_curtailment_book_store_failures_total",
                "Writes of the curtailment book to the store that failed or timed out.",
                getattr(book, "failures", 0),
            )
        )
    rec = app.recorder
    if rec is not None:
        out.append(
            _gauge(
                "evcore_audit_journal_pending_records",
                "Audit records in the local journal, not yet in the audit log.",
                rec.journal_pending,
            )
        )
        for attr, name, help in (
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
        ):
            out.append(_counter(name, help, getattr(rec, attr, 0)))
    return out


def _bus_families(app: Any) -> list[MetricFamily]:
    bus = app.bus
    if bus is None:
        return []
    stats = bus.stats
    out = [
        _counter(f"evcore_bus_{field}_total", help, getattr(stats, field, 0))
        for field, help in BUS_COUNTERS.items()
    ]
    out.append(
        _gauge(
            "evcore_bus_outbox_pending_messages",
            "Critical events accepted but not yet confirmed by the broker.",
            getattr(stats, "outbox_pending", 0),
        )
    )
    return out


def _ocpp_families(app: Any) -> list[MetricFamily]:
    central = app.central
    stations = sorted({c.ocpp_id for c in app.controller.state.chargers.values()})
    connected = central.connected()
    queued = 0
    for ocpp_id in stations:
        with contextlib.suppress(KeyError):
            queued += central.station_state(ocpp_id).queued_calls
    return [
        _gauge("evcore_ocpp_stations", "Stations in the site file.", len(stations)),
        _gauge(
            "evcore_ocpp_stations_connected",
            "Stations connected to the central system now.",
            len(connected),
        ),
        _gauge(
            "evcore_ocpp_queued_calls",
            "Calls to stations waiting in their per-station queues.",
            queued,
        ),
    ]
