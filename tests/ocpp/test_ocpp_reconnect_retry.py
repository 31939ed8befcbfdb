"""A station that reconnects and resends a transaction message while the central system is still
handling the first copy (read on the connection that dropped, its handler waiting on the bus or
the store) must not be answered before the first copy's outcome is known (review of the OCPP
room, session 15). Real OCPP over real WebSockets; the bus is the in-process one, made to hold the
first transaction publish and then refuse it (its outbox's disk full)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.bus.inprocess import InProcessBus
from evcore.ocpp import TransactionEvent
from evcore.v1 import transaction_pb2
from ocpp_testsite import BOOT_201, RawStation, meter, raw_csms, tx_event

pytestmark = pytest.mark.timeout(30)


class _HoldsThenRefuses(InProcessBus):
    """Holds the first transaction publish until ``release``, then refuses it (disk full)."""

    def __init__(self, site_id: str) -> None:
        super().__init__(site_id)
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.first = True

    async def publish(self, subject: str, payload: Any, **kw: Any) -> str:
        if ".transaction." in subject and self.first:
            self.first = False
            self.held.set()
            await self.release.wait()
            raise OSError(28, "database or disk is full")
        return await super().publish(subject, payload, **kw)


async def test_a_resend_on_a_new_connection_waits_for_the_first_copy_2_0_1() -> None:
    """2.0.1: the resent TransactionEvent(Started) is answered only once the first copy's
    publish has failed, and is then published itself. Before, its seqNo was already booked, so
    the resend got a CALLRESULT at once (answered as a replay); the first copy's publish then
    failed, and the start reached neither bus nor store: the station had its answer and never
    sent it again."""
    bus = _HoldsThenRefuses("ocpp-test")
    await bus.start()
    got: list[Any] = []

    async def collect(m: Any) -> None:
        got.append(transaction_pb2.TransactionEvent.FromString(m.data).transaction_id)

    await bus.subscribe("evcore.ocpp-test.transaction.*", collect)
    try:
        async with raw_csms(bus=bus) as r:
            first = await r.station("CPB")
            t = r.clock.now() - 5
            started = tx_event("T1", 0, "Started", "CablePluggedIn", t,
                               evse={"id": 1, "connectorId": 1},
                               meterValue=meter(t, 1000, 16))  # fmt: skip
            lost = asyncio.ensure_future(first.call("TransactionEvent", started))
            await asyncio.wait_for(bus.held.wait(), 5)
            # The link drops; the station reconnects and resends (the first copy is still held).
            await first.close()
            second = await RawStation.open(r.cs.port, "CPB")
            r.stations.append(second)
            assert (await second.call("BootNotification", BOOT_201))[0] == 3
            resend = asyncio.ensure_future(second.call("TransactionEvent", started))
            await asyncio.sleep(0.3)
            early = resend.done()
            bus.release.set()
            answer = await resend
            assert not early, "the resend was answered while the first copy was held"
            assert answer[0] == 3, answer
            await bus.flush()
            assert got == ["T1"]
            kinds = [e.kind for e in r.of(TransactionEvent) if e.transaction_id == "T1"]
            assert kinds == ["started"]
            lost.cancel()
    finally:
        await bus.close()
