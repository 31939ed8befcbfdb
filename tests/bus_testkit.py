"""Helpers for the bus tests: private nats-server processes, a NATS bus factory, polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from evcore.bus import Bus, BusConfig, BusMessage, InProcessBus, ProcessedIds
from evcore.bus.natsbus import NatsBus
from evcore.bus.streams import stream_for_subject
from evcore.clock import WallClock
from evcore.v1 import audit_pb2
from nats.js.api import RawStreamMsg

SHARED_NATS = os.environ.get("EVCORE_TEST_NATS_URL", "nats://127.0.0.1:4222")
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, for a server a test starts later (a subprocess, a site file). Picked
    outside the kernel's ephemeral range: every outbound connection takes its local port from
    that range, so a port picked there (bind to 0) can be taken by one before the server binds
    it (CI, 2026-12-05: an edge's API port, "Address already in use")."""
    lo, hi = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, lo - 1) if lo > 20_001 else rng.randint(hi + 1, 65_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no luck outside it: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def unique_site() -> str:
    # A dot and a space on purpose: the site id must be escaped into one subject token.
    return f"t.{uuid.uuid4().hex[:10]} x"


class NatsServer:
    """One nats-server with JetStream on a loopback port, its store in ``store_dir``."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        max_payload: int | None = None,
        monitor: bool = False,
        max_file_store: str | None = None,
    ) -> None:
        self.port = port or free_port()
        #: The HTTP monitoring port (``/connz``, ``/jsz``) when ``monitor``.
        self.monitor_port = free_port() if monitor else None
        self.store_dir = store_dir
        self.proc: subprocess.Popen[bytes] | None = None
        #: The broker's max_payload (bytes); nats-server's default (1 MiB) when None.
        self.max_payload = max_payload
        #: JetStream's file storage cap (e.g. "100MB"); the disk's free space when None.
        self.max_file_store = max_file_store

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf: list[str] = []
        js = ["-js", "-sd", str(self.store_dir)]
        lines = []
        if self.max_payload is not None:
            lines.append(f"max_payload: {int(self.max_payload)}")
        if self.max_file_store is not None:
            lines.append(
                f'jetstream {{ store_dir: "{self.store_dir}", max_file_store: '
                f"{self.max_file_store} }}"
            )
            js = []
        if lines:
            path = self.store_dir / "limits.conf"
            path.write_text("\n".join(lines) + "\n")
            conf = ["-c", str(path)]
        if self.monitor_port is not None:
            conf += ["-m", str(self.monitor_port)]
        self.proc = subprocess.Popen(
            [
                NATS_SERVER,
                *conf,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                *js,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def connection_names(self) -> list[str]:
        """The name of every client connection open now (the server must have ``monitor``)."""
        import json
        import urllib.request

        assert self.monitor_port is not None, "NatsServer(monitor=True) serves /connz"
        url = f"http://127.0.0.1:{self.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=5) as reply:
            conns = json.load(reply).get("connections") or []
        return [str(c.get("name", "")) for c in conns]


async def wait_until(pred: object, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred()`` until true (tests only; never used for control timing)."""
    assert callable(pred)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


async def stored_msgs(bus: NatsBus, subject: str) -> list[RawStreamMsg]:
    """Every message the stream holds on ``subject``, in stream order."""
    spec = stream_for_subject(bus.streams, subject)
    assert spec is not None
    info = await bus._js.stream_info(spec.name)
    out: list[RawStreamMsg] = []
    if not info.state.messages:
        return out
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            m = await bus._js.get_msg(spec.name, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        if m.subject == subject:
            out.append(m)
    return out


async def collecting(bus: Bus, subject_pattern: str) -> list[BusMessage]:
    """A list that gets every message ``bus`` delivers live on ``subject_pattern``, in order."""
    got: list[BusMessage] = []

    async def collect(m: BusMessage) -> None:
        got.append(m)

    await bus.subscribe(subject_pattern, collect)
    return got


@contextlib.contextmanager
def killed_on_exit(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def make_nats_bus(
    site: str, url: str, outbox: Path, *, ack_wait_s: float = 2.0, **cfg: object
) -> NatsBus:
    """A NATS bus for ``site`` on ``url``: 0.1 s reconnect wait, 1 s connect and publish timeouts
    unless ``cfg`` says otherwise (any other ``BusConfig`` field too)."""
    settings: dict[str, object] = {
        "reconnect_wait_s": 0.1,
        "connect_timeout_s": 1.0,
        "publish_timeout_s": 1.0,
        **cfg,
    }
    conf = BusConfig(kind="nats", urls=(url,), outbox_dir=outbox, **settings)  # type: ignore[arg-type]
    return NatsBus(site, conf, clock=WallClock(), ack_wait_s=ack_wait_s)


def patient_nats_bus(site: str, url: str, outbox: Path, **cfg: object) -> NatsBus:
    """:func:`make_nats_bus` with room for a loaded machine: 2 s connect and publish timeouts, 5 s
    ack wait (the cloud and edge tests that run a whole service against the shared server)."""
    settings: dict[str, object] = {"connect_timeout_s": 2.0, "publish_timeout_s": 2.0, **cfg}
    return make_nats_bus(site, url, outbox, ack_wait_s=5.0, **settings)


class SharedBus:
    """One in-process bus seen as another component's (an edge's): its ``start`` and ``close`` do
    nothing, since the test that made the bus owns it; everything else is the bus's."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def started_bus(
    kind: str, outbox: Path, *, subscriber_queue_size: int = BusConfig.subscriber_queue_size
) -> AsyncIterator[Bus]:
    """A started bus of ``kind`` ("inprocess", or "nats" on the shared server) for a fresh site;
    its streams deleted and the bus closed on exit."""
    site = unique_site()
    b: Bus
    if kind == "nats":
        b = make_nats_bus(site, SHARED_NATS, outbox, subscriber_queue_size=subscriber_queue_size)
    else:
        b = InProcessBus(site, clock=WallClock(), subscriber_queue_size=subscriber_queue_size)
    await b.start()
    if kind == "nats":
        assert b.connected, f"shared nats-server at {SHARED_NATS} unreachable (run make services)"
    try:
        yield b
    finally:
        if isinstance(b, NatsBus):
            await b.delete_streams()
        await b.close()


class AuditSink:
    """A consumer that applies each audit record once: effect and id in one SQLite transaction."""

    def __init__(self, db: Path) -> None:
        self.ids = ProcessedIds(db, "audit-sink")
        self.ids.db.execute("CREATE TABLE IF NOT EXISTS applied(seq INTEGER, event_id TEXT)")
        self.ids.db.commit()
        self.calls = 0

    async def handle(self, m: BusMessage) -> None:
        self.calls += 1
        rec = audit_pb2.AuditRecord.FromString(m.data)
        self.ids.db.execute("INSERT INTO applied VALUES (?, ?)", (rec.seq, m.event_id))
        self.ids.add(m.event_id, commit=False)
        self.ids.db.commit()

    def applied(self) -> list[int]:
        return [int(r[0]) for r in self.ids.db.execute("SELECT seq FROM applied ORDER BY rowid")]

    def count(self) -> int:
        return int(self.ids.db.execute("SELECT COUNT(*) FROM applied").fetchone()[0])


def streams_to_delete(
    created: set[str], pending: set[str], others_alive: bool
) -> tuple[set[str], set[str]]:
    """``(delete now, leave pending)`` for a run ending with ``created`` (streams that appeared
    while it ran: its own and any concurrent run's) and ``pending`` (left by runs that ended
    while another was running). Only the last run standing deletes: a stream that appeared
    during a run may belong to a run still going."""
    if others_alive:
        return set(), created | pending
    return created | pending, set()


CLOUD_NATS_DIR = Path(__file__).resolve().parents[1] / "cloud" / "nats"
CLUSTER_NODES = ("a", "b", "c")


def _conf_port(path: Path, pattern: str) -> int:
    m = re.search(pattern, path.read_text(), re.M | re.S)
    assert m, f"{path.name} has no match for {pattern!r}"
    return int(m.group(1))


class Cluster:
    """The shipped three-node cluster (cloud/nats/node-*.conf, loopback ports) in ``workdir``;
    ``conf_dir``: a directory of edited copies instead."""

    def __init__(self, workdir: Path, conf_dir: Path = CLOUD_NATS_DIR) -> None:
        self.workdir = workdir
        self.conf_dir = conf_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @staticmethod
    def conf(node: str) -> Path:
        return CLOUD_NATS_DIR / f"node-{node}.conf"

    def start(self, node: str) -> None:
        self.procs[node] = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.conf_dir / f"node-{node}.conf")],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self, node: str) -> None:
        p = self.procs.pop(node)
        p.kill()
        p.wait(timeout=10)

    @classmethod
    def client_port(cls, node: str) -> int:
        return _conf_port(cls.conf(node), r"^listen:\s*127\.0\.0\.1:(\d+)")

    @classmethod
    def leaf_port(cls, node: str) -> int:
        return _conf_port(cls.conf(node), r"leafnodes\s*\{[^}]*?listen:\s*127\.0\.0\.1:(\d+)")

    def urls(self) -> tuple[str, ...]:
        return tuple(f"nats://127.0.0.1:{self.client_port(n)}" for n in CLUSTER_NODES)


@contextlib.contextmanager
def cluster_running(workdir: Path, conf_dir: Path = CLOUD_NATS_DIR) -> Iterator[Cluster]:
    """All three nodes started (killed at the end); fails if their ports are taken."""
    busy = [n for n in CLUSTER_NODES if port_open(Cluster.client_port(n))]
    if busy:
        pytest.fail(f"cluster ports of nodes {busy} are taken; is another cluster test running?")
    c = Cluster(workdir, conf_dir)
    for n in CLUSTER_NODES:
        c.start(n)
    try:
        yield c
    finally:
        for n in list(c.procs):
            c.kill(n)
