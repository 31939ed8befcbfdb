"""UploadAudit over a real mTLS socket into the cloud store (SQLite and PostgreSQL): repeats kept
once, gaps held and closed, the chain checked at every link, a tampered record refused by seq."""

from __future__ import annotations

import grpc
import pytest
from cloud_testkit import Cloud, chain, stream
from evcore.audit.chain import record_hash, seal
from evcore.cloud.service import CONTIGUOUS_COUNT_KEY
from evcore.v1 import cloud_api_pb2 as pb
from evcore.v1.audit_pb2 import AuditRecord, ChargerBinding
from evcore.v1.setpoint_pb2 import Setpoint


async def _upload(
    cloud: Cloud, site: str, records: list[AuditRecord]
) -> tuple[pb.UploadAck, dict[str, str]]:
    async with cloud.channel(site) as ch:
        call = cloud.stub(ch).UploadAudit(stream(records))
        ack = await call
        trailing = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
    return ack, trailing


async def test_two_streams_with_a_repeat_and_a_gap(cloud: Cloud) -> None:
    records = chain(10)
    # First stream: 0..3 and 6..7 (4 and 5 not yet sent).
    ack, trailing = await _upload(cloud, "depot-1", records[0:4] + records[6:8])
    assert (ack.stored_count, ack.duplicate_count, ack.contiguous_seq) == (6, 0, 3)
    assert ack.contiguous_count == 4
    assert trailing[CONTIGUOUS_COUNT_KEY] == "4"
    assert ack.stored_at.seconds == int(cloud.clock.now())
    # Second stream, at least once and out of order: 2 and 3 again, then 5, 4, 9, 8.
    second = [records[2], records[3], records[5], records[4], records[9], records[8]]
    ack, trailing = await _upload(cloud, "depot-1", second)
    assert (ack.stored_count, ack.duplicate_count, ack.contiguous_seq) == (4, 2, 9)
    assert ack.contiguous_count == 10
    assert trailing[CONTIGUOUS_COUNT_KEY] == "10"
    held = await cloud.store.audit_records("depot-1")
    assert [r.seq for r in held] == list(range(10))
    assert [r.hash for r in held] == [r.hash for r in records]
    assert all(record_hash(r) == r.hash for r in held)
    # The other site holds nothing of it.
    assert await cloud.store.audit_records("depot-2") == []
    assert await cloud.store.contiguous_seq("depot-2") == -1


async def test_a_gap_at_the_start_reports_no_contiguous_records(cloud: Cloud) -> None:
    records = chain(4)
    ack, trailing = await _upload(cloud, "depot-1", records[1:4])
    # seq 0 not held: contiguous_seq 0 cannot say so, contiguous_count 0 does.
    assert (ack.stored_count, ack.contiguous_seq, ack.contiguous_count) == (3, 0, 0)
    assert trailing[CONTIGUOUS_COUNT_KEY] == "0"
    # Only seq 0 held: the same contiguous_seq 0, but a count of 1.
    ack, trailing = await _upload(cloud, "depot-2", records[0:1])
    assert (ack.stored_count, ack.contiguous_seq, ack.contiguous_count) == (1, 0, 1)
    ack, trailing = await _upload(cloud, "depot-1", records[0:1])
    assert (ack.stored_count, ack.contiguous_seq, ack.contiguous_count) == (1, 3, 4)
    assert trailing[CONTIGUOUS_COUNT_KEY] == "4"


