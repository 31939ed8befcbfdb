"""Values a record cannot hold, and records the CLI must still show (review 2027-01).

Before: a decision timed in milliseconds taken for seconds (1767225605123 "s", year 57971) was
sealed and committed; from then on ``evcore audit show`` over any period holding it failed ("year
57971 is out of range", exit 2, no decision shown) and ``show --json`` ended in a traceback
(protobuf JSON has no such time). A NaN or infinite setpoint was recorded as "sent nan A" although
no charger can be told it; a NaN or infinite time raised an unexplained "cannot convert float NaN
to integer". A store holding a text payload (SQLite takes one) made ``verify`` and ``show`` end in
a TypeError traceback.

Now: the audit log refuses such a decision with a ``ValueError`` naming it, before anything is
written (so, as for any record that cannot be made durable, none of its setpoints leave); a record
stored with such a time (by an older version) is shown, its time said in words; an unexpected
failure inside the store's reader is one line on stderr and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from audit_testkit import decision, fill, filled_store, raw_sql, run_cli, site_file
from evcore.audit import AuditLog, Decision, seal, verify_chain
from evcore.audit.log import build_record
from evcore.clock import ManualClock
from evcore.store import SqlStore
from evcore.v1.setpoint_pb2 import Setpoint

MS_FOR_S = 1_767_225_605_123.0  # 2026-01-01T00:00:05.123Z in milliseconds


def sp(value: float, **kw: Any) -> Setpoint:
    return Setpoint(charger_id="C1", setpoint_a=value, reason="held at 16 A: F2 L1", **kw)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (Decision("T1", "tick", decided_at_s=MS_FOR_S, setpoints=[sp(16)]), "within years 1..9999"),
        (Decision("T2", "tick", decided_at_s=float("nan"), setpoints=[sp(16)]), "time nan"),
        (Decision("T3", "tick", decided_at_s=float("inf"), setpoints=[sp(16)]), "time inf"),
        (Decision("T4", "tick", setpoints=[sp(float("nan"))]), "setpoint_a is nan, not a finite"),
        (
            Decision("T5", "tick", setpoints=[Setpoint(charger_id="C9", setpoint_w=float("-inf"))]),
            "'C9': setpoint_w is -inf, not a finite",
        ),
        (
            {"decision": 7, "at": MS_FOR_S, "trigger": "tick", "setpoints": []},
            "decision 7: 'at': time 1767225605123.0",
        ),
        (
            {
                "decision": 8,
                "at": 1_767_225_605.0,
                "trigger": "tick",
                "setpoints": [{"charger_id": "C1", "new": 16, "valid_to": float("inf")}],
            },
            "setpoint for 'C1': 'valid_to': time inf",
        ),
    ],
    ids=["ms-for-s", "nan-time", "inf-time", "nan-A", "inf-W", "mapping-ms", "mapping-valid-to"],
)
async def test_a_decision_no_record_can_hold_is_refused_and_nothing_written(
    store: SqlStore, bad: Any, said: str
) -> None:
    log = AuditLog(store, clock=ManualClock())
    with pytest.raises(ValueError) as caught:
        await log.append(bad)
    assert said in str(caught.value)
    assert await store.audit_head() is None and await store.audit_records() == []
    # The log goes on with the next decision.
    assert (await log.append(decision(0))).seq == 0


def test_a_sealed_record_with_such_a_time_is_refused_too() -> None:
    record = build_record(decision(1), now_s=1_767_225_605.0)
    record.setpoints[0].valid_until.seconds = int(MS_FOR_S)
    with pytest.raises(ValueError, match="'C1': valid_until 1767225605123 s since 1970 is outside"):
        build_record(record)


async def test_show_still_shows_a_stored_record_with_a_time_out_of_range(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    clock = ManualClock()
    await fill(store, clock, 2)
    # As an older version wrote it: sealed and committed with a time in milliseconds.
    head = await store.audit_head()
    assert head is not None
    record = build_record(decision(2), now_s=clock.now())
    record.decided_at.seconds = int(MS_FOR_S)
    record.setpoints[0].valid_until.seconds = -int(MS_FOR_S)
    late = seal(record, seq=head.seq + 1, prev_hash=head.hash)
    await store.append_audit(late)
    assert (await verify_chain(store)).ok  # a true record of what was decided

    site = str(site_file(tmp_path, store_section))
    code, out, err = await run_cli("show", "--config", site)
    assert code == 0, err
    assert "decision D0" in out and "decision D1" in out
    assert "#2 1767225605123.000s-since-1970(not-a-calendar-time) decision D2" in out

    code, out, err = await run_cli("show", "--config", site, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert [d["decision_id"] for d in shown] == ["D0", "D1", "D2"]
    assert shown[2]["decided_at"] == (
        "not a valid time: 1767225605123 s 0 ns since 1970-01-01T00:00:00Z"
    )
    assert shown[2]["setpoints"][0]["valid_until"].startswith("not a valid time: -1767225605123 s")
    assert shown[2]["setpoints"][0]["setpoint_a"] == 16.0
    assert shown[1]["decided_at"] == "2026-01-01T00:00:20Z"


async def test_a_store_holding_a_text_payload_is_said_in_one_line(tmp_path: Path) -> None:
    section = await filled_store(tmp_path, 3)
    raw_sql(section, tmp_path, "UPDATE audit_records SET payload = 'forged' WHERE seq = 1")
    code, out, err = await run_cli("show", "--store", str(tmp_path / "store"))
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert err.strip() == (
        "evcore audit: show failed reading the store: "
        "TypeError: string argument without an encoding"
    )
    # verify names the record (test_audit_verify_forged.py): a broken chain, not an unreadable store
    code, out, err = await run_cli("verify", "--store", str(tmp_path / "store"))
    assert code == 1, (out, err)
    assert "seq 1: payload column holds str 'forged', not bytes" in out
