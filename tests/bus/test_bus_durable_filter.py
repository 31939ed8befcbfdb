"""A durable name used again with another filter is refused naming both, on both buses.

On a real nats-server the second ``consume`` bound to the durable as it was: its handler, written
for status events, got the transaction the durable still filtered, and no status event ever came
(the in-process bus refused it: the two buses did not keep one contract). When the consumer
attaches only once the broker is back, it is logged and consumes nothing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from bus_testkit import NatsServer, make_nats_bus, unique_site, wait_until
from evcore.bus import Bus, BusMessage, Subjects


async def test_a_durable_used_again_with_another_filter_is_refused_naming_both(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.event_id)

    first = await bus.consume(s.transaction(), durable="ingest", handler=handler)
    await bus.publish(s.transaction("C1"), b"tx", event_id="tx-1")
    await wait_until(lambda: got == ["tx-1"], 10, "the first consumer's message")
    await first.stop()
    with pytest.raises(ValueError) as refused:
        await bus.consume(s.status(), durable="ingest", handler=handler)
    assert f"already filters {s.transaction()!r}" in str(refused.value)
    assert f"not {s.status()!r}" in str(refused.value)
    # Nothing was taken on its behalf: the transaction after it waits for the durable's owner.
    await bus.publish(s.transaction("C1"), b"tx", event_id="tx-2")
    await asyncio.sleep(1.0)
    assert got == ["tx-1"]
    again = await bus.consume(s.transaction(), durable="ingest", handler=handler)
    await wait_until(lambda: got == ["tx-1", "tx-2"], 10, "the owner's next message")
    await again.stop()


async def test_a_durable_of_another_filter_found_at_attach_is_logged_and_not_consumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = NatsServer(tmp_path / "js")
    srv.start()
    site = unique_site()
    s = Subjects(site)
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.subject)

    bus = make_nats_bus(site, srv.url, tmp_path / "outbox")
    await bus.start()
    try:
        first = await bus.consume(s.transaction(), durable="ingest", handler=handler)
        await bus.publish(s.transaction("C1"), b"tx", event_id="tx-1")
        await wait_until(lambda: len(got) == 1, 10, "the first consumer's message")
        await first.stop()
    finally:
        await bus.close()
    srv.kill()
    bus = make_nats_bus(site, srv.url, tmp_path / "outbox", connect_timeout_s=0.2)
    await bus.start()  # the broker is away: the consumer attaches later
    try:
        assert not bus.connected
        with caplog.at_level(logging.ERROR, logger="evcore.bus.nats"):
            await bus.consume(s.status(), durable="ingest", handler=handler)
            await bus.publish(s.transaction("C1"), b"tx", event_id="tx-2")
            srv.start()
            await wait_until(
                lambda: any("already filters" in r.getMessage() for r in caplog.records),
                15,
                "the mismatch to be logged",
            )
        await asyncio.sleep(1.0)
        assert len(got) == 1, got  # the status handler was handed no transaction
        await bus.delete_streams()
    finally:
        await bus.close()
        srv.kill()
