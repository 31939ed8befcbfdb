"""The ``[metrics]`` section and the HTTP endpoint Prometheus scrapes.

What this module owns: parsing ``[metrics]`` (``listen = "host:port"``; an error names the key)
and ``MetricsServer``: an ``asyncio.start_server`` that answers ``GET /metrics`` (and ``HEAD``)
with the registry rendered at that moment, 404 for any other path, 405 for another method on
``/metrics``, 400 for a request that is not HTTP/1.x or whose head is larger than
``max_request_bytes``, 408 for one that does not arrive within ``read_timeout_s``. One request per
connection (``Connection: close``); at most ``max_connections`` at a time (more are closed at
once). A collector that fails gives 500 and a logged traceback; the server lives on.

What it must never do: let a scrape stall the control loop. The collectors read the live objects
in the loop (between two awaits, so what they read is consistent); the families they return are
built and formatted in a worker thread; every read or write on a socket is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evcore.metrics.exposition import CONTENT_TYPE, MetricFamily, Registry, render
from evcore.site.sections import Key, Section, split_host_port

__all__ = ["MetricsConfig", "MetricsConfigError", "MetricsServer"]

log = logging.getLogger("evcore.metrics")

#: A scrape request's head (request line and headers) is a few hundred bytes; Prometheus sends
#: about 300. Anything over this is refused with 400.
MAX_REQUEST_BYTES = 8192
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(rb"HTTP/1\.[01]\Z")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MetricsConfigError(ValueError):
    """The ``[metrics]`` section is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The validated ``[metrics]`` section: where the endpoint listens (port 0: any free one)."""

    host: str = "127.0.0.1"
    port: int = 9464

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @staticmethod
    def from_section(section: Any) -> MetricsConfig | None:
        """``[metrics]`` of a site (or cloud) file; None when the section is absent (no
        endpoint). ``listen`` is ``"host:port"`` (IPv6 as ``"[::1]:9464"``)."""
        if section is None:
            return None
        listen = _SECTION.read(section)["listen"]
        return MetricsConfig(*split_host_port(listen, _SECTION.label("listen")))


_SECTION = Section(
    "[metrics]",
    {"listen": Key("host_port", required=True, example='listen = "127.0.0.1:9464"')},
    MetricsConfigError,
)


class MetricsServer:
    """``await start()`` binds and returns the port; ``await stop()`` closes it."""

    def __init__(
        self,
        registry: Registry,
        host: str = "127.0.0.1",
        port: int = 9464,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        read_timeout_s: float = 5.0,
        write_timeout_s: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.max_request_bytes = max_request_bytes
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_connections = max_connections
        #: Requests answered, by status code (for tests; Prometheus sees its own scrapes).
        self.answered: dict[int, int] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_config(cls, registry: Registry, cfg: MetricsConfig) -> MetricsServer:
        return cls(registry, cfg.host, cfg.port)

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._connection, self.host, self.port, limit=self.max_request_bytes
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections:
            writer.close()
            return
        self._conns.add(task)
        try:
            status, head_only, body, ctype = await self._answer(reader)
            self.answered[status] = self.answered.get(status, 0) + 1
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET, HEAD\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(head if head_only else head + body)
            await asyncio.wait_for(writer.drain(), self.write_timeout_s)
            if status >= 400:
                await self._linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # ``stop`` cancelled it: end quietly (a cancelled connection task is logged as an
            # error by asyncio's stream protocol).
            pass
        except Exception:  # one bad connection must not end the endpoint
            log.exception("metrics: a connection failed")
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bool, bytes, str]:
        """(status, head only, body, content type) for the request on ``reader``."""
        text = "text/plain; charset=utf-8"
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
        except asyncio.LimitOverrunError:
            return 400, False, b"request head too large\n", text
        except asyncio.IncompleteReadError:
            return 400, False, b"incomplete request\n", text
        except TimeoutError:
            return 408, False, b"request not received in time\n", text
        parsed = _parse_head(raw)
        if parsed is None:
            return 400, False, b"malformed request\n", text
        method, path = parsed
        if path != "/metrics":
            return 404, method == "HEAD", b"not found; metrics are at /metrics\n", text
        if method not in ("GET", "HEAD"):
            return 405, False, b"only GET and HEAD\n", text
        try:
            # Read in the loop, format beside it: the loop is held only for the reading.
            parts = self.registry.read()
            body = await asyncio.to_thread(_render_bytes, parts)
        except Exception:
            log.exception("metrics: collecting failed")
            return 500, method == "HEAD", b"collecting the metrics failed (see the log)\n", text
        return 200, method == "HEAD", body, CONTENT_TYPE

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error answer, read (and drop) what the client is still sending, for a short
        while: closing with unread input makes the kernel reset the connection, and the client
        may then lose the answer before reading it."""
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()

            async def drain_input() -> None:
                dropped = 0
                while dropped < 16 * self.max_request_bytes:
                    chunk = await reader.read(4096)
                    if not chunk:
                        return
                    dropped += len(chunk)

            await asyncio.wait_for(drain_input(), 1.0)


def _render_bytes(parts: list[Iterable[MetricFamily]]) -> bytes:
    return render(itertools.chain.from_iterable(parts)).encode("utf-8")


def _parse_head(raw: bytes) -> tuple[str, str] | None:
    """(method, path without its query) of an HTTP/1.x request head; None when malformed."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if not _TOKEN.match(method) or not _VERSION.match(version):
        return None
    if not target.startswith(b"/") or any(b <= 0x20 or b >= 0x7F for b in target):
        return None
    for line in lines[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            return None
    path = target.split(b"?", 1)[0].decode("ascii")
    return method.decode("ascii"), path
