"""A session that started in the first-TxDefault gap needs more than the station's report.

A station may report (GetCompositeSchedule) the TxDefault it accepted before the car follows it.
For an idle charger the report ends the gap (nothing draws against it yet). A session that started
in the gap may be drawing the charger's maximum: it counts there until a fresh meter reading shows
it at or below what it counts at afterwards (within ``deadband_a``, as for a decrease in force:
only after it was read above that in the gap), or ``settle_s`` after the acceptance.

The controller with the Rust core, on a step clock, and a gateway double whose reports the test
answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from edge_testkit import FAST, stepped_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import MeterSample
from evcore.ocpp.server import CompositeSchedule


class _Result:
    accepted = True


class _ReportingGateway:
    """Accepts every profile at once; each GetCompositeSchedule waits for ``report``."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, asyncio.Future[float]]] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> _Result:
        return _Result()

    async def get_composite_schedule(
        self, charger_id: str, *, duration_s: int, unit: str | None = None
    ) -> CompositeSchedule:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.asked.append((charger_id, fut))
        limit = await fut
        return CompositeSchedule(charger_id, "Accepted", None, unit, [(0, limit, 3)])

    def report(self, charger_id: str, limit_a: float) -> None:
        """Answer the pending report of ``charger_id``: it enforces ``limit_a`` now."""
        for cid, fut in self.asked:
            if cid == charger_id and not fut.done():
                fut.set_result(limit_a)


async def _yield() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _meter(ctrl: EdgeController, cid: str, amps: float) -> None:
    c = ctrl.state.chargers[cid]
    ctrl.on_event(
        MeterSample(
            cid, c.ocpp_id, ctrl.clock.now(), (amps,) * 3, (amps,) * 3,
            amps * 690.0, None, None, None, c.transaction_id, None,
        )
    )  # fmt: skip


@pytest.mark.parametrize("proof", ["meter", "settle"])
async def test_a_session_started_in_the_gap_counts_at_its_maximum_until_its_car_follows(
    proof: str,
) -> None:
    """Two idle 32 A chargers on a 32 A feeder accept their first TxDefaults (0 A: each counted
    at its maximum beside the other). A car plugs into A; then both stations report 0 A. B (idle)
    is counted at its TxDefault at once; A is not: before the fix the report ended A's gap too,
    while its car could still draw 32 A. ``meter``: A read at 32 A, then at 0.5 A (within the
    deadband of 0 A) ends it. ``settle``: A read at 0 A only (never above: the car may not have
    started drawing) proves nothing; the gap ends ``settle_s`` after the acceptance."""
    cfg = EdgeConfig(**{**FAST, "settle_s": 10.0})
    gw = _ReportingGateway()
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2, grid_share=1.0), gw, cfg=cfg)
    a, b = sorted(ctrl.state.chargers)
    ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
    await ctrl.decide("test")
    await _yield()
    assert ca.tx_default == 0.0 and cb.tx_default == 0.0
    until = ca.default_unapplied_until
    assert until is not None and ca.default_unapplied(clock.monotonic())
    assert {cid for cid, _ in gw.asked} == {a, b}
    ctrl.state.on_status(a, "Charging")
    ctrl.state.on_transaction(a, "started", "tx-a", clock.now(), clock.monotonic())
    assert ca.session_in_gap
    gw.report(a, 0.0)
    gw.report(b, 0.0)
    await _yield()
    assert not cb.default_unapplied(clock.monotonic())  # idle: the report is enough
    assert ca.default_unapplied(clock.monotonic()), "the report alone ended the session's gap"
    if proof == "meter":
        clock.advance(0.5)
        _meter(ctrl, a, 32.0)  # the car draws the charger's maximum: not applied
        assert ca.default_unapplied(clock.monotonic())
        clock.advance(0.5)
        _meter(ctrl, a, 0.5)  # now it follows the TxDefault (0 A, within the deadband)
        assert not ca.default_unapplied(clock.monotonic())
        assert clock.monotonic() < until
        assert "applied" in ctrl._triggers
    else:
        clock.advance(0.5)
        _meter(ctrl, a, 0.0)
        assert ca.default_unapplied(clock.monotonic())
        clock.advance(until - clock.monotonic() - 0.01)
        _meter(ctrl, a, 0.0)
        assert ca.default_unapplied(clock.monotonic())
        clock.advance(0.02)
        assert not ca.default_unapplied(clock.monotonic())
    ctrl.stop()
    for fut in list(ctrl._sends):
        fut.cancel()
    await asyncio.gather(*ctrl._sends, return_exceptions=True)
