"""What a charger may still hold counts: a TxDefault lowering that is not answered (a slow or
offline station) keeps its old level counted in the others' failsafe levels (the TxDefaults
every charger falls back to when the edge stops), so they do not rise into room it has not given
up; a session held by its TxDefault alone counts at its charger's maximum once the station's
TxDefaults are cleared. The controller on the Rust core with gateway doubles (which answer or
withhold each profile, report composite schedules, take clears) and a step clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from edge_testkit import GatewayAnswer, ToldGateway, counted, stepped_controller
from evcore.clock import StepClock
from evcore.edge.controller import EdgeController
from evcore.edge.grid import Curtailment
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import ConnectionEvent, StatusEvent, TransactionEvent
from evcore.ocpp.server import CompositeSchedule

# 4 chargers of 32 A, two per feeder, on a grid connection of 64 A: every level 16 A.
GRID_A = 64.0


async def _round(ctrl: EdgeController, clock: StepClock) -> None:
    await ctrl.decide("test")
    for _ in range(10):
        await asyncio.sleep(0)
    clock.advance(ctrl.cfg.settle_s + 0.1)


def _held(ctrl: EdgeController) -> dict[str, float]:
    """The TxDefault each charger holds: the last one it accepted."""
    out = {}
    for cid, c in ctrl.state.chargers.items():
        assert c.tx_default is not None, cid
        out[cid] = c.tx_default
    return out


@pytest.mark.parametrize("station", ["slow", "offline"])
async def test_others_txdefaults_rise_only_beside_what_an_unanswered_lowering_holds(
    station: str,
) -> None:
    table = depot_table(4, per_feeder=2, feeder_share=1.0, grid_share=0.5)
    assert table["nodes"][0]["phase_limit_a"] == GRID_A
    gw = ToldGateway()
    ctrl, clock = stepped_controller(table, gw)
    for _ in range(4):
        await _round(ctrl, clock)
    assert _held(ctrl) == dict.fromkeys(ctrl.state.chargers, 16.0)
    slow, f1_other, f2_a, f2_b = sorted(ctrl.state.chargers)
    # Feeder F1 (the first two chargers) curtailed to 16 A per phase: its TxDefaults go to 8 A
    # and F2's may rise to 24 A, once F1's are lower. The first charger's never is answered.
    gw.hold_chargers.add(slow)
    ctrl.post_curtailment(Curtailment("c1", "F1", 11.04, clock.now(), clock.now() + 3600))
    for i in range(6):
        await _round(ctrl, clock)
        if i == 0 and station == "offline":
            ctrl.state.chargers[slow].online = False
        held = _held(ctrl)
        assert held[slow] == 16.0  # its lowering unanswered: the old level holds
        assert sum(held.values()) <= GRID_A + 1e-9, held
        if i >= 1:
            # F1 at 16 A per phase: the first charger holds all of it; once that is known (the
            # first decision lowered both to 8 A), its neighbour's goes to 0 A.
            assert held[slow] + held[f1_other] <= 16.0 + 1e-9, held
    # What was sized beside it: F2 rose into the room F1's other charger gave up, no further.
    assert _held(ctrl)[f2_a] == _held(ctrl)[f2_b] == 24.0
    assert ctrl.failsafe[slow] == 8.0  # its own level: the lower one, still to be accepted
    # The lowering is accepted (the station answers, online again): every level the plain one.
    ctrl.state.chargers[slow].online = True
    gw.hold_chargers.clear()
    gw.release()
    for _ in range(6):
        await _round(ctrl, clock)
        held = _held(ctrl)
        assert sum(held.values()) <= GRID_A + 1e-9, held
    plain = ctrl.core.failsafe_levels(ctrl.curtailments.caps_kw(clock.now(), 0.0))
    assert plain == {slow: 8.0, f1_other: 8.0, f2_a: 24.0, f2_b: 24.0}
    assert ctrl.failsafe == plain
    assert _held(ctrl) == plain


class ReportingGateway(ToldGateway):
    """``ToldGateway`` with the station's reports (a composite schedule per charger, 16 A unless
    ``reports`` says) and clears (kept in ``cleared``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: dict[str, float] = {}
        self.cleared: list[tuple[str, Any]] = []

    async def get_composite_schedule(
        self, charger_id: str, *, duration_s: int, unit: str | None = None
    ) -> CompositeSchedule:
        limit = self.reports.get(charger_id, 16.0)
        return CompositeSchedule(charger_id, "Accepted", None, unit, [(0, limit, 3)])

    async def clear_station_profiles(self, target: str, *, purpose: Any = None) -> GatewayAnswer:
        self.cleared.append((target, purpose))
        return GatewayAnswer(True)

    async def trigger_message(self, target: str, message: str) -> None:
        return None


async def test_a_session_on_its_txdefault_counts_at_its_maximum_once_the_station_is_cleared() -> (
    None
):
    # One station with two EVSEs of 32 A.
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    for k, ch in enumerate(table["chargers"]):
        ch["ocpp_id"], ch["evse_id"] = "ST", k + 1
    gw = ReportingGateway()
    ctrl, clock = stepped_controller(table, gw)
    idle, running = sorted(ctrl.state.chargers)
    for _ in range(4):
        await _round(ctrl, clock)
    assert _held(ctrl) == {idle: 16.0, running: 16.0}
    # A session on the second EVSE runs on its TxDefault: its TxProfile is never answered.
    gw.hold.add("tx")
    ctrl.on_event(StatusEvent(running, "ST", 2, 1, "Charging", "NoError", clock.now()))
    ctrl.on_event(TransactionEvent(running, "ST", "tx1", "started", clock.now(), None, 0, 0, 0))
    await _round(ctrl, clock)
    c = ctrl.state.chargers[running]
    assert not c.tx_profile_held and c.tx_default == 16.0
    # The station reconnects; its idle EVSE reports 32 A (an earlier controller's TxDefault):
    # every TxDefault of the station is cleared, the running session's with it.
    gw.reports = {idle: 32.0}
    ctrl.on_event(ConnectionEvent("ST", True, "1.6", clock.now()))
    for _ in range(20):
        await asyncio.sleep(0)
    assert gw.cleared == [("ST", "tx_default")]
    # Its car may draw the charger's maximum now: counted there (it was counted at 16 A).
    assert c.tx_default is None
    assert counted(ctrl, running)[2] is True
    # A TxProfile goes to it at the next decision; accepted, it counts at what that says.
    n_calls = len(gw.calls)
    await _round(ctrl, clock)
    sent = [kw for cid, kw in gw.calls[n_calls:] if cid == running and kw["purpose"] == "tx"]
    assert sent, gw.calls[n_calls:]
    gw.hold.clear()
    gw.release()
    for _ in range(4):
        await _round(ctrl, clock)
    assert c.tx_profile_held
    assert counted(ctrl, running)[2] is False
    gw.waiting.clear()
