"""The broker unreachable: the edge (``EdgeApp`` with a NATS bus, its store and audit log) keeps
deciding on local state and its profiles keep leaving; nothing in the control path waits on the
network. A real nats-server of our own is frozen with SIGSTOP (the worst case: the TCP connection
stays open and nothing answers), then killed; then a fresh one on the same port lets the outbox
drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bus_testkit import free_port
from edge_testkit import grid_curtailment
from evcore.bus import Subjects, bus_from_config
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.controller import SentProfile
from evcore.edge.dispatch import ChangeKind
from evcore.edge.grid import Curtailment
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(180)

NATS_SERVER = os.environ.get("NATS_SERVER", "nats-server")


def _start_nats(port: int, store: Path) -> subprocess.Popen[bytes]:
    store.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"nats-server on port {port} did not start")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=10)


async def test_broker_frozen_then_gone_the_loop_decides_and_sends_on_local_state(
    tmp_path: Path,
) -> None:
    import nats
    from evcore.site import load_site
    from evcore.store import open_store

    port = free_port()
    broker = _start_nats(port, tmp_path / "nats")
    url = f"nats://127.0.0.1:{port}"
    table = depot_table(6, per_feeder=6, grid_share=0.8)
    table["edge"] = {
        "tick_s": 0.5,
        "settle_s": 2.0,
        "curtail_lead_s": 1.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
    }
    table["bus"] = {
        "kind": "nats",
        "url": url,
        "outbox_dir": str(tmp_path / "outbox"),
        "connect_timeout_s": 2.0,
        "publish_timeout_s": 2.0,
        "reconnect_wait_s": 0.5,
    }
    site_id = str(table["site"]["id"])
    clock = WallClock()
    sent: list[SentProfile] = []
    bus = bus_from_config(table["bus"], site_id, clock)
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    app = EdgeApp(load_site(table), table, clock=clock, bus=bus, store=store, on_sent=sent.append)
    runner = asyncio.create_task(app.run())
    rig: EdgeRig | None = None
    nc = None
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        ctrl = app.controller
        prefix = app.central.config.path_prefix
        rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{app.central.port}{prefix}")
        await rig.start()
        await rig.wait_for(rig.defaults_held, 15, "a TxDefaultProfile on every station")
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 15, "sessions"
        )
        # The bus works: a curtailment published on NATS reaches the controller.
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        now = clock.now()
        dso_1 = grid_curtailment("dso-1", 40.0, now, now + 3600, signal_id="dso-1")
        await nc.publish(Subjects(site_id).grid, dso_1.SerializeToString())
        await nc.flush()
        await rig.wait_for(lambda: len(ctrl.curtailments) == 1, 15, "the bus's curtailment")
        await nc.close()
        nc = None
        cap_a = 8000.0 / 690.0  # the later, tighter curtailment: 8 kW over three phases
        # Charging again under the first one (its first decision pauses all until their
        # measurements show the lower draw) above what the second will allow.
        await rig.wait_for(
            lambda: sum(rig.limit_at(cid) for cid in rig.fleet.charger_ids) > cap_a + 6.0,
            20,
            "charging under the first curtailment",
        )

        # Freeze the broker: connected sockets, no answers.
        broker.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.0)
        decisions = ctrl.stats.decisions
        n_sent = len(sent)
        now = clock.now()
        # A tighter limit through the local API path: 8 kW from now + 1 s.
        ctrl.post_curtailment(Curtailment("dso-2", "grid", 8.0, now + 1.0, now + 3600))
        await rig.wait_for(
            lambda: sum(rig.limit_at(cid) for cid in rig.fleet.charger_ids) <= cap_a + 1e-6,
            20,
            "the curtailment in force at the chargers while the broker is frozen",
        )
        assert any(s.kind is ChangeKind.DECREASE for s in sent[n_sent:])
        # The decisions were recorded (store is local) and none was dropped for the network.
        assert ctrl.stats.decisions > decisions
        assert ctrl.stats.audit_failures == 0 and ctrl.stats.core_failures == 0
        # The audit records of those decisions wait in the outbox: the broker really is away.
        outbox = bus.outbox  # type: ignore[attr-defined]
        await rig.wait_for(lambda: outbox.pending > 0, 20, "records waiting in the outbox")

        # Gone for good: killed while frozen. The loop goes on; then cancel the curtailment and
        # the chargers get their current back, still without a broker.
        _stop(broker)
        n_sent = len(sent)
        ctrl.cancel_curtailment("dso-2")
        ctrl.cancel_curtailment("dso-1")
        await rig.wait_for(
            lambda: any(s.kind is ChangeKind.INCREASE for s in sent[n_sent:]),
            20,
            "increases after the release, without a broker",
        )
        assert ctrl.stats.audit_failures == 0
        assert rig.physics.violations == 0, rig.physics.violations_by_node

        # A broker again (same port): the records that waited in the outbox go out.
        broker = _start_nats(port, tmp_path / "nats")
        await rig.wait_for(lambda: outbox.pending == 0, 60, "the outbox drained")
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        if rig is not None:
            await rig.stop()
        app.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner, 30)
        _stop(broker)
