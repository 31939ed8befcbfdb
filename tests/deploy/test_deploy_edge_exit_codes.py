"""``evcore edge``'s exit codes, as a supervisor and an operator's script read them: 2 for a usage
or configuration error (what argparse exits with; the site file missing, unreadable, not TOML or
invalid), 1 for a start that fails on what the machine holds (a port taken, a store), 0 after
SIGTERM. The real command runs as a process (``edge_testkit.spawn_edge``)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from edge_testkit import spawn_edge

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_SITE = ROOT / "edge" / "site.example.toml"


async def _exit_of(site_file: Path, timeout_s: float = 45.0) -> tuple[int | None, str]:
    proc = await spawn_edge(site_file)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        out, _ = await proc.communicate()
        return None, out.decode()
    return proc.returncode, out.decode()


def _missing(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "no-such-site.toml", "not found"


def _not_toml(tmp_path: Path) -> tuple[Path, str]:
    bad = tmp_path / "site.toml"
    bad.write_text("[site\nid = 'x'\n")
    return bad, "not valid TOML"


def _a_directory(tmp_path: Path) -> tuple[Path, str]:
    d = tmp_path / "site.toml"
    d.mkdir()
    return d, "cannot read site file"


def _not_utf8(tmp_path: Path) -> tuple[Path, str]:
    bad = tmp_path / "site.toml"
    bad.write_bytes(b"[site]\nid = '\xff\xfe'\n")
    return bad, "not UTF-8"


def _bad_topology(tmp_path: Path) -> tuple[Path, str]:
    bad = tmp_path / "site.toml"
    bad.write_text(
        EXAMPLE_SITE.read_text().replace("phase_limit_a = 125.0", 'phase_limit_a = "125 A"')
    )
    return bad, "F1.phase_limit_a"


def _bad_section(tmp_path: Path) -> tuple[Path, str]:
    bad = tmp_path / "site.toml"
    bad.write_text(EXAMPLE_SITE.read_text() + "\n[metric]\nlisten = '127.0.0.1:0'\n")
    return bad, "unknown table [metric]"


@pytest.mark.parametrize(
    "case", [_missing, _not_toml, _a_directory, _not_utf8, _bad_topology, _bad_section]
)
async def test_every_site_file_error_exits_2_naming_the_file(tmp_path: Path, case: object) -> None:
    """A missing file exited 1 ('site file … does not exist', a SystemExit with a message), as
    did one that was not TOML, while an invalid topology or section exited 2: a supervisor or
    a script could not tell a configuration error from a failed start."""
    assert callable(case)
    site_file, says = case(tmp_path)
    rc, out = await _exit_of(site_file)
    assert rc == 2, f"rc {rc}: {out[-1500:]}"
    assert says in out and str(site_file) in out, out[-1500:]
    assert "Traceback" not in out, out[-1500:]


def test_the_exit_codes_are_in_the_help_and_the_docs() -> None:
    import argparse

    from evcore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helptext = sub.choices["edge"].format_help()
    assert "exit codes" in helptext.lower(), helptext
    for code in ("0", "1", "2"):
        assert f"{code}:" in helptext.replace(" ", ""), helptext
    doc = (ROOT / "docs" / "edge.md").read_text(encoding="utf-8")
    assert "### Exit codes" in doc
