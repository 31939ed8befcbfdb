"""``evcore csms`` (run the central system alone) and ``evcore simcp`` (run simulated stations)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _run_for(seconds: float) -> None:
    """``--seconds``: run that long, or until SIGINT/SIGTERM when 0."""
    if seconds:
        await asyncio.sleep(seconds)
    else:
        await _until_signal()


async def _csms(args: argparse.Namespace) -> int:
    from evcore.clock import WallClock
    from evcore.ocpp import CentralSystem
    from evcore.site import load_site

    site = load_site(args.config)
    cs = CentralSystem(site, clock=WallClock())
    if args.port is not None:
        from dataclasses import replace

        cs.config = replace(cs.config, port=args.port)
    if not args.quiet:
        cs.add_listener(lambda ev: print(ev, flush=True))
    await cs.start()
    print(
        f"central system for site {site.id!r} on port {cs.port} "
        f"(path {cs.config.path_prefix}/<ocpp_id>, security profile {cs.config.security_profile})",
        flush=True,
    )
    try:
        await _run_for(args.seconds)
    finally:
        await cs.stop()
    return 0


async def _simcp(args: argparse.Namespace) -> int:
    from evcore.clock import WallClock
    from evcore.ocpp.config import parse_ocpp_section
    from evcore.sim.ev import EV
    from evcore.sim.fleet import Fleet
    from evcore.site import load_site

    site = load_site(args.config)
    cfg = parse_ocpp_section(
        site.sections.get("ocpp"), base_dir=site.path.parent if site.path else None
    )
    passwords = {k: c.password for k, c in cfg.credentials.items() if c.password}
    url = args.url or f"ws://{cfg.host}:{cfg.port}{cfg.path_prefix}"
    fleet = Fleet(
        site,
        url=url,
        clock=WallClock(),
        version=args.ocpp,
        passwords=passwords,
        sample_interval_s=args.sample_interval,
    )
    await fleet.start()
    await fleet.wait_connected(30)
    if args.plug_in:
        for cid in fleet.charger_ids:
            fleet.plug_in(cid, EV(soc=0.3))
    print(f"{len(fleet.stations)} simulated stations connected to {url}", flush=True)
    try:
        await _run_for(args.seconds)
    finally:
        await fleet.stop()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("csms", help="run the OCPP central system alone (prints its events)")
    p.add_argument("--config", required=True, help="site file (TOML) with an [ocpp] section")
    p.add_argument("--port", type=int, default=None, help="override [ocpp].port")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until ^C)")
    p.add_argument("--quiet", action="store_true", help="do not print events")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=lambda a: _main(_csms, a))

    s = sub.add_parser("simcp", help="run simulated OCPP stations for every charger of a site")
    s.add_argument("--config", required=True, help="site file (TOML)")
    s.add_argument("--url", default=None, help="ws[s]://host:port/prefix (default from [ocpp])")
    s.add_argument("--ocpp", choices=("1.6", "2.0.1"), default="1.6")
    s.add_argument("--plug-in", action="store_true", help="plug an EV into every charger")
    s.add_argument("--sample-interval", type=float, default=10.0)
    s.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until ^C)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=lambda a: _main(_simcp, a))


def _main(fn: Any, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    return int(asyncio.run(fn(args)))
