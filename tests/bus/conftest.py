"""Fixtures for the bus suite: a bus of each kind against the real nats-server, and private
nats-server processes (own port, own store dir) that tests may kill and restart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bus_testkit import NatsServer, started_bus
from evcore.bus import Bus


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats-store")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def stopped_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server that is not running yet (the test starts it)."""
    srv = NatsServer(tmp_path / "nats-store")
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(params=["inprocess", "nats"])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bus]:
    """The same contract, both implementations; the NATS one on the shared server."""
    async with started_bus(request.param, tmp_path / "outbox") as b:
        yield b
