"""The audit trail on both stores: durable before append returns, hash-chained, tampering detected
by ``evcore audit verify``, decisions explained by ``evcore audit show``, mirrored to the bus."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from audit_testkit import REASON_C1, broken, decision, fill, forge, raw_sql, run_cli, site_file
from evcore.audit import AuditLog, Decision, record_hash, seal, verify_chain
from evcore.audit.cli import main as audit_main
from evcore.audit.log import build_record
from evcore.bus.api import BusMessage
from evcore.bus.inprocess import InProcessBus
from evcore.bus.subjects import Subjects
from evcore.clock import ManualClock
from evcore.store import SqlStore, open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint


async def test_append_is_durable_and_chained(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    clock = ManualClock()
    records = await fill(store, clock, 3)
    # A second connection (another process would see the same) finds every record at once.
    other = open_store(store_section, tmp_path)
    try:
        stored = await other.audit_records()
    finally:
        await other.close()
    assert [r.decision_id for r in stored] == ["D0", "D1", "D2"]
    assert [r.seq for r in stored] == [0, 1, 2]
    assert stored[0].prev_hash == ""
    for prev, cur in itertools.pairwise(stored):
        assert cur.prev_hash == prev.hash
    for r, s in zip(records, stored, strict=True):
        assert r == s
        assert record_hash(s) == s.hash
    assert stored[1].setpoints[0].reason == REASON_C1
    assert stored[1].setpoints[0].decision_id == "D1"  # stamped with the decision
    assert stored[1].decided_at.seconds == int(ManualClock().now()) + 20
    report = await verify_chain(store)
    assert report.ok and report.records == 3 and report.head is not None and report.head.seq == 2


async def test_verify_detects_changed_record(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    records = await fill(store, ManualClock(), 5)

    def claim_a_higher_setpoint(r: AuditRecord) -> None:
        r.setpoints[0].setpoint_a = 32.0  # someone claims a higher setpoint was sent

    forge(store_section, tmp_path, records[2], claim_a_higher_setpoint)
    assert any("seq 2" in p and "content changed" in p for p in await broken(store))


async def test_verify_detects_rehashed_record(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    """Changing a record and recomputing its own hash still breaks the link from the next one."""
    records = await fill(store, ManualClock(), 5)
    forge(
        store_section,
        tmp_path,
        records[1],
        lambda r: setattr(r, "trigger", "operator"),
        rehash=True,
    )
    assert any(p.startswith("seq 2: prev_hash does not match") for p in await broken(store))


async def test_verify_detects_removed_record(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    await fill(store, ManualClock(), 5)
    raw_sql(store_section, tmp_path, "DELETE FROM audit_records WHERE seq = 2")
    assert any("seq 2: record(s) removed" in p for p in await broken(store))


async def test_verify_detects_truncation(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    await fill(store, ManualClock(), 5)
    raw_sql(store_section, tmp_path, "DELETE FROM audit_records WHERE seq >= 3")
    truncated = "truncated: head says seq 4, last stored record is seq 2"
    assert any(truncated in p for p in await broken(store))


async def test_verify_detects_a_record_inserted_after_the_head(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    records = await fill(store, ManualClock(), 3)
    # A well-formed, correctly linked record written behind the store's back (the head not moved):
    # `audit show` would list it, so `verify` must not pass it over as a concurrent append.
    forged = seal(
        build_record(decision(3), now_s=ManualClock().now() + 40), seq=3, prev_hash=records[-1].hash
    )
    raw_sql(
        store_section,
        tmp_path,
        "INSERT INTO audit_records (seq, decision_id, decided_at_s, prev_hash, hash, payload)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            3,
            "D3",
            float(forged.decided_at.seconds),
            forged.prev_hash,
            forged.hash,
            forged.SerializeToString(deterministic=True),
        ),
    )
    assert [r.decision_id for r in await store.audit_records()] == ["D0", "D1", "D2", "D3"]
    assert any("seq 3: 1 record(s) after the head (seq 2)" in p for p in await broken(store))


async def test_verify_detects_an_edited_charger_index(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    """`show --charger` goes through the charger index: hiding a decision from a charger (or
    pinning one on another) leaves every hash intact, so verify compares the index too."""
    await fill(store, ManualClock(), 4)
    assert (await verify_chain(store)).ok
    raw_sql(
        store_section, tmp_path, "DELETE FROM audit_chargers WHERE seq = 1 AND charger_id = 'C1'"
    )
    raw_sql(
        store_section, tmp_path, "INSERT INTO audit_chargers (charger_id, seq) VALUES ('C9', 2)"
    )
    assert [r.decision_id for r in await store.audit_records(charger_id="C1")] == ["D0", "D2", "D3"]
    report = await verify_chain(store, batch=2)
    assert not report.ok and report.problem_count == 2, report.problems
    assert "seq 1: charger index ['C2', 'C3'] differs" in report.problems[0]
    assert "seq 2: charger index ['C1', 'C2', 'C3', 'C9'] differs" in report.problems[1]


async def test_verify_while_appending_reports_no_problem(store: SqlStore) -> None:
    clock = ManualClock()
    log = AuditLog(store, clock=clock)
    await log.append(decision(0))

    async def keep_appending() -> None:
        for i in range(1, 40):
            clock.advance(1)
            await log.append(decision(i))

    writer = asyncio.create_task(keep_appending())
    reports = []
    while not writer.done():
        reports.append(await verify_chain(store, batch=3))
    await writer
    reports.append(await verify_chain(store))
    assert all(r.ok for r in reports), [r.problems for r in reports if not r.ok]
    assert reports[-1].records == 40 and len(reports) > 2


async def test_verify_detects_emptied_chain_and_lost_head(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    await fill(store, ManualClock(), 3)
    raw_sql(store_section, tmp_path, "DELETE FROM audit_head")
    assert "head is missing" in (await broken(store))[0]
    raw_sql(store_section, tmp_path, "INSERT INTO audit_head (id, seq, hash) VALUES (1, 2, 'x')")
    raw_sql(store_section, tmp_path, "DELETE FROM audit_records")
    assert "every record was removed" in (await broken(store))[0]


async def test_append_after_a_stale_head_relinks(store: SqlStore) -> None:
    """Two logs on one store (e.g. a restarted edge racing the old one): the chain stays whole."""
    clock = ManualClock()
    a = AuditLog(store, clock=clock)
    b = AuditLog(store, clock=clock)
    await a.append(decision(0))
    await b.append(decision(1))  # b read the head lazily: fine
    await a.append(decision(2))  # a's head is stale: conflict, reload, relink
    await asyncio.gather(a.append(decision(3)), b.append(decision(4)))
    report = await verify_chain(store)
    assert report.ok, report.problems
    assert report.records == 5


def test_decision_without_reason_is_refused() -> None:
    d = Decision(
        "D1", "tick", decided_at_s=1.0, setpoints=[Setpoint(charger_id="C1", setpoint_a=8.0)]
    )
    with pytest.raises(ValueError, match="has no reason"):
        build_record(d)
    with pytest.raises(ValueError, match="no trigger"):
        build_record(Decision("D1", "", decided_at_s=1.0))
    with pytest.raises(ValueError, match="neither setpoint_a nor setpoint_w"):
        build_record(
            Decision("D1", "t", decided_at_s=1.0, setpoints=[Setpoint(charger_id="C1", reason="x")])
        )


async def test_controller_mapping_is_recorded_with_its_reasons(store: SqlStore) -> None:
    clock = ManualClock()
    log = AuditLog(store, clock=clock, edge_id="edge-1")
    controller_decision = {
        "decision": 7,
        "at": clock.now(),
        "trigger": "status:C2",
        "config_version": "cfg-1",
        "plan_version": 4,
        "inputs_digest": "ab" * 32,
        "setpoints": [
            {
                "charger_id": "C1",
                "purpose": "tx",
                "old": 32.0,
                "new": 16.0,
                "unit": "A",
                "valid_to": clock.now() + 300,
                "binding": REASON_C1,
            },
            {
                "charger_id": "DC1",
                "purpose": "tx",
                "old": None,
                "new": 50_000.0,
                "unit": "W",
                "binding": "held at 50 kW: charger maximum",
            },
            {
                "charger_id": "C2",
                "purpose": "tx_default",
                "old": 6.0,
                "new": 0.0,
                "unit": "A",
                "binding": "",
            },
        ],
    }
    rec = await log.append(controller_decision)
    assert rec.decision_id.startswith("7@2026-01-01T00:00:00")
    assert (rec.trigger, rec.plan_version, rec.config_version, rec.edge_id) == (
        "status:C2",
        4,
        "cfg-1",
        "edge-1",
    )
    by = {s.charger_id: s for s in rec.setpoints}
    assert by["C1"].setpoint_a == 16.0 and by["C1"].reason == REASON_C1
    assert by["DC1"].setpoint_w == 50_000.0 and not by["DC1"].HasField("setpoint_a")
    assert "tx_default" in by["C2"].reason  # no binding reported: still says what was sent
    # The controller's counter restarts with the process; ids stay unique by time.
    clock.advance(1)
    again = await log.append(dict(controller_decision, at=clock.now(), plan_version="cloud-p@9"))
    assert again.decision_id != rec.decision_id
    assert again.plan_version == 9  # the controller's "<plan id>@<version>"
    with pytest.raises(ValueError, match="plan_version"):
        await log.append(dict(controller_decision, at=clock.now() + 1, plan_version="cloud-p"))
    assert (await verify_chain(store)).ok


def test_show_lists_every_setpoint_a_decision_sent_a_charger() -> None:
    """Review 2026-12-05: a decision that sent a charger its session's TxProfile (10 A) and its
    TxDefault (6 A) was shown as the TxDefault alone (the lines were keyed by charger)."""
    from evcore.audit.cli import explain

    record = build_record(
        Decision(
            "D7",
            "grid:dso-1",
            inputs_digest="0" * 64,
            setpoints=[
                Setpoint(charger_id="C1", setpoint_a=10.0, session_id="tx-9", reason="held: F1"),
                Setpoint(charger_id="C1", setpoint_a=6.0, reason="default: failsafe level"),
                Setpoint(charger_id="C2", setpoint_a=16.0, reason="charger max"),
            ],
        ),
        now_s=1_800_000_000.0,
    )
    lines = explain(record)
    assert lines[1:] == [
        "  C1: sent 10 A (session tx-9) [unspecified] held: F1",
        "  C1: sent 6 A [unspecified] default: failsafe level",
        "  C2: sent 16 A [unspecified] charger max",
    ]
    assert explain(record, "C2")[1:] == ["  C2: sent 16 A [unspecified] charger max"]


async def test_cli_verify_and_show(
    store: SqlStore,
    store_section: dict[str, object],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = ManualClock()
    await fill(store, clock, 4)
    site = site_file(tmp_path, store_section)
    assert await asyncio.to_thread(audit_main, ["verify", "--config", str(site)]) == 0
    assert "audit chain OK: 4 records" in capsys.readouterr().out

    # show: only decisions at/after --since, only lines about the charger asked for.
    since = "2026-01-01T00:00:25Z"
    assert (
        await asyncio.to_thread(
            audit_main, ["show", "--config", str(site), "--charger", "C1", "--since", since]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "decision D2" in out and "decision D3" in out and "decision D1" not in out
    assert f"C1: sent 16 A [node_phase_limit] {REASON_C1}" in out
    assert "C2:" not in out
    assert (
        await asyncio.to_thread(
            audit_main, ["show", "--config", str(site), "--charger", "C3", "--json"]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert [d["decision_id"] for d in shown] == ["D0", "D1", "D2", "D3"]

    raw_sql(store_section, tmp_path, "DELETE FROM audit_records WHERE seq = 3")
    assert await asyncio.to_thread(audit_main, ["verify", "--config", str(site), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["records"] == 3
    assert any("truncated" in p for p in result["problems"])


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_main(["verify", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no embedded store" in capsys.readouterr().err
    assert audit_main(["show", "--store", str(tmp_path), "--since", "yesterday-ish"]) == 2
    assert "not ISO 8601" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[store\n")
    assert audit_main(["verify", "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize("explicit_open", [True, False], ids=["open", "lazy"])
async def test_records_are_published_and_republished_after_a_crash(
    store: SqlStore, explicit_open: bool
) -> None:
    clock = ManualClock()
    # A log without a bus stands for an edge killed after the commit, before the outbox took it.
    await fill(store, clock, 3)
    bus = InProcessBus("depot", clock=clock)
    await bus.start()
    got: list[Event] = []

    async def on_audit(msg: BusMessage) -> None:
        ev = Event()
        ev.ParseFromString(msg.data)
        got.append(ev)

    await bus.subscribe(Subjects("depot").audit, on_audit)
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    if explicit_open:
        await log.open()  # republishes the three pending records
    # Without open(), the first append republishes them before its own record.
    rec = await log.append(decision(3))
    await log.flush()
    await bus.flush()
    for _ in range(100):
        if len(got) >= 4:
            break
        await asyncio.sleep(0.01)
    assert [e.audit.seq for e in got] == [0, 1, 2, 3]
    assert got[3].event_id == f"audit-{rec.hash}" and got[3].audit == rec
    await log.close()
    # Reopened: everything was accepted, nothing is sent twice.
    got.clear()
    again = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    await again.open()
    await again.flush()
    await bus.flush()
    await asyncio.sleep(0.05)
    assert got == []
    await bus.close()


class StuckBus:
    """A bus whose publish does not return until ``release`` is set (a full disk, a hung
    outbox), recording what it was given."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.published: list[Event] = []

    async def publish(self, subject: str, event: Event, **kw: Any) -> None:
        self.waiting += 1
        await self.release.wait()
        self.published.append(event)


