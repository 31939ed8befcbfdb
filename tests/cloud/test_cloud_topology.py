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
from evcore.v1.topology_pb2 import ChargerKind, SiteTopology, Wiring

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


def _line_to_line(topo: SiteTopology) -> int:
    return next(i for i, c in enumerate(topo.chargers) if c.wiring == Wiring.WIRING_LINE_TO_LINE)


async def test_absurd_but_finite_limits_are_refused_at_put_naming_site_node_and_field(
    cloud: Cloud,
) -> None:
    """1e306 A passed the core (finite, >= 0) and was stored; a fleet split refused it only later,
    when the grid limit overflowed to inf. Now PutTopology refuses values beyond the plausible
    bounds (evcore.cloud.topology: 100 kA, 1 GW, 50 to 1000 V) and stores nothing."""

    def grid(topo: SiteTopology) -> int:
        return next(i for i, n in enumerate(topo.nodes) if not n.parent_id)

    def set_grid_phases(t: SiteTopology) -> None:
        t.nodes[grid(t)].phase_limit_a[:] = [1e306] * 3

    def set_grid_kw(t: SiteTopology) -> None:
        t.nodes[grid(t)].power_limit_kw = 2e6

    def set_other_load(t: SiteTopology) -> None:
        t.nodes[2].other_load_max_a[:] = [0.0, 2e5, 0.0]

    def set_site_volts(t: SiteTopology) -> None:
        t.voltage_ln_v = 2000.0
        for c in t.chargers:  # the site's voltage, as the core wants within 10 % of it
            if c.wiring != Wiring.WIRING_LINE_TO_LINE:
                c.voltage_v = 0.0

    def set_line_to_line_volts(t: SiteTopology) -> None:
        t.chargers[_line_to_line(t)].voltage_v = 1500.0

    def set_charger_max_a(t: SiteTopology) -> None:
        t.chargers[0].max_a = 1e6

    cases = [
        (set_grid_phases, lambda t: t.nodes[grid(t)].node_id, "phase_limit_a", "1e+306 A"),
        (set_grid_kw, lambda t: t.nodes[grid(t)].node_id, "power_limit_kw", "2000000.0 kW"),
        (set_other_load, lambda t: t.nodes[2].node_id, "other_load_max_a", "200000.0 A"),
        (set_site_volts, lambda t: "site", "voltage_ln_v", "2000.0 V"),
        (
            set_line_to_line_volts,
            lambda t: t.chargers[_line_to_line(t)].charger_id,
            "voltage_v",
            "1500.0 V",
        ),
        (set_charger_max_a, lambda t: t.chargers[0].charger_id, "max_a", "1000000.0 A"),
    ]
    for change, node_of, field, said in cases:
        topo = example()
        change(topo)
        err = await _refused(cloud, topo)
        details = err.details() or ""
        node = node_of(topo)
        assert details.startswith(f"topology of site 'depot-1' refused: site config: {node}."), (
            details
        )
        assert f"{node}.{field}: {said} is beyond the plausible range" in details, details
        trailing = dict(err.trailing_metadata() or ())
        assert (trailing["evcore-node"], trailing["evcore-field"]) == (node, field)
    assert await cloud.store.topology("depot-1") is None

    # Large but real: a 60 kA, 40 MW connection is taken.
    big = example()
    big.nodes[grid(big)].phase_limit_a[:] = [60_000.0] * 3
    big.nodes[grid(big)].power_limit_kw = 40_000.0
    ack, version = await _put(cloud, big)
    assert (ack.stored_count, version) == (1, "1")
