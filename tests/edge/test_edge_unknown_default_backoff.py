"""An idle charger counted at its maximum because a stale TxDefault may hold it
(``default_unknown``) is asked for its report again until one is usable. A station that never
gives a usable idle report (it answered GetCompositeSchedule Accepted in session, Rejected when
idle) was asked every report bound (5 s) for ever: GetCompositeSchedule and two
TriggerMessages each round, and nothing logged. The asks now back off (doubling from the bound
up to 300 s) and a WARNING names the charger once.

The controller with the Rust core, on a step clock, and a gateway double.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest
from edge_testkit import stepped_controller
from evcore.edge.sitegen import depot_table
from evcore.ocpp.server import CompositeSchedule


class _Gateway:
    """Answers GetCompositeSchedule ``status`` (no periods when Rejected); keeps when each
    charger was asked (monotonic); answers the other calls."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.status = "Rejected"
        self.asked: list[tuple[str, float]] = []
        self.triggers = 0

    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        class _Accepted:
            accepted = True

        return _Accepted()

    async def get_composite_schedule(
        self, charger_id: str, *, duration_s: int, unit: str | None = None
    ) -> CompositeSchedule:
        self.asked.append((charger_id, self.clock.monotonic()))
        periods = [] if self.status == "Rejected" else [(0, 0.0, 3)]
        return CompositeSchedule(charger_id, self.status, None, unit, periods)

    async def clear_station_profiles(self, target: str, purpose: str | None = None) -> None:
        return None

    async def trigger_message(self, target: str, message: str) -> None:
        self.triggers += 1


async def _run_until(clock: Any, mono: float, steps: int = 20_000) -> None:
    for _ in range(steps):
        if clock.monotonic() >= mono:
            return
        await asyncio.sleep(0)


async def test_an_unusable_idle_report_is_asked_again_with_back_off_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw: _Gateway
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2, grid_share=1.0), None)
    gw = _Gateway(clock)
    ctrl.gateway = gw
    a = sorted(ctrl.state.chargers)[0]
    ca = ctrl.state.chargers[a]
    ca.default_unknown = True  # its session ended; a stale TxDefault may hold it
    assert ca.transaction_id is None and ca.online
    bound = ctrl._report_bound_s()
    caplog.set_level(logging.WARNING, logger="evcore.edge")
    try:
        start = clock.monotonic()
        ctrl._ask_station(ca.ocpp_id)
        await _run_until(clock, start + 1_200)
        times = [t - start for cid, t in gw.asked if cid == a]
        gaps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
        # Before: every bound (5 s), 240 rounds in 20 min. Now: 5, 10, 20, ... 300 s apart.
        assert len(times) <= 12, f"asked {len(times)} times in 20 min, gaps {gaps[:8]}"
        assert gaps[0] == pytest.approx(bound, abs=0.01)
        assert all(g1 >= g0 - 0.01 for g0, g1 in itertools.pairwise(gaps)), gaps
        assert max(gaps) == pytest.approx(300.0, abs=0.01), gaps
        assert gw.triggers <= 2 * len(times)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and a in r.message]
        assert len(warned) == 1, [r.message for r in caplog.records]
        assert "maximum" in warned[0].message
        assert ca.default_unknown  # still counted at its maximum
        # A usable report at last: known again, no more asks, and the back-off starts over.
        gw.status = "Accepted"
        n = len(gw.asked)
        await _run_until(clock, clock.monotonic() + 700)
        assert not ca.default_unknown
        asked_after = len(gw.asked) - n
        assert 1 <= asked_after <= 2
        await _run_until(clock, clock.monotonic() + 700)
        assert len(gw.asked) - n == asked_after  # no more asks
        assert ca.charger_id not in ctrl._unknown_default_warned
    finally:
        ctrl._stopping = True
        for t in list(ctrl._sends):
            t.cancel()
        await asyncio.gather(*ctrl._sends, return_exceptions=True)
