"""A Curtail again that moves a fleet curtailment's window (the DSO extends it in force) while a
site's share rises: the rising site's increase waits for the decreases (break before make), and
meanwhile it gets an interim signal with the new window at what it holds, so no site is left
without a cap when the old window ends while the fleet limit is still in force. The edges apply
the signals with the edge's own rules (evcore.edge.signals.apply_grid_signal: the newest
issued_at per curtailment id stands). Real mTLS, the real NATS, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloud_testkit import wait_until
from evcore.v1.fleet_api_pb2 import FleetCurtailment
from fleet_testkit import (
    FleetCloud,
    put_ten_charger_topologies,
    start_fleet_cloud,
    ten_charger_demand,
)

pytestmark = pytest.mark.timeout(120)

LIMIT_KW = 300.0
FID = "evening"
HOURS_S = 3600.0


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    # a stays offline for over an hour: no ack_timeout_s re-split (test_cloud_fleet_ack_timeout.py)
    # while b's increase waits for it.
    fleet = {"resplit_every_s": 0, "ack_timeout_s": 4 * HOURS_S}
    f = await start_fleet_cloud(tmp_path, store_url, n_sites=2, fleet=fleet, edge_rules=True)
    try:
        await put_ten_charger_topologies(f)
        yield f
    finally:
        await f.close()


async def curtail(f: FleetCloud, start_s: float, end_s: float) -> dict[str, float]:
    r = FleetCurtailment(fleet_curtailment_id=FID, site_ids=f.sites, max_kw=LIMIT_KW, issuer="DSO")
    r.start.FromSeconds(int(start_s))
    r.end.FromSeconds(int(end_s))
    async with f.channel("aggregator-1") as ch:
        res = await f.fleet(ch).Curtail(r)
    return {sh.site_id: sh.max_kw for sh in res.shares}


def caps(f: FleetCloud, sites: list[str]) -> dict[str, float | None]:
    now = f.clock.now()
    return {s: f.watches[s].cap_kw(now) for s in sites}


def check(f: FleetCloud, sites: list[str]) -> dict[str, float | None]:
    """Every site of ``sites`` has a cap now, and the caps add up to at most the fleet limit."""
    held = caps(f, sites)
    assert all(v is not None for v in held.values()), held
    assert sum(v or 0.0 for v in held.values()) <= LIMIT_KW + 1e-6, held
    return held


async def extend_while_b_rises(f: FleetCloud, *, a_offline: bool) -> tuple[str, str, float]:
    """Revision 1 [t0, t0 + 2 h] taken by both edges; 10 s before its end the demand moved from
    a to b and the DSO extends it to t0 + 4 h (revision 2: a decreases, b rises)."""
    a, b = f.sites
    t0 = f.clock.now()
    await ten_charger_demand(f, {a: 20.0, b: 20.0})
    first = await curtail(f, t0, t0 + 2 * HOURS_S)
    await f.wait_signals({a: 1, b: 1})
    await f.wait_taken(FID)
    assert check(f, [a, b]) == first
    f.clock.advance(2 * HOURS_S - 10.0)
    if a_offline:
        await f.edge_offline(a)
    await ten_charger_demand(f, {a: 5.0, b: 30.0})
    second = await curtail(f, t0, t0 + 4 * HOURS_S)
    assert second[a] < first[a] < second[b], (first, second)
    return a, b, t0


async def test_an_extension_with_a_site_offline_leaves_no_online_site_uncapped(
    fleet: FleetCloud,
) -> None:
    f = fleet
    a, b, t0 = await extend_while_b_rises(f, a_offline=True)
    # b's increase waits for a's decrease; b keeps its cap, with the new window, past the old end.
    for step_s in (5.0, 60.0, HOURS_S):
        f.clock.advance(step_s)
        await f.coordinator.republish_pending()
        await asyncio.sleep(0.2)
        held = check(f, [b])
        assert held[b] == f.watches[b].signals[0].curtailment.max_kw, held
    assert f.clock.now() < t0 + 4 * HOURS_S
    # a comes back: it takes its decrease, then b gets its increase after ramp_s.
    await f.edge_online(a)
    await f.wait_signals({a: 2})
    check(f, [a, b])
    await f.release_increases(FID)
    await f.wait_signals({b: 3})
    await asyncio.sleep(0.2)
    held = check(f, [a, b])
    assert await f.store.fleet_published_revision(FID) == 2
    interim, raise_ = f.watches[b].signals[1:3]
    assert interim.issued_at.ToNanoseconds() < raise_.issued_at.ToNanoseconds()
    assert held[b] == raise_.curtailment.max_kw


async def test_an_extension_with_every_edge_online_leaves_no_site_uncapped(
    fleet: FleetCloud,
) -> None:
    f = fleet
    a, b, t0 = await extend_while_b_rises(f, a_offline=False)
    await f.wait_signals({a: 2})
    await f.wait_taken(FID)
    # The old window ends (10 s later) before ramp_s has passed: b must keep a cap.
    f.clock.advance(f.coordinator.ramp_s / 2)
    assert f.clock.now() > t0 + 2 * HOURS_S
    await f.coordinator.republish_pending()
    await asyncio.sleep(0.2)
    check(f, [a, b])
    assert len(f.watches[b].signals) == 2  # revision 1, the interim: the raise waits
    f.clock.advance(f.coordinator.ramp_s)
    await f.coordinator.republish_pending()
    await f.wait_signals({b: 3})
    await asyncio.sleep(0.2)
    held = check(f, [a, b])
    assert held[b] == f.watches[b].signals[2].curtailment.max_kw
    # A redelivered or resent interim (older issued_at) never replaces the raise.
    f.clock.advance(HOURS_S)
    check(f, [a, b])


@pytest.mark.parametrize("a_offline", [True, False], ids=["a-offline", "a-online"])
async def test_a_cloud_restart_between_the_interim_and_the_raise_publishes_no_early_increase(
    fleet: FleetCloud, a_offline: bool
) -> None:
    f = fleet
    a, b, t0 = await extend_while_b_rises(f, a_offline=a_offline)
    await f.wait_signals({b: 2})  # revision 1, then the interim
    held_kw = f.watches[b].signals[0].curtailment.max_kw
    interim = f.watches[b].signals[1]
    assert interim.signal_id.endswith("-interim") and interim.curtailment.max_kw == held_kw
    second = await f.store.fleet_curtailment(FID)
    assert second is not None and second.revision == 2
    raised_kw = next(sh.max_kw for sh in second.shares if sh.site_id == b)
    assert raised_kw > held_kw

    def nothing_above_held() -> None:
        assert all(s.curtailment.max_kw <= held_kw for s in f.watches[b].signals), [
            s.curtailment.max_kw for s in f.watches[b].signals
        ]

    # The cloud restarts between the interim and the raise; the new one (its republish task runs
    # at once) sends the interim again under its event id, and no raise.
    await f.restart()
    if a_offline:
        for step_s in (5.0, 60.0, HOURS_S):
            f.clock.advance(step_s)
            await f.coordinator.republish_pending()
            await asyncio.sleep(0.2)
            assert check(f, [b])[b] == held_kw
            nothing_above_held()
        await f.edge_online(a)
    await f.wait_signals({a: 2})
    await f.wait_taken(FID)  # a took its decrease, as the new cloud sees it
    await f.coordinator.republish_pending()
    f.clock.advance(f.coordinator.ramp_s - 1.0)
    assert f.clock.now() > t0 + 2 * HOURS_S  # the old window has ended
    await f.coordinator.republish_pending()
    await asyncio.sleep(0.3)
    assert check(f, [a, b])[b] == held_kw  # capped, by the interim's window, and not raised
    nothing_above_held()
    # ramp_s after the decrease was taken: the raise.
    f.clock.advance(1.0)
    await f.coordinator.republish_pending()
    await wait_until(
        lambda: any(s.curtailment.max_kw > held_kw for s in f.watches[b].signals), "the raise"
    )
    await asyncio.sleep(0.2)
    raise_ = f.watches[b].signals[-1]
    assert raise_.curtailment.max_kw == raised_kw
    assert raise_.issued_at.ToNanoseconds() > interim.issued_at.ToNanoseconds()
    assert check(f, [a, b])[b] == raised_kw
    assert await f.store.fleet_published_revision(FID) == 2
    # Published in full: the coordinator keeps no interim of it (they grew without end).
    assert not [k for k in f.coordinator._interims_out if k[0] == FID]
    # A repeat of the interim (older issued_at) never replaces the raise, to the window's end.
    f.clock.advance(t0 + 4 * HOURS_S - 1.0 - f.clock.now())
    await f.coordinator.republish_pending()
    await asyncio.sleep(0.2)
    assert check(f, [a, b])[b] == raised_kw
