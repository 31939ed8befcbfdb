"""``[metrics] token_file`` and TLS over real sockets: a scrape without the bearer token, or with
another, gets 401 (counted); the right one gets the metrics; a rotated token file is taken
without a restart; HTTPS with a certificate made here (plain HTTP gets no answer), client
certificates with ``tls_client_ca_file``; every configuration error names its key."""

from __future__ import annotations

import logging
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from evcore.metrics import MetricsConfig, MetricsConfigError, MetricsServer
from metrics_testkit import (
    cert_authority,
    get,
    level_registry,
    no_http_answer,
    parse,
    request,
    scrape,
)

pytestmark = pytest.mark.timeout(60)

REFUSED = "evcore_metrics_scrapes_refused_total"


def _token_file(path: Path, token: str, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


async def _served(section: dict[str, object]) -> MetricsServer:
    cfg = MetricsConfig.from_section({"listen": "127.0.0.1:0", **section})
    assert cfg is not None
    server = MetricsServer.from_config(level_registry(), cfg)
    server.read_timeout_s = 2.0
    await server.start()
    return server


@pytest.fixture
async def with_token(tmp_path: Path) -> AsyncIterator[tuple[MetricsServer, Path]]:
    path = _token_file(tmp_path / "metrics.token", "s3cret-token-A")
    server = await _served({"token_file": str(path)})
    try:
        yield server, path
    finally:
        await server.stop()


async def test_a_scrape_needs_the_bearer_token(with_token: tuple[MetricsServer, Path]) -> None:
    server, _ = with_token
    port = server.port
    missing = await get(port)
    assert missing.status == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="evcore metrics"'
    assert b"evcore_level_amperes" not in missing.body
    wrong = await get(port, token="s3cret-token-B")
    assert wrong.status == 401
    assert wrong.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    # A prefix of the token, another scheme, the token twice (one wrong) are all refused.
    assert (await get(port, token="s3cret-token-")).status == 401
    basic = b"GET /metrics HTTP/1.1\r\nAuthorization: Basic czNjcmV0LXRva2VuLUE=\r\n\r\n"
    assert (await request(port, basic)).status == 401
    twice = (
        b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token-A\r\n"
        b"Authorization: Bearer nope\r\n\r\n"
    )
    assert (await request(port, twice)).status == 401
    # Without the token nothing about the endpoint is answered, not even a 404.
    assert (await get(port, "/other")).status == 401
    s = await scrape(port, token="s3cret-token-A")
    assert s.value("evcore_level_amperes") == 16.0
    assert s.value(REFUSED, reason="missing") == 4  # none, Basic, twice, /other
    assert s.value(REFUSED, reason="wrong") == 2
    # The scheme is case-insensitive (RFC 7235).
    lower = b"GET /metrics HTTP/1.1\r\nauthorization: bearer s3cret-token-A\r\n\r\n"
    assert (await request(port, lower)).status == 200
    assert (await get(port, "/other", token="s3cret-token-A")).status == 404
    assert server.answered[401] == 6


async def test_a_rotated_token_is_taken_without_a_restart(
    with_token: tuple[MetricsServer, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, path = with_token
    port = server.port
    assert (await get(port, token="s3cret-token-A")).status == 200
    # Rotation by rename (what a secrets agent does): the new file replaces the old one.
    new = _token_file(path.with_name("metrics.token.new"), "token-B")
    os.replace(new, path)
    assert (await get(port, token="s3cret-token-A")).status == 401
    assert (await get(port, token="token-B")).status == 200
    # Rewritten in place, same length, at once: still seen.
    path.write_text("token-C\n")
    assert (await get(port, token="token-B")).status == 401
    assert (await get(port, token="token-C")).status == 200
    # Gone, or empty: nothing is accepted (503: the endpoint cannot check), not the last token.
    path.unlink()
    with caplog.at_level(logging.WARNING, "evcore.metrics"):
        assert (await get(port, token="token-C")).status == 503
        assert (await get(port)).status == 503
    assert "[metrics].token_file" in caplog.text
    path.write_text("")
    assert (await get(port, token="token-C")).status == 503
    path.write_text("token-D")
    s = await scrape(port, token="token-D")
    assert s.value("evcore_level_amperes") == 16.0
    assert s.value(REFUSED, reason="wrong") == 2


async def test_a_rotation_keeps_the_old_and_the_new_token_for_as_long_as_both_lines_stand(
    with_token: tuple[MetricsServer, Path],
) -> None:
    """One token per line: the new one added beside the old, Prometheus rotated, the old line
    removed. Before, one token was in force at a time and the scrapes between the two rotations
    got 401 (a gap in the series)."""
    server, path = with_token
    port = server.port
    path.write_text("s3cret-token-A\n\n  token-B  \n")
    assert (await get(port, token="s3cret-token-A")).status == 200
    assert (await get(port, token="token-B")).status == 200
    assert (await get(port, token="token-C")).status == 401
    path.write_text("token-B\n")
    assert (await get(port, token="s3cret-token-A")).status == 401
    assert (await get(port, token="token-B")).status == 200
    # A line that is not one token makes the file unreadable (503), whichever line it is.
    path.write_text("token-B\ntwo words\n")
    assert (await get(port, token="token-B")).status == 503


async def test_a_token_file_gone_before_the_start_stops_it(tmp_path: Path) -> None:
    path = _token_file(tmp_path / "t", "abc")
    cfg = MetricsConfig.from_section({"listen": "127.0.0.1:0", "token_file": str(path)})
    assert cfg is not None
    path.unlink()
    server = MetricsServer.from_config(level_registry(), cfg)
    with pytest.raises(MetricsConfigError, match=r"\[metrics\]\.token_file: cannot read"):
        await server.start()


async def test_without_a_token_file_there_is_no_refusal_counter() -> None:
    server = await _served({})
    try:
        resp = await get(server.port)
        assert resp.status == 200 and REFUSED.encode() not in resp.body
        assert parse(resp.body.decode()).value("evcore_level_amperes") == 16.0
    finally:
        await server.stop()


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, False), (0o600, False)])
def test_a_token_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    path = _token_file(tmp_path / "t", "abc", mode)
    with caplog.at_level(logging.WARNING, "evcore.metrics"):
        MetricsConfig.from_section({"listen": "127.0.0.1:0", "token_file": str(path)})
    assert ("[metrics].token_file" in caplog.text and "every user" in caplog.text) == warned


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca = cert_authority(tmp_path, "metrics CA")
    cert, key = ca.issue("edge-metrics", server=True)
    client_cert, client_key = ca.issue("prometheus")
    other = cert_authority(tmp_path, "other CA")
    other_cert, other_key = other.issue("intruder")
    for k in (key, client_key, other_key):
        Path(k).chmod(0o600)
    return {
        "ca": str(ca.ca_path),
        "cert": cert,
        "key": key,
        "client_cert": client_cert,
        "client_key": client_key,
        "other_ca": str(other.ca_path),
        "other_cert": other_cert,
        "other_key": other_key,
    }


