"""The edge's link to the cloud (``evcore.edge.cloudlink``): against the real cloud service over a
real socket with real mTLS, on SQLite and on the real PostgreSQL. The edge's audit chain is read
from its real store and reaches the cloud from where the cloud's copy ends, across a cloud
outage, with nothing lost or stored twice; the topology is put once; the chargers' latest
measurements arrive as telemetry; a plan the cloud holds is applied once as a cloud plan."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import free_port
from cloud_testkit import SITES, T0, chain, make_certs, run_evcore
from edge_testkit import stepped_controller
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, open_cloud_store
from evcore.cloud.topology import topology_from_site
from evcore.edge.cloudlink import CloudLink, CloudLinkConfig, CloudLinkConfigError
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.store import open_store
from evcore.v1.plan_pb2 import Plan, PlanRow

pytestmark = pytest.mark.timeout(120)

SITE = SITES[0]


class _Gateway:
    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        class _R:
            accepted = True

        return _R()


class _Cloud:
    """The cloud service on a fixed port, so that it can stop and start again (an outage)."""

    def __init__(self, tmp_path: Path, store_url: str) -> None:
        self.tls, ca_pem, clients = make_certs(tmp_path / "pki")
        self.port = free_port()
        self.config = CloudConfig.from_table(
            {"listen": f"127.0.0.1:{self.port}", "tls": self.tls, "store": {"url": store_url}},
            tmp_path,
        )
        self.store = open_cloud_store(self.config.store_url, tmp_path)
        self.server: CloudApiServer | None = None
        # The edge's files: the CA that signed the cloud's certificate, its own cert and key.
        self.files = tmp_path / "edge-pki"
        self.files.mkdir()
        (self.files / "ca.pem").write_bytes(ca_pem)
        cert, key = clients[SITE]
        (self.files / "site.pem").write_bytes(cert)
        (self.files / "site.key").write_bytes(key)

    def link_section(self, **extra: Any) -> dict[str, Any]:
        return {
            "url": f"127.0.0.1:{self.port}",
            "server_name": "localhost",
            "ca_file": "edge-pki/ca.pem",
            "cert_file": "edge-pki/site.pem",
            "key_file": "edge-pki/site.key",
            **extra,
        }

    async def start(self) -> None:
        self.server = CloudApiServer(self.config, self.store, clock=ManualClock(T0))
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0.2)
            self.server = None


@pytest.fixture
async def cloud(tmp_path: Path, store_url: str) -> Any:
    c = _Cloud(tmp_path, store_url)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        await c.store.close()


def _table() -> dict[str, Any]:
    return depot_table(4, per_feeder=2, site_id=SITE)


async def test_the_audit_chain_reaches_the_cloud_across_an_outage_once(
    cloud: _Cloud, tmp_path: Path
) -> None:
    table = _table()
    records = chain(8, site_tag=SITE)
    store = open_store({"kind": "embedded", "path": str(tmp_path / "edge-store")}, tmp_path)
    await store.open()
    clock = ManualClock(T0)
    cfg = CloudLinkConfig.from_section(cloud.link_section(timeout_s=2.0), tmp_path)
    assert cfg is not None
    link = CloudLink(
        cfg,
        site_id=SITE,
        store=store,
        clock=clock,
        topology=topology_from_site(load_site(table)),
    )
    try:
        for r in records[:5]:
            await store.append_audit(r)
        assert await link.sync_once()
        assert link.stats.topology_version == 1 and link.stats.audit_contiguous == 5
        held = await cloud.store.audit_records(SITE)
        assert [r.hash for r in held] == [r.hash for r in records[:5]]
        # The cloud goes away; the edge goes on deciding (three more records).
        await cloud.stop()
        for r in records[5:]:
            await store.append_audit(r)
        assert not await link.sync_once()
        assert link.stats.failures == 1  # waited for the connection up to timeout_s, then gave up
        assert link.stats.last_error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
        await cloud.start()
        assert await link.sync_once()
        assert link.stats.audit_contiguous == 8
        held = await cloud.store.audit_records(SITE)
        assert [r.hash for r in held] == [r.hash for r in records]  # each once, in order
        assert link.stats.audit_stored == 8 and link.stats.audit_repeats == 0
        # A second edge run (a restart) asks the cloud where its copy ends: nothing re-sent.
        link2 = CloudLink(cfg, site_id=SITE, store=store, clock=clock)
        assert await link2.sync_once()
        assert link2.stats.audit_contiguous == 8 and link2.stats.audit_stored == 0
        assert link2.stats.audit_repeats == 0
        await link2.close()
        stored = await cloud.store.topology(SITE)
        assert stored is not None and stored.version == 1
    finally:
        await link.close()
        await store.close()


async def test_measurements_go_up_and_a_cloud_plan_is_applied_once(
    cloud: _Cloud, tmp_path: Path
) -> None:
    table = _table()
    ctrl, clock = stepped_controller(table, _Gateway())
    store = open_store({"kind": "embedded", "path": str(tmp_path / "edge-store")}, tmp_path)
    await store.open()
    cfg = CloudLinkConfig.from_section(cloud.link_section(), tmp_path)
    assert cfg is not None
    link = CloudLink(cfg, site_id=SITE, store=store, clock=clock, ctrl=ctrl)
    a, b = sorted(ctrl.state.chargers)[:2]
    try:
        ca = ctrl.state.chargers[a]
        ca.measured_a = (12.5, 12.0, None)
        ca.measured_at = clock.monotonic()
        ca.accepted, ca.holding = True, 13.0
        assert await link.sync_once()
        batches = await cloud.store.telemetry_batches(SITE)
        assert len(batches) == 1 and [s.charger_id for s in batches[0].samples] == [a]
        sample = batches[0].samples[0]
        assert list(sample.current_a)[:2] == [12.5, 12.0] and sample.offered_current_a == 13.0
        assert abs(sample.sampled_at.ToNanoseconds() / 1e9 - clock.now()) < 1e-3
        # Nothing new measured: nothing sent; a new reading of b: only b.
        assert await link.sync_once()
        assert len(await cloud.store.telemetry_batches(SITE)) == 1
        clock.advance(5.0)
        ctrl.state.chargers[b].measured_a = (7.0, 7.0, 7.0)
        ctrl.state.chargers[b].measured_at = clock.monotonic()
        assert await link.sync_once()
        batches = await cloud.store.telemetry_batches(SITE)
        assert sorted(s.charger_id for bt in batches for s in bt.samples) == sorted([a, b])
        # A plan the cloud holds: applied as the cloud plan, once.
        assert ctrl.cloud_plan is None
        plan = Plan(plan_id="p-1", plan_version=3, source="cloud")
        plan.computed_at.FromNanoseconds(int(clock.now() * 1e9))
        row = PlanRow(session_id="s", charger_id=a, step_s=900.0, target_a=10.0)
        row.step_start.FromNanoseconds(int(clock.now() * 1e9))
        plan.rows.append(row)
        await cloud.store.put_plan(SITE, plan, now_s=clock.now())
        assert await link.sync_once()
        assert ctrl.cloud_plan is not None and ctrl.cloud_plan.version == "p-1@3"
        assert link.stats.plans_applied == 1 and link.stats.plan_version == 3
        assert await link.sync_once()
        assert link.stats.plans_applied == 1  # NOT_FOUND for newer than 3: kept
    finally:
        await link.close()
        await store.close()


async def test_a_refused_upload_is_logged_and_the_other_steps_go_on(
    cloud: _Cloud, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The edge's chain is not the one the cloud holds (its store was replaced): the cloud
    refuses (a fork at seq 3); the link says why, once, and telemetry still goes up (review
    2026-12-05: the refused audit step ended every round before telemetry and plans)."""
    await cloud.store.put_audit(SITE, chain(3, site_tag="other-"), now_s=T0)
    store = open_store({"kind": "embedded", "path": str(tmp_path / "edge-store")}, tmp_path)
    await store.open()
    cfg = CloudLinkConfig.from_section(cloud.link_section(), tmp_path)
    assert cfg is not None
    ctrl, clock = stepped_controller(_table(), _Gateway())
    link = CloudLink(cfg, site_id=SITE, store=store, clock=clock, ctrl=ctrl)
    caplog.set_level(logging.ERROR, logger="evcore.edge.cloud")
    try:
        for r in chain(5, site_tag=SITE):
            await store.append_audit(r)
        a = sorted(ctrl.state.chargers)[0]
        ctrl.state.chargers[a].measured_a = (9.0, 9.0, 9.0)
        ctrl.state.chargers[a].measured_at = clock.monotonic()
        assert not await link.sync_once()
        assert not await link.sync_once()
        assert link.stats.failures == 2 and "INVALID_ARGUMENT" in link.stats.step_errors["audit"]
        refused = [r for r in caplog.records if "audit failed" in r.getMessage()]
        assert len(refused) == 1 and "seq 3" in refused[0].getMessage(), caplog.text
        batches = await cloud.store.telemetry_batches(SITE)
        assert [s.charger_id for b in batches for s in b.samples] == [a]
    finally:
        await link.close()
        await store.close()


