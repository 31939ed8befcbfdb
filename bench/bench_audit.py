"""Audit append latency: how long the edge waits before a decision's setpoints may leave.

Ours: ``AuditLog.append`` (seal onto the hash chain, check the head, insert record + charger index +
head in one transaction, durable commit) on the embedded store and on PostgreSQL. Reference, in the
same process and interleaved: a bare durable INSERT of the same serialised record into one table of
the same database kind (SQLite ``synchronous=FULL`` / PostgreSQL ``synchronous_commit=on``), i.e.
the cost of durability alone. ``ratio`` = reference / ours (higher is better; < 1 is the price of
the chain). Each case checks its result: the chain verifies and holds every record.

Sizes: ``chargers`` = setpoints per decision (10, 100, 1000). Expected cost: one fsync/commit per
append plus O(chargers) serialisation and index rows; the fsync dominates at small sizes.

``setpoints_batch_*``: recording a decision's last setpoints per charger. Ours: one
``Store.add_setpoints`` batch (one commit); reference: one ``record_setpoint_sent`` per charger (one
commit each, what a per-charger writer costs). ``ratio`` = reference / ours; ``ok`` checks every
charger's last setpoint is the round's.

    evcore bench audit [--json] [--quick] [--backend sqlite|postgres|both] [--reps N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from evcore.audit import AuditLog, Decision, verify_chain
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1.audit_pb2 import ChargerBinding
from evcore.v1.setpoint_pb2 import BindingReason, Setpoint
from psycopg import sql as pgsql

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def decision(i: int, chargers: int) -> Decision:
    sps = [
        Setpoint(
            charger_id=f"C{c}",
            setpoint_a=6.0 + (i + c) % 26,
            binding=BindingReason.BINDING_REASON_NODE_PHASE_LIMIT,
            binding_node_id=f"F{c % 8}",
            reason=f"held at {6 + (i + c) % 26} A: feeder F{c % 8} phase L1 at 63 of 63 A",
        )
        for c in range(chargers)
    ]
    return Decision(
        decision_id=f"bench-{i}",
        trigger="tick",
        inputs_digest=f"{i:064x}",
        setpoints=sps,
        bindings=[ChargerBinding(charger_id="X", reason="no session")],
    )


class Reference:
    """A bare durable insert of the same bytes."""

    def __init__(self, kind: str, where: Path, schema: str) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.lite = sqlite3.connect(
                where / "reference.sqlite", isolation_level=None, check_same_thread=False
            )
            self.lite.execute("PRAGMA journal_mode=WAL")
            self.lite.execute("PRAGMA synchronous=FULL")
            self.lite.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        else:
            self.pg = psycopg.connect(PG_DSN, autocommit=True)
            self.pg.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(schema)))
            self.pg.execute("CREATE TABLE r (seq BIGINT PRIMARY KEY, payload BYTEA NOT NULL)")

    def insert(self, seq: int, payload: bytes) -> None:
        if self.kind == "sqlite":
            self.lite.execute("BEGIN IMMEDIATE")
            self.lite.execute("INSERT INTO r VALUES (?, ?)", (seq, payload))
            self.lite.execute("COMMIT")
        else:
            with self.pg.transaction():
                self.pg.execute("INSERT INTO r VALUES (%s, %s)", (seq, payload))

    def close(self) -> None:
        if self.kind == "sqlite":
            self.lite.close()
        else:
            self.pg.close()


async def run_case(kind: str, chargers: int, reps: int, warmup: int) -> dict[str, Any]:
    schema = f"evbench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        section: dict[str, object] = (
            {"kind": "embedded", "path": str(where / "store")}
            if kind == "sqlite"
            else {"kind": "postgres", "dsn": PG_DSN, "schema": schema}
        )
        store = open_store(section, where)
        await store.open()
        ref = Reference(kind, where, schema)
        # The reference runs on its own worker thread too: the same hop off the event loop as ours.
        pool = ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()
        log = AuditLog(store, clock=ManualClock())
        ours: list[float] = []
        theirs: list[float] = []
        try:
            for i in range(warmup + reps):
                d = decision(i, chargers)
                t0 = time.perf_counter()
                rec = await log.append(d)
                t1 = time.perf_counter()
                payload = rec.SerializeToString()
                t2 = time.perf_counter()
                await loop.run_in_executor(pool, ref.insert, i, payload)
                t3 = time.perf_counter()
                if i >= warmup:
                    ours.append(t1 - t0)
                    theirs.append(t3 - t2)
            report = await verify_chain(store)
        finally:
            await loop.run_in_executor(pool, ref.close)
            pool.shutdown()
            await store.close()
            if kind == "postgres":
                with psycopg.connect(PG_DSN, autocommit=True) as pg:
                    pg.execute(
                        pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            pgsql.Identifier(schema)
                        )
                    )

    def p99(xs: list[float]) -> float:
        return sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]

    med, ref_med = statistics.median(ours), statistics.median(theirs)
    return {
        "name": f"audit_append_{kind}",
        "chargers": chargers,
        "repetitions": reps,
        "median_s": med,
        "p99_s": p99(ours),
        "reference_median_s": ref_med,
        "reference_p99_s": p99(theirs),
        "ratio": ref_med / med if med > 0 else None,
        "chain_ok": report.ok,
        "records": report.records,
        "feasible": report.ok and report.records == warmup + reps,
    }


def _section(kind: str, where: Path, schema: str) -> dict[str, object]:
    if kind == "sqlite":
        return {"kind": "embedded", "path": str(where / "store")}
    return {"kind": "postgres", "dsn": PG_DSN, "schema": schema}


async def run_setpoints_case(kind: str, chargers: int, reps: int) -> dict[str, Any]:
    """Recording a decision's last setpoints: ours = one ``add_setpoints`` batch (one commit);
    reference = one ``record_setpoint_sent`` per charger (one commit each), interleaved."""
    schema = f"evbench_{uuid.uuid4().hex[:10]}"
    ours: list[float] = []
    theirs: list[float] = []
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(_section(kind, Path(tmp), schema), Path(tmp))
        await store.open()
        try:
            for i in range(1 + reps):  # the first round warms up
                batch = [
                    (
                        Setpoint(
                            charger_id=f"C{c}",
                            setpoint_a=6.0 + (i + c) % 26,
                            decision_id=f"bench-{i}",
                            reason=f"held at {6 + (i + c) % 26} A: feeder F{c % 8}",
                        ),
                        float(i),
                    )
                    for c in range(chargers)
                ]
                t0 = time.perf_counter()
                await store.add_setpoints(batch)
                t1 = time.perf_counter()
                for sp, at in batch:
                    await store.record_setpoint_sent(sp, at + 0.5)
                t2 = time.perf_counter()
                if i >= 1:
                    ours.append(t1 - t0)
                    theirs.append(t2 - t1)
                last = await store.last_setpoints()
                ok = (
                    ok
                    and len(last) == chargers
                    and all(r.setpoint.decision_id == f"bench-{i}" for r in last.values())
                )
        finally:
            await store.close()
            if kind == "postgres":
                with psycopg.connect(PG_DSN, autocommit=True) as pg:
                    pg.execute(
                        pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                            pgsql.Identifier(schema)
                        )
                    )
    med, ref_med = statistics.median(ours), statistics.median(theirs)
    return {
        "name": f"setpoints_batch_{kind}",
        "chargers": chargers,
        "repetitions": reps,
        "median_s": med,
        "p99_s": max(ours),
        "reference_median_s": ref_med,
        "reference_p99_s": max(theirs),
        "ratio": ref_med / med if med > 0 else None,
        "chain_ok": ok,
        "records": chargers,
        "feasible": ok,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evcore bench audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the JSON array of cases")
    p.add_argument("--quick", action="store_true", help="smoke run: few repetitions, SQLite, 10")
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--reps", type=int, default=60, help="measured appends per case (after warm-up)")
    p.add_argument("--chargers", type=int, nargs="*", default=[10, 100, 1000])
    p.add_argument(
        "--setpoint-reps",
        type=int,
        default=5,
        help="measured rounds of the setpoint batch case (0 skips it)",
    )
    args = p.parse_args(argv)
    kinds = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    sizes: list[int] = args.chargers
    reps, warmup = args.reps, 5
    setpoint_reps: int = args.setpoint_reps
    if args.quick:
        kinds, sizes, reps, warmup, setpoint_reps = (kinds[:1], [10], 5, 1, 1)
    cases = []
    for kind in kinds:
        for n in sizes:
            cases.append(asyncio.run(run_case(kind, n, reps, warmup)))
        for n in sizes if setpoint_reps > 0 else ():
            cases.append(asyncio.run(run_setpoints_case(kind, n, setpoint_reps)))
    if args.json:
        print(json.dumps(cases))
    else:
        for c in cases:
            print(
                f"{c['name']:<24} chargers={c['chargers']:<5} median {c['median_s'] * 1e3:7.2f} ms"
                f"  p99 {c['p99_s'] * 1e3:7.2f} ms"
                f"  reference {c['reference_median_s'] * 1e3:7.2f} ms"
                f"  ratio {c['ratio']:.2f}  ok={c['chain_ok']}"
            )
    return 0 if all(c["feasible"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
