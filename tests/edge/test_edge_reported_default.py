"""A TxDefault level taken from a station's report is not one of ours it accepted.

After a (re)connect an idle charger whose ``GetCompositeSchedule`` report shows at most its
failsafe level is counted at that level (``ChargerState.tx_default_reported``). That is the
station's own profile, which a refusal of ours may have disturbed (a 2.0.1 station that refuses
ours because it holds one of another id has it cleared). On any refusal or timeout of our
TxDefault for that charger the reported level is dropped: the charger counts at its maximum, in
the envelope and in the others' failsafe levels, until one of ours is accepted and applied.

The controller with the Rust core, on a step clock, and a gateway double.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from edge_testkit import stepped_controller
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import ConnectionEvent
from evcore.ocpp.server import CompositeSchedule


class _Result:
    def __init__(self, accepted: bool) -> None:
        self.accepted = accepted


class _Gateway:
    """Refuses TxDefaults while ``refuse`` (else accepts); reports ``report_a`` for every
    charger; answers the other calls."""

    def __init__(self) -> None:
        self.refuse = True
        self.report_a = 10.0
        self.calls: list[tuple[str, str, float]] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> _Result:
        self.calls.append((charger_id, kwargs["purpose"], float(kwargs["limit_a"])))
        return _Result(not (self.refuse and kwargs["purpose"] == "tx_default"))

    async def get_composite_schedule(
        self, charger_id: str, *, duration_s: int, unit: str | None = None
    ) -> CompositeSchedule:
        return CompositeSchedule(charger_id, "Accepted", None, unit, [(0, self.report_a, 3)])

    async def clear_station_profiles(self, target: str, purpose: str | None = None) -> None:
        return None

    async def trigger_message(self, target: str, message: str) -> None:
        return None


async def _drain(ctrl: Any) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    if ctrl._sends:
        await asyncio.gather(*ctrl._sends, return_exceptions=True)
    for _ in range(5):
        await asyncio.sleep(0)


def _idle_counted(ctrl: Any, cid: str) -> float:
    c = ctrl.state.chargers[cid]
    return float(c.idle_level(ctrl.failsafe.get(cid, 0.0), ctrl.clock.monotonic()))


@pytest.mark.parametrize("answer", ["refused", "accepted"])
async def test_a_refused_txdefault_drops_the_level_a_report_showed(answer: str) -> None:
    gw = _Gateway()
    # F1: 32 A per phase, two 32 A chargers: the plain failsafe level is 16 A each.
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2, grid_share=1.0), gw)
    a, b = sorted(ctrl.state.chargers)
    await ctrl.decide("test")  # the failsafe levels (TxDefaults refused: both at their maximum)
    await _drain(ctrl)
    clock.advance(ctrl.cfg.settle_s + 0.1)
    # The stations (re)connect; each reports 10 A, at most its level: taken as holding that.
    for cid in (a, b):
        ocpp = ctrl.state.chargers[cid].ocpp_id
        ctrl.on_event(ConnectionEvent(ocpp, True, "2.0.1", clock.now()))
    await _drain(ctrl)
    ca = ctrl.state.chargers[a]
    assert ca.tx_default == 10.0 and ca.tx_default_reported
    await ctrl.decide("test")  # precondition: levels sized on the reported TxDefaults
    assert ctrl.failsafe == {a: 16.0, b: 16.0}
    assert _idle_counted(ctrl, a) == 16.0
    gw.refuse = answer == "refused"
    gw.calls.clear()
    await _drain(ctrl)
    await ctrl.decide("test")
    await _drain(ctrl)
    assert (a, "tx_default", 16.0) in gw.calls
    if answer == "accepted":
        # One of ours accepted: the reported level is replaced by it (a raise, 10 -> 16 A).
        assert ca.tx_default == 16.0 and not ca.tx_default_reported
        assert ca.default_unapplied_until is None
        assert _idle_counted(ctrl, a) == 16.0
        return
    # Refused: what the station holds now is not known; at its maximum, in the envelope and in
    # the others' failsafe levels (before: 16 A, the levels 16 A each).
    assert ca.tx_default is None and not ca.tx_default_reported
    assert _idle_counted(ctrl, a) == 32.0
    await ctrl.decide("test")
    assert ctrl.failsafe[b] == 0.0, ctrl.failsafe
    # Accepted later: counted at its maximum until the station shows it applies it (it reports
    # its maximum: nothing applied yet).
    gw.refuse = False
    gw.report_a = 32.0
    await _drain(ctrl)
    await ctrl.decide("test")
    for _ in range(5):  # (not the station polls: on a step clock their sleeps move time)
        await asyncio.sleep(0)
    # (On the step clock the station polls' sleeps move time to the gap's end: that it opened,
    # from the acceptance, and that no report ended it, is what is checked.)
    assert ca.tx_default == 16.0 and ca.default_unapplied_until is not None
    assert ca.default_shown_for is None
