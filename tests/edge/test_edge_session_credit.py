"""An answer to a TxProfile is credited to the session it was sent for, not to the next one.

A TxProfile dies with its transaction. An answer that arrives after the transaction ended says
nothing about the next session on the same charger, even when the value matches (a refresh at the
TxDefault level, which the next session also starts on). Crediting it marked that session as
holding a TxProfile of ours (``tx_profile_held``) while its station never got one for it, so its
TxDefault changed under its car without a TxProfile first.

The controller with the Rust core, on a step clock, and a gateway double whose answers the test
releases one by one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from edge_testkit import settle, stepped_controller
from evcore.clock import StepClock
from evcore.edge.controller import EdgeController
from evcore.edge.grid import Curtailment
from evcore.edge.sitegen import depot_table


class _Result:
    def __init__(self, accepted: bool) -> None:
        self.accepted = accepted


@dataclass
class _Call:
    charger_id: str
    purpose: str
    limit_a: float
    transaction_id: str | None  # the charger's transaction when the profile left
    held: bool  # whether that session held a TxProfile of ours it accepted then
    answer: asyncio.Future[bool]


class _HoldingGateway:
    """Answers TxDefaults at once (Accepted); TxProfiles only when the test answers them."""

    def __init__(self) -> None:
        self.ctrl: EdgeController | None = None
        self.calls: list[_Call] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> _Result:
        assert self.ctrl is not None
        c = self.ctrl.state.chargers[charger_id]
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        purpose = kwargs["purpose"]
        call = _Call(
            charger_id, purpose, float(kwargs["limit_a"]), c.transaction_id, c.tx_profile_held, fut
        )
        self.calls.append(call)
        if purpose != "tx":
            fut.set_result(True)
        return _Result(await fut)


def _start(ctrl: EdgeController, clock: StepClock, cid: str, tx: str) -> None:
    ctrl.state.on_status(cid, "Charging")
    ctrl.state.on_transaction(cid, "started", tx, clock.now(), clock.monotonic())


async def _yield() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_txprofile_accepted_after_its_session_ended_is_not_credited_to_the_next() -> None:
    """Two sessions on their TxDefault; a curtailment ahead lowers the TxDefaults, so each
    session's TxProfile leaves first (a refresh at its TxDefault level). Session 1 on charger A
    ends and session 2 starts before the station's Accepted for session 1's refresh arrives.
    Session 2 holds no TxProfile: it must get its own before its TxDefault is lowered."""
    gw = _HoldingGateway()
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2), gw)
    gw.ctrl = ctrl
    await settle(ctrl, clock, 4)  # idle: the TxDefaults at their final levels
    assert ctrl.failsafe_is_plain()
    a, b = sorted(ctrl.state.chargers)
    ca = ctrl.state.chargers[a]
    for cid in (a, b):
        _start(ctrl, clock, cid, "tx1-" + cid)
    await ctrl.decide("test")
    await _yield()
    n = len(gw.calls)
    assert not any(c.tx_profile_held for c in ctrl.state.chargers.values())
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 10.0, now + 20.0, now + 600.0))
    await ctrl.decide("test")
    await _yield()
    refresh = [x for x in gw.calls[n:] if x.charger_id == a and x.purpose == "tx"]
    assert len(refresh) == 1 and refresh[0].transaction_id == "tx1-" + a, gw.calls[n:]
    assert refresh[0].limit_a == ca.tx_default  # a refresh at what its TxDefault allows
    # Session 1 ends, session 2 starts on the same charger; then session 1's answer arrives.
    ctrl.state.on_transaction(a, "ended", "tx1-" + a, clock.now(), clock.monotonic())
    _start(ctrl, clock, a, "tx2-" + a)
    refresh[0].answer.set_result(True)
    await _yield()
    assert ca.transaction_id == "tx2-" + a
    assert not ca.tx_profile_held, "session 2 credited with session 1's TxProfile"
    # What leaves next: session 2's own TxProfile before its lowered TxDefault.
    m = len(gw.calls)
    for _ in range(4):
        await ctrl.decide("test")
        await _yield()
        for x in gw.calls:
            if x.purpose == "tx" and not x.answer.done():
                x.answer.set_result(True)
        await _yield()
        clock.advance(ctrl.cfg.tick_s)
    mine = [(x.purpose, x.transaction_id, x.held) for x in gw.calls[m:] if x.charger_id == a]
    assert mine[:1] == [("tx", "tx2-" + a, False)], mine
    assert all(held for purpose, _, held in mine if purpose == "tx_default"), mine
    assert ca.tx_default == ctrl.failsafe[a], mine
