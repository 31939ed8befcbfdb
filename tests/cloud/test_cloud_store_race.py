"""Two cloud workers on one database: the chain check of a site cannot be raced (a per-site lock
on PostgreSQL, BEGIN IMMEDIATE on SQLite)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cloud_testkit import chain
from evcore.audit.chain import seal
from evcore.cloud import AuditRefused, open_cloud_store
from evcore.v1.audit_pb2 import AuditRecord

ROUNDS = 40


async def test_two_workers_never_store_both_sides_of_a_broken_link(
    store_url: str, tmp_path: Path
) -> None:
    records = chain(5)
    other = AuditRecord()
    other.CopyFrom(records[3])
    other.trigger = "forged"
    forged3 = seal(other, seq=3, prev_hash=records[2].hash)
    forged4 = seal(records[4], seq=4, prev_hash=forged3.hash)
    a, b = open_cloud_store(store_url, tmp_path), open_cloud_store(store_url, tmp_path)
    await a.open()
    await b.open()
    try:
        for k in range(ROUNDS):
            site = f"race-{k}"
            # The true seq 3 and a seq 4 that links to another seq 3, at the same moment.
            ra, rb = await asyncio.gather(
                a.put_audit(site, [records[3]], now_s=0.0),
                b.put_audit(site, [forged4], now_s=0.0),
            )
            assert ra.stored + rb.stored == 1, (k, ra, rb)
            refused = ra.refused or rb.refused
            assert isinstance(refused, AuditRefused)
            assert refused.seq in (3, 4)
    finally:
        await a.close()
        await b.close()
