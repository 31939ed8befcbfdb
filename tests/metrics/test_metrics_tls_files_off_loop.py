"""The metrics endpoint's TLS files are looked at and loaded beside the event loop, over real
HTTPS: a certificate file whose read blocks (here a FIFO nobody writes to, as a hung network file
system would) must not stall the loop (the edge's control loop runs on it) and every other scrape.

Before: the listening context's ``sni_callback`` stat'ed the files and loaded them in the loop, at
every handshake after a change: the handshake that found the FIFO blocked the whole process until
something wrote to it. Now a scrape waits at most 1 s for the look, then is served with the
certificate in force.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from fifo_testkit import BlockingFile
from metrics_testkit import Response, get
from test_metrics_auth import _client, _served, live_pair, pki  # noqa: F401  (the fixture)


class _Scrape(threading.Thread):
    """A scrape over HTTPS from a thread of its own (its own loop); ``fed_before_answer``:
    whether the FIFO had been written to by then."""

    def __init__(self, port: int, ca: str, fed: threading.Event, answered: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.ca, self.fed, self.answered = port, ca, fed, answered
        self.response: Response | None = None
        self.fed_before_answer: bool | None = None

    def run(self) -> None:
        self.response = asyncio.run(get(self.port, tls=_client(self.ca)))
        self.fed_before_answer = self.fed.is_set()
        self.answered.set()


async def test_a_tls_file_read_that_blocks_does_not_stall_other_scrapes(
    pki: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    cert, key = live_pair(pki, tmp_path)
    with open(pki["cert"], "rb") as f:  # noqa: ASYNC230
        pem = f.read()
    server = await _served({"tls_cert_file": str(cert), "tls_key_file": str(key)})
    second_answered = threading.Event()
    blocked = BlockingFile(cert, pem)
    fed = blocked.fed
    try:
        assert (await get(server.port, tls=_client(pki["ca"]))).status == 200
        blocked.block(release_after=second_answered)
        first = _Scrape(server.port, pki["ca"], fed, threading.Event())  # loads the FIFO
        first.start()
        await asyncio.to_thread(time.sleep, 0.5)
        second = _Scrape(server.port, pki["ca"], fed, second_answered)
        second.start()
        await asyncio.to_thread(second.join, 15)
        await asyncio.to_thread(first.join, 15)
        assert second.fed_before_answer is False, "answered only once the FIFO was written to"
        # Served with the certificate in force meanwhile.
        assert second.response is not None and second.response.status == 200
    finally:
        blocked.restore()
        await server.stop()
        await asyncio.to_thread(blocked.stop)
