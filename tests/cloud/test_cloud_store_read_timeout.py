"""The cloud store's reads are bounded by ``[store] read_timeout_s`` and its writes by
``write_timeout_s``, as the edge store's are: a
PostgreSQL server that stops answering (the path to it stalls, nothing is closed) is UNAVAILABLE
naming the call and the store within about that bound, and served again once it answers. Real
PostgreSQL through a relay that stops forwarding, real mTLS (and the command as a process).

Before: the cloud's reads had no bound; a silent server held a handler until its caller's
deadline (here DEADLINE_EXCEEDED at 8 s) and the fleet's background work (republish, re-split,
retention) for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_testkit import cloud_serve
from evcore.cloud import CloudConfig, CloudConfigError
from evcore.cloud.auth import SITE_HEADER
from evcore.store.base import StoreUnavailable
from evcore.v1 import cloud_api_pb2 as pb
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from evcore.v1.fleet_api_pb2 import ListFleetCurtailmentsRequest
from fleet_testkit import site_table, start_fleet_cloud, topology
from pg_testkit import COMMIT, StallingRelay

pytestmark = pytest.mark.timeout(60)

# The client's deadline: far beyond the store's bound, so an answer before it is the bound's.
DEADLINE_S = 8.0


@pytest.fixture
async def relay() -> AsyncIterator[StallingRelay]:
    r = StallingRelay()
    await r.start()
    yield r
    r.cut()


async def _unavailable(call: Any) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    elapsed = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), elapsed)
    return err.value.details() or "", elapsed


def test_read_timeout_s_is_a_store_key_of_the_cloud_config(tmp_path: Path) -> None:
    base = {"insecure": True}
    assert CloudConfig.from_table({**base, "store": {"url": "sqlite:x"}}).store_read_timeout_s == 10
    cfg = CloudConfig.from_table({**base, "store": {"url": "sqlite:x", "read_timeout_s": 0.5}})
    assert cfg.store_read_timeout_s == 0.5
    for bad in (0, -1, "1"):
        with pytest.raises(CloudConfigError, match=r"read_timeout_s"):
            CloudConfig.from_table({**base, "store": {"url": "sqlite:x", "read_timeout_s": bad}})


async def test_a_silent_postgresql_is_unavailable_within_the_read_timeout_then_served(
    relay: StallingRelay, pg_schema: str, tmp_path: Path
) -> None:
    f = await start_fleet_cloud(
        tmp_path,
        relay.store_url(pg_schema),
        n_sites=1,
        fleet={"resplit_every_s": 0, "republish_every_s": 0},
        store={"read_timeout_s": 0.5},
    )
    try:
        (site,) = f.sites
        async with f.channel(site) as site_ch, f.channel("viewer-1") as op_ch:
            cloud, api = f.cloud(site_ch), f.fleet(op_ch)
            table = site_table(site, power_limit_kw=300.0, other_load_a=0.0)
            assert (await cloud.PutTopology(topology(table))).topology_version == 1

            relay.stall()
            details, took = await _unavailable(
                cloud.GetPlan(pb.GetPlanRequest(site_id=site), timeout=DEADLINE_S)
            )
            assert took < 4.0, took
            assert details.startswith(
                f"GetPlan: store unavailable: PostgreSQL store (schema {pg_schema!r})"
            ), details
            assert "read_timeout_s = 0.5" in details, details
            details, took = await _unavailable(
                api.List(ListFleetCurtailmentsRequest(), timeout=DEADLINE_S)
            )
            assert took < 4.0, took
            assert details.startswith("List: store unavailable: PostgreSQL store"), details
            # Background work (the republish round reads the store first) ends too.
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(f.coordinator.republish_pending(), DEADLINE_S)
            assert time.monotonic() - t0 < 4.0

            relay.resume()

            async def served() -> None:
                with pytest.raises(grpc.aio.AioRpcError) as none:
                    await cloud.GetPlan(pb.GetPlanRequest(site_id=site), timeout=DEADLINE_S)
                assert none.value.code() == grpc.StatusCode.NOT_FOUND, none.value.details()

            # The connection behind a dropped one may still be connecting (a caller that gave up
            # does not stop it): at most one more UNAVAILABLE, then served.
            try:
                await served()
            except AssertionError:
                await asyncio.sleep(1.0)
                await served()
            assert (await api.List(ListFleetCurtailmentsRequest())).curtailments == []
    finally:
        relay.resume()
        await f.close()


async def test_the_command_bounds_reads_by_its_config(
    relay: StallingRelay, pg_schema: str, tmp_path: Path
) -> None:
    """``evcore cloud serve`` takes ``[store] read_timeout_s`` from its config file."""
    config = tmp_path / "cloud.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\ninsecure = true\nstop_grace_s = 0.5\n[retention]\n'
        "telemetry_days = 0\nplans_keep = 0\n"
        f'[store]\nurl = "{relay.store_url(pg_schema)}"\nread_timeout_s = 0.5\n'
    )
    async with cloud_serve(config) as proc:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "CloudApi on port" in line, line
        port = int(line.split("CloudApi on port ")[1].split(",")[0])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CloudApiStub(ch)
            meta = ((SITE_HEADER, "depot-1"),)
            with pytest.raises(grpc.aio.AioRpcError) as none:
                await stub.GetPlan(pb.GetPlanRequest(site_id="depot-1"), metadata=meta)
            assert none.value.code() == grpc.StatusCode.NOT_FOUND
            relay.stall()
            details, took = await _unavailable(
                stub.GetPlan(
                    pb.GetPlanRequest(site_id="depot-1"), metadata=meta, timeout=DEADLINE_S
                )
            )
        assert took < 4.0, took
        assert details.startswith("GetPlan: store unavailable: PostgreSQL store"), details
        assert "read_timeout_s = 0.5" in details, details
        relay.resume()


async def test_a_postgresql_silent_during_a_write_is_unavailable_within_the_write_timeout(
    relay: StallingRelay, pg_schema: str, tmp_path: Path
) -> None:
    """A write whose COMMIT never reaches a server that stays silent: UNAVAILABLE naming the
    store within about ``write_timeout_s``, then served again on a new connection. Before, the
    cloud's writes had no bound: the store's one worker waited for TCP keepalive (about 2 h)
    and the call ended at the client's deadline (DEADLINE_EXCEEDED at 8 s), every later call
    queued behind it."""
    f = await start_fleet_cloud(
        tmp_path,
        relay.store_url(pg_schema) + "&sslmode=disable",  # the marker is read in plain bytes
        n_sites=1,
        fleet={"resplit_every_s": 0, "republish_every_s": 0},
        store={"read_timeout_s": 0.5, "write_timeout_s": 0.5},
    )
    try:
        (site,) = f.sites
        async with f.channel(site) as site_ch:
            cloud = f.cloud(site_ch)
            table = site_table(site, power_limit_kw=300.0, other_load_a=0.0)
            assert (await cloud.PutTopology(topology(table))).topology_version == 1
            relay.stall_on(COMMIT, deliver=False)
            changed = site_table(site, power_limit_kw=250.0, other_load_a=0.0)
            details, took = await _unavailable(
                cloud.PutTopology(topology(changed), timeout=DEADLINE_S)
            )
            assert relay.stalled.is_set()
            assert took < 4.0, took
            assert details.startswith("PutTopology: store unavailable: PostgreSQL store"), details
            assert "write_timeout_s = 0.5" in details, details
            # Idempotent: the retry stores it (once).
            assert (await cloud.PutTopology(topology(changed))).topology_version == 2
    finally:
        await f.close()
