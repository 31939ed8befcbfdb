"""NATS faults against real nats-server processes of our own (own port, own store dir): a broker
restart mid-burst, the publishing process SIGKILLed mid-burst, the broker unreachable."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

import pytest
from bus_testkit import (
    SHARED_NATS,
    AuditSink,
    NatsServer,
    free_port,
    make_nats_bus,
    unique_site,
    wait_until,
)
from evcore.bus import BusMessage, BusUnavailable, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.bus.outbox import Outbox
from evcore.bus.subjects import escape_token
from evcore.v1 import audit_pb2, meter_pb2


async def start_sink(site: str, url: str, tmp_path: Path) -> tuple[NatsBus, AuditSink]:
    sink = AuditSink(tmp_path / "sink.sqlite")
    consumer_bus = make_nats_bus(site, url, tmp_path / "consumer-outbox")
    await consumer_bus.start()
    await consumer_bus.consume(
        Subjects(site).audit, durable="audit-sink", handler=sink.handle, dedupe=sink.ids
    )
    return consumer_bus, sink


async def test_broker_restart_mid_burst_loses_and_duplicates_no_audit_record(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    site = unique_site()
    pub = make_nats_bus(site, nats_server.url, tmp_path / "outbox")
    await pub.start()
    consumer_bus, sink = await start_sink(site, nats_server.url, tmp_path)
    s = Subjects(site)
    n = 1000
    pending_at_kill = -1
    pending_during_outage = -1
    try:
        for i in range(n):
            rec = audit_pb2.AuditRecord(seq=i, decision_id=f"d{i}")
            await pub.publish(s.audit, rec, event_id=f"audit-{i}")
            if i == n // 3:
                nats_server.kill()  # SIGKILL: no graceful shutdown
                pending_at_kill = pub.outbox.pending
            if i == n // 2:
                assert not pub.connected
                pending_during_outage = pub.outbox.pending
                nats_server.start()
        await wait_until(lambda: sink.count() >= n, timeout_s=60, what=f"{n} audit records")
        await asyncio.sleep(0.5)  # a late redelivery would show up here
        # Everything published while the broker was down waited in the outbox.
        assert pending_during_outage >= n // 2 - n // 3, "the outage was not exercised"
        assert pending_at_kill >= 0
        assert sink.applied() == list(range(n)), "lost, duplicated or reordered audit records"
        assert pub.outbox.pending == 0
    finally:
        await consumer_bus.close()
        await pub.close()


async def test_broker_back_without_its_store_streams_are_created_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The broker returns without its JetStream store (memory storage, a lost volume, a replaced
    broker). The bus creates the site's streams again: the outbox drains into them and a durable
    consumer gets the new records. Before, critical events waited in the outbox for ever on a
    connected broker (every publish: no stream answers)."""
    site = unique_site()
    s = Subjects(site)
    pub = make_nats_bus(site, nats_server.url, tmp_path / "outbox")
    await pub.start()
    consumer_bus, sink = await start_sink(site, nats_server.url, tmp_path)
    try:
        for i in range(5):
            await pub.publish(s.audit, audit_pb2.AuditRecord(seq=i), event_id=f"audit-{i}")
        await wait_until(lambda: sink.count() == 5, what="the records before the loss")
        nats_server.kill()
        shutil.rmtree(nats_server.store_dir)
        nats_server.start()
        for i in range(5, 10):
            await pub.publish(s.audit, audit_pb2.AuditRecord(seq=i), event_id=f"audit-{i}")
        await pub.publish(s.status("C1"), b"status after", event_id="status-after")
        assert await pub.flush(timeout_s=30), "events wait on a broker that lost the streams"
        info = await pub._js.stream_info(pub.streams[0].name)
        assert info.state.messages == 6, "the five new records and the status"
        await wait_until(lambda: sink.count() == 10, timeout_s=30, what="the records after it")
        assert sink.applied() == list(range(10))
    finally:
        await consumer_bus.close()
        await pub.close()


