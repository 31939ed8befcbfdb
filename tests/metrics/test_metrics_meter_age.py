"""A charger's meter values that stopped coming show their age in a scrape: a running
``EdgeApp`` with ``[metrics]``, a 1.6 station speaking raw OCPP over a real WebSocket, the real
/metrics endpoint scraped over HTTP."""

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


async def test_a_charger_whose_meter_values_stopped_shows_their_age() -> None:
    """A station that stays connected but stops sending meter values (a sample interval set
    wrong, a meter that hung): ``evcore_charger_current_amperes`` keeps its last reading (by
    design, as the envelope counts it) and ``evcore_charger_online`` stays 1, so before nothing
    in a scrape told a frozen 16 A from a live one. ``evcore_charger_meter_age_seconds`` says
    how old the reading is (absent before the first), as the API's measurement_age_s does."""
    table = depot_table(2, per_feeder=2, site_id="age-depot")
    table["metrics"] = {"listen": "127.0.0.1:0"}
    clock = WallClock()
    app = EdgeApp(load_site(table), table, clock=clock)
    runner = asyncio.create_task(app.run())
    station: Any = None
    try:
        await asyncio.wait_for(app.ready.wait(), 20)
        url = f"ws://127.0.0.1:{app.central.port}{app.central.config.path_prefix}/CP0001"
        ws = await connect(url, subprotocols=[Subprotocol("ocpp1.6")])
        station = ocpp_helpers("ocpp_testsite").RawStation(ws)
        boot = {"chargePointVendor": "V", "chargePointModel": "M"}
        assert (await station.call("BootNotification", boot))[0] == 3
        mv = {"connectorId": 1, "meterValue": ocpp16_reading(clock.now(), "50")}
        assert (await station.call("MeterValues", mv))[0] == 3
        first = await scrape(app.metrics_port)
        assert first.types.get("evcore_charger_meter_age_seconds") == "gauge"
        ages = first.by("evcore_charger_meter_age_seconds", "charger_id")
        assert list(ages) == ["cp-0001"], ages  # cp-0002 never measured: absent
        assert 0.0 <= ages["cp-0001"] < 1.5, ages
        await asyncio.sleep(2.0)
        later = await scrape(app.metrics_port)
        age = later.value("evcore_charger_meter_age_seconds", charger_id="cp-0001")
        assert age >= 2.0 + ages["cp-0001"] - 0.1, (ages, age)
        assert later.value("evcore_charger_online", charger_id="cp-0001") == 1
        assert later.value("evcore_charger_current_amperes", charger_id="cp-0001", phase="L1") == 16
    finally:
        if station is not None:
            await station.close()
        app.stop()
        await asyncio.wait_for(runner, 20)
