"""Fleet curtailments: a limit on the total power of several sites ("A, B and C together at most
900 kW from 17:00 to 19:00"), split into one ``Curtailment`` per site at its grid connection and
published on each site's ``evcore.<site>.grid`` subject (docs/cloud.md "Fleet curtailments").

What this module owns: the split rule (:func:`split_fleet_limit`, a pure function), each site's
inputs to it from the cloud store (:func:`site_inputs`: grid limit and floor from the site's latest
topology, demand from its latest telemetry), the order a revision's signals go out in
(:func:`plan_revision`, break before make: decreases first, an increase only once every decrease
was taken by its edge and ``ramp_s`` passed), and the book of fleet curtailments
(:class:`FleetCoordinator`: validate, split, store the revision, publish, re-split, cancel).
It never decides a setpoint: each edge's envelope still does, under the limit it is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from evcore.api.convert import timestamp
from evcore.bus.api import Bus, BusError
from evcore.bus.subjects import Subjects
from evcore.clock import Clock
from evcore.cloud.sitebuses import OUTBOX_FAILURES, SiteBusUnavailable, outbox_of
from evcore.cloud.store import CloudStore, FleetRevisionConflict, FleetSiteSignal
from evcore.cloud.topology import site_from_topology
from evcore.errors import SiteConfigError
from evcore.site import Site
from evcore.store.base import StoreUnavailable
from evcore.store.sql import ts_s
from evcore.v1.fleet_api_pb2 import (
    DemandSource,
    FleetCurtailment,
    FleetCurtailmentResult,
    ListSitesResponse,
    SiteFleetShare,
    SiteShare,
    SiteStatus,
)
from evcore.v1.grid_pb2 import Curtailment, GridSignal
from evcore.v1.meter_pb2 import MeterSample

log = logging.getLogger("evcore.cloud.fleet")

#: Telemetry older than this (before the split) is not a site's current demand.
DEFAULT_DEMAND_WINDOW_S = 900.0
#: Telemetry dated later than the cloud's clock plus this (an edge clock ahead) is ignored.
FUTURE_SAMPLE_SKEW_S = 300.0
#: A re-split is due when a site's demand moved by this share of what the split used ...
DEFAULT_RESPLIT_CHANGE_RATIO = 0.2
#: ... and by at least this much (small sites' noise does not re-split a fleet).
DEFAULT_RESPLIT_MIN_KW = 5.0
#: A charger drawing at least this share of what it is offered is held back by its offer: its car
#: would take more, so it counts at the charger's maximum (see ``site_demand_kw``).
HELD_AT_OFFER_RATIO = 0.9
#: After the last decrease of a revision was taken by its edge, its chargers get this long to come
#: down before the revision's increases go out (``[fleet] ramp_s``; the edge's settle time scale).
DEFAULT_RAMP_S = 30.0
#: While increases wait, the edges' acknowledgements are looked at this often.
DEFAULT_CONFIRM_EVERY_S = 1.0
#: An edge that has taken no signal sent to it this long (``[fleet] ack_timeout_s``) is no longer
#: waited for: the next split counts its site at what it may still hold and shares only the rest.
DEFAULT_ACK_TIMEOUT_S = 120.0
#: While a split counts a site at what it may hold, whether its edge came back is looked at this
#: often (it then is split again the normal way).
COUNTED_CHECK_EVERY_S = 10.0
#: A signal the outbox took whose site stream still does not hold it this long after is sent
#: again (the same event id: JetStream's duplicate window drops a true duplicate).
RESEND_UNSTORED_S = 30.0
#: The durable consumer each edge reads its grid subject with (evcore.edge.signals.GRID_DURABLE):
#: its acknowledgement says the edge applied (and stored) a signal.
EDGE_GRID_DURABLE = "edge-grid"
_ID_MAX = 200
#: An issuer is a name ("DSO Nord"): one the bus could never carry in a signal (above the broker's
#: max_payload) was stored as a revision and then failed to publish on every round.
_ISSUER_MAX = 200
#: Shares are whole watts: a difference below this is no change.
_KW_EPS = 1e-6


class FleetInputError(ValueError):
    """A fleet curtailment request is wrong; the message starts with the field it names."""


class FleetNotFound(LookupError):
    """No fleet curtailment with that id is held."""


class FleetNotActive(Exception):
    """The fleet curtailment to re-split is cancelled or its window has ended: the request is
    well formed, the curtailment's state refuses it (send Curtail again)."""


class FleetInfeasible(Exception):
    """The sites' floors alone exceed the fleet limit and the request said ``require_feasible``."""


# -- the split rule -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteInputs:
    """What the split needs of one site (kW throughout)."""

    site_id: str
    node_id: str  # the grid connection (root) node the site's Curtailment applies to
    grid_limit_kw: float  # most the site can take at all
    floor_kw: float  # least it must be given: what it cannot shed
    demand_kw: float  # its charging demand: the weight of its part of the rest
    demand_source: DemandSource.ValueType = DemandSource.DEMAND_SOURCE_UNSPECIFIED
    topology_version: int = 0


@dataclass(frozen=True)
class Split:
    max_kw: dict[str, float]  # per site
    feasible: bool
    shortfall_kw: float  # sum of max_kw above the fleet limit (0 when feasible)


def _round_down_w(kw: float) -> float:
    """Down to whole watts, so the shares cannot add up to more than they were computed at."""
    return math.floor(kw * 1000.0) / 1000.0


def split_fleet_limit(limit_kw: float, sites: Sequence[SiteInputs]) -> Split:
    """Weighted water-filling of ``limit_kw`` over ``sites``.

    1. Every site gets its floor (capped at its grid limit). If the floors add up to more than
       the limit, every site stays at its floor and the split is infeasible (the shortfall says by
       how much): nothing more can be shed without cutting load the chargers do not control.
    2. The rest is shared in proportion to demand, each site at most its grid limit: the water
       level ``λ`` rises until ``Σ min(headroom_i, λ·demand_i)`` takes the rest or every site with
       demand is full.
    3. What is still left (every site with demand is at its grid limit) is shared in proportion to
       the remaining headroom of all sites, so a site with no demand now can still start charging.
    """
    if not math.isfinite(limit_kw) or limit_kw < 0:
        raise FleetInputError(f"max_kw: must be a finite number >= 0, got {limit_kw!r}")
    for s in sites:
        # An infinite headroom with no demand would share the rest as inf x 0 = NaN.
        for name, value in (
            ("grid_limit_kw", s.grid_limit_kw),
            ("floor_kw", s.floor_kw),
            ("demand_kw", s.demand_kw),
        ):
            if not math.isfinite(value):
                raise FleetInputError(f"site {s.site_id!r}: {name} is not finite ({value!r})")
    floors = {s.site_id: min(max(s.floor_kw, 0.0), max(s.grid_limit_kw, 0.0)) for s in sites}
    floor_sum = sum(floors.values())
    if floor_sum > limit_kw:
        return Split(dict(floors), False, floor_sum - limit_kw)
    headroom = {s.site_id: max(s.grid_limit_kw, 0.0) - floors[s.site_id] for s in sites}
    share = dict.fromkeys(headroom, 0.0)
    rest = limit_kw - floor_sum
    # Stage 2: water-filling by demand, saturating sites at their headroom one round at a time.
    active = {s.site_id: s.demand_kw for s in sites if s.demand_kw > 0 and headroom[s.site_id] > 0}
    while active and rest > 1e-12:
        level = rest / sum(active.values())
        full = [sid for sid, w in active.items() if level * w >= headroom[sid]]
        if not full:
            for sid, w in active.items():
                share[sid] = level * w
            rest = 0.0
            break
        for sid in full:
            share[sid] = headroom[sid]
            rest -= headroom[sid]
            del active[sid]
    # Stage 3: what no site with demand can take, by remaining headroom.
    if rest > 1e-12:
        remaining = {sid: headroom[sid] - share[sid] for sid in share}
        total = sum(remaining.values())
        if total > 0:
            fill = min(1.0, rest / total)
            for sid, r in remaining.items():
                share[sid] += r * fill
    return Split({sid: floors[sid] + _round_down_w(share[sid]) for sid in floors}, True, 0.0)


# -- each site's inputs ---------------------------------------------------------------------------
def root_node_id(site: Site) -> str:
    return next(n.id for n in site.nodes if n.parent is None)


