"""A station's profile of another id cleared to make room for ours (docs/ocpp.md,
``ProfileClearing`` / ``ProfileCleared``): from the clear until ours is accepted and applied the
charger may draw its maximum (a TxDefault cleared) or what its TxDefault allows (a TxProfile
cleared), and the edge counts it there, in the envelope and in the others' failsafe levels.

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


async def test_a_txdefault_cleared_under_an_old_id_counts_at_the_maximum_until_ours_applies() -> (
    None
):
    """The review's designed case (2026-12-05): station B holds a TxDefault of an old id at the
    failsafe level (16 A), so it reports 16 A and refuses ours (K01.FR.06); the central system
    clears the old one and resends ours, accepted, which B applies 2.5 s later. Meanwhile B allows
    its maximum (32 A). Cars plug into both chargers 0.5 s after the acceptance. Before the fix
    the edge counted B at 16 A (no gap: it had a TxDefault level from the report) and gave A its
    16 A: 48 A on the 32 A feeder. (On the review's 20 A feeder a 32 A charger alone exceeds the
    feeder once its TxDefault is cleared: nothing the edge sends can prevent that.)"""
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

        def b_default_accepted() -> bool:
            return any(
                isinstance(ev, ProfileResult)
                and ev.charger_id == b
                and ev.purpose == "tx_default"
                and ev.accepted
                for _, ev in events
            )

        await rig.wait_for(b_default_accepted, 20, "B accepted a TxDefault of ours")
        clearing = [ev for _, ev in events if isinstance(ev, ProfileClearing)]
        assert [(ev.charger_id, ev.purpose, ev.profile_id) for ev in clearing] == [
            (b, "tx_default", OLD_ID)
        ]
        assert [ev.status for _, ev in events if isinstance(ev, ProfileCleared)] == ["Accepted"]
        await asyncio.sleep(0.5)
        # Precondition: B holds nothing applied yet (it allows its maximum).
        assert rig.limit_at(b) == 32.0
        rig.fleet.plug_in(a, EV(soc=0.2))
        rig.fleet.plug_in(b, EV(soc=0.2))
        peak_b = 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < SLOW_APPLY_S + 2.0:
            peak_b = max(peak_b, max(rig.fleet.connector(b).terminal_a))
            await asyncio.sleep(0.05)
        # The hazard was real: B's car drew its maximum while ours was not applied.
        assert peak_b >= 31.0, peak_b
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
