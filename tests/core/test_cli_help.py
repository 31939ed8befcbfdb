"""``--help`` on every ``evcore`` command: each path of the parser tree prints its usage and exits
0, through the installed console script for the top level and in-process for every subcommand."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import pytest
from evcore.cli import build_parser, main


def command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


PATHS = command_paths(build_parser())


def test_the_tree_has_the_rooms_commands() -> None:
    top = {p[0] for p in PATHS if p}
    assert {"site", "bench", "sim", "demo", "edge", "audit", "csms", "simcp"} <= top, top
    assert len(PATHS) >= 10


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "evcore")
def test_help_prints_usage_and_exits_0(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: evcore" + "".join(f" {p}" for p in path)), out[:200]


def test_console_script_help() -> None:
    exe = shutil.which("evcore")
    assert exe is not None, "the evcore console script is not installed"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "usage: evcore" in r.stdout
