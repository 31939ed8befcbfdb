"""The twin's cloud planner (``evcore.sim.twinplan``) builds its request from what the edge sees:
a car that draws less than allowed is planned at what it draws, and a single-phase car on a
three-phase charger stays planned as one while it pauses (forgetting it flipped its plan, and
each flip cost a switch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.edge.state import ChargerState
from evcore.planner import PlanSession
from evcore.sim import twinplan
from evcore.sim.scenario import load_scenario
from sim_testkit import TARIFF_UP_AT_200_S, one_car_scenario


def _charging(cid: str, **kw: object) -> ChargerState:
    c = ChargerState(cid, cid, False, 6.0, 32.0)
    c.transaction_id = f"tx-{cid}"
    c.energy_requested_kwh = 10.0
    c.departure = 1e12
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_a_car_drawing_less_than_allowed_is_planned_at_what_it_draws() -> None:
    tp = twinplan.TwinPlanner(load_scenario("eu-three-phase"), "planner_cost")
    c = _charging("cp-01", sent=32.0, sent_at=100.0, measured_at=200.0, terminal_a=(16.0,) * 3)
    assert tp.vehicle_limit(c, 210.0) == 16.0 + twinplan.DRAW_SLACK_A
    # Drawing what it is allowed: unknown, the charger's maximum is planned.
    c.terminal_a = (31.5, 31.5, 31.5)
    assert tp.vehicle_limit(c, 210.0) is None
    # A measurement from before the setpoint applied, or a stale one, says nothing.
    c.terminal_a = (16.0,) * 3
    assert tp.vehicle_limit(c, 210.0 + tp.stale_after_s) is None
    c.measured_at = 100.0 + twinplan.DRAW_SETTLE_S - 1.0
    assert tp.vehicle_limit(c, 130.0) is None
    (s,) = tp.sessions_from_state(0.0, _state(c), 130.0)
    assert s.max_a is None


class _State:
    def __init__(self, *chargers: ChargerState) -> None:
        self.chargers = {c.charger_id: c for c in chargers}


def _state(*chargers: ChargerState) -> _State:
    return _State(*chargers)


def test_a_single_phase_car_stays_single_phase_while_it_pauses() -> None:
    tp = twinplan.TwinPlanner(load_scenario("eu-three-phase"), "planner_cost")
    c = _charging("cp-01", terminal_a=(0.0, 0.0, 16.0))
    (s,) = tp.sessions_from_state(0.0, _state(c))
    # Three times the energy on the three phases the allocator counts it on, a third of the
    # weight per planned kWh (one real kWh per three planned).
    assert s.energy_requested_kwh == 10.0 * 3 * twinplan.PLAN_ENERGY_MARGIN
    assert s.priority == 1.0 / 3.0
    c.terminal_a = (0.0, 0.0, 0.0)  # paused
    (s,) = tp.sessions_from_state(0.0, _state(c))
    assert s.energy_requested_kwh == 10.0 * 3 * twinplan.PLAN_ENERGY_MARGIN
    # A faulted charger is not the allocator's to control: not planned.
    c.faulted = True
    assert tp.sessions_from_state(0.0, _state(c)) == []


def test_the_twins_cloud_plan_binds_each_row_to_its_transaction() -> None:
    """Rows of a cloud plan name their transaction (``PlanRow.transaction_id``); the twin's
    stand-in for the cloud planner left them unbound, so a car plugged into a charger after a
    plan kept the last car's targets (a deferred session's 0 A) until the next plan."""
    sc = load_scenario("eu-three-phase")
    tp = twinplan.TwinPlanner(sc, "planner_cost")
    now = sc.start + 3600.0
    a = _charging("cp-01", departure=now + 4 * 3600.0)
    b = _charging("cp-02", departure=now + 6 * 3600.0, energy_requested_kwh=20.0)
    plan = tp.plan(now, _state(a, b))
    assert plan is not None, tp.last_status
    assert plan.transactions == {"cp-01": "tx-cp-01", "cp-02": "tx-cp-02"}
    t = now + 60.0
    assert set(plan.targets_at(t, {"cp-01": "tx-cp-01", "cp-02": "tx-cp-02"})) == {"cp-01", "cp-02"}
    # Another car on cp-02: its rows are not this one's.
    assert set(plan.targets_at(t, {"cp-01": "tx-cp-01", "cp-02": "tx-other"})) == {"cp-01"}


def test_the_cloud_plan_prices_and_caps_each_step_over_its_whole_span(tmp_path: Path) -> None:
    """A step is priced at the time-weighted mean of the tariff over it, and carries every kW
    cap in force at any moment of it (from the edge's lead before the signal), as the edge's
    own planner does (``step_prices``, ``step_caps``). The twin's cloud planner took both at the
    step's midpoint: the first 5-minute step, 0.10 until 12:03:20 and 0.50 after, was priced
    0.10, and a 1 kW curtailment from 12:00:10 to 12:01:00 was not in the plan at all."""
    tariff = (
        TARIFF_UP_AT_200_S
        + f"""
[[grid_signals]]
node = "grid"
start_h = {10.0 / 3600.0!r}
end_h = {60.0 / 3600.0!r}
limit_kw = 1.0
notice_min = 1
"""
    )
    sc = one_car_scenario(
        tmp_path, "plan-steps", duration_h=2.0, policy="planner_cost", extra=tariff
    )
    tp = twinplan.TwinPlanner(sc, "planner_cost")
    session = PlanSession("tx-1", "cp-1", sc.start, sc.start + 7200.0, 20.0)
    req = tp.request(sc.start, [session])
    assert req.step_s[0] == 300.0
    assert req.price_per_kwh[0] == pytest.approx((200.0 * 0.10 + 100.0 * 0.50) / 300.0)  # 0.10
    assert req.price_per_kwh[1] == pytest.approx(0.50)
    caps = req.nodes[0].power_limit_kw
    assert isinstance(caps, list)  # was None: no cap at any step's midpoint
    assert caps[0] == pytest.approx(1.0 * twinplan.KW_MARGIN)
    assert caps[1] > 1e5  # none in the second step


def test_the_cloud_plan_knows_a_grid_signal_only_once_it_is_announced(tmp_path: Path) -> None:
    """A curtailment announced an hour ahead is not in a plan made two hours before it: the
    twin's cloud planner planned around every grid signal of the scenario from the start, a
    foresight no cloud has (the edge hears of it notice_min ahead)."""
    signal = """[[grid_signals]]
node = "grid"
start_h = 2.0
end_h = 2.5
limit_kw = 5.0
notice_min = 60
"""
    sc = one_car_scenario(
        tmp_path, "announced", duration_h=4.0, policy="planner_cost", extra=signal
    )
    tp = twinplan.TwinPlanner(sc, "planner_cost")
    session = PlanSession("tx-1", "cp-1", sc.start, sc.start + 4 * 3600.0, 20.0)
    before = tp.request(sc.start, [session])
    assert before.nodes[0].power_limit_kw is None  # was 4.5 kW in the steps of 2-2.5 h
    after = tp.request(sc.start + 3600.0, [session])  # announced now
    caps = after.nodes[0].power_limit_kw
    assert isinstance(caps, list) and min(caps) == pytest.approx(5.0 * twinplan.KW_MARGIN)
