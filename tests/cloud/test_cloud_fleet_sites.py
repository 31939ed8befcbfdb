"""FleetApi.ListSites (and ``evcore cloud sites``) over the real mTLS socket: each site's audit
progress, newest audit record and telemetry, topology version and fleet share change as the sites
upload; operators only; SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cloud_testkit import T0, chain, run_evcore, stream
from evcore.v1.fleet_api_pb2 import (
    FleetCurtailment,
    FleetCurtailmentRef,
    ListSitesRequest,
    ListSitesResponse,
    SiteStatus,
)
from fleet_testkit import FleetCloud, batch, site_table, start_fleet_cloud, topology

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(tmp_path, store_url)
    try:
        for site, limit in zip(f.sites[:2], (300.0, 250.0), strict=True):
            async with f.channel(site) as ch:
                await f.cloud(ch).PutTopology(
                    topology(site_table(site, power_limit_kw=limit, other_load_a=20.0))
                )
        yield f
    finally:
        await f.close()


async def sites(f: FleetCloud, *only: str, who: str = "viewer-1") -> ListSitesResponse:
    async with f.channel(who) as ch:
        return await f.fleet(ch).ListSites(ListSitesRequest(site_ids=only))


def by_site(res: ListSitesResponse) -> dict[str, SiteStatus]:
    return {st.site_id: st for st in res.sites}


async def test_site_status_follows_the_uploads(fleet: FleetCloud) -> None:
    f = fleet
    a, b, c = f.sites  # c has sent nothing yet
    st = by_site(await sites(f))
    assert sorted(st) == [a, b]
    assert (st[a].topology_version, st[a].audit_held, st[a].audit_contiguous_count) == (1, False, 0)
    assert not st[a].HasField("telemetry_last_sample_at")
    assert not st[a].HasField("audit_last_decided_at")
    assert st[a].last_seen_at.seconds == st[a].topology_stored_at.seconds == T0
    assert list(st[a].fleet_shares) == []

    # Site a uploads seq 0..2, then seq 4 (a gap at 3): the last seq moves, the gap-free count not.
    records = chain(5)
    f.clock.advance(10.0)
    async with f.channel(a) as ch:
        await f.cloud(ch).UploadAudit(stream(records[:3]))
    st = by_site(await sites(f))
    assert (st[a].audit_held, st[a].audit_last_seq, st[a].audit_contiguous_count) == (True, 2, 3)
    assert st[a].audit_last_decided_at.seconds == T0 + 2
    assert st[a].last_seen_at.seconds == T0 + 10
    async with f.channel(a) as ch:
        await f.cloud(ch).UploadAudit(stream([records[4]]))
    st = by_site(await sites(f))
    assert (st[a].audit_last_seq, st[a].audit_contiguous_count) == (4, 3)
    async with f.channel(a) as ch:
        await f.cloud(ch).UploadAudit(stream([records[3]]))
    assert by_site(await sites(f))[a].audit_contiguous_count == 5
    assert by_site(await sites(f))[b].audit_held is False

    # Telemetry: the newest sample time, and when it was stored.
    f.clock.advance(10.0)
    async with f.channel(b) as ch:
        await f.cloud(ch).UploadTelemetry(stream([batch(T0 - 60, {"C0": 10.0})]))
    st = by_site(await sites(f))
    assert st[b].telemetry_last_sample_at.seconds == T0 - 60
    assert st[b].telemetry_last_stored_at.seconds == st[b].last_seen_at.seconds == T0 + 20
    f.clock.advance(10.0)
    async with f.channel(b) as ch:
        await f.cloud(ch).UploadTelemetry(stream([batch(T0 + 25, {"C0": 12.0})]))
    assert by_site(await sites(f))[b].telemetry_last_sample_at.seconds == T0 + 25
    # A new site appears with its first upload; a new topology is a new version.
    async with f.channel(c) as ch:
        await f.cloud(ch).UploadTelemetry(stream([batch(T0, {"C1": 8.0})]))
    async with f.channel(a) as ch:
        await f.cloud(ch).PutTopology(
            topology(site_table(a, power_limit_kw=280.0, other_load_a=20.0))
        )
    st = by_site(await sites(f))
    assert sorted(st) == [a, b, c]
    assert (st[c].topology_version, st[c].audit_held) == (0, False)
    assert st[a].topology_version == 2

    # A fleet curtailment over a and b: each one's share with the floor and grid limit used.
    req = FleetCurtailment(fleet_curtailment_id="dso-9", site_ids=[a, b], max_kw=200.0)
    req.start.FromSeconds(int(T0 + 600))
    req.end.FromSeconds(int(T0 + 7800))
    async with f.channel("aggregator-1") as ch:
        res = await f.fleet(ch).Curtail(req)
    split = {sh.site_id: sh for sh in res.shares}
    st = by_site(await sites(f))
    for site, limit in ((a, 280.0), (b, 250.0)):
        [fs] = st[site].fleet_shares
        assert (fs.fleet_curtailment_id, fs.revision, fs.published) == ("dso-9", 1, True)
        assert fs.share.max_kw == split[site].max_kw
        assert (fs.share.floor_kw, fs.share.grid_limit_kw) == pytest.approx((13.8, limit))
        assert not fs.in_force  # starts at T0 + 600
    assert list(st[c].fleet_shares) == []
    f.clock.advance(600.0)
    assert by_site(await sites(f, a))[a].fleet_shares[0].in_force
    async with f.channel("aggregator-1") as ch:
        await f.fleet(ch).Cancel(FleetCurtailmentRef(fleet_curtailment_id="dso-9"))
    assert [list(s.fleet_shares) for s in (await sites(f)).sites] == [[], [], []]

    # Only the sites asked for; one the cloud holds nothing of is NOT_FOUND.
    assert [s.site_id for s in (await sites(f, b)).sites] == [b]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sites(f, b, "nowhere")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nowhere'" in (info.value.details() or "")


async def test_a_site_certificate_may_not_list_sites(fleet: FleetCloud) -> None:
    f = fleet
    for who in (f.sites[0], "stranger"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sites(f, who=who)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, who
    # Every configured operator role may.
    assert len((await sites(f, who="aggregator-1")).sites) == 2


async def _cli(*args: str) -> tuple[int, str, str]:
    return await run_evcore("cloud", "sites", *args)


async def test_the_sites_command(fleet: FleetCloud, tmp_path: Path) -> None:
    f = fleet
    a, b, _ = f.sites
    async with f.channel(a) as ch:
        await f.cloud(ch).UploadAudit(stream(chain(4)))

    def tls(who: str) -> list[str]:
        return [
            "--target",
            f"127.0.0.1:{f.port}",
            "--ca",
            str(tmp_path / "sites_CA.pem"),
            "--cert",
            str(tmp_path / f"{who}.crt"),
            "--key",
            str(tmp_path / f"{who}.key"),
        ]

    code, out, err = await _cli(*tls("viewer-1"), "--json")
    assert code == 0, err
    got = {s["site_id"]: s for s in json.loads(out)["sites"]}
    assert sorted(got) == [a, b]
    assert (got[a]["audit_last_seq"], got[a]["audit_contiguous_count"]) == ("3", "4")
    assert got[b]["audit_held"] is False and got[b]["topology_version"] == "1"
    code, out, err = await _cli(*tls("viewer-1"), "--site", b)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["site", "topo", "audit"] and len(lines) == 2
    assert lines[1].split()[:4] == [b, "1", "-", "0"], out
    code, out, err = await _cli(*tls(a))
    assert code == 2 and "PERMISSION_DENIED" in err, err
