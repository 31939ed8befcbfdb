"""``Bus.ack_state``: whether a durable consumer has acknowledged one stored event, on both
implementations (the NATS one on the real server at 127.0.0.1:4222, asked from another
connection as a publisher in another process would)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import SHARED_NATS, make_nats_bus, started_bus, wait_until
from evcore.bus import Bus, BusMessage, Subjects
from evcore.bus.natsbus import NatsBus

DURABLE = "edge-grid"


async def test_ack_state_follows_the_durable_consumer(bus: Bus, tmp_path: Path) -> None:
    s = Subjects(bus.site_id)
    for eid in ("g1", "g2", "g3"):
        await bus.publish(s.grid, eid.encode(), event_id=eid, critical=True)
    await bus.publish(s.station_event("CP1"), b"other", event_id="o1", critical=True)
    assert await bus.flush()

    # Stored, but no consumer yet: not acknowledged.
    st = await bus.ack_state(s.grid, "g1", durable=DURABLE)
    assert (st.stored, st.consumer, st.acknowledged) == (True, False, False)
    assert (await bus.ack_state(s.grid, "never", durable=DURABLE)).stored is False

    release = asyncio.Event()
    seen: list[str] = []

    async def handler(m: BusMessage) -> None:
        seen.append(m.event_id)
        if m.event_id == "g2":
            await release.wait()  # the edge still applying g2: g1 taken, g2 and g3 not

    sub = await bus.consume(s.grid, durable=DURABLE, handler=handler)
    asker: Bus = bus
    other: NatsBus | None = None
    if isinstance(bus, NatsBus):
        # The cloud asks on its own connection, knowing no sequence yet (a restarted process).
        other = make_nats_bus(bus.site_id, SHARED_NATS, tmp_path / "asker-outbox")
        await other.start()
        asker = other
    try:
        await wait_until(lambda: "g2" in seen, what="g2 in the handler")

        async def acked(eid: str) -> bool:
            return (await asker.ack_state(s.grid, eid, durable=DURABLE)).acknowledged

        await wait_until_async(lambda: acked("g1"), "g1 acknowledged")
        assert [await acked(e) for e in ("g1", "g2", "g3")] == [True, False, False]
        g2 = await asker.ack_state(s.grid, "g2", durable=DURABLE)
        g1 = await asker.ack_state(s.grid, "g1", durable=DURABLE)
        assert g2.consumer and g2.stored and g1.stored_seq < g2.stored_seq
        assert g2.ack_floor == g1.stored_seq
        # An id never published on this subject (here: on another subject) is not acknowledged.
        assert not (await asker.ack_state(s.grid, "o1", durable=DURABLE)).stored
        # Another durable on the same subject has acknowledged nothing.
        assert not (await asker.ack_state(s.grid, "g1", durable="someone-else")).acknowledged

        release.set()
        await wait_until_async(lambda: acked("g3"), "g3 acknowledged")
        assert [await acked(e) for e in ("g1", "g2", "g3")] == [True, True, True]
        with pytest.raises(ValueError, match="no stream stores"):
            await asker.ack_state(Subjects("not-this-site").grid, "g1", durable=DURABLE)
    finally:
        release.set()
        await sub.stop()
        if other is not None:
            await other.close()


async def test_a_failing_handler_leaves_its_event_unacknowledged(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    await bus.publish(s.grid, b"x", event_id="bad-1", critical=True)
    assert await bus.flush()
    calls = 0

    async def handler(m: BusMessage) -> None:
        nonlocal calls
        calls += 1
        raise OSError("store down")  # redelivered, never acknowledged

    sub = await bus.consume(s.grid, durable=DURABLE, handler=handler)
    try:
        await wait_until(lambda: calls >= 2, what="a redelivery")
        st = await bus.ack_state(s.grid, "bad-1", durable=DURABLE)
        assert (st.stored, st.consumer, st.acknowledged) == (True, True, False)
    finally:
        await sub.stop()


async def wait_until_async(check: object, what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if await check():  # type: ignore[operator]
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_miss_asked_again_reads_only_the_messages_stored_since(tmp_path: Path) -> None:
    """A subject of 300 messages and an id it does not hold (a signal not stored yet): the first
    look-up reads the subject through once; asked again after 5 more messages, it reads only
    those 5 (and the subject's last message), not the 300 again."""
    async with started_bus("nats", tmp_path / "outbox") as bus:
        assert isinstance(bus, NatsBus)
        s = Subjects(bus.site_id)
        for i in range(300):
            await bus.publish(s.grid, b"x", event_id=f"e{i}", critical=True)
        assert await bus.flush()
        asker = make_nats_bus(bus.site_id, SHARED_NATS, tmp_path / "asker-outbox")
        await asker.start()
        try:
            assert asker._js is not None
            js = asker._js
            real_get_msg = js.get_msg
            calls: list[int] = []

            async def counting_get_msg(*args: Any, **kwargs: Any) -> Any:
                calls.append(1)
                return await real_get_msg(*args, **kwargs)

            js.get_msg = counting_get_msg  # type: ignore[method-assign]
            assert not (await asker.ack_state(s.grid, "later", durable=DURABLE)).stored
            first = len(calls)
            for i in range(300, 305):
                await bus.publish(s.grid, b"x", event_id=f"e{i}", critical=True)
            assert await bus.flush()
            calls.clear()
            assert not (await asker.ack_state(s.grid, "later", durable=DURABLE)).stored
            second = len(calls)
            calls.clear()
            await bus.publish(s.grid, b"x", event_id="later", critical=True)
            await bus.publish(s.grid, b"x", event_id="after", critical=True)
            assert await bus.flush()
            assert (await asker.ack_state(s.grid, "later", durable=DURABLE)).stored
            third = len(calls)
            print(f"get_msg requests: first miss {first}, second {second}, found {third}")
            assert first >= 300
            assert second <= 6, second  # the last message, then the 4 before it
            assert third <= 3, third
            # Ids read before are still found (remembered), without reading the subject again.
            calls.clear()
            assert (await asker.ack_state(s.grid, "e7", durable=DURABLE)).stored
            assert len(calls) <= 1
        finally:
            await asker.close()
