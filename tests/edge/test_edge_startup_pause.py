"""Sessions paused at the edge's start, before any TxDefault of ours is in force.

When the edge starts and its stations connect with cars plugged in (or plugging in at once),
every charger counts at its maximum until a TxDefault of ours is known in force (none sent yet,
one sent and not answered, stale ones just cleared): on a feeder that cannot take them all there,
the sessions are held at 0 A. That pause is the start-up gap's, not the allocator's choice: it
must start no ``min_off_s`` (180 s here), or every car sits at 0 A for 3 minutes although the
TxDefaults are in force a second later (the lead's end-to-end run: "sent 0 A [switching_rule]
paused: minimum off time or switch cap" from 12:56:50 to 12:59:50).

The end-to-end test runs the real parts: the controller, the Rust core, the OCPP central system
on loopback and simulated 2.0.1 stations over WebSockets, ``SitePhysics`` sampling the site's
true line currents. The bound of that window (a station that never accepts a TxDefault of ours
must not make every pause uncounted for good) is checked on the controller with the Rust core, a
step clock and a gateway double that refuses, never answers or is offline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from edge_testkit import FAST, ToldGateway, held_default, stepped_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import ConnectionEvent
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)

# The field's hysteresis: a pause counted as the allocator's holds a session off for 3 minutes.
MIN_OFF_S = 180.0
# A stale TxDefault an earlier controller left at each station, at a stack level above ours.
STALE_ID = 9001


def _site() -> dict[str, Any]:
    """F1 of 60 A per phase with two three-phase 32 A chargers: both at their maximum (64 A) do
    not fit, both at their fair share (30 A) do."""
    return depot_table(2, per_feeder=2, feeder_share=60.0 / 64.0, grid_share=1.0)


@pytest.mark.parametrize("when", ["before-connect", "after-connect"])
async def test_cars_plugged_in_at_the_edges_start_charge_once_the_txdefaults_are_in_force(
    when: str,
) -> None:
    """``before-connect``: the cars are plugged in while the stations are still offline (their
    transactions reach the edge right after the boot); ``after-connect``: as ``evcore simcp
    --plug-in`` does, the moment both stations are connected."""
    table = _site()
    cfg = EdgeConfig(**{**FAST, "min_on_s": 60.0, "min_off_s": MIN_OFF_S})
    ids = [c["id"] for c in table["chargers"]]

    def prepare(fleet: Any) -> None:
        for cid in ids:
            sim, evse = fleet.station(cid)
            sim.profiles.append(held_default(time.time(), STALE_ID, 32.0, evse=evse, stack=9))
            if when == "before-connect":
                fleet.plug_in(cid, EV(soc=0.2))

    rig = EdgeRig(table, cfg=cfg, version="2.0.1", apply_delay_s=0.1, prepare=prepare)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        if when == "after-connect":
            for cid in ids:
                rig.fleet.plug_in(cid, EV(soc=0.2))
        started = time.monotonic()
        chargers = [ctrl.state.chargers[cid] for cid in ids]

        def drawn(cid: str) -> float:
            return max(rig.fleet.connector(cid).terminal_a)

        def ours_in_force() -> bool:
            """Every charger accepted a TxDefault of ours and the edge knows it applies it."""
            now_m = ctrl.clock.monotonic()
            return all(
                c.tx_default is not None and not c.default_unapplied(now_m) for c in chargers
            )

        def paused() -> bool:
            """The edge knows both sessions and both cars were brought to 0 A by it."""
            return all(
                c.transaction_id is not None and rig.limit_at(cid) <= 0.0 and drawn(cid) <= 0.0
                for cid, c in zip(ids, chargers, strict=True)
            )

        await rig.wait_for(paused, 30, "both sessions paused at the start")
        # Until then the cars drew what the stations' stale 32 A TxDefaults allowed (64 A of
        # 60), plugged in before the edge heard of them: no setpoint of the edge's can prevent
        # that. What is checked below is everything from the pause on.
        over_before_pause = rig.physics.violations
        await rig.wait_for(ours_in_force, 30, "our TxDefaults accepted and known applied")
        in_force_at = time.monotonic()
        # Precondition: the sessions were held at 0 A at the start (counted at 32 A each: 64 A
        # of 60), so that what is checked is the cost of that pause.
        assert all(c.transaction_id is not None for c in chargers)
        pauses = [
            s.charger_id
            for s in rig.sent
            if s.purpose == "tx" and s.value <= 0 and s.left_mono <= in_force_at
        ]
        assert set(pauses) == set(ids), [(s.charger_id, s.purpose, s.value) for s in rig.sent]
        # Both cars charge soon after: the pause sat out no min_off_s (before: both held at
        # 0 A until 180 s after it; this waited 30 s and timed out).
        await rig.wait_for(
            lambda: all(drawn(cid) >= 6.0 for cid in ids),
            30,
            "both cars charging (held 180 s at 0 A: the start-up pause counted as the "
            f"allocator's; off_since {[c.off_since for c in chargers]})",
        )
        both_at = time.monotonic()
        assert both_at - in_force_at < 30.0 < MIN_OFF_S
        for c in chargers:
            assert c.switches == 0, (c.charger_id, c.switches)
        await asyncio.sleep(1.0)
        over = rig.physics.violations - over_before_pause
        assert over == 0, (
            f"{over} samples over a limit after the start-up pause, by node "
            f"{rig.physics.violations_by_node} (with {over_before_pause} before it)"
        )
        print(
            f"{when}: TxDefaults in force {in_force_at - started:.2f} s after the start, both "
            f"cars charging {both_at - in_force_at:.2f} s after that; {over_before_pause} "
            "samples over the limit before the pause (stale 32 A TxDefaults), 0 after"
        )


async def _answers(ctrl: Any) -> None:
    """Let the gateway double's answers arrive (those it holds stay unanswered)."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.mark.parametrize("station", ["unanswered", "refuses", "offline"])
