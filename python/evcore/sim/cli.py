"""``evcore sim`` and ``evcore demo``: run the digital twin and print the policy comparison."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from evcore.sim.scenario import POLICIES, ScenarioError, load_scenario, shipped_scenarios

DEMO_SCENARIO = "depot"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run a scenario on the digital twin and compare policies",
        description=(
            "Run a scenario (a TOML file, or a shipped name: "
            + ", ".join(shipped_scenarios())
            + ") on simulated time and compare control policies. See docs/twin.md."
        ),
    )
    p.add_argument("scenario", help="scenario file or shipped scenario name")
    p.add_argument(
        "--policies",
        help=f"comma-separated policies (default: the scenario's; known: {','.join(POLICIES)})",
    )
    p.add_argument("--seed", type=int, help="random seed for arrivals (default: the scenario's)")
    p.add_argument("--hours", type=float, help="simulate only this many hours")
    p.add_argument("--json", action="store_true", help="print the comparison rows as JSON")
    p.add_argument("--report", type=Path, help="write the HTML report here")
    p.add_argument(
        "--backend",
        choices=("auto", "stack", "in-process"),
        default="auto",
        help="'stack': edge + OCPP over loopback WebSockets; 'in-process': the controller "
        "called directly; 'auto': the fullest this build supports (default)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=_default_jobs(),
        help="policies run in parallel processes (results do not depend on it; "
        "default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_sim)

    d = subparsers.add_parser(
        "demo",
        help="run the built-in depot scenario end to end and write a report",
        description="Run the built-in bus depot scenario with every policy on the embedded "
        "default (no broker, no database), print the comparison and write an HTML report.",
    )
    d.add_argument("--json", action="store_true", help="print the comparison rows as JSON")
    d.add_argument("--hours", type=float, help="simulate only this many hours")
    d.add_argument("--seed", type=int, help="random seed for arrivals")
    d.add_argument(
        "--report",
        type=Path,
        default=Path("evcore-demo-report.html"),
        help="where to write the HTML report (default: ./evcore-demo-report.html)",
    )
    d.add_argument("--policies", help="comma-separated subset of the policies")
    d.add_argument(
        "--backend", choices=("auto", "stack", "in-process"), default="auto", help=argparse.SUPPRESS
    )
    d.add_argument("--jobs", type=int, default=_default_jobs(), help=argparse.SUPPRESS)
    d.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    d.set_defaults(func=run_demo, scenario=DEMO_SCENARIO)


def _default_jobs() -> int:
    import os

    return max(1, min(2, os.cpu_count() or 1))


def _execute(args: argparse.Namespace, *, default_report: Path | None) -> int:
    from evcore.sim import report
    from evcore.sim.runner import run_comparison
    from evcore.sim.scenario import with_overrides

    try:
        sc = load_scenario(args.scenario)
        policies = args.policies.split(",") if args.policies else None
        sc = with_overrides(sc, seed=args.seed, duration_h=args.hours, policies=policies)
    except ScenarioError as e:
        print(f"evcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(
            f"evcore {args.command}: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr
        )
        return 2
    path = args.report if args.report is not None else default_report
    if path is not None:
        try:
            report.check_writable(path)
        except OSError as e:
            print(f"evcore {args.command}: error: --report {path}: {_os_error(e)}", file=sys.stderr)
            return 2
    cmp = run_comparison(sc, backend=args.backend, progress=not args.no_progress, jobs=args.jobs)
    written: Path | None = None
    write_error: str | None = None
    if path is not None:
        try:
            written = report.write_html(cmp, path)
        except OSError as e:  # gone or full since the check: the comparison is still printed
            write_error = f"evcore {args.command}: error: --report {path}: {_os_error(e)}"
    if args.json:
        print(json.dumps(cmp.rows(), indent=2))
    else:
        print(
            f"scenario {sc.name}: {len(cmp.arrivals.sessions)} sessions, "
            f"{sc.duration_s / 3600:g} h simulated, seed {cmp.seed}"
        )
        print(report.table(cmp.rows()))
        print("in the loop:")
        for part in report.in_loop(cmp):
            print(f"  - {part}")
        for note in cmp.notes:
            print(f"note: {note}")
        if written is not None:
            print(f"report: {written.resolve()}")
    if written is not None and args.json:
        print(f"report: {written.resolve()}", file=sys.stderr)
    if write_error is not None:
        print(write_error, file=sys.stderr)
        return 1
    return 0


def _os_error(e: OSError) -> str:
    """An ``OSError`` as a person reads it: what went wrong and where."""
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"cannot write the report: {where}{e.strerror or e}"


def run_sim(args: argparse.Namespace) -> int:
    return _execute(args, default_report=None)


def run_demo(args: argparse.Namespace) -> int:
    return _execute(args, default_report=args.report)
