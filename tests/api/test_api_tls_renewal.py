"""A renewed server certificate on the edge API serves without a restart, over a real TLS socket
(review of the API room, 2026-12-06). Before, ``[api.tls]`` files were read once at start: a
certificate renewed on disk (cert-manager, ACME: every 60-90 days) was not served until the edge
restarted, and when the old one expired every operator tool failed its handshake. Now the files are
looked at on every handshake and loaded again when they changed; a pair that does not load
together (the certificate written, its key not yet) leaves the one in force serving."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from api_test_facade import StoreFacade
from evcore.api import ApiConfig, EdgeApiServer
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from test_api_mtls import _cert, _key, _pem, _pem_key

TOKEN = "viewer-token-0123456789"


def _authority(name: str) -> tuple[bytes, bytes, bytes]:
    """(CA PEM, server certificate PEM for 127.0.0.1, its key PEM) of a new CA."""
    ca_key = _key()
    ca = _cert(name, ca_key, None, ca_key, ca=True)
    key = _key()
    return _pem(ca), _pem(_cert("localhost", key, ca.subject, ca_key, server=True)), _pem_key(key)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _code(port: int, ca: bytes) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        try:
            await pb_grpc.EdgeApiStub(channel).GetSiteState(
                pb.GetSiteStateRequest(),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
                timeout=5,
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_a_renewed_certificate_serves_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_ca, old_cert, old_key = _authority("old CA")
    new_ca, new_cert, new_key = _authority("new CA")
    (tmp_path / "server.pem").write_bytes(old_cert)
    (tmp_path / "server.key").write_bytes(old_key)
    config = ApiConfig.from_section(
        {
            "listen": "127.0.0.1:0",
            "tls": {"cert_file": "server.pem", "key_file": "server.key"},
            "tokens": [{"name": "dash", "token": TOKEN, "roles": ["viewer"]}],
        },
        tmp_path,
    )
    clock = ManualClock()
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    api = EdgeApiServer(StoreFacade(store, clock), config, site_id="depot", clock=clock)
    port = await api.start()
    try:
        assert await _code(port, old_ca) == grpc.StatusCode.OK
        assert await _code(port, new_ca) == grpc.StatusCode.UNAVAILABLE
        # Half a renewal: the new certificate without its key does not load; the old pair serves.
        _replace(tmp_path / "server.pem", new_cert)
        assert await _code(port, old_ca) == grpc.StatusCode.OK
        assert "cannot be loaded" in caplog.text
        _replace(tmp_path / "server.key", new_key)
        assert await _code(port, new_ca) == grpc.StatusCode.OK  # before: UNAVAILABLE
        assert await _code(port, old_ca) == grpc.StatusCode.UNAVAILABLE
    finally:
        await api.stop(0.5)
        await store.close()
