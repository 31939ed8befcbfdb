"""The edge reads its grid subject with a durable consumer (``signals.GRID_DURABLE``, as
``evcore edge`` does): a curtailment the cloud publishes while the edge is down (a fleet
curtailment's share) applies when it starts; one that ended meanwhile does not. Before, the edge
subscribed live and missed it until the cloud's next re-split.

Against the real NATS server (127.0.0.1:4222), and on the in-process bus.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import SharedBus, patient_nats_bus
from edge_testkit import AcceptingGateway, grid_curtailment, stepped_controller, until
from evcore.bus import Subjects
from evcore.bus.inprocess import InProcessBus
from evcore.edge.signals import GRID_DURABLE, subscribe_signals
from evcore.edge.sitegen import depot_table

pytestmark = pytest.mark.timeout(60)

NATS_URL = "nats://127.0.0.1:4222"


async def _scenario(site: str, edge_bus: Any, new_edge_bus: Any, pub: Any) -> None:
    table = depot_table(2, per_feeder=2, site_id=site)
    subjects = Subjects(site)
    # The edge runs once (its durable is created and reads what is there), then stops.
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    now = clock.now()
    await edge_bus.start()
    subs = await subscribe_signals(edge_bus, ctrl, grid_durable=GRID_DURABLE)
    await pub.publish(
        subjects.grid, grid_curtailment("early", 30.0, now, now + 600.0), critical=True
    )
    await until(lambda: len(ctrl.curtailments) == 1, 10, "the first curtailment, live")
    for s in subs:
        await s.stop()
    await edge_bus.close()
    # While it is down: the share of a fleet curtailment (in force soon), one that ends before
    # the edge is back, and the cancel of the first.
    await pub.publish(
        subjects.grid,
        grid_curtailment("fleet:f1:" + site, 12.0, now + 5.0, now + 900.0),
        critical=True,
    )
    await pub.publish(
        subjects.grid, grid_curtailment("ended", 1.0, now - 600.0, now - 300.0), critical=True
    )
    cancel = grid_curtailment("early", 30.0, now, now + 600.0)
    cancel.curtailment.cancelled = True
    await pub.publish(subjects.grid, cancel, critical=True)
    assert await pub.flush(5.0)
    # The edge starts again (a new controller, as after a restart, on the same durable).
    ctrl2, clock2 = stepped_controller(table, AcceptingGateway())
    await new_edge_bus.start()
    subs2 = await subscribe_signals(new_edge_bus, ctrl2, grid_durable=GRID_DURABLE)
    try:
        await until(
            lambda: "fleet:f1:" + site in {c.signal_id for c in ctrl2.curtailments},
            10,
            "the curtailment published while the edge was down",
        )
        await asyncio.sleep(0.5)  # the rest of what is stored arrives too
        await ctrl2.decide("test")
        assert [c.signal_id for c in ctrl2.curtailments] == ["fleet:f1:" + site]
        assert ctrl2.curtailments.caps_kw(clock2.now(), 10.0) == {"grid": 12.0}
    finally:
        for s in subs2:
            await s.stop()
        await new_edge_bus.close()


async def test_a_curtailment_published_while_the_edge_is_down_applies_when_it_starts(
    tmp_path: Path,
) -> None:
    site = "grid-durable-" + uuid.uuid4().hex[:8]
    pub = patient_nats_bus(site, NATS_URL, tmp_path / "cloud-outbox")
    await pub.start()
    try:
        await _scenario(
            site,
            patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox"),
            patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox"),
            pub,
        )
    finally:
        await pub.delete_streams()  # else each run leaves its site's streams on the server
        await pub.close()


async def test_the_grid_durable_on_the_in_process_bus() -> None:
    """One process, one bus: the edge's consumer stops and a new one resumes on it."""
    site = "grid-durable-inproc"
    bus = InProcessBus(site)
    await bus.start()
    try:
        await _scenario(site, SharedBus(bus), SharedBus(bus), bus)
    finally:
        await bus.close()
