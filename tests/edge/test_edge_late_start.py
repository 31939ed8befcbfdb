"""A late start of an older transaction is not the charger's session.

A station that replays a transaction it held while away (start and stop stamped before the
transaction running now started) has the central system keep the running one as the EVSE's
active transaction (``CentralSystem._take_evse``), but its start still reaches the edge. The edge
took it as the charger's new session: the running session's demand (energy wanted, departure,
priority, here set before its transaction started) carried over to it, and when the replayed
stop came the edge held the charger idle while the car of the running transaction went on
drawing what its TxProfile allowed, counted at the charger's TxDefault.
"""

from __future__ import annotations

import sys
from pathlib import Path

from evcore.edge.app import build_controller
from evcore.edge.coreio import RustCore
from evcore.edge.recording import SessionKeeper
from evcore.edge.state import SiteState
from evcore.ocpp.v16 import iso
from evcore.site import load_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ocpp"))
from ocpp_testsite import SITE, open_sqlite, raw_csms, start_16, stop_16


async def test_a_replayed_older_transaction_does_not_take_the_running_sessions_place(
    tmp_path: Path,
) -> None:
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as rig:
        clock = rig.clock
        ctrl = build_controller(
            SITE, core=RustCore(load_site(SITE), SITE), gateway=rig.cs, clock=clock
        )
        rig.cs.add_listener(ctrl.on_event)
        keeper = SessionKeeper(store, clock)
        ctrl.on_session = keeper
        ctrl.on_late_session = keeper.late
        st = await rig.station("CPA", "1.6")
        c = ctrl.state.chargers["cp-a"]
        t = clock.now()
        status = {"connectorId": 1, "errorCode": "NoError", "status": "Preparing"}
        assert (await st.call("StatusNotification", status | {"timestamp": iso(t)}))[0] == 3
        # The driver's app tells the edge what the car needs before its transaction starts.
        ctrl.set_session("cp-a", energy_requested_kwh=30.0, departure=t + 3600, priority=5.0)
        running = (await st.call("StartTransaction", start_16(t, 5_000)))[2]["transactionId"]
        assert c.transaction_id == str(running) and c.energy_requested_kwh == 30.0

        # A transaction the station held while away, replayed now: started and stopped before.
        old = (await st.call("StartTransaction", start_16(t - 600, 1_000, "OLD")))[2]
        assert rig.cs._stations["CPA"].active_tx[1] == str(running)  # the central system's view
        assert c.transaction_id == str(running), c.transaction_id  # before: the replayed one
        assert (c.energy_requested_kwh, c.departure, c.priority) == (30.0, t + 3600, 5.0)
        stop = stop_16(old["transactionId"], t - 300, 2_000)
        assert (await st.call("StopTransaction", stop))[0] == 3
        # Before: None, the charger idle to the edge while the running car drew on.
        assert c.transaction_id == str(running), c.transaction_id
        assert c.energy_requested_kwh == 30.0
        # Both are in the store as sessions: the replayed one ended with its 1 kWh, the
        # running one open with what was set for it.
        await keeper.drain()
        replayed = await store.get_session(f"cp-a:{old['transactionId']}")
        assert replayed is not None and replayed.ended_at_s is not None
        assert replayed.energy_delivered_kwh == 1.0 and replayed.energy_requested_kwh is None
        (live,) = await store.list_open_sessions()
        assert (live.transaction_id, live.energy_requested_kwh) == (str(running), 30.0)

        # The running car leaves; the next one on the charger starts with no demand of its own.
        assert (await st.call("StopTransaction", stop_16(running, t + 60, 9_000)))[0] == 3
        nxt = (await st.call("StartTransaction", start_16(t + 120, 9_000, "NEXT")))[2]
        assert c.transaction_id == str(nxt["transactionId"])
        assert (c.energy_requested_kwh, c.departure, c.priority) == (None, None, 1.0)


def test_a_start_that_replaces_a_session_ends_that_sessions_demand() -> None:
    """``SiteState.on_transaction``: the next transaction's start ends the session before it
    (its end was lost) and with it what was set for that session, as its end would."""
    from evcore.edge.app import charger_states

    state: SiteState = charger_states(SITE)[0]
    state.on_transaction("cp-a", "started", "T1", 1000.0, 1.0, stamped_at=1000.0)
    c = state.chargers["cp-a"]
    c.energy_requested_kwh, c.departure, c.priority = 30.0, 4600.0, 5.0
    state.on_transaction("cp-a", "started", "T2", 2000.0, 2.0, stamped_at=2000.0)
    assert c.transaction_id == "T2"
    assert (c.energy_requested_kwh, c.departure, c.priority) == (None, None, 1.0)  # before: T1's
