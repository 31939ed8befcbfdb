"""A store migrated by a newer evcore, opened by an older one (a release rolled back): said at
open, naming the migrations this version does not know, on both stores. Before, it opened
without a word, and the first write the newer schema refused (a column the older code does not
fill) failed as a bug, far from its cause."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from evcore.store import SessionRecord, open_store

T0 = 1_767_225_600.0


async def test_a_store_a_newer_evcore_migrated_is_named_at_open(
    store_section: dict[str, object], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newer = open_store(store_section, tmp_path)
    await newer.open()
    newest = newer._records.migrations()
    await newer.upsert_session(SessionRecord("S1", "C1", T0))
    await newer.close()

    older = open_store(store_section, tmp_path)
    for backend in (older._records, older._telemetry):  # PostgreSQL: both run the one list
        if backend.migrations() is newest:
            backend.migrations = lambda: newest[:-1]  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="evcore.store"):
        await older.open()
    try:
        last = newest[-1]
        said = [r.getMessage() for r in caplog.records if "newer evcore" in r.getMessage()]
        assert len(said) == 1, said
        assert f"migration(s) {last.version} ({last.name})" in said[0]
        assert f"knows up to {newest[-2].version}" in said[0]
        assert older._records.newer_migrations == [(last.version, last.name)]
        # Opened all the same (an edge that cannot open its store does not control).
        assert (await older.get_session("S1")) is not None
    finally:
        await older.close()
