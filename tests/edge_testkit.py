"""Shared by the edge tests: an edge configuration that acts within seconds (the rig's stations
answer at once and apply profiles within about a second)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from evcore.clock import StepClock
from evcore.edge.app import EdgeApp, build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.coreio import RustCore
from evcore.edge.rig import EdgeRig
from evcore.ocpp.events import MeterSample, TransactionEvent
from evcore.sim.chargepoint import HeldProfile
from evcore.site import load_site
from evcore.v1 import grid_pb2

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


def stepped_controller(
    table: Mapping[str, Any], gateway: Any, **kwargs: Any
) -> tuple[EdgeController, StepClock]:
    """An edge controller on the Rust core (``core=`` another) over the site ``table``, on a
    step clock, with ``FAST`` timings (``cfg=EdgeConfig(...)`` others) and every charger
    online; other keyword arguments go to ``build_controller``."""
    clock = StepClock()
    cfg = kwargs.pop("cfg", None) or EdgeConfig(**FAST)
    core = kwargs.pop("core", None) or RustCore(load_site(table), table)
    ctrl = build_controller(
        table,
        core=core,
        gateway=gateway,
        clock=clock,
        cfg=cfg,
        **kwargs,
    )
    for c in ctrl.state.chargers.values():
        c.online = True
    return ctrl, clock


def counted(ctrl: EdgeController, cid: str) -> tuple[float, bool, bool]:
    """What the core's input counts ``cid`` at: last sent (A per phase), whether that is
    confirmed, and whether its profile is unknown (counted at its maximum)."""
    core = ctrl.core
    assert isinstance(core, RustCore)
    cols = core._columns(
        ctrl.state,
        now_mono=ctrl.clock.monotonic(),
        failsafe=ctrl.failsafe,
        requested={c: ctrl.state.chargers[c].max_value for c in core.charger_ids},
        now_wall=ctrl.clock.now(),
        cfg=ctrl.cfg,
    )
    i = core.charger_ids.index(cid)
    return (
        float(np.asarray(cols["last_sent_a"])[i]),
        bool(np.asarray(cols["last_sent_confirmed"])[i]),
        bool(np.asarray(cols["profile_unknown"])[i]),
    )


async def settle(ctrl: EdgeController, clock: StepClock, rounds: int = 4) -> None:
    """Decide, let the answers arrive, advance past ``settle_s``; ``rounds`` times."""
    for _ in range(rounds):
        await ctrl.decide("test")
        await asyncio.sleep(0)
        if ctrl._sends:
            await asyncio.gather(*ctrl._sends)
        clock.advance(ctrl.cfg.settle_s + 0.1)


class GatewayAnswer:
    def __init__(self, accepted: bool) -> None:
        self.accepted = accepted


class ToldGateway:
    """A gateway double: answers each profile at once (Accepted), but for the purposes in
    ``reject`` (Rejected) and in ``hold`` (answered by ``release``; never, if not released),
    and every profile to a charger in ``hold_chargers`` likewise. ``calls`` keeps every
    ``(charger_id, kwargs)`` in order."""

    def __init__(self) -> None:
        self.reject: set[str] = set()
        self.hold: set[str] = set()
        self.hold_chargers: set[str] = set()
        self.waiting: list[asyncio.Future[bool]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> GatewayAnswer:
        self.calls.append((charger_id, kwargs))
        purpose = kwargs["purpose"]
        if purpose in self.reject:
            return GatewayAnswer(False)
        if purpose in self.hold or charger_id in self.hold_chargers:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.waiting.append(fut)
            return GatewayAnswer(await fut)
        return GatewayAnswer(True)

    def release(self, accepted: bool = True) -> None:
        for fut in self.waiting:
            if not fut.done():
                fut.set_result(accepted)
        self.waiting.clear()


async def spawn_edge(site_file: Path) -> asyncio.subprocess.Process:
    """``evcore edge --config site_file`` as a process, its output (stderr too) on ``stdout``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "evcore.cli",
        "edge",
        "--config",
        str(site_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def start_edge(site_file: Path, timeout_s: float = 60.0) -> asyncio.subprocess.Process:
    """:func:`spawn_edge`, once it says its OCPP port is open (its output stays readable on
    ``proc.stdout``); killed, with its output in the error, if it does not within
    ``timeout_s``."""
    proc = await spawn_edge(site_file)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            while line := (await proc.stdout.readline()).decode():
                seen.append(line)
                if "OCPP on port" in line:
                    return proc
    except TimeoutError:
        pass
    proc.kill()
    await proc.wait()
    raise AssertionError(f"edge did not start (rc={proc.returncode}): {''.join(seen)[-2000:]}")


class AcceptingGateway:
    """A gateway whose stations accept every profile at once."""

    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        class _Accepted:
            accepted = True

        return _Accepted()


async def until(cond: Any, timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Wait (wall clock) until ``cond()``; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(poll_s)


def grid_curtailment(
    cid: str,
    max_kw: float,
    start: float,
    end: float,
    *,
    issued_at: float | None = None,
    cancelled: bool = False,
    signal_id: str | None = None,
) -> grid_pb2.GridSignal:
    """A grid signal curtailing the grid connection to ``max_kw`` from ``start`` to ``end``
    (seconds); its id is ``cid@issued_at`` (``cid@start`` when not issued at a set time)."""
    at = start if issued_at is None else issued_at
    sig = grid_pb2.GridSignal(signal_id=signal_id or f"{cid}@{at}")
    if issued_at is not None:
        sig.issued_at.FromNanoseconds(int(issued_at * 1e9))
    sig.curtailment.curtailment_id = cid
    sig.curtailment.node_id = "grid"
    sig.curtailment.max_kw = max_kw
    sig.curtailment.cancelled = cancelled
    sig.curtailment.start.FromNanoseconds(int(start * 1e9))
    sig.curtailment.end.FromNanoseconds(int(end * 1e9))
    return sig


def planner_cfg(policy: str = "planner_cost", **changes: Any) -> EdgeConfig:
    """The edge planning tests' config: a fast tick, no minimum on/off times, re-plans on events
    only during a test (plus the first plan), a cloud or local plan fresh for 10 minutes."""
    base: dict[str, Any] = {
        "policy": policy,
        "tick_s": 0.5,
        "settle_s": 2.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
        "replan_every_s": 3600.0,
        "plan_budget_s": 5.0,
        "cloud_plan_fresh_s": 600.0,
    }
    return EdgeConfig(**{**base, **changes})


def controller_tx(ctrl: EdgeController, cid: str, tx: str, kind: str) -> TransactionEvent:
    """A transaction event of ``cid`` at ``ctrl``'s clock, with its station id from ``ctrl``'s
    site and no energy counted."""
    return TransactionEvent(
        charger_id=cid,
        ocpp_id=ctrl.state.chargers[cid].ocpp_id,
        transaction_id=tx,
        kind=kind,  # type: ignore[arg-type]
        at=ctrl.clock.now(),
        id_tag=None,
        meter_start_wh=0.0,
        meter_now_wh=0.0,
        session_energy_wh=0.0,
    )


def session_tx(cid: str, tx: str, kind: str, at: float, energy_wh: float) -> TransactionEvent:
    """A transaction event of ``cid`` (station ``CP`` + its last 4 characters), its register
    counted from 100 kWh."""
    return TransactionEvent(
        charger_id=cid,
        ocpp_id="CP" + cid[-4:],
        transaction_id=tx,
        kind=kind,  # type: ignore[arg-type]
        at=at,
        id_tag="tag",
        meter_start_wh=100_000.0,
        meter_now_wh=100_000.0 + energy_wh,
        session_energy_wh=energy_wh,
    )


def session_meter(cid: str, at: float, energy_wh: float) -> MeterSample:
    """A 16 A three-phase reading of ``cid`` with ``energy_wh`` into the car this session."""
    return MeterSample(
        charger_id=cid,
        ocpp_id="CP" + cid[-4:],
        at=at,
        site_phase_a=(16.0, 16.0, 16.0),
        terminal_a=(16.0, 16.0, 16.0),
        power_w=11_040.0,
        energy_register_wh=100_000.0 + energy_wh,
        offered_a=16.0,
        soc_percent=None,
        transaction_id=None,
        session_energy_wh=energy_wh,
    )


def held_default(
    now: float, pid: int, limit_a: float, *, evse: int = 1, stack: int = 1
) -> HeldProfile:
    """A TxDefault a station holds from ``now`` (one another controller, or an earlier
    numbering, left): profile ``pid`` at ``limit_a`` on three phases, at stack level ``stack``."""
    return held_profile(now, pid, "default", limit_a, evse=evse, stack=stack)


def held_profile(
    now: float,
    pid: int,
    purpose: str,
    limit_a: float,
    *,
    evse: int = 1,
    stack: int = 1,
    tx: str | None = None,
    unit: str = "A",
    phases: int | None = 3,
    valid_to: float | None = None,
) -> HeldProfile:
    """A profile of ``purpose`` ("default", "tx", "max") a station holds from ``now``: ``pid`` at
    ``limit_a`` on three phases, Absolute, at stack level ``stack``, bound to transaction ``tx``.
    ``unit`` "W" makes ``limit_a`` watts; ``phases`` None sends no numberPhases (the station
    takes its own); ``valid_to``: unix s it ends at (None: for good)."""
    return HeldProfile(
        id=pid,
        evse=evse,
        purpose=purpose,
        stack=stack,
        tx_id=tx,
        kind="Absolute",
        valid_from=None,
        valid_to=valid_to,
        start=now,
        duration=None,
        unit=unit,
        periods=[(0.0, limit_a, phases)],
        received_at=now,
    )


async def fleet_on(app: EdgeApp, table: dict[str, Any]) -> EdgeRig:
    """Once ``app`` (running) is ready, within 30 s: the simulated stations of ``table`` (no
    edge of their own) started and connecting to the app's central system. Stopped again if
    their start fails; the caller stops them otherwise."""
    await asyncio.wait_for(app.ready.wait(), 30)
    prefix = app.central.config.path_prefix
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{app.central.port}{prefix}")
    try:
        await rig.start()
    except BaseException:
        await rig.stop()
        raise
    return rig