@pytest.mark.parametrize("broker", ["up", "down"])
async def test_sigkilled_publisher_loses_nothing_its_outbox_accepted(
    stopped_nats_server: NatsServer, tmp_path: Path, broker: str
) -> None:
    srv = stopped_nats_server
    if broker == "up":
        srv.start()
    site = unique_site()
    outbox = tmp_path / "edge-outbox.sqlite"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("outbox_publisher_child.py")),
        srv.url,
        site,
        str(outbox),
        "100000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    accepted: list[int] = []
    try:
        assert child.stdout is not None
        while len(accepted) < 400:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line, "publisher child exited early"
            accepted.append(int(line))
        child.kill()  # SIGKILL in the middle of the burst
        await child.wait()
        accepted += [int(x) for x in (await child.stdout.read()).split()]
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert accepted == list(range(len(accepted)))
    if broker == "down":
        srv.start()
    # The edge comes back: the same outbox, a new process (here: a new bus).
    consumer_bus, sink = await start_sink(site, srv.url, tmp_path)
    revived = NatsBus(site, make_nats_bus(site, srv.url, tmp_path).config, outbox_path=outbox)
    await revived.start()
    try:
        await wait_until(
            lambda: sink.count() >= len(accepted), timeout_s=60, what="every accepted record"
        )
        await asyncio.sleep(0.5)
        applied = sink.applied()
        # Everything accepted arrived, once, in order; anything beyond was accepted on disk
        # just before the kill (fsynced before publish returned, not yet printed).
        assert applied[: len(accepted)] == accepted
        assert applied == list(range(len(applied)))
        assert len(applied) - len(accepted) <= 64
    finally:
        await revived.close()
        await consumer_bus.close()