async def test_a_stuck_bus_never_holds_up_an_append(store: SqlStore) -> None:
    clock = ManualClock()
    bus = StuckBus()
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    appended = []
    for i in range(5):
        clock.advance(1)
        # Guard only: with publishing on the append path this would hang on the first record.
        appended.append(await asyncio.wait_for(log.append(decision(i)), 30))
    assert bus.waiting == 1 and bus.published == []  # the publisher waits on the first record
    head = await store.audit_head()
    assert head is not None and head.seq == 4  # all five durable meanwhile
    bus.release.set()
    await log.close()  # flushes the publisher, then writes the publish mark
    assert [e.audit for e in bus.published] == appended  # in seq order, each once
    assert await store.get_meta("audit.published_seq") == "4"


async def test_an_append_that_timed_out_but_committed_is_still_published(store: SqlStore) -> None:
    clock = ManualClock()
    bus = StuckBus()
    bus.release.set()
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    for i in range(2):
        clock.advance(1)
        await log.append(decision(i))
    # An append the edge gave up on (audit_timeout_s) whose transaction committed afterwards: it
    # is in the store, but the log never saw it return.
    head = await store.audit_head()
    assert head is not None
    late = seal(build_record(decision(2), now_s=clock.now()), seq=head.seq + 1, prev_hash=head.hash)
    await store.append_audit(late)
    clock.advance(1)
    after = await log.append(decision(3))
    assert after.seq == 3 and after.prev_hash == late.hash
    await log.close()
    assert [e.audit.seq for e in bus.published] == [0, 1, 2, 3]
    assert bus.published[2].audit == late
    assert await store.get_meta("audit.published_seq") == "3"
    assert (await verify_chain(store)).ok


