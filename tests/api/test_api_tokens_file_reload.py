"""Revoking an API token without restarting the edge, over a real socket (review of the API room,
2026-12-06). Before, ``[api] tokens_file`` was read once, when the site file loaded: a leaked
operator token removed from the file kept steering until the edge restarted (and a restart of the
edge is a restart of the control loop). Now the file is looked at (``stat``) at every call and read
again when it changed; a file that cannot be read leaves none of its tokens in force (never the
old ones, which the edit meant to retire) while the site file's own tokens keep working."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from api_test_facade import StoreFacade
from evcore.api import ApiConfig, EdgeApiServer, token_sha256
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc

SITE_VIEWER = "site-file-viewer-token-0123"
LEAKED = "leaked-operator-token-0123"
NEW = "new-operator-token-012345"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)  # as a secrets agent or `mv` does


def _entry(name: str, token: str) -> str:
    digest = token_sha256(token)
    return f'[[tokens]]\nname = "{name}"\ntoken_sha256 = "{digest}"\nroles = ["operator"]\n'


async def _code(stub: pb_grpc.EdgeApiStub, token: str) -> grpc.StatusCode:
    try:
        await stub.GetSiteState(
            pb.GetSiteStateRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def tokens_file_config(tmp_path: Path) -> tuple[Path, ApiConfig]:
    """``tokens.toml`` holding LEAKED (an operator) and the [api] naming it beside the site
    file's own viewer token (SITE_VIEWER)."""
    tokens = tmp_path / "tokens.toml"
    _write(tokens, _entry("leaked", LEAKED))
    config = ApiConfig.from_section(
        {
            "listen": "127.0.0.1:0",
            "tokens": [{"name": "dash", "token": SITE_VIEWER, "roles": ["viewer"]}],
            "tokens_file": "tokens.toml",
        },
        tmp_path,
    )
    return tokens, config


async def test_a_token_removed_from_the_tokens_file_is_refused_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens, config = tokens_file_config(tmp_path)
    clock = ManualClock()
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    server = EdgeApiServer(StoreFacade(store, clock), config, site_id="depot", clock=clock)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EdgeApiStub(channel)
            ok, unauthenticated = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
            assert await _code(stub, LEAKED) == ok
            _write(tokens, _entry("new", NEW))  # revoke the leaked token, add a new one
            assert await _code(stub, LEAKED) == unauthenticated  # before: OK until a restart
            assert await _code(stub, NEW) == ok
            assert await _code(stub, SITE_VIEWER) == ok
            # A broken edit: none of the file's tokens, the site file's still work.
            _write(tokens, "[[tokens]\nbroken")
            assert await _code(stub, NEW) == unauthenticated
            assert await _code(stub, LEAKED) == unauthenticated
            assert await _code(stub, SITE_VIEWER) == ok
            assert "tokens file" in caplog.text and "not valid TOML" in caplog.text
            _write(tokens, _entry("new", NEW))  # fixed
            assert await _code(stub, NEW) == ok
            tokens.unlink()  # gone: its tokens go with it
            assert await _code(stub, NEW) == unauthenticated
            assert await _code(stub, SITE_VIEWER) == ok
    finally:
        await server.stop(0.5)
        await store.close()
