"""``evcore audit verify`` on forgeries that slipped past it (review 2027-01): a NaN time column
on PostgreSQL was taken as equal to the record's time (``abs(nan) > 1e-6`` is false) while it hid
the decision from ``audit show --until``; a forged ``prev_hash`` that is not ASCII made the hash
computation raise, so verify said "store cannot be read" (exit 2) instead of "chain broken" (1).

Real stores (SQLite and PostgreSQL), tampered with through a second connection; verify through
``evcore audit`` in a subprocess, as an operator runs it."""

from __future__ import annotations

from pathlib import Path

from audit_testkit import cli_verify, fill, filled_store, forge, raw_sql
from evcore.audit import verify_chain
from evcore.clock import ManualClock
from evcore.store import SqlStore, open_store
from pg_testkit import PG_DSN


async def test_a_nan_time_column_is_reported_and_no_longer_hides_a_decision(
    pg_schema: str, tmp_path: Path
) -> None:
    section: dict[str, object] = {"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema}
    store = open_store(section, tmp_path)
    try:
        await fill(store, ManualClock(), 3)
        raw_sql(section, tmp_path, "UPDATE audit_records SET decided_at_s = 'NaN' WHERE seq = 1")
        # What the forgery does: decision D1 is no longer found before any time.
        shown = await store.audit_records(until_s=4_000_000_000.0)
        assert [r.decision_id for r in shown] == ["D0", "D2"]
        report = await verify_chain(store)
    finally:
        await store.close()
    assert not report.ok
    assert report.problems == ["seq 1: time column differs from the record's decided_at"]
    code, result, err = await cli_verify(section, tmp_path)
    assert code == 1, err
    assert result["problems"] == ["seq 1: time column differs from the record's decided_at"]


async def test_a_forged_prev_hash_that_is_not_ascii_is_a_broken_chain(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    records = await fill(store, ManualClock(), 3)
    forge(store_section, tmp_path, records[2], lambda r: setattr(r, "prev_hash", "é" * 64))
    report = await verify_chain(store)
    assert not report.ok
    assert any(p.startswith("seq 2 (decision 'D2'): content changed") for p in report.problems)
    code, result, err = await cli_verify(store_section, tmp_path)
    assert code == 1, err  # broken, not "cannot be read" (2)
    assert result["ok"] is False and result["records"] == 3


async def test_a_column_holding_a_value_of_the_wrong_type_is_named_by_its_seq(
    tmp_path: Path,
) -> None:
    """SQLite keeps what it is given: text in the REAL time column, text in the BLOB payload
    column, a blob in the TEXT hash column. Before, the row reader raised on the first ("could
    not convert string to float: 'yesterday'") and verify said the whole store could not be read
    (exit 2); now each is a problem of its record, by seq, and the rest of the chain is checked."""
    section = await filled_store(tmp_path, 5)
    raw_sql(section, tmp_path, "UPDATE audit_records SET decided_at_s = 'yesterday' WHERE seq = 1")
    raw_sql(section, tmp_path, "UPDATE audit_records SET payload = 'forged' WHERE seq = 2")
    raw_sql(section, tmp_path, "UPDATE audit_records SET hash = CAST(hash AS BLOB) WHERE seq = 3")
    code, result, err = await cli_verify(section, tmp_path)
    assert code == 1, err  # broken, not "cannot be read" (2)
    assert result["ok"] is False and result["records"] == 5
    problems = result["problems"]
    assert isinstance(problems, list) and len(problems) == 4, problems
    assert problems[0] == (
        "seq 1: time column holds str 'yesterday', not a number (a value of the wrong type)"
    )
    assert problems[1] == (
        "seq 2: payload column holds str 'forged', not bytes (a value of the wrong type)"
    )
    assert problems[2].startswith("seq 3: hash column holds bytes b'")
    assert problems[2].endswith("not text (a value of the wrong type)")
    assert problems[3].startswith("seq 4: prev_hash does not match the hash of the record before")
