"""A session the store holds open at a charger the site file no longer has.

A charger taken out of the site file (or renamed) while a car charged on it: the restarted edge
read the session back from the store and skipped it without a word. Its car may still draw what
its station's profiles allow, and nothing counts it any more: the operator must hear of it. Now
``recover`` warns, naming the charger, the transaction and when it started.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from evcore.edge.app import charger_states
from evcore.edge.recording import recover
from evcore.store.base import SessionRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ocpp"))
from ocpp_testsite import SITE, open_sqlite


async def test_an_open_session_at_a_charger_no_longer_in_the_site_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_sqlite(tmp_path) as store:
        for cid, tx in (("cp-a", "7"), ("cp-gone", "41")):
            await store.upsert_session(
                SessionRecord(
                    session_id=f"{cid}:{tx}",
                    charger_id=cid,
                    started_at_s=1_800_000_000.0,
                    transaction_id=tx,
                    energy_delivered_kwh=3.5,
                )
            )
        state, _ = charger_states(SITE)  # cp-gone is not in it
        with caplog.at_level(logging.WARNING, logger="evcore.edge"):
            await recover(state, store)
        assert state.chargers["cp-a"].transaction_id == "7"
        named = [r.getMessage() for r in caplog.records if "cp-gone" in r.getMessage()]
        assert named, [r.getMessage() for r in caplog.records]  # before: nothing said
        assert "41" in named[0] and "not in the site" in named[0], named
