"""``evcore bench allocator``: one Python call of allocation + envelope (Rust, ``_core.allocate``)
on prebuilt Arrow inputs, against the numpy reference of the same rules in the same process.

Sites: a 4-level three-phase tree (grid → feeders → panels → circuits → chargers) with mixed
wiring (three-phase with phase rotation, line-to-neutral, line-to-line, DC), limits that bind at
every level, a kW cap at the grid, sessions with mixed demand, priorities and measured draw.
Checks per case: every admitted water-filling level equals the reference within 0.01 A, every
setpoint (after the raise pass to the exact phasor limits and the envelope) equals the reference's
raised value put through the envelope within 0.01 A, the admitted sets are equal, the max-min
fairness certificate holds on the water-filling levels, and the output setpoints, counted as the
envelope's rules say, break no node limit according to the independent checker
(``evcore.checker``: exact phasor sums, kW, unbalance) beyond what the chargers hold alone.
Expected cost: O(n log n) (one sort) plus a few linear passes.

The reference's last step is the product's envelope (``_core.enforce``, timed with the
reference): there is one safety envelope, proven on its own by the property tests against the
independent checker. It changes the allocation where a newcomer waits for room that a car still
drawing its earlier setpoint has not yet freed (the water-filling shares such a constraint as if
the chargers followed their setpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from evcore import _core
from evcore.allocator import AllocatorParams, allocator_batch
from evcore.allocator_reference import SiteArrays, fairness_violations, reference_allocate
from evcore.checker import Violation, check_limits
from evcore.envelope import CHARGER_COLUMNS, EnvelopeParams, charger_batch, node_batch
from evcore.site import Site, load_site

PHASES = ["L1", "L2", "L3"]
ROTATIONS = [["L1", "L2", "L3"], ["L2", "L3", "L1"], ["L3", "L1", "L2"]]


def make_site(n: int, seed: int = 1) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    per_circuit, per_panel, per_feeder = 6, 8, 8
    n_circuits = max(1, math.ceil(n / per_circuit))
    n_panels = max(1, math.ceil(n_circuits / per_panel))
    n_feeders = max(1, math.ceil(n_panels / per_feeder))
    nodes: list[dict[str, Any]] = [
        {
            "id": "grid",
            "kind": "grid",
            "phase_limit_a": float(max(80.0, 9.0 * n)),
            "power_limit_kw": float(max(50.0, 5.5 * n)),
            "other_load_max_a": [20.0, 15.0, 15.0],
        }
    ]
    for f in range(n_feeders):
        nodes.append(
            {
                "id": f"F{f}",
                "parent": "grid",
                "kind": "feeder",
                "phase_limit_a": float(rng.uniform(10.0, 16.0) * per_circuit * per_panel * 8),
            }
        )
    for p in range(n_panels):
        nodes.append(
            {
                "id": f"P{p}",
                "parent": f"F{p // per_feeder}",
                "phase_limit_a": float(rng.uniform(14.0, 22.0) * per_circuit * per_panel / 3 * 1.5),
            }
        )
    for c in range(n_circuits):
        nodes.append(
            {
                "id": f"C{c}",
                "parent": f"P{c // per_panel}",
                "kind": "circuit",
                "phase_limit_a": [float(x) for x in rng.choice([40.0, 50.0, 63.0, 80.0], 3)],
            }
        )
    chargers: list[dict[str, Any]] = []
    for i in range(n):
        kind = rng.choice(["3ph", "ln", "ll", "dc"], p=[0.5, 0.25, 0.2, 0.05])
        ch: dict[str, Any] = {"id": f"cp{i}", "parent": f"C{i // per_circuit}"}
        if kind == "3ph":
            ch |= {
                "wiring": "three_phase",
                "phases": ROTATIONS[i % 3],
                "voltage_v": 230.0,
                "max_a": float(rng.choice([16.0, 32.0])),
            }
        elif kind == "ln":
            ch |= {
                "wiring": "line_to_neutral",
                "phases": [PHASES[i % 3]],
                "voltage_v": 230.0,
                "max_a": 32.0,
            }
        elif kind == "ll":
            ch |= {
                "wiring": "line_to_line",
                "phases": [PHASES[i % 3], PHASES[(i + 1) % 3]],
                "voltage_v": 400.0,
                "max_a": 32.0,
            }
        else:
            ch |= {
                "kind": "dc",
                "wiring": "three_phase",
                "phases": PHASES,
                "voltage_v": 230.0,
                "max_w": 22000.0,
                "efficiency": 0.95,
                "aux_w": 200.0,
            }
        chargers.append(ch)
    return {
        "site": {"id": f"bench-{n}", "voltage_ln_v": 230.0},
        "nodes": nodes,
        "chargers": chargers,
    }


def make_inputs(site: Site, seed: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inputs of one tick. The state the chargers are in (last setpoints, measured draw) comes
    from the allocator's own output one minute earlier, so it is a state a site can be in: the
    current that chargers hold regardless of their new setpoint fits the limits."""
    rng = np.random.default_rng(seed)
    n, nn = len(site.chargers), len(site.nodes)
    now = 1_767_225_600.0
    connected = rng.random(n) < 0.92
    demand: dict[str, Any] = {
        "energy_wanted_kwh": rng.uniform(0.0, 60.0, n),
        "departure_s": now + rng.uniform(600.0, 8 * 3600.0, n),
        "priority": rng.choice([1.0, 1.0, 2.0, 3.0], n),
    }
    ncols: dict[str, Any] = {
        "other_load_l1_a": np.where(np.arange(nn) == 0, 12.0, 0.0),
        "other_load_l2_a": np.where(np.arange(nn) == 0, 8.0, 0.0),
        "other_load_l3_a": np.where(np.arange(nn) == 0, 10.0, 0.0),
        "other_load_age_s": np.full(nn, 2.0),
    }
    earlier = connected & (rng.random(n) < 0.7)
    prev = _core.allocate(
        site.topology,
        allocator_batch(site, connected=earlier, **demand),
        node_batch(site, **ncols),
        AllocatorParams(now_s=now - 60.0).as_dict(),
        False,
    )
    dc = np.array([c.kind == "dc" for c in site.chargers])
    last_a = prev.column("setpoint_a").to_numpy()
    last_w = prev.column("setpoint_w").to_numpy()
    running = last_a > 0
    draw = last_a * rng.uniform(0.3, 1.0, n)
    cols: dict[str, Any] = {
        "measured_l1_a": draw,
        "measured_l2_a": draw,
        "measured_l3_a": draw,
        "measured_age_s": np.where(rng.random(n) < 0.9, 5.0, 600.0),
        "last_sent_a": np.where(dc, 0.0, last_a),
        "last_sent_w": np.where(dc, last_w, 0.0),
        "last_sent_confirmed": np.ones(n, dtype=bool),
        "connected": connected,
        "on_since_s": np.where(running, now - 3600.0, np.nan),
        # What the readings were taken under, as the edge says: the setpoint still in force.
        "read_under_a": np.where(dc, np.nan, last_a),
        "read_under_w": np.where(dc, last_w, np.nan),
        "off_since_s": np.where(running, np.nan, now - 3600.0),
        **demand,
    }
    return cols, ncols


