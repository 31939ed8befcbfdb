"""The ``evcore`` command line: one subcommand per room.

Each room registers its own subcommands in a ``cli`` module with ``register(subparsers)``; this file
only lists those modules, so adding a command never means editing another room's code.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence
from typing import Any

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


#: ``--log-level`` of the long-running commands (``evcore edge``, ``evcore cloud serve``).
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, one of ``LOG_LEVELS`` (a typo such as ``verbose`` ran at ``info``)."""
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS,
        help="log level on stderr: " + ", ".join(LOG_LEVELS) + " (default: info)",
    )


def seconds_arg(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def positive_seconds_arg(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    value = seconds_arg(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def port_arg(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {value}")
    return value


def fail(prog: str, message: Any, code: int = 2) -> int:
    """Say ``prog: message`` on stderr and return ``code`` (a command's error, not a traceback)."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return code


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
