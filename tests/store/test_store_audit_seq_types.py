"""SQLite keeps a value of any type in a column declared INTEGER, except a rowid alias: what the
audit tables' ``seq`` columns may hold on a real SQLite file, edited behind the store's back, and
what the store's readers make of it.

- ``audit_records.seq`` is ``INTEGER PRIMARY KEY`` (the rowid): SQLite refuses text or a fraction
  there ("datatype mismatch"), so no stored record has a seq that is not an integer.
- ``audit_head.seq`` (a plain INTEGER column) took text: ``audit_head()`` raised a bare
  ``ValueError`` ("invalid literal for int() with base 10: 'four'"), which ``audit verify`` and
  the edge's audit log took for bad input of theirs; a fraction (4.5) was truncated to 4 unseen.
- ``audit_chargers.seq`` took a fraction: 2.5 was read as seq 2, so ``verify`` found the index
  whole (every row of seq 2 edited so) while ``audit show --charger`` (which joins on seq) no
  longer found decision D2. (Text sorts after every number in SQLite: the index reader's seq
  range never returned such a row, and verify reported the record's index rows as missing.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from audit_testkit import filled_store
from evcore.audit import verify_chain
from evcore.store import StoreError, StoreUnavailable, open_store


def _sql(section: dict[str, object], statement: str) -> None:
    conn = sqlite3.connect(Path(str(section["path"])) / "records.sqlite")
    try:
        conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


async def test_a_record_seq_cannot_hold_anything_but_an_integer(tmp_path: Path) -> None:
    section = await filled_store(tmp_path, 3)
    for value in ("'x'", "1.5", "x'00'"):
        with pytest.raises(sqlite3.IntegrityError, match="datatype mismatch"):
            _sql(section, f"UPDATE audit_records SET seq = {value} WHERE seq = 1")


@pytest.mark.parametrize("value", ["'four'", "4.5", "x'04'"])
async def test_a_head_seq_of_another_type_is_named_not_a_bare_value_error(
    tmp_path: Path, value: str
) -> None:
    section = await filled_store(tmp_path, 5)
    _sql(section, f"UPDATE audit_head SET seq = {value}")
    store = open_store(section, tmp_path)
    try:
        for read in (store.audit_head, lambda: verify_chain(store)):
            with pytest.raises(StoreError) as err:
                await read()
            assert not isinstance(err.value, StoreUnavailable)  # a retry would not help
            message = str(err.value)
            assert "records.sqlite" in message
            assert "audit chain head (table audit_head, id 1): seq column holds" in message
            assert "not an integer (a value of the wrong type)" in message
    finally:
        await store.close()


async def test_a_head_hash_of_another_type_is_named(tmp_path: Path) -> None:
    section = await filled_store(tmp_path, 2)
    _sql(section, "UPDATE audit_head SET hash = CAST(hash AS BLOB)")
    store = open_store(section, tmp_path)
    try:
        with pytest.raises(StoreError, match=r"hash column holds bytes b'.*, not text"):
            await store.audit_head()
    finally:
        await store.close()


async def test_a_charger_index_seq_with_a_fraction_is_no_index_row_of_that_record(
    tmp_path: Path,
) -> None:
    section = await filled_store(tmp_path, 4)
    _sql(section, "UPDATE audit_chargers SET seq = 2.5 WHERE seq = 2")
    store = open_store(section, tmp_path)
    try:
        # What the edit does: decision D2 no longer shows for its chargers.
        shown = await store.audit_records(charger_id="C1")
        assert [r.decision_id for r in shown] == ["D0", "D1", "D3"]
        index = await store.audit_charger_index(after_seq=-1, upto_seq=3)
        assert sorted(index) == [0, 1, 3]
        report = await verify_chain(store)
    finally:
        await store.close()
    assert report.problems == [
        "seq 2: charger index [] differs from the record's chargers ['C1', 'C2', 'C3']"
        " (audit show --charger would mislead)"
    ]