def counted_violations(
    site: Site,
    setpoint_a: npt.NDArray[np.float64],
    held_a: npt.NDArray[np.float64],
    ncols: dict[str, Any],
    params: dict[str, float],
) -> list[Violation]:
    """Every node limit the output breaks, judged by the independent checker (exact phasor sums)
    with currents counted as the envelope's rules say: each charger at the larger of its new
    setpoint and what it holds (fresh measurement, unconfirmed last setpoint), non-charger load
    as measured when fresh and at its configured maximum when stale or unknown."""
    three = np.array([c.wiring == "three_phase" for c in site.chargers])
    other_max = np.array([n.other_load_max_a for n in site.nodes], dtype=np.float64)
    age = np.asarray(ncols["other_load_age_s"], dtype=np.float64)
    fresh = np.isfinite(age) & (age >= 0) & (age <= params.get("stale_after_s", 60.0))
    measured = np.stack([np.asarray(ncols[f"other_load_l{k}_a"]) for k in (1, 2, 3)], axis=1)
    measured = np.where(np.isnan(measured), other_max, np.maximum(measured, 0.0))
    other = np.where(fresh[:, None], measured, other_max)

    def over(counted: npt.NDArray[np.float64]) -> list[Violation]:
        terminal = np.zeros((len(site.chargers), 3))
        terminal[:, 0] = counted
        terminal[three, 1:] = counted[three, None]
        return check_limits(site, terminal, other)

    # Where what is held alone is over a limit, no setpoint can make it fit (the envelope sizes
    # setpoints there for chargers that follow them, and nothing below rises).
    held_over = {(v.node, v.kind, v.phase) for v in over(held_a)}
    counted = over(np.maximum(setpoint_a, held_a))
    return [v for v in counted if (v.node, v.kind, v.phase) not in held_over]


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def reference_setpoints(
    site: Site,
    sa: SiteArrays,
    raised_a: npt.NDArray[np.float64],
    cols: dict[str, Any],
    nb: Any,
    params: dict[str, float],
) -> npt.NDArray[np.float64]:
    """The reference's raised values (line A; DC converted back to W) through the envelope."""
    with np.errstate(invalid="ignore"):
        dc_w = np.where(
            raised_a > 0,
            np.clip((raised_a * 3.0 * sa.volt - sa.aux) * sa.eff, 0.0, sa.max_w),
            0.0,
        )
    req = {k: v for k, v in cols.items() if k in _ENVELOPE_COLUMNS}
    req["requested_a"] = np.where(sa.dc, 0.0, raised_a)
    req["requested_w"] = np.where(sa.dc, dc_w, 0.0)
    env = {k: v for k, v in params.items() if k in _ENVELOPE_PARAMS}
    out = _core.enforce(site.topology, charger_batch(site, **req), nb, env, False)
    return np.asarray(out.column("setpoint_a").to_numpy())


