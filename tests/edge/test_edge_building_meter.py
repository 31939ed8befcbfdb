"""Building meter readings (``NodeLoadSample`` on ``evcore.<site>.node_load.<node>``): while a
reading is fresh the edge counts the node's non-charger load as read instead of its configured
``other_load_max_a``, so the room the building does not use goes to the cars; a reading gone
stale counts the maximum again. Before, nothing fed ``SiteState.set_other_load``: the building
was always counted at its maximum.

The end-to-end test runs the edge against simulated stations over real OCPP WebSockets, with the
readings published on the real NATS server (127.0.0.1:4222), and checks the site's real line
currents (the building drawing what its meter says) against every limit.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bus_testkit import patient_nats_bus
from edge_testkit import FAST, AcceptingGateway, stepped_controller
from evcore.bus import BadPayload, Subjects
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.signals import apply_node_load, subscribe_signals
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV
from evcore.v1 import meter_pb2

pytestmark = pytest.mark.timeout(120)

NATS_URL = "nats://127.0.0.1:4222"
BUILDING_MAX_A = 60.0
BUILDING_NOW_A = 10.0
GRID_A = 100.0


def _table(site_id: str) -> dict[str, Any]:
    # Four three-phase cars on one feeder that does not bind; the grid connection's 100 A per
    # phase, of which the building may take 60 A.
    table = depot_table(
        4, per_feeder=4, feeder_share=1.0, grid_share=GRID_A / (4 * 32.0), site_id=site_id
    )
    table["nodes"][0]["other_load_max_a"] = BUILDING_MAX_A
    return table


def _reading(node: str, amps: list[float], at: float) -> meter_pb2.NodeLoadSample:
    msg = meter_pb2.NodeLoadSample(node_id=node, current_a=amps)
    msg.sampled_at.FromNanoseconds(int(at * 1e9))
    return msg


def test_readings_that_cannot_be_counted_are_refused_naming_the_field() -> None:
    ctrl, clock = stepped_controller(_table("meter-units"), AcceptingGateway())
    now = clock.now()
    cases = [
        (_reading("nowhere", [1.0, 1.0, 1.0], now), "node_id 'nowhere' is not a node"),
        (_reading("grid", [1.0, 1.0], now), "current_a needs 3 values"),
        (_reading("grid", [1.0, math.inf, 1.0], now), "current_a[1] is not finite"),
        (_reading("grid", [1.0, 1.0, 1.0], now + 3600.0), "ahead of the edge's clock"),
        (meter_pb2.NodeLoadSample(node_id="grid", current_a=[1.0] * 3), "sampled_at is required"),
    ]
    for msg, words in cases:
        with pytest.raises(BadPayload, match=re.escape(words)):
            apply_node_load(ctrl, msg.SerializeToString())
    with pytest.raises(BadPayload, match=r"not a valid evcore\.v1\.NodeLoadSample"):
        apply_node_load(ctrl, b"\xff\xff\xff")
    assert ctrl.state.other_load_a == {}
    # A good one is held with its age; an older one after it is ignored; NaN is kept (that
    # phase counts at its maximum).
    good = _reading("grid", [5.0, math.nan, 7.0], now - 2.0).SerializeToString()
    assert apply_node_load(ctrl, good) == "counted"
    (load, at) = ctrl.state.other_load_a["grid"]
    assert load[0] == 5.0 and math.isnan(load[1]) and load[2] == 7.0
    assert at == pytest.approx(clock.monotonic() - 2.0)
    older = _reading("grid", [50.0, 50.0, 50.0], now - 5.0).SerializeToString()
    assert apply_node_load(ctrl, older) == "older"
    assert ctrl.state.other_load_a["grid"][0][0] == 5.0


def _l1_total(rig: EdgeRig) -> float:
    return float(rig.fleet.terminal_currents()[:, 0].sum())


async def _settled_total(rig: EdgeRig, wait_s: float) -> float:
    """The cars' total on L1 once it stops moving (within 0.5 A over 2 s), after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    last = _l1_total(rig)
    while time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        now = _l1_total(rig)
        if abs(now - last) < 0.5:
            return now
        last = now
    return last


async def test_a_fresh_building_reading_frees_the_room_its_maximum_held(tmp_path: Path) -> None:
    site = "meter-" + uuid.uuid4().hex[:8]
    table = _table(site)
    edge_bus = patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
    meter_bus = patient_nats_bus(site, NATS_URL, tmp_path / "meter-outbox")
    cfg = EdgeConfig(**{**FAST, "stale_after_s": 4.0})
    rig = EdgeRig(table, cfg=cfg)
    await edge_bus.start()
    await meter_bus.start()
    subs: list[Any] = []
    try:
        async with rig:
            ctrl = rig.controller
            assert ctrl is not None
            # The building really draws 10 A per phase at the grid connection.
            other = np.zeros((len(rig.site.nodes), 3))
            other[0] = BUILDING_NOW_A
            rig.physics.other_load_a = other
            subs = await subscribe_signals(edge_bus, ctrl)
            await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
            for cid in rig.fleet.charger_ids:
                rig.fleet.plug_in(cid, EV(soc=0.2))
            await rig.wait_for(
                lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 15, "sessions"
            )
            # No reading: the building counts at its 60 A, the cars share the other 40 A.
            await rig.wait_for(lambda: _l1_total(rig) > 30.0, 20, "the cars charging")
            before = await _settled_total(rig, 15.0)
            assert 30.0 < before <= GRID_A - BUILDING_MAX_A + 0.5, before

            # Readings every 0.5 s: 10 A. The cars take the room up to the 90 A left.
            stop = asyncio.Event()

            async def meter() -> None:
                subject = Subjects(site).node_load("grid")
                while not stop.is_set():
                    reading = _reading("grid", [BUILDING_NOW_A] * 3, time.time())
                    await meter_bus.publish(subject, reading)
                    await asyncio.sleep(0.5)

            task = asyncio.create_task(meter())
            try:
                await rig.wait_for(lambda: "grid" in ctrl.state.other_load_a, 10, "a reading")
                during = await _settled_total(rig, 40.0)
            finally:
                stop.set()
                await task
            assert during > before + 25.0, (before, during)
            assert during <= GRID_A - BUILDING_NOW_A + 0.5, during

            # The meter goes quiet: after stale_after_s the building counts at 60 A again.
            await asyncio.sleep(cfg.stale_after_s)
            await rig.wait_for(lambda: _l1_total(rig) < during - 20.0, 20, "the cars lowered")
            after = await _settled_total(rig, 30.0)
            assert after <= GRID_A - BUILDING_MAX_A + 0.5, (during, after)
            # Against the real currents (the building at 10 A), no limit was ever broken.
            assert rig.physics.samples > 50
            assert rig.physics.violations == 0, rig.physics.violations_by_node
    finally:
        for s in subs:
            await s.stop()
        await meter_bus.close()
        await edge_bus.close()
