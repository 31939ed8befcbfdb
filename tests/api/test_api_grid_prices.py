"""PostGridSignal and the planner agree on prices, over a real socket: a negative day-ahead price
is taken (the planner plans it), one beyond the planner's bound is INVALID_ARGUMENT and changes
nothing (before, 1e300 was taken and every local plan after it failed)."""

from __future__ import annotations

import grpc
import pytest
from evcore.planner import PRICE_BOUND_PER_KWH
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1.grid_pb2 import GridSignal, PriceUpdate
from evcore.v1.tariff_pb2 import PriceInterval, Tariff
from test_api_edge import BOTH, Edge, auth, edge  # noqa: F401  (the fixture)


def _prices(now: int, *values: float) -> pb.PostGridSignalRequest:
    tariff = Tariff(
        tariff_id="day-ahead",
        prices=[PriceInterval(duration_s=3600, price_per_kwh=v) for v in values],
    )
    for i in range(len(values)):
        tariff.prices[i].start.FromSeconds(now + 3600 * i)
    return pb.PostGridSignalRequest(
        signal=GridSignal(signal_id="p1", price_update=PriceUpdate(tariff=tariff))
    )


async def test_negative_prices_are_taken_and_absurd_ones_refused(edge: Edge) -> None:  # noqa: F811
    now = int(edge.clock.now())
    await edge.stub.PostGridSignal(_prices(now, 0.10, -0.02), metadata=auth(BOTH))
    assert edge.facade.prices == [(now, 0.10), (now + 3600, -0.02)]
    for bad in (1e300, -PRICE_BOUND_PER_KWH * 1.001):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await edge.stub.PostGridSignal(_prices(now, 0.10, bad), metadata=auth(BOTH))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the planner's bound" in (err.value.details() or "")
    assert edge.facade.prices == [(now, 0.10), (now + 3600, -0.02)]
