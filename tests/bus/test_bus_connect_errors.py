"""A bus that cannot connect says why. nats-py hands its connect errors to the bus's error
callback, which logged them at DEBUG: an edge with a wrong ``[bus] token`` (or a ``creds_file``
that is not there) never connected and said nothing at any level an operator runs at, while
its critical events filled the outbox. Now a wrong token is logged at WARNING naming the broker
(without the token), and a ``creds_file`` that cannot be read is refused when the bus is made,
naming the key (``evcore edge`` exits 2)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import NATS_SERVER, free_port, port_open, unique_site, wait_until
from evcore.bus import bus_from_config, parse_bus_config
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock


@pytest.fixture
def token_server() -> Iterator[int]:
    """A real nats-server that takes the token 'right-token' only; its port."""
    port = free_port()
    proc = subprocess.Popen(
        [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "--auth", "right-token"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.02)
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_a_wrong_token_is_logged_at_warning_naming_the_broker_not_the_token(
    token_server: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"nats://127.0.0.1:{token_server}"
    cfg = parse_bus_config(
        {
            "kind": "nats",
            "url": url,
            "outbox_dir": str(tmp_path / "outbox"),
            "token": "wrong-token",
            "connect_timeout_s": 0.5,
            "reconnect_wait_s": 0.1,
        }
    )
    bus = NatsBus(unique_site(), cfg, clock=WallClock())
    with caplog.at_level(logging.WARNING, logger="evcore.bus.nats"):
        await bus.start()
        try:
            assert not bus.connected
            await wait_until(
                lambda: any("authorization" in r.getMessage().lower() for r in caplog.records),
                5,
                "a warning that the broker refused the bus",
            )
        finally:
            await bus.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"127.0.0.1:{token_server}" in m for m in said), said
    assert not any("wrong-token" in m for m in said), said
    # Logged on the 1st, 10th, every 100th failure: a retry every 0.1 s does not flood the log.
    assert len([m for m in said if "authorization" in m.lower()]) <= 3, said


def test_a_creds_file_that_cannot_be_read_is_refused_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.creds"
    sec = {"kind": "nats", "outbox_dir": str(tmp_path / "outbox"), "creds_file": str(missing)}
    with pytest.raises(ValueError, match=r"\[bus\] creds_file") as refused:
        bus_from_config(sec, unique_site(), WallClock())
    assert str(missing) in str(refused.value)
    creds = tmp_path / "site.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    sec["creds_file"] = str(creds)
    assert isinstance(bus_from_config(sec, unique_site(), WallClock()), NatsBus)


def test_a_broker_url_is_logged_without_its_user_and_password() -> None:
    from evcore.bus.natsbus import _without_userinfo

    assert _without_userinfo("nats://edge:s3cret@10.0.0.5:4222") == "nats://10.0.0.5:4222"
    assert _without_userinfo("tls://nats.example:4443") == "tls://nats.example:4443"
    assert _without_userinfo("wss://u:p@h/path@x") == "wss://h/path@x"


def test_site_check_refuses_a_creds_file_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from evcore.cli import main

    example = Path(__file__).resolve().parents[2] / "edge" / "site.example.toml"
    missing = tmp_path / "no-such.creds"
    site = tmp_path / "site.toml"
    site.write_text(
        example.read_text(encoding="utf-8") + f'\n[bus]\nkind = "nats"\ncreds_file = "{missing}"\n'
    )
    assert main(["site", "check", str(site)]) == 2
    err = capsys.readouterr().err
    assert "[bus] creds_file" in err and str(missing) in err, err


@pytest.mark.parametrize(
    "url",
    ["nats://", "nats://:4222", "nats://127.0.0.1:99999", "nats://127.0.0.1:42x2", "tls://:0"],
)
def test_a_url_nats_py_cannot_connect_to_is_refused_naming_it(url: str) -> None:
    """nats-py raises at the first connect for a URL without a host or with a port out of
    range ('nats: invalid hostname in connect url'): the bus's connect task ended on it, and
    the bus never connected and said nothing. Refused at load now, naming the key and URL."""
    with pytest.raises(ValueError, match=r"\[bus\] url") as refused:
        parse_bus_config({"kind": "nats", "url": url})
    assert repr(url) in str(refused.value)
    with pytest.raises(ValueError, match=r"\[bus\] urls"):
        parse_bus_config({"kind": "nats", "urls": ["nats://127.0.0.1:4222", url]})
    for good in ("nats://10.0.0.5:4222", "nats://nats.example", "tls://u:p@[::1]:4443"):
        assert parse_bus_config({"kind": "nats", "url": good}).urls == (good,)


async def test_a_connect_nats_py_gives_up_on_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A BusConfig made in code (not through parse_bus_config) with a URL nats-py cannot use: its
    connect task ended on nats-py's error without a word; now it is logged at ERROR."""
    from evcore.bus import BusConfig

    cfg = BusConfig(kind="nats", urls=("nats://:4222",), outbox_dir=tmp_path, connect_timeout_s=0.2)
    bus = NatsBus(unique_site(), cfg, clock=WallClock())
    with caplog.at_level(logging.ERROR, logger="evcore.bus.nats"):
        await bus.start()
        try:
            await wait_until(
                lambda: any("cannot connect to NATS" in r.getMessage() for r in caplog.records),
                5,
                "the error",
            )
        finally:
            await bus.close()
    assert any("invalid hostname" in r.getMessage() for r in caplog.records)
