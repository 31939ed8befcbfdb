"""The fleet split rule (evcore.cloud.fleet.split_fleet_limit) and each site's inputs to it from a
topology and telemetry; pure functions, no service."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from evcore.cloud.fleet import (
    FleetInputError,
    SiteInputs,
    counted_sites,
    floor_kw,
    grid_limit_kw,
    installed_kw,
    may_hold_kw,
    plan_revision,
    site_demand_kw,
    split_fleet_limit,
)
from evcore.cloud.store import FleetSiteSignal
from evcore.site import load_site
from evcore.v1.fleet_api_pb2 import FleetCurtailmentResult, SiteShare
from evcore.v1.meter_pb2 import MeterSample


def site(sid: str, limit: float, floor: float, demand: float) -> SiteInputs:
    return SiteInputs(sid, "grid", limit, floor, demand)


def test_the_rest_above_the_floors_is_shared_by_demand() -> None:
    sites = [site("A", 500, 20, 100), site("B", 500, 10, 50), site("C", 500, 0, 50)]
    split = split_fleet_limit(230.0, sites)
    assert split.feasible and split.shortfall_kw == 0
    # 200 kW above the floors (30), shared 100:50:50.
    assert split.max_kw == pytest.approx({"A": 120.0, "B": 60.0, "C": 50.0}, abs=0.002)


def test_a_site_full_at_its_grid_limit_gives_the_rest_to_the_others() -> None:
    sites = [site("A", 100, 10, 300), site("B", 500, 10, 100), site("C", 500, 10, 100)]
    split = split_fleet_limit(400.0, sites)
    # A's share by demand (3/5 of 370 = 222) is above its headroom (90): it is full at 100 kW and
    # B and C share the remaining 280 kW equally.
    assert split.max_kw == pytest.approx({"A": 100.0, "B": 150.0, "C": 150.0}, abs=0.002)


def test_what_no_site_with_demand_can_take_goes_to_the_others_by_headroom() -> None:
    sites = [site("A", 100, 0, 50), site("B", 300, 0, 0), site("C", 100, 0, 0)]
    split = split_fleet_limit(300.0, sites)
    # A full at 100; 200 left over for B (headroom 300) and C (headroom 100): 150 and 50.
    assert split.max_kw == pytest.approx({"A": 100.0, "B": 150.0, "C": 50.0}, abs=0.002)
    # Above every grid limit together: every site at its limit.
    assert split_fleet_limit(900.0, sites).max_kw == pytest.approx(
        {"A": 100.0, "B": 300.0, "C": 100.0}, abs=0.002
    )


def test_floors_above_the_fleet_limit_are_infeasible_and_kept() -> None:
    sites = [site("A", 500, 300, 100), site("B", 500, 250, 100), site("C", 100, 400, 10)]
    split = split_fleet_limit(500.0, sites)
    assert not split.feasible
    # C's floor is capped at its grid limit (100); 300 + 250 + 100 = 650, 150 above 500.
    assert split.max_kw == {"A": 300.0, "B": 250.0, "C": 100.0}
    assert split.shortfall_kw == pytest.approx(150.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_limit_that_is_not_a_finite_number_at_least_0_is_named(bad: float) -> None:
    with pytest.raises(FleetInputError, match=r"^max_kw: "):
        split_fleet_limit(bad, [site("A", 10, 0, 1)])


def test_invariants_over_random_fleets() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 8)
        sites = [
            site(
                f"S{i}",
                rng.choice([0.0, rng.uniform(0, 800)]),
                rng.choice([0.0, rng.uniform(0, 200)]),
                rng.choice([0.0, rng.uniform(0, 500)]),
            )
            for i in range(n)
        ]
        limit = rng.uniform(0, 2500)
        split = split_fleet_limit(limit, sites)
        floors = {s.site_id: min(s.floor_kw, s.grid_limit_kw) for s in sites}
        total = sum(split.max_kw.values())
        for s in sites:
            assert split.max_kw[s.site_id] <= s.grid_limit_kw + 1e-9
            assert split.max_kw[s.site_id] >= floors[s.site_id] - 1e-9
        if split.feasible:
            assert total <= limit + 1e-6
            # Nothing is left unused while any site could take more (1 W per site of rounding).
            caps = sum(s.grid_limit_kw for s in sites)
            assert total >= min(limit, caps) - 0.001 * n - 1e-6
        else:
            assert sum(floors.values()) > limit
            assert split.shortfall_kw == pytest.approx(total - limit)


def table(power_limit_kw: float | None = 200.0) -> dict[str, Any]:
    grid: dict[str, Any] = {
        "id": "grid",
        "kind": "grid",
        "phase_limit_a": [400.0, 400.0, 400.0],
        "other_load_max_a": [40.0, 40.0, 40.0],
    }
    if power_limit_kw is not None:
        grid["power_limit_kw"] = power_limit_kw
    three = {"wiring": "three_phase", "phases": ["L1", "L2", "L3"]}
    return {
        "site": {"id": "s1", "voltage_ln_v": 230.0},
        "nodes": [
            grid,
            {"id": "F1", "parent": "grid", "phase_limit_a": [250.0] * 3, "other_load_max_a": 10.0},
        ],
        "chargers": [
            {"id": f"C{i}", "parent": "F1", "kind": "ac", "max_a": 32.0, **three} for i in range(4)
        ]
        + [{"id": "D1", "parent": "grid", "kind": "dc", "max_w": 47500.0, **three}],
    }


def test_grid_limit_floor_and_installed_power_of_a_site() -> None:
    s = load_site(table())
    assert grid_limit_kw(s) == 200.0
    # Without power_limit_kw: 3 x 400 A x 230 V.
    assert grid_limit_kw(load_site(table(None))) == pytest.approx(276.0)
    # Other load at the grid (40 A) and at the feeder (10 A) both come through the connection.
    assert floor_kw(s) == pytest.approx(3 * 50 * 230 / 1000)
    got = installed_kw(s)
    assert got["C0"] == pytest.approx(22.08)
    assert got["D1"] == pytest.approx(50.0)  # 47.5 kW DC at 95 %


def _sample(cid: str, amps: float, *, offered: float | None = None, power_w: float | None = None):
    s = MeterSample(charger_id=cid, current_a=[amps, amps, amps])
    if offered is not None:
        s.offered_current_a = offered
    if power_w is not None:
        s.power_w = power_w
    return s


def test_demand_is_what_chargers_draw_or_their_maximum_when_held_at_their_offer() -> None:
    s = load_site(table())
    samples = {
        "C0": _sample("C0", 10.0, offered=32.0),  # the car takes 10 A of 32: 6.9 kW
        "C1": _sample("C1", 15.8, offered=16.0),  # held at its offer: counts at 22.08 kW
        "C2": _sample("C2", 0.0, power_w=1500.0),  # power wins over currents
    }
    assert site_demand_kw(s, samples) == pytest.approx(6.9 + 22.08 + 1.5)


# -- break before make (plan_revision, pure) ------------------------------------------------------
def _sig(
    site_id: str, rev: int, kw: float | None, *, taken: float | None, lowered: bool = False
) -> FleetSiteSignal:
    return FleetSiteSignal(site_id, rev, kw, lowered, f"{site_id}#r{rev}", True, 0.0, taken)


def _revision(
    rev: int, shares: dict[str, float], dropped: tuple[str, ...] = ()
) -> FleetCurtailmentResult:
    r = FleetCurtailmentResult(revision=rev)
    r.shares.extend(SiteShare(site_id=s, max_kw=kw) for s, kw in shares.items())
    r.dropped_shares.extend(SiteShare(site_id=s) for s in dropped)
    return r


def test_an_increase_waits_for_every_decrease_also_across_revisions() -> None:
    # Revision 2 lowered A (225 -> 4.9), not taken yet: A may still hold 225. Revision 3 gives A
    # 100 (below 225: out at once, to be taken), B and C 100 (increases: they wait for A).
    signals = [
        _sig("A", 1, 225.0, taken=10.0),
        _sig("A", 2, 4.9, taken=None, lowered=True),
        _sig("B", 1, 37.5, taken=10.0),
        _sig("C", 1, 37.5, taken=10.0),
    ]
    assert may_hold_kw([s for s in signals if s.site_id == "A"]) == 225.0
    assert may_hold_kw([]) == math.inf  # nothing taken from it yet: no limit
    plan = plan_revision(_revision(3, {"A": 100.0, "B": 100.0, "C": 100.0}), signals, ramp_s=30.0)
    assert [(sh.site_id, lowered) for sh, _, lowered in plan.send_now] == [("A", True)]
    assert [sh.site_id for sh in plan.increases] == ["B", "C"]
    assert plan.waiting_for == ["A"] and not plan.increases_may_go(1e9)
    # While they wait, what each may hold adds up to at most the limit.
    assert 225.0 + 37.5 + 37.5 <= 300.0
    # A takes revision 3 at t = 50: the increases go at 50 + ramp_s, not before.
    signals.append(_sig("A", 3, 100.0, taken=50.0, lowered=True))
    plan = plan_revision(_revision(3, {"A": 100.0, "B": 100.0, "C": 100.0}), signals, ramp_s=30.0)
    assert plan.send_now == [] and plan.waiting_for == [] and plan.ramp_until_s == 80.0
    assert not plan.increases_may_go(79.9) and plan.increases_may_go(80.0)


def test_new_sites_dropped_sites_and_cancels_go_out_at_once() -> None:
    signals = [_sig("A", 1, 50.0, taken=1.0), _sig("B", 1, 50.0, taken=1.0)]
    # D is new to the fleet curtailment (a decrease from no limit), B is dropped (its cancel).
    plan = plan_revision(_revision(2, {"A": 50.0, "D": 40.0}, dropped=("B",)), signals, ramp_s=30.0)
    assert [(sh.site_id, cancel, low) for sh, cancel, low in plan.send_now] == [
        ("B", True, False),
        ("A", False, False),
        ("D", False, True),
    ]
    assert plan.increases == [] and plan.waiting_for == ["D"]
    cancel = _revision(3, {"A": 50.0, "D": 40.0})
    cancel.cancelled = True
    plan = plan_revision(cancel, signals, ramp_s=30.0)
    assert [(sh.site_id, c) for sh, c, _ in plan.send_now] == [("A", True), ("D", True)]
    assert plan.increases == [] and plan.waiting_for == []


def test_an_increase_in_a_moved_window_gets_an_interim_at_what_the_site_holds() -> None:
    def sig(site: str, rev: int, kw: float, end_s: float) -> FleetSiteSignal:
        return FleetSiteSignal(site, rev, kw, False, f"{site}#r{rev}", True, 0.0, 1.0, 0.0, end_s)

    held = [sig("A", 1, 150.0, 7200.0), sig("B", 1, 150.0, 7200.0)]

    def revision(end_s: float) -> FleetCurtailmentResult:
        r = _revision(2, {"A": 42.0, "B": 258.0})
        r.curtailment.start.FromSeconds(0)
        r.curtailment.end.FromSeconds(int(end_s))
        return r

    # The DSO extends the end: B's increase waits, B keeps 150 kW with the new window.
    plan = plan_revision(revision(14400.0), held, ramp_s=30.0)
    assert [sh.site_id for sh in plan.increases] == ["B"]
    assert [(sh.site_id, kw) for sh, kw in plan.interims] == [("B", 150.0)]
    # The same window (a re-split) or one inside it: no interim.
    assert plan_revision(revision(7200.0), held, ramp_s=30.0).interims == []
    assert plan_revision(revision(3600.0), held, ramp_s=30.0).interims == []


def test_an_edge_silent_for_ack_timeout_s_is_counted_at_what_it_may_hold() -> None:
    # A took revision 1 (225 kW) and not revision 2's decrease, sent at t = 100.
    signals = [
        FleetSiteSignal("A", 1, 225.0, False, "A#r1", True, 0.0, 10.0),
        FleetSiteSignal("A", 2, 4.9, True, "A#r2", True, 100.0, None),
        _sig("B", 1, 37.5, taken=10.0),
        _sig("C", 1, 37.5, taken=10.0),
    ]
    shares = {"A": (4.9, 300.0), "B": (147.5, 300.0), "C": (147.5, 300.0)}
    assert counted_sites(shares, signals, at_s=219.9, ack_timeout_s=120.0) == {}
    assert counted_sites(shares, signals, at_s=220.0, ack_timeout_s=120.0) == {"A": 225.0}
    # At most its grid limit; not when its share is no lower than that.
    assert counted_sites({"A": (4.9, 200.0)}, signals, at_s=220.0, ack_timeout_s=120.0) == {
        "A": 200.0
    }
    assert counted_sites({"A": (225.0, 300.0)}, signals, at_s=220.0, ack_timeout_s=120.0) == {}
    # Revision 3 split the rest (75 kW) over B and C: B's increase waits for C's decrease (break
    # before make among them), not for A's.
    r3 = _revision(3, {"A": 4.9, "B": 60.0, "C": 15.0})
    r3.curtailment.max_kw = 300.0
    for sh in r3.shares:
        sh.grid_limit_kw = 300.0
    plan = plan_revision(r3, signals, ramp_s=30.0)
    assert [sh.site_id for sh in plan.increases] == ["B"]
    assert plan.waiting_for == ["A", "C"] and plan.counted == {}
    signals.append(_sig("C", 3, 15.0, taken=230.0, lowered=True))
    plan = plan_revision(r3, signals, ramp_s=30.0)
    assert plan.waiting_for == [] and plan.counted == {"A": 225.0}
    assert plan.ramp_until_s == 260.0 and plan.increases_may_go(260.0)
    # Revision 2 (B and C 147.5 each) still waits for A: 225 + 295 is above 300.
    r2 = _revision(2, {"A": 4.9, "B": 147.5, "C": 147.5})
    r2.curtailment.max_kw = 300.0
    plan = plan_revision(r2, signals[:1] + signals[2:], ramp_s=30.0)
    assert plan.waiting_for == ["A"] and plan.counted == {}
