"""The closed control loop: events and ticks in, enforced setpoints out, decreases first.

What this module owns: *when* to decide and *what leaves*. On an event that can require a decrease
(status, transaction, connection, boot, a meter value showing overdraw, a grid signal, a plan, an
accepted decrease) or on the periodic tick it builds the decision: curtailments in force, failsafe
levels, plan targets, then ``CorePort.decide`` (allocator + envelope, Rust). It records the decision
in the audit log (durable before anything leaves), then hands the changed setpoints to the OCPP
central system: decreases at once, increases only once every pending decrease was accepted or
settled.

What it must never do: send a value that did not come out of ``CorePort.decide`` or
``CorePort.failsafe_levels`` (itself the envelope) in the same decision; wait on the network inside
a decision (every await has a bound); read the wall clock except through ``self.clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from evcore.clock import Clock, sleep_or_wake
from evcore.edge import failsafe
from evcore.edge.config import EdgeConfig
from evcore.edge.dispatch import (
    Change,
    ChangeKind,
    PendingDecrease,
    decreases_settled,
    next_settle_at,
    plan_dispatch,
    wire_value,
)
from evcore.edge.faults import (
    FaultChange,
    check_ignored,
    dc_input_w,
    draws_above_limit,
    overdraw,
)
from evcore.edge.grid import (
    Curtailment,
    CurtailmentBook,
    GridSignalError,
    PricePoint,
    merge_prices,
)
from evcore.edge.ports import AuditSink, ChargerGateway, CorePort, EnforcedSetpoints
from evcore.edge.state import ChargerState, SiteState, priority_error

#: The most energy a session may ask for (kWh): the planner's plausibility bound for
#: ``energy_requested_kwh`` (core/evcore-core/src/planner/input.rs).
MAX_SESSION_KWH = 1e4
log = logging.getLogger("evcore.edge")

#: The longest wait between two asks of a station for the report of an idle charger a stale
#: TxDefault may hold (counted at its maximum meanwhile); the first wait is the report bound.
_UNKNOWN_DEFAULT_RETRY_MAX_S = 300.0

# Triggers that may require a decrease: decide at once rather than at the next tick.
URGENT = frozenset(
    {
        "status",
        "transaction",
        "connection",
        "boot",
        "overdraw",
        "grid",
        "plan",
        "accepted",
        "operator",
        "reported",
        "applied",
        "clearing",
    }
)

# Polls of a station whose first TxDefault of ours was accepted, asking whether it applies it:
# the first this long after the acceptance, each next one this much later than the one before.
_APPLIED_POLL_STEP_S = 0.2


# A node load reading stamped further ahead of the edge's clock than this is refused (it would
# count as fresh for too long); one stamped ahead by less counts as taken now.
NODE_LOAD_MAX_AHEAD_S = 60.0

# A session is behind its plan when it delivered less than (1 - this) of what the plan asked.
_BEHIND_MARGIN = 0.1

# Triggers after which the local planner should plan again (sessions, prices, limits, operator).
REPLAN = frozenset({"transaction", "grid", "prices", "operator"})

# Triggers of a change a caller was told was taken (an operator's lever, a grid signal or node
# load reading through the API or the bus) and that change what a charger may draw now: one not
# decided yet when the controller stops is decided before it ends (``EdgeController.run``).
DECIDED_ON_STOP = frozenset({"operator", "grid", "overdraw"})


@dataclass(frozen=True, slots=True)
class PlanTargets:
    """A schedule the allocator follows while valid: per charger (step_start, step_s, target)."""

    source: str  # "cloud" or "local"
    version: str
    received_at: float  # wall
    rows: Mapping[str, Sequence[tuple[float, float, float]]]
    #: Per charger, the transaction its rows were planned for (a charger left out: not known).
    #: A charger whose car changed since is not the plan's: the next car must not inherit the
    #: last one's targets (a deferred session's 0 A) until a re-plan.
    transactions: Mapping[str, str] = field(default_factory=dict)

    def applies_to(self, charger_id: str, transaction_id: str | None) -> bool:
        """Whether the rows of ``charger_id`` are for its session ``transaction_id``."""
        planned = self.transactions.get(charger_id)
        return planned is None or planned == transaction_id

    def targets_at(
        self, t: float, sessions: Mapping[str, str | None] | None = None
    ) -> dict[str, float]:
        """The targets at ``t``; with ``sessions`` (charger -> its transaction now) only those of
        chargers whose session the plan was made for."""
        out: dict[str, float] = {}
        for cid, steps in self.rows.items():
            if sessions is not None and not self.applies_to(cid, sessions.get(cid)):
                continue
            for start, step_s, target in steps:
                if start <= t < start + step_s:
                    out[cid] = target
                    break
        return out

    def ends_at(self) -> float:
        return max((s + d for steps in self.rows.values() for s, d, _ in steps), default=-math.inf)


@dataclass
class SentProfile:
    """One profile that left, for benchmarks and tests (times from the controller's clock)."""

    charger_id: str
    purpose: str
    value: float
    kind: ChangeKind
    decision: int
    left_mono: float  # the decision's clock.monotonic() (identifies it in ``pending``)
    valid_to: float | None
    #: clock.monotonic() when its frame was handed to the charger's socket (None: not yet, or
    #: never: superseded, not connected, …). Latency is measured to this, not estimated.
    wire_mono: float | None = None
    #: The charger's transaction when it left (TxProfile): its answer is that session's only. A
    #: TxProfile dies with its transaction; an answer arriving after it ended says nothing about
    #: the next session on the charger, even at the same value.
    transaction_id: str | None = None


@dataclass
class ControllerStats:
    decisions: int = 0
    profiles_sent: int = 0
    audit_failures: int = 0
    core_failures: int = 0
    failsafe_failures: int = 0
    faults_reported: list[tuple[str, str]] = field(default_factory=list)
    reported_limits: int = 0  # chargers counted at their GetCompositeSchedule after (re)connect
    last_decision_s: float = 0.0
    #: Recent decisions that sent something: number -> seconds from its start until its last
    #: TxProfile was handed over (the last 64).
    decision_s: dict[int, float] = field(default_factory=dict)


class EdgeController:
    def __init__(
        self,
        *,
        state: SiteState,
        core: CorePort,
        gateway: ChargerGateway,
        clock: Clock,
        cfg: EdgeConfig,
        node_ids: Sequence[str],
        grid_node: str | None = None,
        audit: AuditSink | None = None,
        on_sent: Callable[[SentProfile], None] | None = None,
        on_fault: Callable[[str, str], None] | None = None,
        config_version: str = "",
        clock_offset_s: Callable[[str], float | None] | None = None,
    ) -> None:
        self.state = state
        self._clock_offset_s = clock_offset_s
        self.core = core
        self.gateway = gateway
        self.clock = clock
        self.cfg = cfg
        self.audit = audit
        self.on_sent = on_sent
        self.on_fault = on_fault
        #: Called with (charger id, who and why) when an operator clears a fault.
        self.on_fault_cleared: Callable[[str, str], None] | None = None
        self.config_version = config_version
        self.curtailments = CurtailmentBook(node_ids, cfg.curtail_lead_s, grid_node)
        self.prices: list[PricePoint] = []
        self.cloud_plan: PlanTargets | None = None
        self.local_plan: PlanTargets | None = None
        self.stats = ControllerStats()
        self.pending: dict[str, PendingDecrease] = {}
        self.failsafe: dict[str, float] = {}
        # The levels if every charger obeyed our TxDefault (what a station's report is held to),
        # for the caps of ``_failsafe_key``: set only together with ``failsafe``, so a failed
        # recompute keeps the pair (and the next decision computes them again).
        self._plain_failsafe: dict[str, float] = {}
        # (caps, counted at their maximum, lowering, held above their level: ``_refresh_failsafe``)
        self._failsafe_key: (
            tuple[
                tuple[tuple[str, float], ...],
                frozenset[str],
                frozenset[str],
                tuple[tuple[str, float], ...],
            ]
            | None
        ) = None
        self._triggers: set[str] = set()
        self._wake = asyncio.Event()
        #: Set when something the local planner plans with changed (``evcore.edge.planning``).
        self.replan_wanted = asyncio.Event()
        self.plan_in_use: PlanTargets | None = None
        self._stopping = False
        # Profiles handed over and not yet answered (tasks or the central system's futures).
        self._sends: set[asyncio.Future[Any]] = set()
        self._increase_tokens = _bucket_size(cfg.restart_max_profiles_per_s)
        self._tokens_at: float | None = None
        self._lock = asyncio.Lock()
        self._dc = frozenset(c.charger_id for c in state.chargers.values() if c.is_dc)
        # Chargers whose station was asked what it enforces: charger id -> until (monotonic).
        self._report_due: dict[str, float] = {}
        # Stations asked again because an idle charger of theirs gave no usable report while a
        # stale TxDefault may hold it: the next wait (doubling from the report bound up to
        # _UNKNOWN_DEFAULT_RETRY_MAX_S) and the re-ask in hand; the chargers warned about.
        self._unknown_default_retry_s: dict[str, float] = {}
        self._unknown_default_reask: dict[str, asyncio.Future[None]] = {}
        self._unknown_default_warned: set[str] = set()
        self._increases_held = False
        # Some charger's first TxDefault of ours may not be applied yet (this decision): a pause
        # now may be that gap's, and is not counted as a switch (``SiteState.on_sent``).
        self._default_gap = False
        self._started_at: float | None = None
        self._plan_energy: dict[str, dict[str, float]] = {}
        #: Called with every plan handed to ``set_plan`` (``publishing.EdgePublisher`` publishes
        #: the local ones on the bus).
        self.on_plan: Callable[[PlanTargets], None] | None = None
        #: Called when a session starts, ends or is steered: (charger, transaction id that
        #: ended or None), and for an end the energy into the car it ended with (Wh) as a third
        #: argument. ``recording.SessionKeeper`` saves it in the store.
        self.on_session: Callable[..., None] | None = None
        #: Called with a charger in a session whose delivered energy a reading raised
        #: (``recording.SessionKeeper.note_energy`` keeps it in the store, at most every
        #: ``energy_save_s``): a restart takes it back from there (``recording.recover``).
        self.on_session_energy: Callable[[ChargerState], None] | None = None
        #: Called when the end of an older transaction whose start came late (a station's
        #: replay; never the charger's session) arrives: (charger id, transaction id, started
        #: at, ended at, energy into the car in Wh or None). ``SessionKeeper.late`` saves it.
        self.on_late_session: Callable[[str, str, float, float, float | None], None] | None = None
        # (charger id, transaction id) -> start time of such a transaction, until its end.
        self._late_starts: dict[tuple[str, str], float] = {}

    # ---- events (synchronous: they only update state and wake the loop) --------------------
    def notify(self, trigger: str) -> None:
        self._triggers.add(trigger)
        if trigger in URGENT:
            self._wake.set()
        if trigger in REPLAN:
            self.replan_wanted.set()

    def on_event(self, ev: Any) -> None:
        """Apply an ``evcore.ocpp.events`` event; dispatches on the class name."""
        kind = type(ev).__name__
        cs0 = self.state.chargers.get(getattr(ev, "charger_id", None) or "")
        tx_before = cs0.transaction_id if cs0 is not None else None
        wh_before = cs0.session_energy_wh if cs0 is not None else 0.0
        # The end of the transaction whose session a status already ended (the car unplugged
        # first): nothing changes in the state, but the session is saved with its last energy.
        late_end = (
            cs0 is not None
            and kind == "TransactionEvent"
            and ev.kind == "ended"
            and ev.transaction_id != tx_before
            and ev.transaction_id == cs0.ended_transaction_id
        )
        self._apply_event(kind, ev)
        if late_end and cs0 is not None:
            cs0.ended_transaction_id = None  # (a repeat of this end changes nothing)
            end_wh = getattr(ev, "session_energy_wh", None)
            if end_wh is not None and cs0.transaction_id is None:
                end_wh += cs0.energy_carried_wh  # (its count since a restart: on what was before)
            self._session_changed(cs0, ev.transaction_id, end_wh)
        if cs0 is not None and cs0.transaction_id != tx_before:
            if tx_before is not None and cs0.default_unchecked:
                # A stale TxDefault unseen under the session may apply from now on: counted at
                # its maximum until an idle report shows what it enforces (it was counted at
                # the edge's own TxDefault for that round trip).
                cs0.default_unknown = True
            if tx_before is not None and cs0.transaction_id is None and cs0.default_unchecked:
                # Idle now: its report shows its TxDefault, and a stale one above the failsafe
                # level is cleared (it stayed, unseen under the session, and applied from now
                # on while the edge counted the charger at its own TxDefault).
                self._ask_station(cs0.ocpp_id)
            if tx_before is not None:
                # The ended session's energy: what its end carried (still on the charger), or,
                # when the next session's start replaced it, what it had before.
                ended_wh = cs0.session_energy_wh if cs0.transaction_id is None else wh_before
                self._session_changed(cs0, tx_before, ended_wh)
            if cs0.transaction_id is not None:
                self._session_changed(cs0, None)

    def _session_changed(
        self, c: ChargerState, ended: str | None, ended_wh: float | None = None
    ) -> None:
        if self.on_session is not None:
            try:
                if ended is None:
                    self.on_session(c, None)
                else:
                    self.on_session(c, ended, ended_wh)
            except Exception:
                log.exception("saving the session at %s failed", c.charger_id)

    def _apply_event(self, kind: str, ev: Any) -> None:
        now_m = self.clock.monotonic()
        st = self.state
        if kind == "MeterSample":
            cs = st.chargers.get(ev.charger_id)
            wh_before = cs.session_energy_wh if cs is not None else 0.0
            sampled_at = getattr(ev, "at", None)
            if st.sent_late(ev.charger_id, sampled_at, now_m, self.cfg.stale_after_s):
                # Taken before the reading held (a station's queue replayed beside its live
                # readings): an hour-old reading below a decrease showed the decrease in force
                # and released the increases held behind it.
                log.debug(
                    "%s: a reading stamped %s, older than the one held, set aside",
                    ev.charger_id,
                    sampled_at,
                )
                return
            if st.on_meter(
                ev.charger_id,
                ev.site_phase_a,
                ev.power_w,
                ev.session_energy_wh,
                now_m,
                ev.terminal_a,
                sampled_at=sampled_at,
                transaction_id=getattr(ev, "transaction_id", None),
            ):
                c = st.chargers[ev.charger_id]
                if (
                    c.transaction_id is not None
                    and c.session_energy_wh != wh_before
                    and self.on_session_energy is not None
                ):
                    try:
                        self.on_session_energy(c)
                    except Exception:
                        log.exception("saving the session energy at %s failed", c.charger_id)
                c.note_limit(now_m)
                self._note_in_effect(c)
                self._note_gap_followed(c, now_m)
                change = check_ignored(c, now_m, self.cfg)
                if change is FaultChange.FAULTED:
                    self._report_fault(c)
                if change is not None or _overdraws(c, self.cfg.settle_s):
                    self.notify("overdraw")
                else:
                    self.notify("meter")
        elif kind == "StatusEvent":
            if ev.charger_id is None:
                for c in st.station_chargers(ev.ocpp_id):
                    c.online = True
                self.notify("status")
            elif ev.charger_id in st.chargers:
                st.on_status(ev.charger_id, ev.status)
                self.notify("status")
        elif kind == "TransactionEvent":
            if st.on_transaction(
                ev.charger_id,
                ev.kind,
                ev.transaction_id,
                self.clock.now(),
                now_m,
                session_energy_wh=getattr(ev, "session_energy_wh", None),
                # A start queued while the station was away started then, not at its replay.
                started_at=ev.at if getattr(ev, "offline", False) else None,
                stamped_at=ev.at,
            ):
                self.notify("transaction")
            elif ev.kind == "started" and ev.charger_id in st.chargers:
                log.warning(
                    "%s: start of transaction %s stamped before the session's own (%s): an "
                    "older transaction sent late, not the charger's session",
                    ev.charger_id,
                    ev.transaction_id,
                    st.chargers[ev.charger_id].transaction_id,
                )
                # Its end (replayed behind it) saves it as a session of its own, ended.
                self._late_starts[(ev.charger_id, ev.transaction_id)] = ev.at
                while len(self._late_starts) > _LATE_STARTS_KEPT:
                    del self._late_starts[next(iter(self._late_starts))]
            if (
                ev.kind == "ended"
                and (started := self._late_starts.pop((ev.charger_id, ev.transaction_id), None))
                is not None
                and self.on_late_session is not None
            ):
                try:
                    self.on_late_session(
                        ev.charger_id,
                        ev.transaction_id,
                        started,
                        ev.at,
                        getattr(ev, "session_energy_wh", None),
                    )
                except Exception:
                    log.exception("saving the late session at %s failed", ev.charger_id)
        elif kind == "ConnectionEvent":
            if st.on_connection(ev.ocpp_id, ev.connected):
                self.notify("connection")
                if ev.connected:
                    self._await_first_defaults(ev.ocpp_id, now_m)
                    self._ask_station(ev.ocpp_id)
        elif kind == "BootEvent":
            if st.on_boot(ev.ocpp_id):
                self._await_first_defaults(ev.ocpp_id, now_m)
                self.notify("boot")
        elif kind == "ProfileResult":
            pass  # results come back through the awaited set_limit
        # What each charger must enforce may have changed (session end, boot): log it now.
        if kind in ("BootEvent", "ConnectionEvent"):
            for c in st.station_chargers(ev.ocpp_id):
                c.note_limit(now_m)
        elif kind != "MeterSample" and (
            cs := st.chargers.get(getattr(ev, "charger_id", None) or "")
        ):
            cs.note_limit(now_m)

    def post_curtailment(self, c: Curtailment) -> None:
        """A grid signal: at most ``max_kw`` at ``node_id`` from ``start`` to ``end``."""
        self.curtailments.add(c)
        self.notify("grid")

    def post_node_load(self, node_id: str, current_a: Sequence[float], sampled_at: float) -> str:
        """A meter reading of the non-charger load on ``node_id`` (A per site phase; NaN: not
        measured) taken at ``sampled_at`` (wall). While fresh (``stale_after_s``) the decisions
        count it instead of the node's ``other_load_max_a``. Returns what became of it:
        ``"counted"``, or ``"older"`` for a reading older than the one held (ignored).
        ``GridSignalError`` naming the field for a reading that cannot be counted."""
        if node_id not in self.curtailments.node_ids:
            raise GridSignalError(f"node load: node_id {node_id!r} is not a node of this site")
        if len(current_a) != 3:
            raise GridSignalError(
                f"node load {node_id}: current_a needs 3 values (site phase order), "
                f"got {len(current_a)}"
            )
        for k, v in enumerate(current_a):
            if math.isinf(v):
                raise GridSignalError(f"node load {node_id}: current_a[{k}] is not finite: {v}")
        if not math.isfinite(sampled_at):
            raise GridSignalError(f"node load {node_id}: sampled_at is not a time")
        now_w = self.clock.now()
        ahead = sampled_at - now_w
        if ahead > NODE_LOAD_MAX_AHEAD_S:
            # A reading from the future would count as fresh for too long.
            raise GridSignalError(
                f"node load {node_id}: sampled_at is {ahead:.0f} s ahead of the edge's clock "
                f"(more than {NODE_LOAD_MAX_AHEAD_S:g} s)"
            )
        at_m = self.clock.monotonic() - max(0.0, now_w - sampled_at)
        held = self.state.other_load_a.get(node_id)
        if held is not None and held[1] > at_m:
            return "older"
        load = (float(current_a[0]), float(current_a[1]), float(current_a[2]))
        self.state.set_other_load(node_id, load, at_m)
        # More than the last reading (or the first one, which may be more than the configured
        # maximum): decide at once, it may call for decreases.
        rose = held is None or any(
            not (new <= old) for new, old in zip(load, held[0], strict=True) if not math.isnan(new)
        )
        self.notify("overdraw" if rose else "meter")
        return "counted"

    def cancel_curtailment(self, signal_id: str) -> bool:
        found = self.curtailments.cancel(signal_id)
        if found:
            self.notify("grid")
        return found

    def post_prices(self, points: Sequence[PricePoint]) -> None:
        self.prices = merge_prices(self.prices, points)
        self.notify("prices")

    def set_plan(self, plan: PlanTargets) -> None:
        # What each session had delivered when the plan arrived (for ``_behind_plan``).
        self._plan_energy[plan.version] = {
            cid: c.session_energy_wh for cid, c in self.state.chargers.items()
        }
        live = {p.version for p in (self.cloud_plan, self.local_plan) if p is not None}
        for v in [v for v in self._plan_energy if v not in live and v != plan.version]:
            del self._plan_energy[v]
        if plan.source == "cloud":
            self.cloud_plan = plan
        else:
            self.local_plan = plan
        self.notify("plan")
        if self.on_plan is not None:
            try:
                self.on_plan(plan)
            except Exception:
                log.exception("on_plan hook failed for plan %s", plan.version)

    def drop_local_plan(self) -> None:
        """Stop following the local plan (nothing to plan any more, or its re-plan failed): the
        allocator runs alone until the next plan (a fresh cloud plan still applies)."""
        if self.local_plan is not None:
            self.local_plan = None
            self.notify("plan")

    def set_session(
        self,
        charger_id: str,
        *,
        energy_requested_kwh: float | None = None,
        departure: float | None = None,
        priority: float | None = None,
        available: bool | None = None,
    ) -> None:
        c = self.state.chargers[charger_id]
        if priority is not None and (why := priority_error(priority)) is not None:
            raise ValueError(f"set_session {charger_id}: {why}")
        for name, value in (
            ("energy_requested_kwh", energy_requested_kwh),
            ("departure", departure),
        ):
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(
                    f"set_session {charger_id}: {name} must be finite and >= 0, got {value!r}"
                )
        if energy_requested_kwh is not None and energy_requested_kwh > MAX_SESSION_KWH:
            # The planner refuses it (its plausibility bound, docs/planner.md): taken, it made
            # every re-plan of the site fail for as long as the session lasted.
            raise ValueError(
                f"set_session {charger_id}: energy_requested_kwh must be at most "
                f"{MAX_SESSION_KWH:g} kWh, got {energy_requested_kwh!r} (Wh given as kWh?)"
            )
        demand = energy_requested_kwh is not None or departure is not None or priority is not None
        now_w = self.clock.now()
        if departure is not None and not departure > now_w:
            # One already past leaves the car no laxity: least_laxity's top weight, the most
            # urgent car on the site for as long as it charges (for the next car too, hours
            # later). Hurrying a car is what its priority is for.
            whose = (
                "and no session is at the charger to take it"
                if c.transaction_id is None
                else f"for session {c.transaction_id!r}: it would make this car the most urgent "
                "on the site (to hurry it, raise its priority)"
            )
            raise ValueError(
                f"set_session {charger_id}: departure {departure!r} is not after now "
                f"({now_w:.0f}) {whose}"
            )
        if c.transaction_id is None and demand:
            # The next session's only while it holds (``SiteState._take_preset_demand``).
            c.demand_set_at = now_w
        if energy_requested_kwh is not None:
            c.energy_requested_kwh = energy_requested_kwh
        if departure is not None:
            c.departure = departure
        if priority is not None:
            c.priority = priority
        if available is not None:
            c.available = available
        if c.transaction_id is not None and demand:
            self._session_changed(c, None)
        self.notify("operator")

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # ---- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Decide on urgent events at once and on every tick until ``stop()``."""
        try:
            while not self._stopping:
                await self._wait(self._next_wake_in())
                if self._stopping:
                    break
                triggers = self._triggers or {"tick"}
                self._triggers = set()
                try:
                    await self.decide(",".join(sorted(triggers)))
                except BaseException as exc:  # the loop must outlive one bad decision
                    if not _is_core_failure(exc):
                        raise
                    log.exception("decision failed (triggers %s)", sorted(triggers))
            if self._stopping and self._triggers & DECIDED_ON_STOP:
                # Taken and not decided: a lever answered OK while a decision was in progress
                # (its record on its way to the store) or before the loop woke. The API stops
                # before the controller, so nothing comes after this decision. The loop ended
                # without it: told OK, the charger went on as before (review 2026-12-06).
                triggers, self._triggers = self._triggers, set()
                try:
                    await self.decide(",".join(sorted(triggers | {"stop"})))
                except BaseException as exc:
                    if not _is_core_failure(exc):
                        raise
                    log.exception("last decision failed (triggers %s)", sorted(triggers))
        finally:
            for t in list(self._sends):
                t.cancel()
            if self._sends:
                await asyncio.gather(*self._sends, return_exceptions=True)

    async def _wait(self, seconds: float) -> None:
        if self._wake.is_set():
            self._wake.clear()
            return
        try:
            await sleep_or_wake(self.clock, seconds, self._wake)
        finally:
            self._wake.clear()

    def _next_wake_in(self) -> float:
        now_m = self.clock.monotonic()
        now_w = self.clock.now()
        waits = [self.cfg.tick_s]
        settle = next_settle_at(self.pending.values(), self.cfg.settle_s)
        if settle is not None:
            waits.append(settle - now_m)
        change = self.curtailments.next_change(now_w)
        if change is not None:
            waits.append(change - now_w)
        for c in self.state.chargers.values():
            if c.default_unapplied_until is not None and now_m < c.default_unapplied_until:
                # Counted at its maximum until then: decide again when that ends.
                waits.append(c.default_unapplied_until - now_m)
            if c.online and c.expires_at is not None and c.sent is not None:
                # Offline, its refresh cannot go: its reconnect wakes the loop (a due refresh
                # of a station that was away made every wait 0: ~1,000-1,800 decisions/s,
                # found through evcore_decisions_total).
                due = self._refresh_due(c, self.failsafe.get(c.charger_id, 0.0))
                waits.append(due - now_w)
        return max(0.0, min(waits))

    def _station_lead_s(self, charger_id: str) -> float:
        """How far the charger's station clock runs ahead of ours (s; 0 when on time, behind or
        not known). Estimated from its timestamps, never above the true lead."""
        offset = self._clock_offset_s(charger_id) if self._clock_offset_s is not None else None
        return failsafe.lead_lag(offset)[0]

    def _refresh_due(self, c: ChargerState, failsafe_level: float) -> float:
        """When ``c``'s TxProfile must be re-sent (our clock): ``failsafe.refresh_at`` of the
        ``validTo`` it was sent, earlier by its station's lead (that ``validTo`` was sent that
        much later, ``_plan_changes``: the refresh keeps its place by our clock)."""
        assert c.expires_at is not None and c.sent is not None
        due = failsafe.refresh_at(c.expires_at, c.sent, failsafe_level, self.cfg)
        return due - self._station_lead_s(c.charger_id)

    # ---- one decision ---------------------------------------------------------------------
    async def decide(self, trigger: str = "manual") -> dict[str, Any] | None:
        """Allocate + enforce, record, and send what changed; returns the audit record."""
        async with self._lock:
            return await self._decide(trigger)

    async def _decide(self, trigger: str) -> dict[str, Any] | None:
        cfg = self.cfg
        if cfg.baseline:
            return None  # the twin's baseline: the edge sends nothing at all
        now_w = self.clock.now()
        now_m = self.clock.monotonic()
        self.curtailments.prune(now_w)
        self._prune_pending(now_m)
        caps_now = self.curtailments.caps_kw(now_w)
        self._refresh_failsafe(now_w)
        targets = self._targets(now_w)
        try:
            enforced = self.core.decide(
                self.state,
                now_wall=now_w,
                now_mono=now_m,
                caps_kw=caps_now,
                targets=targets,
                failsafe=self.failsafe,
                cfg=cfg,
                behind_plan=self._behind_plan(now_w) if targets else (),
            )
        except BaseException as exc:
            if not _is_core_failure(exc):
                raise
            # The core refused this decision's inputs. Fall back to the failsafe levels (the
            # core's own, from the last successful recompute): every charger in a session is
            # lowered to at most its failsafe level, so all of them together fit every node and
            # phase whatever the others hold. Nothing is raised. The next decision tries again.
            self.stats.core_failures += 1
            log.error(
                "CORE DECISION FAILED (%s: %s); chargers fall back to their failsafe levels",
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            fallback = self._fallback(exc)
            if fallback is None:
                return None
            enforced = fallback
            trigger = f"{trigger},core-failure"
        self.stats.decisions += 1
        decision_no = self.stats.decisions
        self._default_gap = self.state.default_gap(now_m)
        changes = self._plan_changes(enforced, now_w, now_m)
        if not changes:
            return None
        # The session each TxProfile is decided for, taken now: the audit append below awaits,
        # and a session that ends and the next that starts meanwhile must not get this order.
        decided_tx = {
            ch.charger_id: self.state.chargers[ch.charger_id].transaction_id
            for purpose, ch, _ in changes
            if purpose == "tx"
        }
        record = self._record(decision_no, trigger, now_w, enforced, changes, caps_now, targets)
        if not await self._append_audit(record):
            return None
        # TxProfiles change what flows now (decreases first, as ordered); TxDefaults guard the
        # future: they are handed over after the TxProfiles. With a central system that writes
        # at once (``send_limits``) every frame below is on its socket when this returns.
        urgent = [x for x in changes if x[0] == "tx"]
        later = [x for x in changes if x[0] != "tx"]
        self._send_all(decision_no, urgent, now_m, decided_tx)
        took = self.stats.last_decision_s = self.clock.monotonic() - now_m
        self.stats.decision_s[decision_no] = took
        if len(self.stats.decision_s) > 64:
            del self.stats.decision_s[next(iter(self.stats.decision_s))]
        self._send_all(decision_no, later, now_m, decided_tx)
        return record

    def _plan_changes(
        self, enforced: EnforcedSetpoints, now_w: float, now_m: float
    ) -> list[tuple[str, Change, float | None]]:
        cfg = self.cfg
        st = self.state
        fs = self.failsafe
        waiting = {cid for cid, until in self._report_due.items() if now_m < until}
        if len(waiting) < len(self._report_due):
            self._report_due = {cid: self._report_due[cid] for cid in waiting}
        # TxDefault (failsafe level) on every online charger whose default is not the current one.
        default_now = {
            cid: fs[cid]
            for cid, c in st.chargers.items()
            if c.online and cid in fs and cid not in waiting
        }
        default_cur = {cid: st.chargers[cid].tx_default_sent for cid in default_now}
        # TxProfiles on chargers with a transaction.
        active = {
            cid: enforced.setpoints[cid]
            for cid, c in st.chargers.items()
            if c.online
            and c.transaction_id is not None
            and cid in enforced.setpoints
            and cid not in waiting
        }
        cur = {cid: st.chargers[cid].current for cid in active}
        force = {
            cid
            for cid in active
            if (c := st.chargers[cid]).expires_at is not None
            and c.sent is not None
            and (
                now_w >= self._refresh_due(c, fs.get(cid, 0.0))
                # Its profile ends in a level above the failsafe level now in force (it was
                # lowered: a curtailment ahead): re-send it with the new final level (M2).
                or (c.final_sent is not None and c.final_sent > fs.get(cid, 0.0) + 1e-9)
            )
        }
        # A charger drawing above what it holds is not raised until it complies (faults.py).
        hold = {cid for cid in active if draws_above_limit(st.chargers[cid], now_m, cfg)}
        # A session that started while its charger's first TxDefault may not be applied is
        # counted at its maximum (its car may draw that): the setpoint that comes out of it is
        # no reason to raise it. Its TxDefault applies soon; then it gets its share.
        hold |= {
            cid
            for cid in active
            if (c := st.chargers[cid]).session_in_gap and c.default_unapplied(now_m)
        }
        pending = list(self.pending.values())
        d_plan = plan_dispatch(
            default_now,
            default_cur,
            dc_ids=self._dc,
            deadband_a=0.0,
            deadband_w=0.0,
            pending=pending,
            now_s=now_m,
            settle_s=cfg.settle_s,
            resolution_a=cfg.resolution_a,
            resolution_w=cfg.resolution_w,
            # A charger whose first TxDefault may not be applied yet keeps it until the station
            # reports it applies it: counted at its maximum meanwhile, it loses nothing, and a
            # raise (to its maximum, often: its level is sized with it there) would leave the
            # report unable to tell our TxDefault from none.
            hold={cid for cid in default_now if st.chargers[cid].default_unapplied(now_m)},
        )
        # A session that holds no TxProfile of ours it accepted runs on its TxDefault (it started
        # there and its setpoint never differed, or the edge restarted): changing that TxDefault
        # changes what its car may draw now, which the envelope does not count. After a restart
        # a first TxDefault of 0 A paused such cars and one at a charger's maximum let its car
        # draw 32 A counted at 8. Its TxDefault waits; its TxProfile leaves first (unchanged, it
        # is a refresh), and the TxDefault once that is accepted. A raise or a first TxDefault
        # may wait without bound (until a first one is accepted the others' failsafe levels
        # count the charger at its maximum). A lowered one waits at most until that TxProfile is
        # refused or unanswered, or ``settle_s``, then leaves anyway: a lower TxDefault reaching
        # the car only lowers its draw, and a lowered TxDefault held back for good left the
        # charger falling back above the failsafe levels (F1 of the 2026-12-05 review: with
        # every TxProfile rejected, 12.8 A held for good where the levels assumed 7.25 A).
        # Until it is accepted the others' levels count it at its maximum (``_refresh_failsafe``).
        bare = {
            c.charger_id
            for c in (*d_plan.decreases, *d_plan.increases, *d_plan.held)
            if st.chargers[c.charger_id].transaction_id is not None
            and not st.chargers[c.charger_id].tx_profile_held
        }
        overdue = {
            c.charger_id
            for c in d_plan.decreases
            if c.charger_id in bare
            and _lowering_overdue(st.chargers[c.charger_id], now_m, cfg.settle_s)
        }
        # (No decision of its own once that is accepted: one at once would find the car not yet
        # drawing what it was raised to and take the headroom back; the next tick sends it.)
        profile_due = {
            cid for cid in bare & active.keys() if not _tx_profile_on_its_way(st.chargers[cid])
        }
        force |= profile_due
        t_plan = plan_dispatch(
            active,
            cur,
            dc_ids=self._dc,
            deadband_a=cfg.deadband_a,
            deadband_w=cfg.deadband_w,
            pending=pending,
            now_s=now_m,
            settle_s=cfg.settle_s,
            resolution_a=cfg.resolution_a,
            resolution_w=cfg.resolution_w,
            force=force,
            hold=hold,
        )
        # TxProfile decreases first: they lower what flows now; TxDefault ones guard the future.
        # Where what a charger holds is unknown (edge start or restart, reconnect, boot) the send
        # counts as a decrease but is paced like an increase (no burst after a restart): the
        # envelope counts such a charger at its maximum until it accepts, so waiting is safe.
        # A charger in a session whose TxProfile is coming down right now gets its lower TxDefault
        # once that decrease was accepted (or settled): the TxProfile itself ends at the new
        # failsafe level, so nothing waits on it, and the urgent decreases go out alone.
        lowering = {c.charger_id for c in t_plan.decreases} | {
            p.charger_id
            for key, p in self.pending.items()
            if not p.accepted and not key.startswith("default:")
        }
        # (An overdue lowered TxDefault of a session holding no TxProfile waits for nothing: a
        # re-send of its refused TxProfile counts as a decrease of an unknown holding, not as
        # one coming down.)
        deferred = [
            c
            for c in d_plan.decreases
            if c.charger_id not in overdue
            and (
                (
                    c.old is not None
                    and c.charger_id in lowering
                    and st.chargers[c.charger_id].transaction_id is not None
                )
                or c.charger_id in bare
            )
        ]
        deferred_ids = {c.charger_id for c in deferred}
        known = [("tx", c) for c in t_plan.decreases if c.old is not None] + [
            ("tx_default", c)
            for c in d_plan.decreases
            if c.old is not None and c.charger_id not in deferred_ids
        ]
        unknown = [("tx", c) for c in t_plan.decreases if c.old is None] + [
            ("tx_default", c)
            for c in d_plan.decreases
            if c.old is None and c.charger_id not in deferred_ids
        ]
        if self._started_at is None:
            self._started_at = now_m
        if now_m - self._started_at < cfg.startup_grace_s and not all(
            c.online for c in st.chargers.values()
        ):
            # Just started: stations are still reconnecting, and each one not back yet counts at
            # its maximum. Re-sending TxProfiles now would squeeze the ones back first (to 0 A,
            # often) only to raise them a moment later; they still hold the profiles the edge
            # sent before (which end at the failsafe level). TxDefaults do not wait (but for a
            # session's, which waits for its TxProfile: ``bare`` above).
            unknown = [x for x in unknown if x[0] != "tx"]
        decreases = known
        # A TxProfile to a charger whose state is unknown may be a raise of what it really holds
        # (M4): like an increase it waits until every decrease (this decision's and the pending
        # ones) was accepted or settled. Waiting is safe: meanwhile the envelope counts it at the
        # most it may hold (its maximum when unknown, else the higher of what it was sent and
        # what it held). (Its TxDefault re-send, the failsafe itself, does not wait.)
        if unknown and (known or not decreases_settled(pending, now_m, cfg.settle_s)):
            held_unknown = [x for x in unknown if x[0] == "tx"]
            unknown = [x for x in unknown if x[0] != "tx"]
        else:
            held_unknown = []
        if unknown and not waiting:
            # While a station's report is due, the others' unknown sends wait too: counted at
            # its maximum it would squeeze them to values they would be raised from a moment later.
            decreases = known + unknown[: self._take_increase_tokens(len(unknown), now_m)]
        wanted = len(d_plan.increases) + len(t_plan.increases)
        if known or unknown or held_unknown:
            increases: list[tuple[str, Change]] = []
        else:
            increases = [("tx_default", c) for c in d_plan.increases if c.charger_id not in bare]
            increases += [("tx", c) for c in t_plan.increases]
            increases = increases[: self._take_increase_tokens(len(increases), now_m)]
        # Increases wait: an accepted decrease is then worth an immediate decision.
        self._increases_held = bool(
            t_plan.held or d_plan.held or wanted > len(increases) or deferred or held_unknown
        )
        refreshes = [("tx_default", c) for c in d_plan.refreshes] + [
            ("tx", c) for c in t_plan.refreshes
        ]
        # A session whose lowered TxDefault waits for its TxProfile, and whose own change is a
        # held increase, gets its TxProfile now at what it holds: its lowered TxDefault waits for
        # it (at most ``settle_s``), the others' failsafe levels counting this charger at its
        # maximum meanwhile. (A raised or first one may wait.)
        sending = {c.charger_id for _, c in (*decreases, *refreshes, *increases)}
        refreshes += [
            ("tx", Change(c.charger_id, old, old, ChangeKind.REFRESH))
            for c in d_plan.decreases
            if c.old is not None
            and c.charger_id in profile_due
            and c.charger_id not in sending
            and (old := cur.get(c.charger_id)) is not None
        ]
        out: list[tuple[str, Change, float | None]] = []
        for purpose, ch in [*decreases, *refreshes, *increases]:
            # A station whose clock runs ahead is sent validTo that much later, so that it falls
            # to the final level at the failsafe instant by our clock, with every other one.
            vt = (
                None
                if purpose == "tx_default"
                else failsafe.valid_to(now_w, ch.new, fs.get(ch.charger_id, 0.0), cfg)
                + self._station_lead_s(ch.charger_id)
            )
            out.append((purpose, ch, vt))
        return out

    def _take_increase_tokens(self, wanted: int, now_m: float) -> int:
        rate = self.cfg.restart_max_profiles_per_s
        if self._tokens_at is not None:
            self._increase_tokens = min(
                _bucket_size(rate), self._increase_tokens + (now_m - self._tokens_at) * rate
            )
        self._tokens_at = now_m
        n = min(wanted, int(self._increase_tokens))
        self._increase_tokens -= n
        if n < wanted:
            self.notify("held")
        return n

    def _send_all(
        self,
        decision: int,
        items: Sequence[tuple[str, Change, float | None]],
        now_m: float,
        decided_tx: Mapping[str, str | None] | None = None,
    ) -> None:
        """Hand a decision's profiles to the central system in order, awaiting nothing.

        With ``send_limits`` (the central system) every frame is on its socket when this
        returns; the bookkeeping of what was sent follows the writes (nothing can answer before
        this returns: it never yields), so the first decrease does not wait for it."""
        if not items:
            return
        send_limits = getattr(self.gateway, "send_limits", None)
        if send_limits is None:
            # A gateway without the batch call (test doubles): one task per profile.
            for purpose, ch, vt in items:
                sent, kwargs = self._prepare_send(decision, purpose, ch, vt, now_m, decided_tx)
                task = asyncio.ensure_future(self._await_result(sent, kwargs))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
                if self.on_sent is not None:
                    self.on_sent(sent)
            return
        from evcore.ocpp.server import LimitOrder

        orders = [
            LimitOrder(ch.charger_id, **self._limit_kwargs(purpose, ch, vt, decided_tx))
            for purpose, ch, vt in items
        ]
        try:
            handles = send_limits(orders)
        except Exception:
            log.exception("send_limits failed; decision %d not sent", decision)
            handles = None
        for i, (purpose, ch, vt) in enumerate(items):
            sent, _ = self._prepare_send(decision, purpose, ch, vt, now_m, decided_tx)
            if handles is None:
                self._apply_result(sent, False)
                continue
            handle = handles[i]
            sent.wire_mono = handle.sent_mono
            fut = handle.result
            self._sends.add(fut)
            fut.add_done_callback(self._result_callback(sent))
            if self.on_sent is not None:
                self.on_sent(sent)

    def _limit_kwargs(
        self,
        purpose: str,
        ch: Change,
        valid_to: float | None,
        decided_tx: Mapping[str, str | None] | None = None,
    ) -> dict[str, Any]:
        """``set_limit`` / ``LimitOrder`` arguments of one change."""
        dc = ch.charger_id in self._dc
        kwargs: dict[str, Any] = {"purpose": purpose}
        if dc:
            kwargs["limit_w"] = ch.new
        else:
            kwargs["limit_a"] = ch.new
        if purpose == "tx":
            kwargs["valid_to"] = valid_to
            kwargs["final_limit_w" if dc else "final_limit_a"] = self.failsafe.get(
                ch.charger_id, 0.0
            )
            # The session it was decided for: the central system sends nothing (status
            # ``TransactionChanged``) once another one is active on the EVSE, so a TxProfile
            # queued for session 1 never lands on session 2 (review HIGH 2).
            # (Taken at decision time, ``decided_tx``: not after the audit append's await.)
            kwargs["transaction_id"] = self._decided_tx(ch.charger_id, decided_tx)
        return kwargs

    def _decided_tx(
        self, charger_id: str, decided_tx: Mapping[str, str | None] | None
    ) -> str | None:
        if decided_tx is not None and charger_id in decided_tx:
            return decided_tx[charger_id]
        return self.state.chargers[charger_id].transaction_id

    def _result_callback(self, sent: SentProfile) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            self._sends.discard(fut)
            if fut.cancelled():
                return
            status = ""
            try:
                result = fut.result()
                accepted = bool(result.accepted)
                status = str(getattr(result, "status", ""))
                if sent.wire_mono is None:
                    sent.wire_mono = getattr(result, "sent_mono", None)
            except Exception:
                log.exception("set_limit %s failed", sent.charger_id)
                accepted = False
            self._apply_result(sent, accepted, status)

        return done

    def _prepare_send(
        self,
        decision: int,
        purpose: str,
        ch: Change,
        valid_to: float | None,
        now_m: float,
        decided_tx: Mapping[str, str | None] | None = None,
    ) -> tuple[SentProfile, dict[str, Any]]:
        """Book one profile as sent (state, pending decreases) and build its request."""
        c = self.state.chargers[ch.charger_id]
        fs = self.failsafe.get(ch.charger_id, 0.0)
        if purpose == "tx":
            self.state.on_sent(
                ch.charger_id,
                ch.new,
                now_m,
                valid_to if valid_to is not None else 0.0,
                fs,
                uncounted_pause=self._default_gap and ch.new <= 0,
            )
            if ch.kind is ChangeKind.DECREASE:
                self.pending[ch.charger_id] = PendingDecrease(
                    ch.charger_id,
                    now_m,
                    False,
                    value=ch.new,
                    meter_proves=self._draws_above(c, ch.new, now_m),
                )
        else:
            # The charger holds the old default (``tx_default``) until it accepts the new one.
            c.tx_default_sent = ch.new
            if ch.kind is ChangeKind.DECREASE:
                self.pending["default:" + ch.charger_id] = PendingDecrease(
                    ch.charger_id, now_m, False, value=ch.new
                )
        kwargs = self._limit_kwargs(purpose, ch, valid_to, decided_tx)
        sent = SentProfile(
            ch.charger_id,
            purpose,
            ch.new,
            ch.kind,
            decision,
            now_m,
            valid_to,
            transaction_id=kwargs.get("transaction_id") if purpose == "tx" else None,
        )
        self.stats.profiles_sent += 1
        return sent, kwargs

    async def _await_result(self, sent: SentProfile, kwargs: dict[str, Any]) -> None:
        status = ""
        try:
            result = await self.gateway.set_limit(sent.charger_id, **kwargs)
            accepted = bool(result.accepted)
            status = str(getattr(result, "status", ""))
            sent.wire_mono = getattr(result, "sent_mono", None)
        except Exception:
            log.exception("set_limit %s failed", sent.charger_id)
            accepted = False
        self._apply_result(sent, accepted, status)

    def _apply_result(self, sent: SentProfile, accepted: bool, status: str = "") -> None:
        c = self.state.chargers[sent.charger_id]
        key = sent.charger_id if sent.purpose == "tx" else "default:" + sent.charger_id
        if accepted:
            confirm = getattr(self.audit, "confirm_sent", None)
            if confirm is not None:
                with contextlib.suppress(Exception):
                    confirm(sent.charger_id, sent.decision, self.clock.now())
        now_m = self.clock.monotonic()
        if sent.purpose == "tx" and status == "TransactionChanged":
            # Not sent: another transaction is active on the EVSE. Like a TxProfile that did not
            # apply: nothing credited, counted as before; if the edge has not heard of the new
            # session yet, its next decision sends again (and meets the same answer until then).
            log.info(
                "TxProfile %s for transaction %s not sent: another transaction is active",
                sent.charger_id,
                sent.transaction_id,
            )
            if sent.transaction_id == c.transaction_id:
                self.state.on_result(sent.charger_id, sent.value, False)
            self.notify("rejected")
            return
        if sent.purpose == "tx" and sent.transaction_id != c.transaction_id:
            # Its session ended: the profile died with it. Credited by value, a refresh at the
            # TxDefault level marked the next session as holding a TxProfile it never got, and
            # its TxDefault was lowered under its car without one.
            log.info(
                "TxProfile %s %s for transaction %s answered after it ended; not credited",
                sent.charger_id,
                "accepted" if accepted else "refused",
                sent.transaction_id,
            )
            return
        if sent.purpose == "tx":
            if not accepted and c.transaction_id is not None and not c.tx_profile_held:
                # The TxProfile a lowered TxDefault may wait for will not come (or not soon).
                c.tx_profile_refused_at = now_m
            self.state.on_result(sent.charger_id, sent.value, accepted)
        elif accepted:
            # Accepted is not applied: the station applies it within ``settle_s`` of the
            # acceptance, not of the decision (an answer arriving later than that after the
            # decision opened no gap at all: F3 of the 2026-12-05 review).
            applied_by = now_m + self.cfg.settle_s
            c.default_awaited_until = None  # (the gap goes on as ``default_unapplied_until``)
            if c.tx_default is None:
                # Its first TxDefault of ours (edge start, boot, stale ones cleared): before it
                # the charger allowed a car its maximum. It counts there until the station shows
                # it applies it, or ``settle_s`` after the acceptance.
                c.default_unapplied_until = applied_by
                self._watch_default(c)
            if c.tx_default is not None and sent.value < c.tx_default:
                # A car plugging in meanwhile still gets the old level.
                c.tx_default_old = c.tx_default
                c.tx_default_old_until = applied_by
            c.tx_default = sent.value
            c.tx_default_reported = False
            if c.transaction_id is not None and not c.tx_profile_held:
                # A session holding no TxProfile of ours runs on this TxDefault: one that left
                # while the charger was idle and is accepted after the session started reaches
                # the car (F2 of the 2026-12-05 review). Counted at it, never lower than before
                # (a lowered one may not be applied yet: ``replaced_default``).
                c.holding = max(c.holding or 0.0, sent.value)
                c.log_sent(sent.value, sent.left_mono)
                if not _tx_profile_on_its_way(c):  # (else its answer would read as superseded)
                    c.sent = max(c.sent or 0.0, sent.value)
            if c.transaction_id is None:
                # An idle charger's TxDefault is all it holds.
                c.sent = c.holding = sent.value
                c.sent_at = sent.left_mono
                c.accepted = True
                c.needs_resend = False
                c.profile_unknown = False
        else:
            # Refused or unanswered: no TxDefault of ours is on its way any more. Sent again,
            # it opens no start-up gap: a station that never accepts one would leave every pause
            # on the site uncounted (no min_off_s, no switch) for good.
            c.default_awaited_until = None
            if c.tx_default_sent == sent.value:
                c.tx_default_sent = None  # refused or lost: send again next decision
            if c.tx_default_reported:
                self._drop_reported_default(c)
        c.note_limit(self.clock.monotonic())
        p = self.pending.get(key)
        if p is not None and accepted and p.sent_at_s == sent.left_mono:
            # Accepted is not yet in force: held increases wait until a meter reading shows it
            # (``_note_in_effect``) or ``settle_s`` passed since it left.
            # An idle charger's TxDefault has nothing drawing against it: accepted is in force.
            idle = sent.purpose != "tx" and c.transaction_id is None
            self.pending[key] = replace(
                p, accepted=True, accepted_at_s=self.clock.monotonic(), in_effect=idle
            )
            if idle and self._increases_held:
                self.notify("accepted")
        elif not accepted:
            self.notify("rejected")

    # ---- what a (re)connected station reports ----------------------------------------------
    def _ask_station(self, ocpp_id: str) -> None:
        """Ask a station that (re)connected what it enforces and how it stands, beside the loop.

        After an edge restart (or a lost connection) what the station enforces is unknown and the
        envelope counts it at its maximum. ``GetCompositeSchedule`` tells the highest limit it
        applies over the failsafe horizon (then counted there, as an unconfirmed setpoint, until it
        accepts a fresh profile); ``TriggerMessage`` asks for fresh status and meter values instead
        of waiting for the next sample. Each call is bounded; none is awaited by a decision.
        """
        if self._stopping or not hasattr(self.gateway, "get_composite_schedule"):
            return
        # Nothing is sent to its chargers until they reported (or the bound passed): they count
        # at their maximum meanwhile, and a report usually spares them a needless pause.
        until = self.clock.monotonic() + self._report_bound_s()
        for c in self.state.station_chargers(ocpp_id):
            self._report_due[c.charger_id] = until
        task = asyncio.ensure_future(self._station_report(ocpp_id))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _report_bound_s(self) -> float:
        return max(self.cfg.report_wait_s, self.cfg.network_timeout_s)

    async def _station_report(self, ocpp_id: str) -> None:
        gw: Any = self.gateway
        bound = self._report_bound_s()
        horizon = math.ceil(self.cfg.failsafe_after_s + self.cfg.fallback_guard_s)
        clear = getattr(gw, "clear_station_profiles", None)
        stale: list[ChargerState] = []
        # What each charger's report showed it enforcing (its highest limit over the horizon).
        reported: dict[str, float] = {}
        for c in self.state.station_chargers(ocpp_id):
            # A profile sent while the query is in flight is newer than the report: keep it.
            sent_at_before = c.sent_at
            try:
                comp = await asyncio.wait_for(
                    gw.get_composite_schedule(
                        c.charger_id, duration_s=horizon, unit="W" if c.is_dc else "A"
                    ),
                    bound,
                )
            except Exception:
                log.info("GetCompositeSchedule %s: no usable answer", c.charger_id)
                self._report_due.pop(c.charger_id, None)
                continue
            limits = [float(p[1]) for p in getattr(comp, "periods", None) or ()]
            unit_ok = getattr(comp, "unit", None) in (None, "W" if c.is_dc else "A")
            usable = (
                str(getattr(comp, "status", "")) == "Accepted"
                and bool(limits)
                and unit_ok
                and all(math.isfinite(v) and v >= 0 for v in limits)
            )
            if usable:
                reported[c.charger_id] = max(limits)
                # In a session the report is its TxProfile's: its TxDefault stays unchecked.
                c.default_unchecked = c.transaction_id is not None and clear is not None
                if c.transaction_id is None:
                    c.default_unknown = False  # shown below (a stale one: cleared, at max)
            if usable and c.transaction_id is None and clear is not None:
                # Idle: what it enforces is its TxDefault. Above the failsafe level (no
                # TxDefault at all, or an earlier controller's, which would override ours at a
                # higher stack level): cleared below. At most the level: it falls back to no
                # more than ours would make it, so it counts as holding that.
                plain = self._plain_failsafe.get(c.charger_id)
                if plain is None or max(limits) > self.wire(c.charger_id, plain) + 1e-6:
                    stale.append(c)
                    continue
                if c.tx_default is None:
                    c.tx_default = max(limits)
                    c.tx_default_reported = True
            self._report_due.pop(c.charger_id, None)
            if (
                usable
                and c.profile_unknown
                and c.needs_resend  # nothing of ours left since it connected
                and c.sent_at == sent_at_before
                and c.online
            ):
                # Still unknown to us: count it at the highest limit it reports (unconfirmed, and
                # a fresh profile still goes out: needs_resend stays as it is).
                c.sent = min(c.max_value, max(limits))
                c.accepted = False
                c.profile_unknown = False
                self.stats.reported_limits += 1
            self.notify("reported")
        if stale and clear is not None:
            # Clear every TxDefault of the station (any id or stack level; its TxDefaults wait
            # for this report, so ours are sent after). Until a charger accepts ours again it is
            # counted at its maximum, in decisions and in the others' failsafe levels.
            self._forget_defaults(ocpp_id)
            # Recorded first, as every limit sent is: durable before the clear leaves.
            if await self._append_audit(self._clear_record(ocpp_id, reported)):
                try:
                    await asyncio.wait_for(clear(ocpp_id, purpose="tx_default"), bound)
                except Exception:
                    log.info("ClearChargingProfile %s: no usable answer", ocpp_id)
            else:
                # Not recorded, not sent. Its chargers count at their maximum; the station is
                # asked again (and cleared then) after the report bound.
                self._report_again_later(ocpp_id, bound)
            # Whatever of ours it accepted before the clear was answered is gone as well.
            self._forget_defaults(ocpp_id)
            for c in stale:
                self._report_due.pop(c.charger_id, None)
            self.notify("reported")
        unknown = [
            c
            for c in self.state.station_chargers(ocpp_id)
            if c.default_unknown and c.transaction_id is None and c.online
        ]
        if not self._stopping and unknown:
            # No usable report of an idle charger a stale TxDefault may hold: still counted at
            # its maximum, asked again, less and less often (a station that never gives a
            # usable idle report was asked every bound, for ever).
            for c in unknown:
                if c.charger_id not in self._unknown_default_warned:
                    self._unknown_default_warned.add(c.charger_id)
                    log.warning(
                        "charger %s (station %s): no usable report of what it enforces while "
                        "idle (a stale TxDefault may hold it); counted at its maximum %g %s "
                        "until a usable report, asked again with back-off up to %g s",
                        c.charger_id,
                        ocpp_id,
                        c.max_value,
                        "W" if c.is_dc else "A",
                        max(bound, _UNKNOWN_DEFAULT_RETRY_MAX_S),
                    )
            reask = self._unknown_default_reask.get(ocpp_id)
            if reask is None or reask.done():
                wait = self._unknown_default_retry_s.get(ocpp_id, bound)
                self._unknown_default_retry_s[ocpp_id] = min(
                    2 * wait, max(bound, _UNKNOWN_DEFAULT_RETRY_MAX_S)
                )
                self._unknown_default_reask[ocpp_id] = self._report_again_later(ocpp_id, wait)
        elif not unknown:
            self._unknown_default_retry_s.pop(ocpp_id, None)
            for c in self.state.station_chargers(ocpp_id):
                if not c.default_unknown:
                    self._unknown_default_warned.discard(c.charger_id)
        for message in ("StatusNotification", "MeterValues"):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(gw.trigger_message(ocpp_id, message), bound)

    def _clear_record(self, ocpp_id: str, reported: Mapping[str, float]) -> dict[str, Any]:
        """The audit record of clearing every TxDefault of station ``ocpp_id``: per charger of
        the station, what it may let a car draw once cleared (its maximum, until a TxDefault of
        ours is in force; counted there meanwhile) and why, with what it reported before."""
        self.stats.decisions += 1
        now_w = self.clock.now()
        setpoints: list[dict[str, Any]] = []
        for c in self.state.station_chargers(ocpp_id):
            unit = "W" if c.is_dc else "A"
            cid = c.charger_id
            level = self._plain_failsafe.get(cid)
            before = reported.get(cid)
            why = (
                "no report"
                if before is None
                else f"reported {self.wire(cid, before):g} {unit} in force"
                + ("" if level is None else f", failsafe level {level:g} {unit}")
            )
            setpoints.append(
                {
                    "charger_id": cid,
                    "purpose": "tx_default_clear",
                    "kind": "clear",
                    "old": before,
                    "new": c.max_value,
                    "unit": unit,
                    "valid_to": None,
                    "failsafe": level,
                    "binding": (
                        f"station {ocpp_id}'s TxDefaults cleared (ClearChargingProfile: a stale "
                        f"one above the failsafe level; {why}): up to its maximum "
                        f"{c.max_value:g} {unit} until a TxDefault of ours is in force, counted "
                        "there"
                    ),
                    "code": "failsafe",
                    "binding_node": "",
                }
            )
        return {
            "decision": self.stats.decisions,
            "at": now_w,
            "trigger": "station-report,clear-stale-txdefaults",
            "policy": self.cfg.policy,
            "config_version": self.config_version,
            "plan_version": "",
            # No core call made this: what it was decided on is the station's report.
            "inputs_digest": _clear_digest(ocpp_id, reported, setpoints),
            "curtailments_kw": {},
            "setpoints": setpoints,
            "bindings": [],
        }

    def _report_again_later(self, ocpp_id: str, after_s: float) -> asyncio.Future[None]:
        """Ask station ``ocpp_id`` for its report again in ``after_s`` (beside the loop)."""

        async def later() -> None:
            await self.clock.sleep(after_s)
            if not self._stopping and any(c.online for c in self.state.station_chargers(ocpp_id)):
                self._ask_station(ocpp_id)

        task = asyncio.ensure_future(later())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return task

    def _first_default_wait_s(self) -> float:
        """How long a charger left with no TxDefault of ours in force (a (re)connect, a boot,
        its stale ones cleared) counts at its maximum as the start-up gap while its first one is
        on its way: the station's report (its TxDefaults wait for it), then ``settle_s`` for
        ours to leave and be answered. Not renewed by re-sends."""
        return self._report_bound_s() + self.cfg.settle_s

    def _await_first_defaults(self, ocpp_id: str, now_m: float) -> None:
        """Station ``ocpp_id`` (re)connected or booted: those of its chargers that hold no
        TxDefault of ours count at their maximum until one is accepted and applied. The
        sessions held at 0 A for it meanwhile are the gap's (``SiteState.default_gap``), for
        at most ``_first_default_wait_s`` (then the first-TxDefault gap takes over, or, if no
        answer came or it was refused, nothing: a station that never accepts one must not
        leave every pause on the site uncounted)."""
        until = now_m + self._first_default_wait_s()
        for c in self.state.station_chargers(ocpp_id):
            if c.online and c.tx_default is None:
                c.default_awaited_until = until

    def _watch_default(self, c: ChargerState) -> None:
        """Ask the station, beside the loop, whether it applies the first TxDefault of ours that
        ``c`` accepted, until it does or its gap ends (``default_unapplied_until``)."""
        if self._stopping or not hasattr(self.gateway, "get_composite_schedule"):
            return
        task = asyncio.ensure_future(self._poll_default_applied(c, c.default_unapplied_until))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _poll_default_applied(self, c: ChargerState, until: float | None) -> None:
        gw: Any = self.gateway
        step = wait = _APPLIED_POLL_STEP_S
        unit = "W" if c.is_dc else "A"
        while until is not None and not self._stopping:
            left = until - self.clock.monotonic()
            if left <= 0:
                return
            await self.clock.sleep(min(wait, left))
            wait += step
            if c.default_unapplied_until != until or self.clock.monotonic() >= until:
                return  # ended (settled, booted again, cleared) or a newer gap is watched
            try:
                comp = await asyncio.wait_for(
                    gw.get_composite_schedule(c.charger_id, duration_s=1, unit=unit),
                    max(0.1, until - self.clock.monotonic()),
                )
            except Exception:
                continue
            periods = list(getattr(comp, "periods", None) or ())
            if (
                str(getattr(comp, "status", "")) != "Accepted"
                or getattr(comp, "unit", None) not in (None, unit)
                or not periods
                or float(periods[0][0]) > 0
            ):
                continue
            now_limit = float(periods[0][1])
            # A station enforcing at most what the charger counts at once the gap is over, and
            # less than its maximum (which it allows with no TxDefault at all), applies one of
            # ours.
            if (
                math.isfinite(now_limit)
                and 0 <= now_limit <= self.wire(c.charger_id, _gap_bound(c)) + 1e-6
                and now_limit < self.wire(c.charger_id, c.max_value) - 1e-6
                and c.default_unapplied_until == until
            ):
                c.default_shown_for = until
                self._end_gap_if_shown(c)
                return

    def _end_gap_if_shown(self, c: ChargerState) -> None:
        """End the first-TxDefault gap once the station's report showed the TxDefault applied
        and, for a session that started in the gap, a reading shows its car following it.

        A station may report a profile before the car follows it: the report alone ended the gap
        of such a session while its car could still draw the charger's maximum."""
        until = c.default_unapplied_until
        if until is None or c.default_shown_for != until:
            return
        if c.transaction_id is not None and c.session_in_gap and c.gap_read_at_or_below != until:
            return  # a reading may still prove it; else ``settle_s`` after the acceptance
        c.default_unapplied_until = None
        self.notify("applied")

    def _note_gap_followed(self, c: ChargerState, now_m: float) -> None:
        """A session that started in the first-TxDefault gap: note a reading above what it
        counts at once the gap is over (the TxDefault not applied), and one at or below it after
        such a one (within the deadband, as for a decrease in force, ``_note_in_effect``). A
        reading below it alone proves nothing: a car not drawing yet reads 0 A whatever its
        charger allows."""
        until = c.default_unapplied_until
        if c.transaction_id is None or not c.session_in_gap or not c.default_unapplied(now_m):
            return
        drawn, allowed, band = self._drawn(c, _gap_bound(c))
        if drawn is None or not math.isfinite(drawn):
            return
        if drawn > allowed + band:
            c.gap_read_above = until
            c.gap_read_at_or_below = None
        elif c.gap_read_above == until:
            c.gap_read_at_or_below = until
            self._end_gap_if_shown(c)

    def _drop_reported_default(self, c: ChargerState) -> None:
        """A TxDefault of ours was refused or went unanswered where the level came from the
        station's report, not from one of ours: what the station holds now is not known (a
        2.0.1 station may have had its own cleared meanwhile). Counted at its maximum until one
        of ours is accepted and applied (the first-TxDefault gap)."""
        log.warning(
            "%s: TxDefault refused or unanswered; its reported level %g no longer counts",
            c.charger_id,
            c.tx_default,
        )
        c.tx_default = None
        c.tx_default_reported = False
        c.tx_default_old = c.tx_default_old_until = None
        c.default_unapplied_until = c.default_awaited_until = None
        c.profile_unknown = True
        if c.transaction_id is None:
            c.sent = c.holding = None
            c.accepted = False
        self.notify("rejected")

    def _forget_defaults(self, ocpp_id: str) -> None:
        """The station's TxDefaults are cleared (every EVSE's: one of another controller may
        apply station-wide): what held a charger by its TxDefault alone holds it no longer."""
        now_m = self.clock.monotonic()
        for c in self.state.station_chargers(ocpp_id):
            c.tx_default = c.tx_default_sent = None
            c.tx_default_reported = False
            c.default_unapplied_until = None
            # Ours go next: the chargers count at their maximum until one is in force.
            c.default_awaited_until = now_m + self._first_default_wait_s()
            if c.transaction_id is None:
                # Idle: its TxDefault was all it held; now nothing of ours (counted at max).
                c.sent = c.holding = None
                c.accepted = False
            elif not c.tx_profile_held:
                # A session held by its TxDefault (no TxProfile of ours accepted: it started on
                # it, or the edge restarted) runs on nothing now: its car may draw the charger's
                # maximum, counted there until a TxProfile of ours is accepted, which goes now.
                c.profile_unknown = True
                c.needs_resend = True

    def _prune_pending(self, now_m: float) -> None:
        s = self.cfg.settle_s
        for key in [k for k, p in self.pending.items() if p.in_effect or now_m - p.sent_at_s >= s]:
            del self.pending[key]

    def _drawn(self, c: ChargerState, value: float) -> tuple[float | None, float, float]:
        """What the charger was last measured drawing (W for DC, largest phase A for AC), what
        a setpoint ``value`` lets it draw in the same terms (DC: the setpoint is output power,
        the meter reads the AC input, ``dc_input_w``) and the deadband they are compared with."""
        if c.is_dc:
            return c.measured_w, dc_input_w(c, value), self.cfg.deadband_w
        return c.measured_max_a(), value, self.cfg.deadband_a

    def _draws_above(self, c: ChargerState, value: float, now_m: float) -> bool:
        """Whether a fresh reading has the charger drawing above what setpoint ``value`` allows
        (beyond the deadband): then a later reading at or below it shows a decrease to it in
        force."""
        drawn, allowed, band = self._drawn(c, value)
        fresh = c.age_s(now_m) <= self.cfg.stale_after_s
        return fresh and drawn is not None and drawn > allowed + band

    def _note_in_effect(self, c: ChargerState) -> None:
        """Mark the charger's accepted TxProfile decrease in effect once a meter reading taken
        after the acceptance shows it at or below the decreased value (within the deadband),
        where it drew above that value when the decrease left (``meter_proves``); then held
        increases may be recomputed."""
        p = self.pending.get(c.charger_id)
        if (
            p is None
            or p.in_effect
            or not p.meter_proves
            or p.accepted_at_s is None
            or c.measured_at is None
            or c.measured_at <= p.accepted_at_s
        ):
            return
        drawn, allowed, band = self._drawn(c, p.value)
        if drawn is not None and drawn <= allowed + band:
            self.pending[c.charger_id] = replace(p, in_effect=True)
            if self._increases_held:
                self.notify("in_effect")

    # ---- failsafe, plans -------------------------------------------------------------------
    def _refresh_failsafe(self, now_w: float) -> None:
        caps = self.curtailments.caps_kw(now_w, failsafe.horizon_s(self.cfg))
        caps_key = tuple(sorted(caps.items()))
        # A charger that holds no confirmed TxDefault of ours (never accepted one, booted, or
        # its stale ones were just cleared), or whose first one may not be applied yet, may not
        # fall back to our level: the others' levels are sized with it at its maximum.
        now_m = self.clock.monotonic()
        at_max = frozenset(
            cid
            for cid, c in self.state.chargers.items()
            if c.tx_default is None or c.default_unapplied(now_m)
        )
        try:
            fs_key = self._failsafe_key
            plain = (
                self._plain_failsafe
                if fs_key is not None and fs_key[0] == caps_key
                else self.core.failsafe_levels(caps)
            )
            # A session on its TxDefault (no TxProfile of ours held) whose TxDefault is to be
            # lowered keeps the old one until the lower one is accepted (it waits for the
            # session's TxProfile, at most ``settle_s``): the others are not sized on room it has
            # not given up. Counted at its maximum in their levels; its own is the plain level.
            lowering = self._lowering_defaults(plain, now_m) - at_max
            held = self._held_above(plain, now_m, at_max | lowering)
            # Both sets: a charger counted at its maximum gets its maximum as its level, one
            # whose TxDefault is being lowered the plain one. Keyed by their union, a charger
            # moving from the first to the second (its first TxDefault, at its maximum, applied
            # while a session ran on it) kept the levels of before for good: 2 chargers at 32 A
            # and 6 at 0 A on a 64 A feeder, their TxDefaults never lowered (the restart test).
            key = (caps_key, at_max, lowering, tuple(sorted(held.items())))
            if key != self._failsafe_key:

                def counted(hold: Mapping[str, float]) -> dict[str, float]:
                    """The levels with ``at_max | lowering`` at their maximum and the chargers of
                    ``hold`` at what they hold (the plain levels when there are none)."""
                    if not (at_max or lowering or hold):
                        return plain
                    return self.core.failsafe_levels(caps, at_max=at_max | lowering, held=hold)

                levels = dict(counted(held))  # (never the plain levels' own dict)
                levels.update({cid: plain[cid] for cid in lowering if cid in plain})
                if held:
                    # Their own levels: beside the others as those are counted (at their
                    # maximum, where they are), not beside what they hold themselves (that
                    # would put every charger of a node their old levels fill at 0 A), and
                    # never above the plain level. The others' levels are sized beside more than
                    # that, so they fit beside it once it is accepted.
                    beside = counted({})
                    for cid in held.keys() & plain.keys():
                        levels[cid] = min(plain[cid], beside.get(cid, plain[cid]))
                self.failsafe = levels
                self._plain_failsafe = plain
                self._failsafe_key = key
        except BaseException as exc:
            if not _is_core_failure(exc):
                raise
            # Keep the previous levels (and try again next decision): deciding goes on.
            self.stats.failsafe_failures += 1
            log.error(
                "FAILSAFE RECOMPUTE FAILED for caps %s (%s: %s); previous levels kept",
                dict(caps),
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    def _held_above(
        self, plain: Mapping[str, float], now_m: float, counted: frozenset[str]
    ) -> dict[str, float]:
        """Chargers (outside ``counted``) that may still fall back above their plain level if
        the edge stops now: what each may hold, the highest of its accepted TxDefault, one it
        replaced less than ``settle_s`` ago (accepted is not applied) and the final level of
        the TxProfile of its session. Until it holds the lower level the others' levels are
        sized beside that, not beside room it has not given up: a TxDefault lowering
        unanswered (slow or offline station) let the others' TxDefaults rise ``settle_s``
        after it left, 16 + 8 + 24 + 24 A held on a 64 A grid."""
        out: dict[str, float] = {}
        for cid, c in self.state.chargers.items():
            level = plain.get(cid)
            if level is None or cid in counted:
                continue
            in_session = c.transaction_id is not None and c.expires_at is not None
            final = c.final_level if in_session else None
            top = max(
                (v for v in (c.tx_default, c.replaced_default(now_m), final) if v is not None),
                default=None,
            )
            if top is not None and self.wire(cid, level) < self.wire(cid, top) - 1e-9:
                out[cid] = top
        return out

    def _lowering_defaults(self, plain: Mapping[str, float], now_m: float) -> frozenset[str]:
        """Sessions whose TxDefault is to be lowered (to ``plain``) and that hold no accepted
        lower one yet, which started waiting while holding no TxProfile of ours (F1 of the
        2026-12-05 review). Books when each began (``default_lowering_since``)."""
        out: set[str] = set()
        for cid, c in self.state.chargers.items():
            level = plain.get(cid)
            lowered = (
                level is not None
                and c.transaction_id is not None
                and c.tx_default is not None
                and self.wire(cid, level) < self.wire(cid, c.tx_default) - 1e-9
                and (not c.tx_profile_held or c.default_lowering_since is not None)
            )
            if lowered:
                if c.default_lowering_since is None:
                    c.default_lowering_since = now_m
                out.add(cid)
            else:
                c.default_lowering_since = None
        return frozenset(out)

    @property
    def increases_held(self) -> bool:
        """Some increase of the last decision waits (a decrease to settle, a station's report,
        the increase rate): the setpoints are not yet where that decision put them."""
        return self._increases_held

    def failsafe_is_plain(self) -> bool:
        """The failsafe levels in force count no charger at its maximum: every charger holds a
        TxDefault of ours that it accepted and, for a first one, is known to apply."""
        return (
            bool(self.failsafe)
            and self.failsafe == self._plain_failsafe
            and not self.state.default_gap(self.clock.monotonic())
        )

    def _fallback(self, exc: BaseException) -> EnforcedSetpoints | None:
        """After a failed decision: every charger at most at its failsafe level, none raised."""
        fs = self.failsafe
        if not fs:
            log.error("no failsafe levels known either: nothing can be sent")
            return None
        setpoints: dict[str, float] = {}
        why: dict[str, str] = {}
        for cid, level in fs.items():
            c = self.state.chargers.get(cid)
            if c is None:
                continue
            cur = c.current
            setpoints[cid] = level if cur is None else min(cur, level)
            unit = "W" if c.is_dc else "A"
            why[cid] = (
                f"held at {setpoints[cid]:g} {unit}: decision failed ({type(exc).__name__}), "
                f"failsafe level {level:g} {unit}"
            )
        codes = dict.fromkeys(setpoints, "failsafe")
        return EnforcedSetpoints(setpoints, why, "", codes, {})

    def _behind_plan(self, now_w: float) -> set[str]:
        """Sessions that delivered less than the plan in force asked of them since it arrived
        (by more than ``_BEHIND_MARGIN`` and 0.1 kWh): their target is not a cap then (T1)."""
        plan = self.plan_in_use
        if plan is None:
            return set()
        at_start = self._plan_energy.get(plan.version, {})
        out: set[str] = set()
        for cid, steps in plan.rows.items():
            c = self.state.chargers.get(cid)
            if c is None or c.transaction_id is None or cid not in at_start:
                continue
            if not plan.applies_to(cid, c.transaction_id):
                continue
            w_per = c.w_per_a_drawn()  # a single-phase car delivers a third on three phases
            planned_wh = 0.0
            for start, step_s, target in steps:
                lo, hi = max(start, plan.received_at), min(start + step_s, now_w)
                if hi > lo:
                    planned_wh += target * w_per * (hi - lo) / 3600.0
            delivered_wh = c.session_energy_wh - at_start[cid]
            if delivered_wh < planned_wh * (1.0 - _BEHIND_MARGIN) - 100.0:
                out.add(cid)
        return out

    def local_plan_fresh_s(self) -> float:
        """How long a local plan stays in force: ``cloud_plan_fresh_s``, or until the re-plan
        after the next one is due when re-plans are further apart (a local plan judged by the
        cloud plans' bound alone lapsed before the next re-plan replaced it: with
        ``replan_every_s`` 3600 and ``cloud_plan_fresh_s`` 900, three quarters of every hour ran
        on the allocator alone). A re-plan that fails drops the plan at once either way."""
        return max(self.cfg.cloud_plan_fresh_s, 2.0 * self.cfg.replan_every_s)

    def _targets(self, now_w: float) -> dict[str, float] | None:
        """The targets of the plan in force: a fresh cloud plan, else a fresh local one."""
        self.plan_in_use = None
        if self.cfg.policy in ("fair_share", "least_laxity"):
            return None
        for plan, fresh_s in (
            (self.cloud_plan, self.cfg.cloud_plan_fresh_s),
            (self.local_plan, self.local_plan_fresh_s()),
        ):
            if plan is not None and now_w - plan.received_at <= fresh_s and plan.ends_at() > now_w:
                self.plan_in_use = plan
                sessions = {cid: c.transaction_id for cid, c in self.state.chargers.items()}
                return plan.targets_at(now_w, sessions)
        return None

    # ---- audit ----------------------------------------------------------------------------
    def _record(
        self,
        decision: int,
        trigger: str,
        now_w: float,
        enforced: EnforcedSetpoints,
        changes: Sequence[tuple[str, Change, float | None]],
        caps: Mapping[str, float],
        targets: Mapping[str, float] | None,
    ) -> dict[str, Any]:
        plan = self.plan_in_use
        changed = {ch.charger_id for _, ch, _ in changes}
        return {
            "decision": decision,
            "at": now_w,
            "trigger": trigger,
            "policy": self.cfg.policy,
            "config_version": self.config_version,
            "plan_version": plan.version if (plan is not None and targets is not None) else "",
            "inputs_digest": enforced.inputs_digest,
            "curtailments_kw": dict(caps),
            "setpoints": [
                {
                    "charger_id": ch.charger_id,
                    "purpose": purpose,
                    "kind": ch.kind.value,
                    "old": ch.old,
                    "new": ch.new,
                    # What the charger is told: the central system rounds down to this.
                    "sent": self.wire(ch.charger_id, ch.new),
                    "unit": "W" if ch.charger_id in self._dc else "A",
                    "valid_to": vt,
                    "failsafe": self.failsafe.get(ch.charger_id),
                    "binding": enforced.binding.get(ch.charger_id, ""),
                    "code": enforced.codes.get(ch.charger_id, "none"),
                    "binding_node": enforced.binding_node.get(ch.charger_id, ""),
                }
                for purpose, ch, vt in changes
            ],
            # Every charger in a session that this decision considered and left unchanged.
            "bindings": [
                {
                    "charger_id": cid,
                    "reason": enforced.binding.get(cid, ""),
                    "code": enforced.codes.get(cid, "none"),
                    "binding_node_id": enforced.binding_node.get(cid, ""),
                }
                for cid, c in self.state.chargers.items()
                if c.transaction_id is not None and cid not in changed and enforced.binding.get(cid)
            ],
        }

    def wire(self, charger_id: str, value: float) -> float:
        """What ``charger_id`` is told for ``value``: rounded down to the resolution the central
        system sends (A or W)."""
        res = self.cfg.resolution_w if charger_id in self._dc else self.cfg.resolution_a
        return wire_value(value, res) if res > 0 else value

    async def _append_audit(self, record: Mapping[str, Any]) -> bool:
        if self.audit is None:
            return True
        try:
            res = self.audit.append(record)
            if inspect.isawaitable(res):
                await asyncio.wait_for(res, self.cfg.audit_timeout_s)
            return True
        except Exception:
            # Not durable, so nothing of this decision may leave.
            self.stats.audit_failures += 1
            log.exception("audit append failed; decision %s not sent", record.get("decision"))
            return False

    def clear_fault(self, charger_id: str, note: str = "") -> str:
        """An operator's reset of a charger the edge marked faulted (it ignored its profile).

        A fault is latched: a charger that draws nothing for a while has not shown that it obeys
        (its car may be full), so only a person clears it, after checking the charger. From the
        next decision it is counted and steered like any other; if it overdraws again it is
        detected again (suspect, then faulted). Returns the reason it had been faulted; raises
        ``ValueError`` if it is not faulted."""
        c = self.state.chargers[charger_id]
        if not c.faulted:
            raise ValueError(f"charger {charger_id!r} is not faulted")
        reason = c.fault_reason
        c.faulted = False
        c.fault_reason = ""
        c.suspect_since = None
        log.warning("charger %s fault cleared (%s); it was: %s", charger_id, note, reason)
        if self.on_fault_cleared is not None:
            with contextlib.suppress(Exception):
                self.on_fault_cleared(charger_id, note)
        self.notify("operator")
        return reason

    def _report_fault(self, c: ChargerState) -> None:
        self.stats.faults_reported.append((c.charger_id, c.fault_reason))
        log.warning("charger %s faulted: %s", c.charger_id, c.fault_reason)
        if self.on_fault is not None:
            with contextlib.suppress(Exception):
                self.on_fault(c.charger_id, c.fault_reason)


#: Late starts of older transactions kept waiting for their ends (``on_late_session``).
_LATE_STARTS_KEPT = 64


def _bucket_size(rate: float) -> float:
    """The profiles the pace may let leave at once: a second's worth, and at least one. (Sized
    at the rate alone, a rate below 1/s never held a whole token: nothing paced ever left.)"""
    return max(1.0, rate)


def _gap_bound(c: ChargerState) -> float:
    """What a charger in its first-TxDefault gap is counted at once the gap is over: its
    TxDefaults of ours, and in a session the TxProfile it may hold."""
    return max(
        c.tx_default or 0.0,
        c.tx_default_sent or 0.0,
        *((c.sent or 0.0, c.holding or 0.0) if c.transaction_id is not None else ()),
    )


def _lowering_overdue(c: ChargerState, now_m: float, settle_s: float) -> bool:
    """A lowered TxDefault of a session holding no TxProfile of ours has waited for that
    TxProfile long enough: it was refused or unanswered since, or ``settle_s`` passed."""
    since = c.default_lowering_since
    if since is None:
        return False
    refused = c.tx_profile_refused_at
    return now_m >= since + settle_s or (refused is not None and refused >= since)


def _tx_profile_on_its_way(c: ChargerState) -> bool:
    """A TxProfile of this session left and is not answered yet."""
    return c.expires_at is not None and not c.accepted and not c.needs_resend


def _is_core_failure(exc: BaseException) -> bool:
    """An error of one decision (any ``Exception``, or a pyo3 ``PanicException``, which derives
    from ``BaseException``), as opposed to cancellation or interpreter exit, which propagate."""
    if isinstance(exc, Exception):
        return True
    return type(exc).__name__ == "PanicException"


def _overdraws(c: ChargerState, settle_s: float) -> bool:
    """A fresh measurement above every limit the charger may still be applying: others may need
    to come down now. (Above a limit lowered less than ``settle_s`` ago is expected and counted
    by the envelope already: no extra decision for that.)"""
    over = overdraw(c, settle_s)
    if over is None:
        return False
    return over > (c.holding or 0.0) * 0.05 + 500.0 if c.is_dc else over > 1.0


def _clear_digest(
    ocpp_id: str, reported: Mapping[str, float], setpoints: Sequence[Mapping[str, Any]]
) -> str:
    """The inputs digest of a TxDefault clear's audit record (sha256, hex): the station, what each
    of its chargers reported in force and the failsafe levels, as the record states them. Every
    record carries one (an empty digest left the record unexplained to the audit's checks)."""
    from evcore.audit.log import digest_inputs

    return digest_inputs(
        {
            "tx_default_clear": {
                "station": ocpp_id,
                "reported": dict(reported),
                "failsafe": {str(sp["charger_id"]): sp.get("failsafe") for sp in setpoints},
            }
        }
    )
