"""Faults the edge marks and the plans it makes reach the bus (``evcore.edge.publishing``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.bus import BusMessage
from evcore.bus.inprocess import InProcessBus
from evcore.clock import ManualClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import PlanTargets
from evcore.edge.coreio import RustCore
from evcore.edge.publishing import EdgePublisher
from evcore.edge.signals import plan_from_proto
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.v1 import plan_pb2, status_pb2


class _Gateway:
    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        raise AssertionError("nothing is sent here")


async def test_a_fault_and_a_local_plan_are_published_and_a_cloud_plan_is_not() -> None:
    table = depot_table(2, per_feeder=2, site_id="pub-site")
    clock = ManualClock()
    ctrl = build_controller(
        table,
        core=RustCore(load_site(table), table),
        gateway=_Gateway(),  # type: ignore[arg-type]
        clock=clock,
        cfg=EdgeConfig(),
    )
    bus = InProcessBus("pub-site", clock=clock)
    await bus.start()
    got: list[BusMessage] = []

    async def collect(msg: BusMessage) -> None:
        got.append(msg)

    await bus.subscribe("evcore.pub-site.status.*", collect)
    await bus.subscribe("evcore.pub-site.plan", collect)
    seen_faults: list[tuple[str, str]] = []
    ctrl.on_fault = lambda cid, why: seen_faults.append((cid, why))
    pub = EdgePublisher(bus, "pub-site", ctrl, clock)
    pub.install()

    async def delivered(n: int) -> None:
        """Published, flushed, and (up to 0.2 s) ``n`` messages delivered to the subscribers."""
        await pub.drain()
        await bus.flush()
        for _ in range(20):
            if len(got) >= n:
                break
            await asyncio.sleep(0.01)

    try:
        # The controller marks cp-0001 faulted (as check_ignored does) and reports it.
        c = ctrl.state.chargers["cp-0001"]
        c.faulted = True
        c.fault_reason = "draws 30 A above its 6 A profile for 60 s"
        ctrl._report_fault(c)
        now = clock.now()
        local = PlanTargets(
            "local", "edge-plan-7@7", now, {"cp-0002": [(now, 900.0, 10.0), (now + 900, 900.0, 0)]}
        )
        ctrl.set_plan(local)
        ctrl.set_plan(PlanTargets("cloud", "cloud-1@1", now, {"cp-0002": [(now, 900.0, 8.0)]}))
        await delivered(2)
        assert seen_faults == [("cp-0001", c.fault_reason)]  # the earlier hook still runs
        status = [
            status_pb2.ChargerStatus.FromString(m.data)
            for m in got
            if m.subject == "evcore.pub-site.status.cp-0001"
        ]
        assert len(status) == 1
        assert status[0].faulted_by_edge and status[0].fault_reason == c.fault_reason
        plans = [m for m in got if m.subject == "evcore.pub-site.plan"]
        assert len(plans) == 1  # the local one only
        plan = plan_pb2.Plan.FromString(plans[0].data)
        assert plan.source == "edge" and plan.plan_version == 7
        assert [(r.charger_id, r.step_s, r.target_a) for r in plan.rows] == [
            ("cp-0002", 900.0, 10.0),
            ("cp-0002", 900.0, 0.0),
        ]
        # Read back, it is the edge's own plan (the edge's subscriber applies cloud plans only).
        back = plan_from_proto(plans[0].data, now, lambda cid: cid in ctrl.state.chargers)
        assert back.source == "local" and back.rows == local.rows
        assert pub.failures == 0
        # An operator clears the fault: the bus hears it is no longer faulted, and why.
        was = ctrl.clear_fault("cp-0001", "by alice: contactor replaced")
        assert was == "draws 30 A above its 6 A profile for 60 s" and not c.faulted
        with pytest.raises(ValueError, match="not faulted"):
            ctrl.clear_fault("cp-0001")
        await delivered(4)
        status = [
            status_pb2.ChargerStatus.FromString(m.data)
            for m in got
            if m.subject == "evcore.pub-site.status.cp-0001"
        ]
        assert len(status) == 2 and not status[1].faulted_by_edge
        assert status[1].fault_reason == "cleared: by alice: contactor replaced"
    finally:
        await bus.close()


async def test_a_fault_status_the_bus_refuses_once_is_published_again() -> None:
    """Review 2026-12-05: a critical fault status whose publish failed once (the outbox's disk
    full) was dropped. Now it is tried again under the same event id until the bus takes it."""

    class RefusesOnce:
        site_id = "pub-site"

        def __init__(self) -> None:
            self.tries: list[str] = []
            self.taken: list[tuple[str, str]] = []

        async def publish(
            self, subject: str, payload: bytes, *, event_id: str, critical: bool = False
        ) -> str:
            self.tries.append(event_id)
            if len(self.tries) == 1:
                raise OSError(28, "database or disk is full")
            self.taken.append((subject, event_id))
            return event_id

    table = depot_table(2, per_feeder=2, site_id="pub-site")
    clock = ManualClock()
    ctrl = build_controller(
        table,
        core=RustCore(load_site(table), table),
        gateway=_Gateway(),  # type: ignore[arg-type]
        clock=clock,
        cfg=EdgeConfig(),
    )
    bus = RefusesOnce()
    pub = EdgePublisher(bus, "pub-site", ctrl, clock)
    pub.install()
    ctrl.on_fault("cp-0001", "ignores its profile")
    await pub.drain(timeout_s=10.0)
    assert bus.taken == [("evcore.pub-site.status.cp-0001", bus.tries[0])]
    assert len(bus.tries) == 2 and bus.tries[0] == bus.tries[1]  # one event id: no duplicate
    assert pub.failures == 1 and pub.published == 1
