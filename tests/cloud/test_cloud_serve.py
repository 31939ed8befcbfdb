"""``evcore cloud serve --config``: the config file, the example, the insecure development mode,
and the command itself as a process (real mTLS socket, SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
import pytest
from cloud_testkit import chain, cloud_serve, make_certs, stream
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, CloudConfigError, open_cloud_store
from evcore.cloud.auth import SITE_HEADER
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_config_loads() -> None:
    cfg = CloudConfig.from_file(ROOT / "cloud" / "cloud.example.toml")
    assert cfg.tls is not None
    assert cfg.tls.client_ca_file == Path("/etc/evcore/sites-ca.pem")
    assert cfg.store_url.startswith("postgresql://") and "schema=evcore_cloud" in cfg.store_url
    assert not cfg.insecure
    assert cfg.listen == "0.0.0.0:50061"
    assert cfg.bus is None


def test_a_bus_section_names_the_sites_and_keeps_the_edge_bus_keys(tmp_path: Path) -> None:
    cfg = CloudConfig.from_table(
        {
            "insecure": True,
            "store": {"url": "sqlite:x"},
            "bus": {"urls": ["nats://h:4222"], "sites": ["d1", "d2"], "replicas": 3},
        },
        tmp_path,
    )
    assert cfg.bus_sites == ("d1", "d2")
    assert cfg.audit_durable == "cloud-audit"
    assert cfg.bus is not None
    assert cfg.bus["replicas"] == 3
    assert cfg.bus["outbox_dir"] == str(tmp_path / "var" / "outbox")


def test_every_site_is_sites_star_with_its_discovery_period(tmp_path: Path) -> None:
    cfg = CloudConfig.from_table(
        {
            "insecure": True,
            "store": {"url": "sqlite:x"},
            "bus": {"urls": ["nats://h:4222"], "sites": "*", "discover_s": 5},
        },
        tmp_path,
    )
    assert cfg.bus_discover and cfg.bus_sites == () and cfg.discover_s == 5.0
    assert cfg.bus is not None and "discover_s" not in cfg.bus  # not an edge bus key


def test_sites_star_stands_alone(tmp_path: Path) -> None:
    listed = CloudConfig.from_table(
        {"insecure": True, "store": {"url": "sqlite:x"}, "bus": {"sites": ["*"]}}, tmp_path
    )
    assert listed.bus_discover and listed.bus_sites == ()
    # "*" beside other sites was taken for a site named "*" (no new site was ever read).
    with pytest.raises(CloudConfigError, match=r'"\*" \(every site the cloud knows\) stands'):
        CloudConfig.from_table(
            {"insecure": True, "store": {"url": "sqlite:x"}, "bus": {"sites": ["*", "d1"]}},
            tmp_path,
        )


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"store": {"url": "sqlite:x"}}, "[tls]"),
        (
            {"store": {"url": "sqlite:x"}, "insecure": True, "bus": {"sites": "all"}},
            '"*" (every site',
        ),
        (
            {
                "store": {"url": "sqlite:x"},
                "insecure": True,
                "bus": {"sites": "*", "discover_s": 0},
            },
            "[bus] discover_s",
        ),
        (
            {
                "store": {"url": "sqlite:x"},
                "insecure": True,
                "bus": {"sites": "*", "discover_s": True},
            },
            "[bus] discover_s",
        ),
        ({"store": {"url": "sqlite:x"}, "insecure": True, "lisen": "x:1"}, "lisen"),
        ({"insecure": True}, "[store] url"),
        ({"store": {"url": "sqlite:x"}, "insecure": True, "tls": {"cert_file": "a"}}, "key_file"),
        ({"store": {"url": "sqlite:x", "schema": "s"}, "insecure": True}, "schema"),
        ({"store": {"url": "sqlite:x"}, "insecure": "yes"}, "insecure"),
        ({"store": {"url": "sqlite:x"}, "insecure": True, "bus": {"url": "nats://h:1"}}, "sites"),
        (
            {"store": {"url": "sqlite:x"}, "insecure": True, "bus": {"url": "x", "sites": ["a"]}},
            "url 'x'",
        ),
        (
            {
                "store": {"url": "sqlite:x"},
                "insecure": True,
                "bus": {"kind": "inprocess", "sites": ["a"]},
            },
            "kind",
        ),
    ],
)
def test_config_errors_name_the_key(table: dict[str, object], named: str) -> None:
    with pytest.raises(CloudConfigError) as info:
        CloudConfig.from_table(table)
    assert named in str(info.value)


def test_a_relative_sqlite_store_is_taken_from_the_config_directory(tmp_path: Path) -> None:
    cfg = CloudConfig.from_table({"store": {"url": "sqlite:var/cloud"}, "insecure": True}, tmp_path)
    assert cfg.store_url == f"sqlite:{tmp_path / 'var' / 'cloud'}"


async def test_insecure_mode_takes_the_site_from_a_header_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = CloudConfig.from_table(
        {"listen": "127.0.0.1:0", "insecure": True, "store": {"url": "sqlite:store"}}, tmp_path
    )
    store = open_cloud_store(cfg.store_url)
    server = CloudApiServer(cfg, store, clock=ManualClock())
    with caplog.at_level(logging.WARNING, logger="evcore.cloud"):
        port = await server.start()
    try:
        assert any("INSECURE MODE" in r.getMessage() for r in caplog.records)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CloudApiStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.UploadAudit(stream(chain(2)))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ack = await stub.UploadAudit(stream(chain(2)), metadata=((SITE_HEADER, "dev-site"),))
            assert ack.stored_count == 2
        assert [r.seq for r in await store.audit_records("dev-site")] == [0, 1]
    finally:
        await server.stop(0.5)
        await store.close()


async def test_the_command_serves_over_mtls_and_stops_on_sigterm(tmp_path: Path) -> None:
    tls, ca, clients = make_certs(tmp_path / "certs")
    config = tmp_path / "cloud.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\nstop_grace_s = 2.0\n[store]\nurl = "sqlite:store"\n[tls]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
    )
    async with cloud_serve(config) as proc:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert "CloudApi on port" in line, line
        port = int(line.split("CloudApi on port ")[1].split(",")[0])
        cert, key = clients["depot-1"]
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            ack = await pb_grpc.CloudApiStub(ch).UploadAudit(stream(chain(3)))
        assert (ack.stored_count, ack.contiguous_seq) == (3, 2)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert "stopped" in out.decode()
    reopened = open_cloud_store(f"sqlite:{tmp_path / 'store'}")
    try:
        assert await reopened.contiguous_seq("depot-1") == 2
    finally:
        await reopened.close()
