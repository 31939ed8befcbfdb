"""What the edge API refuses before it reaches the facade, over a real socket (review of the API
room, 2026-12-06):

- an id or a reason of 100 kB: before, an unknown charger id that long came back as
  RESOURCE_EXHAUSTED (its NOT_FOUND message, quoting the id, was larger than the client takes in
  trailers) and a 100 kB reason was applied, logged and echoed to every watcher;
- a price interval without a start (read as 1970-01-01) replaced the whole price book, since an
  update replaces every point from its first; two intervals at one start kept one of them silently;
- a filter naming a charger the site does not have answered an empty list (or watched nothing),
  which reads as "no sessions there".
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1.grid_pb2 import Curtailment, GridSignal, PriceUpdate
from evcore.v1.tariff_pb2 import Tariff
from test_api_edge import GRID, OPERATOR, VIEWER, Edge, auth, edge  # noqa: F401  (the fixture)

HUGE = 100_000


async def _failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_an_oversized_id_or_reason_is_invalid_argument_and_changes_nothing(
    edge: Edge,  # noqa: F811
) -> None:
    md = auth(OPERATOR)
    err = await _failure(
        edge.stub.SetChargerAvailability(
            pb.SetChargerAvailabilityRequest(charger_id="X" * HUGE, available=False), metadata=md
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "charger_id" in (err.details() or "") and len(err.details() or "") < 300

    err = await _failure(
        edge.stub.SetChargerAvailability(
            pb.SetChargerAvailabilityRequest(charger_id="C1", available=False, reason="r" * HUGE),
            metadata=md,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "reason" in (err.details() or "")
    assert edge.facade.chargers["C1"]["available"] is True  # nothing applied

    err = await _failure(
        edge.stub.SetSessionPriority(
            pb.SetSessionPriorityRequest(charger_id="C1", priority=2.0, transaction_id="T" * HUGE),
            metadata=md,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err

    curtail = GridSignal(
        signal_id="s" * HUGE,
        curtailment=Curtailment(node_id="GRID", max_kw=10.0),
    )
    curtail.curtailment.start.FromSeconds(int(edge.clock.now()))
    curtail.curtailment.end.FromSeconds(int(edge.clock.now()) + 600)
    err = await _failure(
        edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=curtail), metadata=auth(GRID))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert edge.facade.curtailments == {}

    err = await _failure(
        edge.stub.ListSessions(pb.ListSessionsRequest(charger_id="X" * HUGE), metadata=auth(VIEWER))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err


def _prices(*intervals: tuple[int | None, float]) -> pb.PostGridSignalRequest:
    tariff = Tariff(tariff_id="day-ahead")
    for start, price in intervals:
        p = tariff.prices.add(duration_s=3600, price_per_kwh=price)
        if start is not None:
            p.start.FromSeconds(start)
    return pb.PostGridSignalRequest(
        signal=GridSignal(signal_id="p1", price_update=PriceUpdate(tariff=tariff))
    )


async def test_a_price_interval_without_a_start_or_a_start_given_twice_is_refused(
    edge: Edge,  # noqa: F811
) -> None:
    now = int(edge.clock.now())
    await edge.stub.PostGridSignal(_prices((now, 0.10), (now + 3600, 0.20)), metadata=auth(GRID))
    book = [(now, 0.10), (now + 3600, 0.20)]
    assert edge.facade.prices == book

    err = await _failure(
        edge.stub.PostGridSignal(_prices((now, 0.30), (None, 0.05)), metadata=auth(GRID))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "prices[1].start" in (err.details() or "")

    err = await _failure(
        edge.stub.PostGridSignal(_prices((now, 0.30), (now, 0.05)), metadata=auth(GRID))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "twice" in (err.details() or "")
    assert edge.facade.prices == book  # nothing replaced


async def test_a_filter_naming_an_unknown_charger_is_not_found(edge: Edge) -> None:  # noqa: F811
    md = auth(VIEWER)
    for call in (
        edge.stub.ListSessions(pb.ListSessionsRequest(charger_id="C9"), metadata=md),
        edge.stub.ListSetpoints(pb.ListSetpointsRequest(charger_id="C9"), metadata=md),
    ):
        err = await _failure(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert "C9" in (err.details() or "")
    watch = edge.stub.WatchChanges(pb.WatchChangesRequest(charger_id="C9"), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as err_info:
        await asyncio.wait_for(watch.read(), 5)
    assert err_info.value.code() == grpc.StatusCode.NOT_FOUND
    # A known charger without a session is still an empty list, not an error.
    sessions = await edge.stub.ListSessions(pb.ListSessionsRequest(charger_id="C2"), metadata=md)
    assert list(sessions.sessions) == []


async def test_a_curtailment_that_already_ended_is_refused(edge: Edge) -> None:  # noqa: F811
    """Before, it was answered "curtailment c1: at most 10 kW at GRID from … to …" and booked,
    while nothing was curtailed: a local time sent as UTC reads as an order obeyed."""
    now = int(edge.clock.now())
    sig = GridSignal(signal_id="c1", curtailment=Curtailment(node_id="GRID", max_kw=10.0))
    sig.curtailment.start.FromSeconds(now - 7200)
    sig.curtailment.end.FromSeconds(now - 3600)
    err = await _failure(
        edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=sig), metadata=auth(GRID))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "already past" in (err.details() or "")
    assert edge.facade.curtailments == {}
    # One still in force (started an hour ago) is taken.
    sig.curtailment.end.FromSeconds(now + 3600)
    await edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=sig), metadata=auth(GRID))
    assert edge.facade.curtailments["c1"] == ("GRID", 10.0, now - 7200, now + 3600)
