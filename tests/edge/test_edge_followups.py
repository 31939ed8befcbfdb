"""Follow-ups of the safety review, each through the real controller and the Rust core.

The controller runs its real decision path (``EdgeController.decide``: failsafe recompute, core
allocator + envelope, dispatch, audit) against ``RustCore``; the gateway is a recording one that
answers every SetChargingProfile at once, so each test states exactly what left for which input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import pytest
from edge_testkit import FAST, settle, stepped_controller
from evcore.clock import StepClock
from evcore.edge import failsafe
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.coreio import RustCore
from evcore.edge.grid import Curtailment
from evcore.edge.sitegen import depot_table
from evcore.site import load_site

pytestmark = pytest.mark.timeout(60)


@dataclass
class _Result:
    accepted: bool


class RecordingGateway:
    """Answers every profile with ``accept`` (True/False); records (charger, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.accept = True

    async def set_limit(self, charger_id: str, **kwargs: Any) -> _Result:
        self.calls.append((charger_id, kwargs))
        return _Result(self.accept)

    def tx(self) -> dict[str, float]:
        """The last TxProfile value sent per charger."""
        out: dict[str, float] = {}
        for cid, kw in self.calls:
            if kw["purpose"] == "tx":
                out[cid] = float(kw.get("limit_a", kw.get("limit_w", math.nan)))
        return out


def _rig(
    n: int = 4, core: Any = None, **cfg: Any
) -> tuple[EdgeController, RecordingGateway, StepClock, Mapping[str, Any]]:
    table = depot_table(n, per_feeder=2)
    gw = RecordingGateway()
    ctrl, clock = stepped_controller(table, gw, core=core, cfg=EdgeConfig(**{**FAST, **cfg}))
    return ctrl, gw, clock, table


def _dc_site() -> dict[str, Any]:
    """One 90 kW DC charger (efficiency 0.96, 300 W auxiliary load) on a 400 A grid."""
    return {
        "site": {"id": "s", "voltage_ln_v": 230.0},
        "nodes": [{"id": "grid", "kind": "grid", "phase_limit_a": 400.0}],
        "chargers": [
            {
                "id": "dc1",
                "parent": "grid",
                "kind": "dc",
                "max_w": 90_000.0,
                "efficiency": 0.96,
                "aux_w": 300.0,
                "wiring": "three_phase",
                "phases": ["L1", "L2", "L3"],
            }
        ],
    }


def _plug_all(ctrl: EdgeController, clock: StepClock, n: int | None = None) -> None:
    for c in list(ctrl.state.chargers.values())[:n]:
        ctrl.state.on_status(c.charger_id, "Charging")
        ctrl.state.on_transaction(
            c.charger_id, "started", "tx-" + c.charger_id, clock.now(), clock.monotonic()
        )


# ---- H3: an operator priority can never stop every decision ------------------------------------
@pytest.mark.parametrize("priority", [0.0, 1e-12, 1e9])
async def test_a_priority_outside_the_core_range_does_not_stop_decisions(priority: float) -> None:
    ctrl, gw, clock, _ = _rig()
    _plug_all(ctrl, clock)
    next(iter(ctrl.state.chargers.values())).priority = priority  # e.g. from an old store
    await settle(ctrl, clock)
    assert ctrl.stats.core_failures == 0
    assert set(gw.tx()) == set(ctrl.state.chargers)


async def test_least_laxity_weights_times_a_high_priority_stay_in_the_core_range() -> None:
    ctrl, gw, clock, _ = _rig(n=24, policy="least_laxity")
    _plug_all(ctrl, clock)
    for i, c in enumerate(ctrl.state.chargers.values()):
        c.priority = 1e3  # the highest an operator may set
        c.departure = clock.now() + 3600 * (1 + i)
        c.energy_requested_kwh = 20.0
    await settle(ctrl, clock)
    assert ctrl.stats.core_failures == 0 and len(gw.tx()) == 24


@pytest.mark.parametrize("priority", [0.0, -1.0, 1e9, math.nan, math.inf])
def test_set_session_refuses_an_out_of_range_priority_naming_it(priority: float) -> None:
    from evcore.api.facade import FacadeError
    from evcore.edge.facade import ControllerFacade

    ctrl, _, _, _ = _rig()
    cid = next(iter(ctrl.state.chargers))
    with pytest.raises(ValueError, match="priority"):
        ctrl.set_session(cid, priority=priority)
    with pytest.raises(FacadeError, match="priority"):
        ControllerFacade(ctrl).set_priority(cid, priority)
    assert ctrl.state.chargers[cid].priority == 1.0


# ---- T4 / L4: a failed decision leaves every charger at most at its failsafe level --------------
class _FailingCore:
    """The real core, whose ``decide`` raises ``exc`` while ``fail`` is set."""

    def __init__(self, real: RustCore, exc: BaseException) -> None:
        self.real = real
        self.exc = exc
        self.fail = False

    def decide(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            raise self.exc
        return self.real.decide(*args, **kwargs)

    def failsafe_levels(self, caps_kw: Mapping[str, float], **kw: Any) -> dict[str, float]:
        return self.real.failsafe_levels(caps_kw, **kw)


class PanicException(BaseException):
    """Like pyo3's ``pyo3_runtime.PanicException``: a ``BaseException``, not an ``Exception``."""


def _panic() -> BaseException:
    return PanicException("boom")


@pytest.mark.parametrize("make_exc", [lambda: ValueError("bad input"), _panic])
async def test_a_failed_decision_falls_back_to_the_failsafe_levels_and_deciding_goes_on(
    make_exc: Any,
) -> None:
    table = depot_table(4, per_feeder=2)
    core = _FailingCore(RustCore(load_site(table), table), make_exc())
    ctrl, gw, clock, _ = _rig(core=core)
    _plug_all(ctrl, clock)
    await settle(ctrl, clock)
    before = gw.tx()
    # A curtailment arrives while the core refuses every decision: the failsafe levels drop
    # (recomputed by the core's failsafe path), and the chargers must come down to them.
    core.fail = True
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 2.0, now + 600.0))
    await settle(ctrl, clock, rounds=2)
    fs = ctrl.failsafe
    assert ctrl.stats.core_failures >= 1
    assert all(fs[cid] < before[cid] - 1.0 for cid in before)
    after = gw.tx()
    assert all(after[cid] <= fs[cid] + 1e-9 for cid in after), (after, fs)
    core.fail = False
    n = ctrl.stats.decisions
    await settle(ctrl, clock)
    assert ctrl.stats.decisions > n  # deciding again


