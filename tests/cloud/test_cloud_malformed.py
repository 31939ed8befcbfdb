"""Requests that do not decode (garbage bytes on the wire) get INVALID_ARGUMENT naming the size,
and the service answers the next call (before: gRPC's bare UNKNOWN "Unexpected DecodeError";
review 2026-12-05, L3). Real socket, real mTLS, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from cloud_testkit import Cloud, chain
from evcore.v1 import cloud_api_pb2 as pb

pytestmark = pytest.mark.timeout(60)


async def test_garbage_is_invalid_argument_and_the_service_lives_on(cloud: Cloud) -> None:
    good = chain(2)
    async with cloud.channel("depot-1") as ch:
        get_plan = ch.unary_unary("/evcore.v1.CloudApi/GetPlan")
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await get_plan(b"\xff\xff\xff\xff")
        upload = ch.stream_unary("/evcore.v1.CloudApi/UploadAudit")

        async def items() -> AsyncIterator[bytes]:
            yield good[0].SerializeToString()
            yield b"\x0a\xff\xff"  # a length-delimited field cut short
            yield good[1].SerializeToString()

        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await upload(items())
        for err in (unary.value, streamed.value):
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "not a valid message" in str(err.details())
        # The record before the bad one may be stored (uploads are at least once); none after it.
        held = await cloud.store.audit_records("depot-1")
        assert [r.seq for r in held] in ([], [0])
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await cloud.stub(ch).GetPlan(pb.GetPlanRequest(site_id="depot-1"))
        assert none.value.code() == grpc.StatusCode.NOT_FOUND
