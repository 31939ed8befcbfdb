"""``evcore cloud serve --config cloud.toml``: serve the CloudApi for many sites until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from evcore.clock import WallClock

if TYPE_CHECKING:
    from evcore.bus.api import Bus
    from evcore.bus.natsbus import NatsConnection
    from evcore.cloud.config import CloudConfig
    from evcore.cloud.consumer import AuditConsumer
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
    from evcore.cloud.store import open_cloud_store
    from evcore.store.base import StoreError

    try:
        config = CloudConfig.from_file(args.config)
        store = open_cloud_store(config.store_url)
    except (CloudConfigError, StoreError) as exc:
        print(f"evcore cloud: {args.config}: {exc}", flush=True)
        return 2
    clock = WallClock()
    server = CloudApiServer(config, store, clock=clock)
    try:
        port = await server.start()
    except (CloudConfigError, StoreError) as exc:
        print(f"evcore cloud: {args.config}: {exc}", flush=True)
        await store.close()
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    consumers, shared = await _start_consumers(config, store, clock)
    fleet = "" if config.fleet is None else ", FleetApi for operators"
    print(f"evcore cloud: CloudApi on port {port}, store {store.description}{fleet}", flush=True)
    try:
        await stop.wait()
    finally:
        for consumer, bus in consumers:
            await consumer.stop()
            await bus.close()
        if shared is not None:
            await shared.close()
        await server.stop()
        await store.close()
    print("evcore cloud: stopped", flush=True)
    return 0


async def _start_consumers(
    config: CloudConfig, store: CloudStore, clock: WallClock
) -> tuple[list[tuple[AuditConsumer, Bus]], NatsConnection | None]:
    """One bus and durable audit consumer per site of ``[bus] sites`` (none without ``[bus]``),
    all over one NATS connection (returned, to be closed after the buses)."""
    if config.bus is None:
        return [], None
    from evcore.bus import bus_from_config, parse_bus_config
    from evcore.cloud.consumer import AuditConsumer

    shared = None
    cfg = parse_bus_config(config.bus)
    if cfg.kind == "nats":
        from evcore.bus.natsbus import NatsConnection as Shared

        # One connection for every site's consumer (one per site did not scale).
        shared = Shared(cfg)
    out: list[tuple[AuditConsumer, Bus]] = []
    for site in config.bus_sites:
        bus = bus_from_config(config.bus, site, clock, connection=shared)
        await bus.start()
        consumer = AuditConsumer(bus, store, clock=clock, durable=config.audit_durable)
        await consumer.start()
        out.append((consumer, bus))
    logging.getLogger("evcore.cloud").info(
        "cloud: consuming audit of %d site(s) over the bus (durable %s)",
        len(out),
        config.audit_durable,
    )
    return out, shared


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
    s.add_argument("--log-level", default="info", help="debug, info, warning, error")
    s.set_defaults(func=_serve)
    from evcore.cloud.fleet_cli import register_curtail, register_sites

    register_curtail(cloud_sub)
    register_sites(cloud_sub)
