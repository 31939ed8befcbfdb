"""The shipped deployables parse with the edge's own loaders; nats-server accepts the configs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from evcore.bus.config import parse_bus_config
from evcore.cli import build_parser
from evcore.cloud import CloudConfig
from evcore.edge.config import EdgeConfig, EdgeConfigError
from evcore.ocpp.config import OcppConfigError, parse_ocpp_section
from evcore.site import load_site
from evcore.site.cli import section_errors
from evcore.store import StoreConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "metrics"))
from metrics_testkit import cert_authority

ROOT = Path(__file__).resolve().parents[2]
SITE_FILES = sorted((ROOT / "edge").glob("*.toml"))
CLOUD_EXAMPLE = ROOT / "cloud" / "cloud.example.toml"
NATS_CONFIGS = sorted([*(ROOT / "edge").glob("*.conf"), *(ROOT / "cloud").glob("**/*.conf")])


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


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is not installed")
@pytest.mark.parametrize("path", NATS_CONFIGS, ids=lambda p: p.name)
def test_the_command_a_nats_config_gives_is_one_nats_server_takes(path: Path) -> None:
    """The 'nats-server -c FILE ...' its header tells the operator to run, flags included,
    with FILE this file (`-t`: test the configuration and exit)."""
    m = re.search(r"nats-server (-c \S+(?: -\w+ \S+)*)", path.read_text())
    assert m is not None, "no 'nats-server -c ...' line"
    argv = m.group(1).split()
    argv[1] = str(path)
    out = subprocess.run(
        ["nats-server", "-t", *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr + out.stdout


UNITS = {"evcore-edge.service": ("edge", "--config"), "evcore-cloud.service": ("cloud", "serve")}


def _unit(name: str) -> dict[str, list[str]]:
    path = ROOT / ("edge" if "edge" in name else "cloud") / name
    unit: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            unit.setdefault(key, []).append(value)
    return unit


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_runs_a_command_that_exists(name: str) -> None:
    """ExecStart is a command ``evcore`` parses, every flag and value as given (a --log-level
    it did not know ran at info before the CLI checked it)."""
    argv = shlex.split(_unit(name)["ExecStart"][0])
    assert argv[0].endswith("/evcore") and tuple(argv[1:3]) == UNITS[name]
    args = build_parser().parse_args(argv[1:])
    assert args.func is not None


def test_the_leaf_node_unit_runs_nats_server_on_the_shipped_config() -> None:
    """evcore-edge.service starts after nats-edge.service: that unit is shipped, and what it
    runs (-c /etc/evcore/nats-edge.conf) is the config beside it, which nats-server accepts."""
    assert "nats-edge.service" in _unit("evcore-edge.service")["After"][0]
    argv = shlex.split(_unit("nats-edge.service")["ExecStart"][0])
    assert Path(argv[0]).name == "nats-server" and argv[1:] == ["-c", "/etc/evcore/nats-edge.conf"]
    if shutil.which("nats-server") is not None:
        out = subprocess.run(
            ["nats-server", "-t", "-c", str(ROOT / "edge" / "nats-edge.conf")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("name", [*sorted(UNITS), "nats-edge.service"])
def test_systemd_accepts_the_unit(name: str) -> None:
    """`systemd-analyze verify`: every directive known and well formed. Only the binary's
    absence on this machine (evcore is installed in a venv here) is let pass."""
    path = ROOT / ("edge" if "edge" in name else "cloud") / name
    out = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = [
        line
        for line in (out.stderr + out.stdout).splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert said == []


def _under(path: str, roots: list[str]) -> bool:
    return any(Path(path).is_relative_to(r) for r in roots)


def test_what_the_production_examples_write_is_writable_under_their_units() -> None:
    """ProtectSystem=strict keeps /etc read-only: every path the edge and the cloud write lies
    under the unit's ReadWritePaths (the audit journal beside /etc/evcore/site.toml could not)."""
    edge_rw = _unit("evcore-edge.service")["ReadWritePaths"]
    site = tomllib.loads((ROOT / "edge" / "site.production.example.toml").read_text())
    for path in (site["edge"]["audit_journal"], site["bus"]["outbox_dir"]):
        assert _under(path, edge_rw), (path, edge_rw)
    cloud_rw = _unit("evcore-cloud.service")["ReadWritePaths"]
    cloud = tomllib.loads(_uncommented(CLOUD_EXAMPLE.read_text(), Path("/etc/evcore")))
    assert _under(cloud["bus"]["outbox_dir"], cloud_rw), cloud_rw