async def test_a_store_outage_fails_the_audit_step_and_never_ends_the_link(
    cloud: _Cloud, tmp_path: Path
) -> None:
    """Review 2026-12-05 (HIGH): the edge's store raising StoreUnavailable came out of the link's
    run() and, in EdgeApp's task group, ended the whole edge."""
    import asyncio

    from evcore.store import StoreUnavailable

    store = open_store({"kind": "embedded", "path": str(tmp_path / "edge-store")}, tmp_path)
    await store.open()
    cfg = CloudLinkConfig.from_section(cloud.link_section(interval_s=0.05), tmp_path)
    assert cfg is not None
    link = CloudLink(cfg, site_id=SITE, store=store, clock=ManualClock(T0))
    real = store.audit_records

    async def down(**kwargs: Any) -> Any:
        raise StoreUnavailable("store down (test)")

    store.audit_records = down  # type: ignore[method-assign]
    runner = asyncio.create_task(link.run())
    try:
        for _ in range(200):
            if link.stats.failures >= 3:
                break
            await asyncio.sleep(0.02)
        assert link.stats.failures >= 3 and not runner.done()
        assert "StoreUnavailable" in link.stats.step_errors["audit"]
        store.audit_records = real  # type: ignore[method-assign]
        for r in chain(2, site_tag=SITE):
            await store.append_audit(r)
        for _ in range(200):
            if link.stats.audit_contiguous == 2:
                break
            await asyncio.sleep(0.02)
        assert link.stats.audit_contiguous == 2 and "audit" not in link.stats.step_errors
    finally:
        link.stop()
        await asyncio.wait_for(runner, 10)
        await link.close()
        await store.close()


