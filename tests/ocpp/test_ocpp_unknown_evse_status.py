"""A StatusNotification of an EVSE or connector the site file does not list (a station with more
connectors than the site manages) is answered, and is not taken for the station's own status.
Before, it went out and into the store as the status of the station as a whole (``charger_id``
None: connector / EVSE 0), and overwrote it: a fault of an unmanaged connector showed as the
station Faulted, its next Available as the station Available. Real OCPP over real WebSockets, the
embedded store."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.ocpp.events import StatusEvent
from evcore.ocpp.v16 import iso
from evcore.v1 import status_pb2
from ocpp_testsite import open_sqlite, raw_csms

pytestmark = pytest.mark.timeout(30)


async def test_a_status_of_an_evse_the_site_does_not_list_is_not_the_stations(
    tmp_path: Path,
) -> None:
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        b = await r.station("CPB")
        a = await r.station("CPA", "1.6")
        t = r.clock.now() - 5

        def status_201(evse: int, connector: int, state: str, dt: float) -> dict[str, object]:
            return {"timestamp": iso(t + dt), "connectorStatus": state, "evseId": evse,
                    "connectorId": connector}  # fmt: skip

        assert (await b.call("StatusNotification", status_201(0, 0, "Available", 0)))[0] == 3
        assert (await b.call("StatusNotification", status_201(1, 1, "Occupied", 1)))[0] == 3
        assert (await b.call("StatusNotification", status_201(2, 1, "Faulted", 2)))[0] == 3
        station = {"connectorId": 0, "status": "Available", "errorCode": "NoError"}
        assert (await a.call("StatusNotification", station))[0] == 3
        other = {"connectorId": 3, "status": "Faulted", "errorCode": "GroundFailure"}
        assert (await a.call("StatusNotification", other))[0] == 3
        latest = await store.latest_statuses()
        S = status_pb2.ConnectorState
        got = {k: (v.evse_id, v.state, v.error_code) for k, v in latest.items()}
        assert got == {
            "CPB": (0, S.CONNECTOR_STATE_AVAILABLE, ""),
            "cp-b": (1, S.CONNECTOR_STATE_OCCUPIED, ""),
            "CPA": (0, S.CONNECTOR_STATE_AVAILABLE, ""),
        }
        heard = [(e.ocpp_id, e.charger_id, e.evse_id, e.status) for e in r.of(StatusEvent)]
        assert heard == [
            ("CPB", None, 0, "Available"),
            ("CPB", "cp-b", 1, "Occupied"),
            ("CPA", None, 0, "Available"),
        ]
        # What the station said is still kept where its state is read.
        assert r.cs.station_state("CPA").status[(3, 1)] == "Faulted"
