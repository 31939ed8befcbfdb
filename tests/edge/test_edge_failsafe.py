"""Failsafes through real sockets: the edge killed with SIGKILL, stale telemetry, ignored profiles,
restart without a burst."""

from __future__ import annotations

import asyncio
import math
import signal
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import free_port
from edge_testkit import start_edge
from evcore.edge.coreio import RustCore
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table, to_toml
from evcore.sim.ev import EV
from evcore.site import load_site

pytestmark = pytest.mark.timeout(150)


async def test_sigkill_then_plug_every_idle_charger_and_resume_paused_stays_within_limits(
    tmp_path: Path,
) -> None:
    # 10 chargers on a 40 A feeder: 10 x 6 A does not fit, so some failsafe levels are 0 A.
    table = depot_table(10, per_feeder=10, feeder_share=40.0 / 320.0, grid_share=1.0)
    port = free_port()
    table["ocpp"]["port"] = port
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "store")}
    table["edge"] = {
        "tick_s": 0.5,
        "settle_s": 2.0,
        "failsafe_after_s": 16.0,
        "refresh_lead_s": 5.0,
        "fallback_guard_s": 3.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
    }
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    # (start_edge's own bound, 60 s: 30 s ran out under load, the process silent until then.)
    proc = await start_edge(site_file)
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{port}/ocpp", apply_delay_s=0.5)
    try:
        await rig.start()
        sims = rig.fleet

        # The first TxDefaults are 0 A (no station confirmed one yet: each counts at its maximum
        # in the failsafe computation); the levels follow once they are confirmed and known
        # applied. The final ones are the Rust core's fair shares with every charger obeying
        # ours, as told on the wire ([ocpp] whole_amperes: rounded down). (Waiting only for some
        # level above 0 took levels still on their way up under load: 4 chargers at 6 A where 6
        # end there, and a charger taken for a 0 A one got 6 A.)
        plain = RustCore(load_site(table), table).failsafe_levels({})
        final = {cid: float(math.floor(plain[cid] + 1e-9)) for cid in sims.charger_ids}
        await rig.wait_for(
            lambda: rig.defaults_held() and all(rig.limit_at(c) == final[c] for c in final),
            30,
            f"a TxDefaultProfile on every station, at the final levels {final}",
        )
        now = rig.clock.now()
        failsafe = {cid: rig.limit_at(cid) for cid in sims.charger_ids}
        assert sum(failsafe.values()) <= 40.0 + 1e-6
        assert min(failsafe.values()) == 0.0 < max(failsafe.values())
        # Cars on half the chargers; one is full (the vehicle pauses itself, SuspendedEV), two
        # stand on chargers whose failsafe level is 0 A (the allocator pauses them).
        with_level = [cid for cid in sims.charger_ids if failsafe[cid] > 0.0]
        zero = [cid for cid in sims.charger_ids if failsafe[cid] == 0.0]
        sleeper = with_level[0]
        active = [*with_level[:3], *zero[:2]]
        for cid in active:
            sims.plug_in(cid, EV(soc=1.0 if cid == sleeper else 0.2))

        def settled() -> bool:
            """The edge knows every session (the central system answers a StartTransaction
            after its controller heard of it: the station has its transaction id), the cars on
            chargers with a level draw, the full one draws nothing."""
            return (
                all(sims.connector(c).tx_id is not None for c in active)
                and all(sims.connector(c).power_w > 0 for c in active if c in with_level[1:])
                and sims.connector(sleeper).power_w == 0.0
            )

        await rig.wait_for(settled, 30, "every session known to the edge, the cars settled")
        before = {cid: rig.limit_at(cid) for cid in sims.charger_ids}
        assert all(before[cid] == 0.0 for cid in zero)  # paused: no room at 6 A
        assert sims.connector(sleeper).power_w == 0.0  # full: drawing nothing
        assert rig.physics.violations == 0
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        # The edge is gone: every idle charger gets a car, paused ones may resume.
        for cid in sims.charger_ids:
            if cid not in active:
                sims.plug_in(cid, EV(soc=0.2))
        connector = sims.connector(sleeper)
        assert connector.ev is not None
        connector.ev.soc = 0.3  # the paused car wakes up and draws again
        now = rig.clock.now()
        await asyncio.sleep(table["edge"]["failsafe_after_s"] + 3.0)
        after = {cid: rig.limit_at(cid) for cid in sims.charger_ids}
        # Every charger is back at its failsafe level, on its own.
        assert after == pytest.approx(failsafe), (before, after)
        # Every charger with a level now draws it (the woken car included); the site holds.
        assert all(sims.connector(cid).power_w > 0 for cid in with_level)
        assert rig.physics.samples > 150
        assert rig.physics.violations == 0, rig.physics.violations_by_node
        assert rig.clock.now() - now > 16.0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rig.stop()


