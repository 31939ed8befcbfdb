"""The site file: TOML → validated topology (validation happens in Rust, ``_core.Topology``).

This module owns reading the file and presenting the topology to Python; it never decides
setpoints. Sections other than ``[site]``, ``[[nodes]]`` and ``[[chargers]]`` are kept untouched in
``Site.sections`` for the rooms that own them.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evcore import _core
from evcore.errors import SiteConfigError

__all__ = ["ChargerSpec", "NodeSpec", "Site", "SiteConfigError", "load_site", "read_site_file"]

TOPOLOGY_SECTIONS = ("site", "nodes", "chargers")


@dataclass(frozen=True)
class NodeSpec:
    id: str
    parent: str | None
    kind: str
    phase_limit_a: tuple[float, float, float]
    power_limit_kw: float | None
    unbalance_limit_a: float | None
    other_load_max_a: tuple[float, float, float]
    breaker_rating_a: tuple[float, float, float] | None
    continuous_derating: float | None
    depth: int = 0


@dataclass(frozen=True)
class ChargerSpec:
    id: str
    ocpp_id: str
    evse_id: int
    connector_id: int
    parent: str
    kind: Literal["ac", "dc"]
    wiring: Literal["three_phase", "line_to_neutral", "line_to_line"]
    phases: tuple[int, ...]
    voltage_v: float
    min_a: float
    max_a: float
    steps_a: tuple[float, ...]
    single_phase_car: bool
    max_w: float | None
    min_w: float | None
    efficiency: float | None
    aux_w: float | None

    def dc_line_a(self, power_w: float) -> float:
        """DC: AC line current per phase when delivering ``power_w`` (0 W → 0 A)."""
        if self.kind != "dc" or self.efficiency is None or power_w <= 0:
            return 0.0
        return (power_w / self.efficiency + (self.aux_w or 0.0)) / (3.0 * self.voltage_v)


@dataclass
class Site:
    id: str
    phase_names: tuple[str, str, str]
    voltage_ln_v: float
    topology: _core.Topology
    nodes: list[NodeSpec]
    chargers: list[ChargerSpec]
    sections: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    name: str | None = None
    _charger_idx: dict[str, int] = field(default_factory=dict, repr=False)
    _node_idx: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._charger_idx = {c.id: i for i, c in enumerate(self.chargers)}
        self._node_idx = {n.id: i for i, n in enumerate(self.nodes)}

    def charger(self, charger_id: str) -> ChargerSpec:
        return self.chargers[self.charger_index(charger_id)]

    def charger_index(self, charger_id: str) -> int:
        try:
            return self._charger_idx[charger_id]
        except KeyError:
            raise KeyError(f"site {self.id!r} has no charger {charger_id!r}") from None

    def node(self, node_id: str) -> NodeSpec:
        return self.nodes[self.node_index(node_id)]

    def node_index(self, node_id: str) -> int:
        try:
            return self._node_idx[node_id]
        except KeyError:
            raise KeyError(f"site {self.id!r} has no node {node_id!r}") from None

    @property
    def charger_ids(self) -> list[str]:
        return [c.id for c in self.chargers]

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]


def _encode_non_finite(value: Any) -> Any:
    """JSON has no NaN/inf; the Rust validator reads them as these strings and rejects them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _encode_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode_non_finite(v) for v in value]
    return value


def _error(node: str, field: str, message: str) -> SiteConfigError:
    """A ``SiteConfigError`` raised from Python carries ``node`` and ``field`` like Rust's."""
    e = SiteConfigError(f"site config: {node}.{field}: {message}")
    e.node = node
    e.field = field
    return e


def _tuple3(x: list[float]) -> tuple[float, float, float]:
    return (float(x[0]), float(x[1]), float(x[2]))


def read_site_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The site file's TOML as a dict, unchecked; ``SiteConfigError`` (node ``site``, field
    ``file``) when it is missing, unreadable or not TOML, naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise _error("site", "file", f"site file {path} not found") from None
    except OSError as e:
        # A directory, no permission, an I/O error: said as such, not a traceback.
        raise _error("site", "file", f"cannot read site file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise _error("site", "file", f"{path}: not UTF-8 text as TOML must be ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise _error("site", "file", f"{path}: not valid TOML: {e}") from None


def load_site(source: str | os.PathLike[str] | Mapping[str, Any]) -> Site:
    """Load and validate a site from a TOML file path or an already parsed dict.

    Raises ``SiteConfigError`` (a ``ValueError``) naming the node or charger and the field.
    """
    path: Path | None = None
    if isinstance(source, Mapping):
        data: Mapping[str, Any] = source
    else:
        path = Path(source)
        data = read_site_file(path)
    topo_part = {k: data[k] for k in TOPOLOGY_SECTIONS if k in data}
    try:
        text = json.dumps(_encode_non_finite(topo_part), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _error("site", "file", f"holds a value that is not plain data: {e}") from None
    topology = _core.Topology.from_json(text)
    nodes = [
        NodeSpec(
            id=n["id"],
            parent=n["parent"],
            kind=n["kind"],
            phase_limit_a=_tuple3(n["phase_limit_a"]),
            power_limit_kw=n["power_limit_kw"],
            unbalance_limit_a=n["unbalance_limit_a"],
            other_load_max_a=_tuple3(n["other_load_max_a"]),
            breaker_rating_a=(
                None if n["breaker_rating_a"] is None else _tuple3(n["breaker_rating_a"])
            ),
            continuous_derating=n["continuous_derating"],
            depth=int(n["depth"]),
        )
        for n in topology.nodes()
    ]
    chargers = [
        ChargerSpec(
            id=c["id"],
            ocpp_id=c["ocpp_id"],
            evse_id=int(c["evse_id"]),
            connector_id=int(c["connector_id"]),
            parent=c["parent"],
            kind=c["kind"],
            wiring=c["wiring"],
            phases=tuple(int(p) for p in c["phases"]),
            voltage_v=float(c["voltage_v"]),
            min_a=float(c["min_a"]),
            max_a=float(c["max_a"]),
            steps_a=tuple(float(s) for s in c["steps_a"]),
            single_phase_car=bool(c["single_phase_car"]),
            max_w=c["max_w"],
            min_w=c["min_w"],
            efficiency=c["efficiency"],
            aux_w=c["aux_w"],
        )
        for c in topology.chargers()
    ]
    site_table = data.get("site", {})
    return Site(
        id=topology.site_id,
        phase_names=(
            topology.phase_names[0],
            topology.phase_names[1],
            topology.phase_names[2],
        ),
        voltage_ln_v=topology.voltage_ln_v,
        topology=topology,
        nodes=nodes,
        chargers=chargers,
        sections={k: v for k, v in data.items() if k not in TOPOLOGY_SECTIONS},
        path=path,
        name=site_table.get("name") if isinstance(site_table, Mapping) else None,
    )
