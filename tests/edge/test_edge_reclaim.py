"""Headroom reclaim and the room that frees: a car that draws all it was sent is offered its full
share as soon as room frees. Before, its own reading capped it at draw + ``margin_a`` (2 A), so
when the car beside it drew less it climbed 2 A per meter reading (20 → 32 A in six readings; a
minute apart, six minutes of a 12 A gap). The edge now tells the allocator which setpoint each
reading was taken under (``read_under_a``: the lowest in force over the 15 s before it, as the
car may still be ramping after a raise); a reading showing the car at it does not cap.

Runs the edge against simulated stations over real OCPP WebSockets, on the wall clock (the
reclaim only trusts readings taken ``[edge] reclaim_ramp_s`` after a session turned on: 8 s here,
instead of the default 30 s, and the test takes about 25 s).
"""

from __future__ import annotations

import asyncio

import pytest
from edge_testkit import FAST
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(150)

FEEDER_A = 40.0
RAMP_S = 8.0


async def test_a_car_drawing_all_it_was_sent_takes_the_room_its_neighbour_frees() -> None:
    # Two three-phase 32 A chargers on a 40 A feeder: 20 A each while both charge.
    table = depot_table(
        2, per_feeder=2, feeder_share=FEEDER_A / 64.0, grid_share=1.0, site_id="reclaim-rise"
    )
    rig = EdgeRig(table, cfg=EdgeConfig(**{**FAST, "reclaim_ramp_s": RAMP_S}))
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        a, b = rig.fleet.charger_ids
        cars = {a: EV(soc=0.2), b: EV(soc=0.2)}
        for cid, car in cars.items():
            rig.fleet.plug_in(cid, car)
        await rig.wait_for(
            lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 15, "sessions"
        )

        def draw(cid: str) -> float:
            i = rig.fleet.charger_ids.index(cid)
            return float(rig.fleet.terminal_currents()[i, 0])

        await rig.wait_for(
            lambda: abs(draw(a) - 20.0) < 0.5 and abs(draw(b) - 20.0) < 0.5, 20, "20 A each"
        )
        # Past the reclaim's ramp (RAMP_S after the session turned on) and 15 s after the last
        # setpoint left, a's readings of 20 A count: they capped it at 22 A before.
        state = ctrl.state.chargers[a]
        last_sent = state.sent_log[-1][0] if state.sent_log else 0.0
        started = max((state.on_since or 0.0) + RAMP_S, last_sent + 15.0)
        await asyncio.sleep(max(0.0, started + 2.0 - rig.clock.monotonic()))
        assert abs(draw(a) - 20.0) < 0.5
        n_sent = len(rig.sent)
        # b's car throttles itself to 4 A (its battery heating, say): b is reclaimed to its 6 A
        # minimum and a may have the rest of the feeder (34 A, its maximum 32 A).
        cars[b].onboard_limit_a = 4.0
        await rig.wait_for(lambda: draw(a) > 31.0, 20, f"{a} at its 32 A")
        raises = [s.value for s in rig.sent[n_sent:] if s.charger_id == a and s.purpose == "tx"]
        # One step, not 22, 24, ... 32.
        assert raises and raises[0] == pytest.approx(32.0, abs=0.01), raises
        # And against the real line currents, the feeder was never over its 40 A.
        assert rig.physics.samples > 20
        assert rig.physics.violations == 0, rig.physics.violations_by_node
