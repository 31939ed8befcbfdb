"""kW-cap samples are counted from the instant a grid signal is in force, also when it starts
or ends between two physics steps of the stack twin.

The stack's site meter took the kW caps in force at the start of each physics step for the whole
step: a curtailment starting 2.55 s into a 5 s step lost the samples of its first 2.45 s (and one
ending inside a step counted the samples after its end)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from evcore.sim import stack
from evcore.sim.arrivals import generate
from sim_testkit import one_car_scenario

# The car draws 22 kW from 0 to about 1530 s; the 1 kW signal: 362.55 s to 717.45 s.
START_S = 362.55
END_S = 717.45

ok, why = stack.available()


@pytest.mark.skipif(not ok, reason=f"stack backend unavailable: {why}")
def test_kw_cap_samples_start_and_end_with_the_signal(tmp_path: Path) -> None:
    signal = f"""[[grid_signals]]
node = "grid"
start_h = {START_S / 3600.0!r}
end_h = {END_S / 3600.0!r}
limit_kw = 1.0
notice_min = 0
"""
    sc = one_car_scenario(
        tmp_path, "cap-edges", duration_h=0.5, policy="uncontrolled", extra=signal
    )
    run = stack.StackRun(sc, "uncontrolled", generate(sc))
    asyncio.run(run.run())
    res = run.result(0.0)
    # Every 100 ms sample at k * 0.1 s in [362.55, 717.45): 3626 .. 7174.
    assert res.violations_kw == 7175 - 3626  # was 3550: the samples of [365, 720)
    assert res.violations == 0