async def test_an_expired_plan_is_not_applied_and_a_restored_cloud_is_followed(
    cloud: _Cloud, tmp_path: Path
) -> None:
    """Review 2026-12-05: a plan whose valid_until had passed was applied as fresh, and after the
    cloud's plans were restored from a backup (newest version 2, the edge holding 7) no plan was
    ever applied again until a restart."""
    from evcore.edge.cloudlink import PLAN_RECHECK_ROUNDS

    ctrl, clock = stepped_controller(_table(), _Gateway())
    store = open_store({"kind": "embedded", "path": str(tmp_path / "edge-store")}, tmp_path)
    await store.open()
    cfg = CloudLinkConfig.from_section(cloud.link_section(telemetry=False), tmp_path)
    assert cfg is not None
    link = CloudLink(cfg, site_id=SITE, store=store, clock=clock, ctrl=ctrl)
    a = sorted(ctrl.state.chargers)[0]

    def plan(version: int, computed_ago_s: float, valid_s: float) -> Plan:
        p = Plan(plan_id=f"p-{version}", plan_version=version, source="cloud")
        p.computed_at.FromNanoseconds(int((clock.now() - computed_ago_s) * 1e9))
        p.valid_until.FromNanoseconds(int((clock.now() - computed_ago_s + valid_s) * 1e9))
        row = PlanRow(session_id="s", charger_id=a, step_s=86_400.0, target_a=8.0)
        row.step_start.FromNanoseconds(int((clock.now() - 3600.0) * 1e9))
        p.rows.append(row)
        return p

    restored: _Cloud | None = None
    try:
        await cloud.store.put_plan(SITE, plan(6, 20 * 3600.0, 3600.0), now_s=clock.now())
        assert await link.sync_once()
        assert ctrl.cloud_plan is None and link.stats.plans_applied == 0  # expired 19 h ago
        await cloud.store.put_plan(SITE, plan(7, 60.0, 7200.0), now_s=clock.now())
        assert await link.sync_once()
        assert ctrl.cloud_plan is not None and ctrl.cloud_plan.version == "p-7@7"
        assert abs(ctrl.cloud_plan.received_at - (clock.now() - 60.0)) < 1e-3  # its age counts
        # The cloud comes back from a backup holding versions up to 2 only.
        await cloud.stop()
        restored = _Cloud.__new__(_Cloud)
        restored.__dict__.update(cloud.__dict__)
        restored.config = CloudConfig.from_table(
            {
                "listen": f"127.0.0.1:{cloud.port}",
                "tls": cloud.tls,
                "store": {"url": f"sqlite:{tmp_path / 'restored-store'}"},
            },
            tmp_path,
        )
        restored.store = open_cloud_store(restored.config.store_url, tmp_path)
        await restored.start()
        await restored.store.put_plan(SITE, plan(2, 10.0, 7200.0), now_s=clock.now())
        link._round = PLAN_RECHECK_ROUNDS - 1  # the next round rechecks the newest
        assert await link.sync_once()
        assert ctrl.cloud_plan.version == "p-2@2" and link.stats.plan_version == 2
    finally:
        if restored is not None:
            await restored.stop()
            await restored.store.close()
        await link.close()
        await store.close()


