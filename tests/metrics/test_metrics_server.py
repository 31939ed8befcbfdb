"""``MetricsServer`` over real sockets: GET /metrics renders at that moment; other paths, other
methods, garbage, an oversized head and a silent client get their error and the server lives on;
``[metrics] listen`` is checked and an error names the key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from evcore.metrics import MetricFamily, MetricsConfig, MetricsConfigError, MetricsServer, Registry
from metrics_testkit import get, request, scrape

pytestmark = pytest.mark.timeout(60)


class Level:
    def __init__(self) -> None:
        self.value = 1.0
        self.fail = False

    def collect(self) -> list[MetricFamily]:
        if self.fail:
            raise RuntimeError("collector broke")
        return [MetricFamily("evcore_level_amperes", "gauge", "A level.").add(self.value)]


@pytest.fixture
async def served() -> AsyncIterator[tuple[MetricsServer, Level]]:
    level = Level()
    reg = Registry()
    reg.register(level.collect)
    server = MetricsServer(reg, "127.0.0.1", 0, read_timeout_s=0.5)
    await server.start()
    try:
        yield server, level
    finally:
        await server.stop()


async def test_get_metrics_renders_at_scrape_time(served: tuple[MetricsServer, Level]) -> None:
    server, level = served
    assert (await scrape(server.port)).value("evcore_level_amperes") == 1.0
    level.value = 16.0
    assert (await scrape(server.port)).value("evcore_level_amperes") == 16.0
    # A query string (Prometheus' params) does not change the path.
    assert (await get(server.port, "/metrics?format=prometheus")).status == 200
    head = await get(server.port, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0


async def test_other_paths_and_methods(served: tuple[MetricsServer, Level]) -> None:
    server, _ = served
    for path in ("/", "/metricsx", "/metrics/", "/health"):
        assert (await get(server.port, path)).status == 404, path
    post = await get(server.port, method="POST")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",  # TLS
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /met rics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # ends before the head does (EOF)
    ],
    ids=["tls", "garbage", "http09", "http2", "no-slash", "space", "no-colon", "bad-name", "eof"],
)
async def test_malformed_requests_get_400_and_the_server_lives_on(
    served: tuple[MetricsServer, Level], raw: bytes
) -> None:
    server, _ = served
    if raw.endswith(b"\r\n\r\n"):
        resp = await request(server.port, raw)
    else:  # the client half-closes: EOF before the head ends
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert data.startswith(b"HTTP/1.1 400 "), data
        resp = None
    if resp is not None:
        assert resp.status == 400, resp
    assert (await scrape(server.port)).value("evcore_level_amperes") == 1.0


async def test_an_oversized_head_gets_400_and_the_server_lives_on(
    served: tuple[MetricsServer, Level],
) -> None:
    server, _ = served
    big = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 100_000 + b"\r\n\r\n"
    resp = await request(server.port, big)
    assert resp.status == 400 and b"too large" in resp.body
    # Many headers, each small, add up too.
    many = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n"
    assert (await request(server.port, many)).status == 400
    assert (await scrape(server.port)).value("evcore_level_amperes") == 1.0
    assert server.answered[400] == 2


async def test_a_silent_client_gets_408_and_others_are_served_meanwhile(
    served: tuple[MetricsServer, Level],
) -> None:
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
    await writer.drain()
    assert (await scrape(server.port)).value("evcore_level_amperes") == 1.0
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    # A connection opened and closed without a byte (a TCP check) harms nothing either.
    _, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.close()
    assert (await scrape(server.port)).value("evcore_level_amperes") == 1.0


async def test_a_failing_collector_gives_500_then_recovers(
    served: tuple[MetricsServer, Level],
) -> None:
    server, level = served
    level.fail = True
    assert (await get(server.port)).status == 500
    level.fail = False
    assert (await scrape(server.port)).value("evcore_level_amperes") == 1.0


async def test_stop_closes_the_port() -> None:
    server = MetricsServer(Registry(), "127.0.0.1", 0)
    port = await server.start()
    resp = await get(port)
    assert resp.status == 200 and resp.body == b""  # nothing registered: an empty exposition
    await server.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize(
    ("section", "host", "port"),
    [
        ({"listen": "127.0.0.1:9464"}, "127.0.0.1", 9464),
        ({"listen": "0.0.0.0:0"}, "0.0.0.0", 0),
        ({"listen": "[::1]:9464"}, "::1", 9464),
        ({"listen": "edge-7.local:9100"}, "edge-7.local", 9100),
    ],
)
def test_listen_is_parsed(section: dict[str, str], host: str, port: int) -> None:
    cfg = MetricsConfig.from_section(section)
    assert cfg is not None and (cfg.host, cfg.port) == (host, port)


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"listen": "9464"}, r"\[metrics\]\.listen: expected 'host:port'"),
        ({"listen": ":9464"}, r"\[metrics\]\.listen: expected 'host:port'"),
        ({"listen": "127.0.0.1:99999"}, r"\[metrics\]\.listen: port must be"),
        ({"listen": "127.0.0.1:http"}, r"\[metrics\]\.listen: port must be"),
        ({"listen": "::1:9464"}, r"\[metrics\]\.listen: an IPv6 host goes in brackets"),
        ({"listen": 9464}, r"\[metrics\]\.listen: expected a 'host:port' string"),
        ({}, r"\[metrics\]\.listen: missing"),
        ({"listen": "127.0.0.1:9464", "port": 1}, r"\[metrics\]\.port: unknown key"),
        ("127.0.0.1:9464", r"\[metrics\]: expected a table"),
    ],
)
def test_a_bad_section_is_refused_naming_the_key(section: object, match: str) -> None:
    with pytest.raises(MetricsConfigError, match=match):
        MetricsConfig.from_section(section)
    assert MetricsConfig.from_section(None) is None


def test_the_shipped_site_files_metrics_sections_load() -> None:
    import tomllib
    from pathlib import Path

    edge_dir = Path(__file__).resolve().parents[2] / "edge"
    production = tomllib.loads((edge_dir / "site.production.example.toml").read_text())
    cfg = MetricsConfig.from_section(production.get("metrics"))
    assert cfg is not None and cfg.listen == "127.0.0.1:9464"
    # The other example carries the section commented out: uncommented, it loads too.
    example = (edge_dir / "site.example.toml").read_text()
    lines = [ln.removeprefix("# ") for ln in example.splitlines() if ln.startswith("# [metrics]")]
    assert lines == ["[metrics]"]
    uncommented = example.replace("# [metrics]\n# listen", "[metrics]\nlisten")
    cfg = MetricsConfig.from_section(tomllib.loads(uncommented).get("metrics"))
    assert cfg is not None and cfg.port == 9464