def _nats_config(path: Path) -> str:
    """The config with its comments dropped (what nats-server reads)."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def test_jetstream_is_where_the_streams_are() -> None:
    """The cluster nodes hold the streams (JetStream, domain "cloud" as [bus] jetstream_domain
    says); the edge's leaf node has none of its own (its events would stay on the edge)."""
    site = tomllib.loads((ROOT / "edge" / "site.production.example.toml").read_text())
    domain = site["bus"]["jetstream_domain"]
    for node in sorted((ROOT / "cloud" / "nats").glob("node-*.conf")):
        conf = _nats_config(node)
        assert re.search(r"^jetstream\s*\{", conf, flags=re.M), node.name
        assert re.search(rf"^\s*domain:\s*{domain}\s*$", conf, flags=re.M), node.name
    edge = _nats_config(ROOT / "edge" / "nats-edge.conf")
    assert "jetstream" not in edge and "leafnodes" in edge
    assert "jetstream: enabled" in _nats_config(
        ROOT / "cloud" / "nats" / "site-permissions.example.conf"
    )


# A commented key (`# key = value`, `# [table]`, `# [[array]]`) the examples offer to uncomment.
_COMMENTED_KEY = re.compile(r"^# ?(\[\[?[\w.]+\]\]?\s*$|[a-z_]+ = \S.*$)")


def _uncommented(text: str, etc: Path) -> str:
    """The example with every commented key uncommented and /etc/evcore/ moved to ``etc``."""
    lines = []
    for line in text.splitlines():
        m = _COMMENTED_KEY.match(line)
        lines.append(m.group(1) if m else line)
    return "\n".join(lines).replace("/etc/evcore/", f"{etc}/") + "\n"


def _stand_in_secrets(etc: Path, table: dict[str, Any]) -> None:
    """Files every path of the examples names, as an operator would install them: a real
    certificate and key under each cert/key name, a CA for each CA name, 0600 secrets."""
    etc.mkdir(parents=True, exist_ok=True)
    ca = cert_authority(etc, "example CA")
    cert, key = ca.issue("localhost", server=True)
    for path in re.findall(rf"{re.escape(str(etc))}/[\w.-]+", tomllib_dumps_paths(table)):
        p = Path(path)
        name = p.name
        if name.endswith((".pem", ".crt")) and "ca" in name.split(".")[0].split("-"):
            p.write_bytes(ca.ca_path.read_bytes())
        elif name.endswith((".pem", ".crt")):
            p.write_bytes(Path(cert).read_bytes())
        elif name.endswith(".key"):
            p.write_bytes(Path(key).read_bytes())
        elif name == "ocpp-credentials.toml":
            p.write_text(
                "".join(
                    f'[stations.{c["ocpp_id"]}]\npassword = "{"x" * 16}"\n'
                    for c in table["chargers"]
                )
            )
        elif name == "api-tokens.toml":
            p.write_text(
                '[[tokens]]\nname = "ops"\ntoken = "' + "t" * 32 + '"\nroles = ["viewer"]\n'
            )
        else:
            p.write_text("x" * 32 + "\n")
        p.chmod(0o600)


def tomllib_dumps_paths(table: Any) -> str:
    """Every string of a parsed TOML table, one a line (where the example's paths are)."""
    if isinstance(table, dict):
        return "\n".join(tomllib_dumps_paths(v) for v in table.values())
    if isinstance(table, list):
        return "\n".join(tomllib_dumps_paths(v) for v in table)
    return table if isinstance(table, str) else ""


@pytest.mark.parametrize("path", SITE_FILES, ids=lambda p: p.name)
def test_every_key_an_edge_example_offers_commented_out_is_one_the_edge_takes(
    path: Path, tmp_path: Path
) -> None:
    """What the example shows as `# key = value` is a key of that section with a value it
    takes: uncommented (and its files installed), the file passes the edge's own checks."""
    etc = tmp_path / "etc"
    site = tmp_path / path.name
    site.write_text(_uncommented(path.read_text(), etc))
    table = tomllib.loads(site.read_text())
    _stand_in_secrets(etc, table)
    load_site(site)
    assert section_errors(table, tmp_path) == []


def test_every_key_the_cloud_example_offers_commented_out_is_one_the_cloud_takes(
    tmp_path: Path,
) -> None:
    etc = tmp_path / "etc"
    text = _uncommented(CLOUD_EXAMPLE.read_text(), etc)
    # `insecure = true` is the other choice to [tls] ("remove [tls] and set"): both at once are
    # refused on purpose, so the secure variant leaves it out and the insecure one drops [tls].
    secure = "\n".join(line for line in text.splitlines() if line != "insecure = true")
    table = tomllib.loads(secure)
    _stand_in_secrets(etc, table)
    config = CloudConfig.from_table(table, tmp_path)
    assert config.tls is not None and config.fleet is not None and config.bus is not None
    assert config.metrics is not None
    # The insecure variant as its comment says: [tls] removed, `insecure = true` set where the
    # example has it (a key after a table header belongs to that table).
    tls = re.search(r"^\[tls\]\n(?:\w+ = .*\n)+", text, flags=re.M)
    assert tls is not None
    insecure = tomllib.loads(
        text.replace(tls.group(0), "").replace(f'operator_ca_file = "{etc}/operators-ca.pem"', "")
    )
    assert CloudConfig.from_table(insecure, tmp_path).insecure
