"""The operator's first contact with ``evcore``: every command's ``--help`` says what it does and
what each option means; a wrong argument or a bad site file is named, with a non-zero exit and no
traceback; the shipped example site's stations can connect (``evcore csms`` + ``evcore simcp``).
Everything runs in process through ``evcore.cli.main`` (the same parser as the installed script)."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import free_port
from evcore.cli import build_parser, main
from evcore.ocpp import cli as ocpp_cli
from evcore.site import SiteConfigError, load_site

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "metrics"))
from metrics_testkit import cert_authority

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_SITE = ROOT / "edge" / "site.example.toml"
PRODUCTION_SITE = ROOT / "edge" / "site.production.example.toml"


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_command_says_what_it_does_and_what_each_option_means() -> None:
    undescribed, unexplained = [], []
    for path, parser in _commands(build_parser()):
        if not (parser.description or "").strip():
            undescribed.append(" ".join(("evcore", *path)))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                unexplained.append(
                    f"{' '.join(('evcore', *path))} {action.option_strings or action.dest}"
                )
    assert undescribed == [], f"--help without a description: {undescribed}"
    assert unexplained == [], f"options without help: {unexplained}"


def test_the_doc_a_help_text_points_to_exists_and_covers_the_command() -> None:
    """simcp's --help said 'See docs/twin.md', which never mentions simcp."""
    for path, parser in _commands(build_parser()):
        for doc in re.findall(r"docs/[\w-]+\.md", parser.description or ""):
            assert (ROOT / doc).exists(), (path, doc)
            if path:
                text = (ROOT / doc).read_text(encoding="utf-8")
                assert f"evcore {path[0]}" in text, (" ".join(path), doc)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["csms", "--config", "SITE", "--port", "99999"], "--port"),
        (["csms", "--config", "SITE", "--seconds", "-1"], "--seconds"),
        (["simcp", "--config", "SITE", "--seconds", "nan"], "--seconds"),
        (["simcp", "--config", "SITE", "--sample-interval", "0"], "--sample-interval"),
        (["simcp", "--config", "SITE", "--url", "http://127.0.0.1:9000/ocpp"], "--url"),
        (["edge", "--config", "SITE", "--log-level", "verbose"], "--log-level"),
        (["cloud", "serve", "--config", "cloud.toml", "--log-level", "loud"], "--log-level"),
        (["cloud", "sites", "--target", "h:1", "--insecure", "--timeout", "-1"], "--timeout"),
        (["cloud", "curtail", "--target", "h:1", "--list", "--timeout", "nan"], "--timeout"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_a_wrong_argument_is_named_and_exits_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(EXAMPLE_SITE) if a == "SITE" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}" in err, err


def _bad_site(tmp_path: Path) -> Path:
    bad = tmp_path / "bad-site.toml"
    bad.write_text(
        EXAMPLE_SITE.read_text().replace("phase_limit_a = 125.0", 'phase_limit_a = "125 A"')
    )
    return bad


