"""Shared by the metrics tests: an HTTP/1.1 request over a real socket, and a strict reader of
the Prometheus text format (0.0.4) written from the format's description, not from the
renderer: every sample must belong to the family its ``# TYPE`` announced. ``tls``: the same
over HTTPS; ``token``: with ``Authorization: Bearer``. ``running_edge``: a real ``EdgeApp``
with ``[metrics]``; ``ocpp16_station``: a 1.6 station booted on it over a real WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import re
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)\Z")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|\Z)')


@dataclass
class Scrape:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    #: (sample name, sorted label pairs) -> value
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def by(self, name: str, label: str) -> dict[str, float]:
        """``name``'s samples keyed by one label (the others must not vary)."""
        return {dict(labels)[label]: v for labels, v in self.series(name).items()}


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1]
            out.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _number(text: str) -> float:
    special = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}
    return special[text] if text in special else float(text)


def parse(text: str) -> Scrape:
    """Parse an exposition; AssertionError on anything the format does not allow."""
    out = Scrape()
    if text == "":
        return out
    assert text.endswith("\n"), "an exposition ends with a newline"
    family: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in out.helps, f"HELP for {name} twice"
            out.helps[name] = _unescape(help_text)
            continue
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in {"counter", "gauge", "summary", "histogram", "untyped"}, line
            assert name not in out.types, f"TYPE for {name} twice"
            out.types[name] = kind
            family = name
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, label_text, value_text = m.groups()
        assert family is not None, f"{name} before any TYPE"
        kind = out.types[family]
        allowed = {family}
        if kind == "summary":
            allowed |= {family + "_sum", family + "_count"}
        assert name in allowed, f"{name} is not a sample of {family} ({kind})"
        labels: list[tuple[str, str]] = []
        if label_text:
            inner = label_text[1:-1]
            pos = 0
            while pos < len(inner):
                lm = _LABEL.match(inner, pos)
                assert lm, f"bad labels in {line!r} at {inner[pos:]!r}"
                labels.append((lm.group(1), _unescape(lm.group(2))))
                pos = lm.end()
        key = (name, tuple(sorted(labels)))
        assert key not in out.samples, f"series {key} twice"
        out.samples[key] = _number(value_text)
    return out


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def request(
    port: int, raw: bytes, *, timeout_s: float = 10.0, tls: ssl.SSLContext | None = None
) -> Response:
    """Send ``raw`` on a new connection to 127.0.0.1:``port`` (over TLS with ``tls``) and read
    the answer to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Response(int(status), headers, body)


async def no_http_answer(port: int, tls: ssl.SSLContext | None) -> None:
    """A ``GET /metrics`` (with a bearer token) on a new connection ends (EOF, reset, a TLS
    alert or a failed handshake) without an HTTP answer."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    except (ssl.SSLError, ConnectionError):
        return
    finally:
        writer.close()
    assert not data.startswith(b"HTTP/"), data


async def get(
    port: int,
    path: str = "/metrics",
    method: str = "GET",
    *,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> Response:
    auth = "" if token is None else f"Authorization: Bearer {token}\r\n"
    return await request(
        port,
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        "User-Agent: Prometheus/3.0\r\nAccept: text/plain;version=0.0.4\r\n\r\n".encode(),
        tls=tls,
    )


async def scrape(
    port: int, *, token: str | None = None, tls: ssl.SSLContext | None = None
) -> Scrape:
    resp = await get(port, token=token, tls=tls)
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(resp.headers["content-length"]) == len(resp.body)
    return parse(resp.body.decode("utf-8"))


def ocpp_helpers(name: str) -> Any:
    """The module ``name`` of tests/ocpp/ (``ocpp_certs``, ``ocpp_testsite``), loaded by path so
    no other test folder joins ``sys.path``."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "ocpp" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def ocpp16_reading(at: float, soc: str) -> list[dict[str, Any]]:
    """A 1.6 ``meterValue`` list at ``at`` (Unix time): 16 A on each phase and a SoC of ``soc``
    (as the station sends it: any text)."""
    from evcore.ocpp.v16 import iso

    values: list[dict[str, Any]] = [
        {"value": "16", "measurand": "Current.Import", "phase": p, "unit": "A"}
        for p in ("L1", "L2", "L3")
    ]
    values.append({"value": soc, "measurand": "SoC", "unit": "Percent"})
    return [{"timestamp": iso(at), "sampledValue": values}]


def cert_authority(folder: Path, name: str) -> Any:
    """A test CA from tests/ocpp/ocpp_certs.py (``issue(cn, server=True)`` → cert, key paths;
    ``ca_path``)."""
    return ocpp_helpers("ocpp_certs").CertAuthority(folder, name)


def level_registry() -> Any:
    """A registry serving one gauge, ``evcore_level_amperes`` 16."""
    from evcore.metrics import MetricFamily, Registry

    reg = Registry()
    reg.register(lambda: [MetricFamily("evcore_level_amperes", "gauge", "A level.").add(16.0)])
    return reg


@contextlib.asynccontextmanager
async def running_edge(table: dict[str, Any], **app_kwargs: Any) -> AsyncIterator[Any]:
    """A running ``EdgeApp`` of ``table`` (a site table; ``[metrics]`` on a free loopback port
    unless it has one), ready; stopped (and awaited) on exit. ``app_kwargs`` go to ``EdgeApp``
    (``store``, ``bus``; a ``WallClock`` unless ``clock``)."""
    from evcore.clock import WallClock
    from evcore.edge.app import EdgeApp
    from evcore.site import load_site

    table.setdefault("metrics", {"listen": "127.0.0.1:0"})
    app_kwargs.setdefault("clock", WallClock())
    app = EdgeApp(load_site(table), table, **app_kwargs)
    runner = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 20)
        yield app
    finally:
        app.stop()
        await asyncio.wait_for(runner, 20)


@contextlib.asynccontextmanager
async def ocpp16_station(app: Any, ocpp_id: str) -> AsyncIterator[Any]:
    """A 1.6 station ``ocpp_id`` of ``app``'s site file, connected to its central system over a
    real WebSocket and booted (answered with a CALLRESULT): a ``RawStation`` of
    tests/ocpp/ocpp_testsite.py, closed on exit."""
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    url = f"ws://127.0.0.1:{app.central.port}{app.central.config.path_prefix}/{ocpp_id}"
    ws = await connect(url, subprotocols=[Subprotocol("ocpp1.6")])
    station = ocpp_helpers("ocpp_testsite").RawStation(ws)
    try:
        boot = {"chargePointVendor": "V", "chargePointModel": "M"}
        assert (await station.call("BootNotification", boot))[0] == 3
        yield station
    finally:
        await station.close()
