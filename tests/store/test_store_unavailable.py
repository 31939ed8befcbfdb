"""When the store is unavailable (retry later) and when its failure is a bug, on real SQLite files
and a real PostgreSQL.

``StoreUnavailable`` is what the API answers UNAVAILABLE (clients retry); anything else reaches the
caller as a bug (INTERNAL, with its traceback). Review of the API's error mapping: an embedded
store whose directory could not be made raised a raw OSError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import free_port
from edge_testkit import spawn_edge
from evcore.edge.sitegen import depot_table, to_toml
from evcore.store import (
    StoreUnavailable,
    open_store,
)

# -- 1. an embedded store whose directory cannot be made --------------------------------------


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """``directory`` read-only, for root too (which write permissions do not stop): immutable."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only-directory"])
async def test_an_embedded_store_whose_directory_cannot_be_made_is_unavailable_naming_it(
    tmp_path: Path, where: str
) -> None:
    """Before: NotADirectoryError / PermissionError came through raw (INTERNAL from the API)."""
    if where == "parent-is-a-file":
        (tmp_path / "var").write_text("a file where the store's parent directory should be")
        directory = tmp_path / "var" / "store"
        guard: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        (tmp_path / "ro").mkdir()
        directory = tmp_path / "ro" / "store"
        guard = _read_only(tmp_path / "ro")
    with guard:
        store = open_store({"path": str(directory)}, tmp_path)
        with pytest.raises(StoreUnavailable) as opening:
            await store.open()
        with pytest.raises(StoreUnavailable) as reading:  # a later call: the same, no traceback
            await store.list_sessions()
        await store.close()
    for err in (opening, reading):
        assert f"cannot open SQLite store {directory / 'records.sqlite'}" in str(err.value)
    assert not directory.exists()


async def test_the_edge_names_the_store_it_cannot_open(tmp_path: Path) -> None:
    """`evcore edge` with such a store exits 1 naming the store's file. Before: "could not start:
    NotADirectoryError(20, 'Not a directory')", naming nothing."""
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    (tmp_path / "var").write_text("")
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "var" / "store")}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    proc = await spawn_edge(site_file)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, text[-2000:]
    assert "could not start: StoreUnavailable" in text, text[-2000:]
    assert f"cannot open SQLite store {tmp_path / 'var' / 'store' / 'records.sqlite'}" in text
