"""Auth (the client certificate's CN is the site), plans, telemetry, health and reflection of the
cloud service, over a real mTLS socket and the real stores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from cloud_testkit import SITES, Cloud, chain, make_certs, stream
from evcore.v1 import cloud_api_pb2 as pb
from evcore.v1.meter_pb2 import MeterSample, MeterSampleBatch
from evcore.v1.plan_pb2 import Plan, PlanRow
from evcore.v1.topology_pb2 import SiteTopology
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

T0 = 1_767_225_600


def plan(version: int, *, plan_id: str = "") -> Plan:
    p = Plan(plan_id=plan_id or f"cloud-{version}", plan_version=version, source="cloud")
    p.computed_at.FromSeconds(T0 + version)
    row = PlanRow(session_id="S1", charger_id="C1", step_s=900.0, target_a=10.0 + version)
    row.step_start.FromSeconds(T0)
    p.rows.append(row)
    return p


def batch(charger: str, *times: int) -> MeterSampleBatch:
    b = MeterSampleBatch()
    for t in times:
        s = MeterSample(charger_id=charger, current_a=[10.0, 10.0, 10.0], power_w=6900.0)
        s.sampled_at.FromSeconds(T0 + t)
        b.samples.append(s)
    return b


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


async def test_a_site_may_only_touch_its_own_site(cloud: Cloud) -> None:
    assert await cloud.store.put_plan("depot-1", plan(1), now_s=T0)
    async with cloud.channel("depot-2") as ch:
        stub = cloud.stub(ch)
        call = stub.GetPlan(pb.GetPlanRequest(site_id="depot-1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'depot-2' may not touch site 'depot-1'" in (info.value.details() or "")
        call = stub.PutTopology(SiteTopology(site_id="depot-1"))
        assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
        assert await _code(stub.GetPlan(pb.GetPlanRequest())) == grpc.StatusCode.INVALID_ARGUMENT
        # Its own site has no plan: depot-1's is not served to it.
        call = stub.GetPlan(pb.GetPlanRequest(site_id="depot-2"))
        assert await _code(call) == grpc.StatusCode.NOT_FOUND
        # Uploads carry no site id: they are stored under the caller's site, never another's.
        ack = await stub.UploadAudit(stream(chain(3)))
        assert ack.stored_count == 3
    assert await cloud.store.topology("depot-1") is None
    assert await cloud.store.audit_records("depot-1") == []
    assert [r.seq for r in await cloud.store.audit_records("depot-2")] == [0, 1, 2]
    assert cloud.server.auth.denied == 2


async def test_without_a_client_certificate_or_with_a_foreign_ca_no_call_gets_through(
    cloud: Cloud, tmp_path: Path
) -> None:
    async with cloud.channel(None) as ch:
        call = cloud.stub(ch).UploadAudit(stream(chain(2)))
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE  # TLS handshake refused
    # A certificate with the right CN from another CA.
    _, _, foreign = make_certs(tmp_path / "foreign")
    cloud.clients["forged"] = foreign["depot-1"]
    async with cloud.channel("forged") as ch:
        call = cloud.stub(ch).UploadAudit(stream(chain(2)))
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE
    assert await cloud.store.audit_records("depot-1") == []


async def test_get_plan_serves_the_newest_and_only_newer_versions(cloud: Cloud) -> None:
    async with cloud.channel("depot-1") as ch:
        stub = cloud.stub(ch)
        call = stub.GetPlan(pb.GetPlanRequest(site_id="depot-1"))
        assert await _code(call) == grpc.StatusCode.NOT_FOUND
        assert await cloud.store.put_plan("depot-1", plan(1), now_s=T0)
        assert await cloud.store.put_plan("depot-1", plan(3), now_s=T0)
        assert await cloud.store.put_plan("depot-2", plan(7), now_s=T0)
        got = await stub.GetPlan(pb.GetPlanRequest(site_id="depot-1"))
        assert (got.plan_version, got.plan_id, got.rows[0].target_a) == (3, "cloud-3", 13.0)
        got = await stub.GetPlan(pb.GetPlanRequest(site_id="depot-1", newer_than_version=1))
        assert got.plan_version == 3
        got = await stub.GetPlan(pb.GetPlanRequest(site_id="depot-1", newer_than_version=2))
        assert got.plan_version == 3
        call = stub.GetPlan(pb.GetPlanRequest(site_id="depot-1", newer_than_version=3))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no plan newer than version 3" in (info.value.details() or "")
        # A late, older version does not become the newest.
        assert await cloud.store.put_plan("depot-1", plan(2), now_s=T0)
        got = await stub.GetPlan(pb.GetPlanRequest(site_id="depot-1"))
        assert got.plan_version == 3
    # A version names one plan.
    assert not await cloud.store.put_plan("depot-1", plan(3), now_s=T0 + 5)
    with pytest.raises(ValueError, match="version 3"):
        await cloud.store.put_plan("depot-1", plan(3, plan_id="other"), now_s=T0)


async def test_telemetry_batches_are_stored_once(cloud: Cloud) -> None:
    b1, b2, b3 = batch("C1", 0, 10), batch("C2", 0), batch("C1", 20, 30, 40)
    async with cloud.channel("depot-1") as ch:
        stub = cloud.stub(ch)
        ack = await stub.UploadTelemetry(stream([b1, b2, b1, MeterSampleBatch()]))
        assert (ack.stored_count, ack.duplicate_count) == (2, 1)
        ack = await stub.UploadTelemetry(stream([b2, b3]))
        assert (ack.stored_count, ack.duplicate_count) == (1, 1)
        # A sample without time: the batch before it is kept, it and the one after are not.
        untimed = MeterSampleBatch(samples=[MeterSample(charger_id="C9")])
        b4, b5 = batch("C3", 50), batch("C3", 60, 70, 80, 90)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UploadTelemetry(stream([b4, untimed, b5]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert "'C9'" in details and "1 batch(es) before it were stored" in details, details
    held = await cloud.store.telemetry_batches("depot-1")
    assert sorted(len(b.samples) for b in held) == [1, 1, 2, 3]
    assert await cloud.store.telemetry_batches("depot-2") == []


async def test_health_reflection_and_a_graceful_stop(cloud: Cloud) -> None:
    async with cloud.channel(SITES[0]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        res = await health.Check(health_pb2.HealthCheckRequest(service="evcore.v1.CloudApi"))
        assert res.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        names: list[str] = []
        async for r in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = [s.name for s in r.list_services_response.service]
        assert "evcore.v1.CloudApi" in names

        # An upload in flight when the stop begins is finished and acknowledged.
        records = chain(4)
        sent = asyncio.Event()

        async def slow() -> object:
            yield records[0]
            yield records[1]
            sent.set()
            await asyncio.sleep(0.3)
            yield records[2]
            yield records[3]

        upload = asyncio.ensure_future(cloud.stub(ch).UploadAudit(slow()))
        await sent.wait()
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(cloud.server.stop(3.0))
        ack = await upload
        await stopping
        assert (ack.stored_count, ack.contiguous_seq) == (4, 3)
