"""Helpers for the tests of what a NATS bus's outbox accepted and will never send, and of the audit
log's part in it (tests/bus/test_bus_outbox_reports.py, tests/audit/test_audit_outbox_reports.py):
a scene of its own (a private nats-server, a site, a store, an outbox directory), audit decisions
of a chosen size, the audit records a stream holds, an outbox page torn as a crash leaves it."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bus_testkit import NatsServer, make_nats_bus, stored_msgs
from evcore.audit import AuditLog, Decision
from evcore.bus import Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import ManualClock
from evcore.store import SqlStore, open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint

PAGE_SIZE = 4096  # SQLite's default, the outbox's
TABLE_LEAF = 0x0D  # the page type byte of a table b-tree leaf


def decision(i: int, chargers: int = 1, *, incompressible: bool = False) -> Decision:
    """Decision ``D<i>`` setting ``chargers`` chargers; ``incompressible``: each reason 128 hex
    digits of a hash, so that zlib takes little off the record (about 45 %)."""

    def reason(c: int) -> str:
        if incompressible:
            return hashlib.sha512(f"{i},{c}".encode()).hexdigest()
        return f"held at 16 A ({i}, {c})"

    return Decision(
        f"D{i}",
        "tick",
        inputs_digest=f"{i:064x}",
        setpoints=[
            Setpoint(charger_id=f"C{c:04d}", setpoint_a=16.0, reason=reason(c))
            for c in range(chargers)
        ],
    )


def record_of(event: Event) -> AuditRecord:
    if event.WhichOneof("payload") == "audit_zlib":
        return AuditRecord.FromString(zlib.decompress(event.audit_zlib))
    return event.audit


async def stored_events(bus: NatsBus, subject: str) -> list[Event]:
    """Every event the stream holds on ``subject``, in stream order."""
    return [Event.FromString(m.data or b"") for m in await stored_msgs(bus, subject)]


async def stored_records(bus: NatsBus, subject: str) -> list[AuditRecord]:
    """Every audit record the stream holds on ``subject``, in stream order."""
    return [record_of(e) for e in await stored_events(bus, subject)]


def tear_the_page_holding(path: Path, marker: bytes) -> None:
    """Overwrite the table leaf page holding ``marker`` (an entry's event id) with 0xFF, as a
    torn write would leave it."""
    data = bytearray(path.read_bytes())
    for page in range(len(data) // PAGE_SIZE):
        start = page * PAGE_SIZE
        header = start + (100 if page == 0 else 0)
        if data[header] == TABLE_LEAF and marker in data[start : start + PAGE_SIZE]:
            data[start : start + PAGE_SIZE] = b"\xff" * PAGE_SIZE
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no leaf page holds {marker!r}")


def unreadable_header(path: Path) -> None:
    """SQLite's file header gone: nothing of the file can be read."""
    path.write_bytes(b"\0" * 100 + path.read_bytes()[100:])


@dataclass
class Scene:
    """A site of its own: a private nats-server (not started), its subjects, a manual clock, an
    embedded store (open) and an outbox directory."""

    srv: NatsServer
    site: str
    s: Subjects
    clock: ManualClock
    store: SqlStore
    outbox: Path

    def bus(self) -> NatsBus:
        """A new (not yet started) NATS bus of the site on the scene's server and outbox."""
        return make_nats_bus(self.site, self.srv.url, self.outbox)

    async def audit(self, bus: NatsBus) -> AuditLog:
        """An opened audit log on the scene's store, publishing on ``bus``."""
        log = AuditLog(self.store, clock=self.clock, bus=bus, site_id=self.site)
        await log.open()
        return log

    async def lose_an_outbox(self) -> list[AuditRecord]:
        """Records 0..2 reach the stream; 3..6 wait in the outbox (the broker killed: it is down
        at the end) and are lost with it, its header gone; the publish mark covers all seven,
        which are returned."""
        self.srv.start()
        appended: list[AuditRecord] = []
        bus = self.bus()
        await bus.start()
        log = await self.audit(bus)
        for i in range(7):
            if i == 3:
                await log.flush()
                assert await bus.flush(timeout_s=10)
                self.srv.kill()
            self.clock.advance(1)
            appended.append(await log.append(decision(i)))
        await log.close()
        path = bus.outbox.path
        await bus.close()
        unreadable_header(path)
        return appended

    async def append_without_bus(self, d: Decision) -> AuditRecord:
        """``d`` appended to the chain by an audit log that has no bus."""
        return await AuditLog(self.store, clock=self.clock).append(d)


@contextlib.asynccontextmanager
async def scene(
    tmp_path: Path, prefix: str, *, max_payload: int | None = None
) -> AsyncIterator[Scene]:
    """A :class:`Scene`; its store closed and its server killed at the end."""
    site = f"{prefix}-{uuid.uuid4().hex[:8]}"
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    srv = NatsServer(tmp_path / "js", max_payload=max_payload)
    try:
        yield Scene(srv, site, Subjects(site), ManualClock(), store, tmp_path / "outbox")
    finally:
        await store.close()
        srv.kill()
