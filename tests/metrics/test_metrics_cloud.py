"""The cloud service's ``[metrics]``: a real CloudApiServer (insecure development mode, real gRPC
socket) scraped over real HTTP: calls by method and code, audit records stored and repeated,
a refused (broken-chain) upload, unauthenticated calls, and each site's last upload."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import grpc
import pytest
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, CloudConfigError, open_cloud_store
from evcore.cloud.auth import SITE_HEADER
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from metrics_testkit import cert_authority, get, no_http_answer, scrape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cloud"))
from cloud_testkit import chain, stream

pytestmark = pytest.mark.timeout(60)

T0 = 1_780_000_000.0


async def test_a_scrape_counts_the_clouds_calls_and_uploads(tmp_path: Path) -> None:
    cfg = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "insecure": True,
            "store": {"url": "sqlite:store"},
            "metrics": {"listen": "127.0.0.1:0"},
        },
        tmp_path,
    )
    store = open_cloud_store(cfg.store_url)
    clock = ManualClock(T0)
    server = CloudApiServer(cfg, store, clock=clock)
    port = await server.start()
    try:
        mport = server.metrics_port
        assert mport > 0
        s0 = await scrape(mport)
        assert s0.value("evcore_cloud_sites_seen") == 0
        assert s0.series("evcore_cloud_calls_total") == {}
        records = chain(5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CloudApiStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as anon:
                await stub.UploadAudit(stream(records[:1]))  # no site header
            assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ack = await stub.UploadAudit(stream(records[:3]), metadata=((SITE_HEADER, "depot-1"),))
            assert ack.stored_count == 3
            clock.advance(60.0)
            # Two repeats, then two new ones.
            ack = await stub.UploadAudit(stream(records[1:]), metadata=((SITE_HEADER, "depot-1"),))
            assert (ack.stored_count, ack.duplicate_count) == (2, 2)
            # depot-2: two records, then one of another chain (its prev_hash is not theirs):
            # the two are stored, the stream refused.
            other = chain(5, site_tag="other-")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.UploadAudit(
                    stream([*records[:2], other[2]]), metadata=((SITE_HEADER, "depot-2"),)
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        s1 = await scrape(mport)
        assert s1.value("evcore_cloud_calls_total", method="UploadAudit", code="OK") == 2
        assert (
            s1.value("evcore_cloud_calls_total", method="UploadAudit", code="INVALID_ARGUMENT") == 1
        )
        # 3 + 2 for depot-1, and the 2 depot-2 stored before the refusal (trailing metadata).
        assert s1.value("evcore_cloud_upload_items_total", kind="audit", outcome="stored") == 7
        assert s1.value("evcore_cloud_upload_items_total", kind="audit", outcome="duplicate") == 2
        assert s1.value("evcore_cloud_auth_unauthenticated_total") == 1
        assert s1.value("evcore_cloud_auth_denied_total") == 0
        # Only a site whose upload succeeded is seen; its time is the service clock's.
        assert s1.value("evcore_cloud_sites_seen") == 1
        assert s1.by("evcore_cloud_site_last_upload_timestamp_seconds", "site_id") == {
            "depot-1": T0 + 60.0
        }
        assert [r.seq for r in await store.audit_records("depot-1")] == [0, 1, 2, 3, 4]
        assert [r.seq for r in await store.audit_records("depot-2")] == [0, 1]
    finally:
        await server.stop(0.5)
        await store.close()
    assert server.metrics_server is None


def test_a_cloud_without_the_section_has_no_endpoint(tmp_path: Path) -> None:
    cfg = CloudConfig.from_table({"insecure": True, "store": {"url": "sqlite:x"}}, tmp_path)
    assert cfg.metrics is None


def test_a_bad_metrics_section_in_cloud_toml_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(CloudConfigError, match=r"\[metrics\]\.listen: port must be"):
        CloudConfig.from_table(
            {"insecure": True, "store": {"url": "sqlite:x"}, "metrics": {"listen": "h:99999"}},
            tmp_path,
        )


async def test_the_clouds_endpoint_with_a_token_and_client_certificates(tmp_path: Path) -> None:
    """The same keys in cloud.toml reach ``evcore cloud serve``'s endpoint: HTTPS, a client
    certificate of ``tls_client_ca_file`` and the bearer token are all needed."""
    ca = cert_authority(tmp_path, "cloud metrics CA")
    cert, key = ca.issue("cloud-metrics", server=True)
    client = ca.issue("prometheus")
    token = tmp_path / "metrics.token"
    token.write_text("cloud-scrape-token")
    token.chmod(0o600)
    cfg = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "insecure": True,
            "store": {"url": "sqlite:store"},
            "metrics": {
                "listen": "127.0.0.1:0",
                "token_file": str(token),
                "tls_cert_file": cert,
                "tls_key_file": key,
                "tls_client_ca_file": str(ca.ca_path),
            },
        },
        tmp_path,
    )
    store = open_cloud_store(cfg.store_url)
    server = CloudApiServer(cfg, store, clock=ManualClock(T0))
    await server.start()
    try:
        mport = server.metrics_port
        trusted = ssl.create_default_context(cafile=str(ca.ca_path))
        with_cert = ssl.create_default_context(cafile=str(ca.ca_path))
        with_cert.load_cert_chain(*client)
        assert (await get(mport, tls=with_cert)).status == 401
        s = await scrape(mport, token="cloud-scrape-token", tls=with_cert)
        assert s.value("evcore_cloud_sites_seen") == 0
        assert s.value("evcore_metrics_scrapes_refused_total", reason="missing") == 1
        # Without a client certificate (or without TLS) there is no HTTP answer.
        await no_http_answer(mport, trusted)
        await no_http_answer(mport, None)
        assert (await get(mport, token="cloud-scrape-token", tls=with_cert)).status == 200
    finally:
        await server.stop(0.5)
        await store.close()


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        # Relative to cloud.toml's directory (tmp_path), where there is none.
        ({"token_file": "metrics.token"}, r"\[metrics\]\.token_file: no such file .*s\.token"),
        ({"token_file": "/nonexistent/metrics.token"}, r"\[metrics\]\.token_file: no such file"),
        ({"tls_cert_file": "/etc/hostname"}, r"\[metrics\]\.tls_key_file: missing"),
    ],
)
def test_bad_metrics_files_in_cloud_toml_name_the_key(
    tmp_path: Path, metrics: dict[str, str], match: str
) -> None:
    with pytest.raises(CloudConfigError, match=match):
        CloudConfig.from_table(
            {
                "insecure": True,
                "store": {"url": "sqlite:x"},
                "metrics": {"listen": "127.0.0.1:0", **metrics},
            },
            tmp_path,
        )


def test_a_relative_token_file_is_read_beside_cloud_toml(tmp_path: Path) -> None:
    (tmp_path / "metrics.token").write_text("cloud-scrape-token\n")
    (tmp_path / "metrics.token").chmod(0o600)
    cfg = CloudConfig.from_table(
        {
            "insecure": True,
            "store": {"url": "sqlite:x"},
            "metrics": {"listen": "127.0.0.1:0", "token_file": "metrics.token"},
        },
        tmp_path,
    )
    assert cfg.metrics is not None
