"""An edge that never takes its decrease (offline for good, broken) holds back no other site's
increase for longer than ``[fleet] ack_timeout_s``: the cloud splits again counting that site at
what it may still hold and shares only the rest among the others, whose increases then go out
(break before make among themselves) while the fleet limit holds at every moment; when the edge
comes back and takes its signals, the normal split resumes. Real mTLS, the real NATS
(127.0.0.1:4222), each site's grid subject read into the edge's CurtailmentBook through the
durable ``edge-grid``; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloud_testkit import run_evcore
from evcore.cloud.fleet import may_hold_kw
from evcore.cloud.store import FleetSiteSignal
from evcore.v1.fleet_api_pb2 import (
    FleetCurtailment,
    FleetCurtailmentRef,
    ListFleetCurtailmentsRequest,
    ListSitesRequest,
    SiteFleetShare,
)
from fleet_testkit import (
    FleetCloud,
    Sampler,
    put_ten_charger_topologies,
    start_fleet_cloud,
    ten_charger_demand,
)

pytestmark = pytest.mark.timeout(120)

LIMIT_KW = 300.0
FID = "evening"
ACK_TIMEOUT_S = 100.0


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(
        tmp_path, store_url, fleet={"resplit_every_s": 0, "ack_timeout_s": ACK_TIMEOUT_S}
    )
    try:
        await put_ten_charger_topologies(f)
        yield f
    finally:
        await f.close()


async def first_revision(f: FleetCloud) -> tuple[FleetCurtailment, dict[str, float]]:
    """Revision 1 of the fleet curtailment at ``LIMIT_KW``, taken by every edge: a high, b
    middle, c low by demand. The request (to send again) and each site's share."""
    a, b, c = f.sites
    await ten_charger_demand(f, {a: 30.0, b: 20.0, c: 1.0})
    r = FleetCurtailment(fleet_curtailment_id=FID, site_ids=f.sites, max_kw=LIMIT_KW, issuer="DSO")
    r.start.FromSeconds(int(f.clock.now()))
    r.end.FromSeconds(int(f.clock.now() + 7200))
    async with f.channel("aggregator-1") as ch:
        first = {sh.site_id: sh.max_kw for sh in (await f.fleet(ch).Curtail(r)).shares}
    await f.wait_signals({s: 1 for s in f.sites})
    await f.wait_taken(FID)
    return r, first


async def fleet_shares(f: FleetCloud) -> dict[str, SiteFleetShare]:
    """Each site's share of the fleet curtailment as ListSites shows it."""
    async with f.channel("viewer-1") as ch:
        listed = await f.fleet(ch).ListSites(ListSitesRequest())
    return {
        st.site_id: sh
        for st in listed.sites
        for sh in st.fleet_shares
        if sh.fleet_curtailment_id == FID
    }


def held(f: FleetCloud) -> dict[str, float]:
    return {s: round(w.held_kw(), 3) for s, w in f.watches.items()}


async def may_hold_total_kw(f: FleetCloud) -> float:
    """Σ over the sites of what each may hold as the cloud's store says (its newest signal the
    edge took, or the higher of those sent after it)."""
    by_site: dict[str, list[FleetSiteSignal]] = {}
    for sig in await f.store.fleet_site_signals(FID):
        by_site.setdefault(sig.site_id, []).append(sig)
    return sum(may_hold_kw(by_site.get(s, [])) for s in f.sites)


async def step(f: FleetCloud, sampler: Sampler, advance_s: float) -> None:
    """``advance_s`` on the clock, a round of the republish task, and both sums checked."""
    f.clock.advance(advance_s)
    await f.coordinator.republish_pending()
    await asyncio.sleep(0.3)
    assert sampler.look() <= LIMIT_KW, held(f)
    total = await may_hold_total_kw(f)
    assert math.isfinite(total) and total <= LIMIT_KW + 1e-6, total


async def latest(f: FleetCloud) -> tuple[int, dict[str, float], str]:
    res = await f.store.fleet_curtailment(FID)
    assert res is not None
    return int(res.revision), {sh.site_id: sh.max_kw for sh in res.shares}, res.detail