def _client(ca: str, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def test_https_with_the_ca_works_and_plain_http_gets_no_answer(
    pki: dict[str, str],
) -> None:
    server = await _served({"tls_cert_file": pki["cert"], "tls_key_file": pki["key"]})
    try:
        assert server.tls is not None
        assert server.tls.minimum_version == ssl.TLSVersion.TLSv1_2
        assert (await scrape(server.port, tls=_client(pki["ca"]))).value(
            "evcore_level_amperes"
        ) == 16.0
        await no_http_answer(server.port, None)
        # A client that does not trust the CA refuses the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            await get(server.port, tls=_client(pki["other_ca"]))
        # Plain HTTP and a failed handshake harm nothing.
        assert (await get(server.port, tls=_client(pki["ca"]))).status == 200
    finally:
        await server.stop()


async def test_mtls_refuses_a_scrape_without_a_client_certificate_of_the_ca(
    pki: dict[str, str], tmp_path: Path
) -> None:
    token = _token_file(tmp_path / "metrics.token", "tok")
    server = await _served(
        {
            "tls_cert_file": pki["cert"],
            "tls_key_file": pki["key"],
            "tls_client_ca_file": pki["ca"],
            "token_file": str(token),
        }
    )
    try:
        await no_http_answer(server.port, _client(pki["ca"]))
        await no_http_answer(server.port, _client(pki["ca"], (pki["other_cert"], pki["other_key"])))
        await no_http_answer(server.port, None)
        with_cert = _client(pki["ca"], (pki["client_cert"], pki["client_key"]))
        # The certificate and the token are both needed.
        assert (await get(server.port, tls=with_cert)).status == 401
        s = await scrape(server.port, token="tok", tls=with_cert)
        assert s.value("evcore_level_amperes") == 16.0
        assert s.value(REFUSED, reason="missing") == 1
    finally:
        await server.stop()


def live_pair(pki: dict[str, str], tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the server's certificate and key under ``tmp_path/live``, to be replaced."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "metrics.crt", live / "metrics.key"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    key.chmod(0o600)
    return cert, key


async def test_a_renewed_certificate_serves_without_a_restart(
    pki: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The certificate and key files are replaced (as a renewal does, by rename): the next
    scrape's handshake is served with the new certificate. Before, only a restart took it."""
    cert, key = live_pair(pki, tmp_path)
    server = await _served({"tls_cert_file": str(cert), "tls_key_file": str(key)})
    try:
        assert (await get(server.port, tls=_client(pki["ca"]))).status == 200
        # Renewed by another CA (a new chain): the old CA no longer verifies the server.
        (tmp_path / "renewal").mkdir()
        renewed = cert_authority(tmp_path / "renewal", "renewal CA")
        new_cert, new_key = renewed.issue("edge-metrics", server=True)
        for src, dst in ((new_key, key), (new_cert, cert)):
            tmp = dst.with_suffix(".new")
            shutil.copy(src, tmp)
            tmp.chmod(0o600)
            os.replace(tmp, dst)
        assert (await get(server.port, tls=_client(str(renewed.ca_path)))).status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            await get(server.port, tls=_client(pki["ca"]))
        assert server.tls_watch is not None and server.tls_watch.reloads >= 1
        # A broken rewrite (the key of another certificate) leaves the renewed one serving,
        # with a warning; fixed, it is taken again.
        with caplog.at_level(logging.WARNING, "evcore.metrics"):
            shutil.copy(pki["key"], key)
            assert (await get(server.port, tls=_client(str(renewed.ca_path)))).status == 200
        assert "cannot be loaded" in caplog.text
        shutil.copy(new_key, key)
        assert (await get(server.port, tls=_client(str(renewed.ca_path)))).status == 200
    finally:
        await server.stop()


def test_file_paths_are_relative_to_the_base_dir(tmp_path: Path, pki: dict[str, str]) -> None:
    _token_file(tmp_path / "metrics.token", "tok")
    section = {
        "listen": "127.0.0.1:0",
        "token_file": "metrics.token",
        "tls_cert_file": Path(pki["cert"]).name,
        "tls_key_file": pki["key"],
    }
    cfg = MetricsConfig.from_section(section, tmp_path)
    assert cfg is not None and cfg.scheme == "https"
    assert cfg.token_file == tmp_path / "metrics.token"
    assert cfg.tls_cert_file == Path(pki["cert"])
    # Without the file's directory (a caller that does not know it), only absolute paths.
    with pytest.raises(MetricsConfigError, match=r"\[metrics\]\.token_file must be an absolute"):
        MetricsConfig.from_section(section)


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"token_file": "{tmp}/absent"}, r"\[metrics\]\.token_file: no such file"),
        ({"token_file": 5}, r"\[metrics\]\.token_file must be a file path"),
        ({"token_file": "{tmp}/empty"}, r"\[metrics\]\.token_file: .* is empty"),
        ({"token_file": "{tmp}/spaced"}, r"\[metrics\]\.token_file: .* must hold one token"),
        ({"token_file": "{tmp}/big"}, r"\[metrics\]\.token_file: .* is over 4096 bytes"),
        ({"tls_cert_file": "{cert}"}, r"\[metrics\]\.tls_key_file: missing; tls_cert_file and"),
        ({"tls_key_file": "{key}"}, r"\[metrics\]\.tls_cert_file: missing; tls_cert_file and"),
        ({"tls_client_ca_file": "{ca}"}, r"\[metrics\]\.tls_client_ca_file needs tls_cert_file"),
        (
            {"tls_cert_file": "{tmp}/spaced", "tls_key_file": "{key}"},
            r"\[metrics\]\.tls_cert_file, \[metrics\]\.tls_key_file: cannot load",
        ),
        (
            {"tls_cert_file": "{cert}", "tls_key_file": "{other_key}"},
            r"\[metrics\]\.tls_cert_file, \[metrics\]\.tls_key_file: cannot load",
        ),
        (
            {"tls_cert_file": "{cert}", "tls_key_file": "{key}", "tls_client_ca_file": "{key}"},
            r"\[metrics\]\.tls_client_ca_file: cannot load",
        ),
        ({"tls_cert_file": "{cert}", "tls_key_file": "cert.key"}, r"tls_key_file must be an abs"),
        ({"token": "x"}, r"\[metrics\]\.token: unknown key; known keys: listen, tls_cert_file"),
    ],
    ids=[
        "token-absent",
        "token-not-a-path",
        "token-empty",
        "token-two-words",
        "token-too-big",
        "cert-without-key",
        "key-without-cert",
        "client-ca-without-cert",
        "cert-not-pem",
        "key-not-the-certs",
        "client-ca-not-pem",
        "relative",
        "unknown",
    ],
)
def test_a_bad_file_key_is_refused_naming_it(
    tmp_path: Path, pki: dict[str, str], section: dict[str, object], match: str
) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "spaced").write_text("two words\n")
    (tmp_path / "big").write_text("x" * 5000)
    names = {"tmp": str(tmp_path), **pki}
    filled = {k: v.format(**names) if isinstance(v, str) else v for k, v in section.items()}
    with pytest.raises(MetricsConfigError, match=match):
        MetricsConfig.from_section({"listen": "127.0.0.1:0", **filled})