# ---- H4: a 0 kW curtailment works -------------------------------------------------------------
async def test_a_zero_kw_curtailment_puts_everything_under_it_to_zero_and_decides_on() -> None:
    ctrl, gw, clock, _ = _rig()
    _plug_all(ctrl, clock)
    await settle(ctrl, clock)
    assert all(v > 0 for v in gw.tx().values())
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-0", "grid", 0.0, now + 5.0, now + 600.0))
    await settle(ctrl, clock, rounds=4)
    assert ctrl.stats.core_failures == 0 and ctrl.stats.failsafe_failures == 0
    assert all(v == 0.0 for v in ctrl.failsafe.values())
    assert all(v == 0.0 for v in gw.tx().values()), gw.tx()
    defaults = {cid: kw["limit_a"] for cid, kw in gw.calls if kw["purpose"] == "tx_default"}
    assert all(v == 0.0 for v in defaults.values())


async def test_a_failing_failsafe_recompute_keeps_the_previous_levels_and_still_decides() -> None:
    table = depot_table(4, per_feeder=2)

    class _NoFailsafe(_FailingCore):
        def failsafe_levels(self, caps_kw: Mapping[str, float], **kw: Any) -> dict[str, float]:
            if caps_kw:
                raise ValueError("failsafe refused")
            return self.real.failsafe_levels(caps_kw, **kw)

    core = _NoFailsafe(RustCore(load_site(table), table), ValueError())
    ctrl, gw, clock, _ = _rig(core=core)
    _plug_all(ctrl, clock)
    await settle(ctrl, clock)
    levels = dict(ctrl.failsafe)
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 2.0, now + 600.0))
    n = ctrl.stats.decisions
    await settle(ctrl, clock)
    assert ctrl.stats.failsafe_failures >= 1 and ctrl.failsafe == levels
    assert ctrl.stats.decisions > n
    # The curtailment itself still went out: 10 kW at the grid is < 15 A per phase in all.
    assert sum(gw.tx().values()) <= 10_000 / 230 / 3 + 1e-6 * 4, gw.tx()


