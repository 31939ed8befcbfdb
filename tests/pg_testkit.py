"""The PostgreSQL the tests use (127.0.0.1:5432, user postgres, db test; ``EVCORE_TEST_PG_DSN``
overrides). Import it from here, not from ``conftest``: under the whole suite ``conftest`` names
whichever directory's conftest was imported last (tests/cloud's has no ``PG_DSN``)."""

from __future__ import annotations

import asyncio
import contextlib
import os

import psycopg

PG_DSN = os.environ.get("EVCORE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


class TcpRelay:
    """A TCP relay to the tests' PostgreSQL on a local port of its own: ``cut`` is the database
    going away (every connection reset, new ones refused), ``restore`` its return on the same
    port."""

    def __init__(self) -> None:
        info = psycopg.conninfo.conninfo_to_dict(PG_DSN)
        self.host = str(info.get("host") or "127.0.0.1")
        self.port = int(info.get("port") or 5432)
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in self._transports:
            t.abort()
        self._transports.clear()

    async def restore(self) -> None:
        await self.start()

    def dsn(self) -> str:
        """The tests' libpq DSN through the relay."""
        info = psycopg.conninfo.conninfo_to_dict(PG_DSN)
        info.update(host="127.0.0.1", port=str(self.listen_port))
        return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})

    def store_url(self, schema: str) -> str:
        """The cloud store URL of ``schema`` through the relay."""
        info = psycopg.conninfo.conninfo_to_dict(PG_DSN)
        user, db = info.get("user", "postgres"), info.get("dbname", "test")
        return f"postgresql://{user}@127.0.0.1:{self.listen_port}/{db}?schema={schema}"


class StallingRelay(TcpRelay):
    """:class:`TcpRelay` whose paths can die without a word, as a partition or a frozen server
    does: nothing is forwarded any more and nothing is closed, so neither side hears of it.

    ``stall()`` stops every connection (new ones are accepted but not connected) until
    ``resume()``. ``stall_on(marker, deliver=...)`` stops only the connection whose next
    client-to-server chunk holds ``marker`` (e.g. :data:`COMMIT`), for good: with ``deliver``
    the chunk reaches the server and its answer is held (the commit happened, the client never
    hears), without it the chunk is held too (the server's session waits, inside its
    transaction, for a command that never comes). Other connections, and new ones, flow on.
    ``cut()`` (or ``close()``) ends every connection, stalled ones too. Its ``dsn()`` asks for a
    plaintext connection (``sslmode=disable``): a marker is looked for in the protocol's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.stalled = asyncio.Event()  # a stall_on marker was met
        self._marker: tuple[bytes, bool] | None = None
        self._released = asyncio.Event()  # cut: stalled pipes end

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def stall_on(self, marker: bytes, *, deliver: bool) -> None:
        self.stalled.clear()
        self._marker = (marker, deliver)

    def cut(self) -> None:
        self._released.set()
        self.flowing.set()
        super().cut()

    async def start(self) -> None:
        self._released = asyncio.Event()
        await super().start()

    async def close(self) -> None:
        self.cut()
        await asyncio.sleep(0)

    def dsn(self) -> str:
        return super().dsn() + " sslmode=disable"

    async def _hold(self) -> None:
        await self._released.wait()

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dead: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if upstream and self._marker is not None and self._marker[0] in data:
                    _, deliver = self._marker
                    self._marker = None
                    if deliver:
                        writer.write(data)  # before the answer can come back
                    dead.set()
                    self.stalled.set()
                await self.flowing.wait()
                if dead.is_set():
                    await self._hold()
                    return
                writer.write(data)
                await writer.drain()
        if dead.is_set():
            await self._hold()  # not even the end of the stream gets through
            return
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._transports.add(writer.transport)
        await self.flowing.wait()
        if self._server is None:  # cut while it waited
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._transports.add(up_writer.transport)
        dead = asyncio.Event()
        await asyncio.gather(
            self._relay(reader, up_writer, dead, upstream=True),
            self._relay(up_reader, writer, dead, upstream=False),
        )


#: The frontend message psycopg sends to commit a transaction (a simple Query "COMMIT").
COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"
