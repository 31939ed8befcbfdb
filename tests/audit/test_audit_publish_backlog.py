"""The records waiting for the bus are bounded in memory (review 2027-01).

Before: every sealed record stayed in the audit log's memory until the bus took it. While the bus
refused (its outbox's disk full), each decision added its record to an in-memory queue that
only grew — about 1.7 GB a day for a 1000-charger site deciding every 5 s — until the edge
process ran out of memory; and ``open()`` read every record after the publish mark into memory
at once, so an edge restarting after a long outage could not start. The store holds every record:
past ``MAX_QUEUED_BYTES`` the log keeps no copy and the publisher reads them back from the store,
a batch at a time, in seq order.

Real stores (SQLite and PostgreSQL); the bus is a stand-in whose outbox refuses, as in
test_audit_trail.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.audit import AuditLog, Decision, verify_chain
from evcore.audit import log as audit_log_module
from evcore.clock import ManualClock
from evcore.store import SqlStore
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint

SETPOINTS = 60  # about 6 KB a record
CAP_BYTES = 64 * 1024  # about ten records


def big_decision(i: int) -> Decision:
    return Decision(
        decision_id=f"B{i}",
        trigger="tick",
        setpoints=[
            Setpoint(
                charger_id=f"C{k:04d}",
                setpoint_a=6.0 + (i + k) % 26,
                reason=f"held at {6 + (i + k) % 26} A: feeder F{k % 7} phase L1 at 63 of 63 A",
            )
            for k in range(SETPOINTS)
        ],
    )


def queued_bytes(log: AuditLog) -> int:
    return sum(r.ByteSize() for r in log._outgoing)


class RefusingBus:
    """An outbox that refuses (a full disk) until ``ok`` is set; notes the log's memory each time
    the publisher comes to it."""

    def __init__(self) -> None:
        self.ok = asyncio.Event()
        self.log: AuditLog | None = None
        self.peak_bytes = 0
        self.published: list[Event] = []

    def note(self) -> None:
        if self.log is not None:
            self.peak_bytes = max(self.peak_bytes, queued_bytes(self.log))

    async def publish(self, subject: str, event: Event, **kw: Any) -> None:
        self.note()
        await asyncio.sleep(0)  # let appends run between publishes
        if not self.ok.is_set():
            raise OSError("database or disk is full")
        self.published.append(event)


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_log_module, "MAX_QUEUED_BYTES", CAP_BYTES, raising=False)
    monkeypatch.setattr(audit_log_module, "REPUBLISH_BACKOFF_S", (0.02,))


async def test_a_bus_that_refuses_for_long_does_not_grow_the_logs_memory(store: SqlStore) -> None:
    clock = ManualClock()
    bus = RefusingBus()
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    bus.log = log
    appended = []
    for i in range(120):  # about 700 KB of records, eleven times the cap
        clock.advance(5)
        appended.append(await log.append(big_decision(i)))
        bus.note()
    assert bus.published == [] and log.publish_failures > 0
    assert bus.peak_bytes <= CAP_BYTES + appended[0].ByteSize()
    # The bus takes records again while decisions go on: every record once, in seq order.
    bus.ok.set()
    for i in range(120, 160):
        clock.advance(5)
        appended.append(await log.append(big_decision(i)))
        bus.note()
        await asyncio.sleep(0)
    await asyncio.wait_for(log.close(), 60)
    assert [e.audit.seq for e in bus.published] == list(range(160))
    assert [e.audit for e in bus.published] == appended
    assert bus.peak_bytes <= CAP_BYTES + appended[0].ByteSize()
    assert await store.get_meta("audit.published_seq") == "159"
    assert (await verify_chain(store)).ok


async def test_a_restart_after_a_long_outage_reads_the_backlog_a_batch_at_a_time(
    store: SqlStore,
) -> None:
    clock = ManualClock()
    # The bus was lost for the whole time these were decided (the edge ran without one).
    plain = AuditLog(store, clock=clock)
    appended = []
    for i in range(100):
        clock.advance(5)
        appended.append(await plain.append(big_decision(i)))
    bus = RefusingBus()
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    bus.log = log
    await log.open()
    bus.note()
    assert queued_bytes(log) <= CAP_BYTES  # not the whole backlog at once
    clock.advance(5)
    appended.append(await log.append(big_decision(100)))
    bus.ok.set()
    await asyncio.wait_for(log.close(), 60)
    assert [e.audit for e in bus.published] == appended  # each once, in seq order
    assert bus.peak_bytes <= CAP_BYTES + appended[0].ByteSize()
    assert await store.get_meta("audit.published_seq") == "100"


@pytest.mark.parametrize("mark", ["x", "", "99"], ids=["unreadable", "empty", "past-the-head"])
async def test_a_publish_mark_that_cannot_be_right_does_not_stop_decisions(
    store: SqlStore, mark: str
) -> None:
    """Review 2027-01: the mark only saves republishing, but an unreadable one ('x') made
    ``open()`` — and so every ``append`` — raise ValueError: no decision could be recorded, so
    none could leave. A mark past the head (a store restored without its records) left the
    records below it unpublished after a crash. Now such a mark is logged and everything the
    store holds is republished (consumers drop repeats by event id)."""
    clock = ManualClock()
    plain = AuditLog(store, clock=clock)
    appended = []
    for i in range(3):
        clock.advance(5)
        appended.append(await plain.append(big_decision(i)))
    await store.set_meta("audit.published_seq", mark)
    bus = RefusingBus()
    bus.ok.set()
    log = AuditLog(store, clock=clock, bus=bus, site_id="depot")
    clock.advance(5)
    appended.append(await log.append(big_decision(3)))
    await asyncio.wait_for(log.close(), 60)
    assert [e.audit for e in bus.published] == appended
    assert await store.get_meta("audit.published_seq") == "3"