def grid_limit_kw(site: Site) -> float:
    """The grid connection's ``power_limit_kw``; its phase limits × the phase voltage when it has
    none; the lower of the two when it has both. ``FleetInputError`` naming the site when that is
    not a finite number (phase limits of 1e306 A overflow to inf)."""
    root = next(n for n in site.nodes if n.parent is None)
    by_phase = sum(root.phase_limit_a) * site.voltage_ln_v / 1000.0
    limit = by_phase if root.power_limit_kw is None else min(root.power_limit_kw, by_phase)
    if not math.isfinite(limit):
        raise FleetInputError(
            f"site {site.id!r}: grid connection {root.id!r}: its limit "
            f"(power_limit_kw {root.power_limit_kw!r}, phase_limit_a {list(root.phase_limit_a)!r}"
            f" x voltage_ln_v {site.voltage_ln_v!r}) is not a finite number of kW"
        )
    return limit


def floor_kw(site: Site) -> float:
    """Non-charger load the chargers cannot shed: every node's ``other_load_max_a`` (load at that
    node itself, so they add up at the grid connection) × the phase voltage, capped at the grid
    limit (so an overflow to inf is capped too)."""
    amps = sum(sum(n.other_load_max_a) for n in site.nodes)
    kw = amps * site.voltage_ln_v / 1000.0
    limit = grid_limit_kw(site)
    return limit if math.isnan(kw) else min(kw, limit)


def installed_kw(site: Site) -> dict[str, float]:
    """Per charger the most it draws from the grid: AC max_a × voltage per conductor pair (× 3
    three-phase), DC max_w / efficiency + aux_w."""
    out: dict[str, float] = {}
    for c in site.chargers:
        if c.kind == "dc":
            eff = c.efficiency or 1.0
            out[c.id] = ((c.max_w or 0.0) / eff + (c.aux_w or 0.0)) / 1000.0
        else:
            legs = 3 if c.wiring == "three_phase" else 1
            out[c.id] = c.max_a * c.voltage_v * legs / 1000.0
    return out


def _sample_kw(sample: MeterSample, voltage_ln_v: float) -> float:
    """What the sample says the charger draws; may be inf or NaN (1e200 A at 1e200 V)."""
    if sample.HasField("power_w") and math.isfinite(sample.power_w):
        return max(sample.power_w, 0.0) / 1000.0
    volts = list(sample.voltage_v)
    total = 0.0
    for i, amps in enumerate(sample.current_a):
        v = volts[i] if i < len(volts) and math.isfinite(volts[i]) else voltage_ln_v
        if math.isfinite(amps):
            total += max(amps, 0.0) * v
    return total / 1000.0


def site_demand_kw(site: Site, samples: dict[str, MeterSample]) -> float:
    """The site's charging demand from each charger's newest sample: what it draws, or the
    charger's maximum when it draws at least 90 % of the current it is offered (the offer holds it
    back, so what it draws under an earlier curtailment understates what its car would take).
    Each charger counts at most its installed maximum (a figure above it is a bad reading, not
    demand); a sample whose figures overflow (inf, NaN) is missing, and so is a charger the
    site's topology does not have (no share of the site can reach it)."""
    installed = installed_kw(site)
    total = 0.0
    for cid, sample in samples.items():
        if cid not in installed:
            continue
        kw = _sample_kw(sample, site.voltage_ln_v)
        if not math.isfinite(kw):
            log.warning(
                "fleet: site %r charger %r: sample figures overflow (%r kW); ignored",
                site.id,
                cid,
                kw,
            )
            continue
        kw = min(kw, installed[cid])
        amps = [a for a in sample.current_a if math.isfinite(a)]
        if (
            sample.HasField("offered_current_a")
            and sample.offered_current_a > 0
            and amps
            and max(amps) >= HELD_AT_OFFER_RATIO * sample.offered_current_a
        ):
            kw = max(kw, installed[cid])
        total += kw
    return total


async def site_inputs(
    store: CloudStore, site_id: str, *, now_s: float, demand_window_s: float
) -> SiteInputs:
    """A site's split inputs from its latest topology and telemetry in the cloud store.
    ``FleetInputError`` when the site has put no topology."""
    held = await store.topology(site_id)
    if held is None:
        raise FleetInputError(f"unknown site {site_id!r} (it has put no topology to the cloud)")
    site = await asyncio.to_thread(site_from_topology, held.topology)
    limit = grid_limit_kw(site)
    floor = floor_kw(site)
    samples = await store.latest_samples(
        site_id, since_s=now_s - demand_window_s, until_s=now_s + FUTURE_SAMPLE_SKEW_S
    )
    if samples:
        demand, source = site_demand_kw(site, samples), DemandSource.DEMAND_SOURCE_TELEMETRY
    else:
        demand = min(sum(installed_kw(site).values()), max(limit - floor, 0.0))
        source = DemandSource.DEMAND_SOURCE_INSTALLED
    return SiteInputs(site_id, root_node_id(site), limit, floor, demand, source, held.version)


# -- publishing -----------------------------------------------------------------------------------
def site_curtailment_id(fleet_curtailment_id: str, site_id: str) -> str:
    """The same for every split of one fleet curtailment at one site, so a re-split replaces the
    site's earlier curtailment (the edge's CurtailmentBook keeps one per id)."""
    return f"fleet:{fleet_curtailment_id}:{site_id}"


def event_id(share: SiteShare, revision: int) -> str:
    """One event id per revision and site: JetStream's duplicate window would drop a re-split
    published under the id of the split it replaces."""
    return f"{share.curtailment_id}#r{revision}"


#: How much later than the previous revision's a revision is issued when the clock says otherwise.
ISSUE_STEP_NS = 1_000


def issue_time(now_s: float, previous: FleetCurtailmentResult | None) -> Timestamp:
    """The ``split_at`` (the GridSignals' ``issued_at``) of a new revision or cancel: ``now_s``,
    but never earlier than 1 µs after the previous revision's (the edge ignores a revision issued
    before the one it holds; a wall clock stepped back must not make a newer one look older).
    The previous revision comes from the store, so this holds across cloud restarts."""
    ts = timestamp(now_s)
    if previous is None or not previous.HasField("split_at"):
        return ts
    p = previous.split_at
    floor_ns = p.seconds * 1_000_000_000 + p.nanos + ISSUE_STEP_NS
    if ts.seconds * 1_000_000_000 + ts.nanos >= floor_ns:
        return ts
    out = Timestamp()
    secs, nanos = divmod(floor_ns, 1_000_000_000)
    out.seconds = secs
    out.nanos = nanos
    return out


class GridPublisher(Protocol):
    async def publish_grid(self, site_id: str, signal: GridSignal, *, event_id: str) -> None:
        """Accept ``signal`` for ``evcore.<site>.grid`` durably (it is sent when the broker can)."""
        ...

    async def taken(self, site_id: str, event_id: str) -> bool:
        """Whether the site's edge (its durable consumer ``edge-grid``) has acknowledged the
        signal published under ``event_id``; False when that cannot be known now."""
        ...

    async def stored(self, site_id: str, event_id: str) -> bool:
        """Whether the site's stream holds the signal published under ``event_id``; True when
        that cannot be known now (it is then not sent again)."""
        ...


class BusGridPublisher:
    """Publishes on each site's own bus, as ``open_bus`` gives it (``SiteBuses.get``: started,
    opened once per site, closed by its owner; ``SiteBusUnavailable`` when it cannot be
    started). A bus whose outbox cannot take a signal is ``SiteBusUnavailable`` naming the site
    and the outbox (an outage: UNAVAILABLE over gRPC, not a bug)."""

    def __init__(self, open_bus: Callable[[str], Awaitable[Bus]]) -> None:
        self._bus = open_bus

    async def publish_grid(self, site_id: str, signal: GridSignal, *, event_id: str) -> None:
        bus = await self._bus(site_id)
        try:
            # Critical: durable in the outbox on return, sent in order, never dropped.
            await bus.publish(Subjects(site_id).grid, signal, event_id=event_id, critical=True)
        except OUTBOX_FAILURES as exc:
            raise SiteBusUnavailable(
                f"bus of site {site_id!r} unavailable: {outbox_of(bus)} cannot take the signal: "
                f"{exc}"
            ) from exc

    async def taken(self, site_id: str, event_id: str) -> bool:
        try:
            bus = await self._bus(site_id)
            state = await bus.ack_state(Subjects(site_id).grid, event_id, durable=EDGE_GRID_DURABLE)
        except (BusError, SiteBusUnavailable) as exc:
            # A bus that cannot be started raised here, so ListSites and a Curtail or Resplit
            # naming the site failed as a whole (INTERNAL) instead of not knowing.
            log.debug("fleet: cannot tell whether %s took %s: %s", site_id, event_id, exc)
            return False
        return state.acknowledged

    async def stored(self, site_id: str, event_id: str) -> bool:
        try:
            bus = await self._bus(site_id)
            state = await bus.ack_state(Subjects(site_id).grid, event_id, durable=EDGE_GRID_DURABLE)
        except (BusError, SiteBusUnavailable):
            return True
        return state.stored


