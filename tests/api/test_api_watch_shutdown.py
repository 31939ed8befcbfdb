"""Stopping the edge API with change streams open, over a real socket (review of the API room,
2026-12-06): before, ``stop(grace_s)`` with a ``WatchChanges`` open waited the whole grace (a watch
never ends by itself), then cancelled it with gRPC's bare "Cancelling all calls"; every restart of
an edge with a dashboard watching took ``grace_s`` longer."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from evcore.v1 import edge_api_pb2 as pb
from test_api_edge import VIEWER, Edge, auth, edge  # noqa: F401  (the fixture)


async def test_stop_ends_open_watches_at_once_with_unavailable(edge: Edge) -> None:  # noqa: F811
    watch = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
    for _ in range(200):
        if edge.facade._watchers:
            break
        await asyncio.sleep(0.01)
    assert edge.facade._watchers
    started = time.monotonic()
    await edge.server.stop(5.0)
    took = time.monotonic() - started
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(watch.read(), 5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (err.value.details() or ""), err.value.details()
    assert took < 2.0, f"stop took {took:.2f} s with one watch open"
    assert not edge.facade._watchers  # the feed was let go
