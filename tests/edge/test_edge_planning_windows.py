"""The local planner keeps its demand windows (the month's peak already paid for, the window under
way) in the edge's store, SQLite or PostgreSQL, and takes them back at start: before, a restart
forgot the peak and the next plans flattened the load more than the bill needed."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from edge_testkit import AcceptingGateway, stepped_controller
from evcore.clock import StepClock
from evcore.edge.planning import WINDOWS_KEY, LocalPlanner, PlannerSection
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.store import open_store

pytestmark = pytest.mark.timeout(60)

WINDOW_S = 900.0
# 2027-01-10 12:00 UTC, at a window's start.
START = 1_799_582_400.0


def _planner(store: object, wall: float) -> tuple[LocalPlanner, StepClock]:
    table = depot_table(2, per_feeder=2)
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    clock.wall = wall
    planner = LocalPlanner(load_site(table), ctrl, PlannerSection(demand_window_s=WINDOW_S))
    planner.store = store
    return planner, clock


async def test_a_restart_keeps_the_months_demand_peak(
    store_section: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert START % WINDOW_S == 0
    store = open_store(store_section, tmp_path)
    await store.open()
    planner, clock = _planner(store, START)
    c = planner.ctrl.state.chargers["cp-0001"]
    c.transaction_id, c.session_energy_wh = "t1", 0.0
    planner.windows.sample(clock.now(), planner.ctrl.state.chargers)
    # 10 kWh in the first window (40 kW on average), then 2 kWh into the next one.
    clock.advance(WINDOW_S - 1.0)
    c.session_energy_wh = 10_000.0
    planner.windows.sample(clock.now(), planner.ctrl.state.chargers)
    clock.advance(301.0)
    c.session_energy_wh = 12_000.0
    planner.windows.sample(clock.now(), planner.ctrl.state.chargers)
    assert planner.windows.peak_kw == pytest.approx(40.0)
    await planner.save_windows()
    await store.close()

    # The edge starts again (a new process: a new planner, the store opened again).
    store2 = open_store(store_section, tmp_path)
    await store2.open()
    try:
        later = clock.now() + 60.0
        planner2, _ = _planner(store2, later)
        assert planner2.windows.peak_kw == 0.0
        assert await planner2.load_windows()
        assert planner2.windows.peak_kw == pytest.approx(40.0)
        assert planner2.windows.window_kwh() == pytest.approx(2.0)  # the window under way
        # The next month bills from nothing: last month's peak is not taken.
        planner3, _ = _planner(store2, START + 31 * 86_400.0)
        assert not await planner3.load_windows()
        assert planner3.windows.peak_kw == 0.0
        # A snapshot that does not parse is logged; nothing is restored, nothing raised.
        await store2.set_meta(WINDOWS_KEY, '{"window_s": 900, "peak_kw": "a lot"}')
        planner4, _ = _planner(store2, later)
        with caplog.at_level(logging.WARNING, "evcore.edge.planning"):
            assert not await planner4.load_windows()
        assert "demand windows not restored" in caplog.text
        assert planner4.windows.peak_kw == 0.0 and math.isfinite(planner4.windows.window_kw())
    finally:
        await store2.close()


async def test_unchanged_windows_are_not_written_again(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    store = open_store(store_section, tmp_path)
    await store.open()
    try:
        planner, clock = _planner(store, START)
        planner.windows.sample(clock.now(), planner.ctrl.state.chargers)
        await planner.save_windows()
        first = await store.get_meta(WINDOWS_KEY)
        assert first is not None
        await store.set_meta(WINDOWS_KEY, "sentinel")
        await planner.save_windows()  # nothing changed since: no write
        assert await store.get_meta(WINDOWS_KEY) == "sentinel"
        clock.advance(WINDOW_S)
        planner.windows.sample(clock.now(), planner.ctrl.state.chargers)
        await planner.save_windows()
        assert await store.get_meta(WINDOWS_KEY) not in (None, "sentinel", first)
    finally:
        await store.close()
