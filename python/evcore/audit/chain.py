"""The audit hash chain: canonical bytes, sealing a record, and verifying a stored chain.

A record's hash is ``sha256(DOMAIN || canonical(record with hash = "") || "\\n" || prev_hash)`` as
lowercase hex, where ``canonical`` is the deterministic protobuf encoding of the record: fields in
field-number order, default values omitted, no map fields in the message, unknown fields kept as
received. That is the encoding every protobuf runtime writes for these messages, and it costs well
under a millisecond for a thousand setpoints (a JSON form cost ~45 ms, on the control path). The
record carries ``prev_hash`` itself, so every record commits to the whole chain before it; the head
(last seq and hash) is stored apart from the records, so a removed tail is detected too.

This module never repairs a chain; it reports what is wrong, record by record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from evcore.store.base import AuditHead, Store, StoredAuditRow
from evcore.store.sql import audit_charger_ids
from evcore.v1.audit_pb2 import AuditRecord

DOMAIN = b"evcore.audit.v1\n"
# Problems listed before the report stops adding detail (the count stays exact).
MAX_PROBLEMS = 100


def canonical_bytes(record: AuditRecord) -> bytes:
    """The bytes the hash covers: the record without its ``hash``, deterministically encoded."""
    if not record.hash:
        return record.SerializeToString(deterministic=True)
    unsealed = AuditRecord()
    unsealed.CopyFrom(record)
    unsealed.hash = ""
    return unsealed.SerializeToString(deterministic=True)


def record_hash(record: AuditRecord) -> str:
    h = hashlib.sha256()
    h.update(DOMAIN)
    h.update(canonical_bytes(record))
    h.update(b"\n")
    # A real prev_hash is hex, the same bytes in ASCII and UTF-8; UTF-8 also takes the text of a
    # forged one, so verify reports it as a changed record instead of failing as unreadable.
    h.update(record.prev_hash.encode("utf-8"))
    return h.hexdigest()


def seal(record: AuditRecord, *, seq: int, prev_hash: str) -> AuditRecord:
    """A copy of ``record`` placed after ``prev_hash`` at ``seq``, with its hash set."""
    sealed = AuditRecord()
    sealed.CopyFrom(record)
    sealed.seq = seq
    sealed.prev_hash = prev_hash
    sealed.ClearField("hash")
    sealed.hash = record_hash(sealed)
    return sealed


@dataclass
class VerifyReport:
    """What ``evcore audit verify`` found."""

    records: int = 0
    head: AuditHead | None = None
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def summary(self) -> str:
        head = "none" if self.head is None else f"seq {self.head.seq} {self.head.hash[:16]}…"
        if self.ok:
            return f"audit chain OK: {self.records} records, head {head}"
        return (
            f"audit chain BROKEN: {self.problem_count} problem(s) in {self.records} records, "
            f"head {head}"
        )


async def verify_chain(store: Store, *, batch: int = 1000) -> VerifyReport:
    """Check every stored record against its hash, its predecessor and the head."""
    report = VerifyReport()
    # Read the head first: records appended while we verify are then beyond it, not a mismatch.
    report.head = await store.audit_head()
    expected_seq = 0
    prev_hash = ""
    last_seq = -1
    last_hash = ""
    after = -1
    done = False
    while not done:
        rows = await store.audit_rows(after_seq=after, limit=batch)
        if not rows:
            break
        batch_after = after
        chargers: dict[int, list[str]] = {}
        for row in rows:
            after = row.seq
            if report.head is not None and row.seq > report.head.seq:
                done = True  # appended after we read the head
                break
            report.records += 1
            if row.seq > expected_seq:
                missing = (
                    f"seq {expected_seq}"
                    if row.seq == expected_seq + 1
                    else f"seq {expected_seq}..{row.seq - 1}"
                )
                report.add(f"{missing}: record(s) removed (next stored record is seq {row.seq})")
            record = _check_row(report, row, prev_hash)
            if record is not None:
                chargers[row.seq] = audit_charger_ids(record)
            prev_hash = row.hash
            expected_seq = row.seq + 1
            last_seq, last_hash = row.seq, row.hash
        if chargers:
            # `audit show --charger` finds decisions through this index: an edited index would
            # hide a decision from (or pin it on) a charger while every hash still holds.
            index = await store.audit_charger_index(after_seq=batch_after, upto_seq=max(chargers))
            for seq, want in chargers.items():
                got = index.get(seq, [])
                if got != want:
                    report.add(
                        f"seq {seq}: charger index {got} differs from the record's chargers "
                        f"{want} (audit show --charger would mislead)"
                    )
    head = report.head
    if head is not None:
        # Rows past the head that no append put there (an append moves the head in the same
        # transaction as its row, so a head read AFTER the rows covers every real one): they
        # would show in `audit show` while outside the chain.
        beyond = await store.audit_rows(after_seq=head.seq, limit=batch)
        head_now = await store.audit_head()
        last_real = -1 if head_now is None else head_now.seq
        stray = [r.seq for r in beyond if r.seq > last_real]
        if stray:
            report.add(
                f"seq {stray[0]}: {len(stray)} record(s) after the head (seq {last_real}), "
                "outside the chain (inserted behind its back)"
            )
    if head is None:
        if report.records:
            report.add("chain head is missing but records exist (head table emptied)")
    elif report.records == 0:
        report.add(f"no records, but the head says seq {head.seq}: every record was removed")
    else:
        if head.seq != last_seq:
            report.add(f"truncated: head says seq {head.seq}, last stored record is seq {last_seq}")
        elif head.hash != last_hash:
            report.add(f"seq {last_seq}: hash differs from the stored head (last record replaced)")
    return report


def _check_row(report: VerifyReport, row: StoredAuditRow, prev_hash: str) -> AuditRecord | None:
    """Check one row; returns the parsed record (None when it does not parse)."""
    seq = row.seq
    # A column holding a value of another type (SQLite keeps one) is reported here, by seq, and
    # not compared again below; the chain goes on.
    bad = {problem.split(" column ", 1)[0] for problem in row.problems}
    for problem in row.problems:
        report.add(f"seq {seq}: {problem}")
    if "payload" in bad:
        return None
    record = AuditRecord()
    try:
        record.ParseFromString(row.payload)
    except DecodeError as exc:
        report.add(f"seq {seq}: payload does not parse as an AuditRecord ({exc})")
        return None
    if record.seq != seq:
        report.add(f"seq {seq}: record says seq {record.seq}")
    if "decision id" not in bad and record.decision_id != row.decision_id:
        report.add(
            f"seq {seq}: decision id column {row.decision_id!r} ≠ record {record.decision_id!r}"
        )
    if not bad & {"hash", "prev_hash"} and (
        record.hash != row.hash or record.prev_hash != row.prev_hash
    ):
        report.add(f"seq {seq}: hash columns differ from the record")
    decided_at_s = record.decided_at.seconds + record.decided_at.nanos / 1e9
    # Written so that a NaN column (PostgreSQL keeps one; it sorts above every time, so the
    # decision drops out of `audit show --until`) is a difference too: NaN compares false.
    if "time" not in bad and not abs(decided_at_s - row.decided_at_s) <= 1e-6:
        report.add(f"seq {seq}: time column differs from the record's decided_at")
    computed = record_hash(record)
    if computed != record.hash:
        report.add(f"seq {seq} (decision {record.decision_id!r}): content changed, hash mismatch")
    if record.prev_hash != prev_hash:
        report.add(
            f"seq {seq}: prev_hash does not match the hash of the record before it "
            "(a record before it was removed or replaced)"
        )
    return record
