"""The edge's picture of the site: sessions, measurements and their ages, sent and confirmed
setpoints, faults.

What this module owns: applying events (status, meter values, transactions, connections, profile
results) to per-charger state, with every time taken from the one clock (``monotonic`` for ages and
timeouts, ``now`` for wall instants). It never decides a setpoint and never judges what is safe:
ages and confirmation flags go to the core's envelope as they are.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Statuses in which a vehicle is plugged in (1.6 ChargePointStatus / 2.0.1 ConnectorStatus
# "Occupied" + transaction).
_PLUGGED = frozenset(
    {"Preparing", "Charging", "SuspendedEV", "SuspendedEVSE", "Finishing", "Occupied"}
)
_UNAVAILABLE = frozenset({"Unavailable", "Faulted"})
# Limit changes kept per charger for the ignored-profile check (a few settle times' worth).
_LIMIT_LOG_LEN = 64

#: The session priorities an operator may set (API, facade, ``EdgeController.set_session``).
#: Well inside the core's weight range (allocator.rs PRIORITY_RANGE = [1e-6, 1e6]), which
#: ``coreio`` clamps to after applying its own weights.
PRIORITY_MIN = 1e-3
PRIORITY_MAX = 1e3


def priority_error(priority: float) -> str | None:
    """Why ``priority`` is not one an operator may set, or None when it is."""
    if not (math.isfinite(priority) and PRIORITY_MIN <= priority <= PRIORITY_MAX):
        return (
            f"priority must be a finite number from {PRIORITY_MIN:g} to {PRIORITY_MAX:g}, "
            f"got {priority!r}"
        )
    return None


log = logging.getLogger("evcore.edge")

#: How long a demand set on a charger with no session waits for the next one (s): a session
#: starting later does not take it (nor one starting after its departure). It is meant for the
#: car about to plug in (the driver's app, the twin: set as the car plugs in, before the
#: station's transaction start arrives), not for whoever comes next, hours later.
PRESET_DEMAND_S = 900.0

#: How long the send log keeps a TxProfile value once another replaced it (s): longer than any
#: reading stays fresh.
SENT_LOG_S = 600.0


@dataclass(slots=True)
class ChargerState:
    charger_id: str
    ocpp_id: str
    is_dc: bool
    min_value: float  # min_a (AC) or min_w (DC)
    max_value: float  # max_a (AC) or max_w (DC)

    # DC only: the AC input a DC setpoint P draws is P / dc_efficiency + dc_aux_w (W), and one
    # ampere per phase at its terminals is dc_w_per_a W (3 x line-to-neutral voltage).
    dc_efficiency: float = 1.0
    dc_aux_w: float = 0.0
    dc_w_per_a: float = 3 * 230.0
    # AC: W drawn per ampere of setpoint (voltage x phases it draws on), and those phases.
    ac_w_per_a: float = 3 * 230.0
    ac_phases: int = 3

    online: bool = False
    status: str = "Unknown"
    plugged: bool = False
    transaction_id: str | None = None
    session_started_at: float | None = None  # wall
    # The time its transaction's start event carried (``TransactionEvent.at``): a start stamped
    # before it is a late one of an older transaction (a station's replay), not the next session.
    session_start_stamp: float | None = None
    # The transaction of the session that ended last on the charger: ended by a status (the car
    # unplugged), its own end may still come, with its last energy.
    ended_transaction_id: str | None = None

    # Measurement per SITE phase and per charger TERMINAL (its L1..L3), A; None where not measured.
    # DC: measured_w as well.
    measured_a: tuple[float | None, float | None, float | None] = (None, None, None)
    terminal_a: tuple[float | None, float | None, float | None] = (None, None, None)
    measured_w: float | None = None
    measured_at: float | None = None  # monotonic
    # The station's own timestamp of that measurement (wall, its clock): a reading stamped
    # before it is an old one sent late (a queue replayed beside live readings), not the draw now.
    measured_station_at: float | None = None
    # The energy into the car this session (the central system's session energy: a DC
    # charger's output, not its AC input; the demand windows convert, planning._grid_wh).
    session_energy_wh: float = 0.0
    # What the session had delivered before the central system's count of it began (Wh): its
    # count starts again at 0 after a restart when the store holds no start register for the
    # transaction (a start that carried none; a station metering only its inlet). The edge's
    # session energy is this plus that count (``count_session_energy``).
    energy_carried_wh: float = 0.0
    # The energy a restart took back from the store for the session (``recording.recover``),
    # until the central system's first count of it shows whether it counts from before.
    energy_restored_wh: float | None = None

    # Setpoints (charger unit). ``sent``: the last TxProfile value that left; ``accepted``: whether
    # its CALLRESULT said Accepted; ``holding``: the last value the charger accepted.
    sent: float | None = None
    sent_at: float | None = None  # monotonic
    # TxProfile values sent this session with when they left (monotonic), oldest first: what a
    # reading was taken under (``lowest_sent``).
    sent_log: list[tuple[float, float]] = field(default_factory=list)
    accepted: bool = False
    holding: float | None = None
    expires_at: float | None = None  # wall, validTo of the TxProfile in force
    # The level the TxProfile in force ends at (its final period): the highest one the charger
    # may hold (sent, not yet accepted, or accepted); the accepted one once it is accepted.
    final_level: float | None = None
    final_sent: float | None = None  # the final level of the last TxProfile sent
    tx_default: float | None = None  # TxDefault level the charger accepted
    tx_default_sent: float | None = None  # last TxDefault level sent; None = must (re)send
    # ``tx_default`` is what an idle charger's report showed after a (re)connect, not one of ours
    # it accepted: the station's own, which a refused or unanswered TxDefault of ours may have
    # disturbed (a 2.0.1 clash clears it). Dropped then: counted at the maximum until one of
    # ours is accepted and applied (the first-TxDefault gap).
    tx_default_reported: bool = False
    # Its station's last report came while it was in a session: the report then shows the
    # TxProfile, so a TxDefault it holds above the failsafe level (another controller's, at a
    # stack level above ours) went unseen and would apply once the session ends. The station is
    # asked again when the session ends (``EdgeController.on_event``).
    default_unchecked: bool = False
    # Such a session ended (and its station was asked again): from then the stale TxDefault may
    # be in force, at any level up to the maximum. Counted there (idle, or a next session held
    # by no TxProfile of ours) until an idle report shows what it enforces. Between the end and
    # that report (one round trip) it was counted at the edge's own TxDefault.
    default_unknown: bool = False
    # A lowered TxDefault the charger accepted but may not have applied yet: the level it replaced
    # still counts for an idle charger until ``tx_default_old_until`` (monotonic; sent + settle_s).
    tx_default_old: float | None = None
    tx_default_old_until: float | None = None
    # The first TxDefault of ours a charger accepted (it held none of ours before: edge start,
    # boot, stale ones cleared) may not be applied yet: until then a car plugged in draws what the
    # charger allows without it, its maximum. Monotonic instant until which it counts so (sent +
    # settle_s); None once the station's report showed it in force, or when none is on its way.
    default_unapplied_until: float | None = None
    # Before that: no TxDefault of ours is known in force on it (none sent yet since the station
    # connected or booted, one sent and not answered, or its stale ones were just cleared), so it
    # counts at its maximum, and its first one is on its way. Monotonic instant until which that
    # counts as the start-up gap (the edge sets it: report wait + ``settle_s`` after the
    # (re)connect, boot or clear); None once one of ours is accepted (``default_unapplied_until``
    # takes over), refused or unanswered, or the station went offline. Re-sends do not set it
    # again: a station that never accepts one leaves the gap for good after that bound.
    default_awaited_until: float | None = None
    # This session started while that was so: its car may draw the charger's maximum until the
    # TxDefault is applied. (A session running before it is held by the TxProfile it has, which
    # the station's report showed after a restart, or counted at its maximum after a boot.)
    session_in_gap: bool = False
    # The gap (by its ``default_unapplied_until``) whose TxDefault the station's report showed
    # applied. That ends the gap of an idle charger; a session that started in it may be drawing
    # the charger's maximum while the station already reports the profile, so it also needs a
    # fresh reading at or below what it counts at afterwards, taken after one above it in that
    # gap (``gap_read_above``, ``gap_read_at_or_below``), or ``settle_s`` after the acceptance.
    default_shown_for: float | None = None
    gap_read_above: float | None = None
    gap_read_at_or_below: float | None = None
    # A session held at 0 A while a first TxDefault was not known applied (its own or another
    # charger's): that pause is the gap's, not the allocator's choice, so it starts no min_off_s
    # and its return to charging counts no switch.
    off_uncounted: bool = False
    # This session holds a TxProfile of ours that the charger accepted. Until then (it started at
    # its TxDefault and its setpoint never differed, or the edge restarted and does not know what
    # it holds) the car draws what the charger's TxDefault allows: a TxDefault change is a change
    # of what flows now, so it waits for the session's TxProfile (``EdgeController``).
    tx_profile_held: bool = False
    # Such a session's TxDefault is to be lowered and has not accepted the lower one yet:
    # monotonic instant the lowering began waiting for the session's TxProfile. It waits at most
    # ``settle_s`` (or until that TxProfile is refused or unanswered: ``tx_profile_refused_at``),
    # then leaves anyway (a lower TxDefault reaching the car only lowers its draw). Meanwhile the
    # others' failsafe levels count this charger at its maximum (``EdgeController``).
    default_lowering_since: float | None = None
    # When a TxProfile of this session that held none was refused or went unanswered (monotonic).
    tx_profile_refused_at: float | None = None
    needs_resend: bool = True  # must be sent again (boot, reconnect, rejection, restart)
    # What the charger enforces is unknown (edge start, boot: profiles may be lost). The envelope
    # counts such a charger at its maximum until a profile is accepted.
    profile_unknown: bool = True

    # Switching history for the envelope's on/off rules (monotonic).
    on_since: float | None = None
    off_since: float | None = None
    switches: int = 0

    # Ignored-profile detection. ``limit_log``: the limit the charger was to enforce (accepted
    # TxProfile, else its TxDefault; None = unknown) from when the edge learnt it (monotonic),
    # oldest first, so a measurement is judged against every limit it may still have been
    # applying, not only the latest one.
    limit_log: list[tuple[float, float | None]] = field(default_factory=list)
    suspect_since: float | None = None  # monotonic
    faulted: bool = False
    fault_reason: str = ""

    # Demand (sessions): energy still wanted, departure (wall), priority weight.
    energy_requested_kwh: float | None = None
    departure: float | None = None
    priority: float = 1.0
    available: bool = True  # operator availability
    # When that demand was set while the charger had no session (wall; None: set for the
    # session running then, or nothing set): the next session takes it only while it still
    # holds (``SiteState._take_preset_demand``).
    demand_set_at: float | None = None

    def count_session_energy(self, count_wh: float) -> None:
        """Take the central system's count of the session's energy (Wh, finite). A session's
        energy only grows: a count below it is not the session's (a reading replayed late).
        The first count after a restart that is 0 while the store gave back more is a count
        begun again at the central system's first register since (its store held no start
        register): what was restored carries on under it. Taken as it was, the restored energy
        stood still until the new count passed it, and the session stayed short by it."""
        restored = self.energy_restored_wh
        if restored is not None:
            self.energy_restored_wh = None
            if count_wh <= 0.0 < restored:
                self.energy_carried_wh = restored
                log.info(
                    "%s: transaction %s counted again from 0 Wh after the restart; the %.0f Wh "
                    "delivered before it carry on",
                    self.charger_id,
                    self.transaction_id,
                    restored,
                )
        self.session_energy_wh = max(self.session_energy_wh, self.energy_carried_wh + count_wh)

    def measured_max_a(self) -> float | None:
        vals = [v for v in self.measured_a if v is not None and math.isfinite(v)]
        return max(vals) if vals else None

    def effective_limit(self) -> float | None:
        """The limit the charger should be enforcing now (None while its profiles are unknown)."""
        return None if self.profile_unknown else self.holding

    def note_limit(self, now_mono: float) -> None:
        """Log the effective limit if it changed since the last entry."""
        value = self.effective_limit()
        log = self.limit_log
        if log and log[-1][1] == value:
            return
        log.append((now_mono, value))
        if len(log) > _LIMIT_LOG_LEN:
            del log[: len(log) - _LIMIT_LOG_LEN]

    def allowed_bound(self, at_mono: float, settle_s: float) -> float | None:
        """The highest limit the charger may still be applying at ``at_mono``: the one in force
        ``settle_s`` before and every one since (a lowered limit takes up to ``settle_s`` to take
        effect). None when any of them is unknown or nothing is known from that long ago."""
        start = at_mono - settle_s
        bound: float | None = None
        for t, value in reversed(self.limit_log):
            if t > at_mono:
                continue
            if value is None:
                return None
            bound = value if bound is None else max(bound, value)
            if t <= start:
                return bound
        return None

    def w_per_a_drawn(self) -> float:
        """AC: W per ampere of setpoint on the phases the car draws on. A single-phase car on a
        three-phase charger (one terminal carrying current, the others under 0.5 A) draws a
        third of what the charger's three phases would; unknown until measured (the charger's
        own phases). DC: 1 (its setpoint is in W)."""
        if self.is_dc:
            return 1.0
        drawing = self.phases_drawing()
        if drawing is None:
            return self.ac_w_per_a
        return self.ac_w_per_a / self.ac_phases * drawing

    def phases_drawing(self) -> int | None:
        """AC on more than one phase: how many of its phases the car draws on (terminals at
        0.5 A or more, once one carries 1 A, every terminal measured); None until then."""
        vals = [v for v in self.terminal_a if v is not None and math.isfinite(v)]
        if self.is_dc or self.ac_phases < 2 or len(vals) != self.ac_phases or max(vals) < 1.0:
            return None
        return sum(1 for v in vals if v >= 0.5)

    def clear_session_flags(self) -> None:
        """What one session leaves that the next must not inherit (its start and its end clear
        it): a pause of the first-TxDefault gap, a TxProfile held, a lowered TxDefault waiting,
        what its car was read drawing in the gap."""
        self.off_uncounted = self.session_in_gap = self.tx_profile_held = False
        self.default_lowering_since = self.tx_profile_refused_at = None
        self.gap_read_above = self.gap_read_at_or_below = None
        self.sent_log.clear()

    def log_sent(self, value: float, now_mono: float) -> None:
        """Book a TxProfile value that left; entries older than ``SENT_LOG_S`` go, but for the
        one in force then."""
        log = self.sent_log
        bisect.insort(log, (now_mono, value), key=lambda e: e[0])  # (an answer may come late)
        cut = now_mono - SENT_LOG_S
        old = sum(1 for at, _ in log if at <= cut)
        if old > 1:
            del log[: old - 1]

    def lowest_sent(self, since: float, until: float) -> float | None:
        """The lowest TxProfile value in force at some instant of ``[since, until]`` (by when
        each left: one rejected counts too); None when the log does not reach back to ``since``
        (nothing of this session sent before it)."""
        at_since: float | None = None
        low: float | None = None
        for at, value in self.sent_log:
            if at <= since:
                at_since = value
            elif at <= until:
                low = value if low is None else min(low, value)
        if at_since is None:
            return None
        return at_since if low is None else min(at_since, low)

    def default_level(self) -> float:
        """The TxDefault level it starts a session under: the value it accepted last, else its
        TxDefault, else 0."""
        return self.holding if self.holding is not None else self.tx_default or 0.0

    def default_unapplied(self, now_mono: float) -> bool:
        """Its first TxDefault of ours was accepted and may not be applied yet (see
        ``default_unapplied_until``): a car on it may draw its maximum."""
        until = self.default_unapplied_until
        return until is not None and now_mono < until

    def default_awaited(self, now_mono: float) -> bool:
        """Online, no TxDefault of ours known in force (counted at its maximum), and its first
        one on its way or about to leave, within the bound (``default_awaited_until``)."""
        until = self.default_awaited_until
        return self.online and self.tx_default is None and until is not None and now_mono < until

    def replaced_default(self, now_mono: float) -> float | None:
        """The level of the TxDefault a lowered one replaced less than ``settle_s`` ago (accepted
        is not applied), else None."""
        if (
            self.tx_default_old is not None
            and self.tx_default_old_until is not None
            and now_mono < self.tx_default_old_until
        ):
            return self.tx_default_old
        return None

    def idle_level(self, failsafe_level: float, now_mono: float | None = None) -> float:
        """What an idle charger (no session) may let a car draw before the edge hears of it, as
        the allocator counts it: its failsafe level, a TxDefault accepted or on its way, what it
        reported enforcing, and its maximum while it never accepted a TxDefault of ours and
        reported nothing. With ``now_mono``, also a TxDefault it replaced less than ``settle_s``
        ago (accepted is not applied), and its maximum while its first TxDefault of ours may not
        be applied yet; a plan for the hours ahead passes None."""
        reported = self.sent if self.transaction_id is None else None
        levels = [
            failsafe_level,
            self.tx_default or 0.0,
            self.tx_default_sent or 0.0,
            reported or 0.0,
        ]
        if now_mono is not None and (replaced := self.replaced_default(now_mono)) is not None:
            levels.append(replaced)
        if now_mono is not None and self.default_unapplied(now_mono):
            levels.append(self.max_value)
        if (self.tx_default is None and reported is None) or self.default_unknown:
            levels.append(self.max_value)
        return max(levels)

    def age_s(self, now_mono: float) -> float:
        return math.inf if self.measured_at is None else max(0.0, now_mono - self.measured_at)

    @property
    def current(self) -> float | None:
        """What the charger was last told (pending or accepted); None when unknown."""
        if self.needs_resend:
            return None
        return self.sent

    @property
    def demand_active(self) -> bool:
        return self.online and self.plugged and self.available and not self.faulted


@dataclass
class SiteState:
    chargers: dict[str, ChargerState]
    by_ocpp: dict[tuple[str, int], str] = field(default_factory=dict)
    other_load_a: dict[str, tuple[tuple[float, float, float], float]] = field(default_factory=dict)

    @classmethod
    def from_chargers(cls, specs: Iterable[ChargerState], evse_ids: Mapping[str, int]) -> SiteState:
        chargers = {c.charger_id: c for c in specs}
        by_ocpp = {
            (c.ocpp_id, evse_ids.get(c.charger_id, 1)): c.charger_id for c in chargers.values()
        }
        return cls(chargers=chargers, by_ocpp=by_ocpp)

    def __getitem__(self, charger_id: str) -> ChargerState:
        return self.chargers[charger_id]

    def default_gap(self, now_mono: float) -> bool:
        """Some charger counts at its maximum for want of a TxDefault of ours known in force, for
        a bounded while: its first one may not be applied yet (``default_unapplied``), or is on
        its way (``default_awaited``). A pause made meanwhile is the gap's, not the allocator's."""
        return any(
            c.default_unapplied(now_mono) or c.default_awaited(now_mono)
            for c in self.chargers.values()
        )

    def station_chargers(self, ocpp_id: str) -> list[ChargerState]:
        return [c for c in self.chargers.values() if c.ocpp_id == ocpp_id]

    # ---- events -------------------------------------------------------------------------------
    def on_connection(self, ocpp_id: str, connected: bool) -> list[str]:
        changed = []
        for c in self.station_chargers(ocpp_id):
            c.online = connected
            # Whatever the charger holds after a (re)connect is unknown until we re-send.
            c.needs_resend = True
            c.tx_default_sent = None
            if not connected:
                c.default_awaited_until = None  # nothing on its way to a station away
            changed.append(c.charger_id)
        return changed

    def on_boot(self, ocpp_id: str) -> list[str]:
        # Some chargers lose profiles on reboot: treat every profile as gone.
        changed = []
        for c in self.station_chargers(ocpp_id):
            c.online = True
            c.needs_resend = True
            c.profile_unknown = True
            c.tx_default = None
            c.tx_default_sent = None
            c.tx_default_reported = False
            c.default_unapplied_until = None  # its next TxDefault of ours is a first one again
            c.default_awaited_until = None  # (the edge opens that window: it knows the bound)
            c.tx_profile_held = False
            changed.append(c.charger_id)
        return changed

    def on_status(self, charger_id: str, status: str) -> bool:
        c = self.chargers.get(charger_id)
        if c is None:
            return False
        was = c.plugged
        c.status = status
        c.online = True
        c.plugged = status in _PLUGGED
        if status in _UNAVAILABLE and c.transaction_id is not None:
            # Faulted or Unavailable ends no transaction (StopTransaction / Ended does): the
            # charger may carry on with it under the TxProfile it holds for it. The session stays
            # (no demand while so: its TxProfile goes to 0), counted at what it holds. Ended on
            # the status, it was counted at its TxDefault while its car could draw that
            # TxProfile again, and the transaction never got another one.
            return was != c.plugged
        if (was or c.transaction_id is not None) and not c.plugged:
            self._end_session(c)
        return was != c.plugged

    def on_meter(
        self,
        charger_id: str,
        site_phase_a: tuple[float | None, float | None, float | None],
        power_w: float | None,
        session_energy_wh: float | None,
        now_mono: float,
        terminal_a: tuple[float | None, float | None, float | None] | None = None,
        *,
        sampled_at: float | None = None,
        transaction_id: str | None = None,
    ) -> bool:
        """Take a meter reading as the charger's draw now (``sampled_at``: the station's own
        timestamp of it); its session energy counts for the charger's session only when it is
        that session's (``transaction_id`` None or the charger's)."""
        c = self.chargers.get(charger_id)
        if c is None:
            return False
        c.measured_a = site_phase_a
        c.terminal_a = terminal_a if terminal_a is not None else site_phase_a
        c.measured_w = power_w
        c.measured_at = now_mono
        c.measured_station_at = sampled_at
        c.online = True
        ours = transaction_id is None or transaction_id == c.transaction_id
        if ours and session_energy_wh is not None and math.isfinite(session_energy_wh):
            # A session's energy only grows; a count begun again after a restart adds to what
            # the store gave back (``count_session_energy``).
            c.count_session_energy(session_energy_wh)
        return True

    def sent_late(
        self, charger_id: str, sampled_at: float | None, now_mono: float, fresh_s: float
    ) -> bool:
        """A reading stamped (by the station's clock) before the measurement held, while that
        one is fresh (``fresh_s``): an old reading sent late, not the draw now. (Once the held
        one is stale any reading is taken: a station whose clock stepped back is not ignored
        for more than ``fresh_s``.)"""
        c = self.chargers.get(charger_id)
        return (
            c is not None
            and sampled_at is not None
            and math.isfinite(sampled_at)
            and c.measured_station_at is not None
            and sampled_at < c.measured_station_at
            and c.age_s(now_mono) <= fresh_s
        )

    def on_transaction(
        self,
        charger_id: str,
        kind: str,
        transaction_id: str,
        now_wall: float,
        now_mono: float | None = None,
        session_energy_wh: float | None = None,
        started_at: float | None = None,
        *,
        stamped_at: float | None = None,
    ) -> bool:
        """Apply a transaction's start, update or end. ``session_energy_wh``: the energy into
        the car the event carries (an end's is the session's last: StopTransaction's meterStop,
        TransactionEvent(Ended)'s reading), taken for the charger's session. ``started_at``:
        when a start the station queued while it was away happened (its timestamp; the start
        is taken at ``now_wall`` otherwise, and never later). ``stamped_at``: the time the
        event carries; a start stamped before the session's own is an older transaction's, sent
        late (a station replaying what it held while away): not the charger's session (False).
        A later start ends the session before it, as its end would have."""
        c = self.chargers.get(charger_id)
        if c is None:
            return False
        stamp = stamped_at if stamped_at is not None and math.isfinite(stamped_at) else None
        if kind == "started" and c.transaction_id not in (None, transaction_id):
            if (
                stamp is not None
                and c.session_start_stamp is not None
                and stamp < c.session_start_stamp
            ):
                # The central system keeps the running one as the EVSE's transaction
                # (``CentralSystem._take_evse``). Taken as the next session, it carried the
                # running session's demand, and its replayed end left the charger idle to the
                # edge while the running car drew what its TxProfile allowed.
                return False
            # The session before it ended (its end was lost): what was set for it ends too.
            c.ended_transaction_id = c.transaction_id
            self._end_demand(c)
        energy_ok = session_energy_wh is not None and math.isfinite(session_energy_wh)
        if kind in ("ended", "updated") and c.transaction_id == transaction_id and energy_ok:
            assert session_energy_wh is not None
            c.count_session_energy(session_energy_wh)
        if kind == "started":
            if c.transaction_id != transaction_id:
                if c.transaction_id is None:
                    self._take_preset_demand(c, transaction_id, now_wall)
                c.transaction_id = transaction_id
                c.session_start_stamp = stamp
                c.session_started_at = now_wall
                if started_at is not None and math.isfinite(started_at):
                    c.session_started_at = min(now_wall, started_at)
                c.session_energy_wh = c.energy_carried_wh = 0.0
                c.energy_restored_wh = None
                # Switching rules count per session, from what this session really did: it
                # starts on (at its TxDefault) or off, with no history from the car before it.
                c.switches = 0
                c.on_since = c.off_since = None
                c.clear_session_flags()
                if now_mono is not None:
                    if c.default_unapplied(now_mono):
                        # Its first TxDefault may not be applied: the car may draw the charger's
                        # maximum. It starts on; being held at 0 A until the TxDefault is known
                        # applied, and rising from there, is the gap's, not a switch.
                        c.session_in_gap = True
                        c.on_since = now_mono
                        c.off_uncounted = True
                    elif (level := c.default_level()) > 0:
                        c.on_since = now_mono
                        # It starts under the TxDefault it holds.
                        c.log_sent(level, now_mono)
                    elif self.default_gap(now_mono):
                        # At 0 A because a charger (this one, or another in the failsafe levels)
                        # counts at its maximum while its first TxDefault of ours is on its way
                        # or may not be applied: not the allocator's pause, so no min_off_s
                        # before it may start.
                        c.off_uncounted = True
                    else:
                        c.off_since = now_mono
            c.plugged = True
        elif kind == "ended":
            if c.transaction_id == transaction_id:
                self._end_session(c)
        elif kind == "updated" and c.transaction_id is None:
            self._take_preset_demand(c, transaction_id, now_wall)
            c.transaction_id = transaction_id
            c.plugged = True
        return True

    def on_sent(
        self,
        charger_id: str,
        value: float,
        now_mono: float,
        expires_at: float,
        final_level: float | None = None,
        *,
        uncounted_pause: bool = False,
    ) -> None:
        """Book a TxProfile as sent. ``uncounted_pause``: a pause (value 0) made while a first
        TxDefault was not known applied: it starts no min_off_s and counts no switch, nor does
        the session's next rise from 0 (``off_uncounted``)."""
        c = self.chargers[charger_id]
        prev = c.sent
        if final_level is not None:
            # Until this profile is accepted the charger may still hold the previous one.
            old = c.final_level
            c.final_level = final_level if old is None else max(old, final_level)
            c.final_sent = final_level
        c.sent = value
        c.sent_at = now_mono
        c.log_sent(value, now_mono)
        c.accepted = False
        c.expires_at = expires_at
        c.needs_resend = False
        was_on = prev is not None and prev > 0
        if value <= 0 and uncounted_pause:
            if was_on or prev is None or c.off_uncounted:
                c.off_uncounted = True
                c.off_since = None
        elif value > 0:
            if not was_on:
                c.on_since = now_mono
                if prev is not None and not c.off_uncounted:
                    c.switches += 1
            c.off_uncounted = False
        elif was_on or prev is None:
            c.off_since = now_mono
            if prev is not None:
                c.switches += 1

    def on_result(self, charger_id: str, value: float, accepted: bool) -> None:
        c = self.chargers.get(charger_id)
        if c is None or c.sent != value:
            return  # an answer to a superseded value
        c.accepted = accepted
        if accepted:
            c.holding = value
            c.tx_profile_held = c.transaction_id is not None
            c.profile_unknown = False
            if c.final_sent is not None:
                c.final_level = c.final_sent
        else:
            # Unknown what it holds now: re-send next decision; the envelope counts it at max.
            c.needs_resend = True

    def _end_session(self, c: ChargerState) -> None:
        if c.transaction_id is not None:
            c.ended_transaction_id = c.transaction_id
        c.transaction_id = None
        c.session_started_at = c.session_start_stamp = None
        self._end_demand(c)
        c.suspect_since = None
        c.on_since = c.off_since = None
        c.switches = 0
        c.clear_session_flags()
        # The TxProfile died with the transaction: the charger is back on its TxDefault.
        c.sent = c.tx_default
        c.holding = c.tx_default
        c.accepted = c.tx_default is not None
        c.expires_at = None
        c.final_level = c.final_sent = None

    @staticmethod
    def _end_demand(c: ChargerState) -> None:
        """What was set for a session (energy wanted, departure, priority) ends with it."""
        c.energy_requested_kwh = None
        c.departure = None
        # The operator's weight was this session's: the next car on the charger did not get it.
        c.priority = 1.0
        c.demand_set_at = None

    @classmethod
    def _take_preset_demand(cls, c: ChargerState, transaction_id: str, now_wall: float) -> None:
        """A session starts on a charger that had none: the demand set meanwhile is its own only
        if its departure is still ahead and it was set at most ``PRESET_DEMAND_S`` ago; else it
        is dropped (logged). Kept for good, a demand set for a car that never came went to the
        next car, hours later: a departure long past (the most urgent car there is), another
        car's energy (met: held at 0 A) and priority."""
        set_at = c.demand_set_at
        c.demand_set_at = None
        has = c.energy_requested_kwh is not None or c.departure is not None or c.priority != 1.0
        if not has:
            return
        why = None
        if c.departure is not None and not c.departure > now_wall:
            why = f"its departure ({c.departure:.0f}) passed {now_wall - c.departure:.0f} s ago"
        elif set_at is not None and now_wall - set_at > PRESET_DEMAND_S:
            why = f"set {now_wall - set_at:.0f} s before it, more than {PRESET_DEMAND_S:g} s"
        if why is None:
            return
        log.warning(
            "%s: the demand set while no car was there (energy %s kWh, departure %s, priority "
            "%g) dropped at the start of transaction %s: %s",
            c.charger_id,
            c.energy_requested_kwh,
            c.departure,
            c.priority,
            transaction_id,
            why,
        )
        cls._end_demand(c)

    def set_other_load(
        self, node_id: str, load_a: tuple[float, float, float], now_mono: float
    ) -> None:
        self.other_load_a[node_id] = (load_a, now_mono)
