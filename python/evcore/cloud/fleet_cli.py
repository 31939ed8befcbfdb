"""``evcore cloud curtail`` and ``evcore cloud sites``: an operator's command line to the cloud's
FleetApi (docs/cloud.md).

It only calls the service: the split, its checks and the publishing happen in the cloud. Exit
status: 0 done; 3 done but INFEASIBLE (every site at its floor, the shortfall printed); 2 refused
(the service's status and message, which names the field) or unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from evcore.cli import positive_seconds_arg

EXIT_INFEASIBLE = 3
EXIT_REFUSED = 2


def _time(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if t.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +01:00)")
    return t


def _sites(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _result_dict(res: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    # Every field, false and 0 included: "feasible": false must be read, not inferred.
    return MessageToDict(
        res, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print_result(res: Any, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_result_dict(res), indent=2))
        return
    from evcore.v1.fleet_api_pb2 import DemandSource

    c = res.curtailment
    state = "CANCELLED" if res.cancelled else ("ok" if res.feasible else "INFEASIBLE")
    print(
        f"{c.fleet_curtailment_id} revision {res.revision}: {state}; "
        f"{res.allocated_kw:.3f} kW of {c.max_kw:.3f} kW over {len(res.shares)} site(s)"
    )
    if res.detail:
        print(f"  {res.detail}")
    print(f"  {'site':<24} {'max_kw':>10} {'floor_kw':>10} {'grid_kw':>10} {'demand_kw':>10}  from")
    for s in res.shares:
        source = DemandSource.Name(s.demand_source).removeprefix("DEMAND_SOURCE_").lower()
        print(
            f"  {s.site_id:<24} {s.max_kw:>10.3f} {s.floor_kw:>10.3f} {s.grid_limit_kw:>10.3f} "
            f"{s.demand_kw:>10.3f}  {source}"
        )


def _channel(args: argparse.Namespace, prog: str) -> tuple[Any, tuple[tuple[str, str], ...]] | None:
    """The channel to the cloud (mTLS with the operator's certificate, or plaintext with the
    operator header) and the metadata to send; None after saying on stderr what is missing."""
    import grpc

    from evcore.cloud.auth import OPERATOR_HEADER

    if args.insecure:
        if not args.operator:
            print(f"{prog}: --insecure needs --operator NAME", file=sys.stderr)
            return None
        return grpc.aio.insecure_channel(args.target), ((OPERATOR_HEADER, args.operator),)
    if not (args.ca and args.cert and args.key):
        print(
            f"{prog}: --ca, --cert and --key are required (an operator "
            "certificate), or --insecure --operator for a development server",
            file=sys.stderr,
        )
        return None
    ca, cert, key = args.pems
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.aio.secure_channel(args.target, creds), ()


def _age(now_s: float, ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    age = now_s - (ts.seconds + ts.nanos / 1e9)
    return f"{age:.0f} s ago" if age < 120 else f"{age / 60:.0f} min ago"


def _when(ts: Any) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, dt.UTC).isoformat()


def _print_sites(res: Any, *, as_json: bool) -> None:
    from google.protobuf.json_format import MessageToDict

    if as_json:
        d = MessageToDict(
            res, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(d, indent=2))
        return
    now = res.now.seconds + res.now.nanos / 1e9
    print(
        f"{'site':<24} {'topo':>4} {'audit seq':>10} {'gap-free':>9} {'audit':>12} "
        f"{'telemetry':>12} {'last seen':>12}"
    )
    for st in res.sites:
        seq = str(st.audit_last_seq) if st.audit_held else "-"
        print(
            f"{st.site_id:<24} {st.topology_version:>4} {seq:>10} "
            f"{st.audit_contiguous_count:>9} {_age(now, st.audit_last_decided_at):>12} "
            f"{_age(now, st.telemetry_last_sample_at):>12} {_age(now, st.last_seen_at):>12}"
        )
        for fs in st.fleet_shares:
            state = "in force" if fs.in_force else "pending"
            if fs.increase_waiting:
                if fs.waiting_for:
                    state += ", INCREASE WAITS for the decreases at " + ", ".join(fs.waiting_for)
                else:
                    state += f", INCREASE WAITS for the ramp until {_when(fs.waiting_until)}"
            elif not fs.published:
                state += ", NOT PUBLISHED YET"
            if fs.site_revision:
                # (site_max_kw is 0 for a cancel too: a 0 kW limit is no cancel.)
                held = "cancel" if fs.site_cancel else f"{fs.site_max_kw:.3f} kW"
                took = "taken by its edge" if fs.taken else "NOT TAKEN by its edge yet"
                state += f"; site has r{fs.site_revision} ({held}), {took}"
            if fs.HasField("untaken_since"):
                state += f" (signals untaken since {_when(fs.untaken_since)})"
            if fs.counted_unresponsive:
                state += (
                    f"; COUNTED at {fs.counted_kw:.3f} kW, what it may still hold (its edge took "
                    "nothing for ack_timeout_s): the others share the rest"
                )
            print(
                f"  fleet {fs.fleet_curtailment_id} r{fs.revision}: {fs.share.max_kw:.3f} kW "
                f"(floor {fs.share.floor_kw:.3f}, grid limit {fs.share.grid_limit_kw:.3f}); "
                f"{state}"
            )


async def _sites_call(args: argparse.Namespace) -> int:
    import grpc

    from evcore.v1 import fleet_api_pb2 as fpb
    from evcore.v1 import fleet_api_pb2_grpc as fpb_grpc

    opened = _channel(args, "evcore cloud sites")
    if opened is None:
        return EXIT_REFUSED
    channel, metadata = opened
    async with channel:
        try:
            res = await fpb_grpc.FleetApiStub(channel).ListSites(
                fpb.ListSitesRequest(site_ids=args.site or []),
                metadata=metadata,
                timeout=args.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            print(
                f"evcore cloud sites: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_REFUSED
    _print_sites(res, as_json=args.json)
    return 0


async def _call(args: argparse.Namespace) -> int:
    import grpc

    from evcore.api.convert import timestamp
    from evcore.v1 import fleet_api_pb2 as fpb
    from evcore.v1 import fleet_api_pb2_grpc as fpb_grpc

    opened = _channel(args, "evcore cloud curtail")
    if opened is None:
        return EXIT_REFUSED
    channel, metadata = opened
    async with channel:
        stub = fpb_grpc.FleetApiStub(channel)
        try:
            if args.list:
                listed = await stub.List(
                    fpb.ListFleetCurtailmentsRequest(include_cancelled=args.all),
                    metadata=metadata,
                    timeout=args.timeout,
                )
                if args.json:
                    # One document: a list, [] when there are none.
                    print(json.dumps([_result_dict(r) for r in listed.curtailments], indent=2))
                    return 0
                for r in listed.curtailments:
                    _print_result(r, as_json=False)
                return 0
            if args.cancel or args.resplit:
                ref = fpb.FleetCurtailmentRef(fleet_curtailment_id=args.cancel or args.resplit)
                method = stub.Cancel if args.cancel else stub.Resplit
                res = await method(ref, metadata=metadata, timeout=args.timeout)
            else:
                missing = [
                    f"--{k.replace('_', '-')}"
                    for k in ("id", "sites", "max_kw", "start", "end")
                    if getattr(args, k) is None
                ]
                if missing:
                    print(f"evcore cloud curtail: missing {', '.join(missing)}", file=sys.stderr)
                    return EXIT_REFUSED
                req = fpb.FleetCurtailment(
                    fleet_curtailment_id=args.id,
                    site_ids=args.sites,
                    max_kw=args.max_kw,
                    issuer=args.issuer,
                    require_feasible=args.require_feasible,
                )
                req.start.CopyFrom(timestamp(args.start.timestamp()))
                req.end.CopyFrom(timestamp(args.end.timestamp()))
                res = await stub.Curtail(req, metadata=metadata, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(
                f"evcore cloud curtail: {exc.code().name}: {exc.details()}",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_REFUSED
    _print_result(res, as_json=args.json)
    if not res.feasible and not res.cancelled:
        print(
            f"evcore cloud curtail: INFEASIBLE: the fleet limit cannot be met; short by "
            f"{res.shortfall_kw:.3f} kW with every site at its floor",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INFEASIBLE
    return 0


def _read_pems(args: argparse.Namespace, prog: str) -> bool:
    args.pems = None
    if not args.insecure and args.ca and args.cert and args.key:
        files = [*(("--ca", ca) for ca in args.ca), ("--cert", args.cert), ("--key", args.key)]
        pems: list[bytes] = []
        for option, path in files:
            try:
                pems.append(Path(path).read_bytes())
            except OSError as exc:
                print(f"{prog}: {option} {path}: {exc.strerror or exc}", file=sys.stderr)
                return False
        # Every --ca trusted: one bundle of their certificates (a repeated --ca kept only the
        # last, without a word).
        cas = b"".join(pem.rstrip(b"\n") + b"\n" for pem in pems[:-2])
        args.pems = (cas, pems[-2], pems[-1])
    return True


def _run(args: argparse.Namespace) -> int:
    if not _read_pems(args, "evcore cloud curtail"):
        return EXIT_REFUSED
    return asyncio.run(_call(args))


def _run_sites(args: argparse.Namespace) -> int:
    if not _read_pems(args, "evcore cloud sites"):
        return EXIT_REFUSED
    return asyncio.run(_sites_call(args))


def _connection_args(p: Any) -> None:
    p.add_argument("--target", required=True, help="host:port of evcore cloud serve")
    p.add_argument(
        "--ca",
        action="append",
        help="CA certificate(s) the cloud's server certificate chains to (PEM; a bundle of "
        "several is trusted whole; repeat the option for more files, e.g. the new and the old "
        "CA during a rotation)",
    )
    p.add_argument("--cert", help="operator client certificate (PEM, signed by the operator CA)")
    p.add_argument("--key", help="its private key (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext development server")
    p.add_argument("--operator", help="with --insecure: the configured operator to act as")


def register_sites(cloud_sub: Any) -> None:
    p = cloud_sub.add_parser(
        "sites",
        help="what the cloud holds of each site (FleetApi ListSites)",
        description="Per site: audit chain progress (highest seq, records without a gap from 0), "
        "newest audit decision and telemetry sample, last seen, topology version, and its share "
        "of every active fleet curtailment. Any operator role. Exit 0, or 2 refused (the "
        "service's status). See docs/cloud.md.",
    )
    _connection_args(p)
    p.add_argument("--site", action="append", help="only this site (repeat for more)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument(
        "--timeout",
        type=positive_seconds_arg,
        default=15.0,
        help="seconds to wait for the cloud (default 15)",
    )
    p.set_defaults(func=_run_sites)


def register_curtail(cloud_sub: Any) -> None:
    p = cloud_sub.add_parser(
        "curtail",
        help="split a limit on several sites' total power (FleetApi)",
        description="Ask the cloud's FleetApi to split 'these sites together at most MAX_KW from "
        "START to END' into one curtailment per site (published on each site's grid subject); "
        "or re-split, cancel or list. Exit 0 done, 3 infeasible (sites at their floors), 2 "
        "refused. See docs/cloud.md.",
    )
    _connection_args(p)
    p.add_argument(
        "--id",
        help="fleet curtailment id: a new one needs it with --sites, --max-kw, --start and --end "
        "(the same id again replaces the split)",
    )
    p.add_argument("--sites", type=_sites, help="comma-separated site ids")
    p.add_argument("--max-kw", type=float, help="most total power of the sites in kW")
    p.add_argument("--start", type=_time, help="ISO 8601 time with zone (T1)")
    p.add_argument("--end", type=_time, help="ISO 8601 time with zone (T2)")
    p.add_argument("--issuer", default="operator", help="who issued it (default operator)")
    p.add_argument(
        "--require-feasible",
        action="store_true",
        help="refuse (nothing published) when the sites' floors exceed the limit",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resplit", metavar="ID", help="split a held one again on current demand")
    mode.add_argument("--cancel", metavar="ID", help="cancel at every site")
    mode.add_argument("--list", action="store_true", help="list held fleet curtailments")
    p.add_argument("--all", action="store_true", help="with --list: include cancelled ones")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--timeout",
        type=positive_seconds_arg,
        default=15.0,
        help="seconds to wait for the cloud (default 15)",
    )
    p.set_defaults(func=_run)