FAST: dict[str, Any] = {
    "tick_s": 0.5,
    "settle_s": 2.0,
    "stale_after_s": 4.0,
    "ignore_threshold_a": 2.0,
    "ignore_after_s": 2.0,
    "fault_after_s": 3.0,
    "min_on_s": 0.0,
    "min_off_s": 0.0,
}


async def test_a_charger_that_ignores_its_profile_is_covered_by_the_others_and_faulted() -> None:
    from evcore.edge.config import EdgeConfig
    from evcore.edge.facade import ControllerFacade

    # 5 chargers on an 80 A feeder: 16 A each at the failsafe level.
    table = depot_table(5, per_feeder=5, feeder_share=0.5, grid_share=1.0)
    faults: list[str] = []
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST), apply_delay_s=0.3)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        ctrl.on_fault = lambda cid, reason: faults.append(cid)
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        rogue = rig.fleet.charger_ids[0]
        others = rig.fleet.charger_ids[1:]
        sim, _ = rig.fleet.station(rogue)
        # It reboots, forgets its default and from then on answers Accepted but applies nothing:
        # it draws its 32 A hardware maximum.
        sim.misbehaviour.ignore_profiles = True
        sim.misbehaviour.lose_profiles_on_reboot = True
        c_rogue = ctrl.state.chargers[rogue]
        n_sent = len(rig.sent)
        await sim.reboot()
        await rig.wait_for(
            lambda: (
                any(s.charger_id == rogue for s in rig.sent[n_sent:])
                and not c_rogue.profile_unknown
                and c_rogue.tx_default is not None
            ),
            15,
            "the default re-sent after the reboot and (falsely) accepted",
        )
        assert rig.limit_at(rogue) >= 32.0
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: ctrl.state.chargers[rogue].suspect_since is not None, 15, "suspect"
        )
        suspect_at = rig.clock.monotonic()
        # Its load is covered: the others come down so the feeder holds with the rogue at 32 A.
        await rig.wait_for(
            lambda: all(rig.limit_at(cid) <= (80.0 - 32.0) / 4 + 1e-9 for cid in others),
            10,
            "the others reduced",
        )
        await asyncio.sleep(1.5)  # one more physics period after the reductions took effect
        violations_after_cover = rig.physics.violations
        await rig.wait_for(lambda: rogue in faults, 15, "the fault reported")
        assert (
            rig.clock.monotonic() - suspect_at >= FAST["ignore_after_s"] + FAST["fault_after_s"] - 1
        )
        view = ControllerFacade(ctrl).charger(rogue)
        assert view["faulted"] and "ignores its profile" in view["fault_reason"]
        assert rig.fleet.connector(rogue).terminal_a[0] > 30.0  # still drawing: it ignores us
        await asyncio.sleep(3.0)
        assert rig.physics.violations == violations_after_cover  # covered from then on
        drawn = rig.fleet.terminal_currents()
        assert drawn.sum(axis=0).max() <= 80.0 + 1e-6


