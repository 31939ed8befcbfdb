"""A station's pong waits behind the frame it is sending, and websockets does not count received
data as a sign of life. With the pong's wait equal to ``ping_interval_s`` (30 s), a 1.9 MiB
StopTransaction over a 20-50 kB/s cellular link (40-100 s) was failed mid-frame (1011); the
station reconnected and resent it, for ever. ``[ocpp] ping_timeout_s`` is the pong's own wait,
by default the time ``max_frame_bytes`` takes at 20 kB/s. Real WebSockets through a TCP relay
that carries the station's bytes at a slow rate."""

from __future__ import annotations

import contextlib

import pytest
from evcore.ocpp import ConnectionEvent
from evcore.ocpp.config import OcppConfigError, parse_ocpp_section
from ocpp_testsite import BOOT_201, RawStation, TcpRelay, raw_csms, station_ws

pytestmark = pytest.mark.timeout(30)


async def test_a_pong_behind_a_slow_large_frame_keeps_the_station_connected() -> None:
    # 60 kB at 30 kB/s: 2 s on the link, pings every 0.3 s. Default pong wait: 65536 bytes at
    # 20 kB/s, 3.3 s. Before: 0.3 s, and the station was dropped (1011) mid-frame.
    async with raw_csms(ping_interval_s=0.3, max_frame_bytes=65_536) as r:
        assert r.cs.config.pong_timeout_s == pytest.approx(65_536 / 20_000)
        relay = TcpRelay(r.cs.port, uplink_rate=30_000)
        port = await relay.start()
        st = RawStation(await station_ws(f"ws://127.0.0.1:{port}/ocpp", "CPB", "2.0.1"))
        try:
            assert (await st.call("BootNotification", BOOT_201))[0] == 3
            payload = {"vendorId": "org.example", "data": "x" * 60_000}
            answer = await st.call("DataTransfer", payload)
            assert answer[0] in (3, 4), answer  # answered (UnknownVendorId or an error)
            assert r.cs.is_connected("cp-b")
            gone = [e for e in r.of(ConnectionEvent) if e.ocpp_id == "CPB" and not e.connected]
            assert gone == []
        finally:
            await relay.close()
            with contextlib.suppress(Exception):
                await st.close()


def test_ping_timeout_s_is_checked_and_defaults_to_max_frame_bytes_at_20_kb_s() -> None:
    cfg = parse_ocpp_section({})
    assert cfg.ping_timeout_s is None
    assert cfg.pong_timeout_s == pytest.approx(16 * 2**20 / 20_000)  # 839 s
    small = parse_ocpp_section({"max_frame_bytes": 65_536, "ping_interval_s": 30})
    assert small.pong_timeout_s == 30.0  # never below the interval
    assert parse_ocpp_section({"ping_timeout_s": 120}).pong_timeout_s == 120.0
    for bad in (0, -1, float("nan"), float("inf"), True, "120", 100_000):
        with pytest.raises(OcppConfigError, match=r"\[ocpp\]\.ping_timeout_s"):
            parse_ocpp_section({"ping_timeout_s": bad})
