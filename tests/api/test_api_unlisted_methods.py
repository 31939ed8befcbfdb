"""A method of ``evcore.v1.EdgeApi`` without an entry in the role table, over a real socket
(review of the API room, 2026-12-06). Before, a method not listed in ``METHOD_ROLES`` needed "any
valid identity": an RPC added to edge_api.proto (a new lever) without its line in the table was
open to viewers and grid operators. Now such a method is denied to everyone until it has roles;
methods of other services (reflection) still need any valid identity."""

from __future__ import annotations

import grpc
import pytest
from evcore.api.auth import METHOD_ROLES, AuthInterceptor, Credentials
from evcore.v1 import edge_api_pb2 as pb

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-0123456789"


def test_every_method_of_the_service_has_its_roles() -> None:
    service = pb.DESCRIPTOR.services_by_name["EdgeApi"]
    listed = {m.rsplit("/", 1)[-1] for m in METHOD_ROLES}
    assert {m.name for m in service.methods} == listed


async def test_a_method_without_roles_is_denied_to_everyone() -> None:
    creds = Credentials.from_config(
        [
            {"name": "dash", "token": VIEWER, "roles": ["viewer"]},
            {"name": "alice", "token": OPERATOR, "roles": ["operator"]},
        ]
    )
    ran: list[bytes] = []

    async def lever(request: bytes, context: object) -> bytes:
        ran.append(request)
        return b"done"

    server = grpc.aio.server(interceptors=[AuthInterceptor(creds)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "evcore.v1.EdgeApi", {"SetGridLimit": grpc.unary_unary_rpc_method_handler(lever)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/evcore.v1.EdgeApi/SetGridLimit")
            for token in (VIEWER, OPERATOR):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(b"x", metadata=(("authorization", f"Bearer {token}"),))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
                assert "no roles" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"x")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)
    assert ran == []  # the handler never ran
