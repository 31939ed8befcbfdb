"""Meter values as stations in the field send them (review of the OCPP room, session 15), over a
real WebSocket: a phase-less current beside per-phase ones, and a sample the central system
cannot read inside a message that starts or ends a transaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from evcore.ocpp import MeterSample, TransactionEvent
from evcore.ocpp.v16 import iso
from ocpp_testsite import meter, open_sqlite, raw_csms, start_16, stop_16, tx_event

pytestmark = pytest.mark.timeout(30)


def current(value: str, phase: str | None = None) -> dict[str, Any]:
    sv = {"value": value, "measurand": "Current.Import", "unit": "A"}
    if phase is not None:
        sv["phase"] = phase
    return sv


@pytest.mark.parametrize("phaseless_first", [False, True])
async def test_per_phase_currents_win_over_a_phaseless_one(phaseless_first: bool) -> None:
    """A 1.6 three-phase station reporting its phase currents and a phase-less one (their mean
    here): the phase currents are the reading, in whatever order they come. Before, a phase-less
    current after them replaced them on all three terminals: 10.7 A on every phase instead of
    16, 16 and 0 (the envelope counted 5.3 A too little on two phases and 10.7 A on an idle
    one)."""
    async with raw_csms() as r:
        st = await r.station("CPA", "1.6")  # terminals L1, L2, L3 on site L2, L3, L1
        phased = [current("16", "L1"), current("16", "L2"), current("0", "L3")]
        sampled = [current("10.7"), *phased] if phaseless_first else [*phased, current("10.7")]
        mv = [{"timestamp": iso(r.clock.now() - 5), "sampledValue": sampled}]
        assert (await st.call("MeterValues", {"connectorId": 1, "meterValue": mv}))[0] == 3
        [sample] = r.of(MeterSample)
        assert sample.terminal_a == (16.0, 16.0, 0.0)
        assert sample.site_phase_a == (0.0, 16.0, 16.0)


async def test_a_1_6_stop_whose_transaction_data_holds_an_unreadable_sample_ends_it() -> None:
    """A 1.6 StopTransaction's ``transactionData`` with a sample the central system cannot read
    (a SoC of "" from a station that did not know it, one stamped an hour ahead): those are
    skipped and the stop is taken. Before, the whole StopTransaction got a CALLERROR
    (PropertyConstraintViolation), every retry too: the station gave up after its
    TransactionMessageAttempts and the session stayed open for good."""
    async with raw_csms() as r:
        st = await r.station("CPA", "1.6")
        t = r.clock.now() - 600
        tx = (await st.call("StartTransaction", start_16(t, 1000)))[2]["transactionId"]
        register = {"value": "2000", "measurand": "Energy.Active.Import.Register", "unit": "Wh"}
        stop = stop_16(tx, t + 120, 3000)
        stop["transactionData"] = [
            {"timestamp": iso(t + 60), "sampledValue": [register]},
            {"timestamp": iso(t + 90), "sampledValue": [{"value": "", "measurand": "SoC"}]},
            {"timestamp": iso(r.clock.now() + 3600), "sampledValue": [register]},
        ]
        answer = await st.call("StopTransaction", stop)
        assert answer[0] == 3, answer
        ended = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert [(e.transaction_id, e.session_energy_wh) for e in ended] == [(str(tx), 2000.0)]
        registers = [s.energy_register_wh for s in r.of(MeterSample)]
        assert [wh for wh in registers if wh is not None] == [2000.0]
        assert r.cs.station_state("CPA").active_transactions == {}


async def test_a_2_0_1_end_carrying_an_unreadable_sample_ends_the_transaction() -> None:
    """A 2.0.1 TransactionEvent(Ended) whose meterValue holds a value the central system cannot
    read (a SoC with a multiplier of 400: 10^400 overflows) and a reading stamped an hour ahead:
    the SoC and that reading are skipped, the register beside the SoC counts, the transaction
    ends. Before, the multiplier raised OverflowError out of the handler (CALLERROR
    InternalError, 'could not be handled') and the future stamp refused the event: the
    station's retries got the same and the transaction stayed open."""
    async with raw_csms() as r:
        st = await r.station("CPB")
        t = r.clock.now() - 600
        evse = {"id": 1, "connectorId": 1}
        started = tx_event("T1", 0, "Started", "CablePluggedIn", t, evse=evse,
                           meterValue=meter(t, 1000, 16))  # fmt: skip
        assert (await st.call("TransactionEvent", started))[0] == 3
        soc = {"value": 50, "measurand": "SoC", "unitOfMeasure": {"multiplier": 400}}
        values = meter(t + 60, 2000, 0)
        values[0]["sampledValue"].append(soc)
        values += meter(r.clock.now() + 3600, 2500, 0)
        stopped = {"transactionId": "T1", "stoppedReason": "EVDisconnected"}
        ended = tx_event("T1", 1, "Ended", "EVDeparted", t + 60, transactionInfo=stopped,
                         meterValue=values)  # fmt: skip
        answer = await st.call("TransactionEvent", ended)
        assert answer[0] == 3, answer
        ends = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert [(e.transaction_id, e.session_energy_wh) for e in ends] == [("T1", 1000.0)]
        assert r.cs.station_state("CPB").active_transactions == {}


