"""What cloud.toml sets reaches the running service's parts."""

from __future__ import annotations

from pathlib import Path

from cloud_testkit import T0, _load_cert_helpers, make_certs
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, open_cloud_store


async def test_fleet_ramp_s_reaches_the_coordinator(tmp_path: Path) -> None:
    """[fleet] ramp_s was parsed but the coordinator kept its 30 s default."""
    tls, _, _ = make_certs(tmp_path / "pki")
    ops = _load_cert_helpers().CertAuthority(tmp_path, "operators CA")
    config = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "tls": tls,
            "store": {"url": f"sqlite:{tmp_path / 'store'}"},
            "bus": {"urls": ["nats://127.0.0.1:4222"], "outbox_dir": str(tmp_path / "ob")},
            "fleet": {
                "ramp_s": 7.5,
                "operator_ca_file": str(ops.ca_path),
                "operators": [{"common_name": "aggregator-1", "roles": ["grid_operator"]}],
            },
        },
        tmp_path,
    )
    store = open_cloud_store(config.store_url, tmp_path)
    try:
        server = CloudApiServer(config, store, clock=ManualClock(T0))
        assert server.fleet is not None and server.fleet.ramp_s == 7.5
    finally:
        await store.close()
