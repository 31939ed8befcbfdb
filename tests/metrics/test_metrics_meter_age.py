"""A charger's meter values that stopped coming show their age in a scrape: a running
``EdgeApp`` with ``[metrics]``, a 1.6 station speaking raw OCPP over a real WebSocket, the real
/metrics endpoint scraped over HTTP."""

from __future__ import annotations

import asyncio

import pytest
from evcore.edge.sitegen import depot_table
from metrics_testkit import ocpp16_reading, ocpp16_station, running_edge, scrape

pytestmark = pytest.mark.timeout(60)


async def test_a_charger_whose_meter_values_stopped_shows_their_age() -> None:
    """A station that stays connected but stops sending meter values (a sample interval set
    wrong, a meter that hung): ``evcore_charger_current_amperes`` keeps its last reading (by
    design, as the envelope counts it) and ``evcore_charger_online`` stays 1, so before nothing
    in a scrape told a frozen 16 A from a live one. ``evcore_charger_meter_age_seconds`` says
    how old the reading is (absent before the first), as the API's measurement_age_s does."""
    table = depot_table(2, per_feeder=2, site_id="age-depot")
    async with running_edge(table) as app, ocpp16_station(app, "CP0001") as station:
        mv = {"connectorId": 1, "meterValue": ocpp16_reading(app.clock.now(), "50")}
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
