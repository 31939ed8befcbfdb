"""The twin on the real stack (edge + Rust core + OCPP central system over loopback WebSockets +
simulated charge points, virtual clock): short runs complete with consistent numbers, the same
scenario and seed give the same results, and every fault kind has an effect the run shows."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from evcore.sim import stack
from evcore.sim.arrivals import Arrivals, generate
from evcore.sim.runner import run_comparison
from evcore.sim.scenario import (
    CONTROLLED_POLICIES,
    FaultSpec,
    GridSignal,
    Scenario,
    load_scenario,
    parse_scenario,
    with_overrides,
)

EVCORE = [sys.executable, "-c", "import sys; from evcore.cli import main; sys.exit(main())"]
# Every policy, in the report's order; spelled out here (not scenario.POLICIES) so a change to the
# list or its order shows up as a failing test.
EVERY_POLICY = ["uncontrolled", "fair_share", "least_laxity", "planner_cost", "planner_peak"]

ok, why = stack.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"stack backend unavailable: {why}")

# Six AC chargers on one feeder that cannot carry all of them at full current: control matters.
SMALL = """
[scenario]
name = "small"
start = "2026-01-05T06:00:00Z"
duration_h = 3
seed = 5
meter_interval_s = 60
control_interval_s = 30
plan_interval_s = 900
plan_horizon_h = 3

[site]
id = "small"
phase_names = ["L1", "L2", "L3"]
voltage_ln_v = 230.0

[[nodes]]
id = "grid"
kind = "grid"
phase_limit_a = 100.0
power_limit_kw = 60.0

[[nodes]]
id = "F1"
parent = "grid"
kind = "feeder"
phase_limit_a = 63.0
{chargers}
[arrivals]
model = "statistical"
arrival_mean_h = 0.3
arrival_sd_h = 0.2
stay_mean_h = 2.2
stay_sd_h = 0.3
stay_min_h = 1.5
energy_mean_kwh = 16.0
energy_sd_kwh = 3.0
energy_min_kwh = 6.0
soc_arrival_mean = 0.3

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
max_a = 32.0
phases = 3

[tariff]
currency = "EUR"
default_price_per_kwh = 0.20
[[tariff.periods]]
start_h = 7.0
end_h = 8.0
price_per_kwh = 0.40