async def test_a_failed_recompute_keeps_the_plain_levels_paired_with_the_levels_in_use() -> None:
    """The plain levels (no charger at its maximum) of a curtailment are computed, the levels
    with a booted charger at its maximum are refused: the levels in use and the plain levels
    they are judged against (``failsafe_is_plain``, a station's report) both stay those of
    before the curtailment, and both follow it once the recompute succeeds."""
    table = depot_table(4, per_feeder=2)

    class _NoAtMax(_FailingCore):
        def failsafe_levels(self, caps_kw: Mapping[str, float], **kw: Any) -> dict[str, float]:
            if caps_kw and kw.get("at_max") and self.fail:
                raise ValueError("failsafe refused")
            return self.real.failsafe_levels(caps_kw, **kw)

    core = _NoAtMax(RustCore(load_site(table), table), ValueError())
    ctrl, _gw, clock, _ = _rig(core=core)
    await settle(ctrl, clock)
    assert ctrl.failsafe_is_plain()
    levels = dict(ctrl.failsafe)
    booted = sorted(ctrl.state.chargers)[0]
    ctrl.state.on_boot(ctrl.state.chargers[booted].ocpp_id)
    core.fail = True
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 2.0, now + 600.0))
    await ctrl.decide("test")
    assert ctrl.stats.failsafe_failures == 1
    assert ctrl.failsafe == levels and ctrl._plain_failsafe == levels
    core.fail = False
    await ctrl.decide("test")
    caps = ctrl.curtailments.caps_kw(clock.now(), failsafe.horizon_s(ctrl.cfg))
    plain = core.real.failsafe_levels(caps)
    assert ctrl._plain_failsafe == plain and plain != levels
    assert ctrl.failsafe != levels
    await settle(ctrl, clock)
    assert ctrl.failsafe == plain and ctrl.failsafe_is_plain()


# ---- H1 / H2: what a charger may still hold is what it is counted at ---------------------------
def _session_state(now_wall: float) -> tuple[RustCore, Any, EdgeConfig]:
    """Four chargers in sessions (F1: cp-0001, cp-0002; F2: cp-0003, cp-0004), each confirmed at
    6 A and its TxProfile in force for 30 s more."""
    from evcore.edge.app import charger_states

    table = depot_table(4, per_feeder=2)
    core = RustCore(load_site(table), table)
    st, _ = charger_states(table)
    for c in st.chargers.values():
        c.online = c.plugged = True
        c.status = "Charging"
        c.transaction_id = "tx-" + c.charger_id
        c.profile_unknown = c.needs_resend = False
        c.sent = c.holding = c.tx_default = 6.0
        c.accepted = True
        c.expires_at = now_wall + 30.0
        c.final_level = c.final_sent = 6.0
    return core, st, EdgeConfig(**FAST)


def _decide(core: RustCore, st: Any, cfg: EdgeConfig, now_wall: float) -> dict[str, float]:
    fs = dict.fromkeys(st.chargers, 6.0)
    got = core.decide(
        st, now_wall=now_wall, now_mono=500.0, caps_kw={}, targets=None, failsafe=fs, cfg=cfg
    )
    return dict(got.setpoints)


