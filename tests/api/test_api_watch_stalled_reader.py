"""Stopping the edge API while a watcher has stopped reading, over a real socket: the watcher is
a client process frozen (SIGSTOP) after its first change, as a hung dashboard or a cut-off link
is. Its watch's handler then waits inside a write, where it never hears of the stop's signal
(``end_watches``). Before: ``stop(5.0)`` took about 18 s (gRPC's GOAWAY ping waits 20 s for an
answer by default, whatever the grace); now the server's keepalive timeout (2 s) bounds it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from test_api_edge import VIEWER, Edge, edge  # noqa: F401  (the fixture)

CLIENT = r"""
import sys, time, grpc
from evcore.v1 import edge_api_pb2 as pb, edge_api_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
changes = pb_grpc.EdgeApiStub(channel).WatchChanges(
    pb.WatchChangesRequest(), metadata=(("authorization", "Bearer " + sys.argv[2]),)
)
next(changes)
print("watching", flush=True)
time.sleep(600)
"""


async def test_stop_is_not_held_by_a_watch_whose_client_stopped_reading(
    edge: Edge,  # noqa: F811
) -> None:
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, f"127.0.0.1:{edge.server.port}", VIEWER,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(500):
            if edge.facade._watchers:
                break
            await asyncio.sleep(0.01)
        edge.facade.emit({"kind": "setpoint", "charger_id": "C1", "value": 6.0})
        assert client.stdout is not None
        assert await asyncio.wait_for(client.stdout.readline(), 10) == b"watching\n"
        os.kill(client.pid, signal.SIGSTOP)
        # 40 MB of changes: far more than the socket buffers take; the watch's queue keeps the
        # newest 1000 and its handler waits inside a write.
        for _ in range(10):
            for _ in range(1000):
                edge.facade.emit(
                    {"kind": "setpoint", "charger_id": "C1", "value": 6.0, "detail": "x" * 4000}
                )
            await asyncio.sleep(0.1)
        assert [q.qsize() for q in edge.server.service._watchers] == [1000]  # not drained
        started = time.monotonic()
        await edge.server.stop(5.0)
        took = time.monotonic() - started
        assert took < 4.0, f"stop(5.0) took {took:.1f} s with a watcher that stopped reading"
        for _ in range(200):  # the handler lets its queue go once its task ends
            if not edge.server.service._watchers:
                break
            await asyncio.sleep(0.01)
        assert not edge.server.service._watchers
    finally:
        os.kill(client.pid, signal.SIGCONT)
        client.kill()
        await client.wait()
