"""The ``[metrics]`` section and the HTTP endpoint Prometheus scrapes.

What this module owns: parsing ``[metrics]`` (``listen = "host:port"``, optionally a bearer
``token_file`` and TLS files; an error names the key) and ``MetricsServer``: an
``asyncio.start_server`` (HTTPS when TLS files are given, TLS 1.2 or later, client certificates
required with ``tls_client_ca_file``) that answers ``GET /metrics`` (and ``HEAD``)
with the registry rendered at that moment, 404 for any other path, 405 for another method on
``/metrics``, 400 for a request that is not HTTP/1.x or whose head is larger than
``max_request_bytes``, 408 for one that does not arrive within ``read_timeout_s``. One request per
connection (``Connection: close``); at most ``max_connections`` at a time: a new one makes room by
closing the oldest that has not sent its request head yet, and is closed at once when every slot
is answering (silent connections never lock Prometheus out). A collector that fails gives 500
and a logged traceback; the server lives on. With a
``token_file``, a request without ``Authorization: Bearer <a token of the file>`` gets 401 (counted
in ``evcore_metrics_scrapes_refused_total``; the file holds one token per line, old and new during
a rotation); the file is read again when it changes, so a rotated token needs no restart. So are
the TLS files (checked at each handshake): a renewed certificate serves from the next scrape on.

What it must never do: let a scrape stall the control loop, or serve a token-protected endpoint
without the token (a token file that became unreadable or empty refuses every scrape: 503). The
collectors read the live objects in the loop (between two awaits, so what they read is
consistent); the families they return are built and formatted in a worker thread; every read or
write on a socket is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import re
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evcore.filewatch import FileWatch, OneAtATime, file_signature
from evcore.metrics.exposition import CONTENT_TYPE, Counter, MetricFamily, Registry, render
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
    401: "Unauthorized",
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
    """The validated ``[metrics]`` section: where the endpoint listens (port 0: any free one),
    the bearer token file (None: no authentication) and the TLS files (None: plain HTTP)."""

    host: str = "127.0.0.1"
    port: int = 9464
    token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "http" if self.tls_cert_file is None else "https"

    @staticmethod
    def from_section(section: Any, base_dir: Path | str | None = None) -> MetricsConfig | None:
        """``[metrics]`` of a site (or cloud) file; None when the section is absent (no
        endpoint). ``listen`` is ``"host:port"`` (IPv6 as ``"[::1]:9464"``). The files are
        relative to ``base_dir`` (the file's directory); without it they must be absolute.
        The token file is read and the TLS files loaded here, so a bad one stops the load."""
        if section is None:
            return None
        if base_dir is None and isinstance(section, Mapping):
            for key in _FILE_KEYS:
                value = section.get(key)
                if isinstance(value, str) and value and not Path(value).is_absolute():
                    raise MetricsConfigError(
                        f"{_SECTION.label(key)} must be an absolute path, got {value!r}"
                    )
        values = _SECTION.read(section, "." if base_dir is None else base_dir)
        host, port = split_host_port(values["listen"], _SECTION.label("listen"))
        cert_file, key_file = values.get("tls_cert_file"), values.get("tls_key_file")
        if (cert_file is None) != (key_file is None):
            missing = "tls_key_file" if key_file is None else "tls_cert_file"
            raise MetricsConfigError(
                f"{_SECTION.label(missing)}: missing; tls_cert_file and tls_key_file go together"
            )
        client_ca = values.get("tls_client_ca_file")
        if client_ca is not None and cert_file is None:
            raise MetricsConfigError(
                f"{_SECTION.label('tls_client_ca_file')} needs tls_cert_file and tls_key_file "
                "(client certificates are asked for in a TLS handshake)"
            )
        cfg = MetricsConfig(host, port, values.get("token_file"), cert_file, key_file, client_ca)
        if cfg.token_file is not None:
            read_tokens(cfg.token_file)
            _warn_if_readable_by_others(cfg.token_file, "token_file")
        if cfg.tls_key_file is not None:
            _warn_if_readable_by_others(cfg.tls_key_file, "tls_key_file")
        cfg.ssl_context()
        return cfg

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (TLS 1.2 or later; client certificates required when
        ``tls_client_ca_file`` is set); None for plain HTTP. An error names the key."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (ssl.SSLError, OSError) as exc:
            raise MetricsConfigError(
                f"{_SECTION.label('tls_cert_file')}, {_SECTION.label('tls_key_file')}: cannot "
                f"load {str(self.tls_cert_file)!r} with {str(self.tls_key_file)!r} "
                f"(a PEM certificate chain and its private key): {exc}"
            ) from None
        if self.tls_client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=self.tls_client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise MetricsConfigError(
                    f"{_SECTION.label('tls_client_ca_file')}: cannot load "
                    f"{str(self.tls_client_ca_file)!r} (PEM CA certificates): {exc}"
                ) from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


_FILE_KEYS = ("token_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file")
_SECTION = Section(
    "[metrics]",
    {
        "listen": Key("host_port", required=True, example='listen = "127.0.0.1:9464"'),
        **{key: Key("file") for key in _FILE_KEYS},
    },
    MetricsConfigError,
)

#: A bearer token is one line of visible ASCII (RFC 6750's b64token is narrower; Prometheus sends
#: what its ``credentials_file`` holds, surrounding whitespace trimmed).
_BEARER = re.compile(rb"[\x21-\x7e]+\Z")
MAX_TOKEN_BYTES = 4096


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens in ``path``, one per line (surrounding whitespace and blank lines dropped, as
    Prometheus drops whitespace around its ``credentials_file``): several lines hold the old and
    the new token while a rotation is under way. MetricsConfigError naming
    ``[metrics].token_file`` when the file is missing, unreadable, empty, too long or a line is
    not one token."""
    label = _SECTION.label("token_file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise MetricsConfigError(f"{label}: cannot read {str(path)!r}: {exc.strerror}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise MetricsConfigError(
            f"{label}: {str(path)!r} is over {MAX_TOKEN_BYTES} bytes; it must hold only tokens"
        )
    tokens: list[bytes] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        token = line.strip()
        if not token:
            continue
        if not _BEARER.match(token):
            raise MetricsConfigError(
                f"{label}: {str(path)!r} line {number} must hold one token of visible ASCII "
                "characters (no spaces inside, one token per line)"
            )
        tokens.append(token)
    if not tokens:
        raise MetricsConfigError(f"{label}: {str(path)!r} is empty; it must hold the token")
    return tuple(tokens)


def _warn_if_readable_by_others(path: Path, key: str) -> None:
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & stat.S_IROTH:
            log.warning(
                "%s: %s is readable by every user on this host (mode %04o); "
                "chmod 0600 (or 0640 with the service's group)",
                _SECTION.label(key),
                path,
                mode,
            )


class _TokenFile:
    """The tokens in force (one per line: the old and the new one while a rotation is under way),
    read again when the file changes (device, inode, size, mtime or ctime), so a rotated token needs
    no restart. While its mtime is under ``evcore.filewatch.SETTLE_S`` old the file is read at every
    scrape: a file rewritten in place twice within the file system's timestamp granularity keeps its
    size and times. A file that cannot be read (missing, empty, malformed) leaves no token in force:
    every scrape is refused until it is fixed (never the old tokens, which the rotation meant to
    retire).

    The file is looked at and read beside the event loop, on a thread of its own, one look at a
    time (every request then waiting for it shares it): a read that blocks (a hung network file
    system, a FIFO) must not stall the loop. A request that waits longer than 1 s for it is
    refused with 503; the read goes on, and its outcome serves later requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._watch = FileWatch(path, seen_now=True)
        self.tokens: tuple[bytes, ...] | None = read_tokens(path)
        self._failure = ""
        #: The look, beside the loop; a request waits at most ``wait_s`` (1 s) for it.
        self.reader = OneAtATime(self._look, name="evcore-metrics-token")

    @classmethod
    async def load(cls, path: Path) -> _TokenFile:
        """The first read, beside the loop too."""
        return await asyncio.to_thread(cls, path)

    async def current(self) -> tuple[bytes, ...] | None:
        """The tokens in force; None when the file cannot be read, TimeoutError when it was not
        read in time."""
        return await self.reader()

    def close(self) -> None:
        self.reader.close()

    def _look(self) -> tuple[bytes, ...] | None:
        """(On the reader thread.) Stat, and read when changed."""
        if not self._watch.changed() and not self._failure:
            return self.tokens
        try:
            tokens = read_tokens(self.path)
        except MetricsConfigError as exc:
            self.tokens = None
            if str(exc) != self._failure:
                self._failure = str(exc)
                log.warning(
                    "metrics: every scrape is refused until the token file is fixed: %s", exc
                )
            return None
        self._failure = ""
        if tokens != self.tokens:
            self.tokens = tokens
            log.info(
                "metrics: %s changed; %d token%s in force",
                self.path,
                len(tokens),
                "" if len(tokens) == 1 else "s",
            )
            _warn_if_readable_by_others(self.path, "token_file")
        return self.tokens


class _TlsFiles:
    """The TLS context in force, built again when the certificate, key or client CA file
    changes, so a renewed certificate needs no restart. Checked before every handshake
    (``reader``: beside the event loop, on a thread of its own, one look at a time; a connection
    waits at most 1 s for it, then is served with the context in force: a file whose read blocks,
    a hung network file system, must not stall the loop), and the handshake runs on the context
    in force. While a file's mtime is under ``_SETTLE_S`` old they are
    read at every handshake (a rotation writes two files). Files that cannot be loaded (a
    certificate without its new key yet, a broken file) leave the last good context in force:
    the old certificate still serves until it expires, where refusing every scrape would hide
    the site."""

    _SETTLE_S = 2.0

    def __init__(
        self,
        paths: tuple[Path, ...],
        build: Callable[[], ssl.SSLContext | None],
        listening: ssl.SSLContext,
    ) -> None:
        self.paths = paths
        self._build = build
        self.listening = listening
        self.current = listening
        self._seen = self._loaded = self._signatures()
        self._failure = ""
        #: Contexts built from changed files (for tests).
        self.reloads = 0
        self.reader = OneAtATime(self.look, name="evcore-metrics-tls")

    def _signatures(self) -> tuple[tuple[int, ...] | None, ...]:
        return tuple(file_signature(p) for p in self.paths)

    def _settled(self, seen: tuple[tuple[int, ...] | None, ...]) -> bool:
        now = time.time()
        return all(s is not None and now - s[3] / 1e9 > self._SETTLE_S for s in seen)

    async def context(self) -> ssl.SSLContext:
        """The context a new connection's handshake runs on, looked at first (at most 1 s)."""
        with contextlib.suppress(TimeoutError):
            await self.reader()
        return self.current

    def look(self) -> None:
        """(On the reader thread.) Stat, and build again when changed."""
        seen = self._signatures()
        if seen != self._seen or not self._settled(seen):
            self._seen = seen
            try:
                fresh = self._build()
            except MetricsConfigError as exc:
                if str(exc) != self._failure:
                    self._failure = str(exc)
                    log.warning(
                        "metrics: the TLS files changed but cannot be loaded; the certificate "
                        "loaded before still serves: %s",
                        exc,
                    )
            else:
                if fresh is not None:
                    self.current = fresh
                    self.reloads += 1
                    if seen != self._loaded:
                        log.info("metrics: TLS files changed; the new certificate serves")
                    self._loaded = seen
                self._failure = ""


class _HelloWaits(asyncio.StreamReaderProtocol):
    """A stream whose connection reads nothing until TLS is started on it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        super().connection_made(transport)


class MetricsServer:
    """``await start()`` binds and returns the port; ``await stop()`` closes it. ``token_file``:
    scrapes must carry ``Authorization: Bearer <its token>``; ``tls``: serve HTTPS with it;
    ``tls_files``: its files and the function that builds it, to build it again when they
    change (``from_config`` passes them)."""

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
        token_file: Path | None = None,
        tls: ssl.SSLContext | None = None,
        tls_files: tuple[tuple[Path, ...], Callable[[], ssl.SSLContext | None]] | None = None,
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
        self.token_file = token_file
        self.tls = tls
        #: With ``tls_files`` (the files and how to build a context from them): the context in
        #: force, built again when they change (a renewed certificate needs no restart).
        self.tls_watch: _TlsFiles | None = None
        if tls is not None and tls_files is not None:
            self.tls_watch = _TlsFiles(tls_files[0], tls_files[1], tls)
        #: Scrapes refused for their credentials, by reason (``missing``, ``wrong``); served
        #: beside the registry's families when a token is required.
        self.refused: Counter | None = None
        if token_file is not None:
            self.refused = Counter(
                "evcore_metrics_scrapes_refused_total",
                "Requests to the metrics endpoint refused with 401: no bearer token (missing) "
                "or not the token file's (wrong).",
                ("reason",),
            )
            for reason in ("missing", "wrong"):
                self.refused.inc(0, reason=reason)
        self._token: _TokenFile | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        #: Connections whose request head has not arrived yet, oldest first: when every slot
        #: is taken, the oldest makes room for a new connection.
        self._silent: dict[asyncio.Task[Any], None] = {}
        #: Silent connections closed to make room (for tests and the log).
        self.evicted = 0

    @classmethod
    def from_config(cls, registry: Registry, cfg: MetricsConfig) -> MetricsServer:
        files = tuple(
            p
            for p in (cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
            if p is not None
        )
        return cls(
            registry,
            cfg.host,
            cfg.port,
            token_file=cfg.token_file,
            tls=cfg.ssl_context(),
            tls_files=(files, cfg.ssl_context),
        )

    async def start(self) -> int:
        """Bind; MetricsConfigError (naming ``[metrics].token_file``) when the token file
        cannot be read now."""
        if self.token_file is not None:
            self._token = await _TokenFile.load(self.token_file)
        if self.tls_watch is None:
            self._server = await asyncio.start_server(
                self._connection,
                self.host,
                self.port,
                limit=self.max_request_bytes,
                ssl=self.tls,
                ssl_handshake_timeout=self.read_timeout_s if self.tls is not None else None,
            )
        else:
            # The handshake is started per connection (``_connection``), on the context in
            # force once the files were looked at beside the loop; until then nothing is read
            # (the client's hello must reach the TLS layer, not the stream's buffer).
            limit = self.max_request_bytes
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _HelloWaits(asyncio.StreamReader(limit, loop), self._connection),
                self.host,
                self.port,
            )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "metrics on %s://%s:%d/metrics%s%s",
            "http" if self.tls is None else "https",
            self.host,
            self.port,
            "" if self.token_file is None else ", bearer token required",
            ", client certificate required"
            if self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED
            else "",
        )
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._token is not None:
            self._token.close()
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
            # Connecting needs no token: silent connections must not hold every slot until
            # their 408 and lock Prometheus out. The oldest one still silent makes room; when
            # every slot is answering a request, this one is closed.
            oldest = next(iter(self._silent), None)
            if oldest is None:
                writer.close()
                return
            del self._silent[oldest]
            oldest.cancel()
            self.evicted += 1
            if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
                log.warning(
                    "metrics: %d connections that sent no request closed to make room "
                    "(max_connections %d)",
                    self.evicted,
                    self.max_connections,
                )
        self._conns.add(task)
        self._silent[task] = None
        try:
            if self.tls_watch is not None:
                await writer.start_tls(
                    await self.tls_watch.context(), ssl_handshake_timeout=self.read_timeout_s
                )
            status, head_only, body, ctype, extra = await self._answer(reader)
            self.answered[status] = self.answered.get(status, 0) + 1
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET, HEAD\r\n" if status == 405 else "")
                + extra
                + "Connection: close\r\n\r\n"
            ).encode("ascii")
            writer.write(head if head_only else head + body)
            await asyncio.wait_for(writer.drain(), self.write_timeout_s)
            if status >= 400:
                await self._linger(reader, writer)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass  # (a failed handshake too: a plain HTTP request, no client certificate)
        except asyncio.CancelledError:
            # ``stop`` cancelled it: end quietly (a cancelled connection task is logged as an
            # error by asyncio's stream protocol).
            pass
        except Exception:  # one bad connection must not end the endpoint
            log.exception("metrics: a connection failed")
        finally:
            self._conns.discard(task)
            self._silent.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bool, bytes, str, str]:
        """(status, head only, body, content type, extra header lines) for the request on
        ``reader``."""
        text = "text/plain; charset=utf-8"
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
        except asyncio.LimitOverrunError:
            return 400, False, b"request head too large\n", text, ""
        except asyncio.IncompleteReadError:
            return 400, False, b"incomplete request\n", text, ""
        except TimeoutError:
            return 408, False, b"request not received in time\n", text, ""
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._silent.pop(task, None)  # its head is in (or never will be)
        parsed = _parse_head(raw)
        if parsed is None:
            return 400, False, b"malformed request\n", text, ""
        method, path, authorization = parsed
        if self._token is not None:
            # Before the path: without the token, nothing about the endpoint is answered.
            refused = await self._refusal(authorization)
            if refused is not None:
                status, _, body, ctype, extra = refused
                return status, method == "HEAD", body, ctype, extra  # HEAD: never a body
        if path != "/metrics":
            return 404, method == "HEAD", b"not found; metrics are at /metrics\n", text, ""
        if method not in ("GET", "HEAD"):
            return 405, False, b"only GET and HEAD\n", text, ""
        try:
            # Read in the loop, format beside it: the loop is held only for the reading.
            parts = self.registry.read()
            if self.refused is not None:
                parts.append(self.refused.collect())
            body = await asyncio.to_thread(_render_bytes, parts)
        except Exception:
            log.exception("metrics: collecting failed")
            return 500, method == "HEAD", b"collecting the metrics failed (see the log)\n", text, ""
        return 200, method == "HEAD", body, CONTENT_TYPE, ""

    async def _refusal(
        self, authorization: list[bytes]
    ) -> tuple[int, bool, bytes, str, str] | None:
        """The answer refusing a request without the bearer token; None when it has it."""
        assert self._token is not None and self.refused is not None
        text = "text/plain; charset=utf-8"
        try:
            tokens = await self._token.current()
        except TimeoutError:
            log.warning(
                "metrics: the token file %s could not be read within %g s; scrape refused",
                self._token.path,
                self._token.reader.wait_s,
            )
            return 503, False, b"the endpoint's token file could not be read in time\n", text, ""
        if tokens is None:
            return 503, False, b"the endpoint's token file is unreadable (see the log)\n", text, ""
        presented = _bearer_credentials(authorization)
        if presented is None:
            self.refused.inc(reason="missing")
            challenge = 'WWW-Authenticate: Bearer realm="evcore metrics"\r\n'
            return 401, False, b"a bearer token is required\n", text, challenge
        # Every token is compared (in constant time): which one matched takes no longer.
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(presented, token)
        if not matched:
            self.refused.inc(reason="wrong")
            challenge = 'WWW-Authenticate: Bearer realm="evcore metrics", error="invalid_token"\r\n'
            return 401, False, b"wrong bearer token\n", text, challenge
        return None

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


def _bearer_credentials(authorization: list[bytes]) -> bytes | None:
    """The token of the one ``Authorization: Bearer <token>`` header (the scheme in any case);
    None without one (none, several, or another scheme)."""
    if len(authorization) != 1:
        return None
    scheme, _, credentials = authorization[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.strip() or None


def _parse_head(raw: bytes) -> tuple[str, str, list[bytes]] | None:
    """(method, path without its query, the ``Authorization`` headers' values) of an HTTP/1.x
    request head; None when malformed."""
    lines = raw[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if not _TOKEN.match(method) or not _VERSION.match(version):
        return None
    if not target.startswith(b"/") or any(b <= 0x20 or b >= 0x7F for b in target):
        return None
    authorization = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            return None
        if name.lower() == b"authorization":
            authorization.append(value)
    path = target.split(b"?", 1)[0].decode("ascii")
    return method.decode("ascii"), path, authorization
