"""A station holding a profile of another id where ours goes (docs/ocpp.md). The central system
no longer clears it (that let the charger run uncapped until ours applied): it outranks it, one
stack level above. The real-stack test shows the feeder never goes over. The edge's handling of
``ProfileClearing`` / ``ProfileCleared`` (count at the maximum, or at the TxDefault, from a clear
until ours is accepted and applied) stays as a defence, tested here with the events fed directly.

The real stack: the controller, the Rust core, the OCPP central system on loopback and simulated
2.0.1 stations, with ``SitePhysics`` sampling the site's true line currents every 100 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from edge_testkit import FAST, ToldGateway, stepped_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.dispatch import Change, ChangeKind
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.ocpp import ProfileCleared, ProfileClearing, ProfileResult
from evcore.sim.chargepoint import HeldProfile
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)

OURS_TX_DEFAULT_EVSE1 = 1_000_003  # 1,000,000 + EVSE 1 x 3 + slot 0 (docs/ocpp.md)
OLD_ID = 7  # a TxDefault id of an earlier numbering (ids by first use)
SLOW_APPLY_S = 2.5


def _held_default(sim: Any, pid: int, limit_a: float) -> HeldProfile:
    now = sim.clock.now()
    return HeldProfile(
        id=pid,
        evse=1,
        purpose="default",
        stack=1,
        tx_id=None,
        kind="Absolute",
        valid_from=None,
        valid_to=None,
        start=now,
        duration=None,
        unit="A",
        periods=[(0.0, limit_a, 3)],
        received_at=now,
    )


async def test_a_txdefault_held_under_an_old_id_is_outranked_and_the_feeder_never_goes_over() -> (
    None
):
    """The reviews' designed case (2026-12-05): station B holds a TxDefault of an old id at the
    failsafe level (16 A) at our stack level, so it refuses ours (K01.FR.06). The central system
    once cleared the old one and resent ours, and B allowed its maximum (32 A) until ours applied
    2.5 s later: with cars plugged in at that moment, 48 A on the 32 A feeder (the second review
    plugged them in at the clear: 72 samples over). Now ours is resent one stack level above the
    old one, so B goes from the old 16 A straight to ours and never runs uncapped. Cars plug in
    as soon as the stations are connected, before B accepts a profile of ours."""
    table = depot_table(2, per_feeder=2, grid_share=1.0)  # F1: 32 A, two 32 A chargers
    a, b = (c["id"] for c in table["chargers"])
    cfg = EdgeConfig(**{**FAST, "settle_s": 6.0})

    def prepare(fleet: Any) -> None:
        sim_a, _ = fleet.station(a)
        sim_b, _ = fleet.station(b)
        # What an earlier run left: ours (stable id) on A, an old-numbering id on B.
        sim_a.hold_profile(_held_default(sim_a, OURS_TX_DEFAULT_EVSE1, 16.0))
        sim_b.hold_profile(_held_default(sim_b, OLD_ID, 16.0))

    rig = EdgeRig(
        table,
        cfg=cfg,
        version="2.0.1",
        apply_delay_s=0.1,
        apply_delays_s={b: SLOW_APPLY_S},
        prepare=prepare,
    )
    events: list[tuple[float, Any]] = []
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        rig.central.add_listener(lambda ev: events.append((time.monotonic(), ev)))
        sim_b, _ = rig.fleet.station(b)
        rig.fleet.plug_in(a, EV(soc=0.2))
        rig.fleet.plug_in(b, EV(soc=0.2))

        def b_default_accepted() -> bool:
            return any(
                isinstance(ev, ProfileResult)
                and ev.charger_id == b
                and ev.purpose == "tx_default"
                and ev.accepted
                for _, ev in events
            )

        peak_b = 0.0
        t0 = time.monotonic()
        while not b_default_accepted() and time.monotonic() - t0 < 20:
            peak_b = max(peak_b, max(rig.fleet.connector(b).terminal_a))
            await asyncio.sleep(0.02)
        assert b_default_accepted(), "B accepted a TxDefault of ours"
        t1 = time.monotonic()
        while time.monotonic() - t1 < SLOW_APPLY_S + 1.0:
            peak_b = max(peak_b, max(rig.fleet.connector(b).terminal_a))
            await asyncio.sleep(0.02)
        # Never above the old profile's 16 A (nor ours): B was never uncapped.
        assert peak_b <= 16.0 + 1e-6, peak_b
        # Nothing was cleared: the old profile stays, ours sits one level above it.
        assert not any(isinstance(ev, ProfileClearing | ProfileCleared) for _, ev in events)
        levels = {q.id: q.stack for q in sim_b.profiles}
        assert levels.get(OLD_ID) == 1 and levels.get(OURS_TX_DEFAULT_EVSE1) == 2, levels
        assert rig.physics.violations == 0, (
            f"{rig.physics.violations} samples over a limit, peak "
            f"{float(rig.physics.peak_a.max()):g} A, by node {rig.physics.violations_by_node}"
        )
        # And then both charge.
        await rig.wait_for(
            lambda: min(max(rig.fleet.connector(c).terminal_a) for c in (a, b)) >= 6.0,
            30,
            "both cars charging",
        )
        assert rig.physics.violations == 0, rig.physics.violations_by_node


async def _round(ctrl: Any, clock: Any, advance_s: float) -> None:
    await ctrl.decide("test")
    for _ in range(5):
        await asyncio.sleep(0)
    clock.advance(advance_s)


def _counted(ctrl: Any, cid: str) -> tuple[float, bool]:
    """What the core's input counts ``cid`` at and whether as unknown (at its maximum)."""
    now_m = ctrl.clock.monotonic()
    cols = ctrl.core._columns(
        ctrl.state,
        now_mono=now_m,
        failsafe=ctrl.failsafe,
        requested={},
        now_wall=ctrl.clock.now(),
        cfg=ctrl.cfg,
    )
    i = list(cols["charger_id"]).index(cid)
    return float(cols["last_sent_a"][i]), bool(cols["profile_unknown"][i])


