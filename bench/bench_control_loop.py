"""``evcore bench control-loop``: from an event that requires decreases to the profiles leaving.

End to end through real sockets: the edge controller (Rust allocator + envelope), its audit log on
a real store (embedded SQLite by default, the edge's default; ``--store postgres`` for the local
PostgreSQL) and the OCPP central system on a loopback WebSocket in this process; one simulated 1.6
station per charger (``evcore.sim``) with ``SitePhysics`` counting every 100 ms sample over a
node-phase limit in a *child* process, so the stations' own work does not run on the edge's event
loop (the machine has 2 cores; the edge gets one, the fleet the other). All chargers charge; the
event is a grid curtailment in force at once (at most 5 % of the site's power at the grid node),
which requires a decrease at every charger. Per repetition, ``t0`` is taken just before the
curtailment is posted, and for every charger its first TxProfile of a decision after it is
followed to the instant its SetChargingProfile frame was handed to the charger's socket (the
central system stamps it, ``ProfileResult.sent_mono``; one ``time.monotonic`` clock):

* ``p50_s`` / ``p99_s``: event → the decrease leaving, over every charger of every repetition;
* ``time_to_last_s``: event → the last decrease of the decision left (median over repetitions);
* ``arrival_p50_s`` / ``arrival_p99_s`` / ``arrival_last_s``: event → the frame *arriving* at the
  station (the child's ``time.monotonic``; adds loopback and the fleet process's own queueing);
* ``decision_median_s``: the decision itself (allocate + envelope + dispatch + audit record +
  handing every profile to the central system);
* ``event_to_decision_median_s`` / ``decision_to_last_median_s``: the event → the decision's
  start (the loop waking), and the decision's start → its last decrease leaving;
* ``audit_median_s`` / ``audit_p99_s``: the durable audit append of those decisions (inside it);
* ``reference_median_s``: the same decreases sent the way a naive controller would (one awaited
  ``set_limit`` after the other through the same central system, no decision), time to the last;
* ``violations``: the site physics' count over the whole run (must be 0).

Then the curtailment is cancelled and the increases settle before the next repetition.
``--quick`` runs 20 chargers, 3 repetitions (a smoke test, well under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
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


# ---- the fleet (child process) -------------------------------------------------------------
async def _fleet_child(url: str, table: dict[str, Any]) -> None:
    """Stations + physics; commands on stdin, one JSON answer per line on stdout."""
    from evcore.edge.rig import EdgeRig
    from evcore.sim.ev import EV

    rig = EdgeRig(table, with_edge=False, url=url, sim_tick_s=0.5, apply_delay_s=0.2)
    await rig.start(connect_timeout_s=120)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stations = rig.fleet.stations
    station_of = {cid: rig.fleet.station(cid)[0] for cid in rig.fleet.charger_ids}

    def answer(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    marks: list[tuple[float, str]] = []  # (monotonic, command) to place violations in time
    first_over: list[dict[str, Any]] = []  # the first few violating samples, with their cause
    physics = rig.physics
    plain_sample = physics.sample

    def sample() -> int:
        n_over = int(plain_sample())
        if n_over and len(first_over) < 5:
            first_over.append(_over_snapshot(rig, marks))
        return n_over

    physics.sample = sample
    answer({"ready": True})
    try:
        while line := (await reader.readline()).decode().strip():
            marks.append((time.monotonic(), line))
            if line == "plug":
                # Plugged only once every station applies its TxDefault (accepted is not
                # applied: a car plugged in before that draws whatever the station allows).
                await rig.wait_for(rig.defaults_held, 30, "every station's TxDefault applied")
                for cid in rig.fleet.charger_ids:
                    rig.fleet.plug_in(cid, EV(soc=0.2))
                answer({"ok": True})
            elif line == "arm":
                for sim in stations.values():
                    sim.received = _Stamped()
                answer({"ok": True})
            elif line == "firsts":
                firsts: dict[str, float | None] = {}
                for cid, sim in station_of.items():
                    firsts[cid] = next(
                        (
                            t
                            for (a, _), t in zip(sim.received, sim.received.at, strict=True)
                            if a == "SetChargingProfile"
                        ),
                        None,
                    )
                answer(firsts)
            elif line == "stats":
                ph = rig.physics
                answer(
                    {
                        "violations": ph.violations,
                        "samples": ph.samples,
                        "by_node": {k: v for k, v in ph.violations_by_node.items() if v},
                        "worst_excess_a": ph.worst_excess_a,
                        "first_over": first_over,
                    }
                )
            elif line == "stop":
                break
    finally:
        await rig.stop()
    answer({"stopped": True})


def _over_snapshot(rig: Any, marks: list[tuple[float, str]]) -> dict[str, Any]:
    """What the stations held and drew when a sample went over a limit: per violated node, the
    sum of the drawn and of the allowed currents (the composite limit each station applies now)
    and how many connectors draw on a TxProfile, on a TxDefault or on nothing of ours."""
    ph = rig.physics
    now_mono = time.monotonic()
    over = ph.line_currents() > ph.limits_a + 1e-6
    fleet = rig.fleet
    parent = {c.id: c.parent for c in rig.site.chargers}
    nodes: dict[str, Any] = {}
    for i in sorted({int(i) for i in over.nonzero()[0]}):
        node = ph.node_ids[i]
        drawn = allowed = 0.0
        purposes: dict[str, int] = {}
        for cid in fleet.charger_ids:
            p = parent[cid]
            if node != "grid" and p != node:
                continue
            sim, evse = fleet.station(cid)
            con = sim.connectors[evse]
            drawn += con.terminal_a[0]
            allowed += con.offered
            now = sim.clock.now()
            tx = any(
                q.purpose == "tx" and sim._profile_value(q, con, now) is not None
                for q in sim.profiles
                if q.evse == evse
            )
            key = "tx" if tx else ("active" if con.tx_active else "idle")
            purposes[key] = purposes.get(key, 0) + 1
        nodes[node] = {
            "limit_a": float(ph.limits_a[i][0]),
            "drawn_l1_a": round(drawn, 1),
            "offered_sum_a": round(allowed, 1),
            "connectors": purposes,
        }
    last = marks[-1] if marks else (now_mono, "")
    return {"after": last[1], "after_s": round(now_mono - last[0], 3), "nodes": nodes}


class _Fleet:
    """The parent's handle on the child process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: str, timeout_s: float = 120.0) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command:
            self.proc.stdin.write((command + "\n").encode())
            await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"fleet process ended (rc={self.proc.returncode}) on {command!r}")
        return json.loads(line)


