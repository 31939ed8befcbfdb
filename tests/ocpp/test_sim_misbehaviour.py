"""Simulated stations misbehaving on command, against the central system over real sockets."""

from __future__ import annotations

import asyncio

import pytest
from evcore.ocpp import ConnectionEvent, MeterSample, TransactionEvent
from evcore.sim.ev import EV
from ocpp_testsite import rig

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("sid", ["CPA", "CPB"])
async def test_garbage_gets_a_callerror_and_the_session_lives(sid: str) -> None:
    async with rig() as r:
        sim = r.fleet.stations[sid]
        code = "FormationViolation" if sim.version == "1.6" else "RpcFrameworkError"
        for garbage in ("{not json", "[2]", '[2, "g1", "Heartbeat", []]'):
            await sim.send_raw(garbage)
        await r.until(lambda: len(sim.call_errors) == 3)
        assert {e[2] for e in sim.call_errors} == {code}
        assert sim.connections == 1 and sid in r.cs.connected()
        hb = await sim.call("Heartbeat", {})
        assert hb is not None and "currentTime" in hb


@pytest.mark.parametrize("charger", ["cp-a", "cp-b"])
async def test_disconnect_mid_session_keeps_one_transaction(charger: str) -> None:
    async with rig() as r:
        sid = r.cs.charger(charger).ocpp_id
        sim = r.fleet.stations[sid]
        r.fleet.plug_in(charger, EV(soc=0.4))
        await r.until(lambda: r.cs.station_state(charger).active_transactions.get(1) is not None)
        tx = r.cs.station_state(charger).active_transactions[1]
        await sim.disconnect()
        await r.until(lambda: sim.connections == 2 and sid in r.cs.connected())
        conns = [(e.connected, e.reason) for e in r.of(ConnectionEvent) if e.ocpp_id == sid]
        assert conns[-3:] == [(True, ""), (False, "closed"), (True, "")]
        # The session goes on: meter values after the reconnect belong to the same transaction.
        n = len(r.of(MeterSample))
        await r.until(lambda: len(r.of(MeterSample)) > n + 1, 6)
        assert r.of(MeterSample)[-1].transaction_id == tx
        r.fleet.unplug(charger)
        await r.until(lambda: any(e.kind == "ended" for e in r.of(TransactionEvent)))
        kinds = [e.kind for e in r.of(TransactionEvent) if e.kind != "updated"]
        assert kinds == ["started", "ended"]
        assert r.cs.station_state(charger).active_transactions == {}


async def test_stop_reporting_leaves_no_samples() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPA"]
        r.fleet.plug_in("cp-a", EV(soc=0.4))
        await r.until(lambda: any(s.charger_id == "cp-a" and s.power_w for s in r.of(MeterSample)))
        sim.misbehaviour.stop_reporting = True
        await asyncio.sleep(0.3)  # let a report already queued arrive
        n = len([s for s in r.of(MeterSample) if s.charger_id == "cp-a"])
        await asyncio.sleep(2.5)  # sample interval is 1 s: two or more reports skipped
        assert len([s for s in r.of(MeterSample) if s.charger_id == "cp-a"]) == n
        assert sim.connectors[1].power_w > 0  # still charging, just silent
        sim.misbehaviour.stop_reporting = False
        await r.until(lambda: len([s for s in r.of(MeterSample) if s.charger_id == "cp-a"]) > n)


@pytest.mark.parametrize("charger", ["cp-a", "cp-b"])
async def test_an_ignored_profile_shows_in_the_composite_schedule(charger: str) -> None:
    async with rig() as r:
        sim = r.fleet.stations[r.cs.charger(charger).ocpp_id]
        sim.misbehaviour.ignore_profiles = True
        r.fleet.plug_in(charger, EV(soc=0.4))
        await r.until(lambda: r.cs.station_state(charger).active_transactions.get(1) is not None)
        res = await r.cs.set_limit(charger, limit_a=10)  # a TxProfile: there is a transaction
        assert res.accepted
        await asyncio.sleep(0.5)  # well past the station's 0.1 s apply delay
        assert sim.connectors[1].terminal_a[0] == 32.0  # it goes on drawing the maximum
        comp = await r.cs.get_composite_schedule(charger, duration_s=60)
        assert comp.status == "Accepted" and comp.limit_at(r.cs.clock.now()) == 32.0
        sim.misbehaviour.ignore_profiles = False
        assert (await r.cs.set_limit(charger, limit_a=10)).accepted
        await r.until(lambda: sim.connectors[1].terminal_a[0] == 10.0)
        comp = await r.cs.get_composite_schedule(charger, duration_s=60)
        assert comp.limit_at(r.cs.clock.now()) == 10.0