async def test_a_station_that_never_accepts_a_txdefault_keeps_pauses_uncounted_only_so_long(
    station: str,
) -> None:
    """Station B holds no TxDefault of ours: counted at its maximum (32 A) on a 32 A feeder, it
    leaves nothing to the car at A, which is paused. While B's first TxDefault is on its way
    (``unanswered``, within the report wait + ``settle_s`` of its connect) that pause is the
    start-up gap's: no min_off_s (before: off_since set). Past that bound, or once B refused
    it (``refuses``, its re-sends refused too), or while B is offline, the pause is the
    allocator's, as before: a station that never accepts one must not leave every pause on the
    site uncounted for good (no min_off_s, no switch cap: flapping)."""
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    a, b = (c["id"] for c in table["chargers"])
    gw = ToldGateway()
    gw.hold_chargers = {b}
    cfg = EdgeConfig(**{**FAST, "min_off_s": MIN_OFF_S})
    ctrl, clock = stepped_controller(table, gw, cfg=cfg)
    ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
    connected_at = clock.monotonic()
    for c in (ca, cb):
        if station == "offline" and c is cb:
            c.online = False
            continue
        ctrl.on_event(ConnectionEvent(c.ocpp_id, True, "2.0.1", clock.now()))
    await ctrl.decide("test")
    await _answers(ctrl)
    assert ca.tx_default == 0.0, "A's first TxDefault: 0 A beside B at its maximum"
    assert cb.tx_default is None
    if station == "refuses":
        gw.hold_chargers.clear()
        gw.reject = {"tx_default"}
        gw.release(False)
        await _answers(ctrl)
    # A's own first TxDefault applied (settle_s passed); B's is still on its way, if at all.
    clock.advance(cfg.settle_s + 0.1)
    await ctrl.decide("test")
    await _answers(ctrl)
    bound_s = cfg.report_wait_s + cfg.settle_s
    assert clock.monotonic() - connected_at < bound_s
    assert not ca.default_unapplied(clock.monotonic())
    ctrl.state.on_status(a, "Charging")
    ctrl.state.on_transaction(a, "started", "tx-1", clock.now(), clock.monotonic())
    await ctrl.decide("test")
    await _answers(ctrl)
    assert ctrl.state.chargers[a].transaction_id == "tx-1"
    # Held at 0 A (its TxDefault, B counting at its maximum): the gap's only while B's first
    # TxDefault is on its way.
    assert ca.current == 0.0, (ca.sent, ca.current)
    if station == "unanswered":
        assert ca.off_since is None and ca.off_uncounted, (ca.off_since, ca.off_uncounted)
    else:
        assert ca.off_since is not None and not ca.off_uncounted
        assert cb.default_awaited_until is None
    # Past the bound B's TxDefault may still be on its way (or refused again and again): the
    # next session paused at A pays min_off_s.
    clock.advance(bound_s)
    for _ in range(3):
        await ctrl.decide("test")
        await _answers(ctrl)
    assert cb.tx_default is None
    assert not ctrl.state.default_gap(clock.monotonic())
    ctrl.state.on_transaction(a, "ended", "tx-1", clock.now(), clock.monotonic())
    ctrl.state.on_transaction(a, "started", "tx-2", clock.now(), clock.monotonic())
    await ctrl.decide("test")
    await _answers(ctrl)
    assert ca.transaction_id == "tx-2"
    assert ca.off_since is not None and not ca.off_uncounted, (ca.off_since, ca.off_uncounted)
    gw.release(False)
    await _answers(ctrl)