async def test_a_site_that_never_takes_its_decrease_holds_back_the_others_until_the_timeout(
    fleet: FleetCloud, tmp_path: Path
) -> None:
    f = fleet
    a, b, c = f.sites
    assert f.coordinator.ack_timeout_s == ACK_TIMEOUT_S  # [fleet] ack_timeout_s reached it
    # Revision 1, taken by every edge: a high, b middle, c low.
    _, first = await first_revision(f)
    assert first[a] > first[b] > first[c], first
    with Sampler(f) as sampler:
        # a's edge goes away for good; the demand moves to c; revision 2 lowers a and b and
        # raises c, whose increase waits for a.
        await f.edge_offline(a)
        f.clock.advance(120.0)
        await ten_charger_demand(f, {a: 1.0, b: 1.0, c: 30.0})
        async with f.channel("aggregator-1") as ch:
            await f.fleet(ch).Resplit(FleetCurtailmentRef(fleet_curtailment_id=FID))
        rev, second, _ = await latest(f)
        assert rev == 2 and second[a] < first[a] and second[b] < first[b] < second[c], second
        await f.wait_signals({b: 2})
        # Until ack_timeout_s has passed since a's decrease went out, c's increase waits.
        for _ in range(3):
            await step(f, sampler, (ACK_TIMEOUT_S - 1.0) / 3)
        assert (await latest(f))[0] == 2
        assert [len(f.watches[s].signals) for s in f.sites] == [1, 2, 1]
        plan = await f.coordinator.revision_plan(FID)
        assert plan.waiting_for == [a] and [sh.site_id for sh in plan.increases] == [c]

        # The timeout: revision 3 counts a at what it may hold (its revision 1 share) and splits
        # the rest over b and c: b lower still (out at once), c higher (after b took its
        # decrease and ramp_s, not waiting for a).
        await step(f, sampler, 1.0)
        rev, third, detail = await latest(f)
        assert rev == 3, detail
        assert "COUNTED at what they may still hold" in detail and f"{a} {first[a]:.3f}" in detail
        assert third[a] == second[a]  # its decrease stands, for when its edge comes back
        assert third[b] + third[c] <= LIMIT_KW - first[a] + 1e-6, third
        assert third[b] < second[b] and first[c] < third[c] < second[c], third
        await f.wait_signals({b: 3})
        await f.wait_taken(FID)  # b took its decrease; a is counted, not waited for
        plan = await f.coordinator.revision_plan(FID)
        assert plan.counted == {a: first[a]} and [sh.site_id for sh in plan.increases] == [c]
        await step(f, sampler, f.coordinator.ramp_s - 1.0)
        assert len(f.watches[c].signals) == 1  # not before ramp_s after b's decrease
        await step(f, sampler, 1.0)
        await f.wait_signals({c: 2})
        await step(f, sampler, 0.0)
        # c got its increase while a is still silent, holding its revision 1 share.
        assert len(f.watches[a].signals) == 1
        assert held(f) == {a: round(first[a], 3), b: round(third[b], 3), c: round(third[c], 3)}
        assert await f.store.fleet_published_revision(FID) == 3
        async with f.channel("viewer-1") as ch:
            listed = await f.fleet(ch).List(ListFleetCurtailmentsRequest())
        assert "COUNTED" in listed.curtailments[0].detail
        # ListSites names it too: a is counted at what it may hold since its decrease went out
        # untaken; b and c took theirs.
        shares = await fleet_shares(f)
        assert shares[a].counted_unresponsive and shares[a].counted_kw == pytest.approx(first[a])
        assert shares[a].HasField("untaken_since")
        assert f.clock.now() - shares[a].untaken_since.ToSeconds() >= ACK_TIMEOUT_S
        for s in (b, c):
            assert not shares[s].counted_unresponsive and not shares[s].HasField("untaken_since")
        tls = ["--target", f"127.0.0.1:{f.port}", "--ca", str(tmp_path / "sites_CA.pem")]
        tls += ["--cert", str(tmp_path / "viewer-1.crt"), "--key", str(tmp_path / "viewer-1.key")]
        code, out, err = await run_evcore("cloud", "sites", *tls, "--site", a)
        assert code == 0, err
        assert f"COUNTED at {first[a]:.3f} kW" in out and "signals untaken since" in out, out
        # Later rounds change nothing while a stays away (no re-split every round).
        for _ in range(3):
            await step(f, sampler, ACK_TIMEOUT_S)
        assert (await latest(f))[0] == 3

        # a comes back and takes revisions 2 and 3: the normal split resumes (revision 4, no
        # site counted), its increases after ramp_s.
        await f.edge_online(a)
        await f.wait_signals({a: 3})
        await f.wait_taken(FID)
        await step(f, sampler, 0.0)
        rev, fourth, detail = await latest(f)
        assert rev == 4 and "COUNTED" not in detail, detail
        assert fourth[b] > third[b] and fourth[c] > third[c], fourth
        assert abs(sum(fourth.values()) - LIMIT_KW) < 0.01, fourth
        await f.release_increases(FID)
        await f.wait_signals({b: 4, c: 3})
        await step(f, sampler, 0.0)
        assert held(f) == {s: round(fourth[s], 3) for s in f.sites}
        shares = await fleet_shares(f)
        assert not any(sh.counted_unresponsive for sh in shares.values()), shares
    assert sampler.max_kw <= LIMIT_KW, sampler.max_kw