@pytest.mark.parametrize("nothing_cleared", [False, True], ids=["cleared", "nothing-cleared"])
async def test_a_txprofile_cleared_counts_its_session_at_its_txdefault_until_ours_applies(
    nothing_cleared: bool,
) -> None:
    """A session holding a TxProfile of ours at 4 A while its TxDefault allows 16 A: once a
    TxProfile of another id is being cleared its car may draw 16 A, until a TxProfile of ours is
    accepted and ``settle_s`` passed. ``ProfileCleared`` with nothing cleared ends it at once."""
    gw = ToldGateway()
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2, grid_share=1.0), gw)
    a, _ = sorted(ctrl.state.chargers)
    for _ in range(4):
        await _round(ctrl, clock, ctrl.cfg.settle_s + 0.1)
    assert ctrl.failsafe_is_plain() and ctrl.failsafe[a] == 16.0
    ca = ctrl.state.chargers[a]
    ctrl.state.on_status(a, "Charging")
    ctrl.state.on_transaction(a, "started", "tx-a", clock.now(), clock.monotonic())
    # The session holds a TxProfile of ours at 4 A (booked as the controller books one).
    ctrl.state.on_sent(a, 4.0, clock.monotonic(), clock.now() + 30.0, 16.0)
    ctrl.state.on_result(a, 4.0, True)
    assert ca.tx_profile_held and _counted(ctrl, a) == (4.0, False)
    gw.hold = {"tx"}
    ctrl.on_event(ProfileClearing(a, ca.ocpp_id, 1, "tx", 9, clock.now()))
    assert _counted(ctrl, a) == (16.0, False)
    if nothing_cleared:
        ctrl.on_event(ProfileCleared(a, ca.ocpp_id, 1, "tx", 9, clock.now(), "Unknown"))
        assert ca.tx_profile_held and _counted(ctrl, a) == (4.0, False)
        return
    ctrl.on_event(ProfileCleared(a, ca.ocpp_id, 1, "tx", 9, clock.now(), "Accepted"))
    assert _counted(ctrl, a)[0] >= 16.0
    # Ours is sent again (as the central system's resend would be), at 4 A.
    ctrl._send_all(99, [("tx", Change(a, 4.0, 4.0, ChangeKind.REFRESH), clock.now() + 30.0)], 0)
    for _ in range(3):
        await asyncio.sleep(0)
    assert _counted(ctrl, a)[0] >= 16.0
    gw.release(True)
    for _ in range(5):
        await asyncio.sleep(0)
    # Accepted, not applied: still at its TxDefault for settle_s.
    clock.advance(ctrl.cfg.settle_s - 0.5)
    assert _counted(ctrl, a)[0] >= 16.0
    clock.advance(1.0)
    assert _counted(ctrl, a) == (4.0, False)
