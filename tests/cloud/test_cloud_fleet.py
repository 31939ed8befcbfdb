"""Fleet curtailments through the FleetApi on a real mTLS socket: split over three sites whose
topologies and telemetry came in through CloudApi, published on each site's grid subject on the
real NATS (127.0.0.1:4222), re-split and cancelled by id; operators only; bad input named."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cloud_testkit import T0, run_evcore, stream
from evcore.v1.fleet_api_pb2 import (
    DemandSource,
    FleetCurtailment,
    FleetCurtailmentRef,
    ListFleetCurtailmentsRequest,
)
from fleet_testkit import FleetCloud, batch, site_table, start_fleet_cloud, topology

pytestmark = pytest.mark.timeout(120)

# Site a: 300 kW connection, 40 A/phase other load (27.6 kW floor), charging 6 x 20 A (82.8 kW).
# Site b: 250 kW, 20 A/phase (13.8 kW floor), charging 2 x 32 A held at their offer (2 x 22.08).
# Site c: 150 kW, no other load, no telemetry: its 6 chargers at 22.08 kW (132.48 kW).
LIMITS_KW = (300.0, 250.0, 150.0)
OTHER_A = (40.0, 20.0, 0.0)


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(tmp_path, store_url)
    try:
        for site, limit, other in zip(f.sites, LIMITS_KW, OTHER_A, strict=True):
            async with f.channel(site) as ch:
                table = site_table(site, power_limit_kw=limit, other_load_a=other)
                ack = await f.cloud(ch).PutTopology(topology(table))
                assert ack.topology_version == 1
        a, b, _ = f.sites
        async with f.channel(a) as ch:
            await f.cloud(ch).UploadTelemetry(
                stream([batch(T0 - 60, {f"C{i}": 20.0 for i in range(6)})])
            )
        async with f.channel(b) as ch:
            await f.cloud(ch).UploadTelemetry(
                stream([batch(T0 - 30, {"C0": 31.5, "C1": 31.8}, offered_a=32.0)])
            )
        yield f
    finally:
        await f.close()


def request(f: FleetCloud, max_kw: float, *, fid: str = "dso-evening-1", **kw: object) -> object:
    r = FleetCurtailment(
        fleet_curtailment_id=fid, site_ids=kw.pop("sites", f.sites), max_kw=max_kw, issuer="DSO"
    )
    r.start.FromSeconds(int(kw.pop("start", T0 + 600)))
    r.end.FromSeconds(int(kw.pop("end", T0 + 7800)))
    for k, v in kw.items():
        setattr(r, k, v)
    return r


async def test_a_fleet_limit_is_split_published_resplit_and_cancelled_by_id(
    fleet: FleetCloud,
) -> None:
    f = fleet
    a, b, c = f.sites
    async with f.channel("aggregator-1") as ch:
        res = await f.fleet(ch).Curtail(request(f, 400.0))
    assert (res.revision, res.feasible, res.shortfall_kw) == (1, True, 0.0)
    shares = {s.site_id: s for s in res.shares}
    assert [s.site_id for s in res.shares] == f.sites
    assert shares[a].floor_kw == pytest.approx(27.6)
    assert shares[b].floor_kw == pytest.approx(13.8)
    assert shares[c].floor_kw == 0.0
    assert shares[a].demand_kw == pytest.approx(82.8)
    assert shares[b].demand_kw == pytest.approx(2 * 22.08)
    assert shares[c].demand_kw == pytest.approx(6 * 22.08)
    assert [shares[s].demand_source for s in f.sites] == [
        DemandSource.DEMAND_SOURCE_TELEMETRY,
        DemandSource.DEMAND_SOURCE_TELEMETRY,
        DemandSource.DEMAND_SOURCE_INSTALLED,
    ]
    assert sum(s.max_kw for s in res.shares) <= 400.0 + 1e-9
    assert sum(s.max_kw for s in res.shares) == pytest.approx(400.0, abs=0.003)
    for s, limit in zip(res.shares, LIMITS_KW, strict=True):
        assert s.floor_kw <= s.max_kw <= limit == s.grid_limit_kw
    # Above the floors, 358.6 kW shared by demand 82.8 : 44.16 : 132.48 would give c 183 kW,
    # above its 150 kW connection: c is full, and a and b share the other 208.6 kW 82.8 : 44.16.
    assert shares[c].max_kw == 150.0
    rest = 400.0 - 27.6 - 13.8 - 150.0
    assert shares[a].max_kw == pytest.approx(27.6 + rest * 82.8 / (82.8 + 44.16), abs=0.002)
    assert shares[b].max_kw == pytest.approx(13.8 + rest * 44.16 / (82.8 + 44.16), abs=0.002)

    # Every site's grid subject got its Curtailment at its grid connection.
    await f.wait_signals({s: 1 for s in f.sites})
    for site in f.sites:
        sig = f.watches[site].signals[0]
        cur = sig.curtailment
        assert cur.curtailment_id == f"fleet:dso-evening-1:{site}" == shares[site].curtailment_id
        assert (cur.node_id, cur.max_kw, cur.cancelled) == ("grid", shares[site].max_kw, False)
        assert (cur.start.seconds, cur.end.seconds, cur.issuer) == (T0 + 600, T0 + 7800, "DSO")
        assert sig.signal_id == f"{cur.curtailment_id}#r1"

    # Site c starts reporting: 2 chargers at 10 A. A re-split replaces every site's curtailment.
    async with f.channel(c) as ch:
        await f.cloud(ch).UploadTelemetry(stream([batch(T0 - 10, {"C0": 10.0, "C1": 10.0})]))
    async with f.channel("aggregator-1") as ch:
        res2 = await f.fleet(ch).Resplit(FleetCurtailmentRef(fleet_curtailment_id="dso-evening-1"))
    shares2 = {s.site_id: s for s in res2.shares}
    assert res2.revision == 2
    assert shares2[c].demand_kw == pytest.approx(2 * 6.9)
    assert shares2[c].max_kw < shares[c].max_kw and shares2[a].max_kw > shares[a].max_kw
    assert sum(s.max_kw for s in res2.shares) <= 400.0 + 1e-9
    # Break before make: c's decrease goes out at once; a's and b's increases only once c's edge
    # took it and [fleet] ramp_s passed.
    assert "increases at" in res2.detail and c in res2.detail, res2.detail
    await f.wait_signals({c: 2})
    assert [len(f.watches[s].signals) for s in (a, b)] == [1, 1]
    await f.release_increases("dso-evening-1")
    await f.wait_signals({s: 2 for s in f.sites})
    for site in f.sites:
        book = list(f.watches[site].book)
        # One curtailment per site (replaced by id), at the new share.
        assert [(x.signal_id, x.max_kw) for x in book] == [
            (f"fleet:dso-evening-1:{site}", shares2[site].max_kw)
        ]

    # The same id again over a and b only: c's curtailment is cancelled.
    async with f.channel("aggregator-1") as ch:
        res3 = await f.fleet(ch).Curtail(request(f, 200.0, sites=[a, b]))
    assert res3.revision == 3 and [s.site_id for s in res3.shares] == [a, b]
    assert c in res3.detail
    await f.wait_signals({s: 3 for s in f.sites})
    assert f.watches[c].signals[-1].curtailment.cancelled
    assert list(f.watches[c].book) == []
    assert sum(x.max_kw for s in (a, b) for x in f.watches[s].book) <= 200.0 + 1e-9

    # Cancel: every site of the latest split gets cancelled = true.
    async with f.channel("aggregator-1") as ch:
        res4 = await f.fleet(ch).Cancel(FleetCurtailmentRef(fleet_curtailment_id="dso-evening-1"))
        listed = await f.fleet(ch).List(ListFleetCurtailmentsRequest())
        listed_all = await f.fleet(ch).List(ListFleetCurtailmentsRequest(include_cancelled=True))
    assert (res4.revision, res4.cancelled) == (4, True)
    await f.wait_signals({a: 4, b: 4})
    for site in (a, b):
        assert f.watches[site].signals[-1].curtailment.cancelled
        assert list(f.watches[site].book) == []
    assert list(listed.curtailments) == []
    assert [(x.curtailment.fleet_curtailment_id, x.revision) for x in listed_all.curtailments] == [
        ("dso-evening-1", 4)
    ]
    # A cancelled one cannot be re-split; an unknown one is not found.
    async with f.channel("aggregator-1") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.fleet(ch).Resplit(FleetCurtailmentRef(fleet_curtailment_id="dso-evening-1"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.fleet(ch).Cancel(FleetCurtailmentRef(fleet_curtailment_id="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_floors_above_the_fleet_limit_are_reported_or_refused(fleet: FleetCloud) -> None:
    f = fleet
    async with f.channel("aggregator-1") as ch:
        # 27.6 + 13.8 + 0 = 41.4 kW of floors; 30 kW cannot be met.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.fleet(ch).Curtail(request(f, 30.0, fid="strict", require_feasible=True))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "41.400 kW" in (info.value.details() or ""), info.value.details()
        assert await f.store.fleet_curtailment("strict") is None
        res = await f.fleet(ch).Curtail(request(f, 30.0, fid="best-effort"))
    assert not res.feasible
    assert res.shortfall_kw == pytest.approx(11.4)
    assert res.detail.startswith("INFEASIBLE")
    assert [s.max_kw for s in res.shares] == pytest.approx([27.6, 13.8, 0.0])
    await f.wait_signals({s: 1 for s in f.sites})
    # Only the best-effort one was published.
    for site in f.sites:
        assert [s.curtailment.curtailment_id for s in f.watches[site].signals] == [
            f"fleet:best-effort:{site}"
        ]


async def test_only_operators_with_the_role_may_call_the_fleet_api(fleet: FleetCloud) -> None:
    f = fleet
    a = f.sites[0]
    calls = {
        "Curtail": lambda stub: stub.Curtail(request(f, 400.0)),
        "List": lambda stub: stub.List(ListFleetCurtailmentsRequest()),
    }
    for who, method, code in [
        (a, "Curtail", grpc.StatusCode.PERMISSION_DENIED),  # a site's certificate
        (a, "List", grpc.StatusCode.PERMISSION_DENIED),
        ("viewer-1", "Curtail", grpc.StatusCode.PERMISSION_DENIED),  # no grid_operator role
        ("stranger", "List", grpc.StatusCode.PERMISSION_DENIED),  # operator CA, not configured
    ]:
        async with f.channel(who) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await calls[method](f.fleet(ch))
            assert info.value.code() == code, (who, method, info.value.details())
    async with f.channel(a) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.fleet(ch).Curtail(request(f, 400.0))
    assert "is a site's" in (info.value.details() or "")
    async with f.channel("viewer-1") as ch:
        assert list((await f.fleet(ch).List(ListFleetCurtailmentsRequest())).curtailments) == []
        # An operator's certificate is not a site for CloudApi.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.cloud(ch).UploadTelemetry(stream([batch(T0, {"C0": 1.0})]))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await f.store.fleet_curtailment("dso-evening-1") is None
    assert await f.store.telemetry_batches("viewer-1") == []
    assert all(w.signals == [] for w in f.watches.values())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sites": ["__unknown__"]}, "site_ids[0]: unknown site '__unknown__'"),
        ({"max_kw": math.nan}, "max_kw: must be a finite number >= 0, got nan"),
        ({"max_kw": math.inf}, "max_kw: must be a finite number >= 0, got inf"),
        ({"max_kw": -5.0}, "max_kw: must be a finite number >= 0, got -5.0"),
        ({"start": T0 + 7800, "end": T0 + 600}, "end: must be after start"),
        ({"start": T0 - 7200, "end": T0 - 600}, "end: has passed"),
        ({"fid": ""}, "fleet_curtailment_id: is required"),
        ({"sites": []}, "site_ids: name at least one site"),
        ({"twice": True}, "site_ids[1]: site"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(
    fleet: FleetCloud, change: dict[str, object], named: str
) -> None:
    f = fleet
    kw = dict(change)
    max_kw = float(kw.pop("max_kw", 400.0))  # type: ignore[arg-type]
    if kw.pop("twice", False):
        kw["sites"] = [f.sites[0], f.sites[0]]
    fid = str(kw.pop("fid", "dso-evening-1"))
    req = request(f, max_kw, fid=fid, **kw)
    async with f.channel("aggregator-1") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.fleet(ch).Curtail(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (info.value.details() or ""), info.value.details()
    assert await f.store.fleet_curtailments(include_cancelled=True) == []


_OPS = [{"common_name": "aggregator-1", "roles": ["grid_operator"]}]
_BUS = {"urls": ["nats://127.0.0.1:4222"]}


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"fleet": {"operators": _OPS}}, "[fleet] needs [bus]"),
        ({"bus": _BUS, "fleet": {"operators": []}}, "operators"),
        (
            {"bus": _BUS, "fleet": {"operators": [{"common_name": "x", "roles": ["admin"]}]}},
            "unknown role(s) admin",
        ),
        ({"bus": _BUS, "fleet": {"operators": _OPS, "demand_window_s": 0}}, "demand_window_s"),
        ({"bus": _BUS, "fleet": {"operators": _OPS, "quota": 1}}, "quota"),
        ({"bus": _BUS, "fleet": {"operators": _OPS, "ramp_s": -1}}, "[fleet] ramp_s must be"),
        *(
            ({"bus": _BUS, "fleet": {"operators": _OPS, "ack_timeout_s": v}}, "ack_timeout_s")
            for v in (0, -1.0, float("inf"), float("nan"), True, "120")
        ),
        (
            {"bus": _BUS, "fleet": {"operators": _OPS}, "tls": {}, "insecure": False},
            "operator_ca_file is required",
        ),
    ],
)
def test_fleet_config_errors_name_the_key(table: dict[str, object], named: str) -> None:
    from evcore.cloud import CloudConfig, CloudConfigError

    full: dict[str, object] = {"store": {"url": "sqlite:x"}, "insecure": True, **table}
    if "tls" in table:
        full["tls"] = {"cert_file": "c", "key_file": "k", "client_ca_file": "ca"}
        full["insecure"] = False
    with pytest.raises(CloudConfigError) as info:
        CloudConfig.from_table(full)
    assert named in str(info.value)
    # With [fleet], [bus] needs no audit sites.
    ok = CloudConfig.from_table(
        {"store": {"url": "sqlite:x"}, "insecure": True, "bus": _BUS, "fleet": {"operators": _OPS}}
    )
    assert ok.fleet is not None and ok.bus_sites == ()
    assert ok.fleet.ramp_s == 30.0
    assert ok.fleet.ack_timeout_s == 120.0
    assert ok.fleet.operators.clients["aggregator-1"].roles == {"grid_operator"}


async def _cli(*args: str) -> tuple[int, str, str]:
    return await run_evcore("cloud", "curtail", *args)


async def test_the_curtail_command_calls_the_fleet_api(fleet: FleetCloud, tmp_path: Path) -> None:
    f = fleet
    tls = [
        "--target",
        f"127.0.0.1:{f.port}",
        "--ca",
        str(tmp_path / "sites_CA.pem"),
        "--cert",
        str(tmp_path / "aggregator-1.crt"),
        "--key",
        str(tmp_path / "aggregator-1.key"),
    ]
    start = dt.datetime.fromtimestamp(T0 + 600, dt.UTC).isoformat()
    end = dt.datetime.fromtimestamp(T0 + 7800, dt.UTC).isoformat()
    window = ["--start", start, "--end", end]
    sites = ",".join(f.sites)
    code, out, err = await _cli(*tls, "--id", "cli-1", "--sites", sites, "--max-kw", "400", *window)
    assert code == 0, err
    # Each share is rounded down to whole watts, so the total may be a few W under.
    assert "cli-1 revision 1: ok; 399.999 kW of 400.000 kW over 3 site(s)" in out, out
    assert f"{f.sites[2]:<24}    150.000" in out, out
    await f.wait_signals({s: 1 for s in f.sites})
    # NaN is refused by the service, naming the field; exit 2.
    code, out, err = await _cli(*tls, "--id", "cli-2", "--sites", sites, "--max-kw", "nan", *window)
    assert code == 2 and "INVALID_ARGUMENT: max_kw: must be a finite number" in err, err
    # Infeasible: exit 3, said on stderr; the JSON carries the split.
    code, out, err = await _cli(
        *tls, "--id", "cli-3", "--sites", sites, "--max-kw", "10", *window, "--json"
    )
    assert code == 3 and "INFEASIBLE" in err and "short by 31.400 kW" in err, err
    assert json.loads(out)["feasible"] is False
    assert [s["max_kw"] for s in json.loads(out)["shares"]] == pytest.approx([27.6, 13.8, 0.0])
    code, out, err = await _cli(*tls, "--cancel", "cli-1")
    assert code == 0 and "cli-1 revision 2: CANCELLED" in out, (out, err)
    code, out, err = await _cli(*tls, "--list")
    assert code == 0 and "cli-3 revision 1: INFEASIBLE" in out and "cli-1" not in out, out
    # A site's certificate is no operator.
    site_tls = [*tls[:4], "--cert", str(tmp_path / f"{f.sites[0]}.crt")]
    site_tls += ["--key", str(tmp_path / f"{f.sites[0]}.key")]
    code, out, err = await _cli(*site_tls, "--list")
    assert code == 2 and "PERMISSION_DENIED" in err, err


async def test_insecure_mode_takes_the_operator_from_a_header(tmp_path: Path) -> None:
    from evcore.clock import ManualClock
    from evcore.cloud import CloudApiServer, CloudConfig, open_cloud_store
    from evcore.cloud.auth import OPERATOR_HEADER, SITE_HEADER
    from evcore.v1 import fleet_api_pb2_grpc as fpb_grpc

    cfg = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "insecure": True,
            "store": {"url": "sqlite:store"},
            "bus": _BUS,
            "fleet": {"operators": _OPS},
        },
        tmp_path,
    )
    store = open_cloud_store(cfg.store_url)
    server = CloudApiServer(cfg, store, clock=ManualClock(T0))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = fpb_grpc.FleetApiStub(ch)
            listed = await stub.List(
                ListFleetCurtailmentsRequest(), metadata=((OPERATOR_HEADER, "aggregator-1"),)
            )
            assert list(listed.curtailments) == []
            for metadata, code in [
                ((), grpc.StatusCode.UNAUTHENTICATED),
                (((SITE_HEADER, "depot-1"),), grpc.StatusCode.UNAUTHENTICATED),
                (((OPERATOR_HEADER, "someone"),), grpc.StatusCode.PERMISSION_DENIED),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.List(ListFleetCurtailmentsRequest(), metadata=metadata)
                assert info.value.code() == code, metadata
    finally:
        await server.stop(0.5)
        await store.close()


async def test_a_material_demand_change_is_resplit_by_the_cloud_itself(fleet: FleetCloud) -> None:
    f = fleet
    a, _, c = f.sites
    coordinator = f.server.fleet
    assert coordinator is not None
    async with f.channel("aggregator-1") as ch:
        first = await f.fleet(ch).Curtail(request(f, 400.0))
    assert await coordinator.resplit_changed() == []  # nothing changed
    # Site a: 20 A -> 21 A on six chargers, 82.8 -> 86.94 kW: under the 5 kW threshold.
    async with f.channel(a) as ch:
        more = batch(T0 - 5, {f"C{i}": 21.0 for i in range(6)})
        await f.cloud(ch).UploadTelemetry(stream([more]))
    assert await coordinator.resplit_changed() == []
    # Site c starts reporting two chargers at 10 A: 132.48 -> 13.8 kW. The server's own check
    # (every 60 s of its clock) splits again.
    async with f.channel(c) as ch:
        await f.cloud(ch).UploadTelemetry(stream([batch(T0 - 5, {"C0": 10.0, "C1": 10.0})]))
    f.clock.advance(61.0)
    await f.wait_signals({c: 2})
    await f.release_increases("dso-evening-1")
    await f.wait_signals({s: 2 for s in f.sites})
    held = await f.store.fleet_curtailment("dso-evening-1")
    assert held is not None and held.revision == 2
    shares = {s.site_id: s for s in held.shares}
    assert shares[c].demand_kw == pytest.approx(13.8)
    assert shares[a].demand_kw == pytest.approx(86.94)
    assert shares[c].max_kw < {s.site_id: s for s in first.shares}[c].max_kw
    for site in f.sites:
        assert [(x.signal_id, x.max_kw) for x in f.watches[site].book] == [
            (f"fleet:dso-evening-1:{site}", shares[site].max_kw)
        ]
    assert await coordinator.resplit_changed() == []  # settled: the split holds the new demand
