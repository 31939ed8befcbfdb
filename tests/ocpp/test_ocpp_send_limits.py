"""The batched send path: ``CentralSystem.send_limits`` and the frames it writes itself.

The frames are serialised by ``evcore.ocpp.frames`` without a schema check at run time, so their
validity is proven here: for every combination of version, purpose, unit, expiry form, resolution
and transaction id, the text equals (after ``json.loads``) what the dict builders produce and passes
the OCPP JSON schema of its version. Through real sockets: every limit of a batch is on its
station's socket when the call returns, one CALL in flight per station still holds (a second limit
for a busy station waits for the first answer), decreases go first, and answers resolve each limit.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from evcore.clock import WallClock
from evcore.ocpp import CentralSystem, ProfileResult, frames, v16, v201, validation
from evcore.ocpp.server import ChargerInfo, LimitOrder, LimitRequest, chargers_of
from evcore.sim.ev import EV
from ocpp_testsite import DC_CHARGER, make_site, rig

pytestmark = pytest.mark.timeout(60)

NOW = 1_767_225_600.123


def _chargers() -> list[ChargerInfo]:
    site = make_site(extra_chargers=[DC_CHARGER])
    return chargers_of(site)


def _requests(charger: ChargerInfo) -> list[LimitRequest]:
    out = []
    dc = charger.kind == "dc"
    for purpose, value, expiry in itertools.product(
        ("tx", "tx_default", "station_max"),
        (0.0, 6.0, 12.7, 32.0) if not dc else (0.0, 5000.0, 49_999.0),
        ("none", "valid_to", "final", "final_soon"),
    ):
        valid_to = None if expiry == "none" else NOW + (0.4 if expiry == "final_soon" else 95.7)
        final = 6.0 if expiry.startswith("final") and not dc else None
        if dc and expiry.startswith("final"):
            final = 2000.0
        wire = float(int(value)) if not dc else value
        for w in {wire, round(value, 1)}:
            out.append(
                LimitRequest(
                    charger.charger_id,
                    purpose,  # type: ignore[arg-type]
                    None if dc else value,
                    value if dc else None,
                    valid_to,
                    final,
                    w,
                    final,
                )
            )
    return out


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
def test_serialised_frames_equal_the_builders_and_pass_the_schemas(version: str) -> None:
    build = v16.set_charging_profile if version == "1.6" else v201.set_charging_profile
    checked = 0
    for charger in _chargers():
        for req in _requests(charger):
            tx = "4242" if req.purpose == "tx" else None
            text = frames.set_charging_profile_json(
                version,
                charger,
                req,
                profile_id=107,
                stack_level=2,
                transaction_id=tx,
                start=NOW,
                start_iso=v16.iso(NOW),
            )
            action, expected = build(
                charger, req, profile_id=107, stack_level=2, transaction_id=tx, start=NOW
            )
            payload = json.loads(text)
            assert payload == expected, (version, charger.charger_id, req)
            validation.validate(version, action, payload, response=False)
            checked += 1
    assert checked > 300


def test_a_2_0_1_transaction_id_is_escaped_as_json() -> None:
    charger = _chargers()[1]
    req = LimitRequest(charger.charger_id, "tx", 10.0, None, None, None, 10.0, None)
    text = frames.set_charging_profile_json(
        "2.0.1",
        charger,
        req,
        profile_id=1,
        stack_level=1,
        transaction_id='tx"1\\',
        start=NOW,
        start_iso=v16.iso(NOW),
    )
    assert json.loads(text)["chargingProfile"]["transactionId"] == 'tx"1\\'


def test_a_non_finite_limit_never_reaches_the_wire() -> None:
    charger = _chargers()[0]
    req = LimitRequest(charger.charger_id, "tx_default", 1.0, None, None, None, float("nan"), None)
    with pytest.raises(ValueError, match="finite"):
        frames.set_charging_profile_json(
            "1.6",
            charger,
            req,
            profile_id=1,
            stack_level=1,
            transaction_id=None,
            start=NOW,
            start_iso=v16.iso(NOW),
        )


def test_profile_ids_follow_the_evse_and_purpose_not_the_order_of_first_use() -> None:
    """A station keeps the profiles an earlier run set and replaces one whose id it holds,
    whatever its purpose: a restarted central system must give each (EVSE, purpose) the id the
    last run gave it, whatever order it sends in."""
    site = make_site()
    info = {c.charger_id: c for c in chargers_of(site)}
    m1, m2 = info["cp-m1"], info["cp-m2"]
    keys = [(m1, "tx"), (m1, "tx_default"), (m2, "tx"), (m2, "tx_default"), (m1, "station_max")]
    first = CentralSystem(site, clock=WallClock())
    restarted = CentralSystem(site, clock=WallClock())
    ids = {(c.charger_id, p): first._profile_id("CPM", c, p) for c, p in keys}
    again = {(c.charger_id, p): restarted._profile_id("CPM", c, p) for c, p in reversed(keys)}
    assert again == ids
    assert len(set(ids.values())) == len(keys)
    # The station-wide limit is one profile, whichever EVSE's charger it is sent for.
    assert restarted._profile_id("CPM", m2, "station_max") == ids[("cp-m1", "station_max")]


def _profiles(sim: Any) -> list[dict[str, Any]]:
    return [p for a, p in sim.received if a == "SetChargingProfile"]


def _limit(version: str, payload: dict[str, Any]) -> float:
    body = payload["csChargingProfiles"] if version == "1.6" else payload["chargingProfile"]
    sched = body["chargingSchedule"] if version == "1.6" else body["chargingSchedule"][0]
    return float(sched["chargingSchedulePeriod"][0]["limit"])


async def test_a_batch_is_on_the_sockets_when_send_limits_returns_and_every_limit_is_answered() -> (
    None
):
    async with rig() as r:
        for cid in ("cp-a", "cp-b"):
            r.fleet.plug_in(cid, EV(soc=0.3))
        await r.until(
            lambda: all(r.cs.station_state(c).active_transactions.get(1) for c in ("cp-a", "cp-b"))
        )
        before = r.cs.clock.monotonic()
        orders = [
            LimitOrder("cp-a", limit_a=10.6, valid_to=r.cs.clock.now() + 60, final_limit_a=6.0),
            LimitOrder("cp-b", limit_a=9.0, valid_to=r.cs.clock.now() + 60, final_limit_a=6.0),
            LimitOrder("cp-c", limit_a=7.0, purpose="tx_default"),
        ]
        handles = r.cs.send_limits(orders)
        after = r.cs.clock.monotonic()
        # Written synchronously: stamped inside the call, before anything was awaited.
        for h in handles:
            assert h.sent_mono is not None and before <= h.sent_mono <= after
        results = await asyncio.wait_for(asyncio.gather(*(h.result for h in handles)), 5)
        assert [x.status for x in results] == ["Accepted"] * 3
        assert [x.limit_a for x in results] == [10.0, 9.0, 7.0]
        assert all(x.sent_mono == h.sent_mono for x, h in zip(results, handles, strict=True))
        # The stations got exactly these limits, and the results were emitted as events.
        sim_a = r.fleet.stations["CPA"]
        sim_b = r.fleet.stations["CPB"]
        assert _limit("1.6", _profiles(sim_a)[-1]) == 10.0
        assert _limit("2.0.1", _profiles(sim_b)[-1]) == 9.0
        emitted = [e for e in r.events if isinstance(e, ProfileResult)]
        assert {(e.charger_id, e.status) for e in emitted} >= {
            ("cp-a", "Accepted"),
            ("cp-b", "Accepted"),
            ("cp-c", "Accepted"),
        }


async def test_one_call_in_flight_per_station_and_a_newer_limit_supersedes_a_queued_one() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPM"]  # one station, two EVSEs: one call queue
        # The station holds its answers to SetChargingProfile until the gate opens.
        sim.misbehaviour.gated_actions = {"SetChargingProfile"}
        sim.misbehaviour.answer_gate.clear()
        first = r.cs.send_limits(
            [
                LimitOrder("cp-m1", limit_a=20.0, purpose="tx_default"),
                LimitOrder("cp-m2", limit_a=20.0, purpose="tx_default"),
            ]
        )
        # Only the first went straight out; the second waits in the station's queue.
        assert first[0].sent_mono is not None and first[1].sent_mono is None
        await r.until(lambda: len(_profiles(sim)) == 1)
        # A lower limit for m2 while m1's call is unanswered supersedes the queued 20 A.
        second = r.cs.send_limits([LimitOrder("cp-m2", limit_a=8.0, purpose="tx_default")])
        await asyncio.sleep(0.3)
        assert len(_profiles(sim)) == 1  # never two of our CALLs at the station at once
        sim.misbehaviour.answer_gate.set()
        done = await asyncio.wait_for(asyncio.gather(*(h.result for h in [*first, *second])), 5)
        assert [x.status for x in done] == ["Accepted", "Superseded", "Accepted"]
        assert second[0].sent_mono is not None and second[0].sent_mono > first[0].sent_mono
        assert [_limit("1.6", p) for p in _profiles(sim)] == [20.0, 8.0]


async def test_a_bad_order_sends_nothing_and_names_itself() -> None:
    async with rig() as r:
        with pytest.raises(ValueError, match=r"order 1 \(cp-b\).*finite"):
            r.cs.send_limits(
                [
                    LimitOrder("cp-a", limit_a=10.0, purpose="tx_default"),
                    LimitOrder("cp-b", limit_a=float("inf"), purpose="tx_default"),
                ]
            )
        await asyncio.sleep(0.3)
        assert _profiles(r.fleet.stations["CPA"]) == []


async def test_a_tx_limit_without_a_transaction_and_an_offline_station_say_so() -> None:
    async with rig() as r:
        handles = r.cs.send_limits([LimitOrder("cp-a", limit_a=10.0)])
        res = await asyncio.wait_for(handles[0].result, 5)
        assert res.status == "NoTransaction" and res.sent_mono is None
        await r.fleet.stations["CPB"].stop()
        await r.until(lambda: not r.cs.is_connected("cp-b"))
        res = await asyncio.wait_for(
            r.cs.send_limits([LimitOrder("cp-b", limit_a=10.0, purpose="tx_default")])[0].result,
            5,
        )
        assert res.status == "NotConnected" and not res.accepted


async def test_an_unanswered_batch_call_times_out_and_frees_the_station() -> None:
    async with rig(call_timeout_s=0.5) as r:
        sim = r.fleet.stations["CPA"]
        sim.misbehaviour.unanswered_actions = {"SetChargingProfile"}
        h = r.cs.send_limits([LimitOrder("cp-a", limit_a=10.0, purpose="tx_default")])[0]
        res = await asyncio.wait_for(h.result, 5)
        assert res.status == "Timeout" and res.sent_mono is not None
        sim.misbehaviour.unanswered_actions = set()
        # The slot is free again: the next limit goes out and is answered.
        res2 = await asyncio.wait_for(
            r.cs.send_limits([LimitOrder("cp-a", limit_a=9.0, purpose="tx_default")])[0].result,
            5,
        )
        assert res2.status == "Accepted"


async def test_a_frame_that_cannot_be_built_leaves_the_others_answered_and_their_slots_free() -> (
    None
):
    """A 1.6 connection holding a transaction id that is not an integer (restored from a store
    after a version switch): its TxProfile cannot be put on the wire. Before, that raised out of
    ``send_limits`` after the frames before it were written, whose stations kept their one call
    slot taken for good (nothing more reached them); now it takes the queued path, which says
    why, and the rest is answered."""
    async with rig() as r:
        r.fleet.plug_in("cp-a", EV(soc=0.3))
        await r.until(lambda: bool(r.cs.station_state("cp-a").active_transactions.get(1)))
        r.cs._stations["CPA"].active_tx[1] = "restored-201-id"
        handles = r.cs.send_limits(
            [
                LimitOrder("cp-b", limit_a=12.0, purpose="tx_default"),
                LimitOrder("cp-a", limit_a=10.0, valid_to=r.cs.clock.now() + 60),
            ]
        )
        ok, bad = await asyncio.wait_for(asyncio.gather(*(h.result for h in handles)), 5)
        assert ok.status == "Accepted" and ok.limit_a == 12.0
        assert bad.status == "CallError" and not bad.accepted
        assert "restored-201-id" in (bad.detail or "")
        # cp-b's station takes the next limit at once: its slot was freed by the answer.
        again = r.cs.send_limits([LimitOrder("cp-b", limit_a=11.0, purpose="tx_default")])
        assert again[0].sent_mono is not None
        res = await asyncio.wait_for(again[0].result, 5)
        assert res.status == "Accepted" and res.limit_a == 11.0
