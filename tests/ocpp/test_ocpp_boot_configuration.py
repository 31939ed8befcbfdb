"""The configuration a central system sends after a BootNotification (ChangeConfiguration in 1.6,
SetVariables in 2.0.1): one round at a time per station. Every Boot is followed by a whole round
(a station that booted may have lost its settings), but a Boot that comes during a round does not
start a second one beside it: that round starts again from its first call once the call in
flight is answered. A round's calls go on the connection it is for only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from evcore.ocpp import ConfigurationEvent
from ocpp_testsite import BOOT_16, raw_csms, station_ws

_ROUND = ["MeterValuesSampledData", "MeterValueSampleInterval"]


async def _frame(ws: Any) -> list[Any]:
    frame: list[Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return frame


async def _until(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not pred():  # noqa: ASYNC110 - polls the rig's events
            await asyncio.sleep(0.02)


async def _boot_holding_the_first_call(ws: Any, uid: str, keys: list[str]) -> list[Any]:
    """Send a Boot on ``ws``; return the central system's first CALL after it, unanswered."""
    await ws.send(json.dumps([2, uid, "BootNotification", BOOT_16]))
    held: list[Any] | None = None
    answered = False
    while held is None or not answered:
        f = await _frame(ws)
        if f[0] == 2:
            assert answered, f"a call before the Boot was answered: {f}"
            held = f
            keys.append(f[3]["key"])
        elif f[1] == uid:
            answered = True
    return held


@asynccontextmanager
async def _answering(ws: Any, keys: list[str]) -> AsyncIterator[None]:
    """Answer every CALL on ``ws`` Accepted at once, its key noted in ``keys``."""

    async def answer_all() -> None:
        while True:
            f = await _frame(ws)
            if f[0] == 2:
                keys.append(f[3]["key"])
                await ws.send(json.dumps([3, f[1], {"status": "Accepted"}]))

    task = asyncio.ensure_future(answer_all())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_second_boot_during_the_configuration_restarts_it_not_a_second_round() -> None:
    """Before: each Boot spawned a round of its own, and the two interleaved on the station's
    one call slot (MeterValuesSampledData twice, then MeterValueSampleInterval twice: 4 calls),
    each ending in a ConfigurationEvent, the first one's results from before the second Boot."""
    async with raw_csms(configure_on_boot=True) as r:
        async with station_ws(f"ws://127.0.0.1:{r.cs.port}/ocpp", "CPA", "1.6") as ws:
            keys: list[str] = []
            held = await _boot_holding_the_first_call(ws, "b1", keys)
            # The first round's first call is in flight, unanswered: the station boots again.
            await ws.send(json.dumps([2, "b2", "BootNotification", BOOT_16]))
            while (f := await _frame(ws))[1] != "b2":
                assert f[0] != 2, f"a second call while one was in flight: {f}"
            await ws.send(json.dumps([3, held[1], {"status": "Accepted"}]))
            async with _answering(ws, keys):
                await _until(lambda: bool(r.of(ConfigurationEvent)))
                await asyncio.sleep(0.3)  # room for a round that should not come
    # The first round's call in flight, then one whole round after the second Boot, in order.
    assert keys == [_ROUND[0], *_ROUND], keys
    assert [e.results for e in r.of(ConfigurationEvent)] == [dict.fromkeys(_ROUND, "Accepted")]


async def test_a_station_reconnecting_mid_configuration_gets_one_round_after_its_boot() -> None:
    """The station opens a new connection while the first one's round waits on its first call
    (a reboot seen before the old link's end). Before: the old round sent its next call on the
    new connection before that one's Boot was answered, beside the new Boot's round. Now the
    old round is reported cut off (Disconnected) and the new connection gets one whole round,
    after its Boot."""
    async with raw_csms(configure_on_boot=True) as r:
        url = f"ws://127.0.0.1:{r.cs.port}/ocpp"
        first: list[str] = []
        keys: list[str] = []
        async with station_ws(url, "CPA", "1.6") as old:
            await _boot_holding_the_first_call(old, "b1", first)
            async with station_ws(url, "CPA", "1.6") as ws:
                held = await _boot_holding_the_first_call(ws, "b2", keys)
                await ws.send(json.dumps([3, held[1], {"status": "Accepted"}]))
                async with _answering(ws, keys):
                    await _until(
                        lambda: any(
                            "Accepted" in e.results.values() for e in r.of(ConfigurationEvent)
                        )
                    )
                    await asyncio.sleep(0.3)  # room for a call or a report that should not come
    assert first == [_ROUND[0]]
    assert keys == _ROUND, keys
    assert [e.results for e in r.of(ConfigurationEvent)] == [
        dict.fromkeys(_ROUND, "Disconnected"),
        dict.fromkeys(_ROUND, "Accepted"),
    ]
