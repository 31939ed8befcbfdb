"""A charger that was away (its connection down) for hours does not put the energy of its
whole absence into the demand window it comes back in.

The local planner's demand windows (the month's peak already billed, ``DemandWindows``) counted
the energy between two readings in the window of the later one: fine every 30 s, but a charger
offline for three hours, charging at 11 kW under its TxDefault, came back with 33 kWh more, all
counted in one 15-minute window: 132 kW on average, which became the month's peak. The planner
then took 132 kW as already paid for, and stopped flattening the site's load below it.
"""

from __future__ import annotations

import pytest
from evcore.edge.planning import DemandWindows
from evcore.edge.state import ChargerState

WINDOW_S = 900.0
START = 1_799_582_400.0  # 2027-01-10 12:00 UTC, at a window's start


def test_the_energy_of_an_outage_is_not_counted_in_the_window_it_ends_in() -> None:
    assert START % WINDOW_S == 0
    w = DemandWindows(WINDOW_S)
    c = ChargerState("cp-0001", "CP0001", False, 6.0, 32.0)
    c.transaction_id, c.session_energy_wh, c.measured_at = "t1", 0.0, 0.0
    chargers = {"cp-0001": c}
    now, mono = START, 0.0
    w.sample(now, chargers)
    # A normal read: 1 kWh in 5 minutes (12 kW), in this window.
    now, mono = now + 300.0, mono + 300.0
    c.session_energy_wh, c.measured_at = 1_000.0, mono
    w.sample(now, chargers)
    assert w.window_kwh() == pytest.approx(1.0)
    # The charger's connection goes down: no reading for 3 hours (the planner still samples).
    for _ in range(360):
        now, mono = now + 30.0, mono + 30.0
        w.sample(now, chargers)
    # Back, 450 s into a window: 33 kWh more (11 kW for 3 h).
    assert (now - START) % WINDOW_S == 300.0
    now, mono = now + 150.0, mono + 150.0
    c.session_energy_wh, c.measured_at = 34_000.0, mono
    w.sample(now, chargers)
    # Its share of this window: 450 s of 10,950 s of absence (1.36 kWh), not 33 kWh.
    assert w.window_kwh() == pytest.approx(33.0 * 450.0 / 10_950.0)
    # The next window closes this one: the month's peak is 5.4 kW, not 132.
    now += WINDOW_S
    w.sample(now, chargers)
    assert w.peak_kw == pytest.approx(33.0 * 450.0 / 10_950.0 * 4.0)  # before: 132 kW


async def test_a_session_that_ran_while_its_charger_was_away_starts_when_it_started() -> None:
    from edge_testkit import AcceptingGateway, stepped_controller
    from evcore.edge.sitegen import depot_table
    from evcore.ocpp.events import MeterSample, TransactionEvent

    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2), AcceptingGateway())
    clock.wall = START + 300.0  # 300 s into a window
    w = DemandWindows(WINDOW_S)
    w.sample(clock.now(), ctrl.state.chargers)
    clock.advance(30.0)
    # The station comes back and replays a start queued 3 hours ago, and a reading of 33 kWh.
    started = clock.now() - 3 * 3600.0
    ctrl.on_event(
        TransactionEvent(
            charger_id="cp-0001",
            ocpp_id="CP0001",
            transaction_id="t1",
            kind="started",
            at=started,
            id_tag=None,
            meter_start_wh=0.0,
            meter_now_wh=0.0,
            session_energy_wh=0.0,
            offline=True,
        )
    )
    c = ctrl.state.chargers["cp-0001"]
    assert c.session_started_at == started  # before: the replay's arrival
    ctrl.on_event(
        MeterSample(
            charger_id="cp-0001",
            ocpp_id="CP0001",
            at=clock.now(),
            site_phase_a=(16.0, 16.0, 16.0),
            terminal_a=(16.0, 16.0, 16.0),
            power_w=None,
            energy_register_wh=33_000.0,
            offered_a=None,
            soc_percent=None,
            transaction_id="t1",
            session_energy_wh=33_000.0,
        )
    )
    w.sample(clock.now(), ctrl.state.chargers)
    assert w.window_kwh() == pytest.approx(33.0 * 330.0 / (3 * 3600.0))  # before: 33 kWh
