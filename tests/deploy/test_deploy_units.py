"""The systemd units in ``edge/`` and ``cloud/`` point ``Documentation=`` at files their own
install steps put there. ``evcore-edge.service`` named ``file:///usr/share/doc/evcore/edge.md``,
which nothing installed (the wheel carries no docs, and the unit's install line copied the unit
only): ``systemctl help evcore-edge`` found nothing. The install steps in each unit's header are
run here, as written, under a scratch root; every ``file://`` document must then exist there and
be the repository's page."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted([*ROOT.glob("edge/*.service"), *ROOT.glob("cloud/*.service")])
EVCORE_UNITS = [u for u in UNITS if u.name.startswith("evcore-")]


def _install_steps(unit: Path) -> list[list[str]]:
    """The ``install`` commands of the unit's header comment (``#   install …``)."""
    steps = []
    for line in unit.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text.startswith("install "):
            steps.append(shlex.split(text))
    return steps


def _documentation(unit: Path) -> list[str]:
    uris: list[str] = []
    for line in unit.read_text(encoding="utf-8").splitlines():
        if line.startswith("Documentation="):
            uris += line.removeprefix("Documentation=").split()
    return uris


@pytest.mark.parametrize("unit", EVCORE_UNITS, ids=lambda u: u.name)
def test_a_units_documentation_is_installed_by_its_install_steps(
    unit: Path, tmp_path: Path
) -> None:
    steps = _install_steps(unit)
    assert steps, f"{unit.name}: no '#   install …' step in its header"
    for argv in steps:
        # Absolute paths land under the scratch root (as DESTDIR would put them).
        moved = [str(tmp_path / a.lstrip("/")) if a.startswith("/") else a for a in argv]
        done = subprocess.run(moved, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{unit.name}: {argv}: {done.stderr}"
    uris = _documentation(unit)
    assert uris, f"{unit.name}: no Documentation="
    for uri in uris:
        assert uri.startswith("file:///"), f"{unit.name}: {uri} (no URL is published)"
        installed = tmp_path / uri.removeprefix("file:///")
        assert installed.is_file(), f"{unit.name}: {uri} is not installed by its steps"
        page = ROOT / "docs" / installed.name
        assert installed.read_bytes() == page.read_bytes(), f"{unit.name}: {uri} is not {page}"
    # The unit itself is among what its steps install.
    assert (tmp_path / "etc" / "systemd" / "system" / unit.name).read_bytes() == unit.read_bytes()
