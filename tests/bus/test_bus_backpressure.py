"""Backpressure: a stuck subscriber or durable consumer does not stall the control path (both
implementations), telemetry is sampled down when the sender falls behind and every drop is
counted, and the NATS sender recovers the events it had in flight when the broker died."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bus_testkit import SHARED_NATS, NatsServer, make_nats_bus, started_bus, unique_site, wait_until
from evcore.bus import Bus, BusMessage, Subjects
from evcore.v1 import meter_pb2, setpoint_pb2


@pytest.fixture(params=["inprocess", "nats"])
async def small_queue_bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bus]:
    """A bus whose live subscribers may hold only 20 messages each."""
    async with started_bus(request.param, tmp_path / "outbox", subscriber_queue_size=20) as b:
        yield b


async def test_stuck_subscriber_does_not_stall_control_path(small_queue_bus: Bus) -> None:
    bus = small_queue_bus
    s = Subjects(bus.site_id)
    release = asyncio.Event()
    stuck_got: list[str] = []

    async def stuck(m: BusMessage) -> None:
        stuck_got.append(m.subject)
        await release.wait()  # e.g. a dashboard whose socket stopped draining

    await bus.subscribe(s.all, stuck)
    stuck_durable_calls = 0

    async def stuck_durable(m: BusMessage) -> None:
        nonlocal stuck_durable_calls
        stuck_durable_calls += 1
        await release.wait()  # e.g. a historian whose database hangs

    await bus.consume(s.setpoint(), durable="historian", handler=stuck_durable)
    applied: list[str] = []

    async def dispatch(m: BusMessage) -> None:
        applied.append(m.event_id)

    await bus.consume(s.setpoint(), durable="dispatcher", handler=dispatch)
    decisions, chargers = 20, 50
    want: list[str] = []

    async def control_path() -> None:
        for d in range(decisions):
            items: list[tuple[str, bytes | setpoint_pb2.Setpoint, str | None]] = []
            for c in range(chargers):
                sp = setpoint_pb2.Setpoint(charger_id=f"C{c}", setpoint_a=6.0 + d % 10)
                items.append((s.setpoint(f"C{c}"), sp, f"d{d}/C{c}"))
                want.append(f"d{d}/C{c}")
            await bus.publish_many(items)
            for c in range(chargers):
                smp = meter_pb2.MeterSample(charger_id=f"C{c}", power_w=1000.0 * d)
                await bus.publish(s.telemetry(f"C{c}"), smp)
            await bus.publish(s.status("C0"), f"tick {d}".encode())

    # Generous bound: only a stall (publish waiting on the stuck handler) would come near it.
    await asyncio.wait_for(control_path(), 60)
    assert await bus.flush(timeout_s=30)
    await wait_until(lambda: len(applied) == len(want), timeout_s=60, what="every setpoint")
    assert applied == want, "setpoints lost, duplicated or reordered behind a stuck subscriber"
    assert not release.is_set() and stuck_got, "the stuck subscriber was reached and still hangs"
    assert stuck_durable_calls >= 1, "the stuck durable consumer was reached"
    # Its backlog is bounded: what did not fit was dropped and counted, not queued without end.
    await wait_until(
        lambda: bus.stats.slow_consumer_dropped > 0, timeout_s=30, what="overflow counted"
    )
    # Released, the subscriber lives on and gets new messages.
    release.set()
    before = len(stuck_got)
    await bus.publish(s.status("C1"), b"after release")
    await bus.flush()
    await wait_until(
        lambda: len(stuck_got) > before and stuck_got[-1] == s.status("C1"),
        timeout_s=30,
        what="a message after release",
    )


async def test_telemetry_sampled_down_when_sender_behind(tmp_path: Path) -> None:
    """The broker is up but the sender cannot keep up (here: publish never yields, so the sender
    gets no turn): the latest sample per charger wins and every replaced one is counted."""
    site = unique_site()
    bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox")
    await bus.start()
    assert bus.connected, f"shared nats-server at {SHARED_NATS} unreachable"
    s = Subjects(site)
    stored: list[meter_pb2.MeterSample] = []

    async def on_stored(m: BusMessage) -> None:
        stored.append(meter_pb2.MeterSample.FromString(m.data))

    try:
        await bus.consume(s.telemetry(), durable="historian", handler=on_stored)
        chargers, rounds = 25, 200
        for k in range(rounds):
            for c in range(chargers):
                smp = meter_pb2.MeterSample(charger_id=f"C{c}", power_w=float(k))
                await bus.publish(s.telemetry(f"C{c}"), smp)
        st = bus.stats
        assert st.published == chargers * rounds
        assert st.telemetry_dropped == chargers * (rounds - 1)
        assert await bus.flush(timeout_s=30)
        await wait_until(lambda: len(stored) >= chargers, timeout_s=30, what="latest samples")
        await asyncio.sleep(0.3)  # anything extra would arrive now
        assert sorted((m.charger_id, m.power_w) for m in stored) == sorted(
            (f"C{c}", float(rounds - 1)) for c in range(chargers)
        )
        # Accounting closes: every accepted sample was either sent or counted as dropped.
        assert bus.stats.sent == st.published - bus.stats.telemetry_dropped
    finally:
        await bus.delete_streams()
        await bus.close()


async def test_sender_recovers_in_flight_events_after_broker_kill(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Normal events (status) in flight when the broker is SIGKILLed go back to the queue and are
    stored once the broker is back; no JetStream publish slot stays held."""
    site = unique_site()
    bus = make_nats_bus(site, nats_server.url, tmp_path / "outbox")
    await bus.start()
    s = Subjects(site)
    seen: set[str] = set()

    async def on_status(m: BusMessage) -> None:
        seen.add(m.event_id)

    reader = make_nats_bus(site, nats_server.url, tmp_path / "reader-outbox")
    await reader.start()
    try:
        await reader.consume(s.status(), durable="status-log", handler=on_status)
        n = 3000
        for i in range(n):
            await bus.publish(s.status(f"C{i % 40}"), f"{i}".encode(), event_id=f"st-{i}")
            if i % 100 == 99:
                await asyncio.sleep(0)  # let the sender put windows in flight
            if i == n // 2:
                nats_server.kill()
        await asyncio.sleep(0.5)
        nats_server.start()
        assert await bus.flush(timeout_s=60), "the sender did not drain after the restart"
        await wait_until(lambda: len(seen) == n, timeout_s=60, what=f"{n} status events")
        # Whether a send fails at the kill or nats-py buffers it across the reconnect depends on
        # timing; either way every event must arrive once and no publish slot may stay held.
        assert bus.stats.queue_dropped == 0
        assert set(seen) == {f"st-{i}" for i in range(n)}
        # Re-sent events fell inside JetStream's duplicate window: each one is stored once.
        info = await bus._js.stream_info(bus.streams[0].name)
        assert info.state.messages == n
        assert bus._js.publish_async_pending() == 0, "a publish slot leaked"
    finally:
        await reader.close()
        await bus.close()
