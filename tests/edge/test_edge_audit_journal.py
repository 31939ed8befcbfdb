"""The audit journal (review M5): a decision whose record the store cannot take in time is journaled
locally (fsynced) and still leaves; journaled records move into the chain in order, once each.

The fault is real: another database connection holds the store's write lock (SQLite ``BEGIN
IMMEDIATE``, PostgreSQL ``LOCK TABLE audit_records``; ``WriteLock`` from tests/audit), so the
edge's appends hang in the store's worker thread and commit late once the lock is gone — the case
of a timed-out append that committed after all. Every store test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from edge_testkit import FAST
from evcore.audit import AuditLog, verify_chain
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import SentProfile
from evcore.edge.grid import Curtailment
from evcore.edge.recording import AuditJournal, AuditRecorder, JournalEntry
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table, to_toml
from evcore.sim.ev import EV
from evcore.store import open_store
from evcore.v1.audit_pb2 import AuditRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "audit"))
from test_audit_ordering import WriteLock

pytestmark = pytest.mark.timeout(180)


def decision(n: int, at: float, charger_id: str = "C1", new_a: float = 16.0) -> dict[str, Any]:
    """A decision in the controller's record shape (``EdgeController._record``)."""
    return {
        "decision": n,
        "at": at,
        "trigger": f"test:{n}",
        "config_version": "cfg",
        "setpoints": [
            {
                "charger_id": charger_id,
                "purpose": "tx",
                "kind": "decrease",
                "old": 32.0,
                "new": new_a,
                "unit": "A",
                "binding": f"held at {new_a:g} A: test decision {n}",
            }
        ],
    }


