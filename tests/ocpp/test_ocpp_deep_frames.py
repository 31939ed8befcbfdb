"""Deeply nested frames (real websockets, 1.6 and 2.0.1): a CALLERROR, never the end of the session.

A CALL nested 300 levels deep is valid JSON that jsonschema-rs refuses to check ("Recursion limit
reached", a ValueError); 5,000 levels (30 kB) is more than ``json.loads`` parses (RecursionError).
Both ended the station's session; a nested CALLRESULT to our call did too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from evcore.ocpp import ConnectionEvent, ProfileResult
from ocpp_testsite import Rig, raw_call, rig, station_ws

pytestmark = pytest.mark.timeout(60)

VERSIONS = [("CPA", "ocpp1.6", "FormationViolation"), ("CPB", "ocpp2.0.1", "FormatViolation")]


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


async def _our_call_answered(
    r: Rig, ws: Any, sid: str, answer: Callable[[str], str]
) -> tuple[ProfileResult, float]:
    """Our SetChargingProfile to station ``sid`` on ``ws``, answered with ``answer(its id)``: its
    result, and when it was made (``time.monotonic()``)."""
    charger = "cp-a" if sid == "CPA" else "cp-b"
    t0 = time.monotonic()
    res = asyncio.ensure_future(r.cs.set_limit(charger, limit_a=10, purpose="tx_default"))
    call = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert call[2] == "SetChargingProfile"
    await ws.send(answer(call[1]))
    return await asyncio.wait_for(res, 5), t0


@pytest.mark.parametrize(("sid", "version", "code"), VERSIONS)
async def test_a_deeply_nested_call_gets_a_callerror_and_the_session_lives(
    sid: str, version: str, code: str
) -> None:
    async with rig(connect=False) as r:
        async with station_ws(r.base_url, sid, version) as ws:
            for i, depth in enumerate((300, 5000)):
                await ws.send(f'[2,"d{i}","Heartbeat",{{"x":{_nested(depth)}}}]')
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert msg[:3] == [4, f"d{i}", code], (depth, msg)
                hb = await raw_call(ws, f"h{i}", "Heartbeat", {})
                assert hb[0] == 3 and "currentTime" in hb[2]
            data = await raw_call(
                ws, "t1", "DataTransfer", {"vendorId": "x", "data": json.loads(_nested(300))}
            )
            assert data[1] == "t1"  # answered (2.0.1 data is anything, 1.6 a string)
            hb = await raw_call(ws, "h9", "Heartbeat", {})
            assert hb[0] == 3
        await r.until(lambda: not r.cs.is_connected(sid))
        conns = [(e.connected, e.reason) for e in r.of(ConnectionEvent) if e.ocpp_id == sid]
        assert conns == [(True, ""), (False, "closed")]  # before: (False, "error") at once


@pytest.mark.parametrize(("sid", "version", "code"), VERSIONS)
@pytest.mark.parametrize("depth", [300, 5000])
async def test_a_deeply_nested_answer_fails_our_call_at_once(
    sid: str, version: str, code: str, depth: int
) -> None:
    del code
    async with rig(connect=False, call_timeout_s=10) as r:
        async with station_ws(r.base_url, sid, version) as ws:
            out, t0 = await _our_call_answered(
                r, ws, sid, lambda id_: f'[3,"{id_}",{{"status":{_nested(depth)}}}]'
            )
            # Before: the session ended (set_limit: Disconnected; the review's station, which
            # kept its socket open, saw Timeout after call_timeout_s).
            assert out.status == "CallError" and not out.accepted, out
            assert time.monotonic() - t0 < 3.0
            hb = await raw_call(ws, "h1", "Heartbeat", {})
            assert hb[0] == 3 and "currentTime" in hb[2]
            assert r.cs.is_connected(sid)


@pytest.mark.parametrize(("sid", "version", "code"), VERSIONS)
@pytest.mark.parametrize("answer", ['[3,"{id}"]', '[4,"{id}","GenericError"]'])
async def test_a_malformed_answer_fails_our_call_at_once_and_is_not_answered(
    sid: str, version: str, code: str, answer: str
) -> None:
    """A CALLRESULT without its payload, a CALLERROR without its description: our CALL fails at
    once (CallError naming the malformed answer), and nothing is sent back (an answer is never
    answered). Before, the station got a CALLERROR under our CALL's id and the limit waited
    ``call_timeout_s`` for a Timeout."""
    del code
    async with rig(connect=False, call_timeout_s=10) as r:
        async with station_ws(r.base_url, sid, version) as ws:
            out, t0 = await _our_call_answered(r, ws, sid, lambda id_: answer.replace("{id}", id_))
            assert out.status == "CallError" and "malformed" in out.detail, out
            assert time.monotonic() - t0 < 3.0
            # The next frame the station gets is its Heartbeat's answer: nothing came before.
            await ws.send('[2,"h1","Heartbeat",{}]')
            nxt = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert nxt[:2] == [3, "h1"], nxt
