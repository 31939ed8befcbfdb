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
