"""A session's delivered energy survives an edge restart.

``recover`` brought back a session's transaction and what the operator set for it, but not the
energy it had delivered: the restarted edge counted 0 kWh until the charger's next reading (and
a reading whose register the central system could not difference yet, or none at all, kept it
there), so the allocator and the planner took the car to need its whole request again, and
``least_laxity`` weighted it as far less lax than it was. The store did not know it either: the
session was saved at its start (0 kWh), when steered and when it ended.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
from evcore.edge.app import build_controller, charger_states
from evcore.edge.coreio import RustCore
from evcore.edge.recording import SessionKeeper, recover
from evcore.ocpp.v16 import iso
from evcore.site import load_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ocpp"))
from ocpp_testsite import DC_CHARGER, PASSWORDS, SITE, open_sqlite, raw_csms, start_16, tx_event


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


async def test_a_dc_session_metered_at_its_inlet_counts_on_across_a_restart(
    tmp_path: Path,
) -> None:
    """A 2.0.1 DC station that meters only its inlet and whose start carried no register: the
    store holds no start register for the transaction, so the restarted central system counts
    the session's energy from its first register after the restart, 0 Wh. The edge took back
    the 1,333 Wh delivered before and held it (a reading with less does not lower it) until the
    count passed it: the energy stood still for as long as it had taken to deliver it, and the
    session stayed short by it to its end (2,000 Wh of 4,000 at the last reading here). Now
    what the central system counts after the restart adds to what was restored. (The energy of
    the interval across the restart is not counted: no register from before it is known.)"""
    from test_ocpp_dc_energy import AUX_W, EFF, mv, register

    table = copy.deepcopy(SITE)
    table["chargers"].append(DC_CHARGER)
    table["ocpp"]["credentials"]["CPD"] = PASSWORDS["CPD"]
    grid_wh = (40_000.0 / EFF + AUX_W) * 60.0 / 3600.0  # a minute at 40 kW into the car
    car_wh = 40_000.0 * 60.0 / 3600.0

    async def reading(st: Any, at: float, k: int) -> None:
        values = {"evseId": 1, "meterValue": mv(at, register(10_000.0 + k * grid_wh, "Inlet"))}
        assert (await st.call("MeterValues", values))[0] == 3

    async with open_sqlite(tmp_path) as store:
        async with raw_csms(store=store, extra_chargers=[DC_CHARGER]) as rig:
            clock = rig.clock
            site = load_site(table)
            ctrl = build_controller(table, core=RustCore(site, table), gateway=rig.cs, clock=clock)
            rig.cs.add_listener(ctrl.on_event)
            keeper = SessionKeeper(store, clock, energy_save_s=0.0)
            ctrl.on_session = keeper
            ctrl.on_session_energy = keeper.note_energy
            st = await rig.station("CPD")
            t = clock.now() - 600
            started = tx_event("D1", 0, "Started", "CablePluggedIn", t, evse={"id": 1})
            assert (await st.call("TransactionEvent", started))[0] == 3
            for k in range(3):
                await reading(st, t + 60 * k, k)
            c = ctrl.state.chargers["cp-d"]
            assert c.session_energy_wh == pytest.approx(2 * car_wh)
            await keeper.drain()

        # The edge, and its central system, restart on the same store.
        async with raw_csms(store=store, extra_chargers=[DC_CHARGER]) as rig:
            clock = rig.clock
            ctrl = build_controller(table, core=RustCore(site, table), gateway=rig.cs, clock=clock)
            await recover(ctrl.state, store, SessionKeeper(store, clock))
            rig.cs.add_listener(ctrl.on_event)
            c = ctrl.state.chargers["cp-d"]
            assert (c.transaction_id, c.session_energy_wh) == ("D1", pytest.approx(2 * car_wh))
            st = await rig.station("CPD")
            got = []
            for k in range(3, 7):
                await reading(st, t + 60 * k, k)
                got.append(c.session_energy_wh)
            # The minute across the restart (k 2 to 3) is not counted; every one after it is.
            # Before: 1333, 1333, 1333, 2000.
            assert got == pytest.approx([2 * car_wh, 3 * car_wh, 4 * car_wh, 5 * car_wh])
