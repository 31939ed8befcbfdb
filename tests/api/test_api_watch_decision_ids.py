"""A change on the watch names its decision as the audit trail does (review of the API room,
2026-12-06): ``WatchChanges`` gave the controller's decision counter ("24") while ``ListDecisions``
has the recorder's id ("edge-09bc27a0-24-1796564196051"), so a client watching changes could not
fetch the reason for one. Real ``EdgeApp`` (controller on the Rust core, central system, simulated
stations, SQLite store with its audit recorder), real gRPC socket."""

from __future__ import annotations

import asyncio

from evcore.v1 import edge_api_pb2 as pb
from test_api_live_edge import OPERATOR, VIEWER, LiveEdge, auth, live  # noqa: F401  (fixture)


async def test_a_watched_change_names_the_decision_list_decisions_has(
    live: LiveEdge,  # noqa: F811
) -> None:
    target = live.plugged[0]
    watch = live.stub.WatchChanges(pb.WatchChangesRequest(charger_id=target), metadata=auth(VIEWER))
    seen: list[pb.Change] = []

    async def read_watch() -> None:
        async for change in watch:
            seen.append(change)

    reader = asyncio.create_task(read_watch())
    try:
        await asyncio.wait_for(watch.initial_metadata(), 10)  # attached
        await live.stub.SetChargerAvailability(
            pb.SetChargerAvailabilityRequest(charger_id=target, available=False, reason="ids"),
            metadata=auth(OPERATOR),
        )
        await live.rig.wait_for(
            lambda: any(
                c.kind == "setpoint" and c.HasField("setpoint_a") and c.setpoint_a == 0.0
                for c in seen
            ),
            30,
            "the 0 A setpoint on the change stream",
        )
        zero = next(c for c in seen if c.kind == "setpoint" and c.setpoint_a == 0.0)
        records = await live.stub.ListDecisions(
            pb.ListDecisionsRequest(charger_id=target, limit=20), metadata=auth(VIEWER)
        )
        audited = {d.decision_id: d for d in records.decisions}
        assert zero.decision_id in audited, (zero.decision_id, sorted(audited))
        (sp,) = [s for s in audited[zero.decision_id].setpoints if s.charger_id == target]
        assert sp.setpoint_a == 0.0 and sp.reason, sp
        # The "decision" changes name the audit trail's ids as well.
        decided = [c.decision_id for c in seen if c.kind == "decision"]
        assert decided and zero.decision_id in decided, decided
        every = await live.stub.ListDecisions(
            pb.ListDecisionsRequest(limit=200), metadata=auth(VIEWER)
        )
        assert set(decided) <= {d.decision_id for d in every.decisions}, decided
    finally:
        watch.cancel()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
