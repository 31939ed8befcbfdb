"""From a plan to the allocator's targets (``evcore.edge.planning``): the room chargers outside the
plan hold is left free, and the room a plan leaves unused is handed to its sessions without a
higher peak, a dearer step, a current under the minimum or beyond any limit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
from evcore.edge.planning import held_outside_plan, leave_held_room, schedule_rows
from evcore.edge.state import ChargerState
from evcore.planner import PlanCharger, Planner, PlanNode, PlanRequest, PlanSession
from evcore.site import load_site

T0 = 1_700_000_000.0
H = 3600.0


def _request(prices: list[float], sessions: list[PlanSession], limit_a: float = 32.0) -> Any:
    return PlanRequest(
        start=T0,
        step_s=[H] * len(prices),
        price_per_kwh=prices,
        nodes=[PlanNode(id="root", phase_limit_a=limit_a)],
        chargers=[
            PlanCharger(
                id=cid,
                parent="root",
                wiring="line_to_neutral",
                phases=("L1",),
                voltage_v=230.0,
                min_a=6.0,
                max_a=32.0,
            )
            for cid in ("c1", "c2")
        ],
        sessions=sessions,
    )


def _result(rows: dict[tuple[str, str], list[float]], peak_kw: float) -> Any:
    """A planner result with the given targets (session, charger) -> per step."""
    cols: dict[str, list[Any]] = {k: [] for k in ("session_id", "charger_id", "step_start")}
    cols.update(step_s=[], target_a=[], target_w=[])
    for (sid, cid), targets in rows.items():
        for k, t in enumerate(targets):
            cols["session_id"].append(sid)
            cols["charger_id"].append(cid)
            cols["step_start"].append(int((T0 + k * H) * 1e6))
            cols["step_s"].append(H)
            cols["target_a"].append(t)
            cols["target_w"].append(None)
    batch = pa.RecordBatch.from_pydict(
        cols,
        schema=pa.schema(
            [
                ("session_id", pa.utf8()),
                ("charger_id", pa.utf8()),
                ("step_start", pa.timestamp("us", tz="UTC")),
                ("step_s", pa.float64()),
                ("target_a", pa.float64()),
                ("target_w", pa.float64()),
            ]
        ),
    )
    return SimpleNamespace(schedule=batch, summary={"peak_kw": peak_kw})


def _targets(rows: dict[str, list[tuple[float, float, float]]], cid: str) -> list[float]:
    return [round(t, 6) for _, _, t in sorted(rows[cid])]


def test_fill_hands_the_room_under_the_plans_peak_to_the_session_leaving_first() -> None:
    # Peak 16 A x 230 V = 3.68 kW. Step 0 holds 12 A, step 1 6 A, step 2 10 A: the room goes to
    # s2 (leaves at 2 h) first, then to s1 where no later step is cheaper.
    sessions = [
        PlanSession("s1", "c1", T0, T0 + 3 * H, 10.0),
        PlanSession("s2", "c2", T0, T0 + 2 * H, 5.0),
    ]
    req = _request([0.2, 0.2, 0.1], sessions)
    res = _result({("s1", "c1"): [6.0, 6.0, 10.0], ("s2", "c2"): [6.0, 0.0]}, peak_kw=3.68)
    rows = schedule_rows(req, res)
    # s2: +4 A in step 0 (the peak binds); in step 1 up to the peak (10 A, above its minimum).
    assert _targets(rows, "c2") == [10.0, 10.0]
    # s1: steps 0-1 are dearer than its step 2 (0.1): kept; step 2: up to the peak (16 A).
    assert _targets(rows, "c1") == [6.0, 6.0, 16.0]
    # Without the fill: the plan as it is.
    plain = schedule_rows(req, res, fill=False)
    assert _targets(plain, "c1") == [6.0, 6.0, 10.0]
    assert _targets(plain, "c2") == [6.0, 0.0]


def test_fill_keeps_every_limit_the_minimum_and_the_energy_wanted() -> None:
    sessions = [
        PlanSession("s1", "c1", T0, T0 + 2 * H, 1.0),  # 1 kWh: 6 A for 1 h is 1.38 kWh already
        PlanSession("s2", "c2", T0, T0 + 2 * H, 20.0),
    ]
    # A 20 A line, a plan peak far above it: the line binds, not the peak.
    req = _request([0.2, 0.2], sessions, limit_a=20.0)
    res = _result({("s1", "c1"): [6.0, 0.0], ("s2", "c2"): [10.0, 10.0]}, peak_kw=100.0)
    rows = schedule_rows(req, res)
    assert _targets(rows, "c1") == [6.0, 0.0]  # never beyond the energy it wants
    assert _targets(rows, "c2") == [14.0, 20.0]  # 20 A line: 6 + 14, then 20
    # A paused session is started only at its minimum or more: 4 A of room is not enough.
    res = _result({("s1", "c1"): [0.0, 0.0], ("s2", "c2"): [16.0, 16.0]}, peak_kw=100.0)
    req = _request([0.2, 0.2], [PlanSession("s1", "c1", T0, T0 + 2 * H, 9.0), sessions[1]], 20.0)
    rows = schedule_rows(req, res)
    assert _targets(rows, "c1") == [0.0, 0.0]
    assert _targets(rows, "c2") == [20.0, 20.0]


SITE: dict[str, Any] = {
    "site": {"id": "t", "phase_names": ["L1", "L2", "L3"], "voltage_ln_v": 230.0},
    "nodes": [
        {
            "id": "grid",
            "kind": "grid",
            "phase_limit_a": 100.0,
            "power_limit_kw": 60.0,
            "other_load_max_a": [10.0, 10.0, 10.0],
        },
        {"id": "F1", "parent": "grid", "kind": "feeder", "phase_limit_a": 63.0},
    ],
    "chargers": [
        {
            "id": cid,
            "parent": "F1",
            "wiring": wiring,
            "phases": phases,
            "voltage_v": 230.0,
            "min_a": 6.0,
            "max_a": 32.0,
        }
        for cid, wiring, phases in (
            ("idle", "three_phase", ["L1", "L2", "L3"]),
            ("fault", "line_to_neutral", ["L2"]),
            ("busy", "three_phase", ["L1", "L2", "L3"]),
            ("fresh", "line_to_neutral", ["L3"]),
        )
    ],
}


def _state(cid: str, **kw: Any) -> ChargerState:
    c = ChargerState(cid, cid, False, 6.0, 32.0)
    c.profile_unknown = False
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_room_held_outside_the_plan_is_taken_off_the_limits() -> None:
    site = load_site(SITE)
    chargers = {
        # idle: counted at the highest of its failsafe level and its TxDefault
        "idle": _state("idle", tx_default=8.0),
        "fault": _state("fault", faulted=True, transaction_id="t1"),  # at its maximum
        "busy": _state("busy", transaction_id="t2"),  # in the plan: the plan's own
        "fresh": _state("fresh"),  # never accepted a TxDefault: its maximum
    }
    held = held_outside_plan(site, chargers, {"idle": 10.0}, {"busy"})
    amps, kw = held["F1"]
    assert amps == pytest.approx([10.0, 10.0 + 32.0, 10.0 + 32.0])
    assert kw == pytest.approx((10.0 * 3 * 230.0 + 32.0 * 230.0 + 32.0 * 230.0) / 1000.0)
    assert held["grid"] == held["F1"]  # the whole subtree
    nodes = [
        PlanNode("grid", phase_limit_a=[100.0] * 3, other_load_a=[10.0] * 3, power_limit_kw=60.0),
        PlanNode("F1", parent="grid", phase_limit_a=[63.0] * 3, power_limit_kw=[30.0, 5.0]),
    ]
    out = {n.id: n for n in leave_held_room(nodes, held)}
    assert out["grid"].phase_limit_a == pytest.approx([90.0, 58.0, 58.0])
    assert out["grid"].power_limit_kw == pytest.approx(60.0 - kw)
    assert out["F1"].phase_limit_a == pytest.approx([53.0, 21.0, 21.0])
    # Never below the node's own other load (0 here): a step with no room plans 0 there, and the
    # plan is still made.
    assert out["F1"].power_limit_kw == pytest.approx([30.0 - kw, 0.0], abs=2e-3)
    req = PlanRequest(
        start=T0,
        step_s=[H, H],
        price_per_kwh=0.1,
        nodes=list(out.values()),
        chargers=[
            PlanCharger(
                "busy", "F1", "three_phase", ("L1", "L2", "L3"), 230.0, min_a=6.0, max_a=32.0
            )
        ],
        sessions=[PlanSession("s", "busy", T0, T0 + 2 * H, 20.0)],
    )
    res = Planner().plan(req, 5.0)
    assert res.status == "optimal"
    t = res.targets_at(T0 + 1.5 * H)["busy"][0]
    assert t is not None and t < 6.0  # no room in the second step: nothing planned there
