"""Security profiles 1–3 over real sockets (certificates generated here) and interop with the
``test-ocpp`` client from PyPI."""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from evcore.clock import WallClock
from evcore.ocpp import CentralSystem, OcppConfigError, parse_ocpp_section
from ocpp_certs import CertAuthority
from ocpp_testsite import BOOT_201, PASSWORDS, RawStation, make_site
from test_ocpp.client import check_connection
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(60)


def client_ctx(pki: CertAuthority, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def run_test_ocpp_cli(
    base: str, sid: str, version: str, password: str
) -> subprocess.CompletedProcess[str]:
    """The ``test-ocpp`` command-line tool, as an operator would run it, in its own process."""
    return await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "test_ocpp",
            base,
            sid,
            "--ocpp",
            version,
            "--password",
            password,
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_profile_1_with_test_ocpp_client_both_versions() -> None:
    cs = CentralSystem(make_site(), clock=WallClock())
    await cs.start()
    try:
        base = f"ws://127.0.0.1:{cs.port}/ocpp"
        for sid, version in (("CPA", "1.6"), ("CPB", "2.0.1")):
            result = await check_connection(
                base, sid, ocpp=version, password=PASSWORDS[sid], timeout=5
            )
            assert result.subprotocol == f"ocpp{version}"
            assert result.boot_notification["status"] == "Accepted"
            assert "currentTime" in result.heartbeat
            # With the trailing-slash URL form too.
            await check_connection(
                base, sid, ocpp=version, password=PASSWORDS[sid], trailing_slash=True, timeout=5
            )
        with pytest.raises(InvalidStatus) as exc:
            await check_connection(
                base, "CPA", ocpp="1.6", password="not-the-password-1", timeout=5
            )
        assert exc.value.response.status_code == 401
        ok = await run_test_ocpp_cli(base, "CPB", "2.0.1", PASSWORDS["CPB"])
        assert ok.returncode == 0 and "SUCCESS" in ok.stdout, ok.stdout + ok.stderr
        bad = await run_test_ocpp_cli(base, "CPB", "2.0.1", "wrong-password-000")
        assert bad.returncode == 1 and "HTTP 401" in bad.stdout
    finally:
        await cs.stop()


async def test_profile_2_tls_and_basic_auth(tmp_path: Path) -> None:
    pki = CertAuthority(tmp_path)
    cert, key = pki.issue("csms.local", server=True)
    cs = CentralSystem(make_site(security_profile=2, tls_cert=cert, tls_key=key), clock=WallClock())
    await cs.start()
    try:
        base = f"wss://127.0.0.1:{cs.port}/ocpp"
        res = await check_connection(
            base, "CPA", ocpp="1.6", password=PASSWORDS["CPA"], ca=str(pki.ca_path), timeout=5
        )
        assert res.tls_version in ("TLSv1.2", "TLSv1.3")
        assert res.boot_notification["status"] == "Accepted"
        with pytest.raises(InvalidStatus) as exc:
            await check_connection(
                base,
                "CPA",
                ocpp="1.6",
                password="not-the-password-1",
                ca=str(pki.ca_path),
                timeout=5,
            )
        assert exc.value.response.status_code == 401
        # Plain ws:// to a TLS listener never gets a session.
        with pytest.raises((OSError, asyncio.TimeoutError, InvalidStatus, Exception)):
            await check_connection(
                f"ws://127.0.0.1:{cs.port}/ocpp",
                "CPA",
                ocpp="1.6",
                password=PASSWORDS["CPA"],
                timeout=2,
            )
    finally:
        await cs.stop()


async def test_profile_3_mutual_tls_checks_the_certificate_name(tmp_path: Path) -> None:
    pki = CertAuthority(tmp_path)
    rogue = CertAuthority(tmp_path, "rogue CA")
    cert, key = pki.issue("csms.local", server=True)
    site = make_site(
        security_profile=3,
        tls_cert=cert,
        tls_key=key,
        tls_client_ca=str(pki.ca_path),
        credentials={"CPA": {"serial": "SN-CPA-0001"}, "CPB": {"serial": "SN-CPB-0002"}},
    )
    cs = CentralSystem(site, clock=WallClock())
    await cs.start()
    try:
        base = f"wss://127.0.0.1:{cs.port}/ocpp"
        good = pki.issue("SN-CPA-0001")
        res = await check_connection(
            base, "CPA", ocpp="1.6", cert=good[0], key=good[1], ca=str(pki.ca_path), timeout=5
        )
        assert res.boot_notification["status"] == "Accepted"
        # A valid certificate naming another station is refused with 401.
        other = pki.issue("SN-CPB-0002")
        with pytest.raises(InvalidStatus) as exc:
            await check_connection(
                base, "CPA", ocpp="1.6", cert=other[0], key=other[1], ca=str(pki.ca_path), timeout=5
            )
        assert exc.value.response.status_code == 401
        # No certificate, or one from another CA, never gets a session.
        for c in (None, rogue.issue("SN-CPA-0001")):
            with pytest.raises((InvalidStatus, ssl.SSLError, OSError, Exception)) as e2:
                await check_connection(
                    base,
                    "CPA",
                    ocpp="1.6",
                    cert=c[0] if c else None,
                    key=c[1] if c else None,
                    ca=str(pki.ca_path),
                    timeout=5,
                )
            if isinstance(e2.value, InvalidStatus):
                assert e2.value.response.status_code == 401
        assert cs.connected() == set()
    finally:
        await cs.stop()


def test_station_profile_is_never_downgraded_and_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(OcppConfigError, match="tls_cert"):
        parse_ocpp_section({"security_profile": 2})
    with pytest.raises(OcppConfigError, match="16 to 40"):
        parse_ocpp_section({"credentials": {"CP1": "short"}})
    with pytest.raises(OcppConfigError, match="authorization_key_hex"):
        parse_ocpp_section({"credentials": {"CP1": {"authorization_key_hex": "abcd"}}})
    with pytest.raises(OcppConfigError, match="unknown keys"):
        parse_ocpp_section({"prot": 1})
    creds = tmp_path / "creds.toml"
    creds.write_text('[stations.CP9]\npassword = "from-the-credentials-file"\n')
    cfg = parse_ocpp_section({"credentials_file": "creds.toml"}, base_dir=tmp_path)
    assert cfg.credentials["CP9"].password == "from-the-credentials-file"


async def test_profile_2_station_refused_on_plain_listener_and_hex_key() -> None:
    key_hex = "00112233445566778899aabbccddeeff"
    site = make_site(
        credentials={
            "CPA": {"password": PASSWORDS["CPA"], "security_profile": 2},
            "CPB": {"authorization_key_hex": key_hex},
        }
    )
    cs = CentralSystem(site, clock=WallClock())
    await cs.start()
    try:
        base = f"ws://127.0.0.1:{cs.port}/ocpp"
        with pytest.raises(InvalidStatus) as exc:
            await check_connection(base, "CPA", ocpp="1.6", password=PASSWORDS["CPA"], timeout=5)
        assert exc.value.response.status_code == 403
        res = await check_connection(base, "CPB", ocpp="1.6", password=key_hex, timeout=5)
        assert res.boot_notification["status"] == "Accepted"
    finally:
        await cs.stop()


async def test_basic_auth_scheme_is_case_insensitive_and_bad_headers_are_refused() -> None:
    """RFC 7235 section 2.1 / RFC 7617: the scheme name is case-insensitive and one or more
    spaces may follow it. Stations sending "basic ..." or "BASIC ..." with the right password
    were refused with 401; wrong credentials and malformed headers still are, saying why."""
    cs = CentralSystem(make_site(configure_on_boot=False), clock=WallClock())
    await cs.start()
    try:

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        good = b64(f"CPB:{PASSWORDS['CPB']}")

        async def open_with(*authorization: str) -> RawStation:
            ws = await connect(
                f"ws://127.0.0.1:{cs.port}/ocpp/CPB",
                subprotocols=[Subprotocol("ocpp2.0.1")],
                additional_headers=[("Authorization", a) for a in authorization],
            )
            return RawStation(ws)

        for header in (f"basic {good}", f"BASIC {good}", f"bAsIc {good}", f"Basic   {good}"):
            st = await open_with(header)
            answer = await st.call("BootNotification", BOOT_201)
            assert answer[0] == 3 and answer[2]["status"] == "Accepted", (header, answer)
            await st.close()
        refused = {
            (f"basic {b64('CPB:not-the-password-0')}",): "wrong username or password",
            (f"BASIC {b64('CPA:' + PASSWORDS['CPA'])}",): "wrong username or password",
            (): "Basic authentication required",
            (f"Bearer {good}",): "Basic authentication required",
            (f"Basic{good}",): "Basic authentication required",
            ("basic",): "malformed Authorization header",
            ("Basic !!not-base64!!",): "malformed Authorization header",
            (f"Basic {b64('CPB' + PASSWORDS['CPB'])}",): "malformed Authorization header",
            (f"Basic {good}", f"Basic {good}"): "malformed Authorization header",
        }
        for headers, why in refused.items():
            with pytest.raises(InvalidStatus) as exc:
                await open_with(*headers)
            response = exc.value.response
            assert response.status_code == 401, headers
            assert response.body == f"{why}\n".encode(), (headers, response.body)
            assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert cs.connected() == set()
    finally:
        await cs.stop()
