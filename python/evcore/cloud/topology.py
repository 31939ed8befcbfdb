"""``evcore.v1.SiteTopology`` ⇄ the site file's topology, validated by the Rust core.

The cloud must plan on the tree the edge loaded, so a topology an edge puts is loaded exactly the
way the edge loads its site file: turned into the ``[site]`` / ``[[nodes]]`` / ``[[chargers]]``
tables and passed to :func:`evcore.site.load_site` (``_core.Topology``), whose ``SiteConfigError``
names the node or charger and the field. This module converts; it never fixes a topology.

proto3 cannot tell an absent number from 0 (except the ``optional`` fields): a 0 (or an empty
list) means "not given", so the site file's default applies (``min_a`` 6, ``efficiency`` 0.95,
``voltage_v`` the site's, ``evse_id`` 1, …).
"""

from __future__ import annotations

from typing import Any

from evcore.errors import SiteConfigError
from evcore.site import Site, load_site
from evcore.v1.topology_pb2 import (
    Charger,
    ChargerKind,
    Node,
    NodeKind,
    SiteTopology,
    Wiring,
)

__all__ = [
    "check_plausible",
    "check_storable",
    "site_from_topology",
    "site_tables",
    "topology_from_site",
]

_NODE_KINDS = {
    NodeKind.NODE_KIND_GRID: "grid",
    NodeKind.NODE_KIND_TRANSFORMER: "transformer",
    NodeKind.NODE_KIND_PANEL: "panel",
    NodeKind.NODE_KIND_FEEDER: "feeder",
    NodeKind.NODE_KIND_CIRCUIT: "circuit",
}
_WIRINGS = {
    Wiring.WIRING_THREE_PHASE: "three_phase",
    Wiring.WIRING_LINE_TO_NEUTRAL: "line_to_neutral",
    Wiring.WIRING_LINE_TO_LINE: "line_to_line",
}


def _error(node: str, field: str, message: str) -> SiteConfigError:
    e = SiteConfigError(f"site config: {node}.{field}: {message}")
    e.node = node
    e.field = field
    return e


def _node_table(n: Node) -> dict[str, Any]:
    t: dict[str, Any] = {"id": n.node_id}
    if n.parent_id:
        t["parent"] = n.parent_id
    if n.kind in _NODE_KINDS:
        t["kind"] = _NODE_KINDS[n.kind]
    if len(n.phase_limit_a):
        t["phase_limit_a"] = list(n.phase_limit_a)
    if n.HasField("power_limit_kw"):
        t["power_limit_kw"] = n.power_limit_kw
    if n.HasField("unbalance_limit_a"):
        t["unbalance_limit_a"] = n.unbalance_limit_a
    if len(n.other_load_max_a):
        t["other_load_max_a"] = list(n.other_load_max_a)
    return t


def _charger_table(c: Charger) -> dict[str, Any]:
    who = c.charger_id or "charger"
    t: dict[str, Any] = {"id": c.charger_id, "parent": c.parent_id}
    if c.ocpp_id:
        t["ocpp_id"] = c.ocpp_id
    if c.evse_id:
        t["evse_id"] = c.evse_id
    if c.connector_id:
        t["connector_id"] = c.connector_id
    if c.kind == ChargerKind.CHARGER_KIND_AC:
        t["kind"] = "ac"
    elif c.kind == ChargerKind.CHARGER_KIND_DC:
        t["kind"] = "dc"
    else:
        raise _error(who, "kind", "a topology must say AC or DC (CHARGER_KIND_UNSPECIFIED)")
    if c.wiring in _WIRINGS:
        t["wiring"] = _WIRINGS[c.wiring]
    if len(c.phases):
        t["phases"] = list(c.phases)
    # DC chargers are set in W: a min_a / max_a given for one reaches the core, which refuses it.
    for key in ("voltage_v", "min_a", "max_a"):
        if getattr(c, key):
            t[key] = getattr(c, key)
    if len(c.steps_a):
        t["steps_a"] = list(c.steps_a)
    # The site file's default is true; a proto bool cannot be absent, so false is said for AC
    # three-phase chargers only (the only ones the key applies to).
    if c.kind == ChargerKind.CHARGER_KIND_AC and c.wiring == Wiring.WIRING_THREE_PHASE:
        t["single_phase_car"] = c.single_phase_car
    if c.kind == ChargerKind.CHARGER_KIND_DC:
        for key in ("max_w", "min_w", "efficiency", "aux_w"):
            if getattr(c, key):
                t[key] = getattr(c, key)
    return t


def site_tables(topology: SiteTopology) -> dict[str, Any]:
    """The site file's topology tables for ``topology`` (not yet validated)."""
    site: dict[str, Any] = {"id": topology.site_id}
    if topology.name:
        site["name"] = topology.name
    if len(topology.phase_names):
        site["phase_names"] = list(topology.phase_names)
    if topology.voltage_ln_v:
        site["voltage_ln_v"] = topology.voltage_ln_v
    if topology.frequency_hz:
        site["frequency_hz"] = topology.frequency_hz
    return {
        "site": site,
        "nodes": [_node_table(n) for n in topology.nodes],
        "chargers": [_charger_table(c) for c in topology.chargers],
    }


