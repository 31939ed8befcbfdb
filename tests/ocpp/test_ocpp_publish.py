"""Events reach the bus as contract messages and the store before the station gets its answer."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from evcore.bus.api import BusMessage
from evcore.bus.inprocess import InProcessBus
from evcore.ocpp import TransactionEvent
from evcore.sim.ev import EV
from evcore.store.sqlite import sqlite_store
from evcore.v1 import meter_pb2, status_pb2, transaction_pb2
from ocpp_testsite import rig

pytestmark = pytest.mark.timeout(60)


async def test_status_meter_and_transactions_are_published_and_stored(tmp_path: Path) -> None:
    bus = InProcessBus("ocpp-test")
    await bus.start()
    store = sqlite_store(tmp_path / "store", telemetry_retention_s=3600)
    await store.open()
    got: dict[str, list[BusMessage]] = {"telemetry": [], "status": [], "transaction": []}

    async def collect(msg: BusMessage) -> None:
        got[msg.subject.split(".")[2]].append(msg)

    for kind in got:
        await bus.subscribe(f"evcore.ocpp-test.{kind}.*", collect)
    try:
        async with rig(bus=bus, store=store) as r:
            r.fleet.plug_in("cp-a", EV(soc=0.5, phases=1, onboard_limit_a=10.0))
            await r.until(lambda: any(m.subject.endswith("cp-a") for m in got["telemetry"]), 6)
            await asyncio.sleep(1.1)
            r.fleet.unplug("cp-a")
            await r.until(lambda: any(e.kind == "ended" for e in r.of(TransactionEvent)), 6)
            await r.fleet.stations["CPA"].wait_idle()
            tx_id = r.of(TransactionEvent)[0].transaction_id
        await bus.flush()
        samples = [meter_pb2.MeterSample.FromString(m.data) for m in got["telemetry"]]
        charging = [s for s in samples if s.HasField("power_w") and s.power_w > 0]
        assert charging, samples
        # Site phase order: cp-a's L1 is site L2; the other phases carry no current.
        assert list(charging[0].current_a) == [0.0, 10.0, 0.0]
        assert charging[0].transaction_id == tx_id
        kinds = [
            transaction_pb2.TransactionEvent.FromString(m.data).kind for m in got["transaction"]
        ]
        assert kinds == [
            transaction_pb2.TRANSACTION_EVENT_KIND_STARTED,
            transaction_pb2.TRANSACTION_EVENT_KIND_ENDED,
        ]
        states = [
            status_pb2.ChargerStatus.FromString(m.data).state
            for m in got["status"]
            if m.subject.endswith("cp-a")
        ]
        assert status_pb2.CONNECTOR_STATE_CHARGING in states
        # The same events were stored.
        stored = await store.meter_samples("cp-a")
        assert len(stored) == len([s for s in samples if s.charger_id == "cp-a"])
        assert any(not math.isnan(s.current_a[1]) and s.current_a[1] == 10.0 for s in stored)
        events = await store.transaction_events("cp-a", tx_id)
        assert [e.kind for e in events] == kinds
        ended = events[-1]
        assert ended.meter_stop_wh - ended.meter_start_wh > 0
        latest = await store.latest_statuses()
        assert latest["cp-a"].state == status_pb2.CONNECTOR_STATE_AVAILABLE
    finally:
        await store.close()
        await bus.close()
