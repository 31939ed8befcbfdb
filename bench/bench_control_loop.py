"""``evcore bench control-loop``: from an event that requires decreases to the profiles arriving.

End to end through real sockets: the edge controller (Rust allocator + envelope), the OCPP central
system on a loopback WebSocket, and one simulated 1.6 station per charger (``evcore.sim``), with
``SitePhysics`` counting every 100 ms sample over a node-phase limit. All chargers charge; the event
is a grid curtailment in force at once (at most 5 % of the site's power at the grid node), which
requires a decrease at every charger. Per repetition we measure, at the stations, when each
charger's first SetChargingProfile after the event arrived:

* ``p50_s`` / ``p99_s``: event → arrival, over every charger of every repetition;
* ``time_to_last_s``: event → the last charger's profile arrived (median over repetitions);
* ``reference_median_s``: the same decreases sent the way a naive controller would (one awaited
  ``set_limit`` after the other through the same central system, no decision), time to the last;
* ``violations``: the site physics' count over the whole run (must be 0).

Then the curtailment is cancelled and the increases settle before the next repetition. The event
loop is shared by edge, stations and physics (one process, 2 cores shared with others), so these
figures are upper bounds of the edge's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any


class _Stamped(list[Any]):
    """A station's ``received`` list that also notes when each CALL arrived (monotonic)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def append(self, item: Any) -> None:
        self.at.append(time.monotonic())
        super().append(item)


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def _run(n: int, reps: int, warmup: int) -> dict[str, Any]:
    from evcore.checker import node_power_kw
    from evcore.edge.config import EdgeConfig
    from evcore.edge.grid import Curtailment
    from evcore.edge.rig import EdgeRig
    from evcore.edge.sitegen import depot_table
    from evcore.sim.ev import EV

    table = depot_table(n, sample_interval_s=5)
    cfg = EdgeConfig(
        tick_s=1.0,
        settle_s=2.0,
        curtail_lead_s=0.0,
        min_on_s=0.0,
        min_off_s=0.0,
        restart_max_profiles_per_s=10_000.0,
    )
    rig = EdgeRig(table, cfg=cfg, sim_tick_s=0.5, apply_delay_s=0.2)
    latencies: list[float] = []
    to_last: list[float] = []
    reference: list[float] = []
    decision_s: list[float] = []
    await rig.start(connect_timeout_s=120)
    try:
        ctrl = rig.controller
        assert ctrl is not None and rig.core is not None
        await rig.wait_for(rig.failsafe_applied, 120, "TxDefault at the failsafe level")
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 120, "sessions"
        )
        await asyncio.sleep(3.0)
        full_kw = float(node_power_kw(rig.site, rig.fleet.terminal_currents())[0])
        cap_kw = max(1.0, 0.05 * full_kw)
        sims = list(rig.fleet.stations.values())
        station_of = {cid: rig.fleet.station(cid)[0] for cid in rig.fleet.charger_ids}
        for rep in range(warmup + reps):
            for sim in sims:
                sim.received = _Stamped()
            now = rig.clock.now()
            t0 = time.monotonic()
            ctrl.post_curtailment(Curtailment(f"bench-{rep}", "grid", cap_kw, now, now + 3600))

            def arrived(t0: float = t0) -> bool:
                return all(any(a == "SetChargingProfile" for a, _ in sim.received) for sim in sims)

            await rig.wait_for(arrived, 30, "a profile at every station", poll_s=0.01)
            if rep >= warmup:
                firsts = []
                for cid in rig.fleet.charger_ids:
                    sim = station_of[cid]
                    at = next(
                        t
                        for (a, _), t in zip(sim.received, sim.received.at, strict=True)
                        if a == "SetChargingProfile"
                    )
                    firsts.append(at - t0)
                latencies.extend(firsts)
                to_last.append(max(firsts))
                decision_s.append(ctrl.stats.last_decision_s)
            # Release, let increases settle and measurements refresh.
            ctrl.cancel_curtailment(f"bench-{rep}")
            await asyncio.sleep(7.0)
        # Reference: the same number of decreases, awaited one after the other (no decision).
        central = rig.central
        for _rep in range(max(3, reps // 3)):
            t0 = time.monotonic()
            for cid in rig.fleet.charger_ids:
                c = ctrl.state.chargers[cid]
                await central.set_limit(cid, limit_a=c.sent or 0.0, purpose="tx")
            reference.append(time.monotonic() - t0)
        violations = int(rig.physics.violations)
        samples = int(rig.physics.samples)
    finally:
        await rig.stop()
    ours = statistics.median(to_last)
    ref = statistics.median(reference)
    return {
        "name": "control_loop_curtailment",
        "chargers": n,
        "repetitions": reps,
        "median_s": _p(latencies, 0.5),
        "p50_s": _p(latencies, 0.5),
        "p99_s": _p(latencies, 0.99),
        "time_to_last_s": ours,
        "time_to_last_p99_s": _p(to_last, 0.99),
        "decision_median_s": statistics.median(decision_s) if decision_s else float("nan"),
        "reference_median_s": ref,
        "ratio": ref / ours if ours > 0 else float("nan"),
        "violations": violations,
        "physics_samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evcore bench control-loop", description=__doc__)
    ap.add_argument("--chargers", type=int, nargs="+", default=[500])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 chargers, 3 repetitions")
    args = ap.parse_args(argv)
    sizes = [20] if args.quick else args.chargers
    reps = 3 if args.quick else args.reps
    rows = [asyncio.run(_run(n, reps, warmup=1)) for n in sizes]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['chargers']:>5} chargers: p50 {r['p50_s'] * 1e3:.1f} ms, "
                f"p99 {r['p99_s'] * 1e3:.1f} ms, last profile {r['time_to_last_s'] * 1e3:.1f} ms "
                f"(sequential reference {r['reference_median_s'] * 1e3:.1f} ms, "
                f"ratio {r['ratio']:.1f}), violations {r['violations']}"
            )
    return 0 if all(r["violations"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