async def test_stale_telemetry_counts_at_the_last_allowed_maximum() -> None:
    from evcore.edge.config import EdgeConfig

    table = depot_table(5, per_feeder=5, feeder_share=0.5, grid_share=1.0)
    rig = EdgeRig(table, cfg=EdgeConfig(**{**FAST, "reclaim_ramp_s": 5.0}), apply_delay_s=0.3)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None and rig.core is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        quiet = rig.fleet.charger_ids[0]
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2, onboard_limit_a=8.0 if cid == quiet else 32.0))
        # The quiet car draws 8 A: its headroom is reclaimed (capped near its draw) for the others,
        # from the first reading taken reclaim_ramp_s (here 5 s, by default 30 s) after its
        # session turned on (an earlier one may show a car still ramping up).
        await rig.wait_for(lambda: rig.limit_at(quiet) < 16.0, 45, "headroom reclaimed")
        # The edge's [edge] reclaim_ramp_s reached the core: well before the default 30 s.
        on_since = ctrl.state.chargers[quiet].on_since
        assert on_since is not None and rig.clock.monotonic() - on_since < 20.0
        reclaimed = rig.limit_at(quiet)
        assert rig.core.last_codes[quiet] == "demand"
        sim, _ = rig.fleet.station(quiet)
        sim.misbehaviour.stop_reporting = True
        ev = rig.fleet.connector(quiet).ev
        assert ev is not None
        ev.onboard_limit_a = 32.0  # and now it would draw all it is allowed
        await asyncio.sleep(FAST["stale_after_s"] + 3.0)
        c = ctrl.state.chargers[quiet]
        assert c.age_s(rig.clock.monotonic()) > FAST["stale_after_s"]
        # Stale: no more reclaim from a measurement nobody sends; counted at what it may draw.
        assert rig.core.last_codes[quiet] != "demand"
        assert rig.limit_at(quiet) >= reclaimed
        assert rig.physics.violations == 0
        drawn = rig.fleet.terminal_currents()
        assert drawn.sum(axis=0).max() <= 80.0 + 1e-6


async def _sessions(api_port: int) -> dict[str, str]:
    import grpc
    from evcore.v1 import edge_api_pb2, edge_api_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{api_port}") as channel:
        stub = edge_api_pb2_grpc.EdgeApiStub(channel)
        got = await stub.ListSessions(
            edge_api_pb2.ListSessionsRequest(),
            metadata=(("authorization", "Bearer noc-token-0123456789"),),
            timeout=10,
        )
    return {s.charger_id: s.transaction_id for s in got.sessions}


