"""A slow broker holds back no fleet curtailment's Curtail or Cancel: what the edges took is asked
of the bus (``Bus.ack_state`` through the publisher's ``taken``/``stored``) before the coordinator
takes its lock, never while holding it. Real mTLS, the real NATS (127.0.0.1:4222), SQLite and
PostgreSQL; the cloud's publisher is wrapped to hold one site's answers back (a slow broker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from evcore.cloud.fleet import FleetCoordinator, GridPublisher
from evcore.v1.fleet_api_pb2 import FleetCurtailment, FleetCurtailmentRef
from evcore.v1.grid_pb2 import GridSignal
from fleet_testkit import (
    FleetCloud,
    put_ten_charger_topologies,
    start_fleet_cloud,
    ten_charger_demand,
)

pytestmark = pytest.mark.timeout(120)

LIMIT_KW = 300.0
FID = "evening"


class OwnedLock(asyncio.Lock):
    """The coordinator's lock, knowing which task holds it."""

    owner: asyncio.Task[object] | None = None

    async def acquire(self) -> bool:
        await super().acquire()
        self.owner = asyncio.current_task()
        return True

    def release(self) -> None:
        self.owner = None
        super().release()


class SlowBroker:
    """The cloud's publisher; its answers about one site wait until ``release`` (a broker that
    takes long to answer). Records each question asked by the task holding the coordinator's
    lock."""

    def __init__(self, inner: GridPublisher, coordinator: FleetCoordinator, site: str) -> None:
        self.inner = inner
        self.coordinator = coordinator
        self.site = site
        self.release = asyncio.Event()
        self.waiting = 0  # questions about the site waiting now
        self.asked_under_lock: list[str] = []

    async def _slow(self, site_id: str, what: str) -> None:
        lock = self.coordinator._lock
        assert isinstance(lock, OwnedLock)
        if lock.owner is not None and lock.owner is asyncio.current_task():
            self.asked_under_lock.append(f"{what} {site_id}")
        if site_id == self.site and not self.release.is_set():
            self.waiting += 1
            try:
                await self.release.wait()
            finally:
                self.waiting -= 1

    async def publish_grid(self, site_id: str, signal: GridSignal, *, event_id: str) -> None:
        await self.inner.publish_grid(site_id, signal, event_id=event_id)

    async def taken(self, site_id: str, event_id: str) -> bool:
        await self._slow(site_id, "taken")
        return await self.inner.taken(site_id, event_id)

    async def stored(self, site_id: str, event_id: str) -> bool:
        await self._slow(site_id, "stored")
        return await self.inner.stored(site_id, event_id)


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(tmp_path, store_url, fleet={"resplit_every_s": 0})
    f.coordinator._lock = OwnedLock()
    try:
        await put_ten_charger_topologies(f)
        yield f
    finally:
        await f.close()


def request(f: FleetCloud, fid: str, sites: list[str]) -> FleetCurtailment:
    r = FleetCurtailment(fleet_curtailment_id=fid, site_ids=sites, max_kw=LIMIT_KW, issuer="DSO")
    r.start.FromSeconds(int(f.clock.now()))
    r.end.FromSeconds(int(f.clock.now() + 7200))
    return r


async def test_a_slow_broker_holds_back_no_curtail_or_cancel(fleet: FleetCloud) -> None:
    f = fleet
    a, b, c = f.sites
    await ten_charger_demand(f, {a: 30.0, b: 5.0, c: 5.0})
    async with f.channel("aggregator-1") as ch:
        await f.fleet(ch).Curtail(request(f, FID, f.sites))
    await f.wait_signals({s: 1 for s in f.sites})
    await f.wait_taken(FID)
    # a's edge goes away; revision 2 lowers a (not taken: the next split asks the bus about it).
    await f.edge_offline(a)
    f.clock.advance(60.0)
    await ten_charger_demand(f, {a: 1.0, b: 30.0, c: 30.0})
    async with f.channel("aggregator-1") as ch:
        await f.fleet(ch).Resplit(FleetCurtailmentRef(fleet_curtailment_id=FID))
    slow = SlowBroker(f.coordinator._publisher, f.coordinator, a)
    f.coordinator._publisher = slow

    async with f.channel("aggregator-1") as ch:
        fleet_api = f.fleet(ch)
        # A Resplit of FID waits for the broker's answer about a ...
        resplit = asyncio.ensure_future(
            fleet_api.Resplit(FleetCurtailmentRef(fleet_curtailment_id=FID))
        )
        deadline = asyncio.get_running_loop().time() + 10.0
        while slow.waiting == 0:
            assert asyncio.get_running_loop().time() < deadline, "the Resplit never asked"
            await asyncio.sleep(0.01)
        # ... meanwhile another fleet curtailment is curtailed and cancelled without waiting.
        other = await asyncio.wait_for(fleet_api.Curtail(request(f, "other", [b, c])), 5.0)
        assert other.revision == 1
        cancelled = await asyncio.wait_for(
            fleet_api.Cancel(FleetCurtailmentRef(fleet_curtailment_id="other")), 5.0
        )
        assert cancelled.cancelled
        assert not resplit.done()
        slow.release.set()
        third = await asyncio.wait_for(resplit, 10.0)
    assert third.revision == 3
    assert slow.asked_under_lock == []
    # Its answers once given, the republish task and ListSites ask outside the lock too.
    await f.coordinator.republish_pending()
    assert slow.asked_under_lock == []


async def test_a_resplit_that_waited_for_the_broker_does_not_undo_a_cancel(
    fleet: FleetCloud,
) -> None:
    f = fleet
    a, b, c = f.sites
    await ten_charger_demand(f, {a: 30.0, b: 5.0, c: 5.0})
    async with f.channel("aggregator-1") as ch:
        await f.fleet(ch).Curtail(request(f, FID, f.sites))
    await f.wait_signals({s: 1 for s in f.sites})
    await f.wait_taken(FID)
    await f.edge_offline(a)
    f.clock.advance(60.0)
    await ten_charger_demand(f, {a: 1.0, b: 30.0, c: 30.0})
    async with f.channel("aggregator-1") as ch:
        await f.fleet(ch).Resplit(FleetCurtailmentRef(fleet_curtailment_id=FID))
    slow = SlowBroker(f.coordinator._publisher, f.coordinator, a)
    f.coordinator._publisher = slow
    async with f.channel("aggregator-1") as ch:
        fleet_api = f.fleet(ch)
        resplit = asyncio.ensure_future(
            fleet_api.Resplit(FleetCurtailmentRef(fleet_curtailment_id=FID))
        )
        deadline = asyncio.get_running_loop().time() + 10.0
        while slow.waiting == 0:
            assert asyncio.get_running_loop().time() < deadline, "the Resplit never asked"
            await asyncio.sleep(0.01)
        # The operator cancels while the Resplit waits for the broker: the cancel stands.
        cancelled = await asyncio.wait_for(
            fleet_api.Cancel(FleetCurtailmentRef(fleet_curtailment_id=FID)), 5.0
        )
        assert cancelled.cancelled and cancelled.revision == 3
        slow.release.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(resplit, 10.0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is cancelled" in (info.value.details() or "")
    held = await f.store.fleet_curtailment(FID)
    assert held is not None and held.cancelled and held.revision == 3
