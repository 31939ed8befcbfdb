"""A lost broker loses no audit record, also when the bus's outbox reaches its cap
(``[bus] outbox_max_bytes``): the outbox refuses the records it has no room for (OutboxFull), the
audit log keeps them in its store and sends them, in order, once the broker is back and the
outbox has room. A real nats-server of the test's own (killed, then started again) and a real
store."""

from __future__ import annotations

from pathlib import Path

import pytest
from bus_testkit import make_nats_bus, wait_until
from outbox_testkit import decision, scene, stored_records

pytestmark = pytest.mark.timeout(90)


async def test_a_lost_broker_loses_no_audit_record_when_the_outbox_is_full(
    tmp_path: Path,
) -> None:
    async with scene(tmp_path, "audit-cap") as sc:
        sc.srv.start()
        bus = make_nats_bus(sc.site, sc.srv.url, sc.outbox, outbox_max_bytes=8_000)
        await bus.start()
        try:
            log = await sc.audit(bus)
            appended = []
            for i in range(2):
                sc.clock.advance(1)
                appended.append(await log.append(decision(i, chargers=4)))
            await log.flush()
            assert await bus.flush(timeout_s=10)
            sc.srv.kill()  # the broker is lost
            await wait_until(lambda: not bus.connected, 10, "the bus to see the broker gone")
            # About 1 KB a record: some 8 fit in the outbox, the rest are refused by it.
            for i in range(2, 40):
                sc.clock.advance(1)
                appended.append(await log.append(decision(i, chargers=4)))
            await wait_until(lambda: bus.stats.outbox_refused > 0, 10, "the outbox to refuse")
            assert bus.stats.outbox_bytes <= 8_000
            assert 0 < bus.outbox.pending < 38 and log.publish_failures > 0
            # Every record is in the store, the refused ones too.
            stored = await sc.store.audit_records(after_seq=-1, limit=100)
            assert [r.seq for r in stored] == list(range(40))
            assert (await log.verify()).ok
            sc.srv.start()  # back, with its stream as it was
            await wait_until(lambda: log.publish_backlog == 0, 40, "every record handed over")
            assert await bus.flush(timeout_s=20)
            assert await stored_records(bus, sc.s.audit) == appended  # in order, each once
            await log.close()
            await bus.delete_streams()
        finally:
            await bus.close()
