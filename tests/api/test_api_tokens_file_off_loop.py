"""The API's ``tokens_file`` is read beside the event loop, over a real socket: a tokens file
whose read blocks (here a FIFO nobody writes to, as a hung network file system would) must not
stall the loop (the edge's control loop runs on it) and every other call with it.

Before: ``TokensFile.credentials`` stat'ed and read the file in the event loop, at every call after
a change: the call that found the FIFO blocked the whole edge until something wrote to it, and a
second call got no answer meanwhile. Now such a call waits at most 1 s and gets UNAVAILABLE.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from api_test_facade import StoreFacade
from evcore.api import EdgeApiServer
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from fifo_testkit import BlockingFile
from test_api_tokens_file_reload import LEAKED, SITE_VIEWER, _entry, tokens_file_config


class _Caller(threading.Thread):
    """A call from a thread of its own (a blocking client): answered even if the server's loop
    is blocked; ``fed_before_answer``: whether the FIFO had been written to by then."""

    def __init__(self, port: int, fed: threading.Event, answered: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.fed = fed
        self.answered = answered
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.fed_before_answer: bool | None = None

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            try:
                pb_grpc.EdgeApiStub(channel).GetSiteState(
                    pb.GetSiteStateRequest(),
                    metadata=(("authorization", f"Bearer {SITE_VIEWER}"),),
                    timeout=15,
                )
                self.code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                self.code, self.details = err.code(), err.details() or ""
        self.fed_before_answer = self.fed.is_set()
        self.answered.set()


async def test_a_tokens_file_read_that_blocks_does_not_stall_other_calls(tmp_path: Path) -> None:
    import asyncio

    tokens, config = tokens_file_config(tmp_path)
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    clock = ManualClock()
    server = EdgeApiServer(StoreFacade(store, clock), config, site_id="depot", clock=clock)
    port = await server.start()
    second_answered = threading.Event()
    blocked = BlockingFile(tokens, _entry("leaked", LEAKED).encode())
    fed = blocked.fed
    try:
        first = _Caller(port, fed, threading.Event())
        first.start()
        await asyncio.to_thread(first.join, 10)
        assert first.code == grpc.StatusCode.OK
        blocked.block(release_after=second_answered)
        reading = _Caller(port, fed, threading.Event())  # finds the change, reads the FIFO
        reading.start()
        await asyncio.to_thread(time.sleep, 0.5)
        second = _Caller(port, fed, second_answered)
        second.start()
        await asyncio.to_thread(second.join, 20)
        await asyncio.to_thread(reading.join, 20)
        assert second.fed_before_answer is False, "answered only once the FIFO was written to"
        assert second.code == grpc.StatusCode.UNAVAILABLE, (second.code, second.details)
        assert "tokens file" in second.details
        # Once the read ends, the site file's token is served again.
        for _ in range(50):
            again = _Caller(port, fed, threading.Event())
            again.start()
            await asyncio.to_thread(again.join, 20)
            if again.code == grpc.StatusCode.OK:
                break
        else:
            raise AssertionError("the tokens file read never ended")
    finally:
        blocked.restore()
        await server.stop(0.5)
        await asyncio.to_thread(blocked.stop)
        await store.close()
