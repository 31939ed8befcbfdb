"""The central system through simulated stations over real sockets (both OCPP versions)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from evcore.ocpp import (
    BootEvent,
    ConfigurationEvent,
    ConnectionEvent,
    MeterSample,
    NotificationEvent,
    SecurityEvent,
    StatusEvent,
    TransactionEvent,
)
from evcore.ocpp.v16 import iso
from evcore.sim.ev import EV
from ocpp_testsite import PASSWORDS, auth, raw_call, rig, station_ws
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(60)


async def test_boot_configures_measurands_and_records_refusals() -> None:
    async with rig(connect=False) as r:
        r.fleet.stations["CPA"].misbehaviour.refuse_config_keys = {"MeterValueSampleInterval"}
        r.fleet.stations["CPB"].misbehaviour.refuse_config_keys = {"AlignedDataCtrlr.Interval"}
        await r.fleet.start()
        await r.until(lambda: len(r.of(ConfigurationEvent)) == 4)
        conf = {e.ocpp_id: e for e in r.of(ConfigurationEvent)}
        assert conf["CPA"].refused == {"MeterValueSampleInterval": "Rejected"}
        assert conf["CPA"].results["MeterValuesSampledData"] == "Accepted"
        assert conf["CPB"].refused == {"AlignedDataCtrlr.Interval": "Rejected"}
        assert r.cs.station_state("CPA").configuration == conf["CPA"].results
        # The stations now report what was configured: per-phase current, power, register, offered.
        for sid in ("CPA", "CPB"):
            assert set(r.fleet.stations[sid].measurands) == {
                "Current.Import",
                "Power.Active.Import",
                "Energy.Active.Import.Register",
                "Current.Offered",
            }
        boots = {e.ocpp_id: e for e in r.of(BootEvent)}
        assert boots["CPB"].version == "2.0.1" and boots["CPB"].reason == "PowerUp"
        assert boots["CPA"].version == "1.6" and boots["CPA"].serial == "CPA"
        assert r.cs.connected() == {"CPA", "CPB", "CPM", "CPC"}


@pytest.mark.parametrize("charger", ["cp-a", "cp-b"])
async def test_session_meter_values_phase_mapping_and_energy(charger: str) -> None:
    async with rig() as r:
        await r.until(lambda: len(r.of(ConfigurationEvent)) == 4)
        # A single-phase car on a three-phase charger draws on the charger's L1 only.
        r.fleet.plug_in(charger, EV(soc=0.4, phases=1, onboard_limit_a=16.0))
        await r.until(
            lambda: any(s.charger_id == charger and s.power_w for s in r.of(MeterSample)), 6
        )
        started = [e for e in r.of(TransactionEvent) if e.kind == "started"]
        assert [e.charger_id for e in started] == [charger]
        sample = next(s for s in r.of(MeterSample) if s.charger_id == charger and s.power_w)
        assert sample.terminal_a == (16.0, 0.0, 0.0)
        # cp-a's L1 lands on site L2 (phases = L2, L3, L1); cp-b is not rotated.
        expected = (0.0, 16.0, 0.0) if charger == "cp-a" else (16.0, 0.0, 0.0)
        assert sample.site_phase_a == expected
        assert sample.power_w == pytest.approx(16.0 * 230.0, rel=1e-3)
        assert sample.offered_a == 32.0
        assert sample.transaction_id == started[0].transaction_id
        await asyncio.sleep(1.2)
        r.fleet.unplug(charger)
        await r.until(lambda: any(e.kind == "ended" for e in r.of(TransactionEvent)))
        ended = next(e for e in r.of(TransactionEvent) if e.kind == "ended")
        sim_conn = r.fleet.connector(charger)
        register_delta = sim_conn.register_wh - ended.meter_start_wh
        assert ended.meter_start_wh == pytest.approx(1_000_000.0, abs=1.0)
        assert ended.session_energy_wh is not None and ended.session_energy_wh > 1.0
        assert ended.session_energy_wh == pytest.approx(register_delta, abs=1.0)
        assert ended.reason == "EVDisconnected"
        await r.until(
            lambda: (
                [e.status for e in r.of(StatusEvent) if e.charger_id == charger][-1] == "Available"
            )
        )
        for sim in r.fleet.stations.values():
            assert sim.invalid_calls == [] and sim.call_errors == []


async def test_unknown_station_is_refused_at_upgrade() -> None:
    async with rig(connect=False) as r:
        with pytest.raises(InvalidStatus) as exc:
            async with connect(
                f"{r.base_url}/NOPE",
                subprotocols=[Subprotocol("ocpp1.6")],
                additional_headers=auth("CPA"),
            ):
                pass
        assert exc.value.response.status_code == 404


@pytest.mark.parametrize("offered", [None, ["ocpp2.1"], ["wamp"]])
async def test_missing_or_unknown_subprotocol_is_refused(offered: list[str] | None) -> None:
    async with rig(connect=False) as r:
        with pytest.raises(InvalidStatus) as exc:
            async with connect(
                f"{r.base_url}/CPA",
                subprotocols=offered,  # type: ignore[arg-type]
                additional_headers=auth("CPA"),
            ):
                pass
        assert exc.value.response.status_code == 400


@pytest.mark.parametrize("password", ["wrong-password-123456", None])
async def test_wrong_or_missing_password_gets_401(password: str | None) -> None:
    async with rig(connect=False) as r:
        headers = auth("CPA", password) if password else {}
        with pytest.raises(InvalidStatus) as exc:
            async with connect(
                f"{r.base_url}/CPA",
                subprotocols=[Subprotocol("ocpp1.6")],
                additional_headers=headers,
            ):
                pass
        assert exc.value.response.status_code == 401
        # Another station's (valid) password is wrong for this one.
        with pytest.raises(InvalidStatus) as exc2:
            async with connect(
                f"{r.base_url}/CPA",
                subprotocols=[Subprotocol("ocpp1.6")],
                additional_headers=auth("CPA", PASSWORDS["CPB"]),
            ):
                pass
        assert exc2.value.response.status_code == 401
        assert r.cs.connected() == set()


@pytest.mark.parametrize(
    ("sid", "version", "code"),
    [("CPA", "ocpp1.6", "FormationViolation"), ("CPB", "ocpp2.0.1", "RpcFrameworkError")],
)
async def test_malformed_frame_gets_callerror_and_connection_lives(
    sid: str, version: str, code: str
) -> None:
    async with rig(connect=False) as r:
        async with station_ws(r.base_url, sid, version) as ws:
            assert ws.subprotocol == version
            # (A malformed answer, '[3, "x2"]', is not answered: an answer never is;
            # test_a_malformed_answer_fails_our_call_at_once_and_is_not_answered.)
            for garbage in ("{not json", "[]", '{"a": 1}', '[2, "x1", "Heartbeat"]'):
                await ws.send(garbage)
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert msg[0] == 4 and msg[2] == code, (garbage, msg)
            # An unknown MessageTypeId: 2.0.1 names it, 1.6 has no code of its own for it.
            await ws.send('[9, "x3"]')
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            unknown = "MessageTypeNotSupported" if version == "ocpp2.0.1" else code
            assert msg[:3] == [4, "x3", unknown], msg
            hb = await raw_call(ws, "h1", "Heartbeat", {})
            assert hb[0] == 3 and "currentTime" in hb[2]
            # A schema violation names the version's code and the connection still lives.
            bad = await raw_call(ws, "b1", "Heartbeat", {"extra": 1})
            assert bad[0] == 4 and bad[2] in ("FormationViolation", "FormatViolation")
            missing = await raw_call(ws, "b2", "StatusNotification", {})
            assert missing[0] == 4 and missing[2] in (
                "OccurenceConstraintViolation",
                "OccurrenceConstraintViolation",
            )
            hb2 = await raw_call(ws, "h2", "Heartbeat", {})
            assert hb2[0] == 3


@pytest.mark.parametrize(("sid", "version"), [("CPA", "ocpp1.6"), ("CPB", "ocpp2.0.1")])
async def test_unhandled_action_gets_not_implemented(sid: str, version: str) -> None:
    async with rig(connect=False) as r:
        async with station_ws(r.base_url, sid, version) as ws:
            # An action the version defines but the CSMS does not handle, one of 2.1, one invented.
            for action in ("SignCertificate", "NotifyPeriodicEventStream", "MakeCoffee"):
                msg = await raw_call(ws, action, action, {})
                assert msg[0] == 4 and msg[2] == "NotImplemented", msg


async def test_bad_timestamps_are_refused() -> None:
    async with rig(connect=False) as r:
        async with station_ws(r.base_url, "CPA", "ocpp1.6") as ws:

            def mv(ts: str) -> dict[str, Any]:
                return {
                    "connectorId": 1,
                    "meterValue": [
                        {"timestamp": ts, "sampledValue": [{"value": "5", "unit": "Wh"}]}
                    ],
                }

            for i, ts in enumerate(
                ["2026-13-45T00:00:00Z", "2026-01-01T00:00:00", "yesterday", "2999-01-01T00:00:00Z"]
            ):
                msg = await raw_call(ws, f"t{i}", "MeterValues", mv(ts))
                assert msg[0] == 4, (ts, msg)
                assert msg[2] in ("PropertyConstraintViolation", "FormationViolation"), msg
            ok = await raw_call(ws, "ok", "MeterValues", mv("2026-01-01T00:00:00+01:00"))
            assert ok[0] == 3
            bad_value = await raw_call(
                ws,
                "v",
                "MeterValues",
                {
                    "connectorId": 1,
                    "meterValue": [
                        {"timestamp": "2026-01-01T00:00:00Z", "sampledValue": [{"value": "lots"}]}
                    ],
                },
            )
            # A value that is no number is skipped (counted), the message answered; nothing
            # is left of that reading to publish.
            assert bad_value[0] == 3, bad_value
            assert r.cs.skipped_values == {("CPA", "Energy.Active.Import.Register"): 1}
        samples = r.of(MeterSample)
        assert len(samples) == 1 and samples[0].energy_register_wh == 5.0


async def test_second_connection_replaces_first() -> None:
    async with rig(connect=False) as r:
        first = await station_ws(r.base_url, "CPA", "ocpp1.6")
        await raw_call(
            first, "b", "BootNotification", {"chargePointVendor": "v", "chargePointModel": "m"}
        )
        second = await station_ws(r.base_url, "CPA", "ocpp1.6")
        await asyncio.wait_for(first.wait_closed(), 5)
        assert first.close_code == 1001
        hb = await raw_call(second, "h", "Heartbeat", {})
        assert hb[0] == 3
        conns = [(e.connected, e.reason) for e in r.of(ConnectionEvent) if e.ocpp_id == "CPA"]
        assert conns == [(True, ""), (False, "replaced"), (True, "")]
        assert r.cs.connected() == {"CPA"}
        # Calls now go to the second connection.
        task = asyncio.create_task(r.cs.reset("CPA"))
        while True:
            msg = json.loads(await asyncio.wait_for(second.recv(), 5))
            if msg[0] == 2 and msg[2] == "Reset":
                await second.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
                break
            if msg[0] == 2:
                await second.send(json.dumps([3, msg[1], {"status": "Accepted"}]))
        res = await task
        assert res.ok and res.action == "Reset"
        await second.close()
        await r.until(lambda: r.cs.connected() == set())


async def test_lost_start_answer_and_offline_replay_never_duplicate_1_6() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPA"]
        # The answer to StartTransaction "gets lost": the station reconnects and sends it again.
        sim.misbehaviour.lose_answer_to = {"StartTransaction"}
        r.fleet.plug_in("cp-a", EV(soc=0.5))
        await r.until(lambda: sim.connections >= 2 and sim.connectors[1].tx_id is not None, 8)
        started = [e for e in r.of(TransactionEvent) if e.kind == "started"]
        assert len(started) == 1
        assert sim.connectors[1].tx_id == started[0].transaction_id
        # Offline: the car goes on charging; the stop and the meter values queue up and replay.
        await asyncio.sleep(1.2)
        await sim.go_offline(1.5)
        await r.until(lambda: "CPA" not in r.cs.connected())
        await asyncio.sleep(1.2)
        r.fleet.unplug("cp-a")
        await r.until(lambda: any(e.kind == "ended" for e in r.of(TransactionEvent)), 8)
        await sim.wait_idle()
        ended = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert len(ended) == 1
        assert ended[0].session_energy_wh == pytest.approx(
            sim.connectors[1].register_wh - 1_000_000.0, abs=1.0
        )
        assert len([e for e in r.of(TransactionEvent) if e.kind == "started"]) == 1
        # A duplicate StopTransaction (a second replay) changes nothing.
        await sim.call(
            "StopTransaction",
            {
                "transactionId": int(started[0].transaction_id),
                "meterStop": 1,
                "timestamp": iso(r.cs.clock.now()),
            },
        )
        assert len([e for e in r.of(TransactionEvent) if e.kind == "ended"]) == 1


async def test_a_stop_for_an_unknown_1_6_transaction_is_kept_where_it_can_be_attributed() -> None:
    """Started before this central system knew it (no store): a one-EVSE station's stop still
    becomes an ``ended`` event with its samples; a replay adds nothing; a two-EVSE station's is
    acknowledged (it names no connector) and attributed to no charger."""
    async with rig(connect=False, configure_on_boot=False) as r:
        now = r.cs.clock.now()

        def stop(tx: int) -> dict[str, Any]:
            return {
                "transactionId": tx,
                "meterStop": 2500,
                "timestamp": iso(now),
                "reason": "EVDisconnected",
                "transactionData": [
                    {
                        "timestamp": iso(now - 60),
                        "sampledValue": [
                            {
                                "value": "2000",
                                "measurand": "Energy.Active.Import.Register",
                                "unit": "Wh",
                                "context": "Transaction.Begin",
                            }
                        ],
                    }
                ],
            }

        for sid in ("CPA", "CPM"):
            async with station_ws(r.base_url, sid, "ocpp1.6") as ws:
                for attempt in ("s1", "s2"):  # the second is a replay
                    msg = await raw_call(ws, attempt, "StopTransaction", stop(4242))
                    assert msg[0] == 3, msg
        ended = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert [(e.charger_id, e.transaction_id) for e in ended] == [("cp-a", "4242")]
        assert ended[0].meter_start_wh == 2000.0 and ended[0].session_energy_wh == 500.0
        samples = [s for s in r.of(MeterSample) if s.transaction_id == "4242"]
        assert [s.charger_id for s in samples] == ["cp-a"]


async def test_replayed_transaction_events_never_duplicate_2_0_1() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        sim.misbehaviour.lose_answer_to = {"TransactionEvent"}
        r.fleet.plug_in("cp-b", EV(soc=0.5))
        await r.until(lambda: sim.connections >= 2, 8)
        await asyncio.sleep(1.5)
        await sim.go_offline(1.0)
        await r.until(lambda: "CPB" not in r.cs.connected())
        await asyncio.sleep(1.1)
        r.fleet.unplug("cp-b")
        await r.until(lambda: any(e.kind == "ended" for e in r.of(TransactionEvent)), 8)
        await sim.wait_idle()
        kinds = [e.kind for e in r.of(TransactionEvent)]
        assert kinds.count("started") == 1 and kinds.count("ended") == 1
        offline = [e for e in r.of(TransactionEvent) if e.offline]
        assert offline, "events queued while offline are flagged offline"
        ended = next(e for e in r.of(TransactionEvent) if e.kind == "ended")
        assert ended.session_energy_wh == pytest.approx(
            sim.connectors[1].register_wh - 1_000_000.0, abs=0.01
        )


async def test_notifications_security_and_data_transfer() -> None:
    async with rig() as r:
        a, b = r.fleet.stations["CPA"], r.fleet.stations["CPB"]
        now = iso(r.cs.clock.now())
        assert await a.call("DataTransfer", {"vendorId": "com.other"}) == {
            "status": "UnknownVendorId"
        }
        assert await a.call("DataTransfer", {"vendorId": "com.evcore", "data": "x"}) == {
            "status": "Accepted"
        }
        assert await b.call("DataTransfer", {"vendorId": "com.other"}) == {
            "status": "UnknownVendorId"
        }
        assert (
            await a.call(
                "SecurityEventNotification", {"type": "TamperDetectionActivated", "timestamp": now}
            )
            == {}
        )
        assert (
            await b.call(
                "SecurityEventNotification", {"type": "InvalidFirmwareSignature", "timestamp": now}
            )
            == {}
        )
        assert await a.call("FirmwareStatusNotification", {"status": "Installed"}) == {}
        assert await a.call("DiagnosticsStatusNotification", {"status": "Uploaded"}) == {}
        assert await b.call("FirmwareStatusNotification", {"status": "Installed"}) == {}
        assert await b.call("LogStatusNotification", {"status": "Uploaded"}) == {}
        assert await a.call("Authorize", {"idTag": "ABC"}) == {"idTagInfo": {"status": "Accepted"}}
        assert await b.call("Authorize", {"idToken": {"idToken": "ABC", "type": "ISO14443"}}) == {
            "idTokenInfo": {"status": "Accepted"}
        }
        needs = await b.call(
            "NotifyEVChargingNeeds",
            {
                "evseId": 1,
                "chargingNeeds": {
                    "requestedEnergyTransfer": "AC_three_phase",
                    "acChargingParameters": {
                        "energyAmount": 20000,
                        "evMinCurrent": 6,
                        "evMaxCurrent": 32,
                        "evMaxVoltage": 400,
                    },
                },
            },
        )
        assert needs == {"status": "Accepted"}
        sec = {(e.ocpp_id, e.kind) for e in r.of(SecurityEvent)}
        assert sec == {("CPA", "TamperDetectionActivated"), ("CPB", "InvalidFirmwareSignature")}
        notes = {(e.ocpp_id, e.action) for e in r.of(NotificationEvent)}
        assert {
            ("CPA", "FirmwareStatusNotification"),
            ("CPA", "DiagnosticsStatusNotification"),
            ("CPB", "LogStatusNotification"),
            ("CPB", "NotifyEVChargingNeeds"),
            ("CPA", "DataTransfer"),
        } <= notes
        assert ("CPB", "DataTransfer") not in notes


async def test_gc_tuning_is_opt_in_and_undone_at_stop() -> None:
    import gc

    before = gc.get_threshold()
    try:
        async with rig(connect=False) as r:
            assert not r.cs.config.gc_tuning and gc.get_freeze_count() == 0
        async with rig(connect=False, gc_tuning=True) as r:
            assert r.cs.config.gc_tuning
            assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= 2000
        assert gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*before)
