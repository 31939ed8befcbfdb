"""``evcore cloud serve --config cloud.toml``: serve the CloudApi for many sites until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from evcore.cli import add_log_level
from evcore.clock import WallClock

log = logging.getLogger("evcore.cloud")

if TYPE_CHECKING:
    from evcore.bus.api import Bus
    from evcore.cloud.config import CloudConfig
    from evcore.cloud.consumer import AuditConsumer
    from evcore.cloud.sitebuses import SiteBuses
    from evcore.cloud.store import CloudStore


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from evcore.cloud.config import CloudConfig, CloudConfigError
    from evcore.cloud.service import CloudApiServer
    from evcore.cloud.sitebuses import SiteBuses, SiteBusUnavailable
    from evcore.cloud.store import open_cloud_store
    from evcore.store.base import StoreError

    try:
        config = CloudConfig.from_file(args.config)
        store = open_cloud_store(
            config.store_url,
            read_timeout_s=config.store_read_timeout_s,
            write_timeout_s=config.store_write_timeout_s,
            open_timeout_s=config.store_open_timeout_s,
        )
    except (CloudConfigError, StoreError) as exc:
        print(f"evcore cloud: {args.config}: {exc}", file=sys.stderr, flush=True)
        return 2
    clock = WallClock()
    # One bus per site for the audit consumers and the fleet's grid publisher alike.
    site_buses = SiteBuses(config.bus, clock) if config.bus is not None else None
    try:
        # Inside: building the server reads the CA files ([tls] client_ca_file, [fleet]
        # operator_ca_file); one missing is said, not a traceback.
        server = CloudApiServer(config, store, clock=clock, site_buses=site_buses)
        port = await server.start()
    except (CloudConfigError, StoreError) as exc:
        print(f"evcore cloud: {args.config}: {exc}", file=sys.stderr, flush=True)
        if site_buses is not None:
            await site_buses.close()
        await store.close()
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    consumers = AuditConsumers(config, store, clock, site_buses, config_file=args.config)
    try:
        await consumers.start()
    except SiteBusUnavailable as exc:
        # A site's outbox that cannot be opened at start (a directory it cannot write, a file
        # where it goes): said, exit 2, as a configuration error (it ended in a traceback).
        print(f"evcore cloud: {args.config}: {exc}", file=sys.stderr, flush=True)
        await consumers.stop()
        await server.stop()
        if site_buses is not None:
            await site_buses.close()
        await store.close()
        return 2
    fleet = "" if config.fleet is None else ", FleetApi for operators"
    print(f"evcore cloud: CloudApi on port {port}, store {store.description}{fleet}", flush=True)
    try:
        await stop.wait()
    finally:
        await consumers.stop()
        await server.stop()
        if site_buses is not None:
            await site_buses.close()
        await store.close()
    print("evcore cloud: stopped", flush=True)
    return 0


class AuditConsumers:
    """The cloud's durable audit consumers, one per site (``[bus] sites``), on the sites' buses
    of ``buses`` (every site's over one NATS connection, shared with the fleet's grid
    publisher); with ``sites = "*"`` every site the store knows, looked for again every
    ``discover_s`` (a new site's audit is read without a restart). With a list, a site the
    store knows that the list does not name is an error in the log, once, naming the site and
    ``[bus] sites`` (``unlisted``): the cloud neither makes its streams nor reads it."""

    def __init__(
        self,
        config: CloudConfig,
        store: CloudStore,
        clock: WallClock,
        buses: SiteBuses | None,
        *,
        config_file: str = "cloud.toml",
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._buses = buses
        self._config_file = config_file
        self.by_site: dict[str, tuple[AuditConsumer, Bus]] = {}
        #: Sites said by ``unlisted`` (each once per process).
        self.unlisted_said: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self._config
        if config.bus is None or self._buses is None:
            return
        for site in config.bus_sites:
            await self.add(site)
        if config.bus_discover:
            await self.discover()
            self._task = asyncio.get_running_loop().create_task(
                self._discover_loop(), name="cloud-audit-discover"
            )
        elif config.bus_sites:
            # A site that reaches the cloud without being listed got nothing, without a word:
            # no streams (an edge with manage_streams = false cannot make them), no audit read.
            self._task = asyncio.get_running_loop().create_task(
                self._unlisted_loop(), name="cloud-audit-unlisted"
            )
        log.info(
            "cloud: consuming audit of %d site(s) over the bus (durable %s)%s",
            len(self.by_site),
            config.audit_durable,
            ", and of every new site" if config.bus_discover else "",
        )

    async def add(self, site: str) -> None:
        from evcore.cloud.consumer import AuditConsumer

        if site in self.by_site or self._buses is None:
            return
        bus = await self._buses.get(site)
        durable = self._config.audit_durable
        consumer = AuditConsumer(bus, self._store, clock=self._clock, durable=durable)
        await consumer.start()
        self.by_site[site] = (consumer, bus)

    async def discover(self) -> list[str]:
        """Start consumers for the sites the store knows and none reads yet; their ids. A site
        whose bus cannot be opened (``SiteBusUnavailable``: its outbox) is logged and looked for
        again at the next round; the others are read (it ended the look, so every site after it
        was never read, and with ``sites = "*"`` the command did not start)."""
        from evcore.cloud.sitebuses import SiteBusUnavailable

        known = await self._store.site_activity()
        added: list[str] = []
        for site in sorted(set(known) - set(self.by_site)):
            try:
                await self.add(site)
            except SiteBusUnavailable as exc:
                log.warning(
                    "cloud: cannot read the audit of site %r over the bus yet (looked for again "
                    "in %g s): %s",
                    site,
                    self._config.discover_s,
                    exc,
                )
                continue
            log.info("cloud: reading the audit of site %r over the bus (new site)", site)
            added.append(site)
        return added

    async def unlisted(self) -> list[str]:
        """Sites the store knows (a topology, audit or telemetry stored) that ``[bus] sites``
        does not list, not said before: each logged at ERROR, naming the site, the key and the
        file. The cloud does not take them up by itself: the list is the operator's choice of
        sites served over the bus (``sites = "*"`` takes every site)."""
        known = await self._store.site_activity()
        new = sorted(set(known) - set(self._config.bus_sites) - self.unlisted_said)
        for site in new:
            log.error(
                "cloud: site %r reaches the cloud but is not in [bus] sites of %s: the cloud "
                "does not make its NATS streams or read its audit over the bus (an edge with "
                "[bus] manage_streams = false keeps its events in its outbox); add it to "
                '[bus] sites, or set sites = "*" (every site the cloud knows), and restart',
                site,
                self._config_file,
            )
            self.unlisted_said.add(site)
        return new

    async def _unlisted_loop(self) -> None:
        while True:
            try:
                await self.unlisted()
            except Exception:  # the store is away: the next round looks again
                log.warning("cloud: looking for unlisted sites failed", exc_info=True)
            await self._clock.sleep(self._config.discover_s)

    async def _discover_loop(self) -> None:
        while True:
            await self._clock.sleep(self._config.discover_s)
            try:
                await self.discover()
            except Exception:  # the store is away: the next round looks again
                log.warning("cloud: looking for new sites failed", exc_info=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for consumer, _ in self.by_site.values():
            await consumer.stop()
        self.by_site.clear()  # (the buses are ``SiteBuses``': closed with it)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cloud",
        help="the cloud service for many sites",
        description="The cloud side: serves evcore.v1.CloudApi to the sites' edges (audit and "
        "telemetry uploads, topologies, plans). See docs/cloud.md.",
    )
    cloud_sub = p.add_subparsers(dest="cloud_command", metavar="SUBCOMMAND", required=True)
    s = cloud_sub.add_parser(
        "serve",
        help="serve the CloudApi",
        description="Serve evcore.v1.CloudApi with mTLS (a site's client certificate CN is its "
        "site id), health and reflection, over the store the config names. Stops on "
        "SIGINT/SIGTERM, letting calls in flight finish (stop_grace_s).",
    )
    s.add_argument("--config", required=True, help="cloud.toml (see cloud/cloud.example.toml)")
    add_log_level(s)
    s.set_defaults(func=_serve)
    from evcore.cloud.fleet_cli import register_curtail, register_sites

    register_curtail(cloud_sub)
    register_sites(cloud_sub)
