"""``evcore site check`` refuses what ``evcore edge`` refuses at start: each section's own
validator runs, and an unknown top-level table is named with the known ones (review: site check
checked the topology only; a file with ``[edge] tick_s = 0``, ``[ocpp] port = "8443"`` and a
``[metric]`` typo printed ok, rc 0, and the edge refused it; the typo alone ran with no metrics
endpoint)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evcore.cli import main as evcore_main

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = """\
[site]
id = "s1"
[[nodes]]
id = "grid"
phase_limit_a = 100.0
[[chargers]]
id = "cp1"
parent = "grid"
wiring = "three_phase"
max_a = 32.0
"""


def _site(tmp_path: Path, sections: str) -> Path:
    """The topology with ``sections`` after it (before it when they open with a plain key,
    which TOML puts at the top level only there)."""
    path = tmp_path / "site.toml"
    path.write_text(TOPOLOGY + sections if sections.startswith("[") else sections + TOPOLOGY)
    return path


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = evcore_main(["site", "check", str(path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_reviewed_file_is_refused_naming_each_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _site(
        tmp_path,
        '[edge]\ntick_s = 0\n[metric]\nlisten = "127.0.0.1:9464"\n[ocpp]\nport = "8443"\n',
    )
    rc, out, err = _check(path, capsys)
    assert rc == 2
    assert "ok:" not in out
    assert re.search(_named("edge", "tick_s"), err)
    assert re.search(_named("ocpp", "port"), err)
    assert "unknown table [metric]" in err and "[metrics]" in err
    assert "Traceback" not in err


def test_a_misspelt_table_alone_is_refused_with_the_known_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _check(_site(tmp_path, '[metric]\nlisten = "127.0.0.1:9464"\n'), capsys)
    assert rc == 2 and "ok:" not in out
    assert "unknown table [metric]; known tables:" in err
    for known in ("[site]", "[edge]", "[ocpp]", "[bus]", "[store]", "[api]", "[metrics]"):
        assert known in err
    assert "[cloud]" in err and "[planner]" in err


def _named(section: str, key: str) -> str:
    """A pattern of an error naming ``[section].key``, in either room's wording
    (``[edge].tick_s …``, ``[bus] kind …``, ``ocpp.port: …``)."""
    return rf"\[?{section}\]?[. ]{key}"


# One wrong key per section: each is what that section's own validator refuses at the edge's start
# (and a pattern of what the error says).
BAD_SECTIONS = {
    "edge": ('[edge]\npolicy = "cheapest"\n', _named("edge", "policy")),
    "edge-resolution": (
        "[edge]\nresolution_a = 0.5\n[ocpp]\nwhole_amperes = false\n",
        _named("edge", "resolution_a"),
    ),
    "ocpp": ('[ocpp]\nport = "8443"\n', _named("ocpp", "port")),
    "ocpp-tls": (
        '[ocpp]\nsecurity_profile = 2\ntls_cert = "csms.pem"\ntls_key = "csms.key"\n',
        _named("ocpp", "tls_cert"),
    ),
    "bus": ('[bus]\nkind = "kafka"\n', _named("bus", "kind")),
    "store": ('[store]\nkind = "postgres"\n', _named("store", "(kind|dsn)")),
    "api": ('[api]\nlisten = "no-port"\n', _named("api", "listen")),
    "metrics": ('[metrics]\nlisten = "127.0.0.1:70000"\n', _named("metrics", "listen")),
    "cloud": ('[cloud]\nurl = "127.0.0.1:7443"\ninsecure = "yes"\n', _named("cloud", "insecure")),
    "planner": ("[planner]\nhorizon_h = -1\n", _named("planner", "horizon_h")),
    "not-a-table": ("ocpp = 5\n", r"\[ocpp\]: expected a table"),
}


@pytest.mark.parametrize("case", sorted(BAD_SECTIONS))
def test_each_section_is_checked_as_the_edge_checks_it(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sections, said = BAD_SECTIONS[case]
    rc, out, err = _check(_site(tmp_path, sections), capsys)
    assert rc == 2, out
    assert re.search(said, err), err
    assert "ok:" not in out and "Traceback" not in err


def _evcore() -> list[str]:
    exe = shutil.which("evcore")
    return [exe] if exe else [sys.executable, "-m", "evcore"]


@pytest.mark.parametrize("case", ["edge", "ocpp", "ocpp-tls", "store", "api", "planner"])
def test_the_edge_refuses_those_files_too(case: str, tmp_path: Path) -> None:
    """The same files stop ``evcore edge`` before it opens anything (exit 2): site check and
    the edge agree."""
    path = _site(tmp_path, BAD_SECTIONS[case][0])
    res = subprocess.run(
        [*_evcore(), "edge", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert re.search(BAD_SECTIONS[case][1], res.stderr), res.stderr


def test_relative_files_are_taken_from_the_site_files_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = tmp_path / "etc"
    site_dir.mkdir()
    (site_dir / "api-tokens.toml").write_text(
        '[[tokens]]\nname = "ops"\ntoken = "' + "t" * 24 + '"\nroles = ["operator"]\n'
    )
    path = site_dir / "site.toml"
    path.write_text(TOPOLOGY + '[api]\ntokens_file = "api-tokens.toml"\n')
    monkeypatch.chdir(tmp_path)  # not the site file's directory
    rc, out, err = _check(path, capsys)
    assert rc == 0, err
    assert "ok: 1 nodes, 1 chargers; [api] as the edge reads them" in out
    (site_dir / "api-tokens.toml").unlink()
    rc, out, err = _check(path, capsys)
    assert rc == 2 and "api-tokens.toml" in err


def test_a_file_with_every_section_right_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sections = (
        '[edge]\ntick_s = 0.5\npolicy = "least_laxity"\n'
        '[ocpp]\nport = 0\n[bus]\nkind = "inprocess"\n[store]\npath = "var/store"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[planner]\nhorizon_h = 12\n'
    )
    rc, out, err = _check(_site(tmp_path, sections), capsys)
    assert rc == 0, err
    assert "ok: 1 nodes, 1 chargers; [edge], [ocpp], [bus], [store], [metrics], [planner]" in out
    assert not (tmp_path / "var").exists()  # nothing opened


@pytest.mark.parametrize("path", sorted((ROOT / "edge").glob("*.toml")), ids=lambda p: p.name)
def test_the_shipped_site_files_pass(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The examples in edge/ pass; the files the production one names under /etc/evcore (the
    OCPP credentials, API tokens and TLS pair, on the machine) are stood in for."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ocpp-credentials.toml").write_text(
        "".join(f'[stations.CP0{i}]\npassword = "{"x" * 16}"\n' for i in (1, 2))
    )
    (etc / "api-tokens.toml").write_text(
        '[[tokens]]\nname = "ops"\ntoken = "' + "t" * 24 + '"\nroles = ["viewer"]\n'
    )
    for name in ("csms.pem", "csms.key"):  # looked for, not loaded, at load
        (etc / name).write_text("stand-in\n")
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace("/etc/evcore/", f"{etc}/"))
    rc, out, err = _check(copy, capsys)
    assert rc == 0, err
    assert "ok:" in out
