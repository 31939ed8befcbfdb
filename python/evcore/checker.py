"""Independent pure-numpy check of node line currents and limits.

Deliberately shares no code with the Rust core: it recomputes every node's line currents as
phasor sums from the site specs and the charger terminal currents, so tests (hypothesis), the
simulator's site physics and scenario reports can judge the envelope from outside.

Conventions (docs/site-file.md): site phases at 0°, −120°, +120°; ``charger_terminal_a[i, k]`` is
the current of charger i's terminal k (L1..L3 of the charger, after which its phase rotation
``phases`` maps terminal k to a site phase). Line-to-neutral and line-to-line chargers use column
0 only; a line-to-line load across a–b adds I∠(V_a − V_b) to line a and its negative to line b.
DC chargers: the AC line current per phase, on all three terminals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from evcore.site import Site

__all__ = ["Violation", "check_limits", "node_phase_currents", "node_power_kw", "node_unbalance_a"]

_ANGLES = np.array([0.0, -2.0 * np.pi / 3.0, 2.0 * np.pi / 3.0])
_UNIT = np.exp(1j * _ANGLES)

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Violation:
    node: str
    kind: str  # "phase", "power", "unbalance"
    phase: str | None
    value: float
    limit: float

    def __str__(self) -> str:
        unit = "kW" if self.kind == "power" else "A"
        where = f" phase {self.phase}" if self.phase else ""
        return f"{self.node}{where} {self.kind}: {self.value:.6g} > {self.limit:.6g} {unit}"


def _structure(site: Site) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], list[int]]:
    """Parent node index of each charger, parent of each node (-1 for the root), and the nodes
    ordered children first (for summing up the tree)."""
    idx = {n.id: j for j, n in enumerate(site.nodes)}
    charger_parent = np.array([idx[c.parent] for c in site.chargers], dtype=np.int64)
    node_parent = np.array(
        [-1 if n.parent is None else idx[n.parent] for n in site.nodes], dtype=np.int64
    )
    depth = [0] * len(site.nodes)
    for j in range(len(site.nodes)):
        d, cur = 0, int(node_parent[j])
        while cur >= 0:
            d, cur = d + 1, int(node_parent[cur])
        depth[j] = d
    bottom_up = sorted(range(len(site.nodes)), key=lambda j: -depth[j])
    return charger_parent, node_parent, bottom_up


def _sum_up(site: Site, own: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Values at each node itself → totals over each node's subtree."""
    _, node_parent, bottom_up = _structure(site)
    out = own.copy()
    for j in bottom_up:
        p = int(node_parent[j])
        if p >= 0:
            out[p] += out[j]
    return out


def _charger_line_phasors(site: Site, terminal_a: Array) -> npt.NDArray[np.complex128]:
    """(n_chargers, 3): each charger's phasor contribution to each site line."""
    out = np.zeros((len(site.chargers), 3), dtype=np.complex128)
    for i, c in enumerate(site.chargers):
        if c.wiring == "line_to_line":
            a, b = c.phases
            u = _UNIT[a] - _UNIT[b]
            u = u / abs(u)
            out[i, a] += terminal_a[i, 0] * u
            out[i, b] -= terminal_a[i, 0] * u
        elif c.wiring == "line_to_neutral":
            p = c.phases[0]
            out[i, p] += terminal_a[i, 0] * _UNIT[p]
        else:
            for k, p in enumerate(c.phases):
                out[i, p] += terminal_a[i, k] * _UNIT[p]
    return out


def _terminal(site: Site, charger_terminal_a: npt.ArrayLike) -> Array:
    t = np.asarray(charger_terminal_a, dtype=np.float64)
    if t.shape != (len(site.chargers), 3):
        want = (len(site.chargers), 3)
        raise ValueError(f"charger_terminal_a must have shape {want}, got {t.shape}")
    return t


def _other(site: Site, other_load_a: npt.ArrayLike | None) -> Array:
    if other_load_a is None:
        return np.zeros((len(site.nodes), 3))
    o = np.asarray(other_load_a, dtype=np.float64)
    if o.shape != (len(site.nodes), 3):
        raise ValueError(f"other_load_a must have shape ({len(site.nodes)}, 3), got {o.shape}")
    return o


def _node_phasors(site: Site, terminal: Array, other: Array) -> npt.NDArray[np.complex128]:
    charger_parent, _, _ = _structure(site)
    own = (other * _UNIT[None, :]).astype(np.complex128)
    np.add.at(own, charger_parent, _charger_line_phasors(site, terminal))
    phasors: npt.NDArray[np.complex128] = _sum_up(site, own)
    return phasors


