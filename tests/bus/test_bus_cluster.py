"""The three-node cluster config in cloud/nats/ on loopback: replicated streams keep every audit
record, without duplicates, when a node (the stream leader) is killed mid-burst."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import AuditSink, Cluster, cluster_running, unique_site, wait_until
from evcore.bus import BusConfig, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.v1 import audit_pb2


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with cluster_running(tmp_path) as c:
        yield c


async def _stream_leader(bus: NatsBus, stream: str) -> str:
    info = await bus._js.stream_info(stream)
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


async def test_cluster_survives_losing_the_stream_leader(cluster: Cluster, tmp_path: Path) -> None:
    site = unique_site()
    cfg = BusConfig(
        kind="nats",
        urls=cluster.urls(),
        replicas=3,
        reconnect_wait_s=0.1,
        connect_timeout_s=15.0,  # the cluster elects its metadata leader first
        publish_timeout_s=2.0,
    )
    pub = NatsBus(site, cfg, clock=WallClock(), outbox_path=tmp_path / "pub.sqlite")
    sub_bus = NatsBus(site, cfg, clock=WallClock(), outbox_path=tmp_path / "sub.sqlite")
    await pub.start()
    await sub_bus.start()
    try:
        assert pub.connected and sub_bus.connected
        events = pub.streams[0].name
        info = await pub._js.stream_info(events)
        assert info.config.num_replicas == 3
        sink = AuditSink(tmp_path / "sink.sqlite")
        s = Subjects(site)
        await sub_bus.consume(s.audit, durable="sink", handler=sink.handle, dedupe=sink.ids)
        n = 600
        for i in range(n):
            await pub.publish(s.audit, audit_pb2.AuditRecord(seq=i), event_id=f"audit-{i}")
            if i == n // 3:
                await wait_until(lambda: sink.count() > 0, timeout_s=20, what="first records")
                leader = await _stream_leader(pub, events)
                node = leader.removeprefix("evcore-")
                cluster.kill(node)
        await wait_until(lambda: sink.count() >= n, timeout_s=90, what=f"{n} audit records")
        await asyncio.sleep(0.5)
        assert sink.applied() == list(range(n))
        new_leader = await _stream_leader(pub, events)
        assert new_leader != leader
        assert len(cluster.procs) == 2
    finally:
        await sub_bus.close()
        await pub.close()
