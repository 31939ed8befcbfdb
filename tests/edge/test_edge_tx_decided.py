"""A TxProfile names the session it was decided for, taken at decision time (review 2026-12-05,
LOW): the decision awaits its audit append before anything leaves, and a session that ends and
the next that starts on the charger meanwhile must not have the order name the new session.
Before, the transaction id was read at send time, after that await.

The controller with the Rust core on a step clock, a gateway double recording what it is told,
and an audit sink the test holds open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from edge_testkit import settle, stepped_controller
from evcore.edge.grid import Curtailment
from evcore.edge.sitegen import depot_table


class _Result:
    accepted = True


class _Gateway:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> _Result:
        self.calls.append((charger_id, kwargs["purpose"], kwargs.get("transaction_id")))
        return _Result()


class _HeldAudit:
    """Durable at once, except while ``gate`` is set: then the append waits for it."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def append(self, decision: Mapping[str, Any]) -> None:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()


async def test_a_txprofile_names_the_session_it_was_decided_for_not_the_next() -> None:
    gw = _Gateway()
    audit = _HeldAudit()
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2), gw, audit=audit)
    await settle(ctrl, clock, 4)
    a, b = sorted(ctrl.state.chargers)
    for cid in (a, b):
        ctrl.state.on_status(cid, "Charging")
        ctrl.state.on_transaction(cid, "started", "tx1-" + cid, clock.now(), clock.monotonic())
    await ctrl.decide("test")
    await asyncio.sleep(0)
    n = len(gw.calls)
    # A curtailment in force now: the decision lowers both sessions' TxProfiles.
    now = clock.now()
    ctrl.post_curtailment(Curtailment("dso-1", "grid", 5.0, now, now + 600.0))
    audit.gate = asyncio.Event()
    decision = asyncio.create_task(ctrl.decide("test"))
    await asyncio.wait_for(audit.waiting.wait(), 5.0)
    # While its record is being made durable, session 1 on charger A ends and session 2 starts.
    ctrl.state.on_transaction(a, "ended", "tx1-" + a, clock.now(), clock.monotonic())
    ctrl.state.on_transaction(a, "started", "tx2-" + a, clock.now(), clock.monotonic())
    audit.gate.set()
    assert await decision is not None
    for _ in range(3):
        await asyncio.sleep(0)
    sent = [(cid, tx) for cid, purpose, tx in gw.calls[n:] if purpose == "tx"]
    assert (a, "tx1-" + a) in sent, sent  # before the fix: (a, "tx2-" + a)
    assert (a, "tx2-" + a) not in sent, sent
    assert (b, "tx1-" + b) in sent, sent
