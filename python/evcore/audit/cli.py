"""``evcore audit verify`` and ``evcore audit show``: check and explain the decision trail.

Both read a store named by ``--config SITE_FILE`` (its ``[store]`` section) or ``--store URL``
(``sqlite:DIR``, a directory, or ``postgresql://…?schema=NAME``). They only read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from evcore.audit.chain import verify_chain
from evcore.audit.log import TIMESTAMP_MAX_S, TIMESTAMP_MIN_S
from evcore.clock import Clock, WallClock
from evcore.store import SqlStore, StoreConfigError, StoreError, open_store, open_store_url
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.setpoint_pb2 import BindingReason, Setpoint

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_time(text: str, clock: Clock) -> float:
    """ISO 8601 (``2026-01-01T08:00:00Z``; naive means UTC), epoch seconds, or an age such as
    ``15m``, ``2h``, ``1d`` (that long before now)."""
    t = text.strip()
    m = _RELATIVE.match(t)
    if m:
        return _finite(clock.now() - float(m.group(1)) * _UNIT_S[m.group(2)], text)
    try:
        seconds: float | None = float(t)
    except ValueError:
        seconds = None
    if seconds is not None:
        _finite(seconds, text)
        if not TIMESTAMP_MIN_S <= seconds <= TIMESTAMP_MAX_S + 1:
            # No record lies there (the audit log refuses such times), so the answer would be a
            # silent "no decisions": say that it looks like milliseconds instead.
            hint = ""
            if TIMESTAMP_MIN_S <= seconds / 1000 <= TIMESTAMP_MAX_S:
                hint = f"; as milliseconds it is {_iso(seconds / 1000)}, give {seconds / 1000:.3f}"
            raise ValueError(
                f"time {text!r} as epoch seconds is outside years 1..9999 (milliseconds?){hint}"
            )
        return seconds
    if t[-1:] in ("Z", "z"):  # RFC 3339 allows a lowercase z
        t = t[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(
            f"time {text!r} is not ISO 8601 (2026-01-01T08:00:00Z), epoch seconds or an age "
            "like 15m / 2h / 1d"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _finite(t: float, text: str) -> float:
    # float() takes "nan", "inf" and "1e400"; no record was decided at such a time.
    if not math.isfinite(t):
        raise ValueError(f"time {text!r} is not a finite time")
    return t


def _time_arg(text: str) -> float:
    """``--since``/``--until``: refused by argparse when it is no time (ages count from now)."""
    try:
        return parse_time(text, WallClock())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# SQL's largest integer (SQLite and PostgreSQL BIGINT): a LIMIT above it overflows.
_LIMIT_MAX = 2**63 - 1


def _limit_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= _LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"must be at least 1 (and at most 2**63 - 1), got {n}")
    return n


def store_from_args(args: argparse.Namespace) -> SqlStore:
    if args.store:
        return open_store_url(args.store, Path.cwd(), must_exist=True)
    if not args.config:
        raise StoreError("name the store: --config SITE_FILE or --store URL")
    path = Path(args.config)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise StoreError(f"cannot read site file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise StoreError(f"site file {path} is not UTF-8 text as TOML must be ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise StoreError(f"site file {path} is not valid TOML: {exc}") from exc
    section = doc.get("store")
    if section is not None and not isinstance(section, dict):
        raise StoreError(f"site file {path}: [store] must be a table")
    try:
        return open_store(section, path.resolve().parent, must_exist=True)
    except StoreConfigError as exc:  # the key and value; the file they are in
        raise StoreConfigError(f"site file {path}: {exc}") from None


def _iso(seconds: float) -> str:
    try:
        return (
            datetime.fromtimestamp(seconds, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
    except (OverflowError, OSError, ValueError):
        # A record written with such a time (before the audit log refused one) is still shown.
        return f"{seconds:.3f}s-since-1970(not-a-calendar-time)"


def _bad_time(ts: Timestamp) -> str | None:
    """What ``json_format`` would refuse in this timestamp, said as text (None: it is valid)."""
    if TIMESTAMP_MIN_S <= ts.seconds <= TIMESTAMP_MAX_S and 0 <= ts.nanos <= 999_999_999:
        return None
    return f"not a valid time: {ts.seconds} s {ts.nanos} ns since 1970-01-01T00:00:00Z"


def record_json(record: AuditRecord) -> dict[str, Any]:
    """The record as protobuf JSON; a timestamp outside years 1..9999 (which protobuf JSON cannot
    write) becomes the string ``"not a valid time: S s N ns since 1970-01-01T00:00:00Z"``, so one
    such record does not keep ``show --json`` from showing the others."""
    try:
        return dict(json_format.MessageToDict(record, preserving_proto_field_name=True))
    except json_format.Error:
        pass
    fixed = AuditRecord()
    fixed.CopyFrom(record)
    said: dict[tuple[int | None, str], str] = {}
    if fixed.HasField("decided_at") and (bad := _bad_time(fixed.decided_at)) is not None:
        said[(None, "decided_at")] = bad
        fixed.ClearField("decided_at")
    for i, sp in enumerate(fixed.setpoints):
        for name in ("decided_at", "valid_until"):
            if sp.HasField(name) and (bad := _bad_time(getattr(sp, name))) is not None:
                said[(i, name)] = bad
                sp.ClearField(name)
    out: dict[str, Any] = json_format.MessageToDict(fixed, preserving_proto_field_name=True)
    for (at, name), text in said.items():
        (out if at is None else out["setpoints"][at])[name] = text
    return out


def _binding_name(value: int) -> str:
    try:
        name = BindingReason.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return str(value)
    return name.removeprefix("BINDING_REASON_").lower()


def explain(record: AuditRecord, charger_id: str | None = None) -> list[str]:
    """Lines a person reads: the decision, then per charger the setpoint and what bound it."""
    t = record.decided_at.seconds + record.decided_at.nanos / 1e9
    lines = [
        f"#{record.seq} {_iso(t)} decision {record.decision_id} trigger {record.trigger}"
        f" plan v{record.plan_version} config {record.config_version or '-'}"
    ]
    # A decision may send a charger more than one setpoint (its session's TxProfile and its
    # TxDefault): one line each, in the record's order.
    sent: dict[str, list[Setpoint]] = {}
    for one in record.setpoints:
        sent.setdefault(one.charger_id, []).append(one)
    bound = {b.charger_id: b for b in record.bindings}
    for cid in sorted(set(sent) | set(bound)):
        if charger_id is not None and cid != charger_id:
            continue
        b = bound.get(cid)
        each: list[Setpoint | None] = [*sent.get(cid, [])] or [None]
        for sp in each:
            if sp is not None:
                value = (
                    f"{sp.setpoint_a:g} A" if sp.HasField("setpoint_a") else f"{sp.setpoint_w:g} W"
                )
                action = f"sent {value}"
                if sp.session_id:
                    action += f" (session {sp.session_id})"
            else:
                action = "unchanged"
            reason = (sp.reason if sp is not None and sp.reason else "") or (b.reason if b else "")
            code = _binding_name(
                (sp.binding if sp is not None and sp.binding else 0) or (b.binding if b else 0)
            )
            lines.append(f"  {cid}: {action} [{code}] {reason}".rstrip())
    return lines


async def _verify(args: argparse.Namespace) -> int:
    store = store_from_args(args)
    try:
        report = await verify_chain(store)
    finally:
        await store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "head_seq": None if report.head is None else report.head.seq,
                    "head_hash": None if report.head is None else report.head.hash,
                    "problem_count": report.problem_count,
                    "problems": report.problems,
                    "store": store.description,
                }
            )
        )
    else:
        print(f"{report.summary()} ({store.description})")
        for p in report.problems:
            print(f"  - {p}")
        if report.problem_count > len(report.problems):
            print(f"  … and {report.problem_count - len(report.problems)} more")
    return 0 if report.ok else 1


async def _show(args: argparse.Namespace) -> int:
    store = store_from_args(args)
    try:
        records = await store.audit_records(
            charger_id=args.charger,
            since_s=args.since,
            until_s=args.until,
            limit=args.limit,
            newest_first=True,
        )
    finally:
        await store.close()
    records.reverse()  # the newest `limit`, printed oldest first
    if args.json:
        out: list[dict[str, Any]] = [record_json(r) for r in records]
        print(json.dumps(out))
        return 0
    if not records:
        who = f" for charger {args.charger}" if args.charger else ""
        print(f"no decisions{who} in that period ({store.description})")
        return 0
    for r in records:
        print("\n".join(explain(r, args.charger)))
    return 0


def _run(coro_fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(asyncio.run(coro_fn(args)))
        except (StoreError, ValueError) as exc:
            print(f"evcore audit: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            # Not a traceback for the operator (a store that holds what it should not, such as
            # a text payload, fails inside its reader): one line naming it, and "cannot read".
            print(
                f"evcore audit: {args.audit_command} failed reading the store: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            return 2

    return run


def _add_store_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", metavar="SITE_FILE", help="site file whose [store] to read")
    g.add_argument(
        "--store", metavar="URL", help="sqlite:DIR, a directory, or postgresql://…?schema=NAME"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="verify and explain the decision audit trail",
        description="Check (verify) or explain (show) the hash-chained audit trail of the "
        "edge's decisions, in the store of a site file's [store] (--config) or of a store URL "
        "(--store). Only reads. See docs/audit.md.",
    )
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser(
        "verify",
        help="check every record's hash, the chain links and the head",
        description="Exit 0 when the chain is intact, 1 when a record was changed, removed or "
        "the chain truncated, 2 when the store cannot be read.",
    )
    _add_store_args(v)
    v.set_defaults(func=_run(_verify))
    s = asub.add_parser(
        "show",
        help="explain decisions: setpoints sent and what bound them",
        description="Print the newest decisions (at most --limit, oldest first): each setpoint "
        "sent and the constraint that bound it; --charger, --since and --until narrow them. "
        "Exit 0 (also when none match), 2 when the store cannot be read.",
    )
    _add_store_args(s)
    s.add_argument("--charger", metavar="ID", help="only decisions concerning this charger")
    s.add_argument(
        "--since",
        metavar="T",
        type=_time_arg,
        help="ISO 8601, epoch seconds, or an age (15m, 2h, 1d)",
    )
    s.add_argument("--until", metavar="T", type=_time_arg, help="same forms as --since")
    s.add_argument(
        "--limit",
        type=_limit_arg,
        default=200,
        help="at most this many (newest) decisions, at least 1",
    )
    s.set_defaults(func=_run(_show))


def main(argv: list[str] | None = None) -> int:
    """``python -m evcore.audit.cli verify …``: the same commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="evcore")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:  # a usage error (said on stderr) or --help: its exit status
        return exc.code if isinstance(exc.code, int) else 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
