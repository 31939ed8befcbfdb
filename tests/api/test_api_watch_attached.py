"""A watch tells its caller when it is attached, over a real socket against a real edge controller.

Reading the state and then following the changes needs to know when the watch is in place: a
change the edge makes before then reaches nobody. The API now sends the stream's headers (its
initial metadata, ``evcore-watch: attached``) once the watch is subscribed to the edge's changes;
a client awaits them, reads the snapshot, and misses nothing in between. Before, the headers came
with the first change, so on a quiet site a client had no way to know (the API's own tests polled
the facade's private subscriber set).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from edge_testkit import settle
from evcore.v1 import edge_api_pb2 as pb
from test_api_edge import VIEWER, Edge, auth, edge  # noqa: F401  (the fixture)
from test_api_session_steering import MD, steered


async def test_a_watch_says_it_is_attached_and_then_misses_no_change() -> None:
    async with steered() as s:
        watch = s.stub.WatchChanges(pb.WatchChangesRequest(charger_id=s.b), metadata=MD)
        # The site is quiet (both sessions settled at 16 A): only the attachment says anything.
        headers = await asyncio.wait_for(watch.initial_metadata(), 5)
        assert ("evcore-watch", "attached") in tuple(headers), headers
        # The snapshot, then a change of the edge's right after it: the watch has it.
        (before,) = (
            await s.stub.ListSetpoints(pb.ListSetpointsRequest(charger_id=s.b), metadata=MD)
        ).setpoints
        assert before.setpoint_a == 16.0
        s.ctrl.set_session(s.b, available=False)  # as a local operator would, not via the API
        await settle(s.ctrl, s.clock, 4)
        change = await asyncio.wait_for(watch.read(), 5)
        while change.kind != "setpoint":
            change = await asyncio.wait_for(watch.read(), 5)
        assert change.charger_id == s.b and change.setpoint_a == 0.0, change
        watch.cancel()


async def test_a_watch_cancelled_at_once_ends_quietly(
    edge: Edge,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Callers that cancel their watch before it is attached (a dashboard closed at once): the
    headers cannot be sent any more. The first version of the attachment logged that as a failed
    WatchChanges with a traceback (1 of 60 such watches in its first run)."""
    with caplog.at_level(logging.INFO, logger="evcore.api"):
        for i in range(120):
            watch = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
            if i % 3:
                await asyncio.sleep(0.001 * (i % 5))
            watch.cancel()
        for _ in range(200):
            if not edge.server.service._watchers:
                break
            await asyncio.sleep(0.02)
    assert not edge.server.service._watchers and not edge.server.service._watches_of
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
