"""HEAD answers carry no body, whatever their status, over a real socket (review of the metrics
room, 2026-12-06). Before, a HEAD refused with 401 (no token or a wrong one) or 503 (the token
file unreadable) got its text body after the head, against RFC 9110 (a client reading the next
answer on the connection reads those bytes as one)."""

from __future__ import annotations

from pathlib import Path

from evcore.metrics import MetricFamily, MetricsConfig, MetricsServer, Registry
from metrics_testkit import request


async def test_head_gets_headers_only_when_refused_or_unavailable(tmp_path: Path) -> None:
    token = tmp_path / "metrics.token"
    token.write_text("s3cret-token-A\n")
    token.chmod(0o600)
    cfg = MetricsConfig.from_section({"listen": "127.0.0.1:0", "token_file": str(token)})
    assert cfg is not None
    reg = Registry()
    reg.register(lambda: [MetricFamily("evcore_up", "gauge", "Up.").add(1)])
    server = MetricsServer.from_config(reg, cfg)
    port = await server.start()
    try:
        for raw in (
            b"HEAD /metrics HTTP/1.1\r\n\r\n",
            b"HEAD /metrics HTTP/1.1\r\nAuthorization: Bearer wrong-token\r\n\r\n",
        ):
            resp = await request(port, raw)
            assert resp.status == 401
            assert int(resp.headers["content-length"]) > 0 and resp.body == b"", resp.body
        ok = await request(
            port, b"HEAD /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token-A\r\n\r\n"
        )
        assert ok.status == 200 and ok.body == b""
        token.unlink()
        gone = await request(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert gone.status == 503 and gone.body == b"", gone.body
        # GET still has its body.
        assert (await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")).body != b""
    finally:
        await server.stop()
