"""Test-only reference: the planning model of docs/planner.md written again in cvxpy, read from
the same core input document, solved with cvxpy's Clarabel backend at the same tolerances.

Written independently of the Rust model builder (own phasors, own windows, SOC for every line
current), so agreeing objectives mean both implement the documented model.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# cvxpy and scipy ship no complete type information (a test-only dependency): typed as Any.
cp: Any = importlib.import_module("cvxpy")
sp: Any = importlib.import_module("scipy.sparse")


def _at(series: list[float], k: int) -> float:
    return series[0] if len(series) == 1 else series[k]


def phasors(ch: dict[str, Any]) -> tuple[np.ndarray, float, float]:
    """Per-unit line phasors (3 complex), site kW per unit, vehicle kW per unit."""
    v_phase = [np.exp(-2j * math.pi * p / 3) for p in range(3)]
    c = np.zeros(3, dtype=complex)
    kind = ch.get("kind", "ac")
    ph = ch["phases"]
    v = ch["voltage_v"]
    if kind == "dc":
        eff = ch.get("efficiency", 0.95)
        for p in ph:
            c[p] = v_phase[p] * 1000.0 / (eff * 3 * v)
        return c, 1.0 / eff, 1.0
    if ch["wiring"] == "line_to_neutral":
        c[ph[0]] = v_phase[ph[0]]
        return c, v / 1000.0, v / 1000.0
    if ch["wiring"] == "line_to_line":
        d = v_phase[ph[0]] - v_phase[ph[1]]
        d /= abs(d)
        c[ph[0]] += d
        c[ph[1]] -= d
        return c, v / 1000.0, v / 1000.0
    for p in ph:
        c[p] = v_phase[p]
    return c, 3 * v / 1000.0, 3 * v / 1000.0


@dataclass
class ReferenceResult:
    status: str
    objective: float
    x: np.ndarray | None
    vars: list[tuple[int, int, float]]
    build_s: float
    solve_s: float


def solve_reference(
    doc: dict[str, Any],
    *,
    tol_gap_abs: float = 1e-7,
    tol_gap_rel: float = 1e-7,
    tol_feas: float = 1e-7,
    max_iter: int = 200,
    limit_margin_rel: float = 1e-6,
) -> ReferenceResult:
    t_build = time.perf_counter()
    steps = np.array(doc["step_s"], dtype=float)
    T = len(steps)
    start = float(doc["start_s"])
    starts = start + np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    ends = starts + steps
    horizon = float(ends[-1] - start)
    nodes = doc["nodes"]
    node_ix = {n["id"]: i for i, n in enumerate(nodes)}
    root = next(i for i, n in enumerate(nodes) if n.get("parent") is None)
    chargers = doc["chargers"]
    ch_ix = {c["id"]: i for i, c in enumerate(chargers)}

    def ancestors(i: int) -> list[int]:
        out = [i]
        while nodes[out[-1]].get("parent") is not None:
            out.append(node_ix[nodes[out[-1]]["parent"]])
        return out

    ch_anc = [set(ancestors(node_ix[c["parent"]])) for c in chargers]
    ch_data = [phasors(c) for c in chargers]

    # variables: (session, step, fraction)
    vars_: list[tuple[int, int, float]] = []
    smax: list[float] = []
    for si, s in enumerate(doc["sessions"]):
        c = chargers[ch_ix[s["charger_id"]]]
        if c.get("kind", "ac") == "dc":
            mx = min(c["max_w"], s.get("max_w", math.inf)) / 1000.0
        else:
            mx = min(c["max_a"], s.get("max_a", math.inf))
        smax.append(mx)
        if mx <= 0:
            continue
        for k in range(T):
            ov = min(ends[k], s["departure_s"]) - max(starts[k], s["arrival_s"])
            if ov > 0:
                vars_.append((si, k, ov / steps[k]))
    N = len(vars_)
    w = doc["weights"]

    def tighten(h: float) -> float:
        return h - limit_margin_rel * (abs(h) + 1.0)

    x = cp.Variable(N)
    g = cp.Variable(T)
    cons: list[Any] = [x >= 0, g >= 0]
    xmax = np.array([smax[s] for s, _, _ in vars_])
    cons.append(x <= xmax)

    # energy balance per session with variables
    sess_with = sorted({s for s, _, _ in vars_})
    u = cp.Variable(len(sess_with))
    srow = {s: j for j, s in enumerate(sess_with)}
    E = sp.lil_matrix((len(sess_with), N))
    site_kw = np.zeros(N)
    for v, (s, k, f) in enumerate(vars_):
        c = ch_ix[doc["sessions"][s]["charger_id"]]
        E[srow[s], v] = ch_data[c][2] * f * steps[k] / 3600.0
        site_kw[v] = ch_data[c][1]
    req = np.array([doc["sessions"][s]["energy_requested_kwh"] for s in sess_with])
    if sess_with:
        cons += [E.tocsr() @ x + u == req, u >= 0]

    # site meter import
    F = sp.lil_matrix((T, N))
    for v, (_s, k, f) in enumerate(vars_):
        F[k, v] = f * site_kw[v]
    other_root = np.array([_at(nodes[root]["other_load_kw"], k) for k in range(T)])
    pv = np.array([_at(doc["pv_kw"], k) for k in range(T)])
    cons.append(g >= F.tocsr() @ x + other_root - pv)

    # node limits
    for ni, n in enumerate(nodes):
        members = [
            v
            for v, (s, _k, _f) in enumerate(vars_)
            if ni in ch_anc[ch_ix[doc["sessions"][s]["charger_id"]]]
        ]
        if not members:
            continue
        if n.get("power_limit_kw") is not None:
            P = sp.lil_matrix((T, N))
            for v in members:
                P[vars_[v][1], v] = site_kw[v]
            rows = [k for k in range(T) if P[k].nnz > 0]
            h = np.array(
                [tighten(_at(n["power_limit_kw"], k) - _at(n["other_load_kw"], k)) for k in rows]
            )
            cons.append(P.tocsr()[rows] @ x <= h)
        for ph in range(3):
            Re = sp.lil_matrix((T, N))
            Im = sp.lil_matrix((T, N))
            for v in members:
                s, k, _f = vars_[v]
                cc = ch_data[ch_ix[doc["sessions"][s]["charger_id"]]][0][ph]
                if cc != 0:
                    Re[k, v] = cc.real
                    Im[k, v] = cc.imag
            rows = [k for k in range(T) if (Re[k].nnz + Im[k].nnz) > 0]
            if not rows:
                continue
            h = np.array(
                [
                    tighten(_at(n["phase_limit_a"][ph], k) - _at(n["other_load_a"][ph], k))
                    for k in rows
                ]
            )
            M = cp.vstack([Re.tocsr()[rows] @ x, Im.tocsr()[rows] @ x])
            cons.append(cp.norm(M, 2, axis=0) <= h)

    # objective
    obj = (np.array([_at(doc["price_per_kwh"], k) for k in range(T)]) * steps / 3600.0) @ g
    if sess_with:
        prio = np.array([doc["sessions"][s].get("priority", 1.0) for s in sess_with])
        obj = obj + (w["non_delivery_per_kwh"] * prio) @ u
    qx = np.zeros(N)
    eqw = np.zeros(N)
    for v, (s, k, f) in enumerate(vars_):
        c = ch_ix[doc["sessions"][s]["charger_id"]]
        mid = starts[k] + 0.5 * steps[k] - start
        kwh = ch_data[c][2] * f * steps[k] / 3600
        qx[v] = w["charge_early_per_kwh"] * (mid / horizon) * kwh
        # urgency: a kWh priced by how far into its own session's time left it comes
        left = max(doc["sessions"][s]["departure_s"] - start, steps[k])
        qx[v] += w.get("urgency_per_kwh", 0.0) * min(1.0, mid / left) * kwh
        eqw[v] = w["equal_share"] * (steps[k] / 3600.0) / xmax[v] ** 2
    if N:
        obj = obj + qx @ x + cp.sum(cp.multiply(eqw, cp.square(x)))
        pairs = [(v - 1, v) for v in range(1, N) if vars_[v][0] == vars_[v - 1][0]]
        if pairs and w["smooth"] > 0:
            a = np.array([p[0] for p in pairs])
            b = np.array([p[1] for p in pairs])
            sw = w["smooth"] / xmax[a] ** 2
            obj = obj + cp.sum(cp.multiply(sw, cp.square(x[b] - x[a])))
    dc = doc.get("demand_charge_per_kw", 0.0)
    if dc > 0:
        D = cp.Variable()
        W = doc.get("demand_window_s", 900.0)
        ws = math.floor(start / W) * W
        rows_c = []
        past = []
        while ws < ends[-1]:
            coef = np.clip(np.minimum(ends, ws + W) - np.maximum(starts, ws), 0, None) / W
            if coef.any():
                rows_c.append(coef)
                past.append(
                    doc.get("current_window_energy_kwh", 0.0) * 3600 / W if ws < start else 0.0
                )
            ws += W
        cons += [np.array(rows_c) @ g + np.array(past) <= D, D >= doc.get("peak_floor_kw", 0.0)]
        obj = obj + dc * D
    prob = cp.Problem(cp.Minimize(obj), cons)
    t_solve = time.perf_counter()
    prob.solve(
        solver=cp.CLARABEL,
        tol_gap_abs=tol_gap_abs,
        tol_gap_rel=tol_gap_rel,
        tol_feas=tol_feas,
        max_iter=max_iter,
    )
    t_end = time.perf_counter()
    return ReferenceResult(
        status=str(prob.status),
        objective=float(prob.value) if prob.value is not None else math.nan,
        x=None if x.value is None else np.asarray(x.value),
        vars=vars_,
        build_s=t_solve - t_build,
        solve_s=t_end - t_solve,
    )
