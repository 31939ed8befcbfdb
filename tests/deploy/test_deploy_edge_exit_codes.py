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
async def test_every_site_file_error_exits_2_naming_the_file(
    tmp_path: Path, case: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file exited 1 ('site file … does not exist', a SystemExit with a message), as
    did one that was not TOML, while an invalid topology or section exited 2: a supervisor or
    a script could not tell a configuration error from a failed start. ``evcore site check``
    exits with the edge's code on the same file (it exited 1, its "problems found", where the
    edge exited 2: a deploy script checking the file first saw another code than the unit)."""
    assert callable(case)
    site_file, says = case(tmp_path)
    rc, out = await _exit_of(site_file)
    assert rc == 2, f"rc {rc}: {out[-1500:]}"
    assert says in out and str(site_file) in out, out[-1500:]
    assert "Traceback" not in out, out[-1500:]
    from evcore.cli import main

    capsys.readouterr()
    assert main(["site", "check", str(site_file)]) == rc
    err = capsys.readouterr().err
    assert says in err and str(site_file) in err and "Traceback" not in err, err


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


def test_site_checks_exit_codes_are_in_its_help_and_the_docs() -> None:
    """`evcore site check`'s help said "Exits 1 … on a bad file"; it exits 2 now, as the edge."""
    import argparse

    from evcore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    site = sub.choices["site"]
    check = next(a for a in site._actions if isinstance(a, argparse._SubParsersAction))
    helptext = " ".join(check.choices["check"].format_help().split())
    assert "exit codes: 0:" in helptext and "; 2:" in helptext, helptext
    assert "1:" not in helptext and "Exits 1" not in helptext, helptext
    for name in ("site-file.md", "deploy.md"):
        doc = " ".join((ROOT / "docs" / name).read_text(encoding="utf-8").split())
        assert "`evcore site check`" in doc and "exits 1" not in doc, name
        assert "| 2 |" in doc or "exits 2" in doc, name