def journal_ids(path: Path) -> list[str]:
    """Decision ids in the journal file, read back from the records themselves."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        rec = AuditRecord.FromString(base64.b64decode(json.loads(line)["record"]))
        out.append(rec.decision_id)
    return out


async def chain_ids(store: Any) -> list[str]:
    return [r.decision_id for r in await store.audit_records()]


async def test_a_timed_out_append_that_committed_later_is_not_chained_twice(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    store = open_store(store_section, tmp_path)
    await store.open()
    journal = tmp_path / "journal"
    recorder = AuditRecorder(
        AuditLog(store, clock=WallClock()),
        store,
        journal_path=journal,
        append_timeout_s=0.3,
        store_backoff_s=0.0,  # the store is tried on every append
    )
    lock = WriteLock(store_section)
    t0 = WallClock().now()
    try:
        await recorder.append(decision(0, t0))
        await recorder.drain()  # the store's worker idle: decision 1's append runs and hangs
        lock.take()
        # The store hangs: both records are journaled and append returns (the decision may leave).
        await asyncio.wait_for(recorder.append(decision(1, t0 + 1)), 5.0)
        await asyncio.wait_for(recorder.append(decision(2, t0 + 2)), 5.0)
        assert recorder.durable == {0, 1, 2}
        assert recorder.journaled == 2 and recorder.journal_pending == 2
        assert journal_ids(journal) == [recorder._ids[1], recorder._ids[2]]
        lock.release()
        # Decision 1's first append was only abandoned: it commits now, in the store's thread.
        # The next append moves the journal in first (skipping decision 1) and then itself.
        await recorder.append(decision(3, t0 + 3))
        assert recorder.journal_pending == 0
        assert journal_ids(journal) == []
        ids = await chain_ids(store)
        assert ids == [recorder._ids[n] for n in range(4)], ids
        assert recorder.journal_skipped == 1 and recorder.journal_moved == 1
        report = await verify_chain(store)
        assert report.ok, report.problems
    finally:
        lock.release()
        await recorder.drain()
        await store.close()


async def test_a_journal_left_by_a_crash_goes_into_the_chain_before_the_edge_decides(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    from evcore.audit.log import Decision, build_record
    from evcore.edge.recording import setpoints_of

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    section = dict(store_section)
    if section["kind"] == "embedded":
        section["path"] = "var/store"
    table = depot_table(2, per_feeder=2, site_id="journal-crash")
    table["edge"] = {**FAST, "audit_journal": "var/journal"}
    table["store"] = section
    site_file = site_dir / "site.toml"
    site_file.write_text(to_toml(table))
    # What an edge that died during a store outage leaves: two fsynced records, and a third
    # line torn by the crash (its append never returned, so its setpoints never left).
    t0 = WallClock().now() - 60.0
    left = AuditJournal(site_dir / "var" / "journal")
    crashed_ids = []
    for n in range(2):
        rec = decision(n + 1, t0 + n)
        did = f"edge-{n + 1}-{int((t0 + n) * 1000)}"
        record = build_record(
            Decision(did, rec["trigger"], t0 + n, setpoints_of(rec, did)), edge_id="edge"
        )
        left.append(JournalEntry(did, -1, t0 + n, record.SerializeToString(deterministic=True)))
        crashed_ids.append(did)
    with (site_dir / "var" / "journal").open("ab") as fh:
        fh.write(b'{"v":1,"decision_id":"edge-3-')

    app = EdgeApp.from_file(site_file, WallClock())
    runner = asyncio.create_task(app.run())
    store = None
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        assert app.recorder.journal_pending == 0
        assert journal_ids(site_dir / "var" / "journal") == []
        app.stop()
        await asyncio.wait_for(runner, 30)
        store = open_store(section, site_dir)
        await store.open()
        ids = await chain_ids(store)
        # First in the chain, in their order; the edge's own decisions after them.
        assert ids[:2] == crashed_ids, ids
        assert len(set(ids)) == len(ids)
        report = await verify_chain(store)
        assert report.ok, report.problems
    finally:
        app.stop()
        if not runner.done():
            runner.cancel()
        if store is not None:
            await store.close()


def table_for_rig() -> dict[str, Any]:
    # 4 chargers on one feeder; a car draws 32 A before the curtailment.
    return depot_table(4, per_feeder=4, site_id="journal")


def journaled_rig(store: Any, journal: Path) -> tuple[AuditRecorder, EdgeRig, list[SentProfile]]:
    """An edge on ``table_for_rig`` whose audit goes to ``store``, or to ``journal`` when the
    store does not take a record within half of its 1 s audit budget; and its sent profiles."""
    cfg = EdgeConfig(**{**FAST, "audit_timeout_s": 1.0})  # type: ignore[arg-type]
    recorder = AuditRecorder(
        AuditLog(store, clock=WallClock()),
        store,
        journal_path=journal,
        append_timeout_s=cfg.audit_timeout_s / 2,
    )
    sent: list[SentProfile] = []
    rig = EdgeRig(table_for_rig(), cfg=cfg, audit=recorder, on_sent=sent.append)
    return recorder, rig, sent


async def two_sessions(rig: EdgeRig) -> list[str]:
    """Cars on the rig's first two chargers, once the failsafe is applied; returns their ids when
    both sessions hold an accepted TxProfile."""
    ctrl = rig.controller
    assert ctrl is not None
    await rig.wait_for(rig.failsafe_applied, 30, "TxDefault at the failsafe level")
    plugged = rig.fleet.charger_ids[:2]
    for cid in plugged:
        rig.fleet.plug_in(cid, EV(soc=0.2))
    await rig.wait_for(
        lambda: all(
            ctrl.state.chargers[c].transaction_id and ctrl.state.chargers[c].accepted
            for c in plugged
        ),
        30,
        "sessions with accepted TxProfiles",
    )
    return plugged


async def test_a_curtailment_reaches_the_stations_while_the_store_is_locked(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    store = open_store(store_section, tmp_path)
    await store.open()
    journal = tmp_path / "journal"
    recorder, rig, sent = journaled_rig(store, journal)
    lock = WriteLock(store_section)
    try:
        async with rig:
            ctrl = rig.controller
            assert ctrl is not None
            plugged = await two_sessions(rig)

            # The cars charge (12 A each: the idle chargers count at their failsafe level), and
            # nothing is on its way that would lower them before the curtailment does.
            def charging() -> bool:
                return not ctrl.pending and all(
                    rig.limit_at(c) >= 10.0
                    and (ctrl.state.chargers[c].sent or 0.0) >= 10.0
                    and ctrl.state.chargers[c].accepted
                    for c in plugged
                )

            await rig.wait_for(charging, 30, "cars charging")
            await recorder.drain()
            before = {cid: rig.limit_at(cid) for cid in plugged}
            lock.take()
            n_sent = len(sent)
            now = rig.clock.now()
            ctrl.post_curtailment(Curtailment("dso-1", "grid", 8.0, now, now + 600))
            # The curtailment's decreases reach the stations although no record can be
            # committed in the store: each is durable in the journal first.
            await rig.wait_for(
                lambda: all(rig.limit_at(c) < before[c] for c in plugged),
                60,
                "the stations applying the curtailment's decreases while the store is locked",
            )
            # (A lower TxProfile may go out as a refresh: the failsafe level it ends at dropped.)
            lowered = [
                s for s in sent[n_sent:] if s.purpose == "tx" and s.value < before[s.charger_id]
            ]
            assert {s.charger_id for s in lowered} == set(plugged), (
                before,
                [(s.charger_id, s.purpose, s.value, s.kind.value) for s in sent[n_sent:]],
            )
            assert all(s.decision in recorder.durable for s in sent[n_sent:])
            assert recorder.journaled >= 1
            assert set(journal_ids(journal)) >= {recorder._ids[s.decision] for s in lowered}
            assert ctrl.stats.audit_failures == 0
            assert rig.physics.violations == 0, rig.physics.violations_by_node
            lock.release()
            # The store is back: the next decision (the curtailment's end) moves the journal in.
            ctrl.cancel_curtailment("dso-1")
            await rig.wait_for(
                lambda: recorder.journal_pending == 0, 60, "the journal moved into the chain"
            )
        await recorder.drain()
        ids = await chain_ids(store)
        assert [n for n, k in Counter(ids).items() if k > 1] == []
        missing = {recorder._ids[s.decision] for s in sent} - set(ids)
        assert not missing, missing
        assert journal_ids(journal) == []
        report = await verify_chain(store)
        assert report.ok, report.problems
    finally:
        lock.release()
        await recorder.drain(journal_timeout_s=5.0)
        await store.close()


async def test_nothing_leaves_when_the_journal_cannot_be_written_either(tmp_path: Path) -> None:
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    await store.open()
    # The journal's directory is a file: every journal write fails (as on a full or read-only
    # disk).
    (tmp_path / "not-a-dir").write_text("")
    unwritable = tmp_path / "not-a-dir" / "journal"
    recorder, rig, sent = journaled_rig(store, unwritable)
    lock = WriteLock(section)
    try:
        async with rig:
            ctrl = rig.controller
            assert ctrl is not None
            plugged = await two_sessions(rig)
            await recorder.drain()
            lock.take()
            n_sent = len(sent)
            failures = ctrl.stats.audit_failures
            now = rig.clock.now()
            ctrl.post_curtailment(Curtailment("dso-1", "grid", 8.0, now, now + 600))
            await rig.wait_for(
                lambda: ctrl.stats.audit_failures >= failures + 2,
                60,
                "decisions failing on the audit",
            )
            # The record is durable nowhere: nothing of those decisions left (the old rule).
            assert sent[n_sent:] == []
            assert recorder.journal_failures >= 2 and recorder.journaled == 0
            lock.release()
            await rig.wait_for(
                lambda: {s.charger_id for s in sent[n_sent:] if s.purpose == "tx"} >= set(plugged),
                60,
                "the decreases once the store takes records again",
            )
        await recorder.drain()
        report = await verify_chain(store)
        assert report.ok, report.problems
    finally:
        lock.release()
        await recorder.drain(journal_timeout_s=5.0)
        await store.close()


class RefusingStore:
    """A real store whose ``append_audit`` fails at once while ``down`` (as when the database
    refuses connections); everything else goes to the store."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def append_audit(self, record: AuditRecord) -> None:
        if self.down:
            from evcore.store.base import StoreUnavailable

            raise StoreUnavailable("connection refused (injected)")
        await self._store.append_audit(record)


