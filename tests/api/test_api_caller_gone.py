"""A steering call whose caller gives up half way, over a real socket (review of the API room,
2026-12-06). A lever may await (the edge stores the curtailment book before it answers). When the
caller's deadline passed, or it cancelled, gRPC cancelled the handler and with it the lever, half
done: the curtailment was in force in memory but never stored, so a restart lost it (and a lever
cut between its steps could leave anything). Now a lever, once called, runs to its end; the caller
just does not hear the answer, and the log says what happened."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1.grid_pb2 import Curtailment, GridSignal
from test_api_edge import GRID, Edge, auth, edge  # noqa: F401  (the fixture)


@pytest.mark.parametrize("gives_up", ["deadline", "cancel"])
async def test_a_lever_runs_to_its_end_when_the_caller_gives_up(
    edge: Edge,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
    gives_up: str,
) -> None:
    stored: list[str] = []
    in_force, release = asyncio.Event(), asyncio.Event()
    plain = edge.facade.post_curtailment

    async def post_curtailment(
        signal_id: str, node_id: str, max_kw: float, start: float, end: float
    ) -> None:
        plain(signal_id, node_id, max_kw, start, end)  # in force
        in_force.set()
        await release.wait()  # the store takes its time: until the caller has gone
        stored.append(signal_id)

    edge.facade.post_curtailment = post_curtailment  # type: ignore[method-assign,assignment]
    now = int(edge.clock.now())
    sig = GridSignal(signal_id="c1", curtailment=Curtailment(node_id="GRID", max_kw=10.0))
    sig.curtailment.start.FromSeconds(now)
    sig.curtailment.end.FromSeconds(now + 3600)
    request = pb.PostGridSignalRequest(signal=sig)
    with caplog.at_level(logging.INFO, logger="evcore.api"):
        if gives_up == "deadline":
            # (Long enough for the handler to reach the lever on a loaded machine: with 0.2 s
            # the deadline sometimes passed before, and then no lever runs at all, rightly.)
            call = edge.stub.PostGridSignal(request, metadata=auth(GRID), timeout=2.0)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert in_force.is_set()
        else:
            call = edge.stub.PostGridSignal(request, metadata=auth(GRID))
            await asyncio.wait_for(in_force.wait(), 10)
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED
        assert "c1" in edge.facade.curtailments
        await asyncio.sleep(0.2)  # the handler has heard of it
        release.set()
        for _ in range(100):
            if stored:
                break
            await asyncio.sleep(0.02)
    assert stored == ["c1"]  # before: [] (cancelled between applying and storing)
    assert "caller left" in caplog.text
