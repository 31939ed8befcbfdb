"""The stack twin hands the edge its tariff's prices at the instants they change.

It sampled the tariff every 15 minutes from the scenario's start: with a start at 12:05, a price
that changes on the hour reached the edge at 13:05, one that changes at 12:07 at 12:20, and a
period shorter than 15 minutes between two of those instants never reached it at all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from evcore.edge.grid import price_at
from evcore.sim import stack
from evcore.sim.arrivals import generate
from sim_testkit import one_car_scenario

ok, why = stack.available()

DAY = 1_767_571_200.0  # 2026-01-05T00:00:00Z

# 0.10 by default; 0.50 from 12:07 to 12:13:30; 0.30 from 13:00. The run starts at 12:05.
TARIFF = f"""[tariff]
default_price_per_kwh = 0.10
[[tariff.periods]]
start_h = {12.0 + 7.0 / 60.0!r}
end_h = {12.0 + 13.5 / 60.0!r}
price_per_kwh = 0.50
[[tariff.periods]]
start_h = 13.0
end_h = 24.0
price_per_kwh = 0.30
"""


@pytest.mark.skipif(not ok, reason=f"stack backend unavailable: {why}")
def test_the_edge_sees_the_tariffs_own_change_instants(tmp_path: Path) -> None:
    sc = one_car_scenario(
        tmp_path,
        "price-instants",
        duration_h=1.0,
        departure_h=0.05,
        policy="fair_share",
        extra=TARIFF,
        start="2026-01-05T12:05:00Z",
    )
    seen: list[dict[float, float]] = []

    def probe(run: stack.StackRun) -> None:
        seen.append({p.start: p.price_per_kwh for p in run._app.controller.prices})

    probes: list[tuple[float, Callable[[stack.StackRun], None]]] = [(60.0, probe)]
    run = stack.StackRun(sc, "fair_share", generate(sc), probes=probes)
    asyncio.run(run.run())
    hms = ["12:05:00", "12:06:59", "12:07:00", "12:13:29", "12:13:30", "12:59:59", "13:00:00"]
    at = {}
    for s in hms:
        h, m, sec = (int(x) for x in s.split(":"))
        at[s] = price_at(seen[0], DAY + h * 3600 + m * 60 + sec)
    # Before: 0.10 at 12:07:00 and 12:13:29 (12:07-12:13:30 fell between 12:05 and 12:20, and
    # was never seen) and 0.10 at 13:00:00 (seen from 13:05).
    assert at == {
        "12:05:00": 0.1,
        "12:06:59": 0.1,
        "12:07:00": 0.5,
        "12:13:29": 0.5,
        "12:13:30": 0.1,
        "12:59:59": 0.1,
        "13:00:00": 0.3,
    }
