"""A session's delivered energy survives an edge restart.

``recover`` brought back a session's transaction and what the operator set for it, but not the
energy it had delivered: the restarted edge counted 0 kWh until the charger's next reading (and
a reading whose register the central system could not difference yet, or none at all, kept it
there), so the allocator and the planner took the car to need its whole request again, and
``least_laxity`` weighted it as far less lax than it was. The store did not know it either: the
session was saved at its start (0 kWh), when steered and when it ended.
"""

from __future__ import annotations

import sys
from pathlib import Path

from evcore.edge.app import build_controller, charger_states
from evcore.edge.coreio import RustCore
from evcore.edge.recording import SessionKeeper, recover
from evcore.ocpp.v16 import iso
from evcore.site import load_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ocpp"))
from ocpp_testsite import SITE, open_sqlite, raw_csms, start_16


async def test_the_energy_a_session_delivered_comes_back_after_a_restart(tmp_path: Path) -> None:
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as rig:
        clock = rig.clock
        ctrl = build_controller(
            SITE, core=RustCore(load_site(SITE), SITE), gateway=rig.cs, clock=clock
        )
        rig.cs.add_listener(ctrl.on_event)
        keeper = SessionKeeper(store, clock, energy_save_s=0.0)
        ctrl.on_session = keeper
        ctrl.on_session_energy = keeper.note_energy
        st = await rig.station("CPA", "1.6")
        t = clock.now() - 3600
        started = await st.call("StartTransaction", start_16(t, 1_000))
        tx_id = started[2]["transactionId"]
        ctrl.set_session("cp-a", energy_requested_kwh=20.0, departure=clock.now() + 3600)
        register = {
            "value": "13000",
            "measurand": "Energy.Active.Import.Register",
            "unit": "Wh",
        }
        values = {
            "connectorId": 1,
            "transactionId": tx_id,
            "meterValue": [{"timestamp": iso(clock.now()), "sampledValue": [register]}],
        }
        assert (await st.call("MeterValues", values))[0] == 3
        c = ctrl.state.chargers["cp-a"]
        assert c.session_energy_wh == 12_000.0  # 12 kWh of the 20 delivered before the restart
        await keeper.drain()

        # The edge restarts on the same store: its state comes back from it.
        state, _ = charger_states(SITE)
        await recover(state, store, SessionKeeper(store, clock))
        back = state.chargers["cp-a"]
        assert back.transaction_id == str(tx_id)
        assert back.energy_requested_kwh == 20.0
        assert back.session_energy_wh == 12_000.0, back.session_energy_wh  # before: 0.0

        # A reading that carries no energy of the session (the central system restarted too:
        # no register to difference yet) does not take it back to 0.
        state.on_meter("cp-a", (16.0, 16.0, 16.0), None, 0.0, 1.0)
        assert back.session_energy_wh == 12_000.0
