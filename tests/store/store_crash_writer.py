"""Child process for the SIGKILL test: writes decisions as fast as it can and prints the number of
each one after its writes returned (i.e. were committed). The parent kills it mid-stream, then may
start it again on the same store from another number (``argv[3]``)."""

from __future__ import annotations

import asyncio
import json
import sys

from evcore.audit import AuditLog, Decision
from evcore.clock import WallClock
from evcore.store import SessionRecord, open_store
from evcore.v1.meter_pb2 import MeterSample
from evcore.v1.setpoint_pb2 import Setpoint
from evcore.v1.transaction_pb2 import TransactionEvent, TransactionEventKind

SETPOINT_CHARGERS = 600


async def main(section: dict[str, object], base_dir: str, start: int) -> None:
    store = open_store(section, base_dir)
    await store.open()
    clock = WallClock()
    audit = AuditLog(store, clock=clock)
    i = start
    while True:
        now = clock.now()
        sp = Setpoint(charger_id=f"C{i % 7}", setpoint_a=6.0 + i % 10, reason=f"decision {i}")
        await audit.append(Decision(f"D{i}", "tick", setpoints=[sp]))
        # The last setpoint of every charger, in one batch (as the edge records a decision's);
        # 600 chargers take two multi-row statements, so a kill can land between them.
        await store.add_setpoints(
            (Setpoint(charger_id=f"SP{c}", setpoint_a=6.0 + c % 26, decision_id=f"D{i}"), now)
            for c in range(SETPOINT_CHARGERS)
        )
        await store.upsert_session(SessionRecord(f"S{i}", f"C{i % 7}", now))
        ev = TransactionEvent(
            charger_id=f"C{i % 7}",
            transaction_id=f"T{i}",
            kind=TransactionEventKind.TRANSACTION_EVENT_KIND_STARTED,
        )
        ev.occurred_at.GetCurrentTime()
        await store.record_transaction(ev)
        ms = MeterSample(charger_id=f"C{i % 7}", current_a=[float(i)] * 3)
        ms.sampled_at.GetCurrentTime()
        await store.append_meter_samples([ms])
        print(i, flush=True)
        i += 1


if __name__ == "__main__":
    asyncio.run(
        main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    )
