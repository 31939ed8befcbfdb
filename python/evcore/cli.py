"""The ``evcore`` command line: one subcommand per room.

Each room registers its own subcommands in a ``cli`` module with ``register(subparsers)``; this file
only lists those modules, so adding a command never means editing another room's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that define ``register(subparsers: argparse._SubParsersAction) -> None``.
COMMAND_MODULES: tuple[str, ...] = (
    "evcore.site.cli",
    "evcore.benchcli",
    "evcore.sim.cli",
    "evcore.edge.cli",
    "evcore.audit.cli",
    "evcore.ocpp.cli",
    "evcore.cloud.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evcore",
        description="evcore: run, simulate and inspect EV charger fleets under hard site limits.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from evcore import __version__

        print(__version__)
        return 0
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
