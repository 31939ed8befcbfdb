"""``ListDecisions`` with a ``before_seq`` beyond any seq, over a real socket, on both stores.

``before_seq`` is a uint64; a client starting to page "from the top" may well send its largest
value. Before, anything from 2**63 on reached the store as it was: SQLite could not bind it
("OverflowError: Python int too large to convert to SQLite INTEGER") and the call was INTERNAL,
logged as a bug. No seq reaches 2**63 - 1, so every such bound now reads as no bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from test_api_edge import VIEWER, auth, serving


@pytest.mark.parametrize("before_seq", [2**63 - 1, 2**63, 2**64 - 1])
async def test_a_before_seq_beyond_every_seq_is_no_bound(
    store_section: dict[str, object], tmp_path: Path, before_seq: int
) -> None:
    async with serving(open_store(store_section, tmp_path), tmp_path) as edge:
        md = auth(VIEWER)
        every = await edge.stub.ListDecisions(pb.ListDecisionsRequest(), metadata=md)
        assert len(every.decisions) == 3
        top = await edge.stub.ListDecisions(
            pb.ListDecisionsRequest(before_seq=before_seq), metadata=md
        )
        assert [d.decision_id for d in top.decisions] == [d.decision_id for d in every.decisions]
        # Paging on from there reaches the rest (here: the two older ones).
        (newest,) = (
            await edge.stub.ListDecisions(
                pb.ListDecisionsRequest(before_seq=before_seq, limit=1), metadata=md
            )
        ).decisions
        rest = await edge.stub.ListDecisions(
            pb.ListDecisionsRequest(before_seq=newest.seq), metadata=md
        )
        assert [d.decision_id for d in rest.decisions] == [
            d.decision_id for d in every.decisions[1:]
        ]
