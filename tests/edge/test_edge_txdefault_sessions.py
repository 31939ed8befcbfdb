"""A session that holds no TxProfile of ours runs on its charger's TxDefault (2026-12-05 review).

F1: a lowered TxDefault of such a session waits for the session's TxProfile only so long (refused,
unanswered, or ``settle_s``), and the others' failsafe levels count the charger at its maximum
until the lower one is accepted. F2: a TxDefault raise that left while the charger was idle and is
accepted after the session started is counted for the session. F3: a first (or lowered) TxDefault
is counted as maybe not applied from its acceptance, not from the decision.

The controller with the Rust core, on a step clock, and a gateway double that answers as told.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from edge_testkit import ToldGateway, counted, stepped_controller
from evcore.clock import StepClock
from evcore.edge.controller import EdgeController
from evcore.edge.grid import Curtailment
from evcore.edge.sitegen import depot_table


def _controller(n: int) -> tuple[EdgeController, ToldGateway, StepClock]:
    gw = ToldGateway()
    ctrl, clock = stepped_controller(depot_table(n, per_feeder=n), gw)
    return ctrl, gw, clock


async def _round(ctrl: EdgeController, clock: StepClock, advance_s: float) -> None:
    await ctrl.decide("test")
    for _ in range(3):
        await asyncio.sleep(0)
    clock.advance(advance_s)


def _start(ctrl: EdgeController, clock: StepClock, cid: str) -> None:
    ctrl.state.on_status(cid, "Charging")
    ctrl.state.on_transaction(cid, "started", "tx-" + cid, clock.now(), clock.monotonic())


def _counted_a(ctrl: EdgeController, cid: str) -> tuple[float, bool]:
    """What the core's input counts ``cid`` at (A per phase) and whether it is confirmed."""
    value, confirmed, _ = counted(ctrl, cid)
    return value, confirmed


@pytest.mark.parametrize("txprofile", ["rejected", "unanswered"])
async def test_a_lowered_txdefault_waits_for_the_sessions_txprofile_only_so_long(
    txprofile: str,
) -> None:
    """Two sessions on their TxDefault (12.8 A, no TxProfile held), a third charger idle; every
    TxProfile is refused (or never answered), then a curtailment to 20 kW lowers the failsafe
    levels to 9.66 A. Before the fix the two TxDefaults stayed at 12.8 A for good while the
    levels assumed 9.66 A (and the idle charger's level was sized on that room)."""
    ctrl, gw, clock = _controller(3)
    cfg = ctrl.cfg
    a, b, idle = sorted(ctrl.state.chargers)
    for _ in range(4):  # idle: the TxDefaults at their final levels
        await _round(ctrl, clock, cfg.settle_s + 0.1)
    assert ctrl.failsafe_is_plain()
    high = ctrl.failsafe[a]
    assert high == pytest.approx(12.8)
    for cid in (a, b):
        assert ctrl.state.chargers[cid].tx_default == high
        _start(ctrl, clock, cid)
    if txprofile == "rejected":
        gw.reject.add("tx")
    else:
        gw.hold.add("tx")
    now = clock.now()
    cap_kw = 20.0
    ctrl.post_curtailment(Curtailment("dso-1", "grid", cap_kw, now + 20.0, now + 600.0))
    posted = clock.monotonic()
    w_per_a = ctrl.state.chargers[a].ac_w_per_a
    lowered_at: dict[str, float] = {}
    sessions = [ctrl.state.chargers[cid] for cid in (a, b)]
    for _ in range(30):
        await _round(ctrl, clock, cfg.tick_s)
        for c in sessions:
            if c.tx_default is not None and c.tx_default < high and c.charger_id not in lowered_at:
                lowered_at[c.charger_id] = clock.monotonic()
        # The idle charger falls back to its failsafe level; the sessions to the TxDefault they
        # still hold. The idle charger's level fits beside what they have not given up.
        held = sum(c.tx_default or 0.0 for c in sessions)
        assert (held + ctrl.failsafe[idle]) * w_per_a <= cap_kw * 1000.0 + 1e-6, (
            held,
            dict(ctrl.failsafe),
        )
    low = ctrl.failsafe[a]
    assert low == pytest.approx(cap_kw * 1000.0 / w_per_a / 3)
    for c in sessions:
        assert c.tx_default == pytest.approx(low), (c.charger_id, c.tx_default)
        assert not c.tx_profile_held
    # (The idle charger's raise back to its level may wait: every TxProfile refused is re-sent
    # as a decrease of an unknown holding, and increases wait behind those. Raises may wait.)
    idle_default = ctrl.state.chargers[idle].tx_default
    assert idle_default is not None and idle_default <= low + 1e-9
    assert ctrl.failsafe_is_plain()
    # Refused: it leaves at the next decision, well before settle_s; unanswered: after settle_s.
    waited = max(lowered_at.values()) - posted
    if txprofile == "rejected":
        assert waited < cfg.settle_s, waited
    else:
        assert cfg.settle_s <= waited <= cfg.settle_s + 3 * cfg.tick_s, waited
    gw.release(False)
    await asyncio.sleep(0)