# -- break before make ----------------------------------------------------------------------------
def may_hold_kw(signals: Sequence[FleetSiteSignal]) -> float:
    """The most a site's edge may hold from one fleet curtailment, from the signals published to
    it (any order): walking back from the newest to the newest one its edge took, the highest of
    them (a cancel: no limit). Before any was taken it may hold no limit from it (``inf``)."""
    bound = 0.0
    for sig in sorted(signals, key=lambda x: x.revision, reverse=True):
        bound = max(bound, math.inf if sig.max_kw is None else sig.max_kw)
        if sig.taken_at_s is not None:
            return bound
    return math.inf


def pending_since_s(signals: Sequence[FleetSiteSignal]) -> float | None:
    """When the oldest signal for a site that its edge has not taken was recorded to go out
    (walking back from the newest to the newest one taken); None when it took the newest one.
    One its outbox never accepted counts too: an edge whose signals cannot be published (its
    outbox failing) takes nothing either, and must not hold back the other sites for longer
    than one that is offline."""
    since: float | None = None
    for sig in sorted(signals, key=lambda x: x.revision, reverse=True):
        if sig.taken_at_s is not None:
            break
        since = sig.published_at_s if since is None else min(since, sig.published_at_s)
    return since


def counted_kw(bound_kw: float, grid_limit_kw: float) -> float:
    """What a site whose edge has not taken its signal is counted at: what it may hold, at most
    its grid limit (its edge keeps the site within it under no limit from the fleet too; 0 is an
    unknown limit, not a bound)."""
    return min(bound_kw, grid_limit_kw) if grid_limit_kw > 0 else bound_kw


def as_at(signals: Sequence[FleetSiteSignal], revision: int, at_s: float) -> list[FleetSiteSignal]:
    """The signals of revisions before ``revision`` as the cloud knew them at ``at_s`` (one first
    seen taken later counts as not taken)."""
    return [
        sig
        if sig.taken_at_s is None or sig.taken_at_s <= at_s
        else dataclasses.replace(sig, taken_at_s=None)
        for sig in signals
        if sig.revision < revision
    ]


def counted_sites(
    shares: dict[str, tuple[float, float]],
    signals: Sequence[FleetSiteSignal],
    *,
    at_s: float,
    ack_timeout_s: float,
) -> dict[str, float]:
    """The sites a split at ``at_s`` counts at what they may still hold instead of their share
    (``shares``: site -> (its share by the split rule, its grid limit)): those whose edge has
    taken no signal sent ``ack_timeout_s`` or longer before (offline, broken) and whose share
    would be below that. Such an edge may never take the decrease; counting it at what it may
    hold keeps the fleet limit while the other sites' increases go on without it."""
    by_site: dict[str, list[FleetSiteSignal]] = {}
    for sig in signals:
        by_site.setdefault(sig.site_id, []).append(sig)
    out: dict[str, float] = {}
    for sid, (share_kw, grid_kw) in shares.items():
        mine = by_site.get(sid, [])
        since = pending_since_s(mine)
        if since is None or at_s - since < ack_timeout_s:
            continue
        kw = counted_kw(may_hold_kw(mine), grid_kw)
        if math.isfinite(kw) and share_kw < kw - _KW_EPS:
            out[sid] = kw
    return out


def counted_in(
    result: FleetCurtailmentResult, signals: Sequence[FleetSiteSignal], *, ack_timeout_s: float
) -> dict[str, float]:
    """The sites ``result`` (a split, not a cancel) was split counting at what they may hold
    (:func:`counted_sites` as the cloud knew the signals at its ``split_at``)."""
    if result.cancelled:
        return {}
    at_s = ts_s(result.split_at)
    return counted_sites(
        {sh.site_id: (sh.max_kw, sh.grid_limit_kw) for sh in result.shares},
        as_at(signals, int(result.revision), at_s),
        at_s=at_s,
        ack_timeout_s=ack_timeout_s,
    )


@dataclass
class RevisionPlan:
    """What of a revision may be published now (:func:`plan_revision`)."""

    # Sites without a signal of this revision whose signal does not raise what they may hold:
    # (share, cancelled, lowered). Published at once.
    send_now: list[tuple[SiteShare, bool, bool]] = field(default_factory=list)
    # Sites without a signal of this revision whose share is above what they may hold.
    increases: list[SiteShare] = field(default_factory=list)
    # Of those, the ones whose held signal's window does not hold the revision's (a DSO moved
    # the end later or the start earlier): (share, the max_kw of the newest signal sent to the
    # site). Each gets at once an interim signal with the revision's window and that max_kw (not
    # an increase), so it keeps a cap for the whole new window while its increase waits.
    interims: list[tuple[SiteShare, float]] = field(default_factory=list)
    # Sites of the revision that may still hold more than their share: their decrease is not
    # taken yet. The increases wait for every one ...
    waiting_for: list[str] = field(default_factory=list)
    # ... unless, each of them counted at what it may hold (``counted_kw``) and every other site
    # at its share, the revision stays within the fleet limit (a split that counted an edge that
    # took nothing for ``ack_timeout_s``): then they are here, with what each is counted at.
    counted: dict[str, float] = field(default_factory=dict)
    # The latest time a decrease of these sites was taken, + ramp_s (None: none taken).
    ramp_until_s: float | None = None

    def increases_may_go(self, now_s: float) -> bool:
        return not self.waiting_for and (self.ramp_until_s is None or self.ramp_until_s <= now_s)


def _window_holds(sig: FleetSiteSignal, start_s: float, end_s: float) -> bool:
    """Whether the window ``sig`` carried holds ``[start_s, end_s]`` (unknown: it does not)."""
    if sig.start_s is None or sig.end_s is None:
        return False
    return sig.start_s <= start_s + _TS_EPS_S and end_s <= sig.end_s + _TS_EPS_S


#: The interim signal of a revision is issued this much before the revision (``split_at``): after
#: every earlier revision (at least ``ISSUE_STEP_NS`` before), before the revision's own signals,
#: so the edge can never let an interim replace the raise that follows it. 500 ns is two float64
#: steps at today's epoch seconds (the edge compares ``issued_at`` as a float).
INTERIM_LEAD_NS = 500
_TS_EPS_S = 1e-6


def plan_revision(
    result: FleetCurtailmentResult,
    signals: Sequence[FleetSiteSignal],
    *,
    ramp_s: float,
) -> RevisionPlan:
    """Break before make. A site's signal in ``result`` goes out at once when it does not raise
    what the site may hold (:func:`may_hold_kw`: a decrease, the same share, a site new to the
    fleet curtailment (from no limit), a cancel, a dropped site's cancel). An increase goes out
    only once every other site of the revision holds at most its share (its decrease was taken by
    its edge) and ``ramp_s`` passed since the last decrease was taken; until then the site keeps
    what it holds (with the revision's window when that is not inside the window it holds: see
    ``RevisionPlan.interims``). The increases need not wait for sites whose decrease is not taken
    when, those counted at what they may hold, the revision is still within the fleet limit (a
    split that counted them: ``RevisionPlan.counted``). So at every moment the sum over the sites
    of the most each may hold is at most the fleet limit (the higher of the old and the new while
    a new limit replaces an old one)."""
    rev = int(result.revision)
    start_s, end_s = ts_s(result.curtailment.start), ts_s(result.curtailment.end)
    by_site: dict[str, list[FleetSiteSignal]] = {}
    for sig in signals:
        by_site.setdefault(sig.site_id, []).append(sig)
    plan = RevisionPlan()
    for sh in result.dropped_shares:
        if not any(x.revision == rev for x in by_site.get(sh.site_id, [])):
            plan.send_now.append((sh, True, False))
    last_taken: float | None = None
    for sh in result.shares:
        held = by_site.get(sh.site_id, [])
        for x in held:
            if x.lowered and x.taken_at_s is not None:
                last_taken = max(last_taken or x.taken_at_s, x.taken_at_s)
        bound = may_hold_kw(held)
        if any(x.revision == rev for x in held):
            if not result.cancelled and bound > sh.max_kw + _KW_EPS:
                plan.waiting_for.append(sh.site_id)
            continue
        if result.cancelled:
            plan.send_now.append((sh, True, False))
        elif sh.max_kw <= bound + _KW_EPS:
            lowered = sh.max_kw < bound - _KW_EPS
            plan.send_now.append((sh, False, lowered))
            if lowered:
                plan.waiting_for.append(sh.site_id)
        else:
            plan.increases.append(sh)
            newest = max(held, key=lambda x: x.revision)  # held: bound is finite
            if newest.max_kw is not None and not _window_holds(newest, start_s, end_s):
                plan.interims.append((sh, newest.max_kw))
    if last_taken is not None:
        plan.ramp_until_s = last_taken + ramp_s
    if plan.waiting_for and not result.cancelled:
        waiting = set(plan.waiting_for)
        counted = {
            sh.site_id: counted_kw(may_hold_kw(by_site.get(sh.site_id, [])), sh.grid_limit_kw)
            for sh in result.shares
            if sh.site_id in waiting
        }
        total = sum(counted.values()) + sum(
            sh.max_kw for sh in result.shares if sh.site_id not in waiting
        )
        if total <= result.curtailment.max_kw + _KW_EPS:
            plan.counted, plan.waiting_for = counted, []
    return plan


