"""A charger's first TxDefault of ours: accepted is not applied.

Through real sockets: the controller, the Rust core, the OCPP central system on loopback and the
simulated stations, with ``SitePhysics`` sampling the site's true line currents every 100 ms.
Until a station applies the first TxDefault of ours it accepted (after the edge starts, or the
station boots), a car plugged into that charger draws the charger's maximum; the edge must count it
there until the station shows it applies the TxDefault, and the sessions that start in that gap
must not pay more than the gap (no min_off_s, no switch) once it is over.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from edge_testkit import FAST, settle, stepped_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)

# The slow station applies what it accepted this long after; the other one at once.
SLOW_APPLY_S = 2.5
FAST_APPLY_S = 0.1


@pytest.mark.parametrize("stays_slow", [False, True], ids=["then-fast", "stays-slow"])
async def test_a_car_plugged_in_before_the_first_txdefault_applies_is_covered(
    stays_slow: bool,
) -> None:
    """``stays-slow``: the slow station keeps applying 2.5 s after it accepts. Then a raise it
    has not applied yet can be overtaken by a decrease (headroom reclaimed from a car drawing
    less); a reading below the decrease proves nothing there, so the increases behind it wait
    ``settle_s`` (before, that reading released them and the feeder went to 36 A of 32)."""
    # One feeder of 32 A per phase with two 32 A chargers (the grid does not bind): at the edge's
    # start both count at their maximum, so both first TxDefaults are 0 A.
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    slow, fast = (c["id"] for c in table["chargers"])
    # The field's hysteresis (a pause would hold a session off for 3 min) and a settle time
    # longer than the slow station takes, so that only the station's own report ends the gap early.
    cfg = EdgeConfig(**{**FAST, "settle_s": 6.0, "min_on_s": 60.0, "min_off_s": 180.0})
    rig = EdgeRig(table, cfg=cfg, apply_delay_s=FAST_APPLY_S, apply_delays_s={slow: SLOW_APPLY_S})
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        limit_a = 32.0
        cs, cf = ctrl.state.chargers[slow], ctrl.state.chargers[fast]
        sim_slow, evse_slow = rig.fleet.station(slow)

        def slow_default_applied() -> bool:
            return any(p.purpose == "default" and p.evse == evse_slow for p in sim_slow.profiles)

        await rig.wait_for(
            lambda: cs.tx_default is not None and cf.tx_default is not None,
            20,
            "both chargers accepted their first TxDefault",
        )
        accepted_at = time.monotonic()
        # The fast station applies its TxDefaults at once (and a raise to 16 A, if the edge sends
        # one, within 0.1 s); the slow one still lets a car draw its maximum.
        await asyncio.sleep(0.8)
        assert not slow_default_applied(), "the slow station applied its TxDefault too early"
        for cid in (slow, fast):
            rig.fleet.plug_in(cid, EV(soc=0.2))
        plugged_at = time.monotonic()
        await rig.wait_for(slow_default_applied, 10, "the slow station applies its TxDefault")
        applied_at = time.monotonic()
        if not stays_slow:
            # From here on the slow station applies what it accepts at once, like the other:
            # what is measured below is the cost of the first TxDefault's gap, not of a slow
            # station.
            sim_slow.apply_delay_s = FAST_APPLY_S

        def drawn(cid: str) -> float:
            return max(rig.fleet.connector(cid).terminal_a)

        # Both charge once the gap is over: the car on the fast charger was held at 0 A while the
        # one on the slow charger drew its maximum, and neither sits out min_off_s for it.
        await rig.wait_for(lambda: drawn(fast) >= 6.0, 30, "the fast charger's car charging")
        fast_at = time.monotonic()
        await rig.wait_for(
            lambda: drawn(slow) >= 6.0 and drawn(fast) >= 6.0 and not ctrl.pending,
            30,
            "both cars charging",
        )
        both_at = time.monotonic()
        await asyncio.sleep(1.0)
        assert rig.physics.violations == 0, (
            f"{rig.physics.violations} samples over a limit, peak "
            f"{float(rig.physics.peak_a.max()):g} A, by node {rig.physics.violations_by_node}"
        )
        assert float(rig.physics.peak_a.max()) <= limit_a + 1e-6
        # What the gap cost: after the slow station applied its TxDefault, the edge learns it from
        # the station's report and then raises both. Not settle_s after the first TxDefault, and
        # no min_off_s or switch for the session held at 0 A meanwhile.
        timing = (
            f"fast charging {fast_at - applied_at:.2f} s and both {both_at - applied_at:.2f} s "
            f"after the slow TxDefault applied ({applied_at - plugged_at:.2f} s after the "
            f"plug-in, {plugged_at - accepted_at:.2f} s after acceptance)"
        )
        # The report comes within a second of applying (polls 0.2 s, 0.4 s, ... apart), the fast
        # station applies at once: well before settle_s (6 s) and min_off_s (180 s). Both settled
        # (nothing pending) may take settle_s more: a car raised before it draws is read at 0 A
        # and its headroom taken back (the allocator's reclaim, as for any new session), and
        # that decrease settles by time. A station that stays slow adds its own 2.5 s to apply.
        assert fast_at - applied_at <= 2.5, timing
        assert both_at - applied_at <= 3.5 + cfg.settle_s + (SLOW_APPLY_S if stays_slow else 0), (
            timing
        )
        assert cs.switches == 0 and cf.switches == 0
        assert cs.off_since is None and cf.off_since is None
        # The edge knows what each car is held to. Both sessions started on their TxDefault (0 A)
        # and hold no TxProfile: raising their TxDefaults at the end of the gap would raise the
        # cars behind the edge, which counted them at 0 A while they drew 16 A and marked both
        # suspect (ignoring their profile) ignore_after_s later. Each gets its TxProfile first.
        await asyncio.sleep(cfg.ignore_after_s + 1.0)
        for c, cid in ((cs, slow), (cf, fast)):
            assert c.suspect_since is None and not c.faulted, (cid, c.fault_reason)
            assert c.holding is not None and drawn(cid) <= c.holding + cfg.ignore_threshold_a, (
                cid,
                drawn(cid),
                c.holding,
            )
        assert rig.physics.violations == 0, rig.physics.violations_by_node


class _GatewayNotingSessions:
    """Accepts every profile at once; notes, for each one sent, whether the charger's session
    held a TxProfile of ours that it had accepted at that moment."""

    def __init__(self) -> None:
        self.ctrl: Any = None
        self.calls: list[tuple[str, str, bool]] = []  # (charger, purpose, session held a profile)

    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        c = self.ctrl.state.chargers[charger_id]
        self.calls.append((charger_id, kwargs["purpose"], c.tx_profile_held))

        class _Result:
            accepted = True

        return _Result()


async def test_a_session_on_its_txdefault_gets_a_txprofile_before_its_txdefault_changes() -> None:
    """A car that started on its charger's TxDefault (its setpoint never differed from it, so no
    TxProfile left) draws what that TxDefault allows: a TxDefault change is a change of what
    flows now. Its TxProfile leaves first, the TxDefault once that was accepted."""
    from evcore.edge.grid import Curtailment

    gw = _GatewayNotingSessions()
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2), gw)
    gw.ctrl = ctrl
    await settle(ctrl, clock, 4)  # idle: the TxDefaults at their final levels
    assert ctrl.failsafe_is_plain()
    levels = dict(ctrl.failsafe)
    for c in ctrl.state.chargers.values():
        assert c.tx_default == levels[c.charger_id] > 0
        ctrl.state.on_status(c.charger_id, "Charging")
        ctrl.state.on_transaction(
            c.charger_id, "started", "tx-" + c.charger_id, clock.now(), clock.monotonic()
        )
    n = len(gw.calls)
    await settle(ctrl, clock, 2)
    # Precondition: the fair share is the failsafe level, so nothing left for the sessions.
    assert gw.calls[n:] == []
    assert not any(c.tx_profile_held for c in ctrl.state.chargers.values())
    # A curtailment ahead lowers the failsafe levels (the TxDefaults), not what flows now.
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 20.0, now + 600.0))
    await settle(ctrl, clock, 3)
    assert all(ctrl.failsafe[cid] < levels[cid] for cid in levels)
    sent = gw.calls[n:]
    for cid in levels:
        mine = [(purpose, held) for c, purpose, held in sent if c == cid]
        assert [p for p, _ in mine][:1] == ["tx"], mine
        assert all(held for p, held in mine if p == "tx_default"), mine
        assert ctrl.state.chargers[cid].tx_default == ctrl.failsafe[cid], mine
