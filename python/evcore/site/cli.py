"""``evcore site check FILE``: validate a site file and print its tree with every limit."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from evcore.errors import SiteConfigError
from evcore.site import ChargerSpec, NodeSpec, Site, load_site


def _fmt3(x: tuple[float, float, float]) -> str:
    if x[0] == x[1] == x[2]:
        return f"{x[0]:g} A"
    return "/".join(f"{v:g}" for v in x) + " A"


def _node_line(site: Site, n: NodeSpec) -> str:
    parts = [f"{n.kind} {n.id}: {_fmt3(n.phase_limit_a)} per phase (continuous)"]
    if n.breaker_rating_a is not None and n.continuous_derating is not None:
        parts.append(
            f"= breaker {_fmt3(n.breaker_rating_a)} × {n.continuous_derating:g} continuous derating"
        )
    if n.power_limit_kw is not None:
        parts.append(f"max {n.power_limit_kw:g} kW")
    if n.unbalance_limit_a is not None:
        parts.append(f"unbalance ≤ {n.unbalance_limit_a:g} A")
    if any(v > 0 for v in n.other_load_max_a):
        parts.append(f"other load ≤ {_fmt3(n.other_load_max_a)}")
    return ", ".join(parts)


def _charger_line(site: Site, c: ChargerSpec) -> str:
    phases = "-".join(site.phase_names[p] for p in c.phases)
    if c.kind == "dc":
        return (
            f"DC charger {c.id} (ocpp {c.ocpp_id}, evse {c.evse_id}): {c.wiring} {phases}, "
            f"{c.min_w or 0:g}–{c.max_w or 0:g} W, efficiency {c.efficiency:g}, aux {c.aux_w:g} W "
            f"(≤ {c.max_a:.1f} A per phase)"
        )
    steps = f", steps {list(c.steps_a)}" if c.steps_a else ""
    return (
        f"AC charger {c.id} (ocpp {c.ocpp_id}, evse {c.evse_id}): {c.wiring} {phases} "
        f"{c.voltage_v:g} V, {c.min_a:g}–{c.max_a:g} A{steps}"
    )


def render_tree(site: Site) -> str:
    lines = [f"site {site.id}: phases {'/'.join(site.phase_names)}, {site.voltage_ln_v:g} V L-N"]
    children: dict[str | None, list[NodeSpec]] = {}
    for n in site.nodes:
        children.setdefault(n.parent, []).append(n)
    chargers_of: dict[str, list[ChargerSpec]] = {}
    for c in site.chargers:
        chargers_of.setdefault(c.parent, []).append(c)

    def walk(node: NodeSpec, indent: str) -> None:
        lines.append(f"{indent}{_node_line(site, node)}")
        for c in chargers_of.get(node.id, []):
            lines.append(f"{indent}  {_charger_line(site, c)}")
        for ch in children.get(node.id, []):
            walk(ch, indent + "  ")

    for root in children.get(None, []):
        walk(root, "  ")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.file)
    except SiteConfigError as e:
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return 1
    print(render_tree(site))
    print(f"ok: {len(site.nodes)} nodes, {len(site.chargers)} chargers")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("site", help="site file tools", description="Site file tools.")
    ssub = p.add_subparsers(dest="site_command", metavar="SUBCOMMAND", required=True)
    c = ssub.add_parser(
        "check",
        help="validate a site file and print its tree",
        description="Load and validate a site file; print the tree with every limit. "
        "Exits 1 with the error (naming the node and field) on a bad file.",
    )
    c.add_argument("file", help="path to the site TOML file")
    c.set_defaults(func=_check)