#: Plausible bounds on what a site may say, beyond the core's checks (finite, >= 0 or > 0, a
#: charger's voltage within 10 % of the site's). A finite but absurd value (1e306 A) passed the
#: core and was refused only when a fleet split multiplied it into inf. The bounds leave room far
#: beyond any real site: 100 kA is about 70 MVA at 400 V; 1 GW is a large power plant's
#: connection; chargers and sites are low voltage (IEC 60038: up to 1000 V AC), 50 V at least.
MAX_CURRENT_A = 100_000.0
MAX_POWER_KW = 1_000_000.0
VOLTAGE_RANGE_V = (50.0, 1_000.0)


def site_from_topology(topology: SiteTopology) -> Site:
    """Load ``topology`` into the core as the edge loads its site file.

    Raises ``SiteConfigError`` (a ``ValueError``) with ``.node`` and ``.field``.
    """
    if not topology.site_id:
        raise _error("site", "id", "site_id is required")
    return load_site(site_tables(topology))


def check_plausible(site: Site) -> None:
    """``SiteConfigError`` naming the node (or charger) and field of the first value beyond the
    bounds above. PutTopology applies it to what it stores; a topology stored before it is read
    as it is (the fleet split refuses a grid limit that is not finite)."""
    lo_v, hi_v = VOLTAGE_RANGE_V
    if not lo_v <= site.voltage_ln_v <= hi_v:
        raise _error("site", "voltage_ln_v", _beyond(site.voltage_ln_v, "V", VOLTAGE_RANGE_V))
    amps = (0.0, MAX_CURRENT_A)
    for n in site.nodes:
        for key in ("phase_limit_a", "other_load_max_a"):
            if max(getattr(n, key)) > MAX_CURRENT_A:
                raise _error(n.id, key, _beyond(max(getattr(n, key)), "A", amps))
        if (n.unbalance_limit_a or 0.0) > MAX_CURRENT_A:
            raise _error(n.id, "unbalance_limit_a", _beyond(n.unbalance_limit_a, "A", amps))
        if (n.power_limit_kw or 0.0) > MAX_POWER_KW:
            raise _error(n.id, "power_limit_kw", _beyond(n.power_limit_kw, "kW", (0, MAX_POWER_KW)))
    for c in site.chargers:
        if not lo_v <= c.voltage_v <= hi_v:
            raise _error(c.id, "voltage_v", _beyond(c.voltage_v, "V", VOLTAGE_RANGE_V))
        # min_a <= max_a and min_w <= max_w are the core's checks.
        if c.max_a > MAX_CURRENT_A:
            raise _error(c.id, "max_a", _beyond(c.max_a, "A", amps))
        for key in ("max_w", "aux_w"):
            if (getattr(c, key) or 0.0) > MAX_POWER_KW * 1000.0:
                watts = (0.0, MAX_POWER_KW * 1000.0)
                raise _error(c.id, key, _beyond(getattr(c, key), "W", watts))


def check_storable(topology: SiteTopology) -> None:
    """``SiteConfigError`` for text of ``topology`` the cloud store keeps in a column of its own
    and cannot hold: ``config_version`` with a NUL character (PostgreSQL refused it, INTERNAL;
    SQLite took it). Everything else is kept in the message's bytes."""
    if "\x00" in topology.config_version:
        raise _error("site", "config_version", "holds a NUL character, which the store cannot keep")


def _beyond(value: float | None, unit: str, bounds: tuple[float, float]) -> str:
    return (
        f"{value!r} {unit} is beyond the plausible range [{bounds[0]:g}, {bounds[1]:g}] {unit} "
        "the cloud accepts (docs/cloud.md, PutTopology)"
    )


def topology_from_site(site: Site, *, config_version: str = "") -> SiteTopology:
    """The ``SiteTopology`` message of a loaded site (what an edge puts to the cloud)."""
    kinds = {v: k for k, v in _NODE_KINDS.items()}
    wirings = {v: k for k, v in _WIRINGS.items()}
    topo = SiteTopology(
        site_id=site.id,
        name=site.name or "",
        phase_names=list(site.phase_names),
        voltage_ln_v=site.voltage_ln_v,
        config_version=config_version,
    )
    for n in site.nodes:
        node = Node(
            node_id=n.id,
            parent_id=n.parent or "",
            kind=kinds.get(n.kind, NodeKind.NODE_KIND_UNSPECIFIED),
            phase_limit_a=list(n.phase_limit_a),
            other_load_max_a=list(n.other_load_max_a),
        )
        if n.power_limit_kw is not None:
            node.power_limit_kw = n.power_limit_kw
        if n.unbalance_limit_a is not None:
            node.unbalance_limit_a = n.unbalance_limit_a
        topo.nodes.append(node)
    for c in site.chargers:
        dc = c.kind == "dc"
        charger = Charger(
            charger_id=c.id,
            ocpp_id=c.ocpp_id,
            evse_id=c.evse_id,
            connector_id=c.connector_id,
            parent_id=c.parent,
            kind=ChargerKind.CHARGER_KIND_DC if dc else ChargerKind.CHARGER_KIND_AC,
            wiring=wirings[c.wiring],
            phases=[site.phase_names[p] for p in c.phases],
            voltage_v=c.voltage_v,
            # The core derives a DC charger's line currents from its watts; they are not inputs.
            min_a=0.0 if dc else c.min_a,
            max_a=0.0 if dc else c.max_a,
            steps_a=list(c.steps_a),
            single_phase_car=c.single_phase_car,
            max_w=c.max_w or 0.0,
            min_w=c.min_w or 0.0,
            efficiency=c.efficiency or 0.0,
            aux_w=c.aux_w or 0.0,
        )
        topo.chargers.append(charger)
    return topo
