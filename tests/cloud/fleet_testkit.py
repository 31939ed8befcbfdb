"""The cloud with its FleetApi for the fleet tests: a sites' CA and an operators' CA, real mTLS,
the real NATS (127.0.0.1:4222) for the sites' grid subjects, one watcher bus per site reading its
grid subject as the edge does (durable consumer ``edge-grid``, acknowledged after the book took
the signal), so the cloud sees each site take its signals."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from bus_testkit import patient_nats_bus
from cloud_testkit import T0, _load_cert_helpers, stream, wait_until
from evcore.bus import BusMessage, Subscription
from evcore.bus.natsbus import NatsBus
from evcore.bus.subjects import Subjects
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, CloudStore, open_cloud_store
from evcore.cloud.fleet import EDGE_GRID_DURABLE, FleetCoordinator
from evcore.cloud.topology import topology_from_site
from evcore.edge.grid import Curtailment, CurtailmentBook
from evcore.edge.signals import apply_grid_signal
from evcore.site import load_site
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from evcore.v1 import fleet_api_pb2_grpc as fpb_grpc
from evcore.v1.grid_pb2 import GridSignal
from evcore.v1.meter_pb2 import MeterSample, MeterSampleBatch
from evcore.v1.topology_pb2 import SiteTopology

NATS_URL = "nats://127.0.0.1:4222"
OPERATORS = {"aggregator-1": ["grid_operator"], "viewer-1": ["viewer"]}


def nats_bus(site: str, outbox: Path) -> NatsBus:
    return patient_nats_bus(site, NATS_URL, outbox)


def site_table(
    site_id: str, *, power_limit_kw: float, other_load_a: float, chargers: int = 6
) -> dict[str, Any]:
    """A site: grid connection (500 A per phase at 230 V, ``power_limit_kw``, non-charger load at
    most ``other_load_a`` per phase), one feeder, ``chargers`` AC 32 A three-phase chargers."""
    three = {"wiring": "three_phase", "phases": ["L1", "L2", "L3"]}
    return {
        "site": {"id": site_id, "voltage_ln_v": 230.0},
        "nodes": [
            {
                "id": "grid",
                "kind": "grid",
                "phase_limit_a": [500.0] * 3,
                "power_limit_kw": power_limit_kw,
                "other_load_max_a": [other_load_a] * 3,
            },
            {"id": "F1", "parent": "grid", "kind": "feeder", "phase_limit_a": [300.0] * 3},
        ],
        "chargers": [
            {"id": f"C{i}", "parent": "F1", "kind": "ac", "max_a": 32.0, **three}
            for i in range(chargers)
        ],
    }


def topology(table: dict[str, Any]) -> SiteTopology:
    return topology_from_site(load_site(table), config_version="v1")


def batch(t_s: float, amps: dict[str, float], offered_a: float = 32.0) -> MeterSampleBatch:
    b = MeterSampleBatch()
    for cid, a in amps.items():
        s = MeterSample(charger_id=cid, current_a=[a, a, a], offered_current_a=offered_a)
        s.sampled_at.FromSeconds(int(t_s))
        b.samples.append(s)
    return b


@dataclass
class SiteWatch:
    """What one site's grid subject received, applied to the edge's own CurtailmentBook."""

    site_id: str
    signals: list[GridSignal] = field(default_factory=list)
    book: CurtailmentBook = field(default_factory=lambda: CurtailmentBook({"grid"}, lead_s=0.0))
    # The durable consumer reading the grid subject (None: the edge is offline).
    sub: Subscription | None = None
    # Apply each signal as the edge does (evcore.edge.signals.apply_grid_signal: per curtailment
    # id the newest issued_at stands) instead of replacing by id in arrival order.
    clock: ManualClock | None = None
    edge_rules: bool = False

    # What apply_grid_signal needs of the edge controller.
    @property
    def curtailments(self) -> CurtailmentBook:
        return self.book

    def post_curtailment(self, c: Curtailment) -> None:
        self.book.add(c)

    def cancel_curtailment(self, signal_id: str) -> bool:
        return self.book.cancel(signal_id)

    def cap_kw(self, now_s: float) -> float | None:
        """The cap on the grid connection in force at ``now_s`` (None: no cap)."""
        return self.book.caps_kw(now_s).get("grid")

    def held_kw(self) -> float:
        """What the book holds: the sum of its curtailments' limits (0 when it holds none)."""
        return sum(x.max_kw for x in self.book)

    async def on_grid(self, msg: BusMessage) -> None:
        sig = GridSignal()
        sig.ParseFromString(msg.data)
        self.signals.append(sig)
        if self.edge_rules:
            apply_grid_signal(self, msg.data, redelivered=msg.delivery_count > 1)
            return
        c = sig.curtailment
        if c.cancelled:
            self.book.cancel(c.curtailment_id)
        else:
            start = c.start.seconds + c.start.nanos / 1e9
            end = c.end.seconds + c.end.nanos / 1e9
            self.book.add(Curtailment(c.curtailment_id, c.node_id, c.max_kw, start, end))


