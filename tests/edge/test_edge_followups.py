"""Follow-ups of the safety review, each through the real controller and the Rust core.

The controller runs its real decision path (``EdgeController.decide``: failsafe recompute, core
allocator + envelope, dispatch, audit) against ``RustCore``; the gateway is a recording one that
answers every SetChargingProfile at once, so each test states exactly what left for which input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from evcore.clock import Clock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.coreio import RustCore
from evcore.edge.grid import Curtailment
from evcore.edge.sitegen import depot_table
from evcore.site import load_site

pytestmark = pytest.mark.timeout(60)


class ManualClock(Clock):
    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.wall = wall
        self.mono = 1000.0

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


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


FAST: dict[str, Any] = dict(
    tick_s=0.5,
    settle_s=3.0,
    failsafe_after_s=40.0,
    refresh_lead_s=10.0,
    fallback_guard_s=5.0,
    curtail_lead_s=3.0,
    min_on_s=0.0,
    min_off_s=0.0,
)


def _rig(
    n: int = 4, core: Any = None, **cfg: Any
) -> tuple[EdgeController, RecordingGateway, ManualClock, Mapping[str, Any]]:
    table = depot_table(n, per_feeder=2)
    clock = ManualClock()
    gw = RecordingGateway()
    ctrl = build_controller(
        table,
        core=core if core is not None else RustCore(load_site(table), table),
        gateway=gw,  # type: ignore[arg-type]
        clock=clock,
        cfg=EdgeConfig(**{**FAST, **cfg}),
    )
    for c in ctrl.state.chargers.values():
        c.online = True
    return ctrl, gw, clock, table


def _plug_all(ctrl: EdgeController, clock: ManualClock, n: int | None = None) -> None:
    for c in list(ctrl.state.chargers.values())[:n]:
        ctrl.state.on_status(c.charger_id, "Charging")
        ctrl.state.on_transaction(
            c.charger_id, "started", "tx-" + c.charger_id, clock.now(), clock.monotonic()
        )


async def _settle(ctrl: EdgeController, clock: ManualClock, rounds: int = 4) -> None:
    """Decide, let the answers arrive, repeat (advancing past settle_s)."""
    import asyncio

    for _ in range(rounds):
        await ctrl.decide("test")
        await asyncio.sleep(0)
        if ctrl._sends:
            await asyncio.gather(*ctrl._sends)
        clock.advance(ctrl.cfg.settle_s + 0.1)


# ---- H3: an operator priority can never stop every decision ------------------------------------
@pytest.mark.parametrize("priority", [0.0, 1e-12, 1e9])
async def test_a_priority_outside_the_core_range_does_not_stop_decisions(priority: float) -> None:
    ctrl, gw, clock, _ = _rig()
    _plug_all(ctrl, clock)
    next(iter(ctrl.state.chargers.values())).priority = priority  # e.g. from an old store
    await _settle(ctrl, clock)
    assert ctrl.stats.core_failures == 0
    assert set(gw.tx()) == set(ctrl.state.chargers)


async def test_least_laxity_weights_times_a_high_priority_stay_in_the_core_range() -> None:
    ctrl, gw, clock, _ = _rig(n=24, policy="least_laxity")
    _plug_all(ctrl, clock)
    for i, c in enumerate(ctrl.state.chargers.values()):
        c.priority = 1e3  # the highest an operator may set
        c.departure = clock.now() + 3600 * (1 + i)
        c.energy_requested_kwh = 20.0
    await _settle(ctrl, clock)
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

    def failsafe_levels(self, caps_kw: Mapping[str, float]) -> dict[str, float]:
        return self.real.failsafe_levels(caps_kw)


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
    await _settle(ctrl, clock)
    before = gw.tx()
    # A curtailment arrives while the core refuses every decision: the failsafe levels drop
    # (recomputed by the core's failsafe path), and the chargers must come down to them.
    core.fail = True
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 2.0, now + 600.0))
    await _settle(ctrl, clock, rounds=2)
    fs = ctrl.failsafe
    assert ctrl.stats.core_failures >= 1
    assert all(fs[cid] < before[cid] - 1.0 for cid in before)
    after = gw.tx()
    assert all(after[cid] <= fs[cid] + 1e-9 for cid in after), (after, fs)
    core.fail = False
    n = ctrl.stats.decisions
    await _settle(ctrl, clock)
    assert ctrl.stats.decisions > n  # deciding again


# ---- H4: a 0 kW curtailment works -------------------------------------------------------------
async def test_a_zero_kw_curtailment_puts_everything_under_it_to_zero_and_decides_on() -> None:
    ctrl, gw, clock, _ = _rig()
    _plug_all(ctrl, clock)
    await _settle(ctrl, clock)
    assert all(v > 0 for v in gw.tx().values())
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-0", "grid", 0.0, now + 5.0, now + 600.0))
    await _settle(ctrl, clock, rounds=4)
    assert ctrl.stats.core_failures == 0 and ctrl.stats.failsafe_failures == 0
    assert all(v == 0.0 for v in ctrl.failsafe.values())
    assert all(v == 0.0 for v in gw.tx().values()), gw.tx()
    defaults = {cid: kw["limit_a"] for cid, kw in gw.calls if kw["purpose"] == "tx_default"}
    assert all(v == 0.0 for v in defaults.values())


async def test_a_failing_failsafe_recompute_keeps_the_previous_levels_and_still_decides() -> None:
    table = depot_table(4, per_feeder=2)

    class _NoFailsafe(_FailingCore):
        def failsafe_levels(self, caps_kw: Mapping[str, float]) -> dict[str, float]:
            if caps_kw:
                raise ValueError("failsafe refused")
            return self.real.failsafe_levels(caps_kw)

    core = _NoFailsafe(RustCore(load_site(table), table), ValueError())
    ctrl, gw, clock, _ = _rig(core=core)
    _plug_all(ctrl, clock)
    await _settle(ctrl, clock)
    levels = dict(ctrl.failsafe)
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 2.0, now + 600.0))
    n = ctrl.stats.decisions
    await _settle(ctrl, clock)
    assert ctrl.stats.failsafe_failures >= 1 and ctrl.failsafe == levels
    assert ctrl.stats.decisions > n
    # The curtailment itself still went out: 10 kW at the grid is < 15 A per phase in all.
    assert sum(gw.tx().values()) <= 10_000 / 230 / 3 + 1e-6 * 4, gw.tx()