def test_a_wrong_cloud_section_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    good = {"url": "cloud:7443", "ca_file": "ca.pem", "cert_file": "ca.pem", "key_file": "ca.pem"}
    assert CloudLinkConfig.from_section(None, tmp_path) is None
    assert CloudLinkConfig.from_section({**good, "enabled": False}, tmp_path) is None
    cfg = CloudLinkConfig.from_section(good, tmp_path)
    assert cfg is not None and cfg.ca_file == tmp_path / "ca.pem" and cfg.interval_s == 10.0
    for bad, words in [
        ({**good, "url": "cloud"}, "[cloud].url: expected 'host:port'"),
        ({**good, "cert_file": "missing.pem"}, "cert_file: no such file"),
        ({"url": "cloud:1"}, "needs ca_file, cert_file and key_file"),
        ({**good, "insecure": True}, "insecure = true takes no"),
        ({**good, "interval_s": 0}, "interval_s must be a number"),
        ({**good, "interval_s": float("nan")}, "interval_s must be a number"),
        ({**good, "telemetry": "yes"}, "telemetry must be true or false"),
        ({**good, "colour": 1}, "[cloud].colour: unknown key"),
    ]:
        with pytest.raises(CloudLinkConfigError, match=None) as err:
            CloudLinkConfig.from_section(bad, tmp_path)
        assert words in str(err.value), (bad, str(err.value))


async def test_evcore_edge_keeps_the_cloud_copy_of_its_site(cloud: _Cloud, tmp_path: Path) -> None:
    """What `evcore edge` runs, with `[cloud]` in its site file, simulated stations charging over
    real OCPP: the cloud ends up with the site's topology, the edge's whole audit chain (checked
    against the edge's own store after it stopped) and the chargers' measurements."""
    import asyncio

    from evcore.clock import WallClock
    from evcore.edge.app import EdgeApp
    from evcore.edge.rig import EdgeRig
    from evcore.edge.sitegen import to_toml
    from evcore.sim.ev import EV

    table = depot_table(4, per_feeder=2, site_id=SITE, grid_share=1.0)
    table["edge"] = {"tick_s": 0.5, "min_on_s": 0.0, "min_off_s": 0.0}
    table["store"] = {"kind": "embedded", "path": "var/store"}
    table["cloud"] = cloud.link_section(interval_s=0.5, timeout_s=5.0)
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    app = EdgeApp.from_file(site_file, WallClock())
    assert app.cloud is not None
    runner = asyncio.create_task(app.run())
    rig = None
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        prefix = app.central.config.path_prefix
        rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{app.central.port}{prefix}")
        await rig.start()
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.3))
        await rig.wait_for(
            lambda: app.cloud.stats.telemetry_samples >= 4 and app.cloud.stats.audit_stored >= 3,
            30,
            "topology, audit records and measurements uploaded",
        )
        assert app.cloud.stats.topology_version == 1
        assert app.cloud.stats.failures == 0, app.cloud.stats.last_error
    finally:
        if rig is not None:
            await rig.stop()
        app.stop()
        await asyncio.wait_for(runner, 30)
    stored = await cloud.store.topology(SITE)
    assert stored is not None and {c.charger_id for c in stored.topology.chargers} == {
        c["id"] for c in table["chargers"]
    }
    batches = await cloud.store.telemetry_batches(SITE)
    assert {s.charger_id for b in batches for s in b.samples} == {
        c["id"] for c in table["chargers"]
    }
    # Every record the edge made before its last round is in the cloud, in order, once.
    edge_store = open_store(table["store"], tmp_path)
    await edge_store.open()
    try:
        mine = await edge_store.audit_records()
    finally:
        await edge_store.close()
    held = await cloud.store.audit_records(SITE)
    assert len(held) >= 3
    assert [r.hash for r in held] == [r.hash for r in mine[: len(held)]]


