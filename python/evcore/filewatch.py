"""Whether a file was replaced or rewritten since it was last read, for settings read again while
a process runs (the API's ``tokens_file``, the metrics token file)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

#: While a file's mtime is under this old it counts as changed at every look: two rewrites in
#: place within the file system's timestamp granularity keep its size and times.
SETTLE_S = 2.0


def file_signature(path: Path) -> tuple[int, ...] | None:
    """What changes when a file is replaced or rewritten (device, inode, size, mtime, ctime);
    None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileWatch:
    """``changed()``: whether ``path`` may differ from what was read when it last said so (its
    signature differs, it cannot be stat'ed, or it is still settling). ``seen_now``: the file
    as it is now counts as read."""

    def __init__(self, path: Path, *, seen_now: bool) -> None:
        self.path = path
        self._seen = file_signature(path) if seen_now else None

    def changed(self) -> bool:
        seen = file_signature(self.path)
        if seen is not None and seen == self._seen and time.time() - seen[3] / 1e9 > SETTLE_S:
            return False
        self._seen = seen
        return True


class OneAtATime(Generic[T]):
    """``await reader()``: ``fn()`` run beside the event loop, on a thread of its own, one call at
    a time; callers that come while a call runs share its outcome. Each caller waits at most
    ``wait_s`` (then TimeoutError); the call goes on, and its outcome serves later callers. For a
    file read on a request's path (a token file): a read that blocks (a hung network file system,
    a FIFO) must hold neither the loop nor more than one thread."""

    def __init__(self, fn: Callable[[], T], *, name: str, wait_s: float = 1.0) -> None:
        self._fn = fn
        self.wait_s = wait_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(loop.run_in_executor(self._thread, self._fn))
            self._pending = pending

            def done(_: object) -> None:
                if self._pending is pending:
                    self._pending = None

            pending.add_done_callback(done)
        return await asyncio.wait_for(asyncio.shield(self._pending), self.wait_s)

    def close(self) -> None:
        """No more calls; a call still blocked keeps its thread, nothing waits for it."""
        self._thread.shutdown(wait=False, cancel_futures=True)