@pytest.mark.parametrize("command", ["csms", "simcp"])
@pytest.mark.parametrize("case", ["malformed", "missing"])
def test_a_bad_site_file_is_named_without_a_traceback(
    command: str, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _bad_site(tmp_path) if case == "malformed" else tmp_path / "no-such-site.toml"
    rc = main([command, "--config", str(site), "--seconds", "0.1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(site) in err
    if case == "malformed":
        assert "F1.phase_limit_a" in err  # the node and the field
    else:
        assert "not found" in err


async def _simcp_against_csms(site: Path, port: int | None, *simcp_args: str) -> int:
    """`evcore csms --config SITE` (on ``port``; [ocpp]'s when None) and, half a second later,
    `evcore simcp --config SITE *simcp_args`, in this process: simcp's exit status."""
    parser = build_parser()
    port_args = ("--port", str(port)) if port is not None else ()
    csms = parser.parse_args(
        ["csms", "--config", str(site), *port_args, "--seconds", "8", "--quiet"]
    )
    simcp = parser.parse_args(["simcp", "--config", str(site), *simcp_args])
    server = asyncio.ensure_future(ocpp_cli._csms(csms))
    try:
        await asyncio.sleep(0.5)
        return await ocpp_cli._simcp(simcp)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def test_the_example_sites_simulated_stations_connect_to_its_central_system(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: `evcore csms` / `evcore simcp` on the example site file. With no [ocpp] section
    the central system ran profile 1 (Basic auth) with no password for any station: every
    station was refused (HTTP 401) and simcp waited 30 s, then a TimeoutError traceback."""
    site = tmp_path / "site.toml"
    shutil.copy(EXAMPLE_SITE, site)
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ocpp"
    simcp = ("--url", url, "--seconds", "0.1", "--connect-timeout", "5")
    assert await _simcp_against_csms(site, port, *simcp) == 0
    assert "5 simulated stations connected" in capsys.readouterr().out


async def test_simcp_that_cannot_connect_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    args = build_parser().parse_args(
        [
            *("simcp", "--config", str(EXAMPLE_SITE), "--url", f"ws://127.0.0.1:{port}/ocpp"),
            *("--seconds", "0.1", "--connect-timeout", "0.5"),
        ]
    )
    assert await ocpp_cli._simcp(args) == 1
    err = capsys.readouterr().err
    assert f"ws://127.0.0.1:{port}/ocpp" in err and "CP01" in err, err


def test_site_check_warns_of_a_station_without_the_password_its_profile_asks_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A station under profile 1 or 2 without a password is refused (HTTP 401) at every
    connection: what the example site did to all 5 stations. `site check` said 'ok'."""
    site = tmp_path / "site.toml"
    site.write_text(EXAMPLE_SITE.read_text().replace('DC01 = "example', 'DC0l = "example'))
    assert main(["site", "check", str(site)]) == 0  # a warning: the file loads
    err = capsys.readouterr().err
    assert "DC01 (dc-01)" in err and "HTTP 401" in err, err
    assert "DC0l" in err and "no charger" in err, err
    assert main(["site", "check", str(EXAMPLE_SITE)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_unknown_benchmark_is_named_with_the_command_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "alocator"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evcore bench: unknown benchmark 'alocator'") and "allocator" in err


async def test_simcp_reaches_a_tls_central_system_as_its_site_file_describes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The production example: [ocpp] host 0.0.0.0, security profile 2 (TLS + Basic auth),
    passwords in a credentials_file. simcp's default URL was ws://0.0.0.0:PORT/ocpp whatever
    the profile, so no station could connect to the TLS listener; now wss:// to a local
    address, verifying the central system's certificate with --ca."""
    ca = cert_authority(tmp_path, "csms CA")
    cert, key = ca.issue("localhost", server=True)
    creds = tmp_path / "ocpp-credentials.toml"
    creds.write_text(
        f'[stations.CP01]\npassword = "{"p" * 16}"\n[stations.CP02]\npassword = "{"q" * 16}"\n'
    )
    port = free_port()
    site = tmp_path / "site.toml"
    site.write_text(
        PRODUCTION_SITE.read_text()
        .replace("port = 8443", f"port = {port}")
        .replace("/etc/evcore/csms.pem", cert)
        .replace("/etc/evcore/csms.key", key)
        .replace("/etc/evcore/ocpp-credentials.toml", str(creds))
    )
    simcp = ("--ca", str(ca.ca_path), "--seconds", "0.1", "--connect-timeout", "5")
    assert await _simcp_against_csms(site, None, *simcp) == 0, capsys.readouterr().err
    assert (
        f"2 simulated stations connected to wss://127.0.0.1:{port}/ocpp" in capsys.readouterr().out
    )


@pytest.mark.parametrize("command", ["curtail", "sites"])
def test_an_unreadable_operator_certificate_names_its_option(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    argv = ["cloud", command, "--target", "127.0.0.1:1", "--ca", str(ca)]
    argv += ["--cert", str(tmp_path / "operator.pem"), "--key", str(tmp_path / "operator.key")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--cert {tmp_path / 'operator.pem'}: No such file" in err, err


@pytest.mark.parametrize("command", ["verify", "show"])
def test_audit_names_the_site_file_of_a_malformed_store_section(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[site]\nid = "depot"\n[store]\nkind = "postgress"\n')
    assert main(["audit", command, "--config", str(site)]) == 2
    err = capsys.readouterr().err
    assert str(site) in err and "[store] kind" in err and "postgress" in err, err


def _two_chargers_on_one_evse(tmp_path: Path) -> Path:
    site = tmp_path / "site.toml"
    site.write_text(EXAMPLE_SITE.read_text().replace('ocpp_id = "CP02"', 'ocpp_id = "CP01"'))
    return site


def test_site_check_refuses_two_chargers_on_one_station_evse_as_the_edge_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cp-01 and cp-02 both on station CP01, EVSE 1 (the default): the central system refused
    the site only when evcore edge started, `site check` said ok. The site file itself is
    refused now, naming the charger and field, whoever loads it."""
    site = _two_chargers_on_one_evse(tmp_path)
    assert main(["site", "check", str(site)]) == 2
    err = capsys.readouterr().err
    assert 'cp-02.evse_id: charger "cp-01" is on station "CP01" EVSE 1 already' in err, err
    with pytest.raises(SiteConfigError) as e:
        load_site(site)
    assert (e.value.node, e.value.field) == ("cp-02", "evse_id")


def test_a_site_the_central_system_refuses_is_said_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _two_chargers_on_one_evse(tmp_path)
    rc = main(["csms", "--config", str(site), "--seconds", "0.1", "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 2 and 'cp-02.evse_id: charger "cp-01" is on station "CP01" EVSE 1' in err, err


async def test_simcp_names_only_the_stations_that_did_not_connect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.toml"
    site.write_text(EXAMPLE_SITE.read_text().replace('DC01 = "example-password-dc01"\n', ""))
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ocpp"
    simcp = ("--url", url, "--seconds", "0.1", "--connect-timeout", "2")
    assert await _simcp_against_csms(site, port, *simcp) == 1
    err = capsys.readouterr().err
    assert "1 of 5 stations not connected" in err and "DC01 (" in err and "401" in err, err
