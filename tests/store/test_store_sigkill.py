"""Killing a writer with SIGKILL loses no committed record (both stores, a real subprocess).

The writer is killed three times on the same store, each time at a different point of its cycle
(after a different number of acknowledged decisions, plus a random delay, so the kill lands inside
an audit append, a setpoint batch, a session upsert, a transaction or a telemetry write), and
restarted; after each kill every acknowledged record is there and the audit chain — continued
across the restarts — verifies.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from pathlib import Path

from evcore.audit import verify_chain
from evcore.store import open_store
from store_crash_writer import SETPOINT_CHARGERS

WRITER = Path(__file__).with_name("store_crash_writer.py")
# (first decision number, acknowledged decisions before the kill) per round
ROUNDS = ((0, 40), (10_000, 1), (20_000, 17))


async def run_and_kill(
    section: dict[str, object], base_dir: Path, start: int, acks: int, delay_s: float
) -> list[int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        json.dumps(section),
        str(base_dir),
        str(start),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        while len(acked) < acks:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
            if not line:
                break
            acked.append(int(line))
        # Kill somewhere in the middle of its next writes.
        await asyncio.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert proc.returncode == -signal.SIGKILL, err
    assert len(acked) == acks, err
    return acked


async def test_sigkill_loses_no_committed_record(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    rng = random.Random(7)
    acked_all: list[int] = []
    for start, acks in ROUNDS:
        acked = await run_and_kill(store_section, tmp_path, start, acks, rng.uniform(0, 0.02))
        acked_all += acked
        store = open_store(store_section, tmp_path)
        await store.open()
        try:
            decisions = {r.decision_id for r in await store.audit_records()}
            for i in acked_all:
                assert f"D{i}" in decisions
                assert await store.get_session(f"S{i}") is not None
                assert await store.get_transaction(f"C{i % 7}", f"T{i}") is not None
            # Every charger's last setpoint is from one decision (a batch is atomic, even when
            # the kill fell between its statements): the last acknowledged one or a later one.
            last = await store.last_setpoints()
            assert len(last) == SETPOINT_CHARGERS
            (decision_id,) = {rec.setpoint.decision_id for rec in last.values()}
            assert int(decision_id.removeprefix("D")) >= acked_all[-1]
            samples = sum([len(await store.meter_samples(f"C{c}")) for c in range(7)])
            assert samples >= len(acked_all)
            report = await verify_chain(store)
            assert report.ok, report.problems
            assert report.records >= len(acked_all)
        finally:
            await store.close()
