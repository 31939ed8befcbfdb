"""``evcore bench NAME``: runs a benchmark kept in the repository's ``bench/`` folder.

Benchmarks are not part of the installed package; they live in ``bench/bench_<name>.py`` with a
``main(argv) -> int`` function and print machine-readable JSON with ``--json``. Outside a checkout,
``EVCORE_BENCH_DIR`` names the folder.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import Any


def bench_dir() -> Path:
    env = os.environ.get("EVCORE_BENCH_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bench"


def available() -> list[str]:
    d = bench_dir()
    return sorted(p.stem.removeprefix("bench_").replace("_", "-") for p in d.glob("bench_*.py"))


def _run(args: argparse.Namespace) -> int:
    name: str = args.name
    path = bench_dir() / f"bench_{name.replace('-', '_')}.py"
    if not path.exists():
        print(
            f"evcore bench: unknown benchmark {name!r}; available: "
            f"{', '.join(available()) or f'none (no bench_*.py in {bench_dir()})'}",
            file=sys.stderr,
        )
        return 2
    module: dict[str, Any] = runpy.run_path(str(path), run_name="evcore_bench")
    return int(module["main"](list(args.rest)))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark against its in-process reference",
        description="Run bench/bench_NAME.py. Pass --json for machine-readable output, "
        "--quick for a smoke run; other flags go to the benchmark "
        "(see `evcore bench NAME --help`). Outside a repository checkout, set EVCORE_BENCH_DIR "
        "to the bench/ folder.",
    )
    p.add_argument("name", help=f"one of: {', '.join(available()) or 'none found'}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_run)
