"""A writer for test_audit_bus_sigkill.py: an ``AuditLog`` on an embedded store with a NATS bus
(disk outbox), appending decisions as fast as it can and printing each record's seq once
``append`` returned, until it is killed. Usage: ``audit_bus_writer.py SITE DIR NATS_URL FIRST``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bus_testkit import make_nats_bus
from evcore.audit import AuditLog, Decision
from evcore.clock import WallClock
from evcore.store import open_store
from evcore.v1.setpoint_pb2 import Setpoint


async def main(site: str, directory: str, url: str, first: int) -> None:
    d = Path(directory)
    store = open_store({"path": str(d / "store")}, d)
    await store.open()
    bus = make_nats_bus(site, url, d / "outbox", publish_timeout_s=2.0, ack_wait_s=5.0)
    await bus.start()
    log = AuditLog(store, clock=WallClock(), bus=bus, site_id=site)
    await log.open()
    n = first
    while True:
        record = await log.append(
            Decision(
                f"W{n}",
                "tick",
                setpoints=[
                    Setpoint(charger_id="C1", setpoint_a=6.0 + n % 26, reason="charger max")
                ],
            )
        )
        print(record.seq, flush=True)
        n += 1
        await asyncio.sleep(0.002)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
