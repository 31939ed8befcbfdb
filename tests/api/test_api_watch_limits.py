"""How many change streams one caller may hold open, over a real socket (review of the API room,
2026-12-06). Every watch holds a queue of up to 1000 changes in the API and a subscription to the
edge's change feed, which the control loop fills on every change. Before, there was no bound: a
dashboard that reconnects without cancelling its old stream (a common client bug) piled up watches
without end, each costing memory and loop time. Now a caller holds at most
``MAX_WATCHES_PER_CALLER`` at a time (RESOURCE_EXHAUSTED beyond, naming the bound), and the
server ``MAX_WATCHES``; other callers keep watching."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from evcore.v1 import edge_api_pb2 as pb
from test_api_edge import OPERATOR, VIEWER, Edge, auth, edge  # noqa: F401  (the fixture)

PER_CALLER = 16


async def _subscribed(api: Edge, n: int) -> None:
    for _ in range(500):
        if len(api.facade._watchers) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(api.facade._watchers)} watches subscribed, not {n}")


async def test_one_caller_cannot_pile_up_watches(edge: Edge) -> None:  # noqa: F811
    watches = [
        edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
        for _ in range(PER_CALLER)
    ]
    await _subscribed(edge, PER_CALLER)
    extra = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(extra.read(), 5)  # before: a 17th watch, and on without end
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(PER_CALLER) in (err.value.details() or "")
    assert len(edge.facade._watchers) == PER_CALLER
    # Another caller still watches.
    other = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(OPERATOR))
    await _subscribed(edge, PER_CALLER + 1)
    # A watch closed frees its place.
    watches[0].cancel()
    for _ in range(500):
        if len(edge.facade._watchers) == PER_CALLER:
            break
        await asyncio.sleep(0.01)
    again = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
    await _subscribed(edge, PER_CALLER + 1)
    for w in (*watches[1:], other, again):
        w.cancel()
