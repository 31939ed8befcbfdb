"""Revisions of a fleet curtailment are issued in order even when the cloud's wall clock steps
back: each revision's (and cancel's) ``split_at``, the GridSignals' ``issued_at``, is at least
1 µs after the previous one's, also across a cloud restart. Real mTLS, the real NATS
(127.0.0.1:4222); the signals each site receives are applied with the edge's ordering rule
(``CurtailmentBook.revision_is_older``); SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloud_testkit import T0
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, open_cloud_store
from evcore.edge.grid import Curtailment, CurtailmentBook
from evcore.v1.fleet_api_pb2 import FleetCurtailment, FleetCurtailmentRef
from evcore.v1.grid_pb2 import GridSignal
from fleet_testkit import FleetCloud, site_table, start_fleet_cloud, topology
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.timeout(120)


class SteppedClock(ManualClock):
    """A ManualClock whose wall time can also step back (NTP correcting a fast clock)."""

    def step_back(self, seconds: float) -> None:
        self._now -= seconds


def _s(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def edge_book(signals: list[GridSignal]) -> CurtailmentBook:
    """``signals`` applied in order as the edge does: one issued before the revision held of its
    id is ignored (evcore.edge.signals.apply_grid_signal)."""
    book = CurtailmentBook({"grid"}, lead_s=0.0)
    for sig in signals:
        c = sig.curtailment
        issued = _s(sig.issued_at)
        if book.revision_is_older(c.curtailment_id, issued):
            continue
        if c.cancelled:
            book.cancel(c.curtailment_id)
        else:
            book.add(Curtailment(c.curtailment_id, c.node_id, c.max_kw, _s(c.start), _s(c.end)))
        book.note_revision(c.curtailment_id, issued, _s(c.end))
    return book


def request(sites: list[str], max_kw: float) -> FleetCurtailment:
    r = FleetCurtailment(fleet_curtailment_id="dso-1", site_ids=sites, max_kw=max_kw, issuer="DSO")
    r.start.FromSeconds(int(T0 + 600))
    r.end.FromSeconds(int(T0 + 7800))
    return r


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[tuple[FleetCloud, SteppedClock]]:
    clock = SteppedClock(T0)
    f = await start_fleet_cloud(tmp_path, store_url, clock=clock)
    try:
        for site, limit in zip(f.sites, (300.0, 250.0, 150.0), strict=True):
            async with f.channel(site) as ch:
                await f.cloud(ch).PutTopology(
                    topology(site_table(site, power_limit_kw=limit, other_load_a=10.0))
                )
        yield f, clock
    finally:
        await f.close()


async def test_a_revision_after_the_clock_stepped_back_is_issued_later_and_taken(
    fleet: tuple[FleetCloud, SteppedClock],
) -> None:
    f, clock = fleet
    async with f.channel("aggregator-1") as ch:
        first = await f.fleet(ch).Curtail(request(f.sites, 400.0))
    await f.wait_signals({s: 1 for s in f.sites})
    clock.step_back(5.0)
    async with f.channel("aggregator-1") as ch:
        second = await f.fleet(ch).Curtail(request(f.sites, 200.0))
    await f.wait_signals({s: 2 for s in f.sites})
    assert second.revision == 2
    assert _s(second.split_at) > _s(first.split_at) == T0
    shares = {sh.site_id: sh.max_kw for sh in second.shares}
    assert sum(shares.values()) <= 200.0 + 1e-9
    for site in f.sites:
        sigs = f.watches[site].signals
        assert _s(sigs[1].issued_at) > _s(sigs[0].issued_at)
        assert [(c.signal_id, c.max_kw) for c in edge_book(sigs)] == [
            (f"fleet:dso-1:{site}", shares[site])
        ]

    # A restart, the clock back another 5 s, then a cancel: issued after revision 2 still.
    await f.server.stop(0.5)
    await f.store.close()
    f.store = open_cloud_store(f.server.config.store_url)
    f.server = CloudApiServer(f.server.config, f.store, clock=f.clock)
    f.port = await f.server.start()
    clock.step_back(5.0)
    async with f.channel("aggregator-1") as ch:
        cancel = await f.fleet(ch).Cancel(FleetCurtailmentRef(fleet_curtailment_id="dso-1"))
    await f.wait_signals({s: 3 for s in f.sites})
    assert cancel.revision == 3 and _s(cancel.split_at) > _s(second.split_at)
    for site in f.sites:
        sigs = f.watches[site].signals
        assert sigs[2].curtailment.cancelled
        assert _s(sigs[2].issued_at) > _s(sigs[1].issued_at)
        assert list(edge_book(sigs)) == []
