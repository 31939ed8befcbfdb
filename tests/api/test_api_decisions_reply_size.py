"""ListDecisions on a site of many chargers, over a real socket (review of the API room,
2026-12-06): a decision's audit record holds a setpoint and a reason per charger, so on a site of
200 chargers a record is about 20 kB and ``limit`` = 1000 (which the API allows) asked for some
20 MB. Before, the server sent it all and the client, which takes 4 MiB by default, failed with
RESOURCE_EXHAUSTED: the NOC could not read the decisions at all. Now a reply holds the newest
records that fit in 3.5 MiB and says in its trailing metadata how many more there were, and
``before_seq`` pages back through the rest (before it, the records past the first reply could not
be reached at all).
"""

from __future__ import annotations

from pathlib import Path

from evcore.audit import AuditLog, Decision
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1.setpoint_pb2 import Setpoint
from test_api_edge import VIEWER, auth, serving

CHARGERS = 200
DECISIONS = 300
#: What a gRPC client takes by default.
CLIENT_MAX_BYTES = 4 * 1024 * 1024
REASON = "held at 16 A: feeder F2 phase L1 at 63 of 63 A, fair share of 40 sessions"


async def test_many_large_decisions_come_back_as_many_as_fit(tmp_path: Path) -> None:
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    async with serving(store, tmp_path) as edge:
        log = AuditLog(store, clock=edge.clock)
        setpoints = [
            Setpoint(charger_id=f"C{i:03d}", setpoint_a=16.0, reason=REASON)
            for i in range(CHARGERS)
        ]
        for i in range(DECISIONS):
            edge.clock.advance(1)
            await log.append(Decision(f"big-{i}", "tick", setpoints=setpoints))
        call = edge.stub.ListDecisions(pb.ListDecisionsRequest(limit=1000), metadata=auth(VIEWER))
        reply = await call  # before: RESOURCE_EXHAUSTED (about 6 MB for a 4 MiB client)
        got = [d.decision_id for d in reply.decisions]
        assert reply.ByteSize() <= CLIENT_MAX_BYTES
        assert 0 < len(got) < DECISIONS + 3
        # The newest ones, in order, none skipped.
        assert got == [f"big-{i}" for i in range(DECISIONS - 1, DECISIONS - 1 - len(got), -1)]
        trailers = dict(await call.trailing_metadata() or ())
        assert int(trailers["evcore-decisions-left-out"]) == DECISIONS + 3 - len(got)

        # A reply that fits says nothing more.
        small = edge.stub.ListDecisions(pb.ListDecisionsRequest(limit=5), metadata=auth(VIEWER))
        assert len((await small).decisions) == 5
        assert "evcore-decisions-left-out" not in dict(await small.trailing_metadata() or ())

        # Paging back: before_seq = the smallest seq received; every record once, newest first.
        seqs = [d.seq for d in reply.decisions]
        for _ in range(DECISIONS):
            page = await edge.stub.ListDecisions(
                pb.ListDecisionsRequest(limit=1000, before_seq=min(seqs)), metadata=auth(VIEWER)
            )
            if not page.decisions:
                break
            assert page.ByteSize() <= CLIENT_MAX_BYTES
            seqs += [d.seq for d in page.decisions]
        assert seqs == sorted(seqs, reverse=True)
        assert len(seqs) == len(set(seqs)) == DECISIONS + 3
        # With a charger filter and a small limit as well.
        one = await edge.stub.ListDecisions(
            pb.ListDecisionsRequest(charger_id="C007", limit=2, before_seq=seqs[10]),
            metadata=auth(VIEWER),
        )
        assert [d.seq for d in one.decisions] == seqs[11:13]