@dataclass
class Progress:
    """Where a revision's publication stands after :meth:`FleetCoordinator.advance`."""

    sent: int = 0  # signals the outbox accepted in this call
    done: bool = False  # every signal of the revision is published
    plan: RevisionPlan = field(default_factory=RevisionPlan)

    def note(self, ramp_s: float) -> str:
        p = self.plan
        if not p.increases:
            return ""
        who = ", ".join(sh.site_id for sh in p.increases)
        if p.waiting_for:
            return (
                f"increases at {who} wait until the decreases at {', '.join(p.waiting_for)} "
                f"are taken by their edges, then {ramp_s:g} s"
            )
        return f"increases at {who} wait for the ramp after the decreases"


_Signals = list[FleetSiteSignal]


# -- the book -------------------------------------------------------------------------------------
def check_fleet_curtailment_id(fid: str) -> None:
    """``FleetInputError`` for an id no fleet curtailment can have (Curtail refuses it, so
    Resplit and Cancel do too: PostgreSQL cannot even look up text holding a NUL)."""
    if not fid:
        raise FleetInputError("fleet_curtailment_id: is required")
    if len(fid) > _ID_MAX or any(not ch.isprintable() for ch in fid):
        raise FleetInputError(
            f"fleet_curtailment_id: must be printable and at most {_ID_MAX} characters"
        )


def check_site_ids(site_ids: Sequence[str]) -> None:
    """``FleetInputError`` naming the first site id that no site can have: one holding a NUL,
    which PostgreSQL cannot look up (it was INTERNAL there, a plain unknown site on SQLite)."""
    for i, sid in enumerate(site_ids):
        if "\x00" in sid:
            raise FleetInputError(f"site_ids[{i}]: a site id cannot hold a NUL character")


def validate_request(req: FleetCurtailment, *, now_s: float) -> None:
    """``FleetInputError`` naming the field for a request that cannot be split."""
    check_fleet_curtailment_id(req.fleet_curtailment_id)
    if not req.site_ids:
        raise FleetInputError("site_ids: name at least one site")
    seen: set[str] = set()
    for i, sid in enumerate(req.site_ids):
        if not sid:
            raise FleetInputError(f"site_ids[{i}]: is empty")
        if sid in seen:
            raise FleetInputError(f"site_ids[{i}]: site {sid!r} is named twice")
        seen.add(sid)
    check_site_ids(req.site_ids)
    if len(req.issuer) > _ISSUER_MAX or any(not ch.isprintable() for ch in req.issuer):
        raise FleetInputError(f"issuer: must be printable and at most {_ISSUER_MAX} characters")
    if not math.isfinite(req.max_kw) or req.max_kw < 0:
        raise FleetInputError(f"max_kw: must be a finite number >= 0, got {req.max_kw!r}")
    if not req.HasField("start"):
        raise FleetInputError("start: is required")
    if not req.HasField("end"):
        raise FleetInputError("end: is required")
    start, end = ts_s(req.start), ts_s(req.end)
    if end <= start:
        raise FleetInputError(f"end: must be after start ({end} <= {start})")
    if end <= now_s:
        raise FleetInputError(f"end: has passed ({end} <= now {now_s})")


