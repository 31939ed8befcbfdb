"""The shipped edge-to-cloud NATS topology: an edge site's leaf node (edge/nats-edge.conf, no
JetStream of its own) on the cloud cluster (cloud/nats/node-*.conf, domain "cloud", leaf
listeners), the uplink a TCP relay the test cuts. What either side publishes while the uplink is
down reaches the other once it is back: the edge's audit records wait in its outbox, the cloud's
grid signals in the cluster's stream. (With a JetStream domain of the edge's own, each side's
messages of the outage stayed in its own streams for good; and the cluster had no leaf port.)"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest
from bus_testkit import (
    CLUSTER_NODES,
    NATS_SERVER,
    Cluster,
    cluster_running,
    free_port,
    unique_site,
    wait_until,
)
from evcore.bus import BusConfig, BusMessage, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock

pytestmark = pytest.mark.timeout(180)

EDGE_CONF = Path(__file__).resolve().parents[2] / "edge" / "nats-edge.conf"


class Uplink:
    """A TCP relay on ``port`` to ``target``: ``cut()`` closes it with every connection through
    it (the site's uplink gone), ``start()`` opens it again."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return
        self._writers += [w, uw]

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                b.close()

        self._tasks += [asyncio.create_task(pipe(r, uw)), asyncio.create_task(pipe(ur, w))]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writers, self._tasks = [], []
        await self._server.wait_closed()


def _edge_conf(tmp_path: Path, client_port: int, uplink_port: int) -> Path:
    """edge/nats-edge.conf as shipped, on test ports: the client port, no monitoring port, the
    leaf remote at the relay, no credentials file (the loopback cluster has no auth)."""
    text = EDGE_CONF.read_text()
    text = re.sub(r"^listen: .*$", f"listen: 127.0.0.1:{client_port}", text, flags=re.M)
    text = re.sub(r"^http: .*$\n", "", text, flags=re.M)
    text = re.sub(r"urls: \[.*\]", f'urls: ["nats-leaf://127.0.0.1:{uplink_port}"]', text)
    text = re.sub(r"^\s*credentials: .*$\n", "", text, flags=re.M)
    assert "jetstream" not in text.split("#")[0], "the edge's leaf runs no JetStream of its own"
    path = tmp_path / "nats-edge.conf"
    path.write_text(text)
    return path


def _cluster_confs(tmp_path: Path, uplink_port: int) -> Path:
    """cloud/nats/node-*.conf as shipped, each node's leaf listener advertising the relay (as a
    production node advertises the public address the edges reach; the leaf would otherwise
    reconnect straight to the loopback listener it learns, around the cut relay)."""
    out = tmp_path / "cloud-nats"
    out.mkdir()
    for node in CLUSTER_NODES:
        text = Cluster.conf(node).read_text()
        text, n = re.subn(
            r"(leafnodes\s*\{)", rf"\1\n  advertise: 127.0.0.1:{uplink_port}", text, count=1
        )
        assert n == 1, f"node-{node}.conf has no leafnodes block"
        (out / f"node-{node}.conf").write_text(text)
    return out


async def test_what_either_side_publishes_while_the_uplink_is_down_arrives(tmp_path: Path) -> None:
    site = unique_site()
    s = Subjects(site)
    leaf_port, uplink_port = free_port(), free_port()
    with cluster_running(tmp_path, _cluster_confs(tmp_path, uplink_port)) as cluster:
        uplink = Uplink(uplink_port, Cluster.leaf_port("a"))
        await uplink.start()
        leaf = await asyncio.create_subprocess_exec(
            NATS_SERVER,
            "-c",
            str(_edge_conf(tmp_path, leaf_port, uplink_port)),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        common = {"reconnect_wait_s": 0.1, "connect_timeout_s": 20.0, "publish_timeout_s": 2.0}
        cloud = NatsBus(
            site,
            BusConfig(kind="nats", urls=cluster.urls(), **common),  # type: ignore[arg-type]
            clock=WallClock(),
            outbox_path=tmp_path / "cloud.sqlite",
        )
        edge = NatsBus(
            site,
            BusConfig(
                kind="nats",
                urls=(f"nats://127.0.0.1:{leaf_port}",),
                jetstream_domain="cloud",
                **common,  # type: ignore[arg-type]
            ),
            clock=WallClock(),
            outbox_path=tmp_path / "edge.sqlite",
        )
        audit: list[str] = []
        grid: list[str] = []

        async def on_audit(msg: BusMessage) -> None:
            audit.append(msg.event_id)

        async def on_grid(msg: BusMessage) -> None:
            grid.append(msg.event_id)

        try:
            await cloud.start()
            await wait_until(lambda: cloud.connected, 30, "the cloud bus on the cluster")
            await edge.start()
            await wait_until(lambda: edge.connected, 30, "the edge bus on its leaf node")
            await cloud.consume(s.audit, durable="cloud-audit", handler=on_audit)
            await edge.consume(s.grid, durable="edge-grid", handler=on_grid)
            await edge.publish(s.audit, b"A1", event_id="A1", critical=True)
            await cloud.publish(s.grid, b"G1", event_id="G1", critical=True)
            await wait_until(lambda: audit == ["A1"] and grid == ["G1"], 60, "A1 and G1 across")

            await uplink.cut()
            await edge.publish(s.audit, b"A2", event_id="A2", critical=True)
            await cloud.publish(s.grid, b"G2", event_id="G2", critical=True)
            await wait_until(lambda: cloud.outbox.pending == 0, 20, "G2 in the cluster's stream")
            await asyncio.sleep(2.0)
            assert edge.outbox.pending == 1, "A2 must wait in the edge's outbox"
            assert audit == ["A1"] and grid == ["G1"]

            await uplink.start()
            await wait_until(
                lambda: audit == ["A1", "A2"] and grid == ["G1", "G2"], 60, "A2 and G2 across"
            )
            # The pump removes A2 once its ack is in and the removal is on disk (an fsync), or
            # after a retry when the ack was lost in the cut: not at the instant A2 arrives.
            await wait_until(lambda: edge.outbox.pending == 0, 20, "A2 out of the edge's outbox")
        finally:
            await edge.close()
            await cloud.close()
            leaf.kill()
            await leaf.wait()
            await uplink.cut()