async def test_outbox_replay_after_the_duplicate_window_is_dropped_by_the_consumer(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """An outbox entry whose removal was lost (JetStream had stored it, the edge died before the
    delete reached its disk) is re-sent under the same event id when the edge comes back. After
    JetStream's duplicate window the stream stores it a second time; the consumer's processed-id
    store, kept with its effects, is what drops the repeat."""
    site = unique_site()
    s = Subjects(site)
    window_s = 0.5
    edge_dir = tmp_path / "edge-outbox"
    edge = make_nats_bus(site, nats_server.url, edge_dir, duplicate_window_s=window_s)
    await edge.start()
    rec = audit_pb2.AuditRecord(seq=1, decision_id="d1")
    await edge.publish(s.audit, rec, event_id="audit-1")
    assert await edge.flush(timeout_s=10) and edge.outbox.pending == 0
    outbox_path = edge.outbox.path
    await edge.close()
    # The removal is lost: the entry is back in the outbox, as a crash before the delete leaves it.
    lost = Outbox(outbox_path)
    await lost.open()
    await lost.append(s.audit, "audit-1", rec.SerializeToString(deterministic=True), 0.0)
    await lost.close()
    await asyncio.sleep(window_s * 3)  # the edge stays down longer than the duplicate window

    consumer_bus, sink = await start_sink(site, nats_server.url, tmp_path)
    raw: list[str] = []

    async def on_raw(m: BusMessage) -> None:
        raw.append(m.event_id)

    await consumer_bus.consume(s.audit, durable="raw", handler=on_raw)
    revived = make_nats_bus(site, nats_server.url, edge_dir, duplicate_window_s=window_s)
    await revived.start()
    try:
        assert await revived.flush(timeout_s=10) and revived.outbox.pending == 0
        info = await revived._js.stream_info(revived.streams[0].name)
        assert info.state.messages == 2, (
            "the replay fell inside the duplicate window: not exercised"
        )
        await wait_until(lambda: len(raw) == 2, what="both stored copies")
        await wait_until(
            lambda: sink.calls + consumer_bus.stats.duplicates_dropped >= 2,
            what="both copies to reach the deduplicating consumer",
        )
        await asyncio.sleep(0.3)
        assert raw == ["audit-1", "audit-1"]
        assert sink.applied() == [1], "the replayed audit record was applied twice"
        assert consumer_bus.stats.duplicates_dropped == 1
    finally:
        await revived.close()
        await consumer_bus.close()


@pytest.mark.parametrize("broker", ["up", "down"])
async def test_oversized_event_refused_at_publish_and_what_follows_is_sent(
    stopped_nats_server: NatsServer, tmp_path: Path, broker: str
) -> None:
    """A message the broker can never take (headers and payload above its max_payload, 1 MiB by
    default) is refused by publish, whether the broker is reachable or not. Accepted, it was
    retried for ever at the head of the outbox (or the send queue), and nothing after it was
    sent."""
    srv = stopped_nats_server
    if broker == "up":
        srv.start()
    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(site, srv.url, tmp_path / "outbox")
    await bus.start()
    too_big = b"x" * (1024 * 1024)  # the payload alone is the limit; its headers go over it
    try:
        assert bus.connected == (broker == "up")
        with pytest.raises(ValueError, match="max_payload"):
            await bus.publish(s.audit, too_big, event_id="big-audit")
        with pytest.raises(ValueError, match="max_payload"):
            await bus.publish(s.status("C1"), too_big)
        with pytest.raises(ValueError, match="max_payload"):
            await bus.publish_many(
                [(s.setpoint("C1"), b"16A", "d1/C1"), (s.setpoint("C2"), too_big, "d1/C2")]
            )
        assert bus.outbox.pending == 0 and bus.stats.published == 0, "nothing may be accepted"
        # Just under the limit is taken, and so is everything after it.
        await bus.publish(s.audit, b"y" * (1024 * 1024 - 200), event_id="fits")
        await bus.publish(s.audit, b"after", event_id="after")
        await bus.publish(s.status("C1"), b"status after", event_id="status-after")
        if broker == "down":
            srv.start()
        assert await bus.flush(timeout_s=30), "an event stayed stuck in the outbox or send queue"
        assert bus.outbox.pending == 0
        info = await bus._js.stream_info(bus.streams[0].name)
        assert info.state.messages == 3
    finally:
        await bus.close()


async def test_an_event_the_broker_turns_out_unable_to_take_is_set_aside_not_retried(
    tmp_path: Path,
) -> None:
    """Accepted while the broker was away (checked against the 1 MiB default), a 200 KB event
    is above the broker's real max_payload (64 KiB): it is set aside, kept in the outbox file,
    and the events after it are sent (before, it was retried for ever and nothing after it left).
    The figure learnt is kept: on the next start without the broker, such an event is refused."""
    srv = NatsServer(tmp_path / "js", max_payload=64 * 1024)
    site = unique_site()
    s = Subjects(site)
    outbox = tmp_path / "outbox"
    try:
        bus = make_nats_bus(site, srv.url, outbox)
        await bus.start()
        try:
            assert not bus.connected
            await bus.publish(s.audit, b"before", event_id="before")
            await bus.publish(s.audit, b"z" * 200_000, event_id="big")
            await bus.publish(s.audit, b"after", event_id="after")
            assert bus.outbox.pending == 3
            srv.start()
            assert await bus.flush(timeout_s=30), "an event stayed stuck in the outbox"
            info = await bus._js.stream_info(bus.streams[0].name)
            assert info.state.messages == 2
            aside = await bus.outbox.set_aside_entries()
            assert [(e.event_id, len(e.payload)) for e, _ in aside] == [("big", 200_000)]
            assert "max_payload of 65536" in aside[0][1]
            assert bus.stats.set_aside == 1 and bus.outbox.pending == 0
        finally:
            await bus.close()
        srv.kill()
        again = make_nats_bus(site, srv.url, outbox)
        await again.start()
        try:
            assert not again.connected
            with pytest.raises(ValueError, match="max_payload of 65536"):
                await again.publish(s.audit, b"z" * 200_000, event_id="big-2")
        finally:
            await again.close()
    finally:
        srv.kill()


async def test_broker_unreachable_control_path_keeps_going_telemetry_sampled(
    stopped_nats_server: NatsServer, tmp_path: Path
) -> None:
    srv = stopped_nats_server
    site = unique_site()
    bus = make_nats_bus(site, srv.url, tmp_path / "outbox")
    await bus.start()  # returns although no broker answers
    s = Subjects(site)
    try:
        assert not bus.connected
        chargers = ["C1", "C2", "C3", "C4"]
        for k in range(50):
            for c in chargers:
                await bus.publish(s.telemetry(c), meter_pb2.MeterSample(charger_id=c, power_w=k))
        await bus.publish(s.audit, audit_pb2.AuditRecord(seq=7), event_id="audit-7")
        assert bus.stats.telemetry_dropped == 4 * 49, "all but the latest sample per charger"
        assert bus.outbox.pending == 1
        with pytest.raises(BusUnavailable):
            await bus.request(s.rpc("edge.state"), b"", timeout_s=0.5)

        latest: dict[str, float] = {}

        async def on_sample(m: BusMessage) -> None:
            smp = meter_pb2.MeterSample.FromString(m.data)
            latest[smp.charger_id] = smp.power_w

        await bus.subscribe(s.telemetry(), on_sample)  # attached once the broker is up
        srv.start()
        await wait_until(lambda: len(latest) == 4, timeout_s=20, what="latest samples")
        assert latest == {c: 49.0 for c in chargers}
        assert await bus.flush(timeout_s=10)
        assert bus.outbox.pending == 0
    finally:
        await bus.close()


async def test_closing_a_bus_whose_broker_is_down_returns(tmp_path: Path) -> None:
    """Found while testing the outbox reports (2027-01): ``close()`` of a bus whose broker was
    down now and then never returned (the suite's 120 s timeout). nats-py tries each connection
    under ``asyncio.wait_for``, which before Python 3.12 swallows a cancellation arriving as a
    refused attempt completes: the connect task tried the next server and ``close()`` waited
    for it. With no wait between attempts, 1 close in 2 hung; each close is cancelled again until
    the task ends."""
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens: every attempt is refused at once
    for i in range(20):
        bus = make_nats_bus(
            unique_site(), url, tmp_path / "outbox", connect_timeout_s=0.05, reconnect_wait_s=0.0
        )
        await bus.start()
        assert not bus.connected
        await asyncio.sleep(0.005 * (i % 4))
        try:
            await asyncio.wait_for(asyncio.shield(bus.close()), 5)
        except TimeoutError:
            pytest.fail(f"close() of bus {i} did not return within 5 s")


async def test_stopping_a_consumer_whose_broker_never_came_up_returns_at_once(
    tmp_path: Path,
) -> None:
    """A consumer that never attached holds no message: its stop returns at once. It waited for
    the consume task 1 s + 2 s (room for a pull in flight to be handed back) and then cancelled
    it: an edge whose broker never came up took 3 s to stop, for its grid consumer alone."""
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens
    bus = make_nats_bus(unique_site(), url, tmp_path / "outbox", connect_timeout_s=0.05)
    await bus.start()
    try:
        assert not bus.connected

        async def handler(m: BusMessage) -> None:
            return None

        consumer = await bus.consume(Subjects(bus.site_id).grid, durable="grid", handler=handler)
        await asyncio.sleep(0.05)  # the consume task is waiting for the broker
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(consumer.stop(), 5)
        took = loop.time() - t0
        assert took < 0.5, f"stop() of a consumer with nothing in hand took {took:.2f} s"
    finally:
        t0 = asyncio.get_running_loop().time()
        await bus.close()
    assert asyncio.get_running_loop().time() - t0 < 1.0, "close() of the bus dawdled"


async def test_a_failing_handler_backs_off_warns_and_the_rest_follows_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review 2026-12-05: a handler that kept failing on one message (not BadPayload) was
    called every 0.2 s for ever with nothing said. Now each try waits twice as long (to 30 s),
    a WARNING names the message and that the rest waits, and once the handler takes it the
    messages behind follow in order."""
    site = unique_site()
    bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox")
    await bus.start()
    s = Subjects(site)
    seen: list[bytes] = []
    calls: list[bytes] = []
    broken = True

    async def handler(m: BusMessage) -> None:
        calls.append(m.data)
        if m.data == b"stuck" and broken:
            raise RuntimeError("the store is away")
        seen.append(m.data)

    try:
        await bus.consume(s.grid, durable="edge-grid", handler=handler)
        for i, p in enumerate([b"1", b"stuck", b"3"]):
            await bus.publish(s.grid, p, event_id=f"m{i}", critical=True)
        await wait_until(lambda: seen == [b"1"] and b"stuck" in calls, 20, "the stuck message")
        # A message that arrives while the consumer holds must not overtake the held ones.
        await bus.publish(s.grid, b"4", event_id="m3", critical=True)
        await asyncio.sleep(3.0)
        tries = calls.count(b"stuck")
        assert 2 <= tries <= 6, tries  # 0.2, 0.4, 0.8, 1.6 s apart (before: every 0.2 s, ~15)
        assert any("m1" in r.getMessage() and "wait" in r.getMessage() for r in caplog.records)
        broken = False
        await wait_until(lambda: len(seen) == 4, 40, "the rest")
        assert seen == [b"1", b"stuck", b"3", b"4"]
    finally:
        await bus.delete_streams()
        await bus.close()


async def test_a_subject_longer_than_the_broker_reads_is_refused_and_an_old_one_set_aside(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """nats-server reads a protocol line of at most 4096 bytes (max_control_line) and closes the
    connection over a longer one. A charger id escaped past that (5,000 characters here; a
    non-ASCII id takes 9 characters a character) was accepted: the pump's publish cut the
    connection, it reconnected, published again, and the critical events behind it stayed in
    the outbox for ever (before: flush False, 2 pending, the connection dropped each try; on a
    connection shared by a cloud's sites, every site's). A publish or subscribe on such a
    subject is refused naming its length, and one an earlier version accepted into the outbox is
    set aside, the events after it sent."""
    site = unique_site()
    s = Subjects(site)
    long_subject = s.setpoint("C" * 5000)
    outbox_dir = tmp_path / "outbox"
    earlier = Outbox(outbox_dir / f"{escape_token(site)}.sqlite")
    await earlier.open()
    await earlier.append(s.setpoint("C1"), "before", b"16A", 0.0)
    await earlier.append(long_subject, "long", b"16A", 0.0)
    await earlier.append(s.setpoint("C2"), "after", b"16A", 0.0)
    await earlier.close()
    bus = make_nats_bus(site, nats_server.url, outbox_dir)
    await bus.start()
    try:
        assert await bus.flush(timeout_s=10), "the events after the long subject stayed stuck"
        info = await bus._js.stream_info(bus.streams[0].name)
        assert info.state.messages == 2
        aside = await bus.outbox.set_aside_entries()
        assert [e.event_id for e, _ in aside] == ["long"]
        assert f"subject of {len(long_subject)} bytes" in aside[0][1], aside[0][1]
        with pytest.raises(ValueError, match=f"subject of {len(long_subject)} bytes"):
            await bus.publish(long_subject, b"16A", event_id="long-2")
        with pytest.raises(ValueError, match="bytes"):
            await bus.subscribe(s.root + ".status." + "C" * 5000, lambda m: asyncio.sleep(0))
        assert bus.connected
    finally:
        await bus.delete_streams()
        await bus.close()


async def test_closing_with_events_unsent_says_what_it_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Normal events (grid signals, plans, status) and telemetry wait in memory while the broker
    is away; ``close()`` dropped them without a word or a count (before: no log line, stats
    queue_dropped 0 and telemetry_dropped 0 after closing with 3 events and 2 samples unsent).
    They are counted as dropped and logged at WARNING with the critical events that wait in
    the outbox for the next start."""
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens
    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(site, url, tmp_path / "outbox", connect_timeout_s=0.05)
    await bus.start()
    assert not bus.connected
    for i in range(3):
        await bus.publish(s.grid, b"signal", event_id=f"g{i}")
    await bus.publish(s.telemetry("C1"), b"sample")
    await bus.publish(s.telemetry("C2"), b"sample")
    await bus.publish(s.audit, b"record", event_id="a1")
    caplog.set_level(logging.WARNING, logger="evcore.bus")
    await bus.close()
    assert bus.stats.queue_dropped == 3 and bus.stats.telemetry_dropped == 2
    lines = [r.getMessage() for r in caplog.records if "closing" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "3 event(s)" in lines[0] and "2 telemetry sample(s)" in lines[0], lines[0]
    assert "1 critical event(s) wait in the outbox" in lines[0], lines[0]


async def test_a_normal_event_the_broker_turns_out_unable_to_take_does_not_hold_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted while no broker had answered (checked against nats-server's 1 MiB default), a
    200 KB plan is above the broker's real max_payload (64 KiB). The sender's window failed at
    it (nats-py's MaxPayloadError), put it back at the head of the queue and tried again for
    ever: the grid signal and status behind it were never sent (before: 0 of them received in
    10 s, send_failures climbing). It is dropped, counted in queue_dropped and logged naming
    it; what follows is sent. (A critical event is set aside instead: the outbox's
    test above.)"""
    srv = NatsServer(tmp_path / "js", max_payload=64 * 1024)
    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(site, srv.url, tmp_path / "outbox")
    try:
        await bus.start()
        assert not bus.connected
        await bus.publish(s.plan, b"p" * 200_000, event_id="big-plan")
        await bus.publish(s.grid, b"curtail", event_id="grid-1")
        await bus.publish(s.telemetry("C1"), b"sample", event_id="t-1")
        await bus.publish(s.status("C1"), b"ok", event_id="status-1")
        caplog.set_level(logging.ERROR, logger="evcore.bus")
        srv.start()
        await wait_until(lambda: bus.connected, 10, "the bus connected")
        assert await bus.flush(timeout_s=10), "events stayed stuck behind the large one"
        info = await bus._js.stream_info(bus.streams[0].name)
        assert info.state.messages == 2  # grid-1 and status-1; the plan never
        assert bus.stats.queue_dropped == 1
        assert "big-plan" in caplog.text and "max_payload of 65536" in caplog.text, caplog.text
    finally:
        await bus.close()
        srv.kill()


async def test_a_queue_group_nats_refuses_is_refused_at_subscribe_naming_it(
    stopped_nats_server: NatsServer, tmp_path: Path
) -> None:
    """A queue group name with a space was taken while the broker was away; at the connection
    nats-py refused it (BadSubjectError(), naming nothing) inside the bus's connect task, which
    ended there: the well-formed subscriptions after it were never attached (before: 0 of the
    2 messages received, connect task ended with BadSubjectError). Connected, the error named
    nothing either. ``subscribe`` now refuses it with a ValueError naming the group."""
    srv = stopped_nats_server
    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(site, srv.url, tmp_path / "outbox", connect_timeout_s=0.05)
    await bus.start()
    got: list[str] = []

    async def on_msg(m: BusMessage) -> None:
        got.append(m.subject)

    try:
        with pytest.raises(ValueError, match="queue group 'my workers'"):
            await bus.subscribe(s.grid, on_msg, queue="my workers")
        await bus.subscribe(s.status(), on_msg)
        await bus.subscribe(s.grid, on_msg, queue="workers")
        srv.start()
        await wait_until(lambda: bus.connected, 10, "the bus connected")
        await bus.publish(s.status("C1"), b"ok")
        await bus.publish(s.grid, b"curtail")
        await wait_until(lambda: len(got) == 2, 10, "both messages")
        with pytest.raises(ValueError, match="queue group 'a\\\\tb'"):
            await bus.subscribe(s.grid, on_msg, queue="a\tb")
    finally:
        await bus.close()
