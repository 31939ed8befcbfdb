"""Which status code a failure under the cloud's handlers (CloudApi and FleetApi) reaches the caller
as, over real mTLS sockets.

Only the cloud's deliberate refusals are the caller's mistake (a broken chain, a topology the core
refuses, no plan; the fleet's FleetInputError, FleetNotFound, ...); a store that cannot be
reached is UNAVAILABLE naming the store and the call, logged as a warning; anything else is a bug:
INTERNAL, with its traceback in the log. Review of the cloud's error mapping (after the edge API's,
tests/api/test_api_status_codes.py): both services answered any ValueError INVALID_ARGUMENT and
logged nothing, and the fleet wrapped any ValueError from a site's inputs as
``site_ids[i]: ...``, so a bug was reported as the caller's bad input and never seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_testkit import T0, Cloud, chain, stream
from evcore.v1 import cloud_api_pb2 as pb
from evcore.v1.fleet_api_pb2 import (
    FleetCurtailment,
    FleetCurtailmentRef,
    ListFleetCurtailmentsRequest,
    ListSitesRequest,
)
from evcore.v1.topology_pb2 import ChargerKind
from fleet_testkit import FleetCloud, batch, site_table, start_fleet_cloud, topology
from pg_testkit import TcpRelay

pytestmark = pytest.mark.timeout(120)

CLOUD_LOG = "evcore.cloud"


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(CLOUD_LOG) and r.exc_info is not None]


def _nan_to_int(*_: object, **__: object) -> Any:
    return int(math.nan)  # a bug: ValueError('cannot convert float NaN to integer')


async def test_a_value_error_from_a_bug_under_cloud_api_is_internal_and_logged(
    cloud: Cloud, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: INVALID_ARGUMENT 'cannot convert float NaN to integer' for GetPlan,
    UploadTelemetry and PutTopology, nothing logged: the edge was told its request was wrong."""
    topo = topology(site_table("depot-1", power_limit_kw=300.0, other_load_a=0.0))
    async with cloud.channel("depot-1") as ch:
        stub = cloud.stub(ch)
        # The deliberate refusals first: no plan, a broken chain, a topology the core refuses.
        with caplog.at_level(logging.ERROR, logger=CLOUD_LOG):
            err = await _failure(stub.GetPlan(pb.GetPlanRequest(site_id="depot-1")))
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
            records = chain(2)
            records[1].hash = records[0].hash
            err = await _failure(stub.UploadAudit(stream(records)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert (err.details() or "").startswith("seq 1: hash")
            no_kind = type(topo)()
            no_kind.CopyFrom(topo)
            no_kind.chargers[0].kind = ChargerKind.CHARGER_KIND_UNSPECIFIED
            err = await _failure(stub.PutTopology(no_kind))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "C0.kind: a topology must say AC or DC" in (err.details() or "")
        assert _tracebacks(caplog) == []

        monkeypatch.setattr(cloud.store, "newest_plan", _nan_to_int)
        monkeypatch.setattr(cloud.store, "put_telemetry", _nan_to_int)
        monkeypatch.setattr("evcore.cloud.service.check_plausible", _nan_to_int)
        calls = {
            "GetPlan": lambda: stub.GetPlan(pb.GetPlanRequest(site_id="depot-1")),
            "UploadTelemetry": lambda: stub.UploadTelemetry(stream([batch(T0, {"C0": 10.0})])),
            "PutTopology": lambda: stub.PutTopology(topo),
        }
        for method, call in calls.items():
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger=CLOUD_LOG):
                err = await _failure(call())
            assert err.code() == grpc.StatusCode.INTERNAL, (method, err.details())
            assert (err.details() or "").startswith(f"{method} failed: ValueError("), err
            assert [r.getMessage() for r in _tracebacks(caplog)] == [f"cloud: {method} failed"]
    assert await cloud.store.topology("depot-1") is None


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(tmp_path, store_url, n_sites=2, fleet={"resplit_every_s": 0})
    try:
        yield f
    finally:
        await f.close()


def _request(fid: str, sites: list[str]) -> FleetCurtailment:
    r = FleetCurtailment(fleet_curtailment_id=fid, site_ids=sites, max_kw=200.0, issuer="DSO")
    r.start.FromSeconds(int(T0))
    r.end.FromSeconds(int(T0 + 3600))
    return r


async def test_a_value_error_from_a_bug_under_fleet_api_is_internal_and_logged(
    fleet: FleetCloud, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: Curtail INVALID_ARGUMENT "site_ids[0]: cannot convert float NaN to integer" (the
    coordinator took any ValueError of a site's inputs for the site's bad figures) and ListSites
    INVALID_ARGUMENT, nothing logged."""
    f = fleet
    a, b = f.sites
    async with f.channel(a) as ch:
        await f.cloud(ch).PutTopology(topology(site_table(a, power_limit_kw=300.0, other_load_a=0)))
    # b's stored topology is one the core refuses (stored before a stricter rule, say): a
    # deliberate refusal naming the site, as before.
    no_kind = topology(site_table(b, power_limit_kw=300.0, other_load_a=0.0))
    no_kind.chargers[0].kind = ChargerKind.CHARGER_KIND_UNSPECIFIED
    await f.store.put_topology(b, no_kind, now_s=T0)
    async with f.channel("aggregator-1") as ch:
        api = f.fleet(ch)
        with caplog.at_level(logging.ERROR, logger=CLOUD_LOG):
            err = await _failure(api.Curtail(_request("f-1", [a, b])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert (err.details() or "").startswith("site_ids[1]: site config: C0.kind:"), err
        assert _tracebacks(caplog) == []

        monkeypatch.setattr("evcore.cloud.fleet.floor_kw", _nan_to_int)
        with caplog.at_level(logging.ERROR, logger=CLOUD_LOG):
            err = await _failure(api.Curtail(_request("f-1", [a])))
        assert err.code() == grpc.StatusCode.INTERNAL, err.details()
        assert (err.details() or "").startswith("Curtail failed: ValueError('cannot convert")
        assert [r.getMessage() for r in _tracebacks(caplog)] == ["cloud: Curtail failed"]
        assert await f.store.fleet_curtailment("f-1") is None

        caplog.clear()
        monkeypatch.setattr(f.store, "site_activity", _nan_to_int)
        with caplog.at_level(logging.ERROR, logger=CLOUD_LOG):
            err = await _failure(api.ListSites(ListSitesRequest()))
        assert err.code() == grpc.StatusCode.INTERNAL, err.details()
        assert (err.details() or "").startswith("ListSites failed: ValueError(")
        assert [r.getMessage() for r in _tracebacks(caplog)] == ["cloud: ListSites failed"]


async def test_a_resplit_of_a_cancelled_or_ended_curtailment_is_failed_precondition(
    fleet: FleetCloud,
) -> None:
    """The request is well formed; the curtailment's state refuses it. Before: INVALID_ARGUMENT
    ("... is cancelled", and "end: has passed" naming a field the caller never sent)."""
    f = fleet
    for site in f.sites:
        async with f.channel(site) as ch:
            table = site_table(site, power_limit_kw=300.0, other_load_a=0.0)
            await f.cloud(ch).PutTopology(topology(table))
    async with f.channel("aggregator-1") as ch:
        api = f.fleet(ch)
        await api.Curtail(_request("cancelled", f.sites))
        await api.Cancel(FleetCurtailmentRef(fleet_curtailment_id="cancelled"))
        await api.Curtail(_request("ended", f.sites))
        f.clock.advance(3600.0)
        for fid, why in (("cancelled", "is cancelled; send Curtail again"), ("ended", "has ended")):
            err = await _failure(api.Resplit(FleetCurtailmentRef(fleet_curtailment_id=fid)))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (fid, err.details())
            assert (err.details() or "").startswith(f"fleet_curtailment_id: {fid!r} {why}"), err
        # An unknown id is still NOT_FOUND, and cancelling the ended one still works.
        err = await _failure(api.Resplit(FleetCurtailmentRef(fleet_curtailment_id="nope")))
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert (await api.Cancel(FleetCurtailmentRef(fleet_curtailment_id="ended"))).cancelled


@pytest.fixture
async def relay() -> AsyncIterator[TcpRelay]:
    r = TcpRelay()
    await r.start()
    yield r
    r.cut()


async def test_postgresql_going_away_is_unavailable_naming_the_call_and_store_then_served(
    relay: TcpRelay, pg_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cloud's PostgreSQL goes away while it serves, then comes back. Before: CloudApi said
    "store unavailable: ..." without the call, FleetApi the same and logged nothing."""
    f = await start_fleet_cloud(
        tmp_path, relay.store_url(pg_schema), n_sites=1, fleet={"resplit_every_s": 0}
    )
    try:
        (site,) = f.sites
        async with f.channel(site) as site_ch, f.channel("viewer-1") as op_ch:
            cloud, api = f.cloud(site_ch), f.fleet(op_ch)
            table = site_table(site, power_limit_kw=300.0, other_load_a=0.0)
            assert (await cloud.PutTopology(topology(table))).topology_version == 1

            relay.cut()
            calls = {
                "GetPlan": lambda: cloud.GetPlan(pb.GetPlanRequest(site_id=site)),
                "UploadTelemetry": lambda: cloud.UploadTelemetry(stream([batch(T0, {"C0": 10.0})])),
                "List": lambda: api.List(ListFleetCurtailmentsRequest()),
                "ListSites": lambda: api.ListSites(ListSitesRequest()),
            }
            with caplog.at_level(logging.WARNING, logger=CLOUD_LOG):
                for method, call in calls.items():
                    err = await _failure(call())
                    details = err.details() or ""
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, (method, details)
                    assert details.startswith(f"{method}: store unavailable: "), details
                    assert "PostgreSQL store" in details and pg_schema in details, details
            # Each call logged once, as an outage rather than a bug (no traceback).
            warned = [
                r.getMessage().split(":")[1].strip()
                for r in caplog.records
                if r.getMessage().startswith("cloud: ") and "store unavailable" in r.getMessage()
            ]
            assert warned == list(calls), warned
            assert _tracebacks(caplog) == []

            await relay.restore()
            assert (await api.ListSites(ListSitesRequest())).sites[0].topology_version == 1
            with pytest.raises(grpc.aio.AioRpcError) as none:
                await cloud.GetPlan(pb.GetPlanRequest(site_id=site))
            assert none.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await f.close()
