"""The cloud trusts two CAs at the TLS handshake (the sites' and the operators'); the interceptor
must tell which one issued the caller. Review 2026-12-05 (M2): a leaf with CN ``depot-1`` issued by
a sub-CA of the operators' CA passed the handshake (it chains to a trusted root) and, not being
directly issued by the operators' CA, was taken as site depot-1: its PutTopology replaced the
site's topology and its forged seq 3 locked the site's true records out. A site's certificate must
now be signed directly by a CA certificate of ``[tls] client_ca_file``. Real mTLS, real socket."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_testkit import T0, _load_cert_helpers, chain, stream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from evcore.audit.chain import seal
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, open_cloud_store
from evcore.cloud.topology import topology_from_site
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from evcore.v1.audit_pb2 import AuditRecord

pytestmark = pytest.mark.timeout(60)


def _read(cert: str, key: str) -> tuple[bytes, bytes]:
    return Path(cert).read_bytes(), Path(key).read_bytes()


def _pem(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.PEM)


def _key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    issuer: x509.Certificate, issuer_key: Any, cn: str, *, ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
    return b.sign(issuer_key, hashes.SHA256()), key


async def test_a_leaf_of_an_operator_sub_ca_is_not_a_site(tmp_path: Path) -> None:
    h = _load_cert_helpers()
    site_ca = h.CertAuthority(tmp_path, "sites CA")
    op_ca = h.CertAuthority(tmp_path, "operators CA")
    server_cert, server_key = site_ca.issue("localhost", server=True)
    d1_cert, d1_key = site_ca.issue("depot-1")
    config = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "tls": {
                "cert_file": server_cert,
                "key_file": server_key,
                "client_ca_file": str(site_ca.ca_path),
            },
            "store": {"url": f"sqlite:{tmp_path / 'store'}"},
            "bus": {"urls": ["nats://127.0.0.1:4222"], "outbox_dir": str(tmp_path / "ob")},
            "fleet": {
                "operator_ca_file": str(op_ca.ca_path),
                "operators": [{"common_name": "aggregator-1", "roles": ["grid_operator"]}],
            },
        },
        tmp_path,
    )
    store = open_cloud_store(config.store_url, tmp_path)
    server = CloudApiServer(config, store, clock=ManualClock(T0))
    port = await server.start()
    roots = site_ca.ca_path.read_bytes()

    def channel(cert_pem: bytes, key_pem: bytes) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(roots, key_pem, cert_pem)
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)

    table = depot_table(2, per_feeder=2, site_id="depot-1")
    true_chain = chain(5, site_tag="d1-")
    sub, sub_key = _issue(op_ca.ca_cert, op_ca.ca_key, "partner sub-CA", ca=True)
    leaf, leaf_key = _issue(sub, sub_key, "depot-1", ca=False)
    forged_cert, forged_key = _pem(leaf) + _pem(sub), _key_pem(leaf_key)
    try:
        site = _read(d1_cert, d1_key)
        async with channel(*site) as ch:
            ack = await pb_grpc.CloudApiStub(ch).PutTopology(topology_from_site(load_site(table)))
            assert ack.topology_version == 1
            ack = await pb_grpc.CloudApiStub(ch).UploadAudit(stream(true_chain[:3]))
            assert ack.contiguous_count == 3
        forged = seal(
            AuditRecord(decision_id="forged", trigger="tick", edge_id="edge-1"),
            seq=3,
            prev_hash=true_chain[2].hash,
        )
        other = depot_table(4, per_feeder=4, site_id="depot-1")
        async with channel(forged_cert, forged_key) as ch:
            stub = pb_grpc.CloudApiStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as put:
                await stub.PutTopology(topology_from_site(load_site(other)))
            with pytest.raises(grpc.aio.AioRpcError) as up:
                await stub.UploadAudit(stream([forged]))
        for err in (put.value, up.value):
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "signed directly by a CA certificate of [tls] client_ca_file" in str(
                err.details()
            )
        # A sub-CA issued directly by the sites' CA presenting its own certificate as a leaf.
        sub_site, sub_site_key = _issue(site_ca.ca_cert, site_ca.ca_key, "depot-1", ca=True)
        async with channel(_pem(sub_site), _key_pem(sub_site_key)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as as_ca:
                await pb_grpc.CloudApiStub(ch).PutTopology(topology_from_site(load_site(other)))
        assert as_ca.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Nothing it sent is held: the topology is still version 1, the chain takes seq 3-4.
        held = await store.topology("depot-1")
        assert held is not None and held.version == 1
        async with channel(*site) as ch:
            ack = await pb_grpc.CloudApiStub(ch).UploadAudit(stream(true_chain[3:]))
            assert ack.contiguous_count == 5 and ack.stored_count == 2
    finally:
        await server.stop(0.2)
        await store.close()