@dataclass
class FleetCloud:
    port: int
    ca: bytes  # the server's CA (the sites' CA)
    certs: dict[str, tuple[bytes, bytes]]  # sites and operators: (cert, key)
    store: CloudStore
    server: CloudApiServer
    clock: ManualClock
    sites: list[str]
    watches: dict[str, SiteWatch]
    buses: list[NatsBus]

    @property
    def coordinator(self) -> FleetCoordinator:
        assert self.server.fleet is not None
        return self.server.fleet

    async def edge_offline(self, site: str) -> None:
        """The site's edge stops reading its grid subject (its durable keeps its place)."""
        w = self.watches[site]
        assert w.sub is not None
        await w.sub.stop()
        w.sub = None

    async def edge_online(self, site: str) -> None:
        w = self.watches[site]
        bus = self.buses[self.sites.index(site)]
        w.sub = await bus.consume(Subjects(site).grid, durable=EDGE_GRID_DURABLE, handler=w.on_grid)

    async def restart(self) -> None:
        """The cloud stops (its republish task with it) and a new one starts on the same store
        and outbox, with the same clock; the sites' edges go on as they were."""
        await self.server.stop(0.5)
        await self.store.close()
        config = self.server.config
        self.store = open_cloud_store(
            config.store_url,
            read_timeout_s=config.store_read_timeout_s,
            write_timeout_s=config.store_write_timeout_s,
        )
        self.server = CloudApiServer(self.server.config, self.store, clock=self.clock)
        self.port = await self.server.start()

    def held_kw(self) -> float:
        """The fleet total the sites' books hold (a site holding none counts as 0)."""
        return sum(w.held_kw() for w in self.watches.values())

    async def wait_taken(self, fid: str, timeout_s: float = 20.0) -> None:
        """Until every decrease of ``fid``'s latest revision was taken by its edge (as the
        cloud sees it)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (await self.coordinator.revision_plan(fid)).waiting_for:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for the decreases of {fid}")
            await asyncio.sleep(0.05)

    async def wait_published(self, fid: str, revision: int, timeout_s: float = 20.0) -> None:
        """Until the store records ``revision`` of ``fid`` as published (the background task
        marks it just after the outbox took the last signal: the signals may arrive first)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await self.store.fleet_published_revision(fid) < revision:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {fid} revision {revision} published")
            await asyncio.sleep(0.05)

    async def release_increases(self, fid: str, timeout_s: float = 20.0) -> None:
        """Wait until the edges took ``fid``'s decreases, let ``ramp_s`` pass on the manual
        clock, and have the cloud publish the increases (as its republish task does)."""
        await self.wait_taken(fid, timeout_s)
        self.clock.advance(self.coordinator.ramp_s)
        await self.coordinator.republish_pending()

    def channel(self, who: str) -> grpc.aio.Channel:
        cert, key = self.certs[who]
        creds = grpc.ssl_channel_credentials(self.ca, key, cert)
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port}", creds)

    def fleet(self, ch: grpc.aio.Channel) -> fpb_grpc.FleetApiStub:
        return fpb_grpc.FleetApiStub(ch)

    def cloud(self, ch: grpc.aio.Channel) -> pb_grpc.CloudApiStub:
        return pb_grpc.CloudApiStub(ch)

    async def wait_signals(self, counts: dict[str, int], timeout_s: float = 20.0) -> None:
        await wait_until(
            lambda: all(len(self.watches[s].signals) >= n for s, n in counts.items()),
            f"grid signals {counts}",
            timeout_s,
        )

    async def close(self) -> None:
        await self.server.stop(0.5)
        await self.store.close()
        for bus in self.buses:
            await bus.delete_streams()
            await bus.close()


