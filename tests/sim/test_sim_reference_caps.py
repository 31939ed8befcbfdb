"""The in-process twin's controllers (the numpy reference) hold the grid signals' kW caps as the
meter counts them: the lowest of those in force on a node, and in force by each cap's start.

They saw, per node, the cap of the signal listed last among those in force (a dict built in list
order), while the meter counts samples over the lowest: a 10 kW curtailment inside a 20 kW one
was controlled to 20 kW. And they heard of a cap only at its start, so the lower profile took
effect a profile delay late, however long the notice."""

from __future__ import annotations

from pathlib import Path

from evcore.sim.arrivals import generate
from evcore.sim.controllers import make_controller
from evcore.sim.twin import SitePlant, TickDriver, run_policy
from evcore.sim.vclock import VirtualClock
from sim_testkit import one_car_scenario


def _signal(start_h: float, end_h: float, kw: float) -> str:
    return f"""[[grid_signals]]
node = "grid"
start_h = {start_h}
end_h = {end_h}
limit_kw = {kw}
notice_min = 30

"""


def _violations_kw(tmp_path: Path, signals: str) -> int:
    sc = one_car_scenario(tmp_path, "caps", duration_h=0.3, policy="fair_share", extra=signals)
    res = run_policy(sc, "fair_share", make_controller("fair_share", sc))
    assert res.energy_delivered_kwh > 1.0  # it charged
    return res.violations_kw


def test_the_lower_of_two_overlapping_caps_holds(tmp_path: Path) -> None:
    # 10 kW from 0.1 h to 0.2 h, listed before a 20 kW one from 0.05 h to 0.25 h.
    signals = _signal(0.1, 0.2, 10.0) + _signal(0.05, 0.25, 20.0)
    assert _violations_kw(tmp_path, signals) == 0  # was 3620: the 10 kW cap's 6 minutes and 2 s


def test_an_announced_cap_is_in_force_by_its_start(tmp_path: Path) -> None:
    # Announced 30 minutes ahead: the lower profile is in force by 0.1 h.
    assert _violations_kw(tmp_path, _signal(0.1, 0.2, 10.0)) == 0  # was 20: 2 s, the delay


def test_the_planners_see_a_grid_signal_only_once_it_is_announced(tmp_path: Path) -> None:
    """The in-process view handed the planners every grid signal of the scenario from the start
    (``SiteView.curtailments``), a foresight no controller has: now only those announced
    (notice_min ahead of their start)."""
    signal = _signal(2.0, 2.5, 5.0).replace("notice_min = 30", "notice_min = 60")
    sc = one_car_scenario(tmp_path, "announced", duration_h=3.0, policy="fair_share", extra=signal)
    clock = VirtualClock(sc.start)
    driver = TickDriver(SitePlant(sc, generate(sc), clock), make_controller("fair_share", sc))
    assert driver.view().curtailments == []  # was the 2 h signal, at 0 h
    clock.set_time(sc.start + 3600.0)  # announced now
    assert driver.view().curtailments == [(sc.start + 7200.0, sc.start + 9000.0, "grid", 5.0)]