def test_the_inputs_digest_covers_demand_curtailments_and_parameters() -> None:
    now = 1_800_000_000.0
    core, st, cfg = _session_state(now)
    fs = dict.fromkeys(st.chargers, 6.0)

    def digest(caps: Mapping[str, float], cfg: EdgeConfig = cfg) -> str:
        got = core.decide(
            st, now_wall=now, now_mono=500.0, caps_kw=caps, targets=None, failsafe=fs, cfg=cfg
        )
        return got.inputs_digest

    base = digest({})
    assert len(base) == 64 and base == digest({})  # SHA-256 hex, same inputs same digest
    seen = {base, digest({"grid": 20.0})}  # a curtailment
    st.chargers["cp-0001"].departure = now + 3600.0  # demand
    seen.add(digest({}))
    seen.add(digest({}, EdgeConfig(**{**FAST, "min_off_s": 99.0})))  # a parameter
    assert len(seen) == 4, seen


def test_an_offline_charger_is_counted_at_the_txprofile_it_still_holds() -> None:
    now = 1_800_000_000.0
    core, st, cfg = _session_state(now)
    x = st.chargers["cp-0001"]
    x.sent = x.holding = 20.0  # its TxProfile (in force for 30 s more) allows 20 A
    st.on_connection(x.ocpp_id, False)
    got = _decide(core, st, cfg, now)
    # Feeder F1 carries 32 A per phase: the neighbour gets what 20 A leaves.
    assert got["cp-0002"] <= 32.0 - 20.0 + 1e-9, got
    # Once the profile has ended (and the guard passed) it is back on its failsafe level.
    later = _decide(core, st, cfg, now + 30.0 + cfg.fallback_guard_s + 1.0)
    assert later["cp-0002"] > 32.0 - 20.0 + 1e-9, later


def test_a_rejected_decrease_is_counted_at_what_the_charger_still_holds() -> None:
    now = 1_800_000_000.0
    core, st, cfg = _session_state(now)
    x = st.chargers["cp-0001"]
    x.sent = x.holding = 20.0
    st.on_sent(x.charger_id, 4.0, 499.0, now + 30.0, 6.0)  # a decrease to 4 A ...
    st.on_result(x.charger_id, 4.0, False)  # ... rejected: it still holds 20 A
    got = _decide(core, st, cfg, now)
    assert got["cp-0002"] <= 32.0 - 20.0 + 1e-9, got


def test_a_paused_profile_past_its_refresh_instant_counts_at_its_final_level() -> None:
    now = 1_800_000_000.0
    core, st, cfg = _session_state(now)
    x = st.chargers["cp-0001"]
    x.sent = x.holding = 0.0  # paused; its profile rises to 20 A at validTo
    x.final_level = 20.0
    x.expires_at = now + 2.0  # the refresh is due (refresh_lead_s = 10 s) and not accepted
    got = _decide(core, st, cfg, now)
    assert got["cp-0002"] <= 32.0 - 20.0 + 1e-9, got


# ---- H5 / M1: one place derives the config from the site file ----------------------------------
def test_resolution_follows_ocpp_whole_amperes_for_the_cli_path_too() -> None:
    from evcore.edge.config import EdgeConfigError

    table: dict[str, Any] = {"ocpp": {"whole_amperes": False}, "edge": {"tick_s": 2.0}}
    assert EdgeConfig.from_site(table).resolution_a == 0.1
    assert EdgeConfig.from_site(table, policy="least_laxity").resolution_a == 0.1
    assert EdgeConfig.from_site({"edge": {}}).resolution_a == 1.0
    with pytest.raises(EdgeConfigError, match=r"\[edge\].resolution_a"):
        EdgeConfig.from_site({"ocpp": {"whole_amperes": False}, "edge": {"resolution_a": 1.0}})


