"""``evcore site check FILE``: validate a site file as ``evcore edge`` does at start, and print its
tree with every limit.

It owns no section's rules: each room's own validator (the ones the edge runs before it opens a
socket) says what is wrong, so a file this passes is one the edge loads. It never opens a socket, a
store or a bus.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from evcore.errors import SiteConfigError
from evcore.site import ChargerSpec, NodeSpec, Site, load_site

#: ``evcore site check``'s exit code for a site file ``evcore edge`` would refuse: the edge's own
#: (``evcore.edge.cli.EXIT_CONFIG``, argparse's for a usage error), so that a deploy script that
#: checks the file first sees the code the unit would (it was 1 here, 2 there).
EXIT_BAD_FILE = 2


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


#: The site file's top-level tables: the topology (the core's) and the section of every room the
#: edge configures from it. Any other is refused: a typo such as ``[metric]`` for ``[metrics]``
#: would leave that room at its defaults (no endpoint) without a word.
SITE_TABLES: tuple[str, ...] = (
    "site",
    "nodes",
    "chargers",
    "edge",
    "ocpp",
    "bus",
    "store",
    "api",
    "metrics",
    "cloud",
    "planner",
)
#: Tables of a digital-twin scenario (``evcore sim`` checks those), not of a site file.
_TWIN_TABLES = ("scenario", "arrivals", "tariff", "demand_charge", "grid_signals", "faults")


def _section_checks(base_dir: Path) -> dict[str, Callable[[Mapping[str, Any]], object]]:
    """Per section, the validator ``evcore edge`` runs on it at start (edge/cli.py, EdgeApp),
    given the whole site table; relative files are taken from ``base_dir`` as the edge does."""
    from evcore.api import ApiConfig
    from evcore.edge.cloudlink import CloudLinkConfig
    from evcore.edge.config import EdgeConfig
    from evcore.edge.planning import PlannerSection
    from evcore.metrics import MetricsConfig
    from evcore.ocpp import parse_ocpp_section
    from evcore.store import StoreConfig

    return {
        # [edge] with what it takes from [ocpp] (whole_amperes against resolution_a).
        "edge": EdgeConfig.from_site,
        # With the TLS files' check the central system makes when the edge loads the file.
        "ocpp": lambda t: parse_ocpp_section(t.get("ocpp"), base_dir=base_dir).check_tls_files(),
        # The edge has no bus without [bus], and no API without [api]: nothing to check then.
        "bus": lambda t: "bus" not in t or _bus_check(t["bus"]),
        # Always: the edge opens the store [store] names, the embedded one without it.
        "store": lambda t: StoreConfig.from_section(t.get("store")),
        "api": lambda t: "api" not in t or ApiConfig.from_section(t["api"], base_dir),
        "metrics": lambda t: MetricsConfig.from_section(t.get("metrics"), base_dir),
        "cloud": lambda t: CloudLinkConfig.from_section(t.get("cloud"), base_dir),
        "planner": lambda t: PlannerSection.from_table(t.get("planner")),
    }


def _bus_check(section: Any) -> object:
    """``[bus]`` as the edge reads it; a ``creds_file`` given by an absolute path must be
    readable (a relative one is the edge's working directory's, unknown here)."""
    from evcore.bus import parse_bus_config
    from evcore.bus.config import check_creds_file

    cfg = parse_bus_config(section)
    if cfg.kind == "nats" and Path(cfg.creds_file).is_absolute():
        check_creds_file(cfg)
    return cfg


def section_errors(table: Mapping[str, Any], base_dir: Path | str) -> list[str]:
    """What ``evcore edge`` would refuse in the file's sections other than the topology: unknown
    top-level tables, then each section's first error (in ``SITE_TABLES`` order)."""
    errors: list[str] = []
    unknown = [k for k in table if k not in SITE_TABLES]
    if unknown:
        twin = any(k in _TWIN_TABLES for k in unknown)
        note = " (a twin scenario's tables: `evcore sim` checks those)" if twin else ""
        errors.append(
            f"unknown table{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(f'[{k}]' for k in unknown)}; known tables: "
            f"{', '.join(f'[{k}]' for k in SITE_TABLES)}{note}"
        )
    checks = _section_checks(Path(base_dir))
    for name, check in checks.items():
        section = table.get(name)
        if section is not None and not isinstance(section, Mapping):
            errors.append(f"[{name}]: expected a table, got {type(section).__name__}")
            continue
        if name == "edge" and not isinstance(table.get("ocpp") or {}, Mapping):
            continue  # said for [ocpp]
        try:
            check(table)
        except (ValueError, KeyError) as e:  # every section's error is a ValueError
            errors.append(str(e))
    return errors


#: At most this many stations are named in one warning (the rest are counted).
NAMED_STATIONS_MAX = 50


