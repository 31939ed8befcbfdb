"""Request text the cloud cannot keep or carry is refused on purpose, INVALID_ARGUMENT naming the
field, before anything is stored; the same on SQLite and PostgreSQL. Real mTLS sockets; the
fleet cloud publishes on the real NATS.

Before: text holding a NUL reached PostgreSQL, which refuses it in a text column ("PostgreSQL text
fields cannot contain NUL (0x00) bytes"): INTERNAL for the caller's own input, while SQLite stored
it or answered as for any unknown id; an issuer larger than the broker's max_payload was stored as
a revision, then its signals failed to publish (INVALID_ARGUMENT "payload ... exceeds the broker's
max_payload") on that call and on every republish round after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_testkit import T0, Cloud, chain, stream
from evcore.audit.chain import seal
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.fleet_api_pb2 import FleetCurtailment, FleetCurtailmentRef, ListSitesRequest
from fleet_testkit import FleetCloud, site_table, start_fleet_cloud, topology

pytestmark = pytest.mark.timeout(120)


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value


async def test_a_topology_or_audit_record_holding_a_nul_is_refused_naming_the_field(
    cloud: Cloud,
) -> None:
    topo = topology(site_table("depot-1", power_limit_kw=300.0, other_load_a=0.0))
    topo.config_version = "v1\x00"
    records = chain(3)
    # Record 1 with a NUL in its decision id, sealed where it belongs in the chain.
    bad = AuditRecord()
    bad.CopyFrom(records[1])
    bad.decision_id = "1@\x00"
    records[1] = seal(bad, seq=1, prev_hash=records[0].hash)
    records[2] = seal(records[2], seq=2, prev_hash=records[1].hash)
    async with cloud.channel("depot-1") as ch:
        stub = cloud.stub(ch)
        err = await _refused(stub.PutTopology(topo))
        assert "site.config_version: holds a NUL character" in (err.details() or "")
        trailing = dict(err.trailing_metadata() or ())
        assert trailing.get("evcore-field") == "config_version"
        assert await cloud.store.topology("depot-1") is None

        err = await _refused(stub.UploadAudit(stream(records)))
        details = err.details() or ""
        assert details.startswith("seq 1: decision_id holds a NUL character"), details
        assert [r.seq for r in await cloud.store.audit_records("depot-1")] == [0]

        # The same topology without the NUL is taken.
        topo.config_version = "v1"
        assert (await stub.PutTopology(topo)).topology_version == 1


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(tmp_path, store_url, n_sites=2, fleet={"resplit_every_s": 0})
    try:
        for site in f.sites:
            async with f.channel(site) as ch:
                table = site_table(site, power_limit_kw=300.0, other_load_a=0.0)
                await f.cloud(ch).PutTopology(topology(table))
        yield f
    finally:
        await f.close()


def _request(fid: str, sites: list[str], *, issuer: str = "DSO") -> FleetCurtailment:
    r = FleetCurtailment(fleet_curtailment_id=fid, site_ids=sites, max_kw=200.0, issuer=issuer)
    r.start.FromSeconds(int(T0))
    r.end.FromSeconds(int(T0 + 3600))
    return r


async def test_fleet_ids_holding_a_nul_and_an_issuer_the_bus_cannot_carry_are_refused(
    fleet: FleetCloud,
) -> None:
    f = fleet
    a, b = f.sites
    async with f.channel("aggregator-1") as ch:
        api = f.fleet(ch)
        err = await _refused(api.Curtail(_request("f-1", [a, f"{b}\x00"])))
        assert (err.details() or "").startswith("site_ids[1]: a site id cannot hold a NUL"), err

        # 2 MB: above the broker's 1 MB max_payload, so no signal could ever carry it.
        err = await _refused(api.Curtail(_request("f-1", [a, b], issuer="DSO " * 500_000)))
        assert (err.details() or "").startswith("issuer: must be printable and at most 200"), err
        assert await f.store.fleet_curtailment("f-1") is None
        assert [len(f.watches[s].signals) for s in f.sites] == [0, 0]

        for call in (api.Resplit, api.Cancel):
            err = await _refused(call(FleetCurtailmentRef(fleet_curtailment_id="f-1\x00")))
            assert (err.details() or "").startswith("fleet_curtailment_id: must be printable")

        err = await _refused(api.ListSites(ListSitesRequest(site_ids=[a, "x\x00"])))
        assert (err.details() or "").startswith("site_ids[1]: a site id cannot hold a NUL"), err

        # The same requests without the bad text are served.
        res = await api.Curtail(_request("f-1", [a, b], issuer="DSO Nord"))
        assert res.revision == 1 and [sh.site_id for sh in res.shares] == [a, b]
        listed = await api.ListSites(ListSitesRequest(site_ids=[a]))
        assert [s.site_id for s in listed.sites] == [a]
        assert (await api.Cancel(FleetCurtailmentRef(fleet_curtailment_id="f-1"))).cancelled
    await f.wait_signals({a: 2, b: 2})
    assert f.watches[a].signals[0].curtailment.issuer == "DSO Nord"