def test_the_cli_builds_its_config_through_from_site(tmp_path: Any) -> None:
    """``evcore edge`` with ``[ocpp] whole_amperes = false``: a decrease of 0.6 A leaves."""
    import argparse
    import asyncio

    from evcore.edge import cli

    seen: list[EdgeConfig] = []

    class _Stop(Exception):
        pass

    class _App:
        @classmethod
        def from_file(cls, path: Any, clock: Any, *, cfg: EdgeConfig, bus: Any) -> Any:
            seen.append(cfg)
            raise _Stop

    import evcore.edge.app as app_mod

    site = tmp_path / "site.toml"
    site.write_text('[site]\nid = "s"\n[ocpp]\nwhole_amperes = false\n[edge]\ntick_s = 2.0\n')
    real = app_mod.EdgeApp
    app_mod.EdgeApp = _App  # type: ignore[misc,assignment]
    try:
        with pytest.raises(_Stop):
            asyncio.run(
                cli._main(
                    argparse.Namespace(
                        config=str(site), config_dir=str(tmp_path), policy=None, log_level="info"
                    )
                )
            )
    finally:
        app_mod.EdgeApp = real  # type: ignore[misc]
    assert seen and seen[0].resolution_a == 0.1


def test_the_uncontrolled_baseline_is_not_accepted_from_a_site_file() -> None:
    from evcore.edge.cli import register
    from evcore.edge.config import EdgeConfigError

    with pytest.raises(EdgeConfigError, match="uncontrolled"):
        EdgeConfig.from_table({"policy": "uncontrolled"})
    with pytest.raises(EdgeConfigError, match="baseline"):
        EdgeConfig.from_table({"baseline": True})
    with pytest.raises(EdgeConfigError, match="uncontrolled"):
        EdgeConfig.from_site({"edge": {}}, policy="uncontrolled")
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["edge", "--config", "x.toml", "--policy", "uncontrolled"])
    assert EdgeConfig(baseline=True).baseline  # the twin's switch, in code only


async def test_the_twin_baseline_sends_nothing() -> None:
    import dataclasses

    ctrl, gw, clock, _ = _rig()
    ctrl.cfg = dataclasses.replace(ctrl.cfg, baseline=True)
    _plug_all(ctrl, clock)
    await settle(ctrl, clock)
    assert gw.calls == []


# ---- M2 / M3 ---------------------------------------------------------------------------------
async def test_profiles_ending_above_a_lowered_failsafe_level_are_sent_again() -> None:
    ctrl, gw, clock, _ = _rig()
    _plug_all(ctrl, clock)
    await settle(ctrl, clock)
    old_fs = dict(ctrl.failsafe)
    n = len(gw.calls)
    # A curtailment ahead (past the lead, inside the failsafe horizon) lowers the failsafe level
    # now; what flows now need not change.
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-2", "grid", 10.0, now + 20.0, now + 600.0))
    await settle(ctrl, clock, rounds=1)
    fs = ctrl.failsafe
    assert all(fs[cid] < old_fs[cid] for cid in fs)
    finals = {cid: kw["final_limit_a"] for cid, kw in gw.calls[n:] if kw["purpose"] == "tx"}
    assert set(finals) == set(ctrl.state.chargers), finals
    assert all(finals[cid] == fs[cid] for cid in finals)


def test_an_idle_charger_that_never_accepted_a_txdefault_counts_at_its_maximum() -> None:
    now = 1_800_000_000.0
    core, st, cfg = _session_state(now)
    x = st.chargers["cp-0001"]
    st.on_transaction(x.charger_id, "ended", x.transaction_id or "", now)
    x.tx_default = x.sent = x.holding = None  # its TxDefault was never accepted
    x.accepted = False
    got = _decide(core, st, cfg, now)
    # A car plugged into it may draw 32 A: F1 (32 A) has nothing left for its neighbour.
    assert got["cp-0002"] == 0.0, got
    x.tx_default = x.sent = x.holding = 6.0  # accepted now
    assert _decide(core, st, cfg, now)["cp-0002"] > 0.0


