"""The bus contract, run against both implementations (in-process and NATS JetStream)."""

from __future__ import annotations

import asyncio

import pytest
from bus_testkit import wait_until
from evcore.bus import (
    BadPayload,
    Bus,
    BusMessage,
    BusTimeout,
    NoResponders,
    ProcessedIds,
    Subjects,
    decoded,
)
from evcore.v1 import event_pb2, meter_pb2, setpoint_pb2


async def test_publish_subscribe_wildcard_and_escaped_ids(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    got: list[tuple[str | None, bytes]] = []

    async def on_msg(m: BusMessage) -> None:
        got.append((s.charger_of(m.subject), m.data))

    await bus.subscribe(s.telemetry(), on_msg)
    only_dot: list[bytes] = []

    async def on_dot(m: BusMessage) -> None:
        only_dot.append(m.data)

    await bus.subscribe(s.telemetry("CP.1"), on_dot)
    ids = ["CP.1", "CP*2", "CP>3", "with space", "%41"]
    for i, cid in enumerate(ids):
        await bus.publish(s.telemetry(cid), f"m{i}".encode())
    await bus.flush()
    await wait_until(lambda: len(got) == len(ids), what="all telemetry")
    assert sorted(got) == sorted((cid, f"m{i}".encode()) for i, cid in enumerate(ids))
    # An id holding '.', '*' or '>' is one token: it neither matched nor widened another charger.
    await asyncio.sleep(0.1)
    assert only_dot == [b"m0"]


async def test_event_id_carried_and_defaults_from_envelope(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    seen: list[BusMessage] = []

    async def on_msg(m: BusMessage) -> None:
        seen.append(m)

    await bus.subscribe(s.grid, on_msg)
    ev = event_pb2.Event(event_id="evt-42", site_id=bus.site_id)
    ev.grid_signal.curtailment.node_id = "grid"
    ev.grid_signal.curtailment.max_kw = 50.0
    eid = await bus.publish(s.grid, ev)
    assert eid == "evt-42"
    explicit = await bus.publish(s.grid, b"raw", event_id="explicit-1")
    generated = await bus.publish(s.grid, b"raw2")
    assert explicit == "explicit-1" and generated and generated not in ("evt-42", "explicit-1")
    await bus.flush()
    await wait_until(lambda: len(seen) == 3, what="three grid events")
    by_id = {m.event_id: m for m in seen}
    assert set(by_id) == {"evt-42", "explicit-1", generated}
    back = event_pb2.Event.FromString(by_id["evt-42"].data)
    assert back.grid_signal.curtailment.max_kw == 50.0


async def test_queue_group_delivers_each_message_once(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    a: list[bytes] = []
    b: list[bytes] = []

    async def on_a(m: BusMessage) -> None:
        a.append(m.data)

    async def on_b(m: BusMessage) -> None:
        b.append(m.data)

    await bus.subscribe(s.status(), on_a, queue="workers")
    await bus.subscribe(s.status(), on_b, queue="workers")
    n = 200
    for i in range(n):
        await bus.publish(s.status(f"C{i % 7}"), str(i).encode())
    await bus.flush()
    await wait_until(lambda: len(a) + len(b) == n, what="all status events")
    await asyncio.sleep(0.1)
    assert len(a) + len(b) == n
    assert sorted(a + b, key=int) == [str(i).encode() for i in range(n)]
    assert a and b, "both members of the queue group should get work"


async def test_request_reply(bus: Bus) -> None:
    s = Subjects(bus.site_id)

    async def serve(m: BusMessage) -> None:
        await m.respond(b"pong:" + m.data)

    await bus.subscribe(s.rpc("edge.ping"), serve)
    assert await bus.request(s.rpc("edge.ping"), b"1", timeout_s=2.0) == b"pong:1"
    with pytest.raises(NoResponders):
        await bus.request(s.rpc("nobody"), b"x", timeout_s=1.0)

    async def silent(m: BusMessage) -> None:
        return None

    await bus.subscribe(s.rpc("silent"), silent)
    with pytest.raises(BusTimeout):
        await bus.request(s.rpc("silent"), b"x", timeout_s=0.3)


async def test_durable_consume_in_order_acks_after_handler(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    effects: list[bytes] = []
    failed_once: set[bytes] = set()
    counts: dict[bytes, int] = {}

    async def handler(m: BusMessage) -> None:
        counts[m.data] = m.delivery_count
        if m.data == b"3" and m.data not in failed_once:
            failed_once.add(m.data)
            raise RuntimeError("effect store briefly unavailable")
        effects.append(m.data)

    for i in range(6):
        await bus.publish(s.audit, str(i).encode(), event_id=f"a{i}")
    await bus.flush()
    sub = await bus.consume(s.audit, durable="auditor", handler=handler)
    await wait_until(lambda: len(effects) == 6, what="six audit records")
    assert effects == [str(i).encode() for i in range(6)]
    assert counts[b"3"] == 2, "the failed message must be redelivered, not lost"
    assert bus.stats.handler_errors == 1
    await sub.stop()

    # The durable resumes where it left off: only new records arrive.
    for i in range(6, 9):
        await bus.publish(s.audit, str(i).encode(), event_id=f"a{i}")
    await bus.flush()
    later: list[bytes] = []

    async def handler2(m: BusMessage) -> None:
        later.append(m.data)

    await bus.consume(s.audit, durable="auditor", handler=handler2)
    await wait_until(lambda: len(later) == 3, what="three new audit records")
    await asyncio.sleep(0.2)
    assert later == [b"6", b"7", b"8"]


async def test_retried_publish_is_stored_once_and_dedupe_store_drops_repeats(
    bus: Bus, tmp_path: object
) -> None:
    s = Subjects(bus.site_id)
    for _ in range(3):
        await bus.publish(s.setpoint("C1"), b"16A", event_id="decision-1/C1")
    await bus.publish(s.setpoint("C1"), b"10A", event_id="decision-2/C1")
    await bus.flush()
    # What the stream stored, read by a durable without a processed-id store: each id once.
    stored: list[tuple[str, bytes]] = []

    async def record(m: BusMessage) -> None:
        stored.append((m.event_id, m.data))

    await bus.consume(s.setpoint(), durable="recorder", handler=record)
    ids = ProcessedIds(":memory:", "dispatcher")
    # An earlier life of this consumer already applied decision-2 (e.g. before a replay that
    # outlasted the broker's duplicate window): its repeat must be dropped, not applied again.
    ids.add("decision-2/C1")
    applied: list[tuple[str, bytes]] = []

    async def apply(m: BusMessage) -> None:
        applied.append((m.event_id, m.data))

    await bus.consume(s.setpoint(), durable="dispatcher", handler=apply, dedupe=ids)
    await wait_until(
        lambda: len(stored) >= 2 and len(applied) + bus.stats.duplicates_dropped >= 2,
        what="both durables to reach the end of the stream",
    )
    await asyncio.sleep(0.2)  # a third stored copy would arrive now
    assert stored == [("decision-1/C1", b"16A"), ("decision-2/C1", b"10A")], (
        "a retried publish (same event id) was stored more than once"
    )
    assert applied == [("decision-1/C1", b"16A")]
    assert bus.stats.duplicates_dropped == 1
    assert ids.contains("decision-1/C1")


async def test_bad_payload_rejected_counted_subscriber_lives(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    s = Subjects(bus.site_id)
    good: list[float] = []

    async def on_sample(m: BusMessage, sample: meter_pb2.MeterSample) -> None:
        if not sample.charger_id:
            raise BadPayload("MeterSample without charger_id")
        good.append(sample.power_w)

    await bus.subscribe(s.telemetry(), decoded(meter_pb2.MeterSample, on_sample))
    await bus.publish(s.telemetry("C1"), b"\xff\xff\xff garbage")
    await bus.flush()
    await bus.publish(s.telemetry("C2"), meter_pb2.MeterSample())  # decodes, but no charger_id
    await bus.flush()
    await bus.publish(s.telemetry("C3"), meter_pb2.MeterSample(charger_id="C3", power_w=7400.0))
    await bus.flush()
    await wait_until(lambda: good == [7400.0], what="the good sample after two bad ones")
    assert bus.stats.rejected == 2
    assert "not a valid evcore.v1.MeterSample" in caplog.text
    assert "MeterSample without charger_id" in caplog.text


async def test_bad_payload_on_durable_is_not_redelivered(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    s = Subjects(bus.site_id)
    got: list[str] = []
    calls = 0

    async def on_event(m: BusMessage, ev: event_pb2.Event) -> None:
        got.append(ev.event_id)

    async def counting(m: BusMessage) -> None:
        nonlocal calls
        calls += 1
        await decoded(event_pb2.Event, on_event)(m)

    await bus.publish(s.transaction("C1"), b"\x08\x96\x01 not an event", event_id="bad-1")
    ok = event_pb2.Event(event_id="tx-1", site_id=bus.site_id)
    ok.transaction.transaction_id = "T1"
    await bus.publish(s.transaction("C1"), ok)
    await bus.flush()
    await bus.consume(s.transaction(), durable="tx", handler=counting)
    await wait_until(lambda: got == ["tx-1"], what="the good transaction")
    await asyncio.sleep(0.3)
    assert calls == 2 and bus.stats.rejected == 1
    assert "rejected payload" in caplog.text and "(event bad-1)" in caplog.text
    assert "not a valid evcore.v1.Event" in caplog.text


async def test_slow_subscriber_does_not_stall_publisher_or_others(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    release = asyncio.Event()
    slow_started = asyncio.Event()
    fast: list[bytes] = []

    async def slow(m: BusMessage) -> None:
        slow_started.set()
        await release.wait()  # a consumer stuck on its own I/O

    async def quick(m: BusMessage) -> None:
        fast.append(m.data)

    await bus.subscribe(s.status(), slow)
    await bus.subscribe(s.status(), quick)
    n = 500
    for i in range(n):
        await bus.publish(s.status(f"C{i % 10}"), str(i).encode())
    await bus.flush()
    await wait_until(lambda: len(fast) == n, what="the fast subscriber to get everything")
    assert slow_started.is_set() and not release.is_set()
    release.set()


async def test_publish_rejects_wildcards_and_empty_ids(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    with pytest.raises(ValueError, match="wildcards"):
        await bus.publish(s.telemetry(), b"x")
    with pytest.raises(ValueError, match="empty"):
        s.telemetry("")
    with pytest.raises(ValueError, match="no stream stores"):
        await bus.consume(s.rpc("x"), durable="d", handler=lambda m: asyncio.sleep(0))


async def test_publish_many_keeps_order_and_ids(bus: Bus) -> None:
    s = Subjects(bus.site_id)
    items: list[tuple[str, bytes | setpoint_pb2.Setpoint, str | None]] = [
        (
            s.setpoint(f"C{i}"),
            setpoint_pb2.Setpoint(charger_id=f"C{i}", setpoint_a=6 + i),
            f"d1/C{i}",
        )
        for i in range(50)
    ]
    items.append((s.status("C0"), b"status", None))
    ids = await bus.publish_many(items)
    assert ids[:50] == [f"d1/C{i}" for i in range(50)] and ids[50]
    await bus.flush()
    got: list[str] = []

    async def apply(m: BusMessage) -> None:
        got.append(setpoint_pb2.Setpoint.FromString(m.data).charger_id)

    await bus.consume(s.setpoint(), durable="dispatch", handler=apply)
    await wait_until(lambda: len(got) == 50, what="50 setpoints")
    assert got == [f"C{i}" for i in range(50)]


async def test_stopping_a_consumer_finishes_the_message_in_hand_and_returns_the_rest(
    bus: Bus,
) -> None:
    """``stop()`` finishes the message in hand and leaves the rest to the durable's next
    consumer. Before: NATS went on through the whole fetched batch (up to 64) until stop()
    cancelled it after 3 s in the middle of a handler (a store write cut short; the stopped
    consumer handled [0..4] and message 5 was cancelled mid-way), and the rest of the batch
    waited for ack_wait (30 s in service); in-process cancelled the handler in hand at once."""
    s = Subjects(bus.site_id)
    handled: list[bytes] = []
    cancelled: list[bytes] = []
    started = asyncio.Event()

    async def slow(m: BusMessage) -> None:
        started.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            cancelled.append(m.data)
            raise
        handled.append(m.data)

    for i in range(10):
        await bus.publish(s.audit, str(i).encode(), event_id=f"a{i}")
    assert await bus.flush(timeout_s=10)
    sub = await bus.consume(s.audit, durable="slow", handler=slow)
    await asyncio.wait_for(started.wait(), 10)
    await sub.stop()
    assert cancelled == [], "a handler was cut short"
    assert handled == [b"0"], "the consumer went on after stop()"
    later: list[bytes] = []

    async def quick(m: BusMessage) -> None:
        later.append(m.data)

    await bus.consume(s.audit, durable="slow", handler=quick)
    await wait_until(lambda: len(later) == 9, 10, "the rest, for the next consumer")
    assert later == [str(i).encode() for i in range(1, 10)]


async def test_a_queue_group_with_whitespace_is_refused_naming_it(bus: Bus) -> None:
    """NATS cannot carry a queue group name with whitespace; both buses refuse it alike."""
    s = Subjects(bus.site_id)

    async def handler(m: BusMessage) -> None:
        return None

    with pytest.raises(ValueError, match="queue group 'my workers'"):
        await bus.subscribe(s.grid, handler, queue="my workers")
