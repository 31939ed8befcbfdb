"""A watcher that falls behind, over a real socket (review of the API room, 2026-12-06). The API
keeps at most 1000 changes per watch and drops the oldest when a watcher does not read (so memory
stays bounded and the control loop never waits). Before, the drop was silent: a NOC tool could not
tell a quiet site from a gap in its feed. Now the first change it reads after a gap is a
``changes_lost`` change saying how many were dropped."""

from __future__ import annotations

import asyncio

from evcore.api.server import WATCH_QUEUE
from evcore.v1 import edge_api_pb2 as pb
from test_api_edge import VIEWER, Edge, auth, edge  # noqa: F401  (the fixture)

SENT = 3 * WATCH_QUEUE


async def test_a_watcher_that_fell_behind_is_told_how_many_changes_it_lost(
    edge: Edge,  # noqa: F811
) -> None:
    watch = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
    for _ in range(200):
        if edge.facade._watchers:
            break
        await asyncio.sleep(0.01)
    (feed,) = edge.facade._watchers
    for i in range(SENT):  # 1 kB each: far more than the transport buffers for a watcher
        edge.facade.emit(
            {
                "kind": "setpoint",
                "charger_id": "C1",
                "value": 6.0,
                "detail": "x" * 1000,
                "decision": i,
            }
        )
    for _ in range(500):  # the API has taken every one from the feed
        if feed.empty():
            break
        await asyncio.sleep(0.01)
    assert feed.empty()
    received, lost = [], []
    while len(received) + sum(lost) < SENT:
        change = await asyncio.wait_for(watch.read(), 5)
        if change.kind == "changes_lost":
            lost.append(int(change.detail.split()[0]))
        else:
            received.append(int(change.decision_id))
    assert lost and sum(lost) > 0
    assert len(received) + sum(lost) == SENT  # every change either arrived or was counted lost
    assert received == sorted(received) and received[-1] == SENT - 1  # the newest kept, in order
    watch.cancel()