class Sampler:
    """The fleet total the books hold, sampled every 5 ms while a test runs (and at each step)."""

    def __init__(self, f: FleetCloud) -> None:
        self.f = f
        self.max_kw = 0.0
        self._task: asyncio.Task[None] | None = None

    def look(self) -> float:
        kw = self.f.held_kw()
        self.max_kw = max(self.max_kw, kw)
        return kw

    async def _run(self) -> None:
        while True:
            self.look()
            await asyncio.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def fleet_certs(tmp_path: Path, sites: list[str]) -> tuple[Any, Any, str, str, dict[str, Any]]:
    """The sites' CA (it also signs the server's certificate), the operators' CA, and a client
    certificate per site and per operator (plus "stranger", signed but not configured)."""
    helpers = _load_cert_helpers()
    tmp_path.mkdir(parents=True, exist_ok=True)
    site_ca = helpers.CertAuthority(tmp_path, "sites CA")
    op_ca = helpers.CertAuthority(tmp_path, "operators CA")
    server_cert, server_key = site_ca.issue("localhost", server=True)
    certs: dict[str, tuple[bytes, bytes]] = {}
    for name in sites:
        c, k = site_ca.issue(name)
        certs[name] = (Path(c).read_bytes(), Path(k).read_bytes())
    for name in [*OPERATORS, "stranger"]:
        c, k = op_ca.issue(name)
        certs[name] = (Path(c).read_bytes(), Path(k).read_bytes())
    site_ca.ca_pem = site_ca.ca_path.read_bytes()
    return site_ca, op_ca, server_cert, server_key, certs


async def start_fleet_cloud(
    tmp_path: Path,
    store_url: str,
    n_sites: int = 3,
    *,
    now_s: float = T0,
    clock: ManualClock | None = None,
    fleet: dict[str, Any] | None = None,
    edge_rules: bool = False,
    store: dict[str, Any] | None = None,
) -> FleetCloud:
    tag = uuid.uuid4().hex[:8]
    sites = [f"fleet-{tag}-{chr(ord('a') + i)}" for i in range(n_sites)]
    site_ca, op_ca, server_cert, server_key, certs = fleet_certs(tmp_path, sites)
    config = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "tls": {
                "cert_file": server_cert,
                "key_file": server_key,
                "client_ca_file": str(site_ca.ca_path),
            },
            "store": {"url": store_url, **(store or {})},
            "bus": {
                "urls": [NATS_URL],
                "outbox_dir": str(tmp_path / "cloud-outbox"),
                "reconnect_wait_s": 0.1,
                "connect_timeout_s": 2.0,
            },
            "fleet": {
                "operator_ca_file": str(op_ca.ca_path),
                "operators": [{"common_name": n, "roles": r} for n, r in OPERATORS.items()],
                **(fleet or {}),
            },
        },
        tmp_path,
    )
    cloud_store = open_cloud_store(
        config.store_url,
        tmp_path,
        read_timeout_s=config.store_read_timeout_s,
        write_timeout_s=config.store_write_timeout_s,
    )
    clock = clock if clock is not None else ManualClock(now_s)
    server = CloudApiServer(config, cloud_store, clock=clock)
    port = await server.start()
    watches = {s: SiteWatch(s, clock=clock, edge_rules=edge_rules) for s in sites}
    buses = []
    for s in sites:
        bus = nats_bus(s, tmp_path / "watch-outbox")
        await bus.start()
        assert bus.connected, f"nats-server at {NATS_URL} unreachable"
        buses.append(bus)
    f = FleetCloud(port, site_ca.ca_pem, certs, cloud_store, server, clock, sites, watches, buses)
    for s in sites:
        await f.edge_online(s)
    return f


async def put_ten_charger_topologies(f: FleetCloud) -> None:
    """Each site of ``f`` puts a 300 kW site of 10 chargers (``site_table``) as its topology."""
    for site in f.sites:
        async with f.channel(site) as ch:
            table = site_table(site, power_limit_kw=300.0, other_load_a=0.0, chargers=10)
            await f.cloud(ch).PutTopology(topology(table))


async def ten_charger_demand(f: FleetCloud, amps: dict[str, float]) -> None:
    """Each named site's 10 chargers at ``amps`` per phase, offered 63 A (so measured, not
    held)."""
    for site, a in amps.items():
        async with f.channel(site) as ch:
            b = batch(f.clock.now() - 1, {f"C{i}": a for i in range(10)}, offered_a=63.0)
            await f.cloud(ch).UploadTelemetry(stream([b]))