def register(value: str, unit: str = "Wh") -> dict[str, Any]:
    return {"value": value, "measurand": "Energy.Active.Import.Register", "unit": unit}


async def test_an_implausible_reading_is_never_published() -> None:
    """Values that parse as finite numbers but no meter reads: a negative energy register, one
    of 10^33 Wh, a current of 10^9 A, a SoC of 250 %. Each is skipped, logged naming the field:
    a MeterValues carrying one alone is answered and publishes nothing; in a message that
    starts or ends a transaction its start or end is taken, a 1.6 meterStart / meterStop among
    them too. Before, a register of "-1e30" kWh went out as -1.0e33 Wh and a meterStart of -5 Wh
    as the session's start."""
    async with raw_csms() as r:
        st = await r.station("CPA", "1.6")
        t = r.clock.now() - 600
        bad = [register("-1e30", "kWh"), register("-5"), register("2e15"),
               current("1e9", "L1"), {"value": "250", "measurand": "SoC"},
               {"value": "-3e9", "measurand": "Power.Active.Import", "unit": "W"}]  # fmt: skip
        for sv in bad:
            mv = [{"timestamp": iso(t), "sampledValue": [sv]}]
            answer = await st.call("MeterValues", {"connectorId": 1, "meterValue": mv})
            assert answer[0] == 3, (sv, answer)
        assert r.of(MeterSample) == []
        tx = (await st.call("StartTransaction", start_16(t, -5)))[2]["transactionId"]
        stop = stop_16(tx, t + 120, -1)
        stop["transactionData"] = [
            {"timestamp": iso(t + 30), "sampledValue": [register("1000")]},
            {"timestamp": iso(t + 60), "sampledValue": bad},
            {"timestamp": iso(t + 90), "sampledValue": [register("1500")]},
        ]
        assert (await st.call("StopTransaction", stop))[0] == 3
        st2 = await r.station("CPB")
        values = meter(t, 1000, 16)
        values[0]["sampledValue"].insert(0, {"value": -1e30, "measurand": "SoC"})
        values[0]["sampledValue"].append(
            {"value": -1e30, "measurand": "Energy.Active.Import.Register"}
        )
        started = tx_event("T1", 0, "Started", "CablePluggedIn", t,
                           evse={"id": 1, "connectorId": 1}, meterValue=values)  # fmt: skip
        assert (await st2.call("TransactionEvent", started))[0] == 3
        txs = [(e.transaction_id, e.kind, e.meter_start_wh, e.session_energy_wh)
               for e in r.of(TransactionEvent)]  # fmt: skip
        assert txs == [
            (str(tx), "started", None, None),
            (str(tx), "ended", 1000.0, 500.0),
            ("T1", "started", 1000.0, 0.0),
        ]
        samples = r.of(MeterSample)
        # The reading whose every value was skipped is not published (nothing is left of it).
        assert [(s.energy_register_wh, s.soc_percent, s.power_w) for s in samples] == [
            (1000.0, None, None),
            (1500.0, None, None),
            (1000.0, None, None),
        ]


