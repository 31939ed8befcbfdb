"""The test session's JetStream clean-up (tests/conftest.py) with two runs on one NATS server: a
run that ends while another is running deletes nothing (the streams that appeared meanwhile may be
the other run's); the last run to end deletes them."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
from bus_testkit import SHARED_NATS as NATS_URL
from bus_testkit import streams_to_delete

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SUB_TEST = """
import asyncio, os, time
from pathlib import Path
import nats


def test_make_a_stream_and_wait():
    name, d = os.environ["SUB_STREAM"], Path(os.environ["SUB_DIR"])

    async def make():
        nc = await nats.connect(os.environ["NATS"])
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[name.lower() + ".>"], max_bytes=1 << 20)
        await nc.close()

    asyncio.run(make())
    (d / "ready").write_text("1")
    t0 = time.monotonic()
    while not (d / "go").exists():
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
"""


async def _names() -> set[str]:
    nc = await nats.connect(NATS_URL)
    try:
        return {s.config.name for s in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


async def _make(name: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().add_stream(
            name=name, subjects=[name.lower() + ".>"], max_bytes=1 << 20
        )
    finally:
        await nc.close()


async def _drop(names: list[str]) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        for n in names:
            try:
                await nc.jetstream().delete_stream(n)
            except Exception:
                pass
    finally:
        await nc.close()


def test_only_the_last_run_standing_deletes() -> None:
    assert streams_to_delete({"A"}, {"B"}, others_alive=True) == (set(), {"A", "B"})
    assert streams_to_delete({"A"}, {"B"}, others_alive=False) == ({"A", "B"}, set())


def test_a_run_ending_beside_another_deletes_none_of_its_streams(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    mine, theirs = f"EVCORE_T{tag}_MINE", f"EVCORE_T{tag}_SUB"
    runs, work = tmp_path / "runs", tmp_path / "sub"
    runs.mkdir()
    work.mkdir()
    shutil.copy(CONFTEST, work / "conftest.py")
    (work / "test_sub.py").write_text(SUB_TEST)
    # This process is the other run, alive all along (as the conftest registers a run).
    (runs / f"run-{os.getpid()}").write_text(str(os.getpid()))
    env = dict(
        os.environ,
        EVCORE_TEST_RUNS_DIR=str(runs),
        EVCORE_TEST_NATS_URL=NATS_URL,
        NATS=NATS_URL,
        PYTHONPATH=os.pathsep.join([str(CONFTEST.parent), os.environ.get("PYTHONPATH", "")]),
        SUB_STREAM=theirs,
        SUB_DIR=str(work),
    )
    sub = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(work)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        t0 = time.monotonic()
        while not (work / "ready").exists():
            assert sub.poll() is None, sub.communicate()[0].decode()
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        asyncio.run(_make(mine))  # made while the sub-run runs: it cannot tell it is not its own
        (work / "go").write_text("1")
        out = sub.communicate(timeout=120)[0].decode()
        assert sub.returncode == 0, out
        names = asyncio.run(_names())
        assert mine in names, "the ending run deleted a stream of the run still going"
        assert theirs in names
        pending = set((runs / "pending-streams").read_text().split())
        assert {mine, theirs} <= pending
        assert not (runs / f"run-{sub.pid}").exists()
    finally:
        if sub.poll() is None:
            sub.kill()
        asyncio.run(_drop([mine, theirs]))
