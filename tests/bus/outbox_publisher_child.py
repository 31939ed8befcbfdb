"""Child process for the SIGKILL test: publishes audit records through a NatsBus and prints the
sequence number of each one its outbox accepted (``publish`` returned), then waits to be killed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from evcore.bus import BusConfig, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.v1 import audit_pb2


async def main(url: str, site: str, outbox: str, count: int) -> None:
    cfg = BusConfig(
        kind="nats", urls=(url,), reconnect_wait_s=0.1, connect_timeout_s=1.0, publish_timeout_s=1.0
    )
    bus = NatsBus(site, cfg, clock=WallClock(), outbox_path=Path(outbox))
    await bus.start()
    s = Subjects(site)
    for i in range(count):
        rec = audit_pb2.AuditRecord(seq=i, decision_id=f"d{i}", trigger="test")
        await bus.publish(s.audit, rec, event_id=f"audit-{i}")
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
