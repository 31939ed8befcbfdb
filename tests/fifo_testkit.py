"""A file whose reads block, as one on a hung network file system does: :class:`BlockingFile`
puts a FIFO nobody writes to under the file's name, then, once released, writes the file's text
to every reader of the FIFO (each read ends, the next one blocks until the next write)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path


class BlockingFile:
    """``block()``: ``path`` becomes a FIFO; ``release_after(event, at_most_s)``: once ``event``
    is set (or ``at_most_s`` passed) ``content`` goes to every reader (``fed`` is set then);
    ``restore()``: a regular file with ``content`` again; ``stop()`` (after the reader's owner
    stopped): the feeder ends, no read left blocked."""

    def __init__(self, path: Path, content: bytes) -> None:
        self.path = path
        self.content = content
        self.fifo = path.with_name(path.name + ".fifo")
        self.fed = threading.Event()
        self._done = threading.Event()
        self._after: tuple[threading.Event, float] | None = None
        self._thread: threading.Thread | None = None

    def block(self, *, release_after: threading.Event, at_most_s: float = 8.0) -> None:
        self._after = (release_after, at_most_s)
        os.mkfifo(self.fifo, 0o600)
        link = self.path.with_name(self.path.name + ".link")
        os.link(self.fifo, link)
        os.replace(link, self.path)  # the FIFO under the file's name
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        assert self._after is not None
        event, at_most_s = self._after
        event.wait(at_most_s)
        self.fed.set()
        while not self._done.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader now
                time.sleep(0.02)
                continue
            with contextlib.suppress(OSError):  # (the reader may be gone: EPIPE)
                os.write(fd, self.content)
            os.close(fd)

    def restore(self) -> None:
        tmp = self.path.with_name(self.path.name + ".regular")
        tmp.write_bytes(self.content)
        os.replace(tmp, self.path)

    def stop(self) -> None:
        time.sleep(0.3)  # a read that began on the FIFO just before restore() is fed
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
