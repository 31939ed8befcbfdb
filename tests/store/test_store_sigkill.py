"""Killing a writer with SIGKILL loses no committed record (both stores, a real subprocess)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from evcore.audit import verify_chain
from evcore.store import open_store

WRITER = Path(__file__).with_name("store_crash_writer.py")
ACKED_BEFORE_KILL = 40


async def test_sigkill_loses_no_committed_record(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        json.dumps(store_section),
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        while len(acked) < ACKED_BEFORE_KILL:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
            if not line:
                break
            acked.append(int(line))
        # Kill while it is in the middle of its next writes.
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert proc.returncode == -signal.SIGKILL, err
    assert len(acked) == ACKED_BEFORE_KILL, err

    store = open_store(store_section, tmp_path)
    await store.open()
    try:
        decisions = {r.decision_id for r in await store.audit_records()}
        for i in acked:
            assert f"D{i}" in decisions
            assert await store.get_session(f"S{i}") is not None
            assert await store.get_transaction(f"C{i % 7}", f"T{i}") is not None
        samples = sum([len(await store.meter_samples(f"C{c}")) for c in range(7)])
        assert samples >= len(acked)
        report = await verify_chain(store)
        assert report.ok, report.problems
        assert report.records >= len(acked)
    finally:
        await store.close()
