"""Large frames (real websockets): ``[ocpp] max_frame_bytes`` (default 16 MiB) bounds what a station
may send. A 1.6 StopTransaction carries its session's transactionData; websockets' default
(1 MiB) closed the connection (1009) on a 4 h session's, the station retried the same message after
reconnecting for ever and the session never ended."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from evcore.ocpp import TransactionEvent
from evcore.ocpp.config import OcppConfigError, parse_ocpp_section
from evcore.ocpp.handlers import iso
from ocpp_testsite import rig, station_ws
from websockets.exceptions import ConnectionClosedError

pytestmark = pytest.mark.timeout(60)


def _sample(t: float, register_wh: float) -> dict[str, Any]:
    sv = [
        {
            "value": f"{register_wh:.0f}",
            "context": "Sample.Periodic",
            "measurand": "Energy.Active.Import.Register",
            "unit": "Wh",
            "location": "Outlet",
        }
    ]
    for ph in ("L1", "L2", "L3"):
        for m, u, v in (
            ("Current.Import", "A", "16.0"),
            ("Power.Active.Import", "W", "3680"),
            ("Current.Offered", "A", "16.0"),
        ):
            sv.append(
                {
                    "value": v,
                    "context": "Sample.Periodic",
                    "measurand": m,
                    "phase": ph,
                    "unit": u,
                    "location": "Outlet",
                }
            )
    return {"timestamp": iso(t), "sampledValue": sv}


async def _recv(ws: Any) -> list[Any]:
    while True:
        msg: list[Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg[0] != 2:  # the central system's CALLs (configuration at boot) go unanswered
            return msg


async def test_a_2_mib_stop_transaction_ends_the_transaction() -> None:
    async with rig(connect=False) as r:
        async with station_ws(r.base_url, "CPA", "ocpp1.6") as ws:
            t0 = time.time() - 5 * 3600
            start = {"connectorId": 1, "idTag": "T", "meterStart": 1000, "timestamp": iso(t0)}
            await ws.send(json.dumps([2, "s1", "StartTransaction", start]))
            tx = (await _recv(ws))[2]["transactionId"]
            n = 1600  # 4.4 h of 10 s samples
            stop = {
                "transactionId": tx,
                "meterStop": 1000 + n * 10,
                "timestamp": iso(time.time() - 1),
                "reason": "EVDisconnected",
                "transactionData": [_sample(t0 + 10 * i, 1000 + i * 10) for i in range(n)],
            }
            text = json.dumps([2, "s2", "StopTransaction", stop])
            assert len(text) > 2 * 2**20
            await ws.send(text)
            # Before: ConnectionClosedError 1009 (message too big), here and on every retry.
            assert await _recv(ws) == [3, "s2", {}]
        ended = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert [e.transaction_id for e in ended] == [str(tx)]
        assert ended[0].session_energy_wh == n * 10
        assert r.cs.station_state("CPA").active_transactions == {}


async def test_a_frame_over_max_frame_bytes_closes_the_connection() -> None:
    async with rig(connect=False, max_frame_bytes=65_536) as r:
        async with station_ws(r.base_url, "CPB", "ocpp2.0.1") as ws:
            big = {"vendorId": "x", "data": "y" * 70_000}
            await ws.send(json.dumps([2, "b1", "DataTransfer", big]))
            with pytest.raises(ConnectionClosedError) as closed:
                await _recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_max_frame_bytes_is_checked() -> None:
    assert parse_ocpp_section({}).max_frame_bytes == 16 * 2**20
    assert parse_ocpp_section({"max_frame_bytes": 2**25}).max_frame_bytes == 2**25
    for bad in (1024, 2**31, True, "16M"):
        with pytest.raises(OcppConfigError, match="max_frame_bytes"):
            parse_ocpp_section({"max_frame_bytes": bad})
