""" "A lost broker loses no audit record", across SIGKILL (review 2027-01; it held).

A writer process (tests/audit/audit_bus_writer.py: ``AuditLog`` on an embedded store, NATS bus
with its disk outbox) is killed with SIGKILL while it appends, three times: with the broker up,
with the broker down (the records wait in the outbox) and after the broker came back. Then an
edge starting on the same store and outbox publishes what is left. JetStream must hold every
record of the chain exactly once, in seq order, each equal to the stored one — none lost between
the store's commit and the outbox, none repeated by the republish after each restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from bus_testkit import NatsServer, make_nats_bus, wait_until
from evcore.audit import AuditLog, verify_chain
from evcore.clock import WallClock
from evcore.store import open_store
from evcore.v1.event_pb2 import Event

pytestmark = pytest.mark.timeout(180)

WRITER = Path(__file__).with_name("audit_bus_writer.py")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def outbox_rows(d: Path, site: str) -> int:
    conn = sqlite3.connect(d / "outbox" / f"{site}.sqlite")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


async def run_and_kill(site: str, d: Path, url: str, first: int, records: int) -> int:
    """Start the writer, SIGKILL it once it said ``records`` appends returned; the last seq it
    said."""
    tests_dir = str(Path(__file__).parent.parent)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        site,
        str(d),
        url,
        str(first),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": tests_dir},
    )
    assert proc.stdout is not None
    said = []
    try:
        while len(said) < records:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the writer ended by itself"
            said.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return said[-1]


async def test_no_record_is_lost_or_repeated_on_the_bus_across_sigkills(
    broker: NatsServer, tmp_path: Path
) -> None:
    site = f"audit-kill-{uuid.uuid4().hex[:8]}"
    d = tmp_path / "edge"
    d.mkdir()
    last = await run_and_kill(site, d, broker.url, 0, 60)
    broker.kill()  # the broker is lost: the next writer's records wait in its outbox
    last = max(last, await run_and_kill(site, d, broker.url, 10_000, 60))
    assert outbox_rows(d, site) > 0  # what the killed writer handed over is on disk
    broker.start()
    last = max(last, await run_and_kill(site, d, broker.url, 20_000, 60))

    # The edge starts once more: it republishes past its mark, the outbox sends what it holds.
    store = open_store({"path": str(d / "store")}, d)
    await store.open()
    try:
        bus = make_nats_bus(site, broker.url, d / "outbox", publish_timeout_s=2.0, ack_wait_s=5.0)
        await bus.start()
        try:
            log = AuditLog(store, clock=WallClock(), bus=bus, site_id=site)
            await log.open()
            await asyncio.wait_for(log.close(), 60)
            await wait_until(lambda: bus.connected, 30, "the bus to connect")
            await wait_until(lambda: bus.stats.outbox_pending == 0, 60, "the outbox to drain")
        finally:
            await bus.close()
        stored = await store.audit_records()
        assert (await verify_chain(store)).ok
    finally:
        await store.close()
    assert stored[-1].seq >= last  # every append that returned is in the store

    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        on_bus = []
        for info in await js.streams_info():
            if f"evcore.{site}.audit" not in (info.config.subjects or []):
                continue
            for q in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(info.config.name, q)
                if msg.subject == f"evcore.{site}.audit":
                    event = Event()
                    event.ParseFromString(msg.data or b"")
                    on_bus.append(event.audit)
            await js.delete_stream(info.config.name)
    finally:
        await nc.close()
    assert [r.seq for r in on_bus] == [r.seq for r in stored]  # each once, in order
    assert on_bus == stored
