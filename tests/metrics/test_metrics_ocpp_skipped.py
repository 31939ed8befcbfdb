"""Sampled values the central system skips are exported to Prometheus: a running ``EdgeApp``
with ``[metrics]``, a 1.6 station speaking raw OCPP over a real WebSocket, the real /metrics
endpoint scraped over HTTP. Before, ``CentralSystem.skipped_values`` (e368fa0) was only in the
process and the log: a station sending a SoC of "" or -1 with every reading went unseen by
the operator's dashboards."""

from __future__ import annotations

import asyncio

import pytest
from evcore.edge.sitegen import depot_table
from metrics_testkit import ocpp16_reading, ocpp16_station, running_edge, scrape

pytestmark = pytest.mark.timeout(60)

SKIPPED = "evcore_ocpp_values_skipped_total"


async def test_skipped_sampled_values_are_scraped_by_station_and_measurand() -> None:
    table = depot_table(2, per_feeder=2, site_id="skip-depot")
    async with running_edge(table) as app:
        before = await scrape(app.metrics_port)
        assert before.types.get(SKIPPED) == "counter"
        assert before.series(SKIPPED) == {}
        async with ocpp16_station(app, "CP0001") as station:
            for soc in ("", "-1", "n/a"):
                mv = {"connectorId": 1, "meterValue": ocpp16_reading(app.clock.now() - 1, soc)}
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


async def test_values_the_schema_refuses_are_scraped_under_their_measurand_or_unknown() -> None:
    """Values the 1.6 schema refuses (a number where it wants a string; a measurand it does not
    name) are skipped and counted by the central system under their measurand, ``unknown`` for
    one the version does not name (1cf558c). Before, the scrape kept only the five measurands
    the central system reads: the Voltage and ``unknown`` counts were in
    ``CentralSystem.skipped_values`` and never scraped, so a station whose every reading carried
    a value the schema refused showed nothing."""
    table = depot_table(2, per_feeder=2, site_id="skip-schema-depot")
    async with running_edge(table) as app, ocpp16_station(app, "CP0001") as station:
        reading = ocpp16_reading(app.clock.now() - 1, "50")
        reading[0]["sampledValue"] += [
            {"value": 231, "measurand": "Voltage", "phase": "L1-N", "unit": "V"},
            {"value": "7", "measurand": "Humidity"},
            {"value": 48, "measurand": "SoC", "unit": "Percent"},
        ]
        answer = await station.call("MeterValues", {"connectorId": 1, "meterValue": reading})
        assert answer[0] == 3, answer
        expected = {
            (("measurand", "SoC"), ("ocpp_id", "CP0001")): 1.0,
            (("measurand", "Voltage"), ("ocpp_id", "CP0001")): 1.0,
            (("measurand", "unknown"), ("ocpp_id", "CP0001")): 1.0,
        }
        held = {
            (("measurand", m), ("ocpp_id", o)): float(n)
            for (o, m), n in app.central.skipped_values.items()
        }
        assert held == expected  # what the central system counted ...
        after = await scrape(app.metrics_port)
        assert after.series(SKIPPED) == expected  # ... is what a scrape shows
        currents = after.series("evcore_charger_current_amperes")
        assert currents[(("charger_id", "cp-0001"), ("phase", "L1"))] == 16.0