# ---- the edge (this process) ---------------------------------------------------------------
class _PerProfile:
    """The central system without ``send_limits``: the controller then awaits one ``set_limit``
    task per profile (its path before the batch call; ``--path per-profile``)."""

    def __init__(self, central: Any) -> None:
        self._central = central

    def __getattr__(self, name: str) -> Any:
        if name == "send_limits":
            raise AttributeError(name)
        return getattr(self._central, name)


class _TimedAudit:
    """The edge's ``AuditRecorder`` with each append timed (seconds, per decision number)."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder
        self.append_s: dict[int, float] = {}

    async def append(self, record: Any) -> None:
        t = time.perf_counter()
        await self.recorder.append(record)
        self.append_s[int(record["decision"])] = time.perf_counter() - t

    def confirm_sent(self, charger_id: str, decision: int, at: float) -> None:
        self.recorder.confirm_sent(charger_id, decision, at)


async def _open_audit(kind: str, tmp: str, clock: Any) -> tuple[Any, Any]:
    """(audit sink, store) for ``--store``: ``embedded`` (SQLite, FULL), ``postgres``, ``none``."""
    if kind == "none":
        return None, None
    from evcore.audit.log import AuditLog
    from evcore.edge.recording import AuditRecorder
    from evcore.store import open_store

    if kind == "postgres":
        section: dict[str, Any] = {
            "kind": "postgres",
            "dsn": "postgresql://postgres@127.0.0.1:5432/test",
            "schema": f"bench_cl_{int(time.time())}",
        }
    else:
        section = {"kind": "embedded", "path": str(Path(tmp) / "store")}
    store = open_store(section, tmp)
    await store.open()
    log = AuditLog(store, clock=clock)
    return _TimedAudit(AuditRecorder(log, store)), store


async def _run(
    n: int, reps: int, warmup: int, store_kind: str = "embedded", path: str = "batch"
) -> dict[str, Any]:
    from evcore.clock import WallClock
    from evcore.edge.app import build_controller
    from evcore.edge.config import EdgeConfig
    from evcore.edge.controller import SentProfile
    from evcore.edge.coreio import RustCore
    from evcore.edge.grid import Curtailment
    from evcore.edge.sitegen import depot_table
    from evcore.ocpp import CentralSystem
    from evcore.site import load_site

    table = depot_table(n, sample_interval_s=5)
    site = load_site(table)
    clock = WallClock()
    cfg = EdgeConfig(
        tick_s=1.0,
        settle_s=2.0,
        curtail_lead_s=0.0,
        min_on_s=0.0,
        min_off_s=0.0,
        # Every repetition pauses most chargers and resumes them: without this the sessions
        # reach the switch cap after a few repetitions and stay paused (nothing left to lower).
        max_switches=1_000_000,
        restart_max_profiles_per_s=10_000.0,
    )
    sent: list[SentProfile] = []
    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    audit, store = await _open_audit(store_kind, tmp, clock)
    central = CentralSystem(site, clock=clock)
    core = RustCore(site, table)
    gateway = central if path == "batch" else _PerProfile(central)
    ctrl = build_controller(
        table, core=core, gateway=gateway, clock=clock, cfg=cfg, on_sent=sent.append, audit=audit
    )
    central.add_listener(ctrl.on_event)
    await central.start()
    loop_task = asyncio.create_task(ctrl.run())
    url = f"ws://127.0.0.1:{central.port}{central.config.path_prefix}"
    latencies: list[float] = []
    to_last: list[float] = []
    arrivals: list[float] = []
    arrival_last: list[float] = []
    reference: list[float] = []
    decision_s: list[float] = []
    audit_s: list[float] = []
    n_decreases: list[int] = []
    to_start: list[float] = []
    spread: list[float] = []
    phases: list[dict[str, Any]] = []  # where violations happened (if any)
    violations_seen = 0
    try:
        table_path = Path(tmp) / "site.json"
        table_path.write_text(json.dumps(table))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--fleet-child",
            url,
            str(table_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        fleet = _Fleet(proc)
        try:
            await fleet.ask("", timeout_s=180)  # ready: every station connected

            async def until(cond: Any, timeout_s: float, what: str) -> None:
                deadline = time.monotonic() + timeout_s
                while not cond():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
                    await asyncio.sleep(0.05)

            states = ctrl.state.chargers.values()
            try:
                await until(
                    lambda: (
                        # Not the levels sized with chargers at their maximum (first TxDefaults
                        # not yet known applied): those are on their way up.
                        ctrl.failsafe_is_plain()
                        and all(c.tx_default == ctrl.failsafe[c.charger_id] for c in states)
                    ),
                    120,
                    "TxDefault at the failsafe level",
                )
            except TimeoutError:
                off = [
                    (c.charger_id, c.tx_default, c.tx_default_sent, ctrl.failsafe.get(c.charger_id))
                    for c in states
                    if c.tx_default != ctrl.failsafe.get(c.charger_id)
                ]
                print(
                    f"no TxDefault: {sum(c.tx_default is None for c in states)}; "
                    f"TxDefault off its level: {len(off)} (first: {off[:5]}); "
                    f"decisions: {ctrl.stats.decisions}; increases held: {ctrl.increases_held}",
                    file=sys.stderr,
                )
                raise
            await fleet.ask("plug")
            await until(lambda: all(c.transaction_id for c in states), 120, "sessions")

            def settled() -> bool:
                # Every session holds an accepted TxProfile (or TxDefault), nothing is on its way
                # and no increase waits (for a decrease to a car drawing less than its new limit,
                # settle_s): the event then finds every charger at a known value above its
                # curtailed one.
                return (
                    all(
                        c.transaction_id
                        and c.sent is not None
                        and c.accepted
                        and not c.needs_resend
                        for c in states
                    )
                    and all(p.accepted for p in ctrl.pending.values())
                    and not ctrl.increases_held
                )

            async def until_settled() -> None:
                try:
                    await until(settled, 60, "sessions at accepted values")
                except TimeoutError:
                    from collections import Counter

                    print(
                        Counter(
                            (bool(c.transaction_id), c.sent, c.accepted, c.needs_resend)
                            for c in states
                        ),
                        Counter(
                            (core.last_codes.get(c.charger_id), core.last_nodes.get(c.charger_id))
                            for c in states
                            if not c.sent
                        ),
                        Counter(p.accepted for p in ctrl.pending.values()),
                        file=sys.stderr,
                    )
                    raise

            await asyncio.sleep(3.0)
            await until_settled()
            plugged = await fleet.ask("stats")
            if plugged["violations"]:
                phases.append({"rep": "plug-in", **plugged})
            violations_seen = plugged["violations"]
            # What the chargers may draw now (three-phase, 230 V): the curtailment takes 95 %.
            full_kw = sum((c.sent or 0.0) * 3 * 230.0 / 1000.0 for c in states)
            cap_kw = max(1.0, 0.05 * full_kw)
            for rep in range(warmup + reps):
                await until_settled()
                await fleet.ask("arm")
                decisions_before = ctrl.stats.decisions
                n_sent = len(sent)
                now = clock.now()
                t0 = time.monotonic()
                ctrl.post_curtailment(Curtailment(f"bench-{rep}", "grid", cap_kw, now, now + 3600))
                firsts: dict[str, float | None] = {}
                deadline = time.monotonic() + 30
                while True:
                    await asyncio.sleep(0.1)
                    firsts = await fleet.ask("firsts")
                    if all(v is not None for v in firsts.values()):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError("a profile at every station")
                # Each charger's first TxProfile after the event, and when its frame left. (A
                # charger already at its new value gets a refresh with the new final level, not a
                # decrease: it is not counted.)
                first_tx: dict[str, SentProfile] = {}
                for sp in sent[n_sent:]:
                    if sp.purpose == "tx" and sp.decision > decisions_before:
                        first_tx.setdefault(sp.charger_id, sp)
                first_tx = {c: sp for c, sp in first_tx.items() if sp.kind.value == "decrease"}
                if len(first_tx) < n // 2:
                    from collections import Counter

                    seen = Counter((sp.purpose, sp.kind.value, sp.decision) for sp in sent[n_sent:])
                    raise RuntimeError(
                        f"only {len(first_tx)} of {n} chargers got a decrease "
                        f"(decisions before the event: {decisions_before}; sent since: {seen}; "
                        f"held: {sorted({c.sent for c in states})[:5]}, cap {cap_kw:.1f} kW)"
                    )
                n_decreases.append(len(first_tx))
                await until(
                    lambda ft=first_tx: all(sp.wire_mono is not None for sp in ft.values()),
                    30,
                    "every decrease's answer (with the instant it left)",
                )
                if rep >= warmup:
                    lat = [float(sp.wire_mono or 0.0) - t0 for sp in first_tx.values()]
                    latencies.extend(lat)
                    to_last.append(max(lat))
                    arr = [float(v) - t0 for v in firsts.values() if v is not None]
                    arrivals.extend(arr)
                    arrival_last.append(max(arr))
                    first_decision = min(sp.decision for sp in first_tx.values())
                    started = min(sp.left_mono for sp in first_tx.values())
                    to_start.append(started - t0)
                    spread.append(
                        max(float(sp.wire_mono or 0.0) for sp in first_tx.values()) - started
                    )
                    decision_s.append(ctrl.stats.decision_s.get(first_decision, float("nan")))
                    if audit is not None and first_decision in audit.append_s:
                        audit_s.append(audit.append_s[first_decision])
                # Release, let increases settle and measurements refresh.
                v_curtailed = (await fleet.ask("stats"))["violations"]
                ctrl.cancel_curtailment(f"bench-{rep}")
                await asyncio.sleep(7.0)
                after = await fleet.ask("stats")
                if after["violations"] > violations_seen:
                    phases.append(
                        {
                            "rep": rep,
                            "while_curtailed": v_curtailed - violations_seen,
                            "after_release": after["violations"] - v_curtailed,
                            "by_node": after["by_node"],
                            "worst_excess_a": after["worst_excess_a"],
                            "first_over": after["first_over"],
                        }
                    )
                violations_seen = after["violations"]
            # Reference: the same number of decreases, awaited one after the other.
            for _rep in range(max(3, reps // 3)):
                t0 = time.monotonic()
                for c in states:
                    await central.set_limit(c.charger_id, limit_a=c.sent or 0.0, purpose="tx")
                reference.append(time.monotonic() - t0)
            stats = await fleet.ask("stats")
            await fleet.ask("stop", timeout_s=60)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            ctrl.stop()
            await asyncio.wait_for(loop_task, 10)
            await central.stop()
    finally:
        if audit is not None:
            await audit.recorder.drain()
        if store is not None:
            await store.close()
        tmpdir.cleanup()
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
        "decreases_min": min(n_decreases),
        "arrival_p50_s": _p(arrivals, 0.5),
        "arrival_p99_s": _p(arrivals, 0.99),
        "arrival_last_s": statistics.median(arrival_last),
        "decision_median_s": statistics.median(decision_s) if decision_s else float("nan"),
        "event_to_decision_median_s": statistics.median(to_start),
        "decision_to_last_median_s": statistics.median(spread),
        "path": path,
        "audit_store": store_kind,
        "audit_median_s": statistics.median(audit_s) if audit_s else float("nan"),
        "audit_p99_s": _p(audit_s, 0.99),
        "reference_median_s": ref,
        "ratio": ref / ours if ours > 0 else float("nan"),
        "violations": int(stats["violations"]),
        "physics_samples": int(stats["samples"]),
        "violations_where": phases,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evcore bench control-loop", description=__doc__)
    ap.add_argument("--chargers", type=int, nargs="+", default=[500])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 chargers, 3 repetitions")
    ap.add_argument(
        "--store",
        choices=["embedded", "postgres", "none"],
        default="embedded",
        help="where the audit log lives (default: the edge's embedded store)",
    )
    ap.add_argument(
        "--path",
        choices=["batch", "per-profile"],
        default="batch",
        help="how the controller hands profiles over: one send_limits call (default) or one "
        "awaited set_limit task per profile (the path before send_limits, for comparison)",
    )
    args = ap.parse_args(argv)
    sizes = [20] if args.quick else args.chargers
    reps = 3 if args.quick else args.reps
    rows = [
        asyncio.run(_run(n, reps, warmup=1, store_kind=args.store, path=args.path)) for n in sizes
    ]
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
    if len(sys.argv) == 4 and sys.argv[1] == "--fleet-child":
        asyncio.run(_fleet_child(sys.argv[2], json.loads(Path(sys.argv[3]).read_text())))
        sys.exit(0)
    sys.exit(main())