def test_an_accepted_decrease_is_in_effect_only_once_a_later_reading_shows_it() -> None:
    from evcore.edge.dispatch import PendingDecrease

    ctrl = _rig(2)[0]
    c = ctrl.state.chargers["cp-0001"]
    # Lowered from 16 to 6 A and accepted at monotonic 1000; the charger applies it later.
    ctrl.pending[c.charger_id] = PendingDecrease(
        c.charger_id, 999.9, True, value=6.0, accepted_at_s=1000.0
    )
    st = ctrl.state
    # A low reading taken before the acceptance proves nothing (the car may rise to 16 A).
    st.on_meter(c.charger_id, (5.0, None, None), None, None, 999.5)
    ctrl._note_in_effect(c)
    assert not ctrl.pending[c.charger_id].in_effect
    st.on_meter(c.charger_id, (16.0, None, None), None, None, 1000.5)  # not applied yet
    ctrl._note_in_effect(c)
    assert not ctrl.pending[c.charger_id].in_effect
    st.on_meter(c.charger_id, (6.4, None, None), None, None, 1001.0)  # within the deadband
    ctrl._note_in_effect(c)
    assert ctrl.pending[c.charger_id].in_effect


def test_a_decrease_below_what_the_car_draws_anyway_settles_only_by_time() -> None:
    """A car drawing 4 A (ramping up, tapering) is lowered from 16 to 6 A: readings at or below
    6 A show nothing (the old 16 A may still apply and the car may rise to it), so the decrease
    is not taken as in force from a reading; increases held behind it wait for ``settle_s``.
    A car drawing 16 A lowered to 6 A and then read at 6 A shows the new limit acting."""
    from evcore.edge.dispatch import Change, ChangeKind, decreases_settled

    ctrl = _rig(2)[0]
    st = ctrl.state
    c = ctrl.state.chargers["cp-0001"]
    st.on_meter(c.charger_id, (4.0, None, None), None, None, 999.0)
    ctrl._prepare_send(1, "tx", Change(c.charger_id, 16.0, 6.0, ChangeKind.DECREASE), None, 999.9)
    p = ctrl.pending[c.charger_id]
    assert not p.meter_proves
    ctrl.pending[c.charger_id] = replace(p, accepted=True, accepted_at_s=1000.0)
    st.on_meter(c.charger_id, (4.5, None, None), None, None, 1001.0)
    ctrl._note_in_effect(c)
    assert not ctrl.pending[c.charger_id].in_effect
    settle = ctrl.cfg.settle_s
    assert not decreases_settled(ctrl.pending.values(), 999.9 + settle - 0.1, settle)
    assert decreases_settled(ctrl.pending.values(), 999.9 + settle, settle)
    # Drawing above the new limit when it left: a later reading at it shows it in force.
    st.on_meter(c.charger_id, (16.0, None, None), None, None, 1010.0)
    ctrl._prepare_send(2, "tx", Change(c.charger_id, 16.0, 6.0, ChangeKind.DECREASE), None, 1010.1)
    p = ctrl.pending[c.charger_id]
    assert p.meter_proves
    ctrl.pending[c.charger_id] = replace(p, accepted=True, accepted_at_s=1010.2)
    st.on_meter(c.charger_id, (6.0, None, None), None, None, 1011.0)
    ctrl._note_in_effect(c)
    assert ctrl.pending[c.charger_id].in_effect


