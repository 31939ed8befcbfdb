"""Test-only: an independent check of a schedule against every hard limit (numpy phasors from the
core input document, nothing from the Rust model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from planner_cvxpy_reference import phasors


def _at(series: list[float], k: int) -> float:
    return series[0] if len(series) == 1 else series[k]


def limit_violations(doc: dict[str, Any], batch: pa.RecordBatch) -> list[str]:
    """Recompute every node's line currents and power per step from the schedule alone."""
    steps = doc["step_s"]
    starts = doc["start_s"] + np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    k_of = {round(float(s) * 1e6): k for k, s in enumerate(starts)}
    ch = {c["id"]: c for c in doc["chargers"]}
    nodes = {n["id"]: n for n in doc["nodes"]}
    sessions = {s["id"]: s for s in doc.get("sessions", [])}
    cols = batch.to_pydict()
    cur = {(n, k): np.zeros(3, dtype=complex) for n in nodes for k in range(len(steps))}
    kw = {(n, k): 0.0 for n in nodes for k in range(len(steps))}
    bad = []
    for sid, cid, start, ta, tw in zip(
        cols["session_id"],
        cols["charger_id"],
        cols["step_start"],
        cols["target_a"],
        cols["target_w"],
        strict=True,
    ):
        c = ch[cid]
        k = k_of[round(start.timestamp() * 1e6)]
        if c.get("kind", "ac") == "dc":
            rate = tw / 1000.0
            lo, hi = c.get("min_w", 0.0) / 1000.0, c["max_w"] / 1000.0
        else:
            rate = ta
            lo, hi = c.get("min_a", 6.0), c["max_a"]
        if not (rate == 0.0 or lo - 1e-9 <= rate <= hi + 1e-9):
            bad.append(f"{cid} step {k}: {rate} outside 0 or [{lo}, {hi}]")
        # The vehicle draws at most what it takes (a target at the charger's minimum above it).
        s = sessions.get(sid, {})
        vmax = s.get("max_w") if c.get("kind", "ac") == "dc" else s.get("max_a")
        if vmax is not None:
            rate = min(rate, vmax / 1000.0 if c.get("kind", "ac") == "dc" else vmax)
        coeff, site_kw, _ = phasors(c)
        n = c["parent"]
        while n is not None:
            cur[(n, k)] += coeff * rate
            kw[(n, k)] += site_kw * rate
            n = nodes[n].get("parent")
    for (n, k), i in cur.items():
        node = nodes[n]
        for p in range(3):
            lim = _at(node["phase_limit_a"][p], k) - _at(node["other_load_a"][p], k)
            if abs(i[p]) > lim + 1e-6:
                bad.append(f"{n} phase {p} step {k}: {abs(i[p])} > {lim}")
        if node.get("power_limit_kw") is not None:
            cap = _at(node["power_limit_kw"], k) - _at(node["other_load_kw"], k)
            if kw[(n, k)] > cap + 1e-6:
                bad.append(f"{n} power step {k}: {kw[(n, k)]} > {cap}")
    return bad
