"""``evcore csms`` (run the central system alone) and ``evcore simcp`` (run simulated stations)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any


def _stop_on_signals() -> asyncio.Event:
    """An event SIGINT and SIGTERM set from now on (``_run_for`` ends on it). csms installs
    it before it starts: installed only after the start line, and not at all under
    ``--seconds``, a supervisor's SIGTERM right after that line killed the process by the
    signal (exit -15) without closing the stations' connections."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_for(seconds: float, stop: asyncio.Event) -> None:
    """``--seconds``: run that long (0: for ever), or until ``stop`` (SIGINT/SIGTERM)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds or None)


async def _csms(args: argparse.Namespace) -> int:
    from evcore.clock import WallClock
    from evcore.ocpp import CentralSystem
    from evcore.site import load_site

    stop = _stop_on_signals()
    site = load_site(args.config)
    cs = CentralSystem(site, clock=WallClock())
    sections = dict(site.sections)
    if args.port is not None:
        from dataclasses import replace

        cs.config = replace(cs.config, port=args.port)
        sections["ocpp"] = {**(sections.get("ocpp") or {}), "port": args.port}
    from evcore.site.cli import station_warnings

    # As evcore edge and evcore site check say at every start: stations left open (security
    # profile 0: any client with their id is taken for them), stations that will be refused
    # for want of a password, credentials of no charger. Before, csms said nothing.
    base_dir = site.path.resolve().parent if site.path is not None else Path.cwd()
    for warning in station_warnings(site, sections, base_dir):
        print(f"evcore csms: {args.config}: warning: {warning}", file=sys.stderr, flush=True)
    if not args.quiet:
        cs.add_listener(lambda ev: print(ev, flush=True))
    await cs.start()
    print(
        f"central system for site {site.id!r} on port {cs.port} "
        f"(path {cs.config.path_prefix}/<ocpp_id>, security profile {cs.config.security_profile})",
        flush=True,
    )
    try:
        await _run_for(args.seconds, stop)
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
    url = args.url or _default_url(cfg)
    ssl_context = None
    if url.startswith("wss://"):
        import ssl

        try:
            ssl_context = ssl.create_default_context(cafile=args.ca)
        except (OSError, ssl.SSLError) as exc:
            print(f"evcore simcp: --ca {args.ca}: {exc}", file=sys.stderr, flush=True)
            return 2
    fleet = Fleet(
        site,
        url=url,
        clock=WallClock(),
        version=args.ocpp,
        passwords=passwords,
        ssl_context=ssl_context,
        sample_interval_s=args.sample_interval,
    )
    await fleet.start()
    try:
        await fleet.wait_connected(args.connect_timeout)
    except TimeoutError:
        missing = [  # (before stop(), which clears every station's connected flag)
            f"{sid} ({sim.last_error or 'no answer'})"
            for sid, sim in fleet.stations.items()
            if not sim.connected.is_set()
        ]
        await fleet.stop()
        print(
            f"evcore simcp: {len(missing)} of {len(fleet.stations)} stations not connected to "
            f"{url} within {args.connect_timeout:g} s: {', '.join(missing)}. Is the central "
            "system running there, and does its [ocpp] section hold these stations' passwords?",
            file=sys.stderr,
            flush=True,
        )
        return 1
    # (Not before: while the stations connect, ^C or SIGTERM ends the process at once.)
    stop = _stop_on_signals()
    if args.plug_in:
        for cid in fleet.charger_ids:
            fleet.plug_in(cid, EV(soc=0.3))
    print(f"{len(fleet.stations)} simulated stations connected to {url}", flush=True)
    try:
        await _run_for(args.seconds, stop)
    finally:
        await fleet.stop()
    return 0


def _default_url(cfg: Any) -> str:
    """Where [ocpp] listens, as a station on this host reaches it: wss:// when it serves TLS
    (security profile 2 or 3), a wildcard listen address as the loopback one."""
    scheme = "wss" if cfg.tls_cert else "ws"
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(cfg.host, cfg.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{cfg.port}{cfg.path_prefix}"


def _ws_url(text: str) -> str:
    if not text.startswith(("ws://", "wss://")):
        raise argparse.ArgumentTypeError(f"must be a ws:// or wss:// URL, got {text!r}")
    return text


def register(sub: Any) -> None:
    from evcore.cli import port_arg, positive_seconds_arg, seconds_arg

    p = sub.add_parser(
        "csms",
        help="run the OCPP central system alone (prints its events)",
        description="Run the OCPP 1.6J / 2.0.1 central system of a site file's [ocpp] section "
        "(no control loop: it sends no profiles) and print every event it publishes. Stations "
        "connect to ws[s]://HOST:PORT/ocpp/<ocpp_id> with the security profile and credentials "
        "of [ocpp]. Stops on SIGINT/SIGTERM or after --seconds. See docs/ocpp.md.",
    )
    p.add_argument("--config", required=True, help="site file (TOML) with an [ocpp] section")
    p.add_argument("--port", type=port_arg, default=None, help="override [ocpp].port")
    p.add_argument(
        "--seconds", type=seconds_arg, default=0, help="stop after this long (0: until ^C)"
    )
    p.add_argument("--quiet", action="store_true", help="do not print events")
    p.add_argument("-v", "--verbose", action="store_true", help="log connections at INFO")
    p.set_defaults(func=lambda a: _main(_csms, a, "evcore csms"))

    s = sub.add_parser(
        "simcp",
        help="run simulated OCPP stations for every charger of a site",
        description="Connect one simulated charge point per OCPP id of a site file to a central "
        "system (evcore csms or evcore edge), with the passwords of its [ocpp] credentials, "
        "and keep them connected; with --plug-in an EV charges at every charger. Security "
        "profiles 0-2 (not 3: no station certificates). Exits 1 when a station is not "
        "connected within --connect-timeout. See docs/ocpp.md.",
    )
    s.add_argument("--config", required=True, help="site file (TOML)")
    s.add_argument(
        "--url",
        type=_ws_url,
        default=None,
        help="ws[s]://host:port/prefix (default: [ocpp] host, port and path_prefix; wss:// when "
        "it has tls_cert)",
    )
    s.add_argument(
        "--ca",
        default=None,
        help="CA bundle (PEM) to verify the central system's certificate over wss:// "
        "(default: the system's)",
    )
    s.add_argument(
        "--ocpp", choices=("1.6", "2.0.1"), default="1.6", help="OCPP version (default 1.6)"
    )
    s.add_argument("--plug-in", action="store_true", help="plug an EV into every charger")
    s.add_argument(
        "--sample-interval",
        type=positive_seconds_arg,
        default=10.0,
        help="seconds between meter values (default 10)",
    )
    s.add_argument(
        "--seconds", type=seconds_arg, default=0, help="stop after this long (0: until ^C)"
    )
    s.add_argument(
        "--connect-timeout",
        type=positive_seconds_arg,
        default=30.0,
        help="seconds for every station to connect (default 30)",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="log connections at INFO")
    s.set_defaults(func=lambda a: _main(_simcp, a, "evcore simcp"))


def _main(fn: Any, args: argparse.Namespace, prog: str) -> int:
    from evcore.ocpp.config import OcppConfigError
    from evcore.site import SiteConfigError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(asyncio.run(fn(args)))
    except (SiteConfigError, OcppConfigError, ValueError) as exc:
        # A missing or malformed site file: the file, the node or section and the key; or a
        # site the central system refuses (two chargers on one station's EVSE).
        print(f"{prog}: {args.config}: {exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # the port taken, a TLS file that does not load
        print(f"{prog}: {args.config}: could not start: {exc}", file=sys.stderr, flush=True)
        return 1
