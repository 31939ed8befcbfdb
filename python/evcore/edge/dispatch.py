"""Which of a decision's safe setpoints leave now, and in what order.

What this module owns: the deadband, decreases first, and holding increases until every pending
decrease has taken effect (accepted by its charger AND a meter reading taken after the acceptance
shows the charger at or below it, when it drew above it as the decrease left) or ``settle_s``
passed since it left (../shared/DOMAIN.md:
lower before you raise; a CALLRESULT Accepted only says the charger will apply the limit, within
a few seconds). Pure functions of their inputs; the controller re-decides when a decrease takes
effect or settles, so
a held increase is recomputed against the then-current state rather than sent stale.

What it must never do: change a value. Every value it returns is one the envelope produced in the
same decision. The deadband suppresses small *increases* only: the envelope sized everyone else's
headroom with this decision's lower value, so a decrease always leaves, however small.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

# Differences below this are float noise, not a change (A or W).
_EPS = 1e-6


class ChangeKind(StrEnum):
    DECREASE = "decrease"
    INCREASE = "increase"
    REFRESH = "refresh"


@dataclass(frozen=True, slots=True)
class Change:
    charger_id: str
    old: float | None  # what the charger holds or was last sent; None = unknown
    new: float
    kind: ChangeKind


@dataclass(frozen=True, slots=True)
class PendingDecrease:
    """A decrease that left and is not yet known to be in force."""

    charger_id: str
    sent_at_s: float  # clock.monotonic() when it left
    accepted: bool
    # Seen in force: accepted, and measured at or below its value after the acceptance.
    in_effect: bool = False
    value: float = 0.0  # the decreased limit (A per phase, or W for DC)
    accepted_at_s: float | None = None  # clock.monotonic() of the acceptance
    # Whether a meter reading at or below ``value`` can show the decrease in force: only when
    # the charger drew above it (fresh) when it left. A vehicle already drawing less (ramping up,
    # tapering) reads below the new limit while the old, higher one still applies and may rise
    # to it; then only ``settle_s`` settles the decrease.
    meter_proves: bool = True


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    decreases: tuple[Change, ...]
    increases: tuple[Change, ...]
    refreshes: tuple[Change, ...]
    held: tuple[Change, ...]  # increases withheld until the decreases settle

    @property
    def to_send(self) -> tuple[Change, ...]:
        """In sending order: decreases (largest first), refreshes, then increases."""
        return self.decreases + self.refreshes + self.increases

    def __len__(self) -> int:
        return len(self.decreases) + len(self.increases) + len(self.refreshes)


def wire_value(x: float, res: float) -> float:
    """The limit the charger receives for ``x``: rounded down to ``res`` (as the OCPP room does)."""
    return math.floor(x / res + 1e-9) * res


_wire = wire_value


def decreases_settled(pending: Collection[PendingDecrease], now_s: float, settle_s: float) -> bool:
    """True when no decrease is still on its way: each was seen in effect (accepted and measured
    at or below its value since) or ``settle_s`` has passed since it left. Acceptance alone is not
    enough: the charger applies the limit seconds later, and an increase applied before it would
    overload the feeder meanwhile."""
    return all(p.in_effect or now_s - p.sent_at_s >= settle_s for p in pending)


def next_settle_at(pending: Collection[PendingDecrease], settle_s: float) -> float | None:
    """When the last decrease not yet seen in effect settles by time (monotonic), or None."""
    waits = [p.sent_at_s + settle_s for p in pending if not p.in_effect]
    return max(waits) if waits else None


def plan_dispatch(
    safe: Mapping[str, float],
    current: Mapping[str, float | None],
    *,
    dc_ids: Collection[str] = (),
    deadband_a: float,
    deadband_w: float,
    pending: Collection[PendingDecrease] = (),
    now_s: float,
    settle_s: float,
    force: Collection[str] = (),
    hold: Collection[str] = (),
    resolution_a: float = 0.0,
    resolution_w: float = 0.0,
) -> DispatchPlan:
    """Split a decision's safe setpoints into what leaves now and what waits.

    ``safe``: the envelope's setpoints (A per phase for AC, W for DC). ``current``: per charger
    what it was last sent (pending or accepted); missing or None means unknown, which always sends.
    ``force``: chargers whose profile must be re-sent unchanged (reboot, reconnect, refresh).
    ``hold``: chargers whose increases wait regardless (one drawing above the limit it holds must
    not be raised to meet its draw: that would hide an ignored profile; withholding a rise is
    always safe, the envelope counted the higher value).
    Increases wait while a pending decrease (from earlier decisions or this one) is unsettled.
    ``resolution_a``/``_w``: what the charger can be told (the central system rounds limits DOWN to
    it); two values that round to the same limit are the same limit on the wire, so no change.
    """
    decreases: list[Change] = []
    increases: list[Change] = []
    refreshes: list[Change] = []
    for cid, new in safe.items():
        old = current.get(cid)
        dc = cid in dc_ids
        band = deadband_w if dc else deadband_a
        res = resolution_w if dc else resolution_a
        if old is None:
            # Unknown: the charger may hold anything up to its max; sending is always a decrease
            # of what the envelope counted.
            decreases.append(Change(cid, None, new, ChangeKind.DECREASE))
            continue
        # Compare what the charger would be told; the value sent stays the envelope's.
        w_old, w_new = (_wire(old, res), _wire(new, res)) if res > 0 else (old, new)
        if w_new < w_old - _EPS:
            decreases.append(Change(cid, old, new, ChangeKind.DECREASE))
        elif w_new > w_old + _EPS and (w_new - w_old > band or w_old <= _EPS):
            # Leaving zero is a switch, never noise: it is not held back by the deadband.
            increases.append(Change(cid, old, new, ChangeKind.INCREASE))
        elif cid in force:
            # Unchanged (or an increase inside the deadband): re-send what the charger holds.
            refreshes.append(Change(cid, old, old, ChangeKind.REFRESH))
    decreases.sort(key=lambda c: -(c.old - c.new) if c.old is not None else float("-inf"))
    held = [c for c in increases if c.charger_id in hold]
    if held:
        increases = [c for c in increases if c.charger_id not in hold]
    if decreases or not decreases_settled(pending, now_s, settle_s):
        held, increases = held + increases, []
    return DispatchPlan(tuple(decreases), tuple(increases), tuple(refreshes), tuple(held))