def node_phase_currents(
    site: Site, charger_terminal_a: npt.ArrayLike, other_load_a: npt.ArrayLike | None = None
) -> Array:
    """(n_nodes, 3): magnitude of every node's line current per site phase (A)."""
    terminal = _terminal(site, charger_terminal_a)
    other = _other(site, other_load_a)
    return np.abs(_node_phasors(site, terminal, other))


def node_power_kw(
    site: Site, charger_terminal_a: npt.ArrayLike, other_load_a: npt.ArrayLike | None = None
) -> Array:
    """(n_nodes,): active power through every node (kW), unity power factor."""
    terminal = _terminal(site, charger_terminal_a)
    other = _other(site, other_load_a)
    per_charger = np.zeros(len(site.chargers))
    for i, c in enumerate(site.chargers):
        nt = 3 if c.wiring == "three_phase" else 1
        per_charger[i] = c.voltage_v * terminal[i, :nt].sum()
    charger_parent, _, _ = _structure(site)
    own = other.sum(axis=1) * site.voltage_ln_v
    np.add.at(own, charger_parent, per_charger)
    kw: Array = _sum_up(site, own) / 1000.0
    return kw


def node_unbalance_a(
    site: Site, charger_terminal_a: npt.ArrayLike, other_load_a: npt.ArrayLike | None = None
) -> Array:
    """(n_nodes,): worst-case phase unbalance (largest minus smallest line current), letting
    every three-phase AC charger that may carry a single-phase car draw on its L1 alone.

    Nodes without line-to-line loads: exact (currents add on each line). With line-to-line loads
    the low line is bounded from below by removing every such car's current (never smaller)."""
    terminal = _terminal(site, charger_terminal_a)
    other = _other(site, other_load_a)
    mag = np.abs(_node_phasors(site, terminal, other))
    charger_parent, _, _ = _structure(site)
    n_nodes = len(site.nodes)
    # drop[n, h, l]: what single-phase cars with L1 on h take off line l at node n.
    drop = np.zeros((n_nodes, 3, 3))
    l2l = np.zeros(n_nodes)
    for i, c in enumerate(site.chargers):
        j = int(charger_parent[i])
        if c.wiring == "line_to_line":
            l2l[j] = 1.0
        if c.kind == "ac" and c.wiring == "three_phase" and c.single_phase_car:
            h = c.phases[0]
            for k, lp in enumerate(c.phases):
                if lp != h:
                    drop[j, h, lp] += terminal[i, k]
    drop = _sum_up(site, drop)
    has_l2l = _sum_up(site, l2l) > 0
    worst = np.zeros(n_nodes)
    for n in range(n_nodes):
        for h in range(3):
            for lo in range(3):
                if h == lo:
                    continue
                if has_l2l[n]:
                    low = max(0.0, mag[n, lo] - sum(drop[n, x, lo] for x in range(3) if x != lo))
                else:
                    low = mag[n, lo] - drop[n, h, lo]
                worst[n] = max(worst[n], mag[n, h] - low)
    return worst


def check_limits(
    site: Site,
    charger_terminal_a: npt.ArrayLike,
    other_load_a: npt.ArrayLike | None = None,
    *,
    tol: float = 1e-6,
) -> list[Violation]:
    """Every node limit (per phase, kW, unbalance) that the given currents exceed."""
    cur = node_phase_currents(site, charger_terminal_a, other_load_a)
    kw = node_power_kw(site, charger_terminal_a, other_load_a)
    unb = node_unbalance_a(site, charger_terminal_a, other_load_a)
    out: list[Violation] = []
    for n, node in enumerate(site.nodes):
        for p in range(3):
            lim = node.phase_limit_a[p]
            if not cur[n, p] <= lim + tol * (1 + lim):
                out.append(Violation(node.id, "phase", site.phase_names[p], float(cur[n, p]), lim))
        if node.power_limit_kw is not None:
            lim = node.power_limit_kw
            if not kw[n] <= lim + tol * (1 + lim):
                out.append(Violation(node.id, "power", None, float(kw[n]), lim))
        if node.unbalance_limit_a is not None:
            lim = node.unbalance_limit_a
            if not unb[n] <= lim + tol * (1 + lim):
                out.append(Violation(node.id, "unbalance", None, float(unb[n]), lim))
    return out
