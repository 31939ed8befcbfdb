"""The shipped NATS deployables together: an edge site's leaf node (edge/nats-edge.conf) on a
cloud server in the cluster's JetStream domain "cloud" (cloud/nats/node-*.conf) that runs the
per-site permissions of cloud/nats/site-permissions.example.conf, the edge's bus as
edge/site.production.example.toml sets it (jetstream_domain = "cloud", the streams made by the
cloud). Through its leaf node the edge's JetStream API requests arrive as $JS.cloud.API.…: the
example allowed only $JS.API.…, so the edge's durable consumers (grid signals, plans) got nothing
and its outbox-loss recovery (last_stored) failed, while plain publishes went through."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import (
    NATS_SERVER,
    AuditSink,
    free_port,
    killed_on_exit,
    make_nats_bus,
    port_open,
    wait_until,
)
from evcore.bus import Subjects
from evcore.bus.config import parse_bus_config
from evcore.v1 import audit_pb2

ROOT = Path(__file__).resolve().parents[2]
PERMISSIONS = ROOT / "cloud" / "nats" / "site-permissions.example.conf"
LEAF = ROOT / "edge" / "nats-edge.conf"
PRODUCTION_SITE = ROOT / "edge" / "site.production.example.toml"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which(NATS_SERVER) is None, reason="nats-server is not installed"),
]


def _started(conf: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [NATS_SERVER, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while not port_open(port):
        assert proc.poll() is None and time.monotonic() < deadline, f"{conf.name} did not start"
        time.sleep(0.02)
    return proc


@pytest.fixture
def hub_and_leaf(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(the cloud server's client port, the leaf node's client port)."""
    hub_port, leaf_port, leaf_listen = free_port(), free_port(), free_port()
    hub = tmp_path / "hub.conf"
    hub.write_text(
        PERMISSIONS.read_text().replace(
            "jetstream: enabled",
            f'jetstream {{ domain: cloud, store_dir: "{tmp_path / "js"}" }}',
        )
        + f"\nlisten: 127.0.0.1:{hub_port}\nleafnodes {{ listen: 127.0.0.1:{leaf_listen} }}\n"
    )
    leaf_text = LEAF.read_text()
    leaf_text = re.sub(r"(?m)^listen: .*$", f"listen: 127.0.0.1:{leaf_port}", leaf_text)
    leaf_text = re.sub(r"(?m)^http: .*$", "", leaf_text)
    leaf_text = re.sub(r"(?m)^\s*credentials: .*$", "", leaf_text)
    # A user and password in the URL, as nats-edge.conf says for the permissions example's users.
    leaf_text = re.sub(
        r'urls: \["tls://[^"]+"\]',
        f'urls: ["nats://depot-1:depot-1-change-me@127.0.0.1:{leaf_listen}"]',
        leaf_text,
    )
    leaf = tmp_path / "leaf.conf"
    leaf.write_text(leaf_text)
    with (
        killed_on_exit(_started(hub, hub_port)),
        killed_on_exit(_started(leaf, leaf_port)),
    ):
        yield hub_port, leaf_port


async def test_an_edge_behind_its_leaf_node_may_use_its_streams(
    hub_and_leaf: tuple[int, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """...and, with the production example's [bus], does not try to make streams its user may
    not make (it logged 'creating streams failed ... trying again in the background', then
    'still fails (attempt N)' for ever)."""
    hub_port, leaf_port = hub_and_leaf
    site_bus = parse_bus_config(tomllib.loads(PRODUCTION_SITE.read_text())["bus"])
    settings = {"connect_timeout_s": 3.0, "publish_timeout_s": 3.0}
    cloud = make_nats_bus(
        "depot-1",
        f"nats://cloud:cloud-change-me@127.0.0.1:{hub_port}",
        tmp_path / "cloud-outbox",
        manage_streams=True,  # the cloud makes the site's streams
        **settings,
    )
    edge = make_nats_bus(
        "depot-1",
        f"nats://127.0.0.1:{leaf_port}",
        tmp_path / "edge-outbox",
        manage_streams=site_bus.manage_streams,
        jetstream_domain=site_bus.jetstream_domain,
        **settings,
    )
    await cloud.start()
    caplog.set_level(logging.WARNING, logger="evcore.bus")
    await edge.start()
    try:
        s = Subjects("depot-1")
        for i in range(3):
            await edge.publish(s.audit, audit_pb2.AuditRecord(seq=i), event_id=f"a{i}")
        assert await edge.flush(timeout_s=10)
        stored = await cloud.last_stored(s.audit)
        assert stored is not None and stored.event_id == "a2"
        # What the audit log asks after an outbox loss ($JS.cloud.API.STREAM.MSG.GET...).
        mine = await edge.last_stored(s.audit)
        assert mine is not None and mine.event_id == "a2"
        # A durable consumer of the edge's ($JS.cloud.API.CONSUMER...), as for grid signals.
        sink = AuditSink(tmp_path / "sink.sqlite")
        await edge.consume(s.audit, durable="edge-local", handler=sink.handle, dedupe=sink.ids)
        await wait_until(lambda: sink.count() == 3, timeout_s=10, what="the edge's consumer")
        assert sink.applied() == [0, 1, 2]
        assert [r.getMessage() for r in caplog.records if r.name.startswith("evcore.bus")] == []
    finally:
        await edge.close()
        await cloud.close()