async def test_a_store_error_is_named_and_the_records_follow_in_order(
    store: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = RefusingStore(store)
    journal = tmp_path / "journal"
    recorder = AuditRecorder(
        AuditLog(refusing, clock=WallClock()),
        refusing,
        journal_path=journal,
        store_backoff_s=0.0,  # the store is tried on every append (backing off: the next test)
    )
    t0 = WallClock().now()
    refusing.down = True
    for n in range(3):
        await recorder.append(decision(n, t0 + n, charger_id=f"C{n}"))
    assert recorder.journaled == 3 and recorder.journal_pending == 3
    assert journal_ids(journal) == [recorder._ids[n] for n in range(3)]
    assert "connection refused (injected)" in caplog.text
    assert await chain_ids(store) == []
    refusing.down = False
    await recorder.append(decision(3, t0 + 3, charger_id="C3"))
    assert await chain_ids(store) == [recorder._ids[n] for n in range(4)]
    assert recorder.journal_pending == 0 and journal_ids(journal) == []
    report = await verify_chain(store)
    assert report.ok, report.problems
    await recorder.drain()


class CountingStore(RefusingStore):
    """``RefusingStore`` that counts the appends it was asked for."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.tries = 0

    async def append_audit(self, record: AuditRecord) -> None:
        self.tries += 1
        await super().append_audit(record)


async def test_a_failing_store_is_not_waited_on_again_until_its_backoff_and_a_mover_catches_up(
    store: Any, tmp_path: Path
) -> None:
    refusing = CountingStore(store)
    journal = tmp_path / "journal"
    recorder = AuditRecorder(
        AuditLog(refusing, clock=WallClock()),
        refusing,
        journal_path=journal,
        store_backoff_s=0.3,
    )
    t0 = WallClock().now()
    refusing.down = True
    await recorder.append(decision(0, t0, charger_id="C0"))
    assert refusing.tries == 1 and recorder.journal_pending == 1
    # Within the back-off the next decisions go straight to the journal: no wait on the store.
    for n in (1, 2):
        await recorder.append(decision(n, t0 + n, charger_id=f"C{n}"))
    assert refusing.tries == 1 and recorder.journal_pending == 3
    await asyncio.sleep(0.35)
    await recorder.append(decision(3, t0 + 3, charger_id="C3"))  # tried again: fails again
    assert refusing.tries == 2 and recorder.journal_pending == 4
    # The store is back and no decision comes: the mover beside the loop moves them in.
    refusing.down = False
    mover = asyncio.create_task(recorder.keep_moving(every_s=0.1))
    try:
        for _ in range(100):
            if not recorder.journal_pending:
                break
            await asyncio.sleep(0.05)
    finally:
        mover.cancel()
    assert recorder.journal_pending == 0 and journal_ids(journal) == []
    assert await chain_ids(store) == [recorder._ids[n] for n in range(4)]
    report = await verify_chain(store)
    assert report.ok, report.problems
    await recorder.drain()


async def test_a_decisions_last_setpoints_are_stored_in_one_batch(store: Any) -> None:
    recorder = AuditRecorder(AuditLog(store, clock=WallClock()), store)
    rec = decision(0, WallClock().now())
    rec["setpoints"] = [dict(rec["setpoints"][0], charger_id=f"C{i}") for i in range(50)]
    await recorder.append(rec)
    await recorder.drain()
    assert recorder.store_writes == 1
    last = await store.last_setpoints()
    assert sorted(last) == sorted(f"C{i}" for i in range(50))
    assert {r.setpoint.decision_id for r in last.values()} == {recorder._ids[0]}


async def test_a_restart_that_repeats_a_decision_number_and_time_does_not_wedge_the_journal(
    store: Any, tmp_path: Path
) -> None:
    """Two runs of the edge on one store and journal each make decision 1 at the same instant (a
    restart whose clock is back at a time already used: a clock stepped back, the twin's virtual
    clock over a store kept between runs). Both are chained, nothing stays in the journal, and a
    later decision goes straight to the store. Before, the ids were equal: the store refused the
    second, the recorder took that for an outage and journaled it, the replay failed the same way
    for ever and every later decision queued in the journal behind it."""
    journal = tmp_path / "journal"
    at = WallClock().now()
    runs = []
    for new_a in (16.0, 10.0):
        recorder = AuditRecorder(
            AuditLog(store, clock=WallClock()), store, journal_path=journal, store_backoff_s=0.0
        )
        await recorder.replay_journal(timeout_s=5.0)
        await recorder.append(decision(1, at, new_a=new_a))
        await recorder.drain()
        runs.append(recorder)
    last = runs[-1]
    await last.append(decision(2, at + 1.0))
    assert last.journal_pending == 0 and last.journaled == 0
    assert journal_ids(journal) == []
    ids = await chain_ids(store)
    assert ids == [runs[0]._ids[1], runs[1]._ids[1], last._ids[2]], ids
    report = await verify_chain(store)
    assert report.ok, report.problems


def _entries(n: int, at: float) -> list[JournalEntry]:
    from evcore.audit.log import Decision, build_record
    from evcore.edge.recording import setpoints_of

    out = []
    for k in range(n):
        did = f"edge-r-{k}-{int((at + k) * 1000)}"
        rec = decision(k, at + k)
        record = build_record(
            Decision(did, rec["trigger"], at + k, setpoints_of(rec, did)), edge_id="edge"
        )
        out.append(JournalEntry(did, -1, at + k, record.SerializeToString(deterministic=True)))
    return out


def test_moving_part_of_the_journal_counts_the_lines_instead_of_rewriting_it(
    tmp_path: Path,
) -> None:
    """A partial move is a count beside the journal, not a rewrite of everything left (which ran
    inside a decision's append budget: 0.69 s for 150 MB); a restart skips the counted lines; a
    full move empties the file; a count left without its file skips nothing new."""
    path = tmp_path / "journal"
    entries = _entries(200, 1_767_225_600.0)
    journal = AuditJournal(path)
    for e in entries:
        journal.append(e)
    size, inode = path.stat().st_size, path.stat().st_ino
    journal.drop_first(50)
    assert (path.stat().st_size, path.stat().st_ino) == (size, inode)  # not rewritten
    assert [e.decision_id for e in journal.entries] == [e.decision_id for e in entries[50:]]
    again = AuditJournal(path)  # a restart
    assert [e.decision_id for e in again.entries] == [e.decision_id for e in entries[50:]]
    again.drop_first(100)
    assert [e.decision_id for e in AuditJournal(path).entries] == [
        e.decision_id for e in entries[150:]
    ]
    again.drop_first(50)
    assert path.stat().st_size == 0 and AuditJournal(path).entries == []
    new = _entries(1, 1_767_230_000.0)[0]
    again.append(new)
    assert [e.decision_id for e in AuditJournal(path).entries] == [new.decision_id]
    # A count whose journal is gone (removed by hand) must not skip what is journaled next.
    (tmp_path / "journal.moved").write_text("7\n")
    path.unlink()
    fresh = AuditJournal(path)
    fresh.append(new)
    assert [e.decision_id for e in AuditJournal(path).entries] == [new.decision_id]


class FlakyStore(RefusingStore):
    """``RefusingStore`` that refuses every ``every``-th audit append (a store coming back from an
    outage by fits), and counts the chain records ``audit_records`` returned."""

    def __init__(self, store: Any, every: int) -> None:
        super().__init__(store)
        self.every = every
        self.appends = 0
        self.read = 0

    async def append_audit(self, record: AuditRecord) -> None:
        if not self.down:
            self.appends += 1
            if self.appends % self.every == 0:
                from evcore.store.base import StoreUnavailable

                raise StoreUnavailable("connection reset (injected)")
        await super().append_audit(record)

    async def audit_records(self, **kwargs: Any) -> list[AuditRecord]:
        records: list[AuditRecord] = await self._store.audit_records(**kwargs)
        self.read += len(records)
        return records


async def test_moving_a_long_journal_reads_the_chain_once_not_once_a_round(
    store: Any, tmp_path: Path
) -> None:
    """Each move of journaled records (a decision's append, the mover, the start) first reads
    the chain after the head the pending records were journaled at, for the ids of appends
    that timed out and committed after all. After a long outage that head is the outage's start,
    so every round read again every record moved in the rounds before it: the reads grew with
    the square of the journal (6,000 records moved in 10 rounds of 1 s read 23,923 records), and
    a move whose read outgrows the append budget moves nothing."""
    n, every = 600, 50
    flaky = FlakyStore(store, every)
    journal = tmp_path / "journal"
    recorder = AuditRecorder(
        AuditLog(flaky, clock=WallClock()), flaky, journal_path=journal, store_backoff_s=0.0
    )
    t0 = WallClock().now()
    flaky.down = True
    for k in range(n):
        await recorder.append(decision(k, t0 + k * 0.01, charger_id=f"C{k % 20}"))
    assert recorder.journal_pending == n
    flaky.down = False
    rounds = 0
    while recorder.journal_pending and rounds < 3 * n // every:
        await recorder.replay_journal(30.0)
        rounds += 1
    assert recorder.journal_pending == 0 and rounds >= n // every
    assert await chain_ids(store) == [recorder._ids[k] for k in range(n)]
    # Each round reads what the round before it moved, not everything since the outage.
    assert flaky.read <= 2 * n, f"{rounds} rounds read {flaky.read} chain records for {n}"
    report = await verify_chain(store)
    assert report.ok, report.problems
    await recorder.drain()


class PagedStore(RefusingStore):
    """``RefusingStore`` that keeps how many records each ``audit_records`` call returned."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.pages: list[int] = []

    async def audit_records(self, **kwargs: Any) -> list[AuditRecord]:
        records: list[AuditRecord] = await self._store.audit_records(**kwargs)
        self.pages.append(len(records))
        return records


async def test_after_a_restart_mid_move_the_chain_is_read_a_page_at_a_time(
    store: Any, tmp_path: Path
) -> None:
    """A restart while a long journal is being moved: the chain after the head its pending
    records were journaled at holds every record the run before moved (here 600). The first
    move read them all in one call, every record parsed and held at once (17 KB each for a
    100-charger site: 10 MB for 600; a decision a second for a day, 1.5 GB); they are
    read ``_CHAIN_PAGE`` at a time, only their ids kept. (Parsed protobuf messages live outside
    Python's allocator, so the calls' sizes are what the test checks.)"""
    from evcore.edge.recording import _CHAIN_PAGE

    audit_log = AuditLog(store, clock=WallClock())
    t0 = WallClock().now()
    from evcore.audit.log import Decision

    head = await audit_log.append(Decision("edge-before-0", "tick", t0, []))
    moved = 2 * _CHAIN_PAGE + 88
    for k in range(moved):
        await audit_log.append(Decision(f"edge-moved-{k}", "tick", t0 + 1 + k * 0.001, []))
    journal = tmp_path / "journal"
    pending = _entries(1, t0 + 2)[0]
    AuditJournal(journal).append(
        JournalEntry(pending.decision_id, head.seq, pending.decided_at_s, pending.payload)
    )
    paged = PagedStore(store)
    recorder = AuditRecorder(AuditLog(paged, clock=WallClock()), paged, journal_path=journal)
    assert await recorder.replay_journal(60.0) == 0
    assert recorder.journal_moved == 1
    assert (await chain_ids(store))[-1] == pending.decision_id
    assert max(paged.pages) <= _CHAIN_PAGE, paged.pages
    assert sum(paged.pages) == moved, paged.pages
    report = await verify_chain(store)
    assert report.ok, report.problems
    await recorder.drain()
