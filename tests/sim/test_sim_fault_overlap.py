"""Two faults of one kind on one charger that touch or overlap: the charger misbehaves until the
last one ends. The end of the first cleared the station's flag while the second was in force
(the stack injected faults starting at an instant before those ending at it, and each end set
the flag off whatever else still held it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from evcore.sim import stack
from evcore.sim.arrivals import generate
from evcore.sim.scenario import Scenario
from evcore.sim.twin import SitePlant
from evcore.sim.vclock import VirtualClock
from sim_testkit import one_car_scenario

ok, why = stack.available()

# meter_stuck 0.1-0.2 h, 0.12-0.17 h (inside it) and 0.2-0.3 h (touching it); profile_ignored
# 0.1-0.3 h and 0.15-0.25 h.
FAULTS = """
[[faults]]
kind = "meter_stuck"
charger = "cp-1"
at_h = 0.12
duration_min = 3
[[faults]]
kind = "meter_stuck"
charger = "cp-1"
at_h = 0.1
duration_min = 6

[[faults]]
kind = "meter_stuck"
charger = "cp-1"
at_h = 0.2
duration_min = 6

[[faults]]
kind = "profile_ignored"
charger = "cp-1"
at_h = 0.1
duration_min = 12

[[faults]]
kind = "profile_ignored"
charger = "cp-1"
at_h = 0.15
duration_min = 6
"""


def _scenario(tmp_path: Path) -> Scenario:
    return one_car_scenario(tmp_path, "overlap", duration_h=0.4, policy="fair_share", extra=FAULTS)


# (hours, meter stuck, profiles ignored) expected
EXPECTED = [
    (0.05, False, False),
    (0.18, True, True),
    (0.22, True, True),
    (0.28, True, True),
    (0.35, False, False),
]


@pytest.mark.skipif(not ok, reason=f"stack backend unavailable: {why}")
def test_stack_touching_and_overlapping_faults_hold_until_the_last_ends(tmp_path: Path) -> None:
    sc = _scenario(tmp_path)
    seen: list[tuple[float, bool, bool]] = []

    def probe(h: float) -> Callable[[stack.StackRun], None]:
        def f(run: stack.StackRun) -> None:
            sim, _ = run._fleet.station("cp-1")
            mb = sim.misbehaviour
            seen.append((h, mb.stop_reporting, mb.ignore_profiles))

        return f

    run = stack.StackRun(
        sc, "fair_share", generate(sc), probes=[(h * 3600.0, probe(h)) for h, _, _ in EXPECTED]
    )
    asyncio.run(run.run())
    assert seen == EXPECTED  # was off at 0.18 h and 0.22 h (meter) and 0.28 h (profiles)


def test_in_process_overlapping_faults_hold_until_the_last_ends(tmp_path: Path) -> None:
    sc = _scenario(tmp_path)
    plant = SitePlant(sc, generate(sc), VirtualClock(sc.start))
    p = plant.points[0]
    stuck = []
    for at, _, kind, f in plant._events:  # the plant's own order
        if kind in ("fault", "fault_end") and f.kind == "meter_stuck":
            plant._fault(kind == "fault", f)
            stuck.append((round(at / 3600.0, 3), p.meter_stuck))
    # was (0.17, False): the inner fault's end cleared the outer one. At 0.2 h the first ends
    # and the next starts at the same instant.
    assert stuck == [
        (0.1, True),
        (0.12, True),
        (0.17, True),
        (0.2, False),
        (0.2, True),
        (0.3, False),
    ]