def test_a_dc_decrease_is_judged_by_its_input_reading() -> None:
    """A DC setpoint is output power; the meter reads the AC input (setpoint / efficiency + aux).
    Lowered from 90 to 40 kW, a reading of the input 40 kW takes shows the decrease in force, one
    of the input 60 kW takes does not; a charger already drawing only the input 40 kW takes when
    the decrease leaves proves nothing by later readings (it settles by time)."""
    from evcore.edge.dispatch import Change, ChangeKind

    ctrl, _ = stepped_controller(_dc_site(), RecordingGateway())
    st = ctrl.state
    c = st.chargers["dc1"]

    def input_w(output_w: float) -> float:
        return output_w / 0.96 + 300.0

    def lower(at: float) -> None:
        ctrl._prepare_send(
            1, "tx", Change("dc1", 90_000.0, 40_000.0, ChangeKind.DECREASE), None, at
        )
        ctrl.pending["dc1"] = replace(ctrl.pending["dc1"], accepted=True, accepted_at_s=at + 0.1)

    st.on_meter("dc1", (None, None, None), input_w(90_000.0), None, 999.0)
    lower(999.9)
    assert ctrl.pending["dc1"].meter_proves
    st.on_meter("dc1", (None, None, None), input_w(60_000.0), None, 1001.0)
    ctrl._note_in_effect(c)
    assert not ctrl.pending["dc1"].in_effect
    st.on_meter("dc1", (None, None, None), input_w(40_000.0), None, 1002.0)
    ctrl._note_in_effect(c)
    assert ctrl.pending["dc1"].in_effect
    # Already at the input 40 kW takes when the decrease leaves: a reading there proves nothing.
    st.on_meter("dc1", (None, None, None), input_w(40_000.0), None, 1010.0)
    lower(1010.5)
    assert not ctrl.pending["dc1"].meter_proves


def test_an_idle_charger_counts_at_the_txdefault_it_replaced_until_it_settles() -> None:
    now = 1_800_000_000.0
    core, st, cfg = _session_state(now)
    x = st.chargers["cp-0001"]
    st.on_transaction(x.charger_id, "ended", x.transaction_id or "", now)
    # It accepted a TxDefault lowered from 32 to 6 A, but may not have applied it yet: a car
    # plugged in now may still draw 32 A, so F1 (32 A) has nothing for its neighbour.
    x.tx_default = x.sent = x.holding = 6.0
    x.tx_default_old, x.tx_default_old_until = 32.0, 501.0  # _decide runs at monotonic 500
    assert _decide(core, st, cfg, now)["cp-0002"] == 0.0
    x.tx_default_old_until = 499.0  # settle_s has passed: the new level counts
    assert _decide(core, st, cfg, now)["cp-0002"] > 6.0


def test_a_single_phase_car_is_not_behind_a_plan_it_follows_on_a_three_phase_charger() -> None:
    from evcore.edge.controller import PlanTargets

    ctrl, _, clock, _ = _rig(2)
    _plug_all(ctrl, clock)
    c = ctrl.state.chargers["cp-0001"]
    assert c.ac_phases == 3
    now = clock.now()
    plan = PlanTargets("local", "p@1", now, {c.charger_id: [(now, 3600.0, 10.0)]})
    ctrl.set_plan(plan)
    ctrl.plan_in_use = plan  # what _targets picks under a planning policy
    clock.advance(1800.0)
    # Half an hour at the plan's 10 A on L1 only (a single-phase car): 1.15 kWh, all it could.
    c.terminal_a = (10.0, 0.0, 0.0)
    c.session_energy_wh = 10.0 * 230.0 * 0.5
    assert c.charger_id not in ctrl._behind_plan(clock.now())
    c.session_energy_wh = 500.0  # well short of it: behind
    assert c.charger_id in ctrl._behind_plan(clock.now())
    # Drawing on all three phases, the same plan asks three times the energy.
    c.terminal_a = (10.0, 10.0, 10.0)
    c.session_energy_wh = 10.0 * 230.0 * 0.5
    assert c.charger_id in ctrl._behind_plan(clock.now())


# ---- T3 / T2: the local planner ----------------------------------------------------------------
class _FrozenClock(StepClock):
    """Simulated time that does not move by itself: a sleep returns only when time is advanced."""

    async def sleep(self, seconds: float) -> None:
        import asyncio

        await asyncio.Event().wait()


async def test_the_local_planner_stops_promptly_on_a_clock_that_does_not_move() -> None:
    import asyncio

    from evcore.edge.planning import LocalPlanner

    table = depot_table(2, per_feeder=2)
    clock = _FrozenClock()
    ctrl = build_controller(
        table,
        core=RustCore(load_site(table), table),
        gateway=RecordingGateway(),  # type: ignore[arg-type]
        clock=clock,
        cfg=EdgeConfig(**FAST, policy="planner_cost"),
    )
    planner = LocalPlanner(load_site(table), ctrl)
    task = asyncio.ensure_future(planner.run())
    for _ in range(20):
        await asyncio.sleep(0.01)  # it plans (no sessions) and sleeps
    planner.stop()
    await asyncio.wait_for(task, 5.0)