async def test_a_txdefault_raise_accepted_after_the_session_started_is_counted() -> None:
    """A raise of an idle charger's TxDefault leaves; the session starts before the station's
    answer; then the answer (Accepted) arrives. The car may draw the raised level at once: the
    core's input counts the session there (before the fix: at the old level, confirmed)."""
    ctrl, gw, clock = _controller(2)
    cfg = ctrl.cfg
    cid = sorted(ctrl.state.chargers)[0]
    c = ctrl.state.chargers[cid]
    await _round(ctrl, clock, cfg.settle_s + 0.1)
    # The first TxDefaults are sized with every charger at its maximum: 0 A.
    assert c.tx_default == 0.0 and not ctrl.failsafe_is_plain()
    gw.hold.add("tx_default")
    await _round(ctrl, clock, 0.0)
    raised = [
        kw["limit_a"]
        for ch, kw in gw.calls
        if ch == cid and kw["purpose"] == "tx_default" and float(kw["limit_a"]) > 0
    ]
    assert raised and gw.waiting, gw.calls
    assert c.tx_default == 0.0 and c.tx_default_sent == raised[-1]
    _start(ctrl, clock, cid)
    gw.release(True)
    for _ in range(3):
        await asyncio.sleep(0)
    assert c.tx_default == raised[-1]
    value, _confirmed = _counted_a(ctrl, cid)
    assert value >= raised[-1] - 1e-9, (value, raised[-1])


async def test_a_txdefault_answered_late_is_counted_unapplied_from_its_acceptance() -> None:
    """The station's answer arrives more than ``settle_s`` after the decision: the first
    TxDefault still counts at the charger's maximum for ``settle_s`` from the acceptance (before
    the fix: no gap at all), and so does a lowered one at the level it replaced."""
    ctrl, gw, clock = _controller(2)
    cfg = ctrl.cfg
    cid = sorted(ctrl.state.chargers)[0]
    c = ctrl.state.chargers[cid]
    gw.hold.add("tx_default")
    await _round(ctrl, clock, cfg.settle_s + 1.0)
    assert c.tx_default is None and gw.waiting
    gw.release(True)
    for _ in range(3):
        await asyncio.sleep(0)
    now_m = clock.monotonic()
    assert c.tx_default == 0.0
    assert c.default_unapplied(now_m), (c.default_unapplied_until, now_m)
    assert c.default_unapplied_until == pytest.approx(now_m + cfg.settle_s)
    assert c.idle_level(ctrl.failsafe.get(cid, 0.0), now_m) == c.max_value
    value, confirmed = _counted_a(ctrl, cid)
    assert value == c.max_value and not confirmed
    # Settle to the final levels, then a curtailment lowers the TxDefault; answered late too.
    gw.hold.clear()
    for _ in range(4):
        await _round(ctrl, clock, cfg.settle_s + 0.1)
    assert ctrl.failsafe_is_plain()
    high = c.tx_default
    assert high is not None and high > 0
    gw.hold.add("tx_default")
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 20.0, now + 600.0))
    await _round(ctrl, clock, cfg.settle_s + 1.0)
    assert c.tx_default == high and gw.waiting
    gw.release(True)
    for _ in range(3):
        await asyncio.sleep(0)
    now_m = clock.monotonic()
    assert c.tx_default is not None and c.tx_default < high
    assert c.replaced_default(now_m) == high
    assert c.tx_default_old_until == pytest.approx(now_m + cfg.settle_s)
    assert math.isclose(c.idle_level(ctrl.failsafe.get(cid, 0.0), now_m), high)


async def test_a_lowering_after_the_first_txdefault_gap_recomputes_the_failsafe_levels() -> None:
    """Charger X comes online after the others accepted their first TxDefaults (0 A: sized with
    X at its maximum), so its own first TxDefault is its maximum, 32 A. A car starts on it in
    X's gap. When the gap ends X no longer counts at its maximum for being unconfirmed, but for
    a TxDefault to be lowered (32 -> 8 A) that waits for its session's TxProfile: the same set of
    chargers, other levels. Before the fix the levels were keyed by that set alone, were not
    recomputed, and stayed {X: 32 A, others: 0 A} for good (X's TxDefault never lowered, the
    others' cars never admitted; the restart test's flake: 2 cars at 32 A, 6 at 0 A)."""
    table = depot_table(4, per_feeder=4, feeder_share=32.0 / 128.0, grid_share=1.0)
    gw = ToldGateway()
    ctrl, clock = stepped_controller(table, gw)
    cfg = ctrl.cfg
    x, *others = sorted(ctrl.state.chargers)
    cx = ctrl.state.chargers[x]
    cx.online = False
    for _ in range(3):
        await _round(ctrl, clock, cfg.settle_s + 0.1)
    assert all(ctrl.state.chargers[cid].tx_default == 0.0 for cid in others)
    cx.online = True
    await _round(ctrl, clock, 0.5)
    assert cx.tx_default == cx.max_value and cx.default_unapplied(clock.monotonic())
    _start(ctrl, clock, x)
    for _ in range(20):
        await _round(ctrl, clock, cfg.tick_s)
    plain = ctrl.core.failsafe_levels({})
    assert plain[x] == pytest.approx(8.0)
    assert ctrl.failsafe == plain, dict(ctrl.failsafe)
    assert cx.tx_default == pytest.approx(plain[x])
    assert all(ctrl.state.chargers[cid].tx_default == pytest.approx(plain[cid]) for cid in others)
