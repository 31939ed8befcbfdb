"""The metrics token file is read beside the event loop, over a real socket: a token file whose
read blocks (here a FIFO nobody writes to, as a hung network file system would) must not stall
the loop and every other request with it.

Before: ``_TokenFile.current`` stat'ed and read the file in the event loop, at every scrape after
a change: the scrape that found the FIFO blocked the whole process (the control loop included)
until something wrote to it, and a second request got no answer meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from evcore.metrics import MetricsServer
from fifo_testkit import BlockingFile
from metrics_testkit import Response, get, level_registry

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-A"


class _Client(threading.Thread):
    """A scrape from a thread of its own (its own loop): it is answered even if the server's
    loop is blocked; ``fed_before_answer``: whether the FIFO had been written to by then."""

    def __init__(self, port: int, fed: threading.Event, answered: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.fed = fed
        self.response: Response | None = None
        self.fed_before_answer: bool | None = None
        self.answered = answered

    def run(self) -> None:
        self.response = asyncio.run(get(self.port, token=TOKEN))
        self.fed_before_answer = self.fed.is_set()
        self.answered.set()


async def test_a_token_file_read_that_blocks_does_not_stall_other_requests(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metrics.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    server = MetricsServer(level_registry(), port=0, token_file=path)
    server.read_timeout_s = 2.0
    await server.start()
    second_answered = threading.Event()
    blocked = BlockingFile(path, (TOKEN + "\n").encode())
    fed = blocked.fed
    try:
        assert (await get(server.port, token=TOKEN)).status == 200
        blocked.block(release_after=second_answered)
        first = _Client(server.port, fed, threading.Event())  # finds the change and reads the FIFO
        first.start()
        await asyncio.to_thread(time.sleep, 0.5)
        second = _Client(server.port, fed, second_answered)
        second.start()
        await asyncio.to_thread(second.join, 10)
        await asyncio.to_thread(first.join, 10)
        assert second.response is not None and first.response is not None
        # Answered while the read still blocked, before anything was written to the FIFO: the
        # token could not be checked, so the scrape is refused as unavailable (503).
        assert second.fed_before_answer is False, "answered only once the FIFO was written to"
        assert second.response.status == 503, second.response
        assert b"token file" in second.response.body
        # Once the read ends, the token is in force again.
        for _ in range(50):
            if (await get(server.port, token=TOKEN)).status == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the token file read never ended")
    finally:
        blocked.restore()
        await server.stop()
        await asyncio.to_thread(blocked.stop)
