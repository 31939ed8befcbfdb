"""The twin's cloud planner builds its request from what the edge sees: a single-phase car on a
three-phase charger is planned on the one site phase it draws on."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from evcore.sim.scenario import load_scenario
from evcore.sim.twinplan import TwinPlanner


def _charger(terminal_a: tuple[float | None, ...], tx: str) -> Any:
    return SimpleNamespace(
        transaction_id=tx,
        energy_requested_kwh=20.0,
        session_energy_wh=2000.0,
        departure=None,
        terminal_a=terminal_a,
        priority=1.0,
        sent=7.0,
        min_value=6.0,
    )


def test_sim_twin_plans_single_phase_car_on_the_phase_it_draws() -> None:
    sc = load_scenario("eu-three-phase")
    now = sc.start + 3 * 3600.0
    # cp-02 is wired L2, L3, L1: its car draws on its second terminal only (site L3); cp-01's
    # car draws on all three.
    one = _charger((0.0, 7.0, 0.0), "t1")
    three = _charger((7.0, 7.0, 7.0), "t2")
    for c in (one, three):
        c.departure = now + 4 * 3600.0
    state = SimpleNamespace(chargers={"cp-02": one, "cp-01": three})
    tp = TwinPlanner(sc, "planner_cost")
    sessions = tp.sessions_from_state(now, state)
    assert {s.charger_id for s in sessions} == {"cp-01", "cp-02"}
    # both still want 18 kWh (plus the 10 % margin): a one-phase car is not counted three times
    assert all(abs(s.energy_requested_kwh - 18.0 * 1.1) < 1e-9 for s in sessions)
    req = tp.request(now, sessions)
    by_id = {c.id: c for c in req.chargers}
    assert by_id["cp-02"].wiring == "line_to_neutral"
    assert list(by_id["cp-02"].phases) == [sc.site.phase_names.index("L3")]
    assert by_id["cp-01"].wiring == "three_phase"
    assert len(by_id["cp-01"].phases) == 3
    # the plan solves with the one-phase charger in it
    plan = tp.plan(now, state)
    assert tp.last_status in ("optimal", "suboptimal")
    assert plan is not None and set(plan.rows) == {"cp-01", "cp-02"}
