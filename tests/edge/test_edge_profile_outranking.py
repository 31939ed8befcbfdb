"""A station holding a profile of another id where ours goes (docs/ocpp.md). The central system
no longer clears it (that let the charger run uncapped until ours applied): it outranks it, one
stack level above. The real-stack test shows the feeder never goes over and that no
ClearChargingProfile reaches the station.

The real stack: the controller, the Rust core, the OCPP central system on loopback and simulated
2.0.1 stations, with ``SitePhysics`` sampling the site's true line currents every 100 ms.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from edge_testkit import FAST, held_default
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.ocpp import ProfileResult
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)

OURS_TX_DEFAULT_EVSE1 = 1_000_003  # 1,000,000 + EVSE 1 x 3 + slot 0 (docs/ocpp.md)
OLD_ID = 7  # a TxDefault id of an earlier numbering (ids by first use)
SLOW_APPLY_S = 2.5


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
        sim_a.hold_profile(held_default(sim_a.clock.now(), OURS_TX_DEFAULT_EVSE1, 16.0))
        sim_b.hold_profile(held_default(sim_b.clock.now(), OLD_ID, 16.0))

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
        assert not [a for a, _ in sim_b.received if a == "ClearChargingProfile"]
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
