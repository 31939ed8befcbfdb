"""An embedded (SQLite) store's write on a file system that hangs ends for its caller at
``[store] write_timeout_s`` (plus the 1 s grace reads have), and how the write ended is known.

Before: SQLite's busy timeout bounds only the wait for another process's lock; a write whose
file I/O hung (a stalled network file system or disk) held its caller, and every write queued
behind it on the backend's one worker thread, for as long as the I/O hung (docs/store.md said so).

The hang is real: the store lives on a small ext4 file system on a loop device, frozen with
``fsfreeze`` (every write to it then blocks in the kernel until it is thawed). That needs root and
loop devices; the test is skipped without them. A watchdog process thaws the file system after
60 s whatever happens to the test, so nothing is left frozen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from bus_testkit import wait_until
from evcore.store import SessionRecord, open_store
from test_store_write_timeout import T0, _ends_within

pytestmark = pytest.mark.timeout(90)

_TOOLS = ("mkfs.ext4", "mount", "umount", "fsfreeze")


class FrozenMount:
    """A 64 MB ext4 file system on a loop device at ``root/mnt``; ``freeze()`` makes every write
    to it block until ``thaw()``."""

    def __init__(self, root: Path) -> None:
        self.image = root / "fs.img"
        self.mnt = root / "mnt"
        self._mounted = False
        self._watchdog: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        if os.geteuid() != 0 or any(shutil.which(t) is None for t in _TOOLS):
            pytest.skip("a frozen file system needs root and " + ", ".join(_TOOLS))
        self.mnt.mkdir()
        with self.image.open("wb") as f:
            f.truncate(64 * 1024 * 1024)
        made = subprocess.run(
            ["mkfs.ext4", "-q", "-F", str(self.image)], capture_output=True, check=False
        )
        mounted = made.returncode == 0 and (
            subprocess.run(
                ["mount", "-o", "loop", str(self.image), str(self.mnt)],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        )
        if not mounted:
            pytest.skip("cannot mount a loop device here (a container without them?)")
        self._mounted = True

    def freeze(self) -> None:
        # Whatever happens to this process, the file system is thawed within 60 s.
        self._watchdog = subprocess.Popen(
            ["sh", "-c", f"sleep 60; fsfreeze -u '{self.mnt}'"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        subprocess.run(["fsfreeze", "-f", str(self.mnt)], check=True)

    def thaw(self) -> None:
        if self._watchdog is not None:
            subprocess.run(["fsfreeze", "-u", str(self.mnt)], capture_output=True, check=False)
            self._watchdog.kill()
            self._watchdog.wait(timeout=10)
            self._watchdog = None

    def unmount(self) -> None:
        self.thaw()
        if self._mounted:
            done = subprocess.run(["umount", str(self.mnt)], capture_output=True, check=False)
            if done.returncode != 0:  # (something still holds it: detached once released)
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)
            self._mounted = False


async def test_a_write_on_a_hung_file_system_ends_at_write_timeout_s_and_is_known_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fs = FrozenMount(tmp_path)
    fs.mount()
    try:
        directory = fs.mnt / "store"
        store = open_store({"path": str(directory), "write_timeout_s": 0.5}, tmp_path)
        await store.open()
        try:
            await store.upsert_session(SessionRecord("S1", "C1", T0, energy_delivered_kwh=1.0))
            fs.freeze()
            with caplog.at_level(logging.ERROR, logger="evcore.store"):
                # Its caller is told within the bound (0.5 s + 1 s), naming the file and the key;
                # the write is under way, held by the file system: its outcome is unknown.
                hung = await _ends_within(
                    store.upsert_session(SessionRecord("S1", "C1", T0, energy_delivered_kwh=2.0)),
                    1.2,
                    4.0,
                )
                assert f"SQLite store {directory / 'records.sqlite'}" in str(hung)
                assert "[store] write_timeout_s = 0.5" in str(hung)
                assert "outcome is unknown" in str(hung)
                # A write queued behind it never starts: it is dropped, and said so.
                queued = await _ends_within(
                    store.upsert_session(SessionRecord("S2", "C2", T0)), 1.2, 4.0
                )
                assert "never started; nothing was committed" in str(queued)
                fs.thaw()
                # The held write commits once the file system answers, and that is logged.
                await wait_until(
                    lambda: any("committed after all" in r.getMessage() for r in caplog.records),
                    10,
                    "the late write's outcome to be logged",
                )
            # Later writes land after it, in order; the dropped one is not there.
            await store.upsert_session(SessionRecord("S1", "C1", T0, energy_delivered_kwh=3.0))
            s1 = await store.get_session("S1")
            assert s1 is not None and s1.energy_delivered_kwh == 3.0
            assert await store.get_session("S2") is None
        finally:
            fs.thaw()
            await asyncio.wait_for(store.close(), 10)
    finally:
        fs.unmount()
