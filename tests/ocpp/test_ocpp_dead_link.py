"""A station whose link dies without a close (power cut at the station, a cellular modem or NAT
dropping the flow: no FIN, no RST) is taken as gone once it stops answering WebSocket pings
(``[ocpp] ping_interval_s``). Before, the central system never pinged (``ping_interval=None``)
and held such a station connected for good: no disconnect event to the edge, every limit sent to
it waited ``call_timeout_s`` for a Timeout instead of failing NotConnected at once. Real OCPP
over a real WebSocket, through a TCP relay that stops carrying bytes both ways."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from evcore.ocpp import ConnectionEvent
from evcore.ocpp.config import OcppConfigError, parse_ocpp_section
from ocpp_testsite import BOOT_201, RawStation, TcpRelay, raw_csms, station_ws

pytestmark = pytest.mark.timeout(30)


async def test_a_station_gone_silent_is_taken_as_gone_after_its_pings() -> None:
    async with raw_csms(ping_interval_s=0.5, ping_timeout_s=0.5) as r:
        relay = TcpRelay(r.cs.port)
        port = await relay.start()
        st = RawStation(await station_ws(f"ws://127.0.0.1:{port}/ocpp", "CPB", "2.0.1"))
        try:
            assert (await st.call("BootNotification", BOOT_201))[0] == 3
            assert r.cs.is_connected("cp-b")
            await asyncio.sleep(0.7)  # a ping answered: still connected
            assert r.cs.is_connected("cp-b")
            relay.cut = True
            loop = asyncio.get_running_loop()
            cut_at = loop.time()
            while r.cs.is_connected("cp-b"):
                assert loop.time() - cut_at < 5, "still connected 5 s after the link went silent"
                await asyncio.sleep(0.05)
            # Within three ping intervals (the next ping, its pong's wait, the closing
            # handshake's), and reported.
            assert loop.time() - cut_at < 2.5
            gone = [e for e in r.of(ConnectionEvent) if e.ocpp_id == "CPB" and not e.connected]
            assert len(gone) == 1
        finally:
            await relay.close()  # (first: the station's close then ends at once)
            with contextlib.suppress(Exception):
                await st.close()


def test_ping_interval_s_is_checked_and_0_turns_pings_off() -> None:
    assert parse_ocpp_section({}).ping_interval_s == 30.0
    assert parse_ocpp_section({"ping_interval_s": 0}).ping_interval_s == 0.0
    for bad in (-1, float("nan"), True, "30", 100_000):
        with pytest.raises(OcppConfigError, match=r"\[ocpp\]\.ping_interval_s"):
            parse_ocpp_section({"ping_interval_s": bad})
