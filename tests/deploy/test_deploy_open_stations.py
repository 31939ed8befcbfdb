"""Stations left open (``[ocpp] security_profile = 0``: no password, any client with a station's
id is taken for it) are named at every start of ``evcore edge`` and by ``evcore site check``;
before, nothing said so. ``evcore edge`` runs as a process (``edge_testkit.spawn_edge``)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from bus_testkit import free_port
from edge_testkit import spawn_edge
from evcore.cli import main
from evcore.edge.sitegen import depot_table, to_toml

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_SITE = ROOT / "edge" / "site.example.toml"


def _open_site(tmp_path: Path) -> tuple[Path, list[str]]:
    """A two-charger depot under security profile 0 (sitegen's default, the tests' own):
    the file and its stations' OCPP ids."""
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "store")}
    assert table["ocpp"]["security_profile"] == 0
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    return site_file, [c["ocpp_id"] for c in table["chargers"]]


def test_site_check_names_every_open_station(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_file, stations = _open_site(tmp_path)
    assert main(["site", "check", str(site_file)]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    warning = next((line for line in err.splitlines() if "security profile 0" in line), "")
    assert warning.startswith(f"warning: {site_file}: [ocpp]"), err
    assert "every station open" in warning and "no password" in warning, warning
    assert all(s in warning for s in stations), (stations, warning)


def test_only_the_stations_left_open_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Profile 1 for the site, one station's credentials at profile 0: that one is named."""
    text = EXAMPLE_SITE.read_text(encoding="utf-8").replace(
        'CP02 = "example-password-cp02"', "CP02 = { security_profile = 0 }"
    )
    assert "CP02 = { security_profile = 0 }" in text
    site_file = tmp_path / "site.toml"
    site_file.write_text(text)
    assert main(["site", "check", str(site_file)]) == 0
    err = capsys.readouterr().err
    open_lines = [line for line in err.splitlines() if "security profile 0" in line]
    assert len(open_lines) == 1, err
    assert "stations open: CP02 (cp-02)" in open_lines[0], open_lines[0]
    assert "CP01" not in open_lines[0] and "every station" not in open_lines[0]


def test_the_example_site_has_no_open_station(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "check", str(EXAMPLE_SITE)]) == 0
    assert "security profile 0" not in capsys.readouterr().err


async def test_the_edge_names_the_open_stations_when_it_starts(tmp_path: Path) -> None:
    site_file, stations = _open_site(tmp_path)
    proc = await spawn_edge(site_file)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            while line := (await proc.stdout.readline()).decode():
                seen.append(line)
                if "OCPP on port" in line:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    out = "".join(seen)
    assert "OCPP on port" in out, out + rest.decode()
    warning = next((line for line in seen if "security profile 0" in line), "")
    assert warning.startswith(f"evcore edge: {site_file}: warning: [ocpp]"), out
    assert all(s in warning for s in stations), (stations, warning)
    assert proc.returncode == 0
