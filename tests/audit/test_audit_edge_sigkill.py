"""`evcore edge` killed with SIGKILL while its decisions flow: whatever profile a charger holds
afterwards is explained by a committed record, and the chain verifies — on the store the site file
names (SQLite or PostgreSQL).

The edge runs as a real subprocess (``evcore edge --config site.toml``) with its OCPP central system
and gRPC API on loopback sockets; the charge points are the simulator's, in this process. A grid
operator posts a curtailment through the API, and the edge is killed while the resulting decreases
are still going out.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import sys
from pathlib import Path

import grpc
import pytest
from bus_testkit import free_port
from edge_testkit import start_edge
from evcore.audit import verify_chain
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table, to_toml
from evcore.sim.ev import EV
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from evcore.v1.audit_pb2 import AuditRecord

pytestmark = pytest.mark.timeout(180)

VIEWER = "viewer-token-0123456789"
GRID = "grid-operator-token-0123456789"


def recorded(records: list[AuditRecord], charger_id: str, default: bool) -> list[float]:
    """Values recorded for a charger's TxDefault (``default``) or TxProfile setpoints."""
    out = []
    for r in records:
        for sp in r.setpoints:
            if sp.charger_id == charger_id and sp.reason.startswith("TxDefault") == default:
                out.append(sp.setpoint_a)
    return out


async def test_profiles_held_after_a_sigkill_all_have_their_record(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    table = depot_table(6, per_feeder=3, site_id="killed")
    ocpp_port, api_port = free_port(), free_port()
    table["ocpp"]["port"] = ocpp_port
    table["store"] = dict(store_section)
    table["edge"] = {
        "tick_s": 0.5,
        "settle_s": 1.0,
        "failsafe_after_s": 60.0,
        "refresh_lead_s": 10.0,
        "curtail_lead_s": 0.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
    }
    table["api"] = {"listen": f"127.0.0.1:{api_port}", "tokens_file": "tokens.toml"}
    (tmp_path / "tokens.toml").write_text(
        f'[[tokens]]\nname = "noc"\ntoken = "{VIEWER}"\nroles = ["viewer"]\n\n'
        f'[[tokens]]\nname = "dso"\ntoken = "{GRID}"\nroles = ["grid_operator"]\n'
    )
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    proc = await start_edge(site_file)
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{ocpp_port}/ocpp")
    held: dict[str, list[tuple[str, float]]] = {}
    try:
        await rig.start()
        await rig.wait_for(rig.defaults_held, 30, "a TxDefaultProfile on every station")
        plugged = rig.fleet.charger_ids[::2]
        for cid in plugged:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{api_port}") as channel:
            stub = pb_grpc.EdgeApiStub(channel)
            for _ in range(300):
                res = await stub.ListSessions(
                    pb.ListSessionsRequest(), metadata=(("authorization", f"Bearer {VIEWER}"),)
                )
                if len(res.sessions) == len(plugged):
                    break
                await asyncio.sleep(0.1)
            assert len(res.sessions) == len(plugged)
            signal_req = pb.PostGridSignalRequest()
            c = signal_req.signal.curtailment
            c.curtailment_id, c.node_id, c.max_kw = "dso-1", "grid", 12.0
            now = rig.clock.now()
            c.start.FromNanoseconds(int(now * 1e9))
            c.end.FromNanoseconds(int((now + 600) * 1e9))
            await stub.PostGridSignal(signal_req, metadata=(("authorization", f"Bearer {GRID}"),))

        def tx_profiles() -> int:
            return sum(
                1 for s in rig.fleet.stations.values() for p in s.profiles if p.purpose == "tx"
            )

        await rig.wait_for(lambda: tx_profiles() >= 1, 30, "the first TxProfile of the curtailment")
        # Kill while the rest of the decreases (and their records) may still be on their way.
        await asyncio.sleep(random.Random(3).uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        for cid in rig.fleet.charger_ids:
            sim, evse = rig.fleet.station(cid)
            held[cid] = [
                (p.purpose, p.periods[0][1])
                for p in sim.profiles
                if p.evse in (evse, 0) and p.periods
            ]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rig.stop()
    assert proc.returncode == -signal.SIGKILL

    store = open_store(table["store"], tmp_path, must_exist=True)
    await store.open()
    try:
        report = await verify_chain(store)
        assert report.ok, report.problems
        records = await store.audit_records()
    finally:
        await store.close()
    assert sum(1 for ps in held.values() for purpose, _ in ps if purpose == "tx") >= 1
    for cid, profiles in held.items():
        for purpose, limit_a in profiles:
            assert purpose in ("default", "tx"), (cid, purpose)
            values = recorded(records, cid, default=purpose == "default")
            # The central system sends whole amperes, rounded down ([ocpp] whole_amperes).
            assert any(math.floor(v + 1e-9) == limit_a for v in values), (
                cid,
                purpose,
                limit_a,
                values,
            )

    # The operator's view of the same trail, through the real command line and the site file.
    async def evcore(*args: str) -> tuple[int, str]:
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "evcore.cli",
            "audit",
            *args,
            "--config",
            str(site_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode is not None
        return cli.returncode, out.decode()

    rc, out = await evcore("verify")
    assert rc == 0 and "audit chain OK" in out, out
    target = plugged[0]
    rc, out = await evcore("show", "--charger", target, "--since", "1h")
    assert rc == 0, out
    lines = [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]
    # Each decision names what it sent to the charger, or why it left it unchanged.
    assert lines and all(
        ln.startswith((f"{target}: sent ", f"{target}: unchanged ")) for ln in lines
    ), out
    assert any(ln.startswith(f"{target}: sent ") for ln in lines), out
    assert any("TxDefault failsafe level" in ln for ln in lines), out
