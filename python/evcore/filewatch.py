"""Whether a file was replaced or rewritten since it was last read, for settings read again while
a process runs (the API's ``tokens_file``, the metrics token file)."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
