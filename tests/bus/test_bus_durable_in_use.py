"""One durable consumer, one consumer at a time, on both buses.

The in-process bus refused a second ``consume`` of a durable already being consumed; on NATS a
second process (a second ``evcore edge`` started with one site file, on this host or another)
bound to the same pull durable (``edge-grid``), and JetStream shared the messages between the
two: each edge applied only part of the site's grid signals, out of order across the two. Now a
durable another process is pulling is refused at ``consume`` naming it, and a consumer that can
only attach later (the broker away at ``consume``) waits, logging why, until the durable is free:
a standby that takes over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from bus_testkit import SHARED_NATS, free_port, make_nats_bus, unique_site, wait_until
from evcore.bus import BusMessage, Subjects
from evcore.bus.natsbus import DurableInUse

Handler = Callable[[BusMessage], Awaitable[None]]


def _site() -> tuple[str, Subjects]:
    """A site of its own and its subjects."""
    site = unique_site()
    return site, Subjects(site)


def _recorder() -> tuple[list[str], Handler]:
    """A handler and the event ids it was given, in order."""
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.event_id)

    return got, handler


async def test_a_durable_another_process_consumes_is_refused_and_free_once_it_stops(
    tmp_path: Path,
) -> None:
    site, s = _site()
    first_got, first_handler = _recorder()
    second_got, second_handler = _recorder()

    # Two edges of one site: two processes' buses, each with its own outbox.
    first = make_nats_bus(site, SHARED_NATS, tmp_path / "first")
    second = make_nats_bus(site, SHARED_NATS, tmp_path / "second")
    await first.start()
    await second.start()
    try:
        assert first.connected and second.connected, f"no nats-server at {SHARED_NATS}"
        taking = await first.consume(s.grid, durable="edge-grid", handler=first_handler)
        await first.publish(s.grid, b"g", event_id="g1")
        await wait_until(lambda: first_got == ["g1"], 10, "the first edge's grid signal")
        with pytest.raises(ValueError) as refused:
            await second.consume(s.grid, durable="edge-grid", handler=second_handler)
        assert isinstance(refused.value, DurableInUse)
        assert "'edge-grid'" in str(refused.value) and "another consumer" in str(refused.value)
        # Nothing was split off to the refused one.
        for i in range(2, 12):
            await first.publish(s.grid, b"g", event_id=f"g{i}")
        await wait_until(lambda: len(first_got) == 11, 10, "the first edge's signals")
        assert first_got == [f"g{i}" for i in range(1, 12)] and second_got == []
        # The first stops: the durable is free, and the next consumer goes on from its place.
        await taking.stop()
        await second.consume(s.grid, durable="edge-grid", handler=second_handler)
        await first.publish(s.grid, b"g", event_id="g12")
        await wait_until(lambda: second_got == ["g12"], 10, "the second edge's signal")
    finally:
        await first.delete_streams()
        await first.close()
        await second.close()


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _proxy_to(port: int, target: str) -> AsyncIterator[asyncio.Server]:
    """A TCP port forwarding to ``target`` (host:port): a broker that appears when it opens."""
    host, target_port = target.rsplit(":", 1)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(_forward(reader, up_writer), _forward(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield server
    finally:
        server.close()


async def test_a_consumer_attaching_later_to_a_durable_in_use_waits_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``consume`` while the broker is away returns at once; the consumer attaches when the
    broker is there. Another process pulling the durable by then: logged at ERROR naming it,
    nothing taken, and it takes over once the other stops (a standby)."""
    site, s = _site()
    first_got, first_handler = _recorder()
    second_got, second_handler = _recorder()

    first = make_nats_bus(site, SHARED_NATS, tmp_path / "first")
    port = free_port()
    second = make_nats_bus(
        site, f"nats://127.0.0.1:{port}", tmp_path / "second", connect_timeout_s=0.2
    )
    await first.start()
    await second.start()
    try:
        assert first.connected and not second.connected
        taking = await first.consume(s.grid, durable="edge-grid", handler=first_handler)
        await first.publish(s.grid, b"g", event_id="g1")
        await wait_until(lambda: first_got == ["g1"], 10, "the holder's signal")
        await second.consume(s.grid, durable="edge-grid", handler=second_handler)
        with caplog.at_level(logging.ERROR, logger="evcore.bus.nats"):
            async with _proxy_to(port, SHARED_NATS.removeprefix("nats://")):
                await wait_until(
                    lambda: any("another consumer" in r.getMessage() for r in caplog.records),
                    10,
                    "the standby's error",
                )
                assert second.connected
                await first.publish(s.grid, b"g", event_id="g2")
                await wait_until(lambda: first_got == ["g1", "g2"], 10, "the holder's signal")
                assert second_got == []
                await taking.stop()
                await first.publish(s.grid, b"g", event_id="g3")
                await wait_until(lambda: second_got == ["g3"], 15, "the standby taking over")
    finally:
        await first.delete_streams()
        await first.close()
        await second.close()