_ENVELOPE_PARAMS = frozenset(EnvelopeParams().as_dict())
_ENVELOPE_COLUMNS = frozenset(CHARGER_COLUMNS)


def run_case(n: int, reps: int, ref_reps: int) -> dict[str, Any]:
    site = load_site(make_site(n))
    cols, ncols = make_inputs(site)
    params = AllocatorParams(now_s=1_767_225_600.0).as_dict()
    cb = allocator_batch(site, **cols)
    nb = node_batch(site, **ncols)
    full_cols = {
        name: np.asarray(cb.column(name).to_numpy(zero_copy_only=False)) for name in cb.schema.names
    }
    full_ncols = {
        name: np.asarray(nb.column(name).to_numpy(zero_copy_only=False)) for name in nb.schema.names
    }
    sa = SiteArrays.build(site)
    ours: list[float] = []
    theirs: list[float] = []
    out = _core.allocate(site.topology, cb, nb, params, False)  # warm-up
    ref = reference_allocate(sa, full_cols, full_ncols, params)
    ref_sp = reference_setpoints(site, sa, ref.raised_a, full_cols, nb, params)
    for i in range(reps):
        t0 = time.perf_counter()
        out = _core.allocate(site.topology, cb, nb, params, False)
        ours.append(time.perf_counter() - t0)
        if i < ref_reps:
            t0 = time.perf_counter()
            ref = reference_allocate(sa, full_cols, full_ncols, params)
            ref_sp = reference_setpoints(site, sa, ref.raised_a, full_cols, nb, params)
            theirs.append(time.perf_counter() - t0)
    explained: list[float] = []
    for _ in range(max(3, reps // 10)):
        t0 = time.perf_counter()
        _core.allocate(site.topology, cb, nb, params, True)
        explained.append(time.perf_counter() - t0)
    level = out.column("level_a").to_numpy()
    admitted = out.column("admitted").to_numpy(zero_copy_only=False)
    setpoint = out.column("setpoint_a").to_numpy()
    diff = float(np.max(np.abs(level - ref.level_a))) if n else 0.0
    # After the raise pass to the exact phasor limits and the envelope.
    sp_diff = float(np.max(np.abs(setpoint - ref_sp))) if n else 0.0
    fair = fairness_violations(sa, ref, level)
    violations = counted_violations(site, setpoint, ref.held_counted, full_ncols, params)
    med, rmed = statistics.median(ours), statistics.median(theirs)
    return {
        "name": f"allocate+envelope {n}",
        "chargers": n,
        "nodes": len(site.nodes),
        "repetitions": reps,
        "reference_repetitions": ref_reps,
        "median_s": med,
        "p99_s": _p99(ours),
        "reference_median_s": rmed,
        "ratio": rmed / med if med > 0 else math.inf,
        "explain_median_s": statistics.median(explained),
        "max_abs_diff_a": diff,
        "max_abs_diff_setpoint_a": sp_diff,
        "raised": int(np.sum(ref.raised_a > ref.level_a + 1e-6)),
        "held_by_envelope": int(np.sum(ref_sp < ref.raised_a - 0.01)),
        "admitted_equal": bool(np.array_equal(admitted, ref.admitted)),
        "admitted": int(admitted.sum()),
        "fairness_violations": len(fair),
        "violations": len(violations),
        "feasible": not violations,
        "ok": bool(
            diff <= 0.01
            and sp_diff <= 0.01
            and not fair
            and not violations
            and np.array_equal(admitted, ref.admitted)
        ),
    }


def dump_case(n: int, out_dir: str) -> None:
    """Write the site and one tick's inputs of the ``n``-charger case for the Rust-only timing
    driver (``allocator::tests::bench_dump``): ``site.json``, ``params.json`` and every input
    column as raw little-endian float64 (booleans as 0/1), named after the column."""
    raw = make_site(n)
    site = load_site(raw)
    cols, ncols = make_inputs(site)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "site.json").write_text(json.dumps(raw))
    params = AllocatorParams(now_s=1_767_225_600.0).as_dict()
    # JSON has no infinity: the driver reads a missing or null parameter as +inf.
    (out / "params.json").write_text(
        json.dumps({k: v for k, v in params.items() if math.isfinite(v)})
    )
    for batch in (allocator_batch(site, **cols), node_batch(site, **ncols)):
        for name in batch.schema.names:
            if name.endswith("_id"):
                continue
            col = batch.column(name).to_numpy(zero_copy_only=False)
            np.asarray(col).astype("<f8").tofile(out / f"{name}.f64")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evcore bench allocator", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the JSON array of cases")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repetitions")
    ap.add_argument("--sizes", type=str, default="", help="comma-separated charger counts")
    ap.add_argument("--reps", type=int, default=0, help="repetitions of the Rust call (>= 30)")
    ap.add_argument(
        "--dump",
        metavar="DIR",
        default="",
        help="write the first size's site and inputs to DIR for the Rust-only driver"
        " (EVCORE_BENCH_DUMP=DIR cargo test -p evcore-core --profile ci -- --ignored"
        " --nocapture bench_dump) and exit",
    )
    args = ap.parse_args(argv)
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    else:
        sizes = [54, 500] if args.quick else [54, 500, 10_000, 100_000]
    if args.dump:
        dump_case(sizes[0], args.dump)
        return 0
    cases = []
    for n in sizes:
        reps = args.reps or (5 if args.quick else (200 if n <= 10_000 else 50))
        ref_reps = min(reps, 5 if args.quick else (30 if n <= 10_000 else 5))
        cases.append(run_case(n, reps, ref_reps))
    big = {c["chargers"]: c for c in cases}
    if 10_000 in big and 100_000 in big:
        for c in cases:
            c["scaling_100k_over_10k"] = big[100_000]["median_s"] / big[10_000]["median_s"]
    if args.json:
        print(json.dumps(cases, indent=1))
    else:
        for c in cases:
            print(
                f"{c['name']:>28}: median {c['median_s'] * 1e3:8.3f} ms"
                f"  p99 {c['p99_s'] * 1e3:8.3f} ms"
                f"  ref {c['reference_median_s'] * 1e3:9.2f} ms  ratio {c['ratio']:7.1f}"
                f"  diff {c['max_abs_diff_a']:.2e}/{c['max_abs_diff_setpoint_a']:.2e} A"
                f"  raised {c['raised']}  fair-viol {c['fairness_violations']}"
                f"  viol {c['violations']}  {'ok' if c['ok'] else 'FAILED'}"
            )
    return 0 if all(c["ok"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