class FlakyBus:
    """A bus whose outbox refuses the first ``failures`` publishes (a full disk), then takes
    everything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[Event] = []

    async def publish(self, subject: str, event: Event, **kw: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("database or disk is full")
        self.published.append(event)


async def test_a_record_the_bus_refused_is_retried_in_order_and_the_mark_moves_on(
    store: SqlStore,
) -> None:
    """Review 2026-12-05: one refused publish was dropped until the next restart and froze the
    publish mark for the life of the process (publish_failures > 0). Now the same record is
    retried after a back-off, before any later one, and the mark covers all of them."""
    clock = ManualClock()
    bus = FlakyBus(failures=2)
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    appended = []
    for i in range(4):
        clock.advance(1)
        appended.append(await log.append(decision(i)))
    await asyncio.wait_for(log.flush(), 30)  # back-offs of 0.5 s and 1 s (real time)
    assert log.publish_failures == 2
    assert [e.audit for e in bus.published] == appended  # each once, in seq order
    await log.close()
    assert await store.get_meta("audit.published_seq") == "3"


async def test_closing_with_a_stuck_bus_leaves_the_rest_for_the_next_start(store: SqlStore) -> None:
    clock = ManualClock()
    bus = StuckBus()
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    for i in range(3):
        clock.advance(1)
        await log.append(decision(i))
    await asyncio.wait_for(log.close(flush_timeout_s=0.2), 30)  # returns although stuck
    assert bus.published == [] and await store.get_meta("audit.published_seq") is None
    # The next start republishes all three from the store.
    bus2 = StuckBus()
    bus2.release.set()
    again = AuditLog(store, clock=clock, bus=bus2, site_id="depot")
    await again.open()
    await again.close()
    assert [e.audit.seq for e in bus2.published] == [0, 1, 2]
    assert await store.get_meta("audit.published_seq") == "2"


async def test_evcore_cli_registers_audit(tmp_path: Path) -> None:
    """`evcore audit verify` through the real command line (a subprocess)."""
    store = open_store({"path": str(tmp_path / "s")}, tmp_path)
    await fill(store, ManualClock(), 2)
    await store.close()
    code, out, err = await run_cli(
        "audit", "verify", "--store", str(tmp_path / "s"), "--json", module="evcore.cli"
    )
    assert code == 0, err
    assert json.loads(out)["records"] == 2