async def _refused(cloud: Cloud, records: list[AuditRecord]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _upload(cloud, "depot-1", records)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value


async def test_a_tampered_record_is_refused_by_seq_and_the_earlier_ones_are_kept(
    cloud: Cloud,
) -> None:
    records = chain(6)
    tampered = AuditRecord()
    tampered.CopyFrom(records[3])
    tampered.setpoints[0].setpoint_a = 32.0  # content changed after sealing, hash kept
    err = await _refused(cloud, [*records[0:3], tampered, *records[4:6]])
    details = err.details() or ""
    assert details.startswith("seq 3:"), details
    assert "does not match the record's content" in details
    assert "3 record(s) before it were stored" in details
    trailing = {k: str(v) for k, v in err.trailing_metadata() or ()}
    assert trailing["evcore-refused-seq"] == "3"
    assert trailing[CONTIGUOUS_COUNT_KEY] == "3"
    held = await cloud.store.audit_records("depot-1")
    assert [r.seq for r in held] == [0, 1, 2]  # 4 and 5 came after it in the stream: not stored
    # The true record 3 closes the chain afterwards.
    ack, _ = await _upload(cloud, "depot-1", records[3:6])
    assert (ack.stored_count, ack.duplicate_count, ack.contiguous_seq) == (3, 0, 5)


async def test_a_resealed_record_breaks_the_link_to_its_held_neighbours(cloud: Cloud) -> None:
    records = chain(6)
    ack, _ = await _upload(cloud, "depot-1", records[0:3] + records[4:6])
    assert ack.stored_count == 5
    # A forged seq 3 with a correct hash of its own content, but sealed onto another predecessor.
    forged = seal(records[3], seq=3, prev_hash="0" * 64)
    err = await _refused(cloud, [forged])
    assert (err.details() or "").startswith("seq 3: prev_hash"), err.details()
    assert "held seq 2" in (err.details() or "")
    # Sealed onto the right predecessor but changed: its hash is not what seq 4 links to.
    changed = AuditRecord()
    changed.CopyFrom(records[3])
    changed.trigger = "grid:forged"
    changed = seal(changed, seq=3, prev_hash=records[2].hash)
    err = await _refused(cloud, [changed])
    assert (err.details() or "").startswith("seq 3: hash"), err.details()
    assert "prev_hash of the held seq 4" in (err.details() or "")
    # Another record at a held seq is a fork, not a repeat.
    fork = AuditRecord()
    fork.CopyFrom(records[1])
    fork.trigger = "tick-forged"
    fork = seal(fork, seq=1, prev_hash=records[0].hash)
    err = await _refused(cloud, [fork])
    assert (err.details() or "").startswith("seq 1: another record is held"), err.details()
    assert [r.seq for r in await cloud.store.audit_records("depot-1")] == [0, 1, 2, 4, 5]
    assert await cloud.store.contiguous_seq("depot-1") == 2


async def test_a_first_record_with_a_prev_hash_is_refused(cloud: Cloud) -> None:
    first = seal(chain(1)[0], seq=0, prev_hash="ab" * 32)
    err = await _refused(cloud, [first])
    assert (err.details() or "").startswith("seq 0: the first record"), err.details()
    assert await cloud.store.audit_records("depot-1") == []


async def test_a_long_stream_is_stored_in_batches_with_counts_right(cloud: Cloud) -> None:
    records = chain(600)
    ack, _ = await _upload(cloud, "depot-1", records + records[100:110])
    assert (ack.stored_count, ack.duplicate_count, ack.contiguous_seq) == (600, 10, 599)


async def test_a_record_larger_than_grpcs_default_limit_is_taken(cloud: Cloud) -> None:
    big = AuditRecord(decision_id="0@2026-01-01T00:00:00Z", trigger="tick")
    for i in range(40_000):
        reason = "held at 16 A: feeder F2 phase L1 at 63 of 63 A"
        big.setpoints.append(
            Setpoint(charger_id=f"C{i:05d}", setpoint_a=16.0, reason=reason, decision_id="0@x")
        )
        big.bindings.append(ChargerBinding(charger_id=f"C{i:05d}", reason=reason))
    big = seal(big, seq=0, prev_hash="")
    assert big.ByteSize() > 4 * 1024 * 1024
    ack, _ = await _upload(cloud, "depot-1", [big])
    assert (ack.stored_count, ack.contiguous_seq) == (1, 0)
    held = await cloud.store.audit_records("depot-1")
    assert held[0].hash == big.hash and len(held[0].setpoints) == 40_000
