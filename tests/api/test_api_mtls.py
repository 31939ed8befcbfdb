"""mTLS on the edge API: a client certificate mapped to a role authenticates without a token; an
unmapped one is refused; without a client certificate the handshake fails."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from api_test_facade import StoreFacade
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from evcore.api import ApiConfig, EdgeApiServer
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc

NOW = dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
async def tls_edge(
    tmp_path: Path,
) -> AsyncIterator[tuple[int, dict[str, tuple[bytes, bytes]], bytes, StoreFacade]]:
    ca_key = _key()
    ca = _cert("evcore test CA", ca_key, None, ca_key, ca=True)
    server_key = _key()
    server = _cert("localhost", server_key, ca.subject, ca_key, server=True)
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    (tmp_path / "server.pem").write_bytes(_pem(server))
    (tmp_path / "server.key").write_bytes(_pem_key(server_key))
    clients = {}
    for cn in ("console", "stranger"):
        k = _key()
        clients[cn] = (_pem(_cert(cn, k, ca.subject, ca_key)), _pem_key(k))
    config = ApiConfig.from_section(
        {
            "listen": "127.0.0.1:0",
            "tls": {
                "cert_file": "server.pem",
                "key_file": "server.key",
                "client_ca_file": "ca.pem",
            },
            "clients": [{"common_name": "console", "roles": ["operator"]}],
        },
        tmp_path,
    )
    clock = ManualClock()
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    facade = StoreFacade(store, clock)
    api = EdgeApiServer(facade, config, site_id="depot", clock=clock, store=store)
    port = await api.start()
    try:
        yield port, clients, _pem(ca), facade
    finally:
        await api.stop(0.5)
        await store.close()


def _channel(port: int, ca: bytes, client: tuple[bytes, bytes] | None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client[1] if client else None,
        certificate_chain=client[0] if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def test_mtls_identity_roles(
    tls_edge: tuple[int, dict[str, tuple[bytes, bytes]], bytes, StoreFacade],
) -> None:
    port, clients, ca, facade = tls_edge
    steer = pb.SetChargerAvailabilityRequest(charger_id="C2", available=False)
    async with _channel(port, ca, clients["console"]) as ch:
        res = await pb_grpc.EdgeApiStub(ch).SetChargerAvailability(steer, timeout=10)
        assert "by console" in res.detail
    assert facade.chargers["C2"]["available"] is False

    facade.chargers["C2"]["available"] = True
    async with _channel(port, ca, clients["stranger"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.EdgeApiStub(ch).SetChargerAvailability(steer, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not mapped" in (err.value.details() or "")
    assert facade.chargers["C2"]["available"] is True

    async with _channel(port, ca, None) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.EdgeApiStub(ch).GetSiteState(pb.GetSiteStateRequest(), timeout=10)
        assert (
            err.value.code() == grpc.StatusCode.UNAVAILABLE
        )  # no client certificate: no handshake
