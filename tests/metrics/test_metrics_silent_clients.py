"""Silent connections and the connection bound, over real sockets (review of the metrics room,
2026-12-06). Before, ``max_connections`` (16) connections that sent nothing (a port scanner, a
TCP health check that keeps its connection, anyone on the network: no token is needed to connect)
held every slot until their 408, and Prometheus' scrapes meanwhile were closed unanswered; opened
again every few seconds they kept the site out of monitoring. Now a new connection, when every
slot is taken, makes room by closing the oldest one that has not sent its request head yet; only
when every slot is answering a request is the new one closed at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from evcore.metrics import MetricFamily, MetricsServer, Registry
from metrics_testkit import scrape

pytestmark = pytest.mark.timeout(60)


def _registry(build_s: float = 0.0) -> Registry:
    reg = Registry()

    def collect() -> Iterator[MetricFamily]:
        def build() -> Iterator[MetricFamily]:
            time.sleep(build_s)  # in the worker thread, as the edge's families are built
            yield MetricFamily("evcore_up", "gauge", "Up.").add(1)

        return build()

    reg.register(collect)
    return reg


async def test_silent_connections_do_not_lock_prometheus_out() -> None:
    server = MetricsServer(_registry(), "127.0.0.1", 0, read_timeout_s=5.0, max_connections=2)
    port = await server.start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        # Before: closed unanswered (both slots held until the silent ones' 408, 5 s later).
        assert (await scrape(port)).value("evcore_up") == 1
        assert time.monotonic() - started < 2.0
        # The oldest silent one made room: closed without an answer.
        assert await asyncio.wait_for(held[0][0].read(), 5) == b""
        # Room again for the next scrape, and the next.
        for _ in range(3):
            assert (await scrape(port)).value("evcore_up") == 1
        for _, w in held:
            w.close()
    finally:
        await server.stop()


async def test_when_every_slot_is_answering_a_new_connection_is_closed() -> None:
    server = MetricsServer(_registry(1.0), "127.0.0.1", 0, read_timeout_s=5.0, max_connections=2)
    port = await server.start()
    try:
        busy = [asyncio.create_task(scrape(port)) for _ in range(2)]
        await asyncio.sleep(0.3)  # both past their request head, building the families
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        try:  # closed without an answer (reset: the request was not read)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        for b in busy:  # the two in progress were not disturbed
            assert (await b).value("evcore_up") == 1
        assert (await scrape(port)).value("evcore_up") == 1
    finally:
        await server.stop()
