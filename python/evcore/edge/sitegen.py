"""Synthetic depot sites for the edge's tests and the control-loop benchmark.

What this module owns: a site-file table (the same shape ``evcore.site.load_site`` reads) of a
depot with N three-phase AC chargers under feeders under one grid connection, sized so that not all
chargers can draw their maximum at once. It never decides anything.
"""

from __future__ import annotations

import math
from typing import Any


def depot_table(
    n_chargers: int,
    *,
    per_feeder: int = 50,
    max_a: float = 32.0,
    feeder_share: float = 0.5,
    grid_share: float = 0.4,
    site_id: str = "bench-depot",
    edge: dict[str, Any] | None = None,
    power_limit_kw: float | None = None,
    sample_interval_s: int = 1,
) -> dict[str, Any]:
    """A depot: grid → ceil(N / per_feeder) feeders → chargers (three-phase, 32 A).

    Each feeder allows ``feeder_share`` of its chargers' maximum per phase, the grid connection
    ``grid_share`` of all chargers' maximum; no other load, no unbalance cap (three-phase cars on
    three-phase chargers only), so the failsafe level is a plain fair share.
    """
    if n_chargers < 1:
        raise ValueError(f"n_chargers must be >= 1, got {n_chargers}")
    n_feeders = math.ceil(n_chargers / per_feeder)
    nodes: list[dict[str, Any]] = [
        {
            "id": "grid",
            "kind": "grid",
            "phase_limit_a": round(grid_share * n_chargers * max_a, 1),
        }
    ]
    if power_limit_kw is not None:
        nodes[0]["power_limit_kw"] = power_limit_kw
    chargers: list[dict[str, Any]] = []
    for f in range(n_feeders):
        members = range(f * per_feeder, min(n_chargers, (f + 1) * per_feeder))
        nodes.append(
            {
                "id": f"F{f + 1}",
                "parent": "grid",
                "kind": "feeder",
                "phase_limit_a": round(feeder_share * len(members) * max_a, 1),
            }
        )
        for i in members:
            chargers.append(
                {
                    "id": f"cp-{i + 1:04d}",
                    "ocpp_id": f"CP{i + 1:04d}",
                    "parent": f"F{f + 1}",
                    "wiring": "three_phase",
                    "phases": ["L1", "L2", "L3"],
                    "voltage_v": 230.0,
                    "min_a": 6.0,
                    "max_a": max_a,
                    "single_phase_car": False,
                }
            )
    table: dict[str, Any] = {
        "site": {"id": site_id, "phase_names": ["L1", "L2", "L3"], "voltage_ln_v": 230.0},
        "nodes": nodes,
        "chargers": chargers,
        "ocpp": {
            "host": "127.0.0.1",
            "port": 0,
            "security_profile": 0,
            "sample_interval_s": sample_interval_s,
        },
    }
    if edge:
        table["edge"] = dict(edge)
    return table


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"cannot write non-finite number {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        # An inline table (e.g. ``[api].tokens`` entries).
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(table: dict[str, Any]) -> str:
    """A site table as TOML (tables of scalars and lists, arrays of such tables)."""
    lines: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
            lines.append("")
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                lines.append(f"[[{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                lines.append("")
        else:
            raise ValueError(f"top-level key {key!r} must be a table or an array of tables")
    return "\n".join(lines)
