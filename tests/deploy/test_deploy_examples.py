"""The shipped deployables parse with the edge's own loaders; nats-server accepts the configs."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from evcore.bus.config import parse_bus_config
from evcore.edge.config import EdgeConfig, EdgeConfigError
from evcore.ocpp.config import OcppConfigError, parse_ocpp_section
from evcore.site import load_site
from evcore.store import StoreConfig

ROOT = Path(__file__).resolve().parents[2]
SITE_FILES = sorted((ROOT / "edge").glob("*.toml"))
NATS_CONFIGS = sorted([*(ROOT / "edge").glob("*.conf"), *(ROOT / "cloud").glob("**/node-*.conf")])


def test_examples_exist() -> None:
    assert len(SITE_FILES) >= 2
    assert len(NATS_CONFIGS) >= 4


@pytest.mark.parametrize("path", SITE_FILES, ids=lambda p: p.name)
def test_example_site_file_loads_with_every_section(path: Path, tmp_path: Path) -> None:
    site = load_site(path)
    table = tomllib.loads(path.read_text())
    assert len(table["chargers"]) >= 1
    assert site is not None
    EdgeConfig.from_table(table.get("edge"))
    parse_bus_config(table.get("bus"))
    StoreConfig.from_section(table.get("store"))
    ocpp = dict(table.get("ocpp", {}))
    if "credentials_file" in ocpp:
        # Secrets live outside the site file; stand one in with a password per station.
        creds = tmp_path / "ocpp-credentials.toml"
        creds.write_text(
            "".join(
                f'[stations.{c["ocpp_id"]}]\npassword = "{"x" * 16}"\n' for c in table["chargers"]
            )
        )
        ocpp["credentials_file"] = str(creds)
    parse_ocpp_section(ocpp, base_dir=path.parent)


def test_a_typo_in_the_edge_section_is_named() -> None:
    with pytest.raises(EdgeConfigError, match="tick_sec"):
        EdgeConfig.from_table({"tick_sec": 1.0})


def test_a_typo_in_the_ocpp_section_is_named() -> None:
    with pytest.raises(OcppConfigError, match="prot"):
        parse_ocpp_section({"prot": 9000})


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
@pytest.mark.parametrize("path", NATS_CONFIGS, ids=lambda p: p.name)
def test_nats_server_accepts_config(path: Path) -> None:
    out = subprocess.run(
        ["nats-server", "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr + out.stdout


def test_systemd_unit_runs_the_edge_command_that_exists() -> None:
    unit = (ROOT / "edge" / "evcore-edge.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[1:3] == ["edge", "--config"]
    # The options the unit passes are ones `evcore edge` accepts.
    out = subprocess.run(
        ["evcore", "edge", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    for opt in (a for a in argv if a.startswith("--")):
        assert opt in out.stdout