async def test_readings_of_one_instant_in_separate_entries_are_one_sample(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A station sending one meterValue entry per measurand, all stamped alike (the register in
    one, the phase currents in the next): one sample with both. Before, each became a sample of
    its own at the same time; the store keeps one sample per charger and time (and the bus one
    per event id, charger and time), so the currents were lost there: the store held the
    register alone."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        st = await r.station("CPA", "1.6")  # terminals L1, L2, L3 on site L2, L3, L1
        at = iso(r.clock.now() - 5)
        mv = [
            {"timestamp": at, "sampledValue": [register("1234")]},
            {"timestamp": at, "sampledValue": [current("16", p) for p in ("L1", "L2")]},
            {"timestamp": at, "sampledValue": [current("8", "L3")]},
        ]
        answer = await st.call("MeterValues", {"connectorId": 1, "meterValue": mv})
        assert answer[0] == 3, answer
        [sample] = r.of(MeterSample)
        assert (sample.energy_register_wh, sample.terminal_a) == (1234.0, (16.0, 16.0, 8.0))
        rows = await store.meter_samples("cp-a")
        assert [(s.energy_register_wh, list(s.current_a)) for s in rows] == [
            (1234.0, [8.0, 16.0, 16.0])
        ]
        # A value the central system cannot read (skipped) is still named by its place in the
        # message.
        mv[2]["sampledValue"].append(current("x", "L1"))
        answer = await st.call("MeterValues", {"connectorId": 1, "meterValue": mv})
        assert answer[0] == 3, answer
        assert "meterValue[2].sampledValue[1].value: not a number: 'x'" in caplog.text


async def test_a_meter_value_the_schema_refuses_does_not_refuse_its_transaction_message() -> None:
    """A sampled value that breaks the message's schema (a unit "kwh", a measurand the version
    does not name, a property it does not have) inside a 1.6 StopTransaction's transactionData
    or a 2.0.1 TransactionEvent's meterValue: that value is dropped (logged naming it) and the
    message taken. Before, the whole message got the schema's CALLERROR on every retry; the
    station gave up and the session never ended."""
    async with raw_csms() as r:
        st = await r.station("CPA", "1.6")
        t = r.clock.now() - 600
        tx = (await st.call("StartTransaction", start_16(t, 1000)))[2]["transactionId"]
        stop = stop_16(tx, t + 120, 2500)
        stop["transactionData"] = [
            {"timestamp": iso(t + 30), "sampledValue": [register("1500")]},
            {"timestamp": iso(t + 60), "sampledValue": [register("1.8", "kwh")]},
            {"timestamp": iso(t + 90),
             "sampledValue": [register("2000"), {"value": "7", "measurand": "Vendor.Thing"},
                              {"value": "3", "measurand": "SoC", "vendor": 1}]},
        ]  # fmt: skip
        answer = await st.call("StopTransaction", stop)
        assert answer[0] == 3, answer
        st2 = await r.station("CPB")
        evse = {"id": 1, "connectorId": 1}
        started = tx_event("T1", 0, "Started", "CablePluggedIn", t, evse=evse,
                           meterValue=meter(t, 1000, 16))  # fmt: skip
        assert (await st2.call("TransactionEvent", started))[0] == 3
        values = meter(t + 60, 2000, 0)
        values[0]["sampledValue"].append({"value": 50, "measurand": "Soc"})
        values.append({"timestamp": "soon", "sampledValue": [{"value": 2100}]})
        stopped = {"transactionId": "T1", "stoppedReason": "EVDisconnected"}
        ended = tx_event("T1", 1, "Ended", "EVDeparted", t + 60, transactionInfo=stopped,
                         meterValue=values)  # fmt: skip
        answer = await st2.call("TransactionEvent", ended)
        assert answer[0] == 3, answer
        ends = [(e.transaction_id, e.session_energy_wh) for e in r.of(TransactionEvent)
                if e.kind == "ended"]  # fmt: skip
        assert ends == [(str(tx), 1500.0), ("T1", 1000.0)]
        registers = [(s.charger_id, s.energy_register_wh) for s in r.of(MeterSample)]
        assert registers == [("cp-a", 1500.0), ("cp-a", 2000.0), ("cp-b", 1000.0),
                             ("cp-b", 2000.0)]  # fmt: skip


async def test_a_reading_naming_another_connectors_transaction_leaves_that_one_alone() -> None:
    """A 1.6 station of two connectors sends connector 2's reading with connector 1's
    transactionId. The reading is connector 2's (its currents count there) and says nothing of
    connector 1's session. Before, its register went into connector 1's transaction: that
    reading and connector 1's next one (a current, no register) published 4,200 Wh as that
    session's energy (5,200 Wh of connector 2's meter less connector 1's meterStart of 1,000)
    for a session that had drawn nothing."""
    async with raw_csms() as r:
        st = await r.station("CPM", "1.6")
        t = r.clock.now() - 600
        a = (await st.call("StartTransaction", start_16(t, 1000)))[2]["transactionId"]
        start_b = {**start_16(t + 1, 5000, "TAG2"), "connectorId": 2}
        assert (await st.call("StartTransaction", start_b))[0] == 3
        wrong = {
            "connectorId": 2,
            "transactionId": a,
            "meterValue": [{"timestamp": iso(t + 60), "sampledValue": [register("5200")]}],
        }
        mine = {
            "connectorId": 1,
            "meterValue": [{"timestamp": iso(t + 61), "sampledValue": [current("16")]}],
        }
        for payload in (wrong, mine):
            assert (await st.call("MeterValues", payload))[0] == 3
        got = [(s.charger_id, s.transaction_id, s.session_energy_wh) for s in r.of(MeterSample)]
        assert got == [("cp-m2", str(a), None), ("cp-m1", str(a), 0.0)]


async def _started_1_6(r: Any) -> tuple[Any, Any, float]:
    """Station CPA (1.6; terminals L1, L2, L3 on site L2, L3, L1) with a transaction started
    10 min ago at a register of 1000 Wh: the station, its transactionId and its start."""
    a = await r.station("CPA", "1.6")
    t = r.clock.now() - 600
    tx = (await a.call("StartTransaction", start_16(t, 1000)))[2]["transactionId"]
    return a, tx, t


async def _readings_with_odd_values(
    r: Any,
    a: Any,
    tx: Any,
    t: float,
    odd_16: list[dict[str, Any]],
    soc_201: dict[str, Any],
    *,
    soc_first: bool,
) -> None:
    """Both answered with a CALLRESULT, at ``t`` + 60: CPA's reading in its session (16, 15 and
    14 A, 11,000 W, then ``odd_16``), then CPB's (2.0.1: 1500 Wh and 16 A on L1, with
    ``soc_201`` first or last)."""
    sampled = [current("16", "L1"), current("15", "L2"), current("14", "L3"),
               {"value": "11000", "measurand": "Power.Active.Import", "unit": "W"},
               *odd_16]  # fmt: skip
    mv = [{"timestamp": iso(t + 60), "sampledValue": sampled}]
    payload = {"connectorId": 1, "transactionId": tx, "meterValue": mv}
    answer = await a.call("MeterValues", payload)
    assert answer[0] == 3, answer
    b = await r.station("CPB")
    values = meter(t + 60, 1500, 16)
    b_sampled = values[0]["sampledValue"]
    b_sampled.insert(0 if soc_first else len(b_sampled), soc_201)
    answer = await b.call("MeterValues", {"evseId": 1, "meterValue": values})
    assert answer[0] == 3, answer


async def _stop_counts_the_registers_read(r: Any, a: Any, tx: Any, t: float) -> None:
    """CPA's StopTransaction at ``t`` + 120, meterStop 1200 Wh: taken, and its session's energy
    is 200 Wh (no skipped register counted in it)."""
    stop = stop_16(tx, t + 120, 1200)
    assert (await a.call("StopTransaction", stop))[0] == 3
    [ended] = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
    assert ended.session_energy_wh == 200.0


async def test_one_implausible_value_does_not_cost_the_rest_of_a_meter_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A MeterValues (1.6 and 2.0.1) with one implausible sampled value beside good ones (a SoC of
    -1, which some stations send for "unknown"; a register of 2e15 Wh): that value is skipped
    (logged naming it, counted per station and measurand in ``CentralSystem.skipped_values``),
    the currents and power of the same reading are published and stored, and the station gets
    its CallResult. A register gone implausible in a session never becomes its energy. Before,
    the whole message got CALLERROR PropertyConstraintViolation ("SoC of -1 is outside
    [0, 100]"): the station's currents were lost with it."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        a, tx, t = await _started_1_6(r)
        odd_16 = [{"value": "-1", "measurand": "SoC", "unit": "Percent"}, register("2e15")]
        soc_201 = {"value": -1, "measurand": "SoC"}
        await _readings_with_odd_values(r, a, tx, t, odd_16, soc_201, soc_first=True)
        got = [(s.charger_id, s.terminal_a, s.power_w, s.soc_percent, s.energy_register_wh,
                s.session_energy_wh) for s in r.of(MeterSample)]  # fmt: skip
        assert got == [
            ("cp-a", (16.0, 15.0, 14.0), 11000.0, None, None, 0.0),
            ("cp-b", (16.0, None, None), None, None, 1500.0, None),
        ]
        rows = await store.meter_samples("cp-a")
        assert [list(s.current_a) for s in rows] == [[14.0, 16.0, 15.0]]
        assert [s.HasField("soc_percent") for s in rows] == [False]
        assert "meterValue[0].sampledValue[4].value: SoC of -1 is outside [0, 100]" in caplog.text
        assert r.cs.skipped_values == {
            ("CPA", "SoC"): 1,
            ("CPA", "Energy.Active.Import.Register"): 1,
            ("CPB", "SoC"): 1,
        }
        await _stop_counts_the_registers_read(r, a, tx, t)


async def test_an_unreadable_value_does_not_cost_the_rest_of_a_meter_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain MeterValues whose sampled values include ones that are no number: a 1.6 SoC of ""
    and an offered current of "n/a" (stations that do not know them), an energy register of
    "nan" mid-session; a 2.0.1 SoC whose multiplier of 400 overflows. Each is skipped (logged
    naming its field, counted in ``CentralSystem.skipped_values``) as an implausible one is
    (e368fa0); the currents and power of the same reading are published and stored and the
    station gets its CallResult. The unreadable register is no reading: the session energy
    stays on the registers read (100 Wh, then 200 Wh at the stop). Before, the whole message
    got CALLERROR PropertyConstraintViolation ("not a number: ''") and the currents were lost.
    (A value the 2.0.1 schema refuses, a string, is skipped too:
    ``test_a_value_the_schema_refuses_is_skipped_and_counted_in_every_meter_message``.)"""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        a, tx, t = await _started_1_6(r)
        mv = [{"timestamp": iso(t + 30), "sampledValue": [register("1100")]}]
        payload = {"connectorId": 1, "transactionId": tx, "meterValue": mv}
        assert (await a.call("MeterValues", payload))[0] == 3
        odd_16 = [{"value": "", "measurand": "SoC", "unit": "Percent"},
                  {"value": "n/a", "measurand": "Current.Offered", "unit": "A"},
                  register("nan")]  # fmt: skip
        soc_201 = {"value": 50, "measurand": "SoC", "unitOfMeasure": {"multiplier": 400}}
        await _readings_with_odd_values(r, a, tx, t, odd_16, soc_201, soc_first=False)
        got = [(s.charger_id, s.terminal_a, s.power_w, s.offered_a, s.soc_percent,
                s.energy_register_wh, s.session_energy_wh) for s in r.of(MeterSample)]  # fmt: skip
        assert got == [
            ("cp-a", (None, None, None), None, None, None, 1100.0, 100.0),
            ("cp-a", (16.0, 15.0, 14.0), 11000.0, None, None, None, 100.0),
            ("cp-b", (16.0, None, None), None, None, None, 1500.0, None),
        ]
        rows = await store.meter_samples("cp-a")
        assert list(rows[1].current_a) == [14.0, 16.0, 15.0]
        assert [s.HasField("energy_register_wh") for s in rows] == [True, False]
        for field in ("sampledValue[4].value: not a number: ''",
                      "sampledValue[5].value: not a number: 'n/a'",
                      "sampledValue[6].value: not finite: 'nan'",
                      "sampledValue[2].unitOfMeasure.multiplier: out of range: 400"):  # fmt: skip
            assert f"sampled value skipped: meterValue[0].{field}" in caplog.text, field
        assert r.cs.skipped_values == {
            ("CPA", "SoC"): 1,
            ("CPA", "Current.Offered"): 1,
            ("CPA", "Energy.Active.Import.Register"): 1,
            ("CPB", "SoC"): 1,
        }
        await _stop_counts_the_registers_read(r, a, tx, t)


async def test_a_value_the_schema_refuses_is_skipped_and_counted_in_every_meter_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sampled value of the wrong JSON type, as some stations send it: a 2.0.1 value as a
    string ("n/a", "16"), a 1.6 value as a number (the 1.6 schema wants a string). In a plain
    MeterValues that value is skipped, logged naming its field and counted
    (``skipped_values``, evcore_ocpp_values_skipped_total) like one that is no number, and the
    rest of the reading is taken; so in a TransactionEvent (dropped there already, but not
    counted); a MeterValues with nothing left is answered and publishes nothing. Before, the
    plain MeterValues got CALLERROR TypeConstraintViolation and lost its currents with it,
    while the same value inside a TransactionEvent was dropped uncounted."""
    async with raw_csms() as r:
        b = await r.station("CPB")
        t = r.clock.now() - 600
        values = meter(t, 1500, 16)
        values[0]["sampledValue"] += [{"value": "n/a", "measurand": "SoC"},
                                      {"value": "15", "measurand": "Current.Import",
                                       "phase": "L2"}]  # fmt: skip
        answer = await b.call("MeterValues", {"evseId": 1, "meterValue": values})
        assert answer[0] == 3, answer
        nothing = [{"timestamp": iso(t + 1), "sampledValue": [{"value": "7"}]}]
        answer = await b.call("MeterValues", {"evseId": 1, "meterValue": nothing})
        assert answer[0] == 3, answer
        sampled = [{"value": 1600}, {"value": "x", "measurand": "SoC"}]
        mv = [{"timestamp": iso(t + 2), "sampledValue": sampled}]
        evse = {"id": 1, "connectorId": 1}
        started = tx_event("T1", 0, "Started", "CablePluggedIn", t + 2, evse=evse, meterValue=mv)
        assert (await b.call("TransactionEvent", started))[0] == 3
        a = await r.station("CPA", "1.6")
        power = {"value": 7.5, "measurand": "Power.Active.Import", "unit": "W"}
        mv = [{"timestamp": iso(t + 3), "sampledValue": [current("9", "L1"), power]}]
        assert (await a.call("MeterValues", {"connectorId": 1, "meterValue": mv}))[0] == 3
        # A fault outside the meter values still refuses the message, naming that field.
        bad = {"evseId": "1", "meterValue": meter(t + 4, 1700, 16)}
        answer = await b.call("MeterValues", bad)
        assert answer[0] == 4 and answer[2] == "TypeConstraintViolation", answer
        assert "evseId" in answer[3], answer
        bad["meterValue"][0]["sampledValue"][0]["value"] = "1700"
        answer = await b.call("MeterValues", bad)
        assert answer[0] == 4 and "evseId" in answer[3], answer
        # So does a reading's own fault in a plain MeterValues: nothing of it is a reading.
        soon = [{"timestamp": "soon", "sampledValue": [{"value": 1800}]}]
        answer = await b.call("MeterValues", {"evseId": 1, "meterValue": soon})
        assert answer[0] == 4 and "meterValue/0/timestamp" in answer[3], answer
        got = [(s.charger_id, s.terminal_a, s.power_w, s.soc_percent, s.energy_register_wh)
               for s in r.of(MeterSample)]  # fmt: skip
        assert got == [
            ("cp-b", (16.0, None, None), None, None, 1500.0),
            ("cp-b", (None, None, None), None, None, 1600.0),
            ("cp-a", (9.0, None, None), None, None, None),
        ]
        assert r.cs.skipped_values == {
            ("CPB", "SoC"): 2,
            ("CPB", "Current.Import"): 1,
            ("CPB", "Energy.Active.Import.Register"): 1,
            ("CPA", "Power.Active.Import"): 1,
        }
        assert "meterValue/0/sampledValue/3/value" in caplog.text
        assert "meterValue/0/sampledValue/1/value" in caplog.text
