"""The three-node cluster config in cloud/nats/ on loopback: replicated streams keep every audit
record, without duplicates, when a node (the stream leader) is killed mid-burst."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import NATS_SERVER, AuditSink, port_open, unique_site, wait_until
from evcore.bus import BusConfig, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.v1 import audit_pb2

CONF_DIR = Path(__file__).resolve().parents[2] / "cloud" / "nats"
NODES = ("a", "b", "c")


def _client_port(node: str) -> int:
    text = (CONF_DIR / f"node-{node}.conf").read_text()
    m = re.search(r"^listen:\s*127\.0\.0\.1:(\d+)", text, re.M)
    assert m, f"node-{node}.conf has no loopback client listen"
    return int(m.group(1))


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, node: str) -> None:
        self.procs[node] = subprocess.Popen(
            [NATS_SERVER, "-c", str(CONF_DIR / f"node-{node}.conf")],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, node: str) -> None:
        p = self.procs.pop(node)
        p.kill()
        p.wait(timeout=10)

    def urls(self) -> tuple[str, ...]:
        return tuple(f"nats://127.0.0.1:{_client_port(n)}" for n in NODES)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    busy = [n for n in NODES if port_open(_client_port(n))]
    if busy:
        pytest.fail(f"cluster ports of nodes {busy} are taken; is another cluster test running?")
    c = Cluster(tmp_path)
    for n in NODES:
        c.start(n)
    try:
        yield c
    finally:
        for n in list(c.procs):
            c.kill(n)


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