async def test_a_limit_that_only_goes_down_lowers_the_others_for_a_site_that_never_takes_it(
    fleet: FleetCloud,
) -> None:
    """No increase waits (the DSO only lowers the limit), so nothing held the others back, but a
    site whose edge never takes its decrease still holds its old share: the fleet was over its
    limit for as long as the edge stayed away. After ack_timeout_s the cloud splits again counting
    it at what it may hold: the others go lower (feasible), or to their floors with the shortfall
    named when even that is not enough."""
    f = fleet
    a, b, c = f.sites
    r, first = await first_revision(f)
    await f.edge_offline(a)
    # The DSO lowers the limit to 200 kW: every share goes down, a's is never taken.
    r.max_kw = 200.0
    async with f.channel("aggregator-1") as ch:
        second = {sh.site_id: sh.max_kw for sh in (await f.fleet(ch).Curtail(r)).shares}
    assert all(second[s] < first[s] for s in f.sites), (first, second)
    await f.wait_signals({b: 2, c: 2})
    # The books: a still at its first share, the fleet over 200 kW.
    assert sum(held(f).values()) > 200.0 + 1.0, held(f)
    f.clock.advance(ACK_TIMEOUT_S - 1.0)
    await f.coordinator.republish_pending()
    assert (await latest(f))[0] == 2  # not before ack_timeout_s
    f.clock.advance(1.0)
    await f.coordinator.republish_pending()
    rev, third, detail = await latest(f)
    assert rev == 3 and "COUNTED" in detail, detail
    assert third[b] + third[c] <= 200.0 - first[a] + 1e-6 and third[b] < second[b], third
    await f.wait_signals({b: 3, c: 3})
    await asyncio.sleep(0.3)
    assert sum(held(f).values()) <= 200.0 + 1e-3, held(f)
    shares = await fleet_shares(f)
    assert shares[a].counted_unresponsive and shares[a].counted_kw == pytest.approx(first[a])
    # Lower still, below what a may hold: the others at their floors (0 kW here), the split
    # infeasible by the rest.
    r.max_kw = 150.0
    async with f.channel("aggregator-1") as ch:
        fourth = await f.fleet(ch).Curtail(r)
    by_site = {sh.site_id: sh.max_kw for sh in fourth.shares}
    assert not fourth.feasible and by_site[b] == by_site[c] == 0.0, fourth
    assert fourth.shortfall_kw == pytest.approx(first[a] - 150.0, abs=1e-3), fourth
    await f.wait_signals({b: 4, c: 4})
    await asyncio.sleep(0.3)
    assert held(f) == {a: round(first[a], 3), b: 0.0, c: 0.0}