async def test_restart_recovers_from_store_and_charger_reports_without_a_burst(
    tmp_path: Path,
) -> None:
    # 8 chargers under a 64 A feeder: 8 A each while all charge.
    table = depot_table(8, per_feeder=8, feeder_share=64.0 / 256.0, grid_share=1.0)
    port, api_port = free_port(), free_port()
    rate = 4.0
    table["ocpp"]["port"] = port
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "store")}
    table["api"] = {
        "listen": f"127.0.0.1:{api_port}",
        "tokens": [{"name": "noc", "token": "noc-token-0123456789", "roles": ["viewer"]}],
    }
    table["edge"] = {
        "tick_s": 0.5,
        "settle_s": 2.0,
        "failsafe_after_s": 60.0,
        "refresh_lead_s": 10.0,
        "fallback_guard_s": 5.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
        "restart_max_profiles_per_s": rate,
    }
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    proc = await start_edge(site_file, timeout_s=30.0)
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{port}/ocpp", apply_delay_s=0.3)
    try:
        await rig.start()
        sims = rig.fleet
        await rig.wait_for(rig.defaults_held, 20, "a TxDefaultProfile on every station")
        # The final failsafe levels first (8 A each): the first TxDefaults may be 0 A and 32 A
        # (below), and a car that starts on a 32 A TxDefault on this exactly full feeder holds
        # it (what a charger draws is its floor in the allocation), so the 0 A ones never start.
        await rig.wait_for(
            lambda: all(rig.limit_at(cid) == 8.0 for cid in sims.charger_ids),
            30,
            "the final TxDefault levels, 8 A on every station",
        )
        for cid in sims.charger_ids:
            sims.plug_in(cid, EV(soc=0.2))
        # Killed once every car charges. The first TxDefaults may be 0 A and 32 A (a station
        # whose TxDefault left after the others' was sized while they counted at their maximum,
        # its level its maximum): cars plugged in then start at 32 A and 0 A and reach 8 A each
        # only after the 32 A ones came down (at times more than 6 s). Killed earlier, the new
        # edge found cars at 0 A that the old one had paused, and kept them there until the
        # allocation moved them: not a pause by the restart (the check below failed so in 2 of
        # 42 runs with a fixed 6 s here, after 0e68f18).
        # Charging, and steadily: a car just plugged in may be held at 0 A for a moment while
        # its TxDefault is not known applied (docs/edge.md), so 2 s of every car charging.
        steady = 0
        for _ in range(90):
            charging = all(
                rig.limit_at(cid) >= 6.0 and sims.connector(cid).terminal_a[0] >= 6.0
                for cid in sims.charger_ids
            )
            steady = steady + 1 if charging else 0
            if steady >= 4:
                break
            await asyncio.sleep(0.5)
        assert steady >= 4, {cid: rig.limit_at(cid) for cid in sims.charger_ids}
        before = await _sessions(api_port)
        assert set(before) == set(sims.charger_ids) and all(before.values())
        limits_before = {cid: rig.limit_at(cid) for cid in sims.charger_ids}
        assert sum(limits_before.values()) <= 64.0 + 1e-6
        assert all(limit > 0 for limit in limits_before.values()), limits_before

        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        for sim in sims.stations.values():
            sim.received = []
        killed_at = rig.clock.monotonic()
        arrivals: list[float] = []
        seen = {id(sim): 0 for sim in sims.stations.values()}
        what: list[tuple[float, str, str, Any]] = []

        async def watch() -> None:
            # When each SetChargingProfile reaches a station (50 ms resolution: merges, never
            # splits, a burst).
            while True:
                for sim in sims.stations.values():
                    new = sim.received[seen[id(sim)] :]
                    seen[id(sim)] += len(new)
                    for action, payload in new:
                        if action == "SetChargingProfile":
                            arrivals.append(rig.clock.monotonic())
                            prof = payload.get("csChargingProfiles", {})
                            sched = prof.get("chargingSchedule", {})
                            periods = sched.get("chargingSchedulePeriod", [{}])
                            what.append(
                                (
                                    round(arrivals[-1] - killed_at, 2),
                                    sim.ocpp_id,
                                    str(prof.get("chargingProfilePurpose")),
                                    periods[0].get("limit"),
                                )
                            )
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        proc = await start_edge(site_file, timeout_s=30.0)
        await rig.wait_for(lambda: len(arrivals) >= 16, 40, "the new edge's profiles")
        await asyncio.sleep(4.0)
        watcher.cancel()

        # Sessions came back from the store (1.6 stations do not repeat StartTransaction).
        assert await _sessions(api_port) == before
        # The new edge asked every station what it enforces and for fresh reports.
        for sim in sims.stations.values():
            actions = [a for a, _ in sim.received]
            assert "GetCompositeSchedule" in actions and "TriggerMessage" in actions, actions
        # No burst: the restart's re-sends (each station's first TxProfile and first TxDefault
        # from the new edge: what it holds is unknown to it) are paced at ``rate`` per second;
        # in any 1 s at most the pace plus the bucket (``rate`` tokens). Later profiles are the
        # ordinary loop (decreases are never held back).
        firsts: dict[tuple[str, str], float] = {}
        for at, station, purpose, _ in what:
            firsts.setdefault((station, purpose), at)
        assert len(firsts) == 16, what
        starts = sorted(firsts.values())
        worst = max(sum(1 for b in starts if a <= b < a + 1.0) for a in starts)
        assert worst <= 2 * rate + 1, (worst, what)
        # No car was paused by the restart: the stations' reports and the start-up grace keep
        # the first re-sends from squeezing those back first to 0 A.
        assert all(limit > 0 for _, _, purpose, limit in what if purpose == "TxProfile"), what
        # And the site held throughout; the chargers are back where the allocation puts them.
        assert rig.physics.violations == 0, rig.physics.violations_by_node
        assert sum(rig.limit_at(cid) for cid in sims.charger_ids) <= 64.0 + 1e-6
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rig.stop()