def _raise_if_cancelled() -> None:
    """Raise ``CancelledError`` when the current task was cancelled but went on: Python 3.11's
    ``asyncio.wait_for`` (in the bus client) can swallow a cancel that lands as its call ends,
    and a background task would then sleep on the clock for good while its owner awaits it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _raise_failures(failures: Sequence[tuple[str, Exception]], *, note: str = "") -> None:
    """Raise for the sites whose signal could not go out (nothing when none failed): a bug (not
    ``SiteBusUnavailable``) as it is; otherwise one ``SiteBusUnavailable`` naming every failed
    site (only the first was named, so the operator could not tell which others to check), with
    ``note`` after it."""
    if not failures:
        return
    for _, exc in failures:
        if not isinstance(exc, SiteBusUnavailable):
            raise exc
    what = "; ".join(str(exc) for _, exc in failures)
    if len(failures) > 1:
        what = f"{len(failures)} sites' buses unavailable: {what}"
    raise SiteBusUnavailable(f"{what}; {note}" if note else what) from failures[0][1]


class FleetCoordinator:
    """Splits, re-splits and cancels fleet curtailments; every split is stored as a new revision
    before its per-site curtailments are published."""

    def __init__(
        self,
        store: CloudStore,
        publisher: GridPublisher,
        *,
        clock: Clock,
        demand_window_s: float = DEFAULT_DEMAND_WINDOW_S,
        resplit_change_ratio: float = DEFAULT_RESPLIT_CHANGE_RATIO,
        resplit_min_kw: float = DEFAULT_RESPLIT_MIN_KW,
        ramp_s: float = DEFAULT_RAMP_S,
        confirm_every_s: float = DEFAULT_CONFIRM_EVERY_S,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
    ) -> None:
        if not (math.isfinite(ramp_s) and ramp_s >= 0):
            raise ValueError(f"ramp_s must be a finite number >= 0, got {ramp_s!r}")
        if not (math.isfinite(ack_timeout_s) and ack_timeout_s > 0):
            raise ValueError(f"ack_timeout_s must be a finite number > 0, got {ack_timeout_s!r}")
        self._store = store
        self._publisher = publisher
        self._clock = clock
        self._demand_window_s = demand_window_s
        self._resplit_change_ratio = resplit_change_ratio
        self._resplit_min_kw = resplit_min_kw
        self._lock = asyncio.Lock()
        self.ramp_s = ramp_s
        self.confirm_every_s = confirm_every_s
        self.ack_timeout_s = ack_timeout_s
        # Set when a revision leaves increases waiting: the republish task looks more often.
        self._wake = asyncio.Event()
        self._waiting = False
        # A published split counts a site at what it may hold: look whether it came back.
        self._counting = False
        # (fleet curtailment, site, revision) whose interim signal went out in this run.
        self._interims_out: set[tuple[str, str, int]] = set()
        # event id -> when it was last sent again (_resend_if_lost).
        self._resent: dict[str, float] = {}
        # Awaited between storing a revision and publishing it (tests inject a crash there).
        self.after_store: Callable[[FleetCurtailmentResult], Awaitable[None]] | None = None

    async def _material_change(self, held: FleetCurtailmentResult, now_s: float) -> str | None:
        """Why ``held`` should be split again now (a site's demand moved by at least
        ``resplit_change_ratio`` of what the split used and ``resplit_min_kw``, or its topology
        changed); None when it should not."""
        for sh in held.shares:
            try:
                cur = await site_inputs(
                    self._store, sh.site_id, now_s=now_s, demand_window_s=self._demand_window_s
                )
            except FleetInputError:
                continue
            if cur.topology_version != sh.topology_version:
                return f"site {sh.site_id!r} put topology version {cur.topology_version}"
            moved = abs(cur.demand_kw - sh.demand_kw)
            if moved >= max(self._resplit_min_kw, self._resplit_change_ratio * sh.demand_kw):
                return f"site {sh.site_id!r} demand {sh.demand_kw:.3f} -> {cur.demand_kw:.3f} kW"
        return None

    async def resplit_changed(self) -> list[FleetCurtailmentResult]:
        """Split again every held fleet curtailment that has not ended and whose sites' demand or
        topology changed materially since its split; returns the new splits."""
        now = self._clock.now()
        out: list[FleetCurtailmentResult] = []
        for held in await self._store.fleet_curtailments():
            fid = held.curtailment.fleet_curtailment_id
            if ts_s(held.curtailment.end) <= now:
                continue
            # One fleet curtailment's failure (a site's bad figures, an outbox error) is logged
            # with its id and stops no later one; an unreachable store stops the round.
            try:
                why = await self._material_change(held, now)
                if why is None:
                    continue
                log.info("fleet: %s re-split: %s", fid, why)
                out.append(await self.resplit(fid))
            except StoreUnavailable:
                raise
            except (FleetInputError, FleetNotActive, FleetNotFound, FleetRevisionConflict) as exc:
                log.warning("fleet: %s re-split skipped: %s", fid, exc)
            except Exception:
                log.exception("fleet: %s re-split failed", fid)
        return out

    async def run_resplits(self, every_s: float) -> None:
        """Check for material changes every ``every_s`` until cancelled (the server owns it)."""
        while True:
            await self._clock.sleep(every_s)
            try:
                await self.resplit_changed()
            except StoreUnavailable as exc:
                log.warning("fleet: re-split check skipped, store unavailable: %s", exc)
            except Exception:
                log.exception("fleet: re-split check failed")
            _raise_if_cancelled()

    async def republish_pending(self) -> list[FleetCurtailmentResult]:
        """Take every fleet curtailment whose latest revision is not all published, unless its
        window has ended, one step further (:meth:`advance`): signals stored but not accepted by
        the outbox (the cloud stopped, or publishing failed, after the store) go out again, and
        increases go out once their revision's decreases were taken and ``ramp_s`` passed.
        Returns them. Idempotent for the edges: the same curtailment ids (replaced by id) and the
        revision's event ids (JetStream drops repeats in its window)."""
        # What the edges took is asked of the bus before taking the lock: a slow broker holds
        # back no Curtail or Cancel of any fleet curtailment (the store records what it learns).
        now = self._clock.now()
        unpublished = await self._store.unpublished_fleet_curtailments(now_s=now)
        held = [
            r
            for r in await self._store.fleet_curtailments()
            if ts_s(r.curtailment.end) > now and not r.cancelled
        ]
        to_ask = {r.curtailment.fleet_curtailment_id: r for r in unpublished if not r.cancelled}
        for result in held:
            to_ask.setdefault(result.curtailment.fleet_curtailment_id, result)
        counting = False
        for fid, result in to_ask.items():
            try:
                signals = await self._store.fleet_site_signals(fid)
                sites = [sh.site_id for sh in result.shares]
                if not any(r.curtailment.fleet_curtailment_id == fid for r in unpublished):
                    # Published: whether the edges of the sites it counts came back, and whether
                    # the others took what was sent (one that does not for ack_timeout_s is
                    # counted at what it may hold: ``_resplit_due``).
                    counted = counted_in(result, signals, ack_timeout_s=self.ack_timeout_s)
                    untaken = {x.site_id for x in signals if x.sent and x.taken_at_s is None}
                    sites = sorted(set(counted) | untaken)
                    counting = counting or bool(sites)
                if sites:
                    await self._refresh_taken(fid, signals, sites)
            except StoreUnavailable:
                raise
            except Exception as exc:
                log.warning("fleet: %s: asking what its edges took failed: %r", fid, exc)
        self._counting = counting
        async with self._lock:
            pending = await self._store.unpublished_fleet_curtailments(now_s=self._clock.now())
            waiting = False
            for result in pending:
                fid = result.curtailment.fleet_curtailment_id
                try:
                    progress = await self.advance(result)
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    # One fleet curtailment's failure (an outbox error) holds back no other.
                    log.warning("fleet: %s revision %d: %r", fid, result.revision, exc)
                    waiting = True  # look again soon
                    continue
                waiting = waiting or bool(progress.plan.increases)
            self._waiting = waiting
        # Split again (after the lock: a split takes it) where a site's edge took nothing for
        # ack_timeout_s while increases wait for it, or came back after a split counted it.
        for result in held:
            fid = result.curtailment.fleet_curtailment_id
            try:
                due = await self._resplit_due(fid)
                if due is None:
                    continue
                why, revision = due
                # Only if no other split came first (a Curtail, or this task run twice at once).
                if await self._resplit_if(fid, revision):
                    log.info("fleet: %s re-split: %s", fid, why)
            except StoreUnavailable:
                raise
            except Exception as exc:
                log.warning("fleet: %s: re-split failed: %r", fid, exc)
        return pending

    async def _resplit_due(self, fid: str) -> tuple[str, int] | None:
        """Why the latest revision of ``fid`` is to be split again now: an edge that took no
        signal for ``ack_timeout_s`` and may hold more than its share, whether increases wait
        for it or not (the split counts it at what it may hold), or a site it counted so took
        its signals (the normal split resumes); with the revision. None: it is not."""
        result = await self._store.fleet_curtailment(fid)
        if result is None or result.cancelled:
            return None
        now = self._clock.now()
        signals = await self._store.fleet_site_signals(fid)
        by_site: dict[str, list[FleetSiteSignal]] = {}
        for sig in signals:
            by_site.setdefault(sig.site_id, []).append(sig)
        rev = int(result.revision)
        counted = counted_in(result, signals, ack_timeout_s=self.ack_timeout_s)
        for sid in counted:
            if pending_since_s(by_site.get(sid, [])) is None:
                return f"site {sid!r}, counted at what it may hold, took its signals", rev
        # A site whose edge took no signal for ack_timeout_s and may hold more than its share:
        # the increases that wait for it go on without it, and where none wait (a limit that
        # only went down) the others are lowered so that, with it counted at what it may hold,
        # the fleet stays within its limit (as far as their floors allow).
        now_counted = counted_sites(
            {sh.site_id: (sh.max_kw, sh.grid_limit_kw) for sh in result.shares},
            signals,
            at_s=now,
            ack_timeout_s=self.ack_timeout_s,
        )
        plan = plan_revision(result, signals, ramp_s=self.ramp_s)
        for sid in sorted(now_counted, key=lambda x: (x not in plan.waiting_for, x)):
            if sid in counted:
                continue
            since = pending_since_s(by_site.get(sid, [])) or now
            what = (
                "the increases wait for site"
                if sid in plan.waiting_for
                else "the fleet may be over its limit while it holds more than its share: site"
            )
            return (
                f"{what} {sid!r}, whose edge took no signal for {now - since:.0f} s "
                f"([fleet] ack_timeout_s {self.ack_timeout_s:g})",
                rev,
            )
        return None

    async def run_republish(self, every_s: float) -> None:
        """Republish pending revisions now and then every ``every_s`` until cancelled (the server
        owns it). While increases wait for decreases, look every ``confirm_every_s`` instead
        (also with ``every_s`` 0, which otherwise republishes only at start)."""
        while True:
            try:
                await self.republish_pending()
            except StoreUnavailable as exc:
                log.warning("fleet: republish check skipped, store unavailable: %s", exc)
            except Exception:
                log.exception("fleet: republish check failed")
            if self._waiting:
                delay: float | None = (
                    min(every_s, self.confirm_every_s) if every_s > 0 else self.confirm_every_s
                )
            elif self._counting:
                delay = min(every_s or COUNTED_CHECK_EVERY_S, COUNTED_CHECK_EVERY_S)
            else:
                delay = every_s if every_s > 0 else None
            _raise_if_cancelled()
            await self._sleep_or_wake(delay)

    async def _sleep_or_wake(self, delay_s: float | None) -> None:
        """Until ``delay_s`` passed on the clock (None: no limit) or a revision left increases
        waiting."""
        if self._wake.is_set():
            self._wake.clear()
            return
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._wake.wait())]
        if delay_s is not None:
            waits.append(asyncio.ensure_future(self._clock.sleep(delay_s)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        self._wake.clear()

    async def curtail(self, req: FleetCurtailment) -> FleetCurtailmentResult:
        """Split ``req`` (a new id, or a held one again: the new split replaces the old by id)."""
        result = await self._curtail(req)
        assert result is not None
        return result

    async def _curtail(
        self, req: FleetCurtailment, *, if_revision: int | None = None, resplit: bool = False
    ) -> FleetCurtailmentResult | None:
        """:meth:`curtail`; with ``if_revision``, only when that is the held revision (None
        when it is not); with ``resplit``, ``FleetInputError`` when it was cancelled meanwhile."""
        now = self._clock.now()
        validate_request(req, now_s=now)
        fid = req.fleet_curtailment_id
        # What the edges took is asked of the bus before taking the lock (as the republish task
        # does): a slow broker holds back no other Curtail or Cancel. The store records what it
        # learns; under the lock the split and the plan use the store's record.
        asked = await self._ask_edges(fid, req.site_ids)
        async with self._lock:
            previous = await self._store.fleet_curtailment(fid)
            if if_revision is not None and (
                previous is None or previous.cancelled or int(previous.revision) != if_revision
            ):
                return None
            if resplit and (previous is None or previous.cancelled):
                raise FleetNotActive(
                    f"fleet_curtailment_id: {fid!r} is cancelled; send Curtail again"
                )
            inputs = []
            for i, sid in enumerate(req.site_ids):
                try:
                    inputs.append(
                        await site_inputs(
                            self._store, sid, now_s=now, demand_window_s=self._demand_window_s
                        )
                    )
                except (FleetInputError, SiteConfigError) as exc:
                    # Its own refusal, or a stored topology the core refuses now. Only these: a
                    # ValueError from a bug here was answered as the operator's bad input.
                    raise FleetInputError(f"site_ids[{i}]: {exc}") from None
            split_at = issue_time(now, previous)
            split, counted = await self._split(req, inputs, at_s=ts_s(split_at))
            floors_kw = sum(counted.values()) + sum(
                min(s.floor_kw, s.grid_limit_kw) for s in inputs if s.site_id not in counted
            )
            what = (
                "the sites counted at what they may hold and the other sites' floors"
                if counted
                else "the sites' floors"
            )
            if not split.feasible and req.require_feasible:
                raise FleetInfeasible(
                    f"fleet curtailment {req.fleet_curtailment_id!r}: {what} add up to "
                    f"{floors_kw:.3f} kW, above max_kw {req.max_kw:.3f} kW "
                    f"(short by {split.shortfall_kw:.3f} kW); nothing was published"
                )
            result = FleetCurtailmentResult(
                revision=(previous.revision if previous else 0) + 1,
                feasible=split.feasible,
                shortfall_kw=split.shortfall_kw,
                allocated_kw=sum(split.max_kw.values()),
            )
            result.curtailment.CopyFrom(req)
            result.split_at.CopyFrom(split_at)
            for s in inputs:
                result.shares.append(
                    SiteShare(
                        site_id=s.site_id,
                        node_id=s.node_id,
                        curtailment_id=site_curtailment_id(req.fleet_curtailment_id, s.site_id),
                        max_kw=split.max_kw[s.site_id],
                        floor_kw=min(s.floor_kw, s.grid_limit_kw),
                        grid_limit_kw=s.grid_limit_kw,
                        demand_kw=s.demand_kw,
                        demand_source=s.demand_source,
                        topology_version=s.topology_version,
                    )
                )
            dropped = await self._dropped(previous, set(req.site_ids))
            result.dropped_shares.extend(dropped)
            notes = []
            if not split.feasible:
                notes.append(
                    f"INFEASIBLE: {what} add up to {floors_kw:.3f} kW, "
                    f"{split.shortfall_kw:.3f} kW above max_kw {req.max_kw:.3f} kW; every "
                    f"{'other ' if counted else ''}site is curtailed to its floor"
                )
            if counted:
                notes.append(
                    "COUNTED at what they may still hold (their edge took no signal for "
                    f"[fleet] ack_timeout_s {self.ack_timeout_s:g} s or longer): "
                    + ", ".join(f"{sid} {kw:.3f} kW" for sid, kw in counted.items())
                    + f"; the rest, {max(req.max_kw - sum(counted.values()), 0.0):.3f} kW, is "
                    "split over the other sites"
                )
            if dropped:
                notes.append(
                    "cancelled at sites no longer named: " + ", ".join(sh.site_id for sh in dropped)
                )
            result.detail = "; ".join(notes)
            await self._store.put_fleet_curtailment(result, now_s=now)
            if not split.feasible:
                log.warning(
                    "fleet: %s revision %d: %s",
                    req.fleet_curtailment_id,
                    result.revision,
                    result.detail,
                )
            progress = await self._advance_stored(result)
            if await self._not_asked(fid, asked):
                # Signals sent since the bus was asked (another split in between): not asked
                # under the lock; the republish task asks at once (an edge's take never unsets,
                # so the store's older record only holds increases back longer).
                self._wake.set()
            note = progress.note(self.ramp_s)
            if note:
                self._waiting = True
                self._wake.set()
                log.info(
                    "fleet: %s revision %d: %s", req.fleet_curtailment_id, result.revision, note
                )
                result.detail = "; ".join(x for x in (result.detail, note) if x)
            log.info(
                "fleet: %s revision %d split %.3f kW over %d site(s): %s",
                req.fleet_curtailment_id,
                result.revision,
                req.max_kw,
                len(result.shares),
                ", ".join(f"{sh.site_id} {sh.max_kw:.3f}" for sh in result.shares),
            )
            return result

    async def _split(
        self, req: FleetCurtailment, inputs: Sequence[SiteInputs], *, at_s: float
    ) -> tuple[Split, dict[str, float]]:
        """The split of ``req`` over ``inputs`` (:func:`split_fleet_limit`), except that a site
        whose edge took no signal for ``ack_timeout_s`` and whose share would be below what it
        may hold is counted at that (:func:`counted_sites`) and only the rest is split over the
        other sites; such a site still gets its share by the split rule (its decrease, for when
        its edge comes back). Returns the split and the sites counted so, with what at."""
        split = split_fleet_limit(req.max_kw, inputs)
        signals = await self._store.fleet_site_signals(req.fleet_curtailment_id)
        if not signals:
            return split, {}
        counted = counted_sites(
            {s.site_id: (split.max_kw[s.site_id], s.grid_limit_kw) for s in inputs},
            signals,
            at_s=at_s,
            ack_timeout_s=self.ack_timeout_s,
        )
        if not counted:
            return split, {}
        rest = req.max_kw - sum(counted.values())
        others = split_fleet_limit(max(rest, 0.0), [s for s in inputs if s.site_id not in counted])
        max_kw = {s.site_id: others.max_kw.get(s.site_id, split.max_kw[s.site_id]) for s in inputs}
        return (
            Split(max_kw, others.feasible and rest >= 0, others.shortfall_kw + max(-rest, 0.0)),
            counted,
        )

    async def resplit(self, fleet_curtailment_id: str) -> FleetCurtailmentResult:
        """Split a held fleet curtailment again on the sites' current demand and topology. An
        infeasible split is applied at the floors (it is in force already; refusing would leave
        the old split). ``FleetNotActive`` when it is cancelled (also when a Cancel came while
        this one asked the bus) or its window has ended."""
        req = await self._resplit_request(fleet_curtailment_id)
        result = await self._curtail(req, resplit=True)
        assert result is not None
        return result

    async def _ask_edges(self, fid: str, site_ids: Sequence[str]) -> frozenset[tuple[str, int]]:
        """Ask the bus which signals of ``fid`` to ``site_ids`` their edges took (recorded in the
        store); returns the (site, revision) of those not taken, as asked. Call without the
        lock."""
        signals = await self._store.fleet_site_signals(fid)
        if not signals:
            return frozenset()
        signals = await self._refresh_taken(fid, signals, site_ids)
        return frozenset((x.site_id, x.revision) for x in signals if x.taken_at_s is None)

    async def _not_asked(self, fid: str, asked: frozenset[tuple[str, int]]) -> bool:
        """Whether ``fid`` holds a sent signal not taken that :meth:`_ask_edges` did not ask about
        (sent since by another split)."""
        return any(
            x.sent and x.taken_at_s is None and (x.site_id, x.revision) not in asked
            for x in await self._store.fleet_site_signals(fid)
        )

    async def _resplit_if(self, fleet_curtailment_id: str, revision: int) -> bool:
        """:meth:`resplit` if ``revision`` is still the held one (False: another split or a
        cancel came first, e.g. this task's round run twice at once)."""
        req = await self._resplit_request(fleet_curtailment_id)
        return await self._curtail(req, if_revision=revision) is not None

    async def _resplit_request(self, fleet_curtailment_id: str) -> FleetCurtailment:
        held = await self._held(fleet_curtailment_id)
        if held.cancelled:
            raise FleetNotActive(
                f"fleet_curtailment_id: {fleet_curtailment_id!r} is cancelled; send Curtail again"
            )
        end_s, now = ts_s(held.curtailment.end), self._clock.now()
        if end_s <= now:
            # Was "end: has passed", INVALID_ARGUMENT, naming a field the caller never sent.
            raise FleetNotActive(
                f"fleet_curtailment_id: {fleet_curtailment_id!r} has ended ({end_s} <= now "
                f"{now}); nothing to re-split"
            )
        req = FleetCurtailment()
        req.CopyFrom(held.curtailment)
        req.require_feasible = False
        return req

    async def cancel(self, fleet_curtailment_id: str) -> FleetCurtailmentResult:
        """Cancel at every site of the latest split. Cancelling again publishes the same cancels
        again (a site that missed them gets them) without a new revision."""
        async with self._lock:
            held = await self._held(fleet_curtailment_id)
            if held.cancelled:
                result = held
                if await self._store.fleet_published_revision(fleet_curtailment_id) < int(
                    held.revision
                ):
                    await self._advance_stored(result)
                else:
                    # Cancelling again: the same cancels once more (a site that missed them),
                    # to every site even when one's bus fails (it stopped at the first, so the
                    # sites after it never got the cancel), each failed site named.
                    failures: list[tuple[str, Exception]] = []
                    for sh in [*result.shares, *result.dropped_shares]:
                        try:
                            await self._publish(result, sh, cancelled=True)
                        except Exception as exc:
                            log.warning(
                                "fleet: %s: cancelling again at %s failed: %r",
                                fleet_curtailment_id,
                                sh.site_id,
                                exc,
                            )
                            failures.append((sh.site_id, exc))
                    sent = len(result.shares) + len(result.dropped_shares) - len(failures)
                    _raise_failures(
                        failures,
                        note=f"the cancel went out again to the {sent} other site(s); "
                        "Cancel again once the bus takes it",
                    )
            else:
                result = FleetCurtailmentResult()
                result.CopyFrom(held)
                result.revision = held.revision + 1
                result.cancelled = True
                result.split_at.CopyFrom(issue_time(self._clock.now(), held))
                result.detail = "cancelled"
                if await self._store.fleet_published_revision(fleet_curtailment_id) >= (
                    held.revision
                ):
                    # Their cancels went out with the held revision.
                    del result.dropped_shares[:]
                await self._store.put_fleet_curtailment(result, now_s=self._clock.now())
                # The end of the limit: every cancel goes out at once.
                await self._advance_stored(result)
            log.info("fleet: %s cancelled at %d site(s)", fleet_curtailment_id, len(result.shares))
            return result

    async def site_statuses(self, site_ids: Sequence[str] = ()) -> ListSitesResponse:
        """What the cloud holds of each site (``site_ids``, or every site it holds anything of)
        and its share of every active (not cancelled, not ended) fleet curtailment.
        ``FleetNotFound`` naming the sites asked for that the cloud holds nothing of,
        ``FleetInputError`` for a site id no site can have."""
        check_site_ids(site_ids)
        now = self._clock.now()
        held = await self._store.site_activity(site_ids)
        unknown = [sid for sid in dict.fromkeys(site_ids) if sid not in held]
        if unknown:
            raise FleetNotFound(
                "the cloud holds nothing of site(s) " + ", ".join(repr(x) for x in unknown)
            )
        shares: dict[str, list[SiteFleetShare]] = {}
        for fc in await self._store.fleet_curtailments():
            if ts_s(fc.curtailment.end) <= now:
                continue
            fid = fc.curtailment.fleet_curtailment_id
            published = await self._store.fleet_published_revision(fid) >= fc.revision
            in_force = ts_s(fc.curtailment.start) <= now < ts_s(fc.curtailment.end)
            plan, signals = await self._plan(fc)  # asks the bus what was taken, where unknown
            newest: dict[str, FleetSiteSignal] = {}
            by_site: dict[str, list[FleetSiteSignal]] = {}
            for sig in signals:
                newest[sig.site_id] = sig  # by site then revision: the last one is the newest
                by_site.setdefault(sig.site_id, []).append(sig)
            increasing = {sh.site_id for sh in plan.increases}
            # Sites the split counted at what they may hold (their edge took nothing for
            # ack_timeout_s), and the ones the increases go on without now.
            counted = {
                **counted_in(fc, signals, ack_timeout_s=self.ack_timeout_s),
                **plan.counted,
            }
            for sh in fc.shares:
                if sh.site_id not in held:
                    continue
                entry = SiteFleetShare(
                    fleet_curtailment_id=fid,
                    revision=fc.revision,
                    in_force=in_force,
                    published=published,
                )
                last = newest.get(sh.site_id)
                if last is not None:
                    entry.site_revision = last.revision
                    entry.site_max_kw = last.max_kw or 0.0
                    entry.site_cancel = last.max_kw is None  # (0.0 is a 0 kW limit)
                    entry.taken = last.taken_at_s is not None
                since = pending_since_s(by_site.get(sh.site_id, []))
                if since is not None:
                    entry.untaken_since.CopyFrom(timestamp(since))
                if sh.site_id in counted:
                    entry.counted_unresponsive = True
                    entry.counted_kw = counted[sh.site_id]
                if sh.site_id in increasing:
                    entry.increase_waiting = True
                    entry.waiting_for.extend(plan.waiting_for)
                    if not plan.waiting_for and plan.ramp_until_s is not None:
                        entry.waiting_until.CopyFrom(timestamp(plan.ramp_until_s))
                entry.share.CopyFrom(sh)
                entry.start.CopyFrom(fc.curtailment.start)
                entry.end.CopyFrom(fc.curtailment.end)
                shares.setdefault(sh.site_id, []).append(entry)
        out = ListSitesResponse()
        out.now.CopyFrom(timestamp(now))
        for sid in sorted(held):
            a = held[sid]
            st = SiteStatus(
                site_id=sid,
                audit_held=a.audit_last_seq is not None,
                audit_last_seq=a.audit_last_seq or 0,
                audit_contiguous_count=a.audit_contiguous_count,
                topology_version=a.topology_version,
            )
            for name, value in (
                ("audit_last_decided_at", a.audit_last_decided_at_s),
                ("audit_last_stored_at", a.audit_last_stored_at_s),
                ("telemetry_last_sample_at", a.telemetry_last_sample_s),
                ("telemetry_last_stored_at", a.telemetry_last_stored_at_s),
                ("topology_stored_at", a.topology_stored_at_s),
            ):
                if value is not None:
                    getattr(st, name).CopyFrom(timestamp(value))
            seen = [
                t
                for t in (
                    a.audit_last_stored_at_s,
                    a.telemetry_last_stored_at_s,
                    a.topology_stored_at_s,
                )
                if t is not None
            ]
            if seen:
                st.last_seen_at.CopyFrom(timestamp(max(seen)))
            st.fleet_shares.extend(shares.get(sid, []))
            out.sites.append(st)
        return out

    async def list(self, *, include_cancelled: bool = False) -> list[FleetCurtailmentResult]:
        return await self._store.fleet_curtailments(include_cancelled=include_cancelled)

    async def _held(self, fleet_curtailment_id: str) -> FleetCurtailmentResult:
        check_fleet_curtailment_id(fleet_curtailment_id)
        held = await self._store.fleet_curtailment(fleet_curtailment_id)
        if held is None:
            raise FleetNotFound(f"no fleet curtailment {fleet_curtailment_id!r}")
        return held

    async def _dropped(
        self, previous: FleetCurtailmentResult | None, named: set[str]
    ) -> Sequence[SiteShare]:
        """Sites to cancel with a new split naming ``named``: the previous split's sites it does
        not name (none when the previous revision was a cancel) and, when the previous revision
        was never published, the sites that revision was to cancel."""
        if previous is None:
            return []
        fid = previous.curtailment.fleet_curtailment_id
        published = await self._store.fleet_published_revision(fid) >= previous.revision
        candidates: Sequence[SiteShare] = (
            [] if previous.cancelled and published else [*previous.shares]
        )
        if not published:
            candidates = [*candidates, *previous.dropped_shares]
        out: dict[str, SiteShare] = {}
        for sh in candidates:
            if sh.site_id not in named and sh.site_id not in out:
                out[sh.site_id] = sh
        return list(out.values())

    async def revision_plan(self, fleet_curtailment_id: str) -> RevisionPlan:
        """Where the latest revision of a held fleet curtailment stands: its increases not yet
        published and the sites whose decrease they wait for (asked of the bus now)."""
        return (await self._plan(await self._held(fleet_curtailment_id)))[0]

    async def _refresh_taken(
        self, fid: str, signals: Sequence[FleetSiteSignal], site_ids: Sequence[str]
    ) -> _Signals:
        """Ask the bus which signals to ``site_ids`` their edges took since the newest one known
        taken (newest first: the edge takes them in order, so the first taken one settles the
        older ones); record the first time each was seen. Returns ``signals`` with the news."""
        out: _Signals = [*signals]
        now = self._clock.now()
        for sid in dict.fromkeys(site_ids):
            mine = sorted(
                (i for i, x in enumerate(out) if x.site_id == sid),
                key=lambda i: out[i].revision,
                reverse=True,
            )
            for i in mine:
                sig = out[i]
                if sig.taken_at_s is not None:
                    break
                if not sig.sent:
                    continue
                if not await self._publisher.taken(sid, sig.event_id):
                    await self._resend_if_lost(fid, sig, now)
                    continue
                await self._store.mark_fleet_site_signal(fid, sid, sig.revision, taken_at_s=now)
                # Taken: neither it nor an older revision's signal to the site is sent again.
                for older in out:
                    if older.site_id == sid and older.revision <= sig.revision:
                        self._resent.pop(older.event_id, None)
                log.info("fleet: %s: %s took revision %d", fid, sid, sig.revision)
                out[i] = dataclasses.replace(sig, taken_at_s=now)
                break
        return out

    async def _resend_if_lost(self, fid: str, sig: FleetSiteSignal, now_s: float) -> None:
        """Send ``sig`` again when the outbox took it at least ``RESEND_UNSTORED_S`` ago (and at
        most that often) and the site's stream still does not hold it."""
        last = self._resent.get(sig.event_id, sig.published_at_s)
        if now_s - last < RESEND_UNSTORED_S:
            return
        if await self._publisher.stored(sig.site_id, sig.event_id):
            return
        held = await self._store.fleet_curtailment(fid)
        if held is None:
            return
        self._resent[sig.event_id] = now_s
        share = next(
            (
                sh
                for sh in [*held.shares, *held.dropped_shares]
                if sh.site_id == sig.site_id and event_id(sh, sig.revision) == sig.event_id
            ),
            None,
        )
        if share is None or int(held.revision) != sig.revision:
            return  # an older revision's: the latest one's signals replace it
        log.warning(
            "fleet: %s revision %d: %s's stream does not hold the signal %.0f s after the outbox "
            "took it; sending it again",
            fid,
            sig.revision,
            sig.site_id,
            now_s - sig.published_at_s,
        )
        await self._publish(held, share, cancelled=sig.max_kw is None)

    async def _plan(
        self, result: FleetCurtailmentResult, *, ask_bus: bool = True
    ) -> tuple[RevisionPlan, _Signals]:
        fid = result.curtailment.fleet_curtailment_id
        signals = await self._store.fleet_site_signals(fid)
        if ask_bus and not result.cancelled:
            # What each site may hold depends on what its edge took: ask before deciding.
            signals = await self._refresh_taken(fid, signals, [sh.site_id for sh in result.shares])
        return plan_revision(result, signals, ramp_s=self.ramp_s), signals

    async def advance(self, result: FleetCurtailmentResult) -> Progress:
        """Publish what of ``result`` (the latest revision) may go out now (:func:`plan_revision`):
        each signal recorded first (so a crash after the outbox took it still counts it as
        possibly held), then accepted by the outbox, then marked sent; signals recorded but not
        sent go out again. Once every signal is sent the revision is recorded as published. The
        caller holds the lock. What the edges took is the store's record: the bus is never
        asked here (the callers ask it before taking the lock)."""
        if self.after_store is not None:
            await self.after_store(result)
        fid = result.curtailment.fleet_curtailment_id
        rev = int(result.revision)
        plan, signals = await self._plan(result, ask_bus=False)
        progress = Progress(plan=plan)
        now = self._clock.now()
        # Recorded but never accepted by the outbox (a crash or an outbox error in between).
        shares = {sh.site_id: sh for sh in result.dropped_shares}
        shares.update({sh.site_id: sh for sh in result.shares})
        unsent = [
            (shares[sig.site_id], sig.max_kw is None)
            for sig in signals
            if sig.revision == rev and not sig.sent and sig.site_id in shares
        ]
        if unsent:
            log.warning(
                "fleet: %s revision %d: signals to %s were stored but not published; "
                "publishing them now",
                fid,
                rev,
                ", ".join(sh.site_id for sh, _ in unsent),
            )
        # A site whose outbox fails holds back no other: the decreases go out even when a
        # resend failed, and the increases when the plan lets them (they wait for decreases
        # *taken*, so a decrease that could not be sent holds them unless its site is counted at
        # what it may hold); the first failure is raised after.
        failed: Exception | None = None
        sends: tuple[Callable[[], Awaitable[object]], ...] = (
            functools.partial(self._send_each, result, unsent),
            functools.partial(self._send_new, result, plan.send_now, now),
        )
        for send in sends:
            try:
                await send()
            except StoreUnavailable:
                raise
            except Exception as exc:
                failed = failed or exc
        progress.sent += len(unsent) + len(plan.send_now)
        may_go = plan.increases_may_go(now)
        if plan.increases and not may_go:
            progress.sent += await self._send_interims(result, plan.interims)
        if plan.increases and may_go:
            await self._send_new(result, [(sh, False, False) for sh in plan.increases], now)
            log.info(
                "fleet: %s revision %d: the decreases were taken; increases out at %s",
                fid,
                rev,
                ", ".join(sh.site_id for sh in plan.increases),
            )
            progress.sent += len(plan.increases)
            plan.increases = []
        if failed is not None:
            raise failed
        if not plan.increases:
            await self._store.mark_fleet_published(fid, rev)
            # Published in full: its interims (and earlier revisions') are not sent again.
            self._interims_out = {k for k in self._interims_out if k[0] != fid or k[2] > rev}
            progress.done = True
        return progress

    async def _advance_stored(self, result: FleetCurtailmentResult) -> Progress:
        """:meth:`advance` for a revision just stored by a call: a site's bus that cannot take
        its signal says so with what the caller needs to know, that the revision stands."""
        try:
            return await self.advance(result)
        except SiteBusUnavailable as exc:
            raise SiteBusUnavailable(
                f"{exc}; revision {result.revision} of {result.curtailment.fleet_curtailment_id!r}"
                " is stored, and what did not go out is sent when the bus takes it"
            ) from exc

    async def _send_interims(
        self, result: FleetCurtailmentResult, interims: Sequence[tuple[SiteShare, float]]
    ) -> int:
        """Publish each site's interim signal of ``result`` (``RevisionPlan.interims``) once per
        run of the cloud. Not recorded in the store: it raises nothing the store counts, and a
        cloud started again sends it again under the same event id (JetStream drops a repeat in
        its duplicate window; the edge applies a later copy in stream order, before the raise,
        or ignores it as older once the raise was applied)."""
        fid = result.curtailment.fleet_curtailment_id
        rev = int(result.revision)
        sent = 0
        for sh, kw in interims:
            key = (fid, sh.site_id, rev)
            if key in self._interims_out:
                continue
            interim = SiteShare()
            interim.CopyFrom(sh)
            interim.max_kw = kw
            eid = f"{event_id(sh, rev)}-interim"
            issued = result.split_at.seconds * 1_000_000_000 + result.split_at.nanos
            await self._publish(
                result,
                interim,
                cancelled=False,
                eid=eid,
                issued_ns=issued - INTERIM_LEAD_NS,
            )
            self._interims_out.add(key)
            sent += 1
            log.info(
                "fleet: %s revision %d: %s keeps %.3f kW with the new window until its increase "
                "to %.3f kW may go",
                fid,
                rev,
                sh.site_id,
                kw,
                sh.max_kw,
            )
        return sent

    async def _send_new(
        self,
        result: FleetCurtailmentResult,
        items: Sequence[tuple[SiteShare, bool, bool]],
        now_s: float,
    ) -> None:
        if not items:
            return
        fid = result.curtailment.fleet_curtailment_id
        rev = int(result.revision)
        await self._store.put_fleet_site_signals(
            fid,
            [
                FleetSiteSignal(
                    sh.site_id,
                    rev,
                    None if cancelled else sh.max_kw,
                    lowered,
                    event_id(sh, rev),
                    False,
                    now_s,
                    None,
                    ts_s(result.curtailment.start),
                    ts_s(result.curtailment.end),
                )
                for sh, cancelled, lowered in items
            ],
        )
        await self._send_each(result, [(sh, cancelled) for sh, cancelled, _ in items])

    async def _send_each(
        self, result: FleetCurtailmentResult, items: Sequence[tuple[SiteShare, bool]]
    ) -> None:
        """Send every one even when one fails (one site's outbox error holds back no other
        site's decrease); then raise naming every site that failed (:func:`_raise_failures`)."""
        failures: list[tuple[str, Exception]] = []
        for sh, cancelled in items:
            try:
                await self._send(result, sh, cancelled=cancelled)
            except Exception as exc:
                log.warning(
                    "fleet: %s revision %d: publishing to %s failed: %r",
                    result.curtailment.fleet_curtailment_id,
                    result.revision,
                    sh.site_id,
                    exc,
                )
                failures.append((sh.site_id, exc))
        _raise_failures(failures)

    async def _send(
        self, result: FleetCurtailmentResult, share: SiteShare, *, cancelled: bool
    ) -> None:
        await self._publish(result, share, cancelled=cancelled)
        fid = result.curtailment.fleet_curtailment_id
        await self._store.mark_fleet_site_signal(
            fid, share.site_id, int(result.revision), sent=True
        )

    async def _publish(
        self,
        result: FleetCurtailmentResult,
        share: SiteShare,
        *,
        cancelled: bool,
        eid: str | None = None,
        issued_ns: int | None = None,
    ) -> None:
        req = result.curtailment
        eid = eid or event_id(share, int(result.revision))
        signal = GridSignal(signal_id=eid)
        if issued_ns is None:
            signal.issued_at.CopyFrom(result.split_at)
        else:
            secs, nanos = divmod(issued_ns, 1_000_000_000)
            signal.issued_at.seconds = secs
            signal.issued_at.nanos = nanos
        c = Curtailment(
            curtailment_id=share.curtailment_id,
            node_id=share.node_id,
            max_kw=share.max_kw,
            issuer=req.issuer or "evcore fleet",
            cancelled=cancelled,
        )
        c.start.CopyFrom(req.start)
        c.end.CopyFrom(req.end)
        signal.curtailment.CopyFrom(c)
        await self._publisher.publish_grid(share.site_id, signal, event_id=eid)
