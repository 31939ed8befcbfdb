"""Unit tests of the edge's pure functions: dispatch, failsafe timing, grid book, faults, config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytest
from evcore.edge import failsafe
from evcore.edge.config import EdgeConfig, EdgeConfigError
from evcore.edge.dispatch import (
    ChangeKind,
    DispatchPlan,
    PendingDecrease,
    decreases_settled,
    next_settle_at,
    plan_dispatch,
)
from evcore.edge.faults import FaultChange, check_ignored, draws_above_limit
from evcore.edge.grid import (
    Curtailment,
    CurtailmentBook,
    GridSignalError,
    PricePoint,
    merge_prices,
    price_at,
)
from evcore.edge.state import ChargerState


def _plan(
    safe: Mapping[str, float], current: Mapping[str, float | None], **kw: Any
) -> DispatchPlan:
    base: dict[str, Any] = dict(deadband_a=1.0, deadband_w=500.0, now_s=100.0, settle_s=5.0)
    base.update(kw)
    return plan_dispatch(safe, current, **base)


# ---- dispatch -------------------------------------------------------------------------------
def test_decreases_leave_and_increases_wait_in_the_same_decision() -> None:
    p = _plan({"a": 10.0, "b": 20.0, "c": 16.0}, {"a": 16.0, "b": 10.0, "c": 16.0})
    assert [c.charger_id for c in p.decreases] == ["a"]
    assert p.increases == ()
    assert [c.charger_id for c in p.held] == ["b"]
    assert [c.charger_id for c in p.to_send] == ["a"]


def test_increases_leave_when_no_decrease_is_pending() -> None:
    p = _plan({"b": 20.0}, {"b": 10.0})
    assert [(c.charger_id, c.kind) for c in p.increases] == [("b", ChangeKind.INCREASE)]
    assert p.held == ()


def test_increases_wait_for_an_unaccepted_decrease_until_settle() -> None:
    pend = [PendingDecrease("a", 97.0, False)]
    held = _plan({"b": 20.0}, {"b": 10.0}, pending=pend, now_s=100.0)
    assert held.increases == () and len(held.held) == 1
    settled = _plan({"b": 20.0}, {"b": 10.0}, pending=pend, now_s=102.0)
    assert len(settled.increases) == 1
    # Accepted is not in force: the charger applies it seconds later; the increase still waits.
    accepted = _plan(
        {"b": 20.0}, {"b": 10.0}, pending=[PendingDecrease("a", 99.9, True)], now_s=100.0
    )
    assert accepted.increases == () and len(accepted.held) == 1
    seen = PendingDecrease("a", 99.9, True, in_effect=True, value=6.0, accepted_at_s=99.95)
    in_effect = _plan({"b": 20.0}, {"b": 10.0}, pending=[seen], now_s=100.0)
    assert len(in_effect.increases) == 1


def test_deadband_suppresses_small_increases_but_never_a_decrease() -> None:
    p = _plan({"a": 16.5, "b": 15.9}, {"a": 16.0, "b": 16.0})
    assert p.increases == () and p.held == ()
    assert [c.charger_id for c in p.decreases] == ["b"]


def test_leaving_zero_is_never_inside_the_deadband() -> None:
    p = _plan({"a": 6.0}, {"a": 0.0}, deadband_a=10.0)
    assert [c.charger_id for c in p.increases] == ["a"]


def test_unknown_state_always_sends_as_a_decrease_and_force_refreshes() -> None:
    p = _plan({"a": 8.0, "b": 10.0}, {"a": None, "b": 10.0}, force={"b"})
    assert [c.charger_id for c in p.decreases] == ["a"]
    assert [(c.charger_id, c.new) for c in p.refreshes] == [("b", 10.0)]


def test_dc_uses_the_watt_deadband_and_decreases_sort_largest_first() -> None:
    p = _plan(
        {"dc": 10_300.0, "x": 6.0, "y": 20.0},
        {"dc": 10_000.0, "x": 16.0, "y": 32.0},
        dc_ids={"dc"},
    )
    assert [c.charger_id for c in p.decreases] == ["y", "x"]
    assert p.held == ()  # 300 W is inside the 500 W deadband


def test_settle_helpers() -> None:
    pend = [PendingDecrease("a", 10.0, False), PendingDecrease("b", 12.0, True)]
    assert not decreases_settled(pend, 14.0, 5.0)
    # b was accepted but never seen in effect: it settles by time too, 5 s after it left.
    assert not decreases_settled(pend, 15.0, 5.0)
    assert decreases_settled(pend, 17.0, 5.0)
    assert next_settle_at(pend, 5.0) == 17.0
    # Accepted but not yet seen in effect still settles by time; seen in effect waits for nothing.
    assert next_settle_at([PendingDecrease("b", 12.0, True)], 5.0) == 17.0
    seen = PendingDecrease("b", 12.0, True, in_effect=True)
    assert next_settle_at([seen], 5.0) is None
    assert decreases_settled([seen], 12.5, 5.0)


# ---- failsafe timing ------------------------------------------------------------------------
@pytest.mark.parametrize("now", [0.0, 1_767_225_600.0, 1_767_225_655.5, 1_767_225_659.999])
def test_profiles_end_within_failsafe_after_s_and_refresh_comes_first(now: float) -> None:
    cfg = EdgeConfig(failsafe_after_s=120.0, refresh_lead_s=30.0, fallback_guard_s=10.0)
    falling = failsafe.valid_to(now, 16.0, 8.0, cfg)
    rising = failsafe.valid_to(now, 0.0, 8.0, cfg)
    assert now < falling <= now + cfg.failsafe_after_s
    assert rising == falling + cfg.fallback_guard_s <= now + cfg.failsafe_after_s
    for vt, sp in ((falling, 16.0), (rising, 0.0)):
        due = failsafe.refresh_at(vt, sp, 8.0, cfg)
        assert now < due < vt
    # Shared instants: two profiles sent apart within one window expire together.
    assert failsafe.valid_to(now + 1e-3, 16.0, 8.0, cfg) in (falling, falling + 80.0)


def test_config_rejects_a_guard_that_leaves_no_spacing() -> None:
    with pytest.raises(EdgeConfigError, match="fallback_guard_s"):
        EdgeConfig(failsafe_after_s=60.0, refresh_lead_s=30.0, fallback_guard_s=30.0)


# ---- config ---------------------------------------------------------------------------------
def test_config_from_table_names_the_bad_key() -> None:
    cfg = EdgeConfig.from_table({"tick_s": 2, "policy": "planner_cost", "max_switches": 4})
    assert cfg.tick_s == 2.0 and cfg.policy == "planner_cost" and cfg.max_switches == 4
    with pytest.raises(EdgeConfigError, match=r"\[edge\]\.tick_sec: unknown key"):
        EdgeConfig.from_table({"tick_sec": 1})
    with pytest.raises(EdgeConfigError, match=r"\[edge\]\.deadband_a"):
        EdgeConfig.from_table({"deadband_a": math.nan})
    with pytest.raises(EdgeConfigError, match=r"\[edge\]\.policy"):
        EdgeConfig.from_table({"policy": "greedy"})
    with pytest.raises(EdgeConfigError, match=r"\[edge\]\.settle_s"):
        EdgeConfig.from_table({"settle_s": "5"})
    with pytest.raises(EdgeConfigError, match=r"\[edge\]\.max_switches"):
        EdgeConfig.from_table({"max_switches": 2.5})


# ---- grid -----------------------------------------------------------------------------------
def test_curtailment_book_lead_release_and_validation() -> None:
    book = CurtailmentBook({"grid", "F1"}, lead_s=15.0)
    book.add(Curtailment("c1", "grid", 50.0, 1000.0, 2000.0))
    book.add(Curtailment("c2", "grid", 40.0, 1500.0, 1600.0))
    assert book.caps_kw(900.0) == {}
    assert book.caps_kw(985.0) == {"grid": 50.0}  # in force from T1 - lead
    assert book.caps_kw(1490.0) == {"grid": 40.0}
    assert book.caps_kw(900.0, horizon_s=700.0) == {"grid": 40.0}
    assert book.caps_kw(2000.0) == {}  # released at T2
    assert book.next_change(900.0) == 985.0
    assert book.next_change(1700.0) == 2000.0
    book.add(Curtailment("c1", "grid", 60.0, 1000.0, 2000.0))  # same id replaces
    assert book.caps_kw(1000.0) == {"grid": 60.0}
    assert book.cancel("c1") and not book.cancel("c1")
    book.prune(1600.0)
    assert len(book) == 0
    for bad, msg in (
        (Curtailment("x", "nope", 1.0, 0.0, 1.0), "unknown node_id"),
        (Curtailment("x", "F1", -1.0, 0.0, 1.0), "max_kw"),
        (Curtailment("x", "F1", math.inf, 0.0, 1.0), "max_kw"),
        (Curtailment("x", "F1", 1.0, 5.0, 5.0), "end"),
        (Curtailment("", "F1", 1.0, 0.0, 5.0), "signal_id"),
    ):
        with pytest.raises(GridSignalError, match=msg):
            book.add(bad)


def test_price_updates_replace_from_their_first_step() -> None:
    old = [PricePoint(0.0, 0.30), PricePoint(3600.0, 0.20), PricePoint(7200.0, 0.10)]
    new = merge_prices(old, [PricePoint(3600.0, 0.50)])
    assert [(p.start, p.price_per_kwh) for p in new] == [(0.0, 0.30), (3600.0, 0.50)]
    assert price_at(new, 4000.0) == 0.50 and price_at(new, -1.0) is None
    with pytest.raises(GridSignalError):
        merge_prices(old, [PricePoint(0.0, math.nan)])


# ---- ignored profile ------------------------------------------------------------------------
def _charger(holding: float, measured: float, at: float) -> ChargerState:
    c = ChargerState("cp", "CP", False, 6.0, 32.0)
    c.sent = c.holding = holding
    c.accepted = True
    c.sent_at = 0.0
    c.profile_unknown = False
    c.note_limit(0.0)
    c.measured_a = (measured, measured, None)
    c.measured_at = at
    return c


def test_a_charger_that_ignores_its_profile_becomes_suspect_then_faulted() -> None:
    cfg = EdgeConfig(settle_s=5.0, ignore_threshold_a=2.0, ignore_after_s=10.0, fault_after_s=20.0)
    c = _charger(10.0, 16.0, 3.0)
    assert check_ignored(c, 3.0, cfg) is None  # not settled yet: no judgement
    c.measured_at = 6.0
    assert check_ignored(c, 6.0, cfg) is FaultChange.SUSPECT
    c.measured_at = 20.0
    assert check_ignored(c, 20.0, cfg) is None and not c.faulted
    c.measured_at = 36.0
    assert check_ignored(c, 36.0, cfg) is FaultChange.FAULTED
    assert c.faulted and "ignores its profile" in c.fault_reason
    assert check_ignored(c, 40.0, cfg) is None  # reported once


def test_a_charger_that_complies_again_is_cleared() -> None:
    cfg = EdgeConfig(settle_s=5.0, ignore_threshold_a=2.0)
    c = _charger(10.0, 16.0, 6.0)
    assert check_ignored(c, 6.0, cfg) is FaultChange.SUSPECT
    c.measured_a = (10.5, 10.4, None)
    c.measured_at = 8.0
    assert check_ignored(c, 8.0, cfg) is FaultChange.CLEARED
    assert c.suspect_since is None and not c.faulted
    c.measured_a = (11.9, 0.0, None)  # within the threshold
    assert check_ignored(c, 9.0, cfg) is None


def test_an_overdraw_is_judged_against_every_limit_it_may_still_apply() -> None:
    cfg = EdgeConfig(settle_s=5.0, ignore_threshold_a=2.0)
    c = _charger(32.0, 30.0, 1.0)
    c.holding = 10.0
    c.note_limit(10.0)  # lowered at t=10: 30 A is allowed until t=15
    c.measured_at = 14.0
    assert check_ignored(c, 14.0, cfg) is None
    assert c.allowed_bound(14.0, 5.0) == 32.0 and c.allowed_bound(15.0, 5.0) == 10.0
    c.holding = 32.0
    c.note_limit(16.0)  # raised at t=16 (to meet the draw?): a measurement before it still counts
    c.measured_at = 15.5
    assert check_ignored(c, 16.0, cfg) is FaultChange.SUSPECT
    # After a reboot its limits are unknown: no judgement for settle_s.
    c.suspect_since = None
    c.profile_unknown = True
    c.note_limit(20.0)
    c.profile_unknown = False
    c.holding = 10.0
    c.note_limit(20.5)
    c.measured_at = 24.0
    assert c.allowed_bound(24.0, 5.0) is None and check_ignored(c, 24.0, cfg) is None
    c.measured_at = 26.0
    assert check_ignored(c, 26.0, cfg) is FaultChange.SUSPECT


def test_a_charger_drawing_above_what_it_holds_is_not_raised() -> None:
    cfg = EdgeConfig(ignore_threshold_a=2.0, stale_after_s=10.0)
    c = _charger(6.0, 20.0, 100.0)
    assert draws_above_limit(c, 101.0, cfg)
    assert not draws_above_limit(c, 111.0, cfg)  # stale: no longer a reason
    p = _plan({"cp": 16.0, "b": 20.0}, {"cp": 6.0, "b": 10.0}, hold={"cp"})
    assert [x.charger_id for x in p.increases] == ["b"]
    assert [x.charger_id for x in p.held] == ["cp"]
    p = _plan({"cp": 0.0}, {"cp": 6.0}, hold={"cp"})  # a decrease is never held
    assert [x.charger_id for x in p.decreases] == ["cp"]


# ---- switching rules from real session state ---------------------------------------------
def _switching(c: ChargerState) -> tuple[float | None, float | None, int]:
    return c.on_since, c.off_since, c.switches


def test_a_session_starts_with_its_own_switching_history() -> None:
    from evcore.edge.state import SiteState

    c = ChargerState("cp", "CP", False, 6.0, 32.0)
    st = SiteState.from_chargers([c], {})
    c.tx_default = c.holding = c.sent = 16.0
    c.off_since, c.switches = 5.0, 7  # what the car before it went through
    st.on_transaction("cp", "started", "tx-1", 1000.0, 100.0)
    assert _switching(c) == (100.0, None, 0)  # on at its TxDefault
    st.on_sent("cp", 0.0, 130.0, 2000.0)  # paused by the edge: a switch
    assert (c.off_since, c.switches) == (130.0, 1)
    st.on_transaction("cp", "ended", "tx-1", 1100.0, 200.0)
    assert _switching(c) == (None, None, 0)
    c.tx_default = c.holding = 0.0  # its failsafe level is 0 A: the next session starts off
    st.on_transaction("cp", "started", "tx-2", 1200.0, 300.0)
    assert (c.on_since, c.off_since) == (None, 300.0)


def test_the_core_keeps_a_session_that_just_started_on_for_min_on_s() -> None:
    from evcore.edge.app import charger_states
    from evcore.edge.coreio import RustCore
    from evcore.edge.sitegen import depot_table
    from evcore.site import load_site

    # Two chargers under 11 A: only one can charge (6 A minimum).
    table = depot_table(2, per_feeder=2, feeder_share=11.0 / 64.0, grid_share=1.0)
    core = RustCore(load_site(table), table)
    st, _ = charger_states(table)
    cfg = EdgeConfig(min_on_s=60.0, min_off_s=0.0)
    old, new = st.chargers.values()
    for c in (old, new):
        c.online = True
        c.profile_unknown = c.needs_resend = False
        c.tx_default = c.holding = c.sent = 6.0
        c.accepted = True
        c.status = "Charging"
        c.plugged = True
    st.on_transaction(old.charger_id, "started", "tx-old", 0.0, 0.0)  # on for 1000 s
    st.on_transaction(new.charger_id, "started", "tx-new", 990.0, 990.0)  # on for 10 s
    got = core.decide(
        st, now_wall=1000.0, now_mono=1000.0, caps_kw={}, targets=None, failsafe={}, cfg=cfg
    )
    assert got.setpoints[new.charger_id] >= 6.0 and got.setpoints[old.charger_id] == 0.0
    # Past min_on_s the older session is not favoured by the rule any more: either may run.
    late = core.decide(
        st, now_wall=1100.0, now_mono=1100.0, caps_kw={}, targets=None, failsafe={}, cfg=cfg
    )
    low, high = sorted(late.setpoints.values())
    assert low == 0.0 and high >= 6.0


def test_a_pause_while_a_first_txdefault_may_not_be_applied_is_not_a_switch() -> None:
    from evcore.edge.state import SiteState

    c = ChargerState("cp", "CP", False, 6.0, 32.0)
    other = ChargerState("cp-2", "CP2", False, 6.0, 32.0)
    st = SiteState.from_chargers([c, other], {})
    c.tx_default = c.holding = c.sent = 16.0
    # The other charger's first TxDefault was accepted and may not be applied until 110.
    other.default_unapplied_until = 110.0
    st.on_transaction("cp", "started", "tx-1", 1000.0, 100.0)
    assert _switching(c) == (100.0, None, 0)
    st.on_sent("cp", 0.0, 101.0, 2000.0, uncounted_pause=True)  # the gap's pause
    assert (c.off_since, c.switches) == (None, 0)
    st.on_sent("cp", 16.0, 111.0, 2000.0)  # back once it is applied: no switch either
    assert _switching(c) == (111.0, None, 0)
    st.on_sent("cp", 0.0, 130.0, 2000.0)  # the allocator's own pause later: a switch
    assert (c.off_since, c.switches) == (130.0, 1)
    st.on_transaction("cp", "ended", "tx-1", 1100.0, 200.0)
    # A session that starts at a 0 A TxDefault while the gap lasts does not start off ...
    c.tx_default = c.holding = c.sent = 0.0
    other.default_unapplied_until = 310.0
    st.on_transaction("cp", "started", "tx-2", 1200.0, 300.0)
    assert _switching(c) == (None, None, 0)
    st.on_sent("cp", 16.0, 305.0, 2000.0)
    assert _switching(c) == (305.0, None, 0)
    st.on_transaction("cp", "ended", "tx-2", 1300.0, 400.0)
    # ... nor does one on the charger in the gap (its car may draw the maximum: on), but once
    # every first TxDefault is known applied a session at 0 A starts off, as before.
    c.default_unapplied_until = 510.0
    st.on_transaction("cp", "started", "tx-3", 1400.0, 500.0)
    assert _switching(c) == (500.0, None, 0) and c.off_uncounted
    st.on_transaction("cp", "ended", "tx-3", 1500.0, 600.0)
    c.default_unapplied_until = None
    st.on_transaction("cp", "started", "tx-4", 1600.0, 700.0)
    assert (c.on_since, c.off_since) == (None, 700.0)


# ---- what a reading was taken under ---------------------------------------------------------
def test_the_setpoint_a_reading_was_taken_under_is_the_lowest_in_force_before_it() -> None:
    c = ChargerState("cp", "CP", False, 6.0, 32.0)
    assert c.lowest_sent(100.0, 115.0) is None  # nothing sent: not known
    c.log_sent(20.0, 100.0)
    c.log_sent(32.0, 200.0)
    c.log_sent(12.0, 300.0)
    # Nothing of the log before the window's start: not known.
    assert c.lowest_sent(90.0, 105.0) is None
    assert c.lowest_sent(150.0, 165.0) == 20.0  # 20 A in force throughout
    # Raised to 32 A 5 s before the reading: the car may still be on 20 A.
    assert c.lowest_sent(190.0, 205.0) == 20.0
    assert c.lowest_sent(216.0, 231.0) == 32.0
    # Lowered within the window: the lower one.
    assert c.lowest_sent(290.0, 305.0) == 12.0
    # An answer that came late is booked in time order.
    c.log_sent(8.0, 250.0)
    assert c.lowest_sent(255.0, 270.0) == 8.0
    # Old entries go, but for the one in force at the cut.
    c.log_sent(16.0, 1000.0)
    assert [v for _, v in c.sent_log] == [12.0, 16.0]
    assert c.lowest_sent(500.0, 515.0) == 12.0
    # A new session starts with nothing.
    c.clear_session_flags()
    assert c.sent_log == [] and c.lowest_sent(990.0, 1005.0) is None


# ---- least-laxity weights ---------------------------------------------------------------------
def test_least_laxity_weights_double_per_half_hour_less_laxity_and_move_smoothly() -> None:
    from evcore.edge.coreio import LAXITY_DOUBLING_S, _priority_from_laxity

    def car(cid: str, departure: float | None, kwh: float | None) -> ChargerState:
        c = ChargerState(cid, cid, False, 6.0, 32.0)  # 22.08 kW at 32 A
        c.departure = departure
        c.energy_requested_kwh = kwh
        return c

    now = 1_000_000.0
    full_h = 22.08 / 3600.0  # kWh per second at full rate
    a = car("a", now + 7200.0, 3600.0 * full_h)  # 1 h needed in 2 h: laxity 3600 s
    b = car("b", now + 7200.0 + LAXITY_DOUBLING_S, 3600.0 * full_h)  # 30 min more laxity
    c = car("c", now + 36_000.0, 3600.0 * full_h)  # the most lax: weight 1
    d = car("d", None, None)  # departure not known: weight 1
    w = _priority_from_laxity([a, b, c, d], now)
    assert w["c"] == 1.0 and w["d"] == 1.0
    assert w["a"] == pytest.approx(2.0 * w["b"])
    assert w["a"] == pytest.approx(2.0 ** ((36_000.0 - 7200.0) / LAXITY_DOUBLING_S))
    # a and b overtake each other: their weights cross without a jump (by rank, the one ahead
    # had twice the other's weight whatever the gap).
    b.departure = now + 7200.0 + 1.0
    w = _priority_from_laxity([a, b, c, d], now)
    assert w["a"] / w["b"] == pytest.approx(2.0 ** (1.0 / LAXITY_DOUBLING_S))
    # Capped (the core takes weights up to 1e6).
    c.departure = now + 1e9
    assert max(_priority_from_laxity([a, b, c, d], now).values()) == 2.0**19