async def test_evcore_edge_refuses_a_wrong_cloud_section_before_starting(tmp_path: Path) -> None:
    from evcore.edge.sitegen import to_toml

    table = _table()
    table["cloud"] = {"url": "cloud.example.net", "insecure": True}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    rc, out, err = await run_evcore("edge", "--config", str(site_file))
    assert rc == 2, out + err
    assert "[cloud].url: expected 'host:port'" in err and "got 'cloud.example.net'" in err


def _new_sites_ca(folder: Path) -> tuple[Path, bytes, bytes]:
    """A second sites' CA and a certificate of ``SITE`` from it: (CA file, cert PEM, key PEM)."""
    from cloud_testkit import _load_cert_helpers

    folder.mkdir()
    ca = _load_cert_helpers().CertAuthority(folder, "new sites CA")
    cert, key = ca.issue(SITE)
    return ca.ca_path, Path(cert).read_bytes(), Path(key).read_bytes()


async def test_a_rotated_certificate_is_used_without_a_restart(
    cloud: _Cloud, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The site's certificate is rotated on disk to one signed by a new sites' CA, and the cloud
    restarts trusting only that CA. Before: the link kept the certificate it read at start and
    was refused for ever. Now the round after the files changed connects with the new ones; a
    bad new file keeps the credentials in use and is logged naming the file."""
    records = chain(7, site_tag=SITE)
    store = open_store({"kind": "embedded", "path": str(tmp_path / "edge-store")}, tmp_path)
    await store.open()
    cfg = CloudLinkConfig.from_section(cloud.link_section(timeout_s=1.0), tmp_path)
    assert cfg is not None and cfg.cert_file is not None and cfg.key_file is not None
    link = CloudLink(cfg, site_id=SITE, store=store, clock=ManualClock(T0))
    ca2_path, new_cert, new_key = _new_sites_ca(tmp_path / "ca2")
    try:
        for r in records[:3]:
            await store.append_audit(r)
        assert await link.sync_once() and link.stats.audit_contiguous == 3

        # A bad new file: not PEM at all, then a certificate without its key.
        cfg.cert_file.write_bytes(b"not a certificate")
        with caplog.at_level(logging.ERROR, logger="evcore.edge.cloud"):
            assert await link.sync_once()  # the cloud still trusts the old one: it is kept
        assert f"[cloud].cert_file {str(cfg.cert_file)!r}: not a PEM certificate" in caplog.text
        assert link.stats.tls_error.startswith("[cloud].cert_file")
        cfg.cert_file.write_bytes(new_cert)
        assert await link.sync_once()
        assert "not the key of cert_file" in link.stats.tls_error
        assert link.stats.tls_reloads == 0

        # The cloud now takes only certificates of the new CA: the one in use is refused.
        await cloud.stop()
        cloud.config = CloudConfig.from_table(
            {
                "listen": f"127.0.0.1:{cloud.port}",
                "tls": {**cloud.tls, "client_ca_file": str(ca2_path)},
                "store": {"url": cloud.config.store_url},
            },
            tmp_path,
        )
        await cloud.start()
        for r in records[3:5]:
            await store.append_audit(r)
        assert not await link.sync_once()
        assert link.stats.audit_contiguous == 3
        # The half-done rotation is looked at every round and logged once.
        assert caplog.text.count("not the key of cert_file") == 1
        assert len(await cloud.store.audit_records(SITE)) == 3

        # The rotation completes (the key arrives): the next round connects with the new files.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evcore.edge.cloud"):
            cfg.key_file.write_bytes(new_key)
            assert await link.sync_once(), link.stats.last_error
        assert link.stats.tls_reloads == 1 and link.stats.tls_error == ""
        assert f"TLS files changed; reconnecting as CN={SITE}" in caplog.text
        assert link.stats.audit_contiguous == 5
        held = await cloud.store.audit_records(SITE)
        assert [r.hash for r in held] == [r.hash for r in records[:5]]
        # Unchanged files are not read again; a touched file with the same bytes is no change.
        cfg.cert_file.write_bytes(new_cert)
        for r in records[5:]:
            await store.append_audit(r)
        assert await link.sync_once() and link.stats.audit_contiguous == 7
        assert link.stats.tls_reloads == 1
    finally:
        await link.close()
        await store.close()
