"""Two meter samples of one charger stamped alike, from two OCPP messages (the register in one
MeterValues, the phase currents in the next, same second), are one reading of that instant: the
store keeps both halves as one sample. A station's resend of either is still stored once. Both
stores (SQLite and PostgreSQL) through the ``store`` fixture."""

from __future__ import annotations

import logging
import math

import pytest
from evcore.store import SqlStore
from evcore.v1.meter_pb2 import MeterSample
from google.protobuf.timestamp_pb2 import Timestamp

T0 = 1_767_225_600.0
NAN = math.nan


def _at(msg_ts: Timestamp, seconds: float) -> None:
    msg_ts.FromNanoseconds(round(seconds * 1e9))


def register_sample(wh: float, *, received_s: float = T0 + 0.1, tx: str = "T1") -> MeterSample:
    """What the central system publishes for a MeterValues holding the register only."""
    s = MeterSample(
        charger_id="C1", transaction_id=tx, current_a=[NAN, NAN, NAN], energy_register_wh=wh
    )
    _at(s.sampled_at, T0)
    _at(s.received_at, received_s)
    return s


def currents_sample(l1_a: float, l2_a: float, *, received_s: float = T0 + 0.4) -> MeterSample:
    """... and for the next MeterValues, same timestamp, holding the phase currents only."""
    s = MeterSample(charger_id="C1", transaction_id="T1", current_a=[l1_a, l2_a, NAN])
    _at(s.sampled_at, T0)
    _at(s.received_at, received_s)
    return s


def _measured(s: MeterSample) -> tuple[float | None, list[float | None]]:
    wh = s.energy_register_wh if s.HasField("energy_register_wh") else None
    return wh, [None if math.isnan(a) else a for a in s.current_a]


async def test_register_and_currents_of_one_instant_in_two_messages_are_both_stored(
    store: SqlStore,
) -> None:
    assert await store.append_meter_samples([register_sample(1234.0)]) == 1
    # The next message's currents: new measurements of the same instant, stored.
    assert await store.append_meter_samples([currents_sample(16.0, 16.0)]) == 1
    got = await store.meter_samples("C1")
    assert [_measured(s) for s in got] == [(1234.0, [16.0, 16.0, None])], got
    # The first message received first: its receive time and transaction stay.
    assert got[0].received_at.ToNanoseconds() == round((T0 + 0.1) * 1e9)
    assert got[0].transaction_id == "T1"
    # The station resends both (our answers lost), the register after its session ended: each
    # adds nothing, nothing is stored, the sample is unchanged.
    assert (
        await store.append_meter_samples([register_sample(1234.0, received_s=T0 + 30, tx="")]) == 0
    )
    assert await store.append_meter_samples([currents_sample(16.0, 16.0, received_s=T0 + 31)]) == 0
    again = await store.meter_samples("C1")
    assert again == got


async def test_both_halves_in_one_batch_and_a_resend_beside_new_samples(store: SqlStore) -> None:
    later = register_sample(1300.0)
    _at(later.sampled_at, T0 + 10)
    # The meter writer batches frames: both halves (and a copy of the first) in one append.
    n = await store.append_meter_samples(
        [register_sample(1234.0), currents_sample(16.0, 15.0), register_sample(1234.0)]
    )
    assert n == 1
    got = await store.meter_samples("C1")
    assert [_measured(s) for s in got] == [(1234.0, [16.0, 15.0, None])], got
    # A resend of the currents beside a new sample: only the new one is stored.
    assert await store.append_meter_samples([currents_sample(16.0, 15.0), later]) == 1
    got = await store.meter_samples("C1")
    assert [_measured(s) for s in got] == [
        (1234.0, [16.0, 15.0, None]),
        (1300.0, [None, None, None]),
    ]


async def test_a_second_value_of_the_same_measurement_keeps_the_first_and_is_logged(
    store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    await store.append_meter_samples([currents_sample(16.0, 16.0)])
    # The same instant measured again with another L1 (a clock-aligned and a periodic reading
    # stamped the same second): the first value stays, the new L2 adds nothing, the register
    # it also holds is stored, and the disagreement is named.
    other = currents_sample(17.0, 16.0)
    other.energy_register_wh = 999.0
    with caplog.at_level(logging.WARNING, logger="evcore.store"):
        assert await store.append_meter_samples([other]) == 1
    got = await store.meter_samples("C1")
    assert [_measured(s) for s in got] == [(999.0, [16.0, 16.0, None])], got
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("C1" in m and "current_a" in m and "17.0" in m for m in warned), warned