[demand_charge]
price_per_kw = 10.0
window_min = 15
"""

CHARGER = """
[[chargers]]
id = "cp-{i}"
parent = "F1"
wiring = "three_phase"
phases = ["L1", "L2", "L3"]
voltage_v = 230.0
min_a = 6.0
max_a = 32.0
"""


def small(**changes: Any) -> Scenario:
    text = SMALL.replace("{chargers}", "".join(CHARGER.replace("{i}", str(i)) for i in range(1, 7)))
    return replace(parse_scenario(tomllib.loads(text)), **changes)


Probe = tuple[float, Any]


def run_one(
    sc: Scenario, policy: str, probes: list[Probe] | None = None, arr: Arrivals | None = None
) -> stack.StackRun:
    run = stack.StackRun(sc, policy, arr or generate(sc), probes=probes or [])
    asyncio.run(run.run())
    return run


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "wall_seconds"}


# ---------------------------------------------------------------------------------------------
# A short run: it completes and its numbers hold together
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_comparison() -> Any:
    return run_comparison(small(), backend="stack")


def test_sim_short_run_completes_every_policy(short_comparison: Any) -> None:
    rows = short_comparison.rows()
    assert [r["policy"] for r in rows] == EVERY_POLICY
    assert {r["backend"] for r in rows} == {"stack"}
    for r in rows:
        assert r["energy_requested_kwh"] > 0
        assert r["energy_delivered_kwh"] > 0.3 * r["energy_requested_kwh"], r
    # Every controlled run went through the edge and sent profiles.
    assert all(r["setpoints_sent"] > 0 for r in rows if r["policy"] != "uncontrolled")


def test_sim_short_run_numbers_are_consistent(short_comparison: Any) -> None:
    cmp = short_comparison
    limit_kw = cmp.scenario.site.root.power_limit_kw
    for res in cmp.results:
        r = res.row()
        assert r["energy_delivered_kwh"] <= r["energy_requested_kwh"] + 1e-6
        assert 0 <= r["sessions_met"] <= r["sessions"]
        assert res.demand_charge == pytest.approx(res.peak_kw * 10.0)
        assert r["peak_instant_kw"] >= r["peak_kw"] - 1e-6
        assert r["energy_cost"] > 0
    for res in cmp.results:
        if res.policy in CONTROLLED_POLICIES:
            assert res.violations == 0, res.policy
            assert res.violations_kw == 0, res.policy
            assert res.max_utilisation <= 1.0 + 1e-9, res.policy
            assert res.peak_kw <= limit_kw + 1e-6, res.policy
            assert res.peak_instant_kw <= limit_kw + 1e-6, res.policy


def test_sim_uncontrolled_overloads_the_small_site(short_comparison: Any) -> None:
    # The control above is not vacuous: without it the feeder goes over its limit.
    unc = short_comparison.results[0]
    assert unc.policy == "uncontrolled"
    assert unc.violations > 0 and unc.max_utilisation > 1.0


def test_sim_violations_are_counted_per_sample_not_averaged(short_comparison: Any) -> None:
    # Six cars at 32 A on a 63 A feeder: every 100 ms sample over the limit counts, per phase.
    unc = short_comparison.results[0]
    assert unc.violations % 3 == 0  # balanced three-phase cars: all three phases at once
    assert unc.violations >= 3 * 10 * 60  # at least one minute of samples on three phases


def test_sim_same_scenario_and_seed_give_the_same_results(short_comparison: Any) -> None:
    again = run_comparison(small(), backend="stack", jobs=2)
    assert [_comparable(r) for r in again.rows()] == [
        _comparable(r) for r in short_comparison.rows()
    ]
    other = run_comparison(with_overrides(small(), seed=6, policies=["fair_share"]))
    assert (
        other.rows()[0]["energy_requested_kwh"]
        != short_comparison.rows()[1]["energy_requested_kwh"]
    )


def test_sim_report_html_has_the_plots_and_no_network(
    short_comparison: Any, tmp_path: Path
) -> None:
    from evcore.sim import report

    path = report.write_html(short_comparison, tmp_path / "r.html")
    html = path.read_text()
    assert html.count("<svg") >= 1 + 3 * len(short_comparison.results)
    for title in ("Site meter load", "utilisation per node", "state of charge", "setpoint"):
        assert title.lower() in html.lower(), title
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<script src" not in html


# ---------------------------------------------------------------------------------------------
# Faults injected at given times
# ---------------------------------------------------------------------------------------------
def _with_fault(kind: str, at_h: float, minutes: float, charger: str | None = "cp-1") -> Scenario:
    return small(
        faults=(FaultSpec(kind, at_h * 3600.0, minutes * 60.0, charger),),
        policies=("fair_share",),
    )


def test_sim_fault_charger_offline() -> None:
    seen: dict[str, Any] = {}

    def during(run: stack.StackRun) -> None:
        sim, _ = run._fleet.station("cp-1")
        seen["sim_connected"] = sim.connected.is_set()
        seen["edge_online"] = run._app.controller.state.chargers["cp-1"].online

    def after(run: stack.StackRun) -> None:
        seen["edge_online_after"] = run._app.controller.state.chargers["cp-1"].online

    run = run_one(
        _with_fault("charger_offline", 1.0, 20),
        "fair_share",
        [(1.1 * 3600, during), (1.6 * 3600, after)],
    )
    assert seen == {"sim_connected": False, "edge_online": False, "edge_online_after": True}
    assert run.result(0).violations == 0


def test_sim_fault_meter_stuck() -> None:
    ages: dict[str, float] = {}

    def probe(name: str) -> Any:
        def f(run: stack.StackRun) -> None:
            c = run._app.controller.state.chargers["cp-1"]
            assert c.measured_at is not None
            ages[name] = run.clock.monotonic() - c.measured_at

        return f

    sc = _with_fault("meter_stuck", 1.0, 30)
    run_one(
        sc,
        "fair_share",
        [
            (0.9 * 3600, probe("before")),
            (1.4 * 3600, probe("during")),
            (1.7 * 3600, probe("after")),
        ],
    )
    assert ages["before"] <= 2 * sc.meter_interval_s
    assert ages["during"] >= 20 * 60  # no meter value reached the edge for 20 minutes
    assert ages["after"] <= 2 * sc.meter_interval_s


def test_sim_fault_profile_ignored() -> None:
    seen: dict[str, Any] = {}

    def probe(run: stack.StackRun) -> None:
        c = run._app.controller.state.chargers["cp-1"]
        con = run._fleet.connector("cp-1")
        seen["faulted"] = c.faulted
        seen["reason"] = c.fault_reason
        seen["draw_a"] = max(con.terminal_a)

    # A curtailment lowers every setpoint while cp-1 ignores its profiles: cp-1 keeps drawing
    # what it had, long enough for the edge to judge it (ignore_after_s + fault_after_s).
    sc = replace(
        _with_fault("profile_ignored", 0.8, 60),
        grid_signals=(GridSignal("grid", 1.0 * 3600, 2.0 * 3600, 20.0, 600.0),),
    )
    run = run_one(sc, "fair_share", [(1.7 * 3600, probe)])
    assert seen["faulted"], seen
    assert "ignores its profile" in seen["reason"]
    assert run.result(0).faults_injected == ("profile_ignored@0.80h",)


def test_sim_fault_profiles_lost_on_reboot() -> None:
    seen: dict[str, Any] = {}

    def right_after(run: stack.StackRun) -> None:
        sim, _ = run._fleet.station("cp-1")
        seen["held_after_reboot"] = len(sim.profiles)

    def later(run: stack.StackRun) -> None:
        sim, _ = run._fleet.station("cp-1")
        seen["held_later"] = len(sim.profiles)

    def before(run: stack.StackRun) -> None:
        sim, _ = run._fleet.station("cp-1")
        seen["held_before"] = len(sim.profiles)

    run_one(
        _with_fault("profiles_lost_on_reboot", 1.0, 0),
        "fair_share",
        [(0.95 * 3600, before), (1.0 * 3600 + 0.001, right_after), (1.2 * 3600, later)],
    )
    assert seen["held_before"] > 0
    assert seen["held_after_reboot"] == 0  # the reboot wiped them
    assert seen["held_later"] > 0  # the edge sent them again after the boot


def test_sim_fault_edge_restart() -> None:
    seen: dict[str, Any] = {}

    def probe(name: str) -> Any:
        def f(run: stack.StackRun) -> None:
            ctrl = run._app.controller
            seen[name] = ctrl
            seen[name + "_tx"] = sum(
                c.transaction_id is not None for c in ctrl.state.chargers.values()
            )
            seen[name + "_sent"] = ctrl.stats.profiles_sent

        return f

    sc = _with_fault("edge_restart", 1.0, 0, None)
    run = run_one(sc, "fair_share", [(0.9 * 3600, probe("before")), (1.5 * 3600, probe("after"))])
    assert seen["before"] is not seen["after"]  # a new controller took over
    plugged_at_1_5h = sum(1 for s in run.arr.sessions if s.arrival_s <= 1.5 * 3600 < s.departure_s)
    assert seen["after_tx"] == plugged_at_1_5h > 0  # it knows the running sessions again
    assert seen["after_sent"] > 0  # and controls the site again
    assert run.result(0).violations == 0


def _cloud_fault(kind: str) -> Scenario:
    sc = small(policies=("planner_cost",))
    return replace(
        sc,
        faults=(FaultSpec(kind, 1.0 * 3600.0, 60 * 60.0, None),),
        # announced during the outage: it reaches the edge only over the broker
        grid_signals=(GridSignal("grid", 1.5 * 3600, 2.5 * 3600, 30.0, 1800.0),),
    )


def test_sim_fault_cloud_down() -> None:
    seen: dict[str, Any] = {}

    def probe(name: str) -> Any:
        def f(run: stack.StackRun) -> None:
            ctrl = run._app.controller
            now = run.clock.now()
            seen[name] = (ctrl._targets(now), ctrl.cloud_plan.targets_at(now))
            seen[name + "_local"] = ctrl.local_plan.targets_at(now)

        return f

    run = run_one(
        _cloud_fault("cloud_down"),
        "planner_cost",
        [(0.95 * 3600, probe("before")), (1.95 * 3600, probe("during"))],
    )
    in_outage = [t for t in run.plan_log if 3600.0 <= t < 2 * 3600.0]
    assert in_outage == [] and run.plans_held > 0
    assert any(t < 3600.0 for t in run.plan_log) and any(t >= 2 * 3600.0 for t in run.plan_log)
    used, cloud = seen["before"]
    assert used == cloud  # the cloud's plan wins while fresh
    used, _ = seen["during"]
    assert used == seen["during_local"]  # its last plan went stale: the edge's own plan rules
    # The grid signal is not the cloud's: it arrived on time (30 min before its start).
    assert run.signal_log == [(1.0 * 3600, "grid@5400")]


def test_sim_fault_broker_down() -> None:
    run = run_one(_cloud_fault("broker_down"), "planner_cost")
    assert [t for t in run.plan_log if 3600.0 <= t < 2 * 3600.0] == []
    # The curtailment announced during the outage waited for the broker: it arrived late.
    assert run.signal_log == [(2.0 * 3600, "grid@5400")]
    assert run.result(0).violations_kw > 0  # 30 kW from 1.5 h, unknown to the edge until 2 h


def test_sim_faults_every_kind_is_wired_on_the_stack() -> None:
    from evcore.sim.scenario import FAULT_KINDS

    assert set(FAULT_KINDS) == set(stack.STACK_FAULTS)


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------
def test_sim_demo_json_short(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *EVCORE,
            "demo",
            "--json",
            "--hours",
            "2",
            "--no-progress",
            "--report",
            str(tmp_path / "demo.html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert [r["policy"] for r in rows] == EVERY_POLICY
    for r in rows:
        for key in (
            "energy_requested_kwh",
            "energy_delivered_kwh",
            "violations",
            "sessions_met",
            "energy_cost",
            "peak_kw",
            "demand_charge",
            "max_utilisation",
        ):
            assert key in r, key
        assert r["energy_delivered_kwh"] <= r["energy_requested_kwh"] + 1e-6
        if r["policy"] != "uncontrolled":
            assert r["violations"] == 0
            assert r["peak_kw"] <= r["site_limit_kw"] + 1e-6
    assert (tmp_path / "demo.html").is_file()
    assert "report:" in out.stderr


def test_sim_cli_scenario_error_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        SMALL.replace("{chargers}", CHARGER.replace("{i}", "1")).replace(
            "duration_h = 3", "duration_h = -3"
        )
    )
    out = subprocess.run(
        [*EVCORE, "sim", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "[scenario].duration_h" in out.stderr


# CI runs the demo's scenario (depot, 52 s here); the other two shipped scenarios (41-43 s each)
# run with EVCORE_FULL_SCENARIOS=1: the whole CI run took 29.5 min of its 30 at session 17's end.
_FULL = os.environ.get("EVCORE_FULL_SCENARIOS") == "1"
_NOT_IN_CI = pytest.mark.skipif(not _FULL, reason="full-length scenario: EVCORE_FULL_SCENARIOS=1")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("eu-three-phase", marks=_NOT_IN_CI),
        pytest.param("workplace-208v", marks=_NOT_IN_CI),
        "depot",
    ],
)
def test_sim_planners_deliver_at_least_least_laxity(name: str) -> None:
    """Issue 8: on every shipped scenario, full length, the planner policies deliver the energy
    of least laxity first (at least 97 % of it), with no violation (about 25-45 s each with 2
    jobs). Since the envelope stopped pausing cars beside a newcomer (a lowered car kept at what
    it holds anyway), least laxity delivers 500.8 kWh on eu-three-phase (was 487.1) and the
    planners 493.1 / 486.8 (were 489.7 / 495.2): docs/twin.md."""
    sc = load_scenario(name)
    sc = with_overrides(sc, policies=["least_laxity", "planner_cost", "planner_peak"])
    cmp = run_comparison(sc, backend="stack", jobs=2)
    by = {r.policy: r for r in cmp.results}
    llf = by["least_laxity"].energy_delivered_kwh
    for p in ("planner_cost", "planner_peak"):
        assert by[p].energy_delivered_kwh >= 0.97 * llf, (
            p,
            by[p].energy_delivered_kwh,
            llf,
        )
        assert by[p].energy_delivered_kwh <= by[p].energy_requested_kwh + 1e-6
    for r in cmp.results:
        assert r.violations == 0, (r.policy, r.violations)
        assert r.violations_kw == 0, (r.policy, r.violations_kw)
        assert math.isfinite(r.peak_kw)


def test_the_twins_edge_runs_without_the_sites_outside_connections() -> None:
    """A scenario's site file may be a real site's, with a metrics port and a cloud link: the
    twin's edge must not bind that port (two policies run at once with --jobs 2) nor upload a
    simulated run to the real cloud."""
    import dataclasses

    from evcore.sim.scenario import load_scenario
    from evcore.sim.stack import edge_table

    sc = load_scenario("depot")
    raw = {
        **sc.site.raw,
        "metrics": {"listen": "127.0.0.1:9464"},
        "cloud": {"url": "cloud.example.net:7443", "insecure": True},
        "api": {"listen": "127.0.0.1:50051"},
    }
    sc = dataclasses.replace(sc, site=dataclasses.replace(sc.site, raw=raw))
    table = edge_table(sc, "fair_share")
    assert not {"metrics", "cloud", "api", "bus", "store"} & set(table)
    assert table["site"] == raw["site"] and table["ocpp"]["port"] == 0