def test_a_local_plan_never_pauses_a_session_after_its_first_charging_step() -> None:
    from evcore.edge.planning import without_pauses

    ctrl, _, _, _ = _rig()
    c = next(iter(ctrl.state.chargers.values()))
    steps = [(0.0, 300.0, 0.0), (300.0, 300.0, 16.0), (600.0, 300.0, 0.0), (900.0, 300.0, 8.0)]
    # It may wait for its first charging step (deferring to cheap hours), then no pause.
    assert [t for _, _, t in without_pauses(steps, c)] == [0.0, 16.0, 6.0, 8.0]
    assert [t for _, _, t in without_pauses([(0.0, 300.0, 0.0)], c)] == [0.0]


# ---- T5: a DC charger's ignored-profile check uses its own conversion ---------------------------
def test_a_dc_charger_drawing_its_setpoint_with_losses_and_aux_is_not_suspect() -> None:
    from evcore.edge.app import charger_states
    from evcore.edge.faults import FaultChange, check_ignored, draws_above_limit

    st, _ = charger_states(_dc_site())
    c = st.chargers["dc1"]
    c.sent = c.holding = 90_000.0
    c.accepted = True
    c.profile_unknown = False
    c.note_limit(0.0)
    cfg = EdgeConfig(settle_s=5.0, ignore_threshold_a=2.0, ignore_after_s=10.0)
    # Its AC input at the setpoint: 90 kW / 0.96 + 300 W = 94.05 kW, 4 kW above the setpoint.
    c.measured_w = 90_000.0 / 0.96 + 300.0
    c.measured_at = 10.0
    assert check_ignored(c, 10.0, cfg) is None and c.suspect_since is None
    assert not draws_above_limit(c, 10.0, cfg)
    # 2 A per phase at 230 V is 1380 W: 2 kW more than its input allows is an overdraw.
    c.measured_w = 90_000.0 / 0.96 + 300.0 + 2_000.0
    c.measured_at = 11.0
    assert check_ignored(c, 11.0, cfg) is FaultChange.SUSPECT
    assert draws_above_limit(c, 11.0, cfg)


# ---- T1: a plan target is not a cap for a session behind its plan -------------------------------
async def test_a_session_behind_its_plan_is_not_capped_at_the_target() -> None:
    from evcore.edge.controller import PlanTargets

    ctrl, gw, clock, _ = _rig(policy="planner_cost", cloud_plan_fresh_s=3600.0)
    _plug_all(ctrl, clock, n=1)
    cid = next(iter(ctrl.state.chargers))
    c = ctrl.state.chargers[cid]
    now = clock.now()
    ctrl.set_plan(PlanTargets("cloud", "cloud@1", now, {cid: [(now - 1.0, 7200.0, 10.0)]}))
    # Three rounds: the session's first TxDefault waits for its TxProfile, and its raise for the
    # first TxDefault's settle time.
    await settle(ctrl, clock, rounds=3)
    assert gw.tx()[cid] == pytest.approx(10.0)  # the target caps it while on plan
    # 10 minutes at 10 A x 690 W/A is 1.15 kWh; it delivered 1.1 kWh: on plan, still capped.
    clock.advance(600.0)
    c.session_energy_wh = 1100.0
    await settle(ctrl, clock, rounds=2)
    assert gw.tx()[cid] == pytest.approx(10.0)
    # 10 more minutes with nothing delivered: behind its plan, so the target no longer caps it.
    clock.advance(600.0)
    await settle(ctrl, clock, rounds=2)
    assert gw.tx()[cid] > 10.0 + 1.0, gw.tx()
