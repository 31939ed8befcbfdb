"""The site file's ``[edge]`` section: every knob of the control loop, validated once.

What this module owns: parsing and checking ``[edge]`` into a frozen ``EdgeConfig``. Every error is
an ``EdgeConfigError`` naming ``[edge].<key>`` and what was wrong. It never decides a setpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from evcore.site.sections import Key, Section

# What a site file may name. The digital twin's "uncontrolled" baseline (the edge sends nothing)
# is not a policy here: the twin sets ``EdgeConfig.baseline`` itself, never a site file.
POLICIES: tuple[str, ...] = (
    "fair_share",
    "least_laxity",
    "planner_cost",
    "planner_peak",
)


class EdgeConfigError(ValueError):
    """The ``[edge]`` section is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Control-loop settings (seconds, amperes and watts as the names say)."""

    # Loop.
    tick_s: float = 1.0
    policy: str = "fair_share"
    # Dispatch: send a setpoint only when it moved by more than this.
    deadband_a: float = 1.0
    deadband_w: float = 500.0
    # What a charger can be told: the central system rounds limits down to this (``[ocpp]
    # whole_amperes``: 1 A, else 0.1 A); values equal at this resolution are not a change.
    resolution_a: float = 1.0
    resolution_w: float = 1.0
    # Increases wait until every pending decrease was accepted, or this long after it left.
    settle_s: float = 5.0
    # Failsafe: every TxProfile falls back to the failsafe level at most this long after it was
    # sent; profiles are refreshed ``refresh_lead_s`` before they end.
    failsafe_after_s: float = 120.0
    refresh_lead_s: float = 30.0
    # A charger whose profile rises at expiry rises this much later than the others fall.
    fallback_guard_s: float = 10.0
    # Telemetry older than this is stale: the charger counts at its last allowed maximum.
    stale_after_s: float = 30.0
    # Headroom reclaim (fed to the allocator): a running session is capped at its fresh measured
    # draw plus reclaim_margin_a, only from a reading taken reclaim_ramp_s or more after it
    # turned on (an earlier one may show the car still ramping up).
    reclaim_margin_a: float = 2.0
    reclaim_ramp_s: float = 30.0
    # Session switching (fed to the allocator / envelope).
    min_on_s: float = 60.0
    min_off_s: float = 180.0
    max_switches: int = 10
    # Ignored profile: drawing more than setpoint + ignore_threshold_a for ignore_after_s marks the
    # charger suspect (its measured draw is then covered); after fault_after_s it is faulted and
    # reported.
    ignore_threshold_a: float = 2.0
    ignore_after_s: float = 10.0
    fault_after_s: float = 60.0
    # Grid signals: decreases for a curtailment leave this long before T1.
    curtail_lead_s: float = 15.0
    # Local planning.
    replan_every_s: float = 300.0
    plan_budget_s: float = 0.2
    cloud_plan_fresh_s: float = 900.0
    # Nothing in the control path waits on the network longer than this.
    network_timeout_s: float = 0.5
    # Restart: at most this many profiles per second leave while the edge recovers.
    restart_max_profiles_per_s: float = 200.0
    # Restart: for this long after the edge starts, TxProfile re-sends wait while a station is
    # not back (0: no wait).
    startup_grace_s: float = 10.0
    # (Re)connect: re-sends to a station's chargers wait at most this long for its report
    # (GetCompositeSchedule; also the bound of each report call; at least network_timeout_s).
    report_wait_s: float = 5.0
    # Store / audit: wait at most this long for a record to become durable; past it, no setpoint
    # leaves.
    audit_timeout_s: float = 2.0
    # Local journal for audit records the store does not take within half of audit_timeout_s
    # (the decision then still leaves). "" is ``evcore-audit-journal`` beside the site file; a
    # relative path is relative to the site file's directory.
    audit_journal: str = ""
    # Twin only (``evcore.sim``): the edge sends nothing at all, the "uncontrolled" baseline.
    # Not a key of ``[edge]``: ``from_table`` refuses it.
    baseline: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.baseline, bool):
            raise EdgeConfigError(f"baseline: expected a bool, got {self.baseline!r}")
        if not isinstance(self.audit_journal, str) or "\x00" in self.audit_journal:
            raise EdgeConfigError(
                f"[edge].audit_journal: expected a path, got {self.audit_journal!r}"
            )
        for key in _SECTION.keys:
            _SECTION.check(key, getattr(self, key))
        if self.refresh_lead_s >= self.failsafe_after_s:
            raise EdgeConfigError(
                f"[edge].refresh_lead_s: must be below failsafe_after_s ({self.failsafe_after_s}), "
                f"got {self.refresh_lead_s}"
            )
        if self.fallback_guard_s >= self.failsafe_after_s - self.refresh_lead_s:
            raise EdgeConfigError(
                "[edge].fallback_guard_s: must be below failsafe_after_s - refresh_lead_s "
                f"({self.failsafe_after_s - self.refresh_lead_s}), got {self.fallback_guard_s}"
            )

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None) -> EdgeConfig:
        """Build from the ``[edge]`` table of a site file; unknown keys are an error."""
        if table is None:
            return cls()
        if isinstance(table, Mapping) and table.get("policy") == "uncontrolled":
            raise EdgeConfigError(
                "[edge].policy: 'uncontrolled' is the digital twin's baseline (the edge "
                "sends nothing), not a policy for a site; expected one of " + ", ".join(POLICIES)
            )
        return cls(**_SECTION.read(table))

    @classmethod
    def from_site(cls, site_table: Mapping[str, Any], *, policy: str | None = None) -> EdgeConfig:
        """The ``[edge]`` section of a whole site file, with what depends on other sections
        derived here, always: ``resolution_a`` is what ``[ocpp] whole_amperes`` makes the central
        system send (1 A, else 0.1 A). ``[edge].resolution_a`` may only be finer than that (a
        coarser one would suppress decreases the central system would send). ``policy``
        overrides ``[edge].policy`` (the CLI's ``--policy``)."""
        edge = site_table.get("edge")
        if edge is not None and not isinstance(edge, Mapping):
            raise EdgeConfigError(f"[edge]: expected a table, got {type(edge).__name__}")
        table = dict(edge or {})
        if policy is not None:
            table["policy"] = policy
        ocpp = site_table.get("ocpp") or {}
        if not isinstance(ocpp, Mapping):  # (an AttributeError traceback before)
            raise EdgeConfigError(f"[ocpp]: expected a table, got {type(ocpp).__name__}")
        wire_a = 1.0 if bool(ocpp.get("whole_amperes", True)) else 0.1
        given = table.get("resolution_a")
        if given is None:
            table["resolution_a"] = wire_a
        elif isinstance(given, int | float) and not isinstance(given, bool) and given > wire_a:
            raise EdgeConfigError(
                f"[edge].resolution_a: {given!r} is coarser than what the central system sends "
                f"([ocpp] whole_amperes gives {wire_a:g} A): decreases would be suppressed"
            )
        given_w = table.get("resolution_w")
        if isinstance(given_w, int | float) and not isinstance(given_w, bool) and given_w > _WIRE_W:
            raise EdgeConfigError(
                f"[edge].resolution_w: {given_w!r} is coarser than what the central system sends "
                f"(DC limits in whole watts, {_WIRE_W:g} W): decreases would be suppressed"
            )
        return cls.from_table(table)


#: The resolution of a DC (W) limit on the wire: the central system rounds it down to whole watts.
_WIRE_W = 1.0


#: Must be above zero (the other numbers may be zero).
_POSITIVE = (
    "tick_s",
    "failsafe_after_s",
    "restart_max_profiles_per_s",
    "network_timeout_s",
    "report_wait_s",
)
_SECTION = Section(
    "[edge]",
    {
        **{
            f.name: Key("number", lo=0, above=f.name in _POSITIVE)
            for f in fields(EdgeConfig)
            if f.type == "float"
        },
        # A tick below 50 ms is a busy loop that starves the OCPP handlers of the same process.
        "tick_s": Key("number", lo=0.05),
        "policy": Key("choice", choices=POLICIES),
        "max_switches": Key("integer", lo=0),
        "audit_journal": Key("any"),
    },
    EdgeConfigError,
)
