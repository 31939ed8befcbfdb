"""Sampled values the central system skips are exported to Prometheus: a running ``EdgeApp``
with ``[metrics]``, a 1.6 station speaking raw OCPP over a real WebSocket, the real /metrics
endpoint scraped over HTTP. Before, ``CentralSystem.skipped_values`` (e368fa0) was only in the
process and the log: a station sending a SoC of "" or -1 with every reading went unseen by
the operator's dashboards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from metrics_testkit import ocpp16_reading, ocpp_helpers, scrape
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(60)

SKIPPED = "evcore_ocpp_values_skipped_total"


async def test_skipped_sampled_values_are_scraped_by_station_and_measurand() -> None:
    table = depot_table(2, per_feeder=2, site_id="skip-depot")
    table["metrics"] = {"listen": "127.0.0.1:0"}
    clock = WallClock()
    app = EdgeApp(load_site(table), table, clock=clock)
    runner = asyncio.create_task(app.run())
    station: Any = None
    try:
        await asyncio.wait_for(app.ready.wait(), 20)
        before = await scrape(app.metrics_port)
        assert before.types.get(SKIPPED) == "counter"
        assert before.series(SKIPPED) == {}
        url = f"ws://127.0.0.1:{app.central.port}{app.central.config.path_prefix}/CP0001"
        ws = await connect(url, subprotocols=[Subprotocol("ocpp1.6")])
        station = ocpp_helpers("ocpp_testsite").RawStation(ws)
        boot = {"chargePointVendor": "V", "chargePointModel": "M"}
        assert (await station.call("BootNotification", boot))[0] == 3
        for soc in ("", "-1", "n/a"):
            mv = {"connectorId": 1, "meterValue": ocpp16_reading(clock.now() - 1, soc)}
            answer = await station.call("MeterValues", mv)
            assert answer[0] == 3, answer
            await asyncio.sleep(0.01)  # readings a few ms apart
        after = await scrape(app.metrics_port)
        assert after.series(SKIPPED) == {
            (("measurand", "SoC"), ("ocpp_id", "CP0001")): 3.0,
        }
        # The currents beside them reached the edge.
        currents = after.series("evcore_charger_current_amperes")
        assert currents[(("charger_id", "cp-0001"), ("phase", "L1"))] == 16.0
    finally:
        if station is not None:
            await station.close()
        app.stop()
        await asyncio.wait_for(runner, 20)
