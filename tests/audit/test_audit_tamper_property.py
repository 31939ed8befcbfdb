"""Property: whatever single change is made to a stored chain behind the store's back — a record's
content (with or without its own hash recomputed), a removed record, a removed tail, a swapped pair
— `verify` reports it; an untouched chain always verifies. (Embedded store; the same kinds are
tested on PostgreSQL in test_audit_trail.py. `EVCORE_HYPOTHESIS_EXAMPLES` raises the number of
cases.)"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from pathlib import Path

from evcore.audit import AuditLog, Decision, record_hash, verify_chain
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.setpoint_pb2 import Setpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EVCORE_HYPOTHESIS_EXAMPLES", "25"))


async def _build(path: Path, n: int) -> None:
    store = open_store({"path": str(path)}, path)
    log = AuditLog(store, clock=ManualClock())
    for i in range(n):
        sp = Setpoint(charger_id=f"C{i % 3}", setpoint_a=6.0 + i, reason=f"reason {i}")
        await log.append(Decision(f"D{i}", "tick", setpoints=[sp]))
    await store.close()


async def _verify(path: Path) -> tuple[bool, list[str]]:
    store = open_store({"path": str(path)}, path, must_exist=True)
    try:
        report = await verify_chain(store, batch=3)  # small batches: crosses batch boundaries
    finally:
        await store.close()
    return report.ok, report.problems


def _tamper(db: Path, kind: str, n: int, at: int, value: float) -> None:
    conn = sqlite3.connect(db)
    with conn:
        if kind in ("change", "rehash"):
            (payload,) = conn.execute(
                "SELECT payload FROM audit_records WHERE seq = ?", (at,)
            ).fetchone()
            rec = AuditRecord()
            rec.ParseFromString(payload)
            rec.setpoints[0].setpoint_a = (
                value if value != rec.setpoints[0].setpoint_a else value + 1
            )
            if kind == "rehash":  # a forger who also recomputes the record's own hash
                rec.hash = ""
                rec.hash = record_hash(rec)
            conn.execute(
                "UPDATE audit_records SET payload = ?, hash = ? WHERE seq = ?",
                (rec.SerializeToString(), rec.hash, at),
            )
        elif kind == "remove":
            conn.execute("DELETE FROM audit_records WHERE seq = ?", (at,))
        elif kind == "truncate":
            conn.execute("DELETE FROM audit_records WHERE seq >= ?", (at,))
        elif kind == "swap" and n > 1:
            a, b = at, (at + 1) % n
            pa = conn.execute("SELECT payload FROM audit_records WHERE seq = ?", (a,)).fetchone()[0]
            pb = conn.execute("SELECT payload FROM audit_records WHERE seq = ?", (b,)).fetchone()[0]
            conn.execute("UPDATE audit_records SET payload = ? WHERE seq = ?", (pb, a))
            conn.execute("UPDATE audit_records SET payload = ? WHERE seq = ?", (pa, b))
    conn.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(min_value=2, max_value=9),
    kind=st.sampled_from(["none", "change", "rehash", "remove", "truncate", "swap"]),
    at_frac=st.floats(min_value=0.0, max_value=0.999),
    value=st.floats(min_value=0.0, max_value=63.0, allow_nan=False),
)
def test_any_single_tampering_is_detected(n: int, kind: str, at_frac: float, value: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        asyncio.run(_build(path, n))
        at = int(at_frac * n)
        if kind != "none":
            _tamper(path / "records.sqlite", kind, n, at, value)
        ok, problems = asyncio.run(_verify(path))
        assert ok == (kind == "none"), (kind, at, problems)
