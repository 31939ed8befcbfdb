"""The NATS bus creates its site's streams with retention and limits, and updates them when the
configuration changes; read back with a plain nats-py client, not through the bus."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import nats
import nats.js.errors
import pytest
from bus_testkit import SHARED_NATS, make_nats_bus, unique_site
from evcore.bus import BusMessage, Subjects
from evcore.bus.subjects import escape_token
from nats.js import api as jsapi


async def test_streams_created_with_limits_and_updated(tmp_path: Path) -> None:
    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(
        site,
        SHARED_NATS,
        tmp_path / "outbox",
        events_max_age_s=3600.0,
        telemetry_max_age_s=600.0,
        telemetry_max_bytes=1 << 20,
        duplicate_window_s=90.0,
    )
    await bus.start()
    assert bus.connected, f"shared nats-server at {SHARED_NATS} unreachable"
    nc = await nats.connect(SHARED_NATS)
    js = nc.jetstream()
    try:
        events_name, tele_name = (spec.name for spec in bus.streams)
        events = (await js.stream_info(events_name)).config
        tele = (await js.stream_info(tele_name)).config
        prefix = f"evcore.{escape_token(site)}."
        # Every subject of the site's streams sits under evcore.<site>. (one permission wildcard).
        assert events.subjects is not None and tele.subjects is not None
        assert all(subj.startswith(prefix) for subj in [*events.subjects, *tele.subjects])
        assert s.audit in events.subjects and s.setpoint() in events.subjects
        assert tele.subjects == [s.telemetry(), s.node_load()]
        for cfg in (events, tele):
            assert cfg.retention == jsapi.RetentionPolicy.LIMITS
            assert cfg.discard == jsapi.DiscardPolicy.OLD
            assert cfg.storage == jsapi.StorageType.FILE
        assert events.max_age == 3600.0 and events.duplicate_window == 90.0
        assert tele.max_age == 600.0 and tele.max_bytes == 1 << 20
        assert tele.duplicate_window == 30.0, "telemetry keeps a shorter window"
        await bus.close()

        # A restarted edge with new limits updates the streams in place (no data loss).
        bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox", events_max_age_s=7200.0)
        await bus.start()
        await bus.publish(s.audit, b"kept", event_id="a-1")
        assert await bus.flush(timeout_s=10)
        await bus.close()
        bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox", events_max_age_s=1800.0)
        await bus.start()
        info = await js.stream_info(events_name)
        assert info.config.max_age == 1800.0
        assert info.state.messages == 1, "updating the stream must keep what it stored"
    finally:
        await bus.close()
        for spec in bus.streams:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(spec.name)
        await nc.close()


async def test_a_stream_the_server_cannot_hold_is_named_with_what_to_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """JetStream reserves each stream's max_bytes out of its storage: a site whose telemetry cap
    the server cannot hold (here 100 TB) is refused with err_code 10047. Before, the log said only
    ``creating streams failed: ServerError()`` (nats-py's empty repr): 130 streams left by tests
    once filled the shared server that way and nothing said why."""
    site = unique_site()
    bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox", telemetry_max_bytes=10**14)
    caplog.set_level(logging.WARNING, logger="evcore.bus")
    await bus.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10.0
        while "creating streams failed" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, caplog.text
            await asyncio.sleep(0.05)
    finally:
        await bus.delete_streams()  # the EVENTS stream was created before TELEMETRY failed
        await bus.close()
    line = next(r.getMessage() for r in caplog.records if "creating streams" in r.getMessage())
    assert "_TELEMETRY: insufficient storage resources available (err_code 10047)" in line, line
    assert "100000000000000 bytes" in line and "telemetry_max_bytes" in line, line
    assert "ServerError()" not in line


async def test_a_refused_telemetry_stream_leaves_the_rest_of_the_bus_working(
    tmp_path: Path,
) -> None:
    """Review 2026-12-05 (HIGH): a broker whose JetStream storage cannot reserve the TELEMETRY
    stream (docs/bus.md Sizing, a normal state on a full broker) kept the whole bus not ready:
    no audit record left the outbox and no grid signal came in, although the EVENTS stream was
    there. Now the bus works with the streams it has and keeps trying for the missing one."""
    from bus_testkit import NatsServer, make_nats_bus, wait_until
    from evcore.bus import Subjects

    server = NatsServer(tmp_path / "js", max_file_store="100MB")
    server.start()
    site = "tele-refused"
    bus = make_nats_bus(site, server.url, tmp_path / "outbox")
    got: list[str] = []

    async def on_grid(msg: BusMessage) -> None:
        got.append(msg.event_id)

    try:
        await bus.start()
        await wait_until(lambda: bus.connected, 10, "the bus ready")
        s = Subjects(site)
        await bus.subscribe(s.grid, on_grid)
        for i in range(3):
            await bus.publish(s.audit, b"r", event_id=f"a{i}", critical=True)
        await bus.publish(s.grid, b"g", event_id="g1")
        await wait_until(lambda: bus.stats.outbox_pending == 0, 10, "the outbox drained")
        await wait_until(lambda: got == ["g1"], 10, "the live grid message")
        names = {spec.name for spec in bus.streams}
        assert f"EVCORE_{site}_EVENTS" in names
    finally:
        await bus.close()
        server.kill()


async def test_a_retention_shorter_than_the_duplicate_window_still_gets_its_streams(
    tmp_path: Path,
) -> None:
    """JetStream refuses a stream whose duplicate window is longer than its max_age (err_code
    10052). The bus gave TELEMETRY a window of min(duplicate_window_s, 30 s) and EVENTS
    duplicate_window_s (120 s by default), so ``telemetry_max_age_s = 20`` left the site without a
    TELEMETRY stream and ``events_max_age_s = 60`` without an EVENTS stream: every audit record
    waited in the outbox for ever, and the log named err_code 10052, not the [bus] keys. Each
    stream's window is now at most its max_age."""
    from bus_testkit import wait_until

    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(
        site, SHARED_NATS, tmp_path / "outbox", events_max_age_s=60.0, telemetry_max_age_s=20.0
    )
    await bus.start()
    nc = await nats.connect(SHARED_NATS)
    js = nc.jetstream()
    try:
        await wait_until(lambda: bus.connected, 5, "the bus ready")
        await bus.publish(s.audit, b"record", event_id="a-1")
        await bus.publish(s.telemetry("C1"), b"sample", event_id="t-1")
        await wait_until(lambda: bus.stats.sent == 2, 5, "the audit record and sample sent")
        events_name, tele_name = (spec.name for spec in bus.streams)
        events = await js.stream_info(events_name)
        tele = await js.stream_info(tele_name)
        assert events.state.messages == 1 and tele.state.messages == 1
        assert events.config.duplicate_window == 60.0
        assert tele.config.duplicate_window == 20.0
    finally:
        await bus.delete_streams()
        await bus.close()
        await nc.close()


async def test_streams_deleted_are_not_created_again_by_the_background_retry(
    tmp_path: Path,
) -> None:
    """``delete_streams()`` (decommissioning, a test's clean-up) promises the bus never creates
    the site's streams again. While one stream was refused (TELEMETRY on a broker short of
    storage), the background retry went on after it and created the EVENTS stream again
    (before: EVENTS back within 1 s of its deletion; such leftovers on the shared test server
    reserve storage until nothing more fits)."""
    from bus_testkit import NatsServer, wait_until

    server = NatsServer(tmp_path / "js", max_file_store="100MB")
    server.start()
    site = "deleted-stays-deleted"
    bus = make_nats_bus(site, server.url, tmp_path / "outbox")
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    try:
        await bus.start()
        await wait_until(lambda: bus.connected, 10, "the bus ready")
        events = bus.streams[0].name
        await js.stream_info(events)  # made; TELEMETRY (1 GiB) refused and retried
        await bus.delete_streams()
        await asyncio.sleep(1.0)  # ten tries of the background retry (reconnect_wait_s 0.1)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(events)
    finally:
        await bus.close()
        await nc.close()
        server.kill()


async def test_a_durable_made_by_an_earlier_version_takes_the_current_ack_settings(
    tmp_path: Path,
) -> None:
    """nats-py's pull_subscribe binds to an existing durable as it is. A durable created before
    db4b66e kept max_ack_pending 1024 (that commit lowered it to 64 so that a batch lost in a
    stream leader's failover is redelivered before later messages overtake it) and whatever
    ack_wait it had: the fix never reached the consumers already there (before: 1024 and 5 s
    after consume). The bus now brings the durable's ack settings to its own."""
    from bus_testkit import wait_until

    site = unique_site()
    s = Subjects(site)
    bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox", ack_wait_s=30.0)
    await bus.start()
    nc = await nats.connect(SHARED_NATS)
    js = nc.jetstream()
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.event_id)

    try:
        await wait_until(lambda: bus.connected, 5, "the bus ready")
        events = bus.streams[0].name
        old = jsapi.ConsumerConfig(
            durable_name="old-durable",
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            deliver_policy=jsapi.DeliverPolicy.ALL,
            ack_wait=5.0,
            max_ack_pending=1024,
            filter_subject=s.audit,
        )
        await js.add_consumer(events, old)
        await bus.publish(s.audit, b"r", event_id="a1")
        await bus.consume(s.audit, durable="old-durable", handler=handler)
        await wait_until(lambda: got == ["a1"], 10, "the record")
        info = await js.consumer_info(events, "old-durable")
        assert info.config.max_ack_pending == 64
        assert info.config.ack_wait == 30.0
    finally:
        await bus.delete_streams()
        await bus.close()
        await nc.close()
