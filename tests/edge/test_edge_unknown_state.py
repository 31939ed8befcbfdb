"""Lower before raise for a charger whose profile state is unknown (review finding M4).

Through real sockets: the controller, the Rust core, the OCPP central system on loopback and the
simulated stations, with ``SitePhysics`` counting violations. A re-send to a charger whose state
is unknown is counted by the envelope at the charger's maximum, so it squeezes the others; but on
the wire the re-send may be a *raise* of what the charger really holds. It must therefore wait,
like an increase, until the others' decreases of that decision were accepted.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from edge_testkit import FAST
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import SentProfile
from evcore.edge.dispatch import ChangeKind
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.ocpp import ProfileResult
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)


async def test_a_resend_to_a_charger_of_unknown_state_waits_for_the_others_decreases() -> None:
    # One feeder of 32 A per phase with two 32 A chargers (the grid does not bind).
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST), apply_delay_s=0.3)
    accepted_at: list[tuple[str, float, float | None]] = []  # (charger, monotonic, limit)

    def on_result(ev: Any) -> None:
        if isinstance(ev, ProfileResult) and ev.purpose == "tx" and ev.accepted:
            accepted_at.append((ev.charger_id, time.monotonic(), ev.limit_a))

    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        rig.central.add_listener(on_result)
        a, b = rig.fleet.charger_ids
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        for cid in (a, b):
            rig.fleet.plug_in(cid, EV(soc=0.2))
        ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
        await rig.wait_for(
            lambda: all(
                c.transaction_id and c.accepted and c.sent and c.sent >= 15 for c in (ca, cb)
            ),
            20,
            "both charging at their share",
        )
        assert (ca.sent or 0) + (cb.sent or 0) <= 32 + 1e-6
        # A's profile state becomes unknown, as a boot with no usable report leaves it. It still
        # holds its share on the wire; counted at its maximum (32 A) it leaves B nothing, and its
        # own re-send may be a raise of what it holds.
        n_sent = len(rig.sent)
        held_a = ca.holding or 0.0
        ca.profile_unknown = True
        ca.needs_resend = True
        ctrl.notify("boot")
        await rig.wait_for(
            lambda: any(s.charger_id == a and s.purpose == "tx" for s in rig.sent[n_sent:]),
            20,
            "A's re-send",
        )
        after: list[SentProfile] = rig.sent[n_sent:]
        b_down = next(
            s
            for s in after
            if s.charger_id == b and s.purpose == "tx" and s.kind is ChangeKind.DECREASE
        )
        a_resend = next(s for s in after if s.charger_id == a and s.purpose == "tx")
        assert a_resend.value > held_a + 1.0  # on the wire a raise of what A holds
        # B's decrease left first, in an earlier decision, and A's re-send only after B's
        # charger accepted it.
        assert a_resend.decision > b_down.decision
        b_accepted = [t for cid, t, lim in accepted_at if cid == b and lim == b_down.value // 1]
        assert b_accepted, accepted_at
        assert a_resend.wire_mono is not None and a_resend.wire_mono >= min(b_accepted)
        await rig.wait_for(lambda: ca.accepted and not ca.profile_unknown, 10, "A known again")
        await rig.wait_for(lambda: True, 1, "settle")
        assert rig.physics.violations == 0
