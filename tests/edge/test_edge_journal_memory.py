"""A large audit journal (a long store outage at a busy site) is not held in memory.

``AuditJournal`` read the whole file at start (``read_bytes``, every line split off it, every
record decoded) and kept every pending record's bytes for as long as it was pending: a 10.3 MB
journal of 600 decisions of a 100-charger site held 7.8 MB once loaded, and loading it peaked at
28.5 MB (2.8 times the file, at the edge's start after a long outage; recording.py speaks of
150 MB journals). Now it keeps where each line lies (32 bytes a record) and reads records from the
file as they are moved.

Real parts: the journal file on disk (lines as a crash or an outage leaves them), the real audit
records (an ``AuditRecord`` with 100 setpoints, as a decision of a 100-charger site), and the
recorder moving them into a real SQLite store's chain.
"""

from __future__ import annotations

import base64
import json
import tracemalloc
from pathlib import Path
from typing import Any

from evcore.audit import AuditLog, verify_chain
from evcore.audit.log import Decision, build_record
from evcore.clock import WallClock
from evcore.edge.recording import _REPLAY_PART, AuditJournal, AuditRecorder, setpoints_of
from evcore.store import open_store

RECORDS = 600
T0 = 1_767_225_600.0


def _decision(k: int) -> tuple[str, bytes]:
    """Decision ``k`` of a 100-charger site: its id and its sealed record's bytes."""
    did = f"edge-big-{k}-{int((T0 + k) * 1000)}"
    rec: dict[str, Any] = {
        "decision": k,
        "at": T0 + k,
        "trigger": "meter",
        "setpoints": [
            {
                "charger_id": f"cp-{c:04d}",
                "purpose": "tx",
                "kind": "decrease",
                "old": 32.0,
                "new": 16.0,
                "unit": "A",
                "valid_to": T0 + k + 300.0,
                "binding": f"node feeder-{c // 10} phase L1 at its limit (decision {k})",
                "binding_node": f"feeder-{c // 10}",
            }
            for c in range(100)
        ],
    }
    record = build_record(
        Decision(did, rec["trigger"], T0 + k, setpoints_of(rec, did)), edge_id="edge"
    )
    return did, record.SerializeToString(deterministic=True)


def _write_journal(path: Path, n: int) -> list[str]:
    """A journal of ``n`` records as the recorder writes it (one JSON line each)."""
    ids = []
    with path.open("wb") as fh:
        for k in range(n):
            did, payload = _decision(k)
            line = {
                "v": 1,
                "decision_id": did,
                "after_seq": -1,
                "decided_at_s": T0 + k,
                "record": base64.b64encode(payload).decode("ascii"),
            }
            fh.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            ids.append(did)
    return ids


def test_a_large_journal_is_read_from_its_file_not_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    ids = _write_journal(path, RECORDS)
    size = path.stat().st_size
    assert size > 10_000_000  # about 17 KB a record
    tracemalloc.start()
    try:
        journal = AuditJournal(path)
        held, peak = tracemalloc.get_traced_memory()
        assert held < size / 50, f"a {size / 1e6:.1f} MB journal holds {held / 1e6:.1f} MB"
        assert peak < size / 10, (
            f"loading a {size / 1e6:.1f} MB journal peaked at {peak / 1e6:.1f} MB"
        )
        # Reading it in order, a part at a time, holds no more than that part.
        tracemalloc.reset_peak()
        seen: list[str] = []
        while len(seen) < RECORDS:
            part = journal.read(len(seen), 50)
            assert part
            seen += [e.decision_id for e in part]
        _, reading_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(journal) == RECORDS and seen == ids
    assert reading_peak - held < size / 5, f"reading it peaked at {reading_peak / 1e6:.1f} MB"


async def test_a_large_journal_moves_into_the_chain_a_part_at_a_time(tmp_path: Path) -> None:
    """After the outage: every record of the journal goes into the store's chain once, in order,
    read from the file a part at a time (parts of ``_REPLAY_PART``; 150 records: three parts)."""
    path = tmp_path / "journal"
    n = 2 * _REPLAY_PART + 22
    ids = _write_journal(path, n)
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        recorder = AuditRecorder(
            AuditLog(store, clock=WallClock()), store, journal_path=path, append_timeout_s=5.0
        )
        assert recorder.journal_pending == n
        journal = recorder.journal
        assert journal is not None
        asked: list[int] = []
        read = journal.read

        def counted_read(start: int, count: int) -> list[Any]:
            asked.append(count)
            return read(start, count)

        journal.read = counted_read  # type: ignore[method-assign]
        left = await recorder.replay_journal(60.0)
        assert left == 0 and recorder.journal_moved == n
        assert asked == [_REPLAY_PART, _REPLAY_PART, 22]
        assert [r.decision_id for r in await store.audit_records()] == ids
        assert path.stat().st_size == 0
        report = await verify_chain(store)
        assert report.ok, report.problems
        await recorder.drain()
    finally:
        await store.close()
