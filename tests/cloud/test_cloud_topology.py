"""PutTopology: a site's topology is loaded into the Rust core as the edge loads its site file; an
invalid one is refused naming the node and field; the latest is kept with a version."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cloud_testkit import Cloud
from evcore.cloud.service import TOPOLOGY_VERSION_KEY
from evcore.cloud.topology import site_from_topology, topology_from_site
from evcore.errors import SiteConfigError
from evcore.site import load_site
from evcore.v1 import cloud_api_pb2 as pb
from evcore.v1.topology_pb2 import ChargerKind, SiteTopology

ROOT = Path(__file__).resolve().parents[2]
SITE_FILES = sorted((ROOT / "edge").glob("site*.toml"))


def example(site_id: str = "depot-1") -> SiteTopology:
    topo = topology_from_site(load_site(ROOT / "edge" / "site.example.toml"), config_version="v1")
    topo.site_id = site_id
    return topo


@pytest.mark.parametrize("path", SITE_FILES, ids=lambda p: p.name)
def test_a_site_survives_the_round_trip_through_the_message(path: Path) -> None:
    site = load_site(path)
    again = site_from_topology(topology_from_site(site))
    assert again.id == site.id
    assert again.phase_names == site.phase_names
    assert again.voltage_ln_v == site.voltage_ln_v
    # Breaker rating and derating arrive as the limit they give.
    strip = {"breaker_rating_a": None, "continuous_derating": None}
    assert [n.__class__(**{**n.__dict__, **strip}) for n in again.nodes] == [
        n.__class__(**{**n.__dict__, **strip}) for n in site.nodes
    ]
    assert again.chargers == site.chargers


def test_a_charger_without_kind_is_named() -> None:
    topo = example()
    topo.chargers[1].kind = ChargerKind.CHARGER_KIND_UNSPECIFIED
    with pytest.raises(SiteConfigError) as info:
        site_from_topology(topo)
    assert (info.value.node, info.value.field) == (topo.chargers[1].charger_id, "kind")


async def _put(cloud: Cloud, topo: SiteTopology) -> tuple[pb.UploadAck, str]:
    async with cloud.channel("depot-1") as ch:
        call = cloud.stub(ch).PutTopology(topo)
        ack = await call
        trailing = dict(await call.trailing_metadata() or ())
    return ack, str(trailing[TOPOLOGY_VERSION_KEY])


async def _refused(cloud: Cloud, topo: SiteTopology) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _put(cloud, topo)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value


async def test_topology_versions_and_refusals(cloud: Cloud) -> None:
    topo = example()
    ack, version = await _put(cloud, topo)
    assert (ack.stored_count, ack.duplicate_count, version) == (1, 0, "1")
    assert ack.topology_version == 1
    # The same tree again (an edge restart: only loaded_at differs) is a repeat.
    topo.loaded_at.FromSeconds(1_767_225_700)
    ack, version = await _put(cloud, topo)
    assert (ack.stored_count, ack.duplicate_count, version, ack.topology_version) == (0, 1, "1", 1)
    # A changed limit is a new version.
    changed = example()
    changed.nodes[2].phase_limit_a[:] = [50.0, 50.0, 50.0]
    ack, version = await _put(cloud, changed)
    assert (ack.stored_count, version, ack.topology_version) == (1, "2", 2)

    # A negative limit: refused naming node and field; the stored topology stays version 2.
    bad = example()
    node = bad.nodes[2]
    node.phase_limit_a[:] = [63.0, -1.0, 63.0]
    err = await _refused(cloud, bad)
    assert f"{node.node_id}.phase_limit_a" in (err.details() or ""), err.details()
    trailing = dict(err.trailing_metadata() or ())
    assert (trailing["evcore-node"], trailing["evcore-field"]) == (node.node_id, "phase_limit_a")
    # A limit below what a charger under it needs to run at all (its min_a).
    bad = example()
    bad.nodes[1].phase_limit_a[:] = [5.0, 5.0, 5.0]
    err = await _refused(cloud, bad)
    trailing = dict(err.trailing_metadata() or ())
    assert trailing["evcore-node"] == bad.nodes[1].node_id, err.details()
    assert trailing["evcore-field"] == "phase_limit_a", err.details()
    # A charger under a node that does not exist.
    bad = example()
    bad.chargers[0].parent_id = "nowhere"
    err = await _refused(cloud, bad)
    assert "nowhere" in (err.details() or ""), err.details()

    held = await cloud.store.topology("depot-1")
    assert held is not None
    assert held.version == 2
    assert list(held.topology.nodes[2].phase_limit_a) == [50.0, 50.0, 50.0]
    assert held.stored_at_s == cloud.clock.now()
