"""``evcore edge --config SITE_FILE``: run the edge controller for one site until a signal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from evcore.cli import add_log_level
from evcore.clock import WallClock
from evcore.edge.config import POLICIES

#: ``evcore edge``'s exit codes (docs/edge.md, "Exit codes"): 0 stopped by SIGINT/SIGTERM; 1 the
#: start failed on what the machine holds (a port taken, a store that does not open), which a
#: restart may cure; 2 a usage or configuration error (as argparse's own), which it will not.
EXIT_START_FAILED = 1
EXIT_CONFIG = 2


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The site file's directory (relative paths in its sections), found before the event loop.
    args.config_dir = os.path.dirname(os.path.abspath(args.config))
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from evcore.edge.app import EdgeApp
    from evcore.edge.config import EdgeConfig, EdgeConfigError
    from evcore.site import SiteConfigError, read_site_file

    clock = WallClock()
    try:
        table = read_site_file(args.config)
    except SiteConfigError as exc:
        # Missing, unreadable, not TOML: a configuration error, exit 2 like every other one
        # (it exited 1, as a failed start does, through a SystemExit with a message).
        print(f"evcore edge: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # What `evcore site check` refuses, the edge refuses too: an unknown top-level table (a
    # `[metric]` typo ran without its metrics endpoint, silently) and every section's first error.
    from evcore.site.cli import section_errors

    problems = section_errors(table, args.config_dir)
    if problems:
        for problem in problems:
            print(f"evcore edge: {args.config}: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = EdgeConfig.from_site(table, policy=args.policy or None)
    except EdgeConfigError as exc:
        print(f"evcore edge: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    site = table.get("site")
    if not isinstance(site, dict) or not isinstance(site.get("id"), str) or not site["id"]:
        print(f"evcore edge: {args.config}: [site] id is required (a string)", file=sys.stderr)
        return EXIT_CONFIG
    bus: Any = None
    try:
        if "bus" in table:
            from evcore.bus import bus_from_config

            bus = bus_from_config(table.get("bus"), site["id"], clock)
        app = EdgeApp.from_file(args.config, clock, cfg=cfg, bus=bus)
    except (ValueError, KeyError) as exc:
        print(f"evcore edge: {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from evcore.site.cli import station_warnings

    # What loads but an operator should know of at every start (in the journal): stations left
    # open (security profile 0), stations that will be refused for want of a password.
    for warning in station_warnings(app.site, table, args.config_dir):
        print(f"evcore edge: {args.config}: warning: {warning}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, app.stop)
    runner = asyncio.ensure_future(app.run())
    ready = asyncio.ensure_future(app.ready.wait())
    # A start that fails (the OCPP port taken, a store that does not open, ...) ends run()
    # before ready: say why and exit non-zero, so that a supervisor restarts or alerts (before,
    # the process waited for ever, printing nothing, deaf to SIGTERM).
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        error = runner.exception() if not runner.cancelled() else None
        print(
            f"evcore edge: {args.config}: could not start: {error!r}", file=sys.stderr, flush=True
        )
        logging.getLogger("evcore.edge").error("start failed", exc_info=error)
        return EXIT_START_FAILED
    api = f", API on port {app.api_port}" if app.api is not None else ""
    metrics = f", metrics on port {app.metrics_port}" if app.metrics is not None else ""
    print(
        f"evcore edge: site {table['site']['id']} OCPP on port {app.central.port}{api}{metrics}",
        flush=True,
    )
    await runner
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "edge",
        help="run the edge controller for a site",
        description="Run the closed control loop (OCPP central system, allocator and envelope, "
        "failsafes, grid signals) for the site file. Stops on SIGINT/SIGTERM. See docs/edge.md.",
        epilog="exit codes: 0: stopped by SIGINT or SIGTERM; 1: the start failed (a port "
        "taken, a store that does not open: a restart may cure it); 2: a usage or configuration "
        "error (a wrong argument; the site file missing, unreadable, not TOML or invalid).",
    )
    p.add_argument(
        "--config", required=True, help="site file (TOML) with an optional [edge] section"
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        help="override [edge] policy",
    )
    add_log_level(p)
    p.set_defaults(func=_run)
