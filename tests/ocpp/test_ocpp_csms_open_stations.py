"""``evcore csms`` (the central system alone) names the stations its file leaves open at start,
as ``evcore edge`` and ``evcore site check`` do (37b81b6): under ``[ocpp] security_profile = 0``
any client that reaches the port with a station's id is taken for it. Before, ``evcore csms``
said nothing. The command runs as a process, as an operator starts it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from evcore.edge.sitegen import depot_table, to_toml

pytestmark = pytest.mark.timeout(90)


async def _start_lines(
    site_file: Path, *args: str, term_after_s: float = 0.0
) -> tuple[list[str], int | None]:
    """``evcore csms --config site_file --quiet *args`` as a process: its output (stderr too) up
    to the line saying it listens, then SIGTERM (``term_after_s`` later); those lines and its
    exit code."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "evcore.cli", "csms", "--config", str(site_file), "--quiet", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            while line := (await proc.stdout.readline()).decode():
                seen.append(line)
                if line.startswith("central system for site"):
                    break
        await asyncio.sleep(term_after_s)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert any(line.startswith("central system for site") for line in seen), (
        "".join(seen) + rest.decode()
    )
    return seen, proc.returncode


def _site(tmp_path: Path, table: dict[str, Any]) -> Path:
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    return site_file


async def test_csms_names_the_open_stations_when_it_starts(tmp_path: Path) -> None:
    table = depot_table(2, per_feeder=2, site_id="open-csms")
    assert table["ocpp"]["security_profile"] == 0
    site_file = _site(tmp_path, table)
    seen, _ = await _start_lines(site_file)
    warning = next((line for line in seen if "security profile 0" in line), "")
    assert warning.startswith(f"evcore csms: {site_file}: warning: [ocpp]"), "".join(seen)
    assert "every station open: CP0001 (cp-0001), CP0002 (cp-0002)" in warning, warning


async def test_csms_with_every_station_behind_a_password_warns_of_nothing(
    tmp_path: Path,
) -> None:
    table = depot_table(2, per_feeder=2, site_id="closed-csms")
    table["ocpp"]["security_profile"] = 1
    table["ocpp"]["credentials"] = {
        "CP0001": "password-of-cp0001-x",
        "CP0002": "password-of-cp0002-x",
    }
    seen, _ = await _start_lines(_site(tmp_path, table))
    assert not any("warning" in line for line in seen), "".join(seen)


@pytest.mark.parametrize(
    ("args", "term_after_s"), [((), 0.0), (("--seconds", "60"), 0.5)], ids=["at-once", "seconds"]
)
async def test_csms_stopped_by_sigterm_stops_cleanly(
    tmp_path: Path, args: tuple[str, ...], term_after_s: float
) -> None:
    """A supervisor's SIGTERM: the central system stops, exit 0. Before, the handler was
    installed only after the start line and only without ``--seconds``: a SIGTERM right after
    that line (2 runs of 3) or at any time under ``--seconds`` killed the process by the signal
    (exit -15) without closing the stations' connections."""
    _, rc = await _start_lines(
        _site(tmp_path, depot_table(2, per_feeder=2)), *args, term_after_s=term_after_s
    )
    assert rc == 0
