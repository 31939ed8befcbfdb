"""A stale TxDefault found on a charger that is in a session when its station reports (review of
the edge room, 2026-12-06). The report (``GetCompositeSchedule``) tells a charger's TxDefault only
while it is idle: in a session it shows the TxProfile, so a stale TxDefault above the failsafe
level there (an earlier controller's, at a stack level above ours) was never cleared. Once the
session ended it applied again while the edge counted the charger at its own TxDefault.

Real parts: the controller on the Rust core, the OCPP central system on loopback and simulated
2.0.1 stations over WebSockets (``EdgeRig``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from edge_testkit import FAST, counted, held_default
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.edge.state import ChargerState
from evcore.sim.chargepoint import SimChargePoint
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)

STALE_ID = 9001


async def _stale_default_over_a_reconnect(
    rig: EdgeRig, a: str, ca: ChargerState
) -> tuple[SimChargePoint, int]:
    """Station A goes offline; while it is away another backend leaves a 32 A TxDefault
    (``STALE_ID``) at stack level 9, above ours; A comes back. Returns A's station and EVSE."""
    sim, evse = rig.fleet.station(a)
    connections = sim.connections
    await sim.go_offline(2.0)
    await rig.wait_for(lambda: not ca.online, 10, "A offline at the edge")
    sim.profiles.append(held_default(time.time(), STALE_ID, 32.0, evse=evse, stack=9))
    await rig.wait_for(lambda: sim.connections > connections and ca.online, 20, "A back")
    return sim, evse


async def test_a_stale_txdefault_of_a_charger_in_session_at_the_report_is_cleared() -> None:
    """Station A drops off while its car charges; meanwhile another central system (a backup
    backend it failed over to, a maintenance tool) leaves a 32 A TxDefault at stack level 9,
    above ours; A reconnects with the session still running and is asked for its report."""
    # F1 of 32 A per phase with two 32 A chargers: failsafe levels about 16 A each, below the
    # stale 32 A TxDefault.
    table = depot_table(2, per_feeder=2, feeder_share=0.5, grid_share=1.0)
    ids = [c["id"] for c in table["chargers"]]
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST), version="2.0.1", apply_delay_s=0.1)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        chargers = [ctrl.state.chargers[cid] for cid in ids]
        for cid in ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.transaction_id is not None for c in chargers), 30, "both sessions"
        )
        await rig.wait_for(rig.tx_default_at_failsafe, 30, "our TxDefaults at the failsafe")
        a = ids[0]
        ca = ctrl.state.chargers[a]
        sim, evse = await _stale_default_over_a_reconnect(rig, a, ca)
        await rig.wait_for(
            lambda: a not in ctrl._report_due and ca.tx_default is not None,
            30,
            "A's report taken and a TxDefault of ours known at A",
        )
        assert ca.transaction_id is not None  # the session ran through the report
        rig.fleet.unplug(a)
        await rig.wait_for(lambda: ca.transaction_id is None, 30, "the session at A ended")

        def as_counted() -> bool:
            """The idle charger holds no more than the edge counts it at: its TxDefault (or,
            with none known in force, its maximum)."""
            counted = ca.max_value if ca.tx_default is None else ctrl.wire(a, ca.tx_default)
            return rig.limit_at(a) <= counted + 1e-6

        try:
            await rig.wait_for(as_counted, 20, "the idle charger held as the edge counts it")
        except Exception as exc:
            held = [(p.id, p.purpose, p.stack) for p in sim.profiles if p.evse == evse]
            raise AssertionError(
                f"idle {a} enforces {rig.limit_at(a):g} A, the edge counts it at its TxDefault "
                f"{ca.tx_default!r} A (failsafe {ctrl.failsafe.get(a)!r}); held {held}"
            ) from exc
        # Ours is in force at A afterwards.
        await rig.wait_for(
            lambda: ca.tx_default is not None and rig.limit_at(a) <= ca.tx_default + 1e-6,
            30,
            "our TxDefault in force at A",
        )


async def test_between_the_session_end_and_the_report_the_charger_counts_at_its_maximum() -> None:
    """The window af24306 left: once the session at A ends, the station is asked again, and
    until it answers (one round trip; held back here, as a slow link holds it) the stale 32 A
    TxDefault unseen under the session may be in force. Counted at the edge's own 16 A
    TxDefault there, B was given the room A's car could take; the envelope counts a charger
    whose profile state is unknown at its maximum. A report that gets no answer within its
    bound (1 s here) leaves it so, and the station is asked again."""
    table = depot_table(2, per_feeder=2, feeder_share=0.5, grid_share=1.0)
    ids = [c["id"] for c in table["chargers"]]
    cfg = EdgeConfig(**{**FAST, "report_wait_s": 1.0})
    rig = EdgeRig(table, cfg=cfg, version="2.0.1", apply_delay_s=0.1)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        a, b = ids
        ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
        for cid in ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: ca.transaction_id is not None and cb.transaction_id is not None,
            30,
            "both sessions",
        )
        await rig.wait_for(rig.tx_default_at_failsafe, 30, "our TxDefaults at the failsafe")
        await _stale_default_over_a_reconnect(rig, a, ca)
        await rig.wait_for(
            lambda: a not in ctrl._report_due and ca.default_unchecked,
            30,
            "A's report taken in session",
        )
        # The station's next report is held back until released (a slow link).
        gw: Any = ctrl.gateway
        report = gw.get_composite_schedule
        released = asyncio.Event()
        asked: list[str] = []

        async def slow_report(charger_id: str, **kwargs: Any) -> Any:
            asked.append(charger_id)
            await released.wait()
            return await report(charger_id, **kwargs)

        gw.get_composite_schedule = slow_report
        try:
            rig.fleet.unplug(a)
            await rig.wait_for(lambda: ca.transaction_id is None, 30, "the session at A ended")
            await rig.wait_for(lambda: a in asked, 5, "A's station asked again")
            value, _, unknown = counted(ctrl, a)
            assert unknown or value >= ca.max_value - 1e-6, (
                f"idle {a} may enforce the stale 32 A TxDefault until its report, counted at "
                f"{value:g} A (unknown {unknown}; its TxDefault {ca.tx_default!r} A)"
            )
            # A decision in the window leaves B no more than A's maximum leaves on F1 (32 A).
            await rig.wait_for(
                lambda: cb.sent is not None and cb.sent + ca.max_value <= 32.0 + 1e-6,
                5,
                "B lowered beside A at its maximum",
            )
            # No answer within the bound: still counted at its maximum, asked again.
            await rig.wait_for(lambda: asked.count(a) >= 2, 10, "A's station asked once more")
            value, _, unknown = counted(ctrl, a)
            assert unknown or value >= ca.max_value - 1e-6, (value, unknown)
        finally:
            released.set()
            gw.get_composite_schedule = report
        # Once the report is in, A's stale TxDefault is cleared and ours applies.
        await rig.wait_for(
            lambda: ca.tx_default is not None and rig.limit_at(a) <= ca.tx_default + 1e-6,
            30,
            "our TxDefault in force at A",
        )
