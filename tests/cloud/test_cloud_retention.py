"""Cloud retention on SQLite and PostgreSQL: telemetry older than telemetry_days and plans below
the newest plans_keep go in batches, newer rows stay, audit records are never touched; the serve
process (CloudApiServer) purges at start and every every_s; uploads are not held up by a purge."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from cloud_testkit import T0, chain, make_certs, stream
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, CloudConfigError, open_cloud_store
from evcore.cloud.config import CloudRetention
from evcore.cloud.retention import DAY_S, purge_once
from evcore.cloud.store import CloudStore
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from evcore.v1.meter_pb2 import MeterSample, MeterSampleBatch
from evcore.v1.plan_pb2 import Plan

pytestmark = pytest.mark.timeout(120)

OLD_S = T0 - 40 * DAY_S
NEW_S = T0 - 1 * DAY_S


def batches(t_s: float, n: int, tag: str) -> list[MeterSampleBatch]:
    out = []
    for i in range(n):
        b = MeterSampleBatch()
        s = MeterSample(charger_id=f"{tag}-{i}", current_a=[10.0, 10.0, 10.0])
        s.sampled_at.FromSeconds(int(t_s) + i)
        b.samples.append(s)
        out.append(b)
    return out


async def counts(store: CloudStore, site: str) -> tuple[int, int]:
    held = await store.telemetry_batches(site, limit=100_000)
    old = sum(1 for b in held if b.samples[0].sampled_at.seconds < T0 - 30 * DAY_S)
    return old, len(held) - old


async def test_old_telemetry_and_plans_go_in_batches_and_audit_stays(store_url: str) -> None:
    async with open_cloud_store(store_url) as store:
        for site in ("depot-1", "depot-2"):
            await store.put_telemetry(site, batches(OLD_S, 120, "old"), now_s=OLD_S)
            await store.put_telemetry(site, batches(NEW_S, 3, "new"), now_s=NEW_S)
        for v in range(1, 9):
            await store.put_plan("depot-1", Plan(plan_id=f"p{v}", plan_version=v), now_s=OLD_S)
        # Audit records stored 100 days ago, decided long ago: retention never looks at them.
        await store.put_audit("depot-1", chain(5), now_s=T0 - 100 * DAY_S)
        before = await store.audit_records("depot-1")

        keep_all = CloudRetention(telemetry_days=0, plans_keep=0, batch_rows=50)
        nothing = await purge_once(store, keep_all, now_s=T0)
        assert (nothing.telemetry_batches, nothing.plans) == (0, 0)
        assert await counts(store, "depot-1") == (120, 3)

        r = CloudRetention(telemetry_days=30, plans_keep=3, batch_rows=50)
        done = await purge_once(store, r, now_s=T0)
        assert (done.telemetry_batches, done.plans) == (240, 5)
        # 50 + 50 + 20 per site, then one plan batch of 5.
        assert done.transactions == 3 + 3 + 1
        for site in ("depot-1", "depot-2"):
            assert await counts(store, site) == (0, 3)
        assert await store.plan_versions("depot-1") == [6, 7, 8]
        assert await store.audit_records("depot-1") == before
        assert await store.contiguous_seq("depot-1") == 4
        again = await purge_once(store, r, now_s=T0)
        assert (again.telemetry_batches, again.plans) == (0, 0)


async def test_an_upload_during_a_purge_waits_for_one_batch_not_the_purge(store_url: str) -> None:
    async with open_cloud_store(store_url) as store:
        await store.put_telemetry("depot-1", batches(OLD_S, 2000, "old"), now_s=OLD_S)
        r = CloudRetention(telemetry_days=30, plans_keep=0, batch_rows=20)
        purge = asyncio.create_task(purge_once(store, r, now_s=T0))
        await asyncio.sleep(0)
        await store.put_telemetry("depot-1", batches(T0, 1, "during"), now_s=T0)
        # The upload is committed while the purge still has batches to go (100 transactions).
        assert not purge.done()
        done = await purge
        assert (done.telemetry_batches, done.transactions) == (2000, 101)
        assert await counts(store, "depot-1") == (0, 1)


async def test_the_server_purges_at_start_and_every_every_s(tmp_path: Path, store_url: str) -> None:
    tls, ca_pem, clients = make_certs(tmp_path)
    config = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "tls": tls,
            "store": {"url": store_url},
            "retention": {"telemetry_days": 30, "plans_keep": 2, "every_s": 600},
        },
        tmp_path,
    )
    store = open_cloud_store(config.store_url, tmp_path)
    await store.put_telemetry("depot-1", batches(OLD_S, 30, "old"), now_s=OLD_S)
    await store.put_telemetry("depot-1", batches(NEW_S, 2, "new"), now_s=NEW_S)
    for v in range(1, 5):
        await store.put_plan("depot-1", Plan(plan_id=f"p{v}", plan_version=v), now_s=OLD_S)
    clock = ManualClock(T0)
    server = CloudApiServer(config, store, clock=clock)
    port = await server.start()

    async def telemetry_becomes(expected: tuple[int, int]) -> None:
        for _ in range(200):
            if await counts(store, "depot-1") == expected:
                return
            await asyncio.sleep(0.05)
        assert await counts(store, "depot-1") == expected

    try:
        await telemetry_becomes((0, 2))  # purged at start
        assert await store.plan_versions("depot-1") == [3, 4]
        # Over mTLS: an audit chain, and telemetry sampled 40 days ago (an edge's late backlog).
        cert, key = clients["depot-1"]
        creds = grpc.ssl_channel_credentials(ca_pem, key, cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            stub = pb_grpc.CloudApiStub(ch)
            assert (await stub.UploadAudit(stream(chain(4)))).contiguous_count == 4
            assert (await stub.UploadTelemetry(stream(batches(OLD_S, 5, "late")))).stored_count == 5
        assert await counts(store, "depot-1") == (5, 2)
        clock.advance(601.0)  # the next round
        await telemetry_becomes((0, 2))
        assert [r.seq for r in await store.audit_records("depot-1")] == [0, 1, 2, 3]
    finally:
        await server.stop(0.5)
        await store.close()


def test_retention_config() -> None:
    base = {"store": {"url": "sqlite:x"}, "insecure": True}
    d = CloudConfig.from_table(base).retention
    assert (d.telemetry_days, d.plans_keep, d.every_s, d.batch_rows) == (30.0, 50, 3600.0, 1000)
    off = CloudConfig.from_table({**base, "retention": {"telemetry_days": 0, "plans_keep": 0}})
    assert not off.retention.enabled
    for table, named in [
        ({"audit_days": 10}, "audit records are never deleted"),
        ({"telemetry_days": -1}, "telemetry_days must be a number >= 0"),
        ({"plans_keep": 2.5}, "plans_keep must be an integer"),
        ({"every_s": 0}, "every_s must be a number > 0"),
        ({"batch_rows": True}, "batch_rows"),
    ]:
        with pytest.raises(CloudConfigError) as info:
            CloudConfig.from_table({**base, "retention": table})
        assert named in str(info.value), (table, str(info.value))