def _named(stations: list[str]) -> str:
    shown = ", ".join(stations[:NAMED_STATIONS_MAX])
    rest = len(stations) - NAMED_STATIONS_MAX
    return f"{shown} and {rest} more" if rest > 0 else shown


def station_warnings(site: Site, table: Mapping[str, Any], base_dir: Path | str) -> list[str]:
    """What the file lets through that an operator should know of, though it loads (``evcore
    site check`` and ``evcore edge`` at start say them): stations under security profile 0,
    open to any client that knows their id; a station whose security profile (1 or 2) asks
    for a password the file does not give (refused, HTTP 401, at every connection); and
    credentials of an OCPP id no charger has (a typo of one)."""
    from evcore.ocpp import parse_ocpp_section

    section = table.get("ocpp")
    try:
        cfg = parse_ocpp_section(section, base_dir=Path(base_dir))
    except (ValueError, KeyError):
        return []  # said as an error
    chargers: dict[str, list[str]] = {}
    for c in site.chargers:
        chargers.setdefault(c.ocpp_id, []).append(c.id)
    warnings = []
    open_stations = [
        f"{ocpp_id} ({', '.join(ids)})"
        for ocpp_id, ids in chargers.items()
        if cfg.profile_for(ocpp_id) == 0
    ]
    if open_stations:
        every = "every station" if len(open_stations) == len(chargers) else "stations"
        warnings.append(
            f"[ocpp]: security profile 0 (no authentication) leaves {every} open: "
            f"{_named(open_stations)}; any client that reaches {cfg.host}:{cfg.port} with one "
            "of these ids is taken for that station, no password asked (closed networks and "
            "tests only: give them security_profile 1, 2 or 3 and a password in "
            "[ocpp.credentials] or the credentials_file)"
        )
    for ocpp_id, ids in chargers.items():
        profile = cfg.profile_for(ocpp_id)
        creds = cfg.credentials_for(ocpp_id)
        if profile in (1, 2) and (creds is None or not creds.passwords()):
            warnings.append(
                f"[ocpp]: station {ocpp_id} ({', '.join(ids)}) has no password and security "
                f"profile {profile} asks for one: it will be refused (HTTP 401); give it one in "
                "[ocpp.credentials] or the credentials_file"
            )
    for ocpp_id in sorted(set(cfg.credentials) - set(chargers)):
        warnings.append(
            f"[ocpp]: credentials for station {ocpp_id}, which no charger has (a typo of an "
            "ocpp_id?)"
        )
    return warnings


def _check(args: argparse.Namespace) -> int:
    try:
        site: Site | None = load_site(args.file)
        topology_error = ""
    except SiteConfigError as e:
        if getattr(e, "field", None) == "file":  # unreadable, not TOML: nothing more to check
            print(f"error: {args.file}: {e}", file=sys.stderr)
            return EXIT_BAD_FILE
        site, topology_error = None, str(e)
    path = Path(args.file)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:  # changed since loaded
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return EXIT_BAD_FILE
    errors = [topology_error] if topology_error else []
    errors += section_errors(table, path.resolve().parent)
    if site is not None:
        print(render_tree(site))
    for error in errors:
        print(f"error: {args.file}: {error}", file=sys.stderr)
    if errors or site is None:
        return EXIT_BAD_FILE
    for warning in station_warnings(site, table, path.resolve().parent):
        print(f"warning: {args.file}: {warning}", file=sys.stderr)
    sections = [f"[{k}]" for k in SITE_TABLES[3:] if k in table]
    checked = f"; {', '.join(sections)} as the edge reads them" if sections else ""
    print(f"ok: {len(site.nodes)} nodes, {len(site.chargers)} chargers{checked}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("site", help="site file tools", description="Site file tools.")
    ssub = p.add_subparsers(dest="site_command", metavar="SUBCOMMAND", required=True)
    c = ssub.add_parser(
        "check",
        help="validate a site file as the edge does and print its tree",
        description="Load and validate a site file as `evcore edge` does at start: the topology "
        "and every section ([edge], [ocpp], [bus], [store], [api], [metrics], [cloud], "
        "[planner]); an unknown top-level table is an error. Print the tree with every limit, "
        "or each error (naming the node or section and the key) on a bad file. "
        "Warns of stations left open (security profile 0: no password) and of a station that "
        "will be refused for want of a password. "
        "Opens no socket, store or bus. See docs/site-file.md.",
        epilog="exit codes: 0: the edge loads the file (warnings do not change it); 2: a usage "
        "error or a bad site file (missing, unreadable, not UTF-8 or not TOML, an invalid "
        "topology or section, an unknown table), the code `evcore edge` exits with on the same "
        "file.",
    )
    c.add_argument("file", help="path to the site TOML file")
    c.set_defaults(func=_check)
