"""The README as an operator reads it: every command of its Commands table is one ``evcore``
takes as written (placeholders filled in), and every link points to a file of the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from bus_testkit import free_port
from evcore.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# The README's placeholders, as an operator would fill them in.
PLACEHOLDERS = {
    "SITE.toml": str(ROOT / "edge" / "site.example.toml"),
    "cloud.toml": str(ROOT / "cloud" / "cloud.example.toml"),
    "SCENARIO": "depot",
    "NAME": "allocator",
    "ID": "cp-01",
    "T": "1h",
    "T1": "2026-12-05T17:00:00+01:00",
    "T2": "2026-12-05T19:00:00+01:00",
    "H:P": "127.0.0.1:50061",
    "CA": "ca.pem",
    "CERT": "operator.pem",
    "KEY": "operator.key",
}


def _table_commands() -> list[str]:
    """Every backticked ``evcore …`` of the Commands table's first column."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    commands = []
    for row in section.splitlines():
        if not row.startswith("| `evcore"):
            continue
        first_cell = row.split(" | ", 1)[0]
        commands += re.findall(r"`(evcore [^`]+)`", first_cell)
    return commands


def _argv(command: str) -> list[str]:
    """The command's words after ``evcore``, placeholders filled in, ``[--opt X]`` taken."""
    words = shlex.split(command.replace("[", "").replace("]", ""))[1:]
    return [PLACEHOLDERS.get(w, w) for w in words]


def test_the_commands_table_is_read() -> None:
    assert len(_table_commands()) >= 12


@pytest.mark.parametrize("command", _table_commands())
def test_every_readme_command_parses_as_written(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        build_parser().parse_args(_argv(command))
    except SystemExit as exc:
        pytest.fail(f"`{command}`: {capsys.readouterr().err.strip()} (exit {exc.code})")


@pytest.mark.parametrize(
    "command", [c for c in _table_commands() if c.startswith("evcore cloud curtail")]
)
def test_the_readme_curtailment_has_every_value_a_new_one_needs(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command checks --id, --sites, --max-kw, --start and --end itself (after parsing);
    the README's lacked --id: 'evcore cloud curtail: missing --id'. With a development
    server's operator header for the certificate and nothing listening, it gets as far as
    calling the cloud (UNAVAILABLE)."""
    argv = _argv(command)
    for opt in ("--ca", "--cert", "--key"):
        i = argv.index(opt)
        del argv[i : i + 2]
    argv[argv.index("--target") + 1] = f"127.0.0.1:{free_port()}"
    rc = main([*argv, "--insecure", "--operator", "ops", "--timeout", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" not in err and "UNAVAILABLE" in err, err


def test_every_readme_link_points_to_a_file() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    paths = re.findall(r"`((?:edge|cloud|docs|python|core|tools|bench|tests)/[\w./-]*)`", text)
    assert links
    missing = sorted({p for p in [*links, *paths] if not (ROOT / p).exists()})
    assert missing == []


DEPLOYABLES = sorted(p for d in ("edge", "cloud") for p in (ROOT / d).rglob("*") if p.is_file())


@pytest.mark.parametrize("path", DEPLOYABLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_a_deployable_points_to_exists(path: Path) -> None:
    """Every repository file a config or unit names, and every section it cites as
    `docs/X.md, "Heading"`, is there to be read."""
    text = path.read_text(encoding="utf-8")
    named = re.findall(r"\b((?:docs|tests|cloud|edge)/[\w./-]+\.(?:md|py|conf|toml|service))", text)
    assert sorted(p for p in set(named) if not (ROOT / p).exists()) == []
    for doc, heading in re.findall(r'(docs/[\w-]+\.md), "([^"]+)"', text):
        headings = [h for h in (ROOT / doc).read_text().splitlines() if h.startswith("#")]
        assert any(heading in h for h in headings), (doc, heading)
