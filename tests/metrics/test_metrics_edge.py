"""An `EdgeApp` with ``[metrics]`` scraped over a real HTTP socket while simulated stations charge
cars through it: what the scrape shows is what the controller holds and what the stations
enforce; a curtailment shows as the node's cap; bad requests leave the endpoint working; a bad
``[metrics] listen`` stops the edge at load, naming the key."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from evcore.bus import bus_from_config
from evcore.checker import node_phase_currents
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table, to_toml
from evcore.metrics import MetricsConfigError
from evcore.metrics.edge import node_utilisation, read_edge
from evcore.sim.ev import EV
from evcore.site import load_site
from evcore.store import open_store
from metrics_testkit import Scrape, cert_authority, get, no_http_answer, request, scrape

pytestmark = pytest.mark.timeout(120)

PHASES = ("L1", "L2", "L3")


def _setpoints_match_stations(s: Scrape, rig: EdgeRig) -> bool:
    """Every charger's scraped setpoint is the limit its station enforces now, and confirmed."""
    setpoints = s.by("evcore_charger_setpoint_amperes", "charger_id")
    confirmed = s.by("evcore_charger_setpoint_confirmed", "charger_id")
    return all(
        cid in setpoints
        and abs(setpoints[cid] - rig.limit_at(cid)) < 1e-9
        and confirmed.get(cid) == 1
        for cid in rig.fleet.charger_ids
    )


async def _scrape_until(
    port: int, cond: Callable[[Scrape], bool], what: str, timeout_s: float = 20.0
) -> Scrape:
    """Scrape every 0.5 s until ``cond`` holds for a scrape; that scrape."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        s = await scrape(port)
        if cond(s):
            return s
        if loop.time() > deadline:
            raise TimeoutError(f"no scrape in {timeout_s} s showed {what}")
        await asyncio.sleep(0.5)


async def test_a_scrape_shows_what_the_controller_holds_and_the_stations_enforce(
    tmp_path: Path,
) -> None:
    # Two feeders of three 32 A chargers at 48 A per phase: three cars share a feeder at 16 A.
    table = depot_table(6, per_feeder=3, grid_share=0.8, site_id="metrics-depot")
    table["edge"] = {
        "tick_s": 0.5,
        "curtail_lead_s": 1.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
        "audit_journal": str(tmp_path / "journal"),
    }
    table["metrics"] = {"listen": "127.0.0.1:0"}
    clock = WallClock()
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    bus = bus_from_config({"kind": "inprocess"}, "metrics-depot", clock)
    app = EdgeApp(load_site(table), table, clock=clock, store=store, bus=bus)
    runner = asyncio.create_task(app.run())
    await asyncio.wait_for(app.ready.wait(), 20)
    port = app.metrics_port
    assert port > 0
    ctrl = app.controller
    prefix = app.central.config.path_prefix
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{app.central.port}{prefix}")
    stations = sorted({c["ocpp_id"] for c in table["chargers"]})
    try:
        s0 = await scrape(port)
        assert s0.value("evcore_chargers") == 6
        assert s0.value("evcore_ocpp_stations") == len(stations)
        assert s0.value("evcore_ocpp_stations_connected") == 0
        assert s0.value("evcore_chargers_online") == 0
        assert s0.value(
            "evcore_edge_info",
            site_id="metrics-depot",
            policy="fair_share",
            config_version=ctrl.config_version,
        )

        await rig.start()
        await rig.wait_for(rig.defaults_held, 15, "a TxDefaultProfile on every station")
        await rig.wait_for(
            lambda: (
                ctrl.failsafe_is_plain()
                and all(
                    c.tx_default == ctrl.failsafe[cid] for cid, c in ctrl.state.chargers.items()
                )
            ),
            30,
            "the final failsafe levels",
        )
        # Idle, each station enforces its TxDefault (once applied: 1 s after it was accepted)
        # at the failsafe level the scrape shows.
        s1 = await _scrape_until(
            port,
            lambda s: (
                s.by("evcore_charger_failsafe_amperes", "charger_id")
                == {cid: rig.limit_at(cid) for cid in rig.fleet.charger_ids}
            ),
            "the failsafe levels scraped applied at the stations",
        )
        assert s1.value("evcore_ocpp_stations_connected") == len(stations)
        assert s1.value("evcore_chargers_online") == 6
        assert s1.value("evcore_chargers_profile_unknown") == sum(
            c.profile_unknown for c in ctrl.state.chargers.values()
        )
        assert s1.value("evcore_failsafe_levels_plain") == 1
        assert all(v > 0 for v in s1.by("evcore_charger_failsafe_amperes", "charger_id").values())

        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: (
                # On an accepted TxProfile, or on its TxDefault when that is its share (the
                # reclaim no longer caps a car still ramping up: no TxProfile need leave).
                all(
                    c.transaction_id is not None and c.accepted
                    for c in ctrl.state.chargers.values()
                )
                and rig.fleet.terminal_currents().sum() > 0
            ),
            40,
            "every car charging on an accepted profile",
        )

        # Settled: the cars at the feeders' fair share, 48 A over three cars, and
        # what the scrape shows is what the controller holds and what the stations enforce
        # (once accepted profiles are applied: 1 s here), each checked as the scrape returns.
        def settled(s: Scrape) -> bool:
            setpoints = s.by("evcore_charger_setpoint_amperes", "charger_id")
            return (
                _setpoints_match_stations(s, rig)
                and set(setpoints.values()) == {16.0}
                and all(c.accepted for c in ctrl.state.chargers.values())
                and setpoints
                == {
                    cid: ctrl.wire(cid, c.sent)
                    for cid, c in ctrl.state.chargers.items()
                    if c.sent is not None
                }
            )

        s2 = await _scrape_until(port, settled, "setpoints scraped = held = enforced = 16 A", 60)
        assert s2.value("evcore_decisions_total") > s1.value("evcore_decisions_total")
        # (No TxProfile need leave after the plug-in: a TxDefault at 16 A may already be it.)
        assert s2.value("evcore_profiles_sent_total") >= s1.value("evcore_profiles_sent_total") > 0
        assert s2.value("evcore_core_decision_failures_total") == 0
        assert s2.value("evcore_chargers_in_session") == 6
        assert s2.value("evcore_chargers_plugged") == 6
        assert s2.value("evcore_chargers_profile_unknown") == 0
        assert s2.value("evcore_chargers_faulted") == 0
        assert 0 < s2.value("evcore_last_decision_duration_seconds") < 5
        assert 0 <= s2.value("evcore_last_setpoint_age_seconds") < 60
        assert s2.value("evcore_decision_duration_seconds", quantile="0.5") <= s2.value(
            "evcore_decision_duration_seconds", quantile="1.0"
        )
        assert s2.value("evcore_bus_published_total") > s1.value("evcore_bus_published_total")
        assert s2.value("evcore_bus_outbox_pending_messages") >= 0
        assert s2.value("evcore_audit_journal_pending_records") == 0
        assert s2.value("evcore_audit_journal_failures_total") == 0
        assert s2.value("evcore_audit_bus_publish_failures_total") == 0
        assert s2.value("evcore_audit_too_large_for_bus_total") == 0
        assert s2.value("evcore_curtailment_book_durable") == 1

        # Node currents: what the cars really draw (the fleet's own terminal currents through
        # the same tree) once the meter values caught up with the ramp, and within the limits.
        def nodes_match(s: Scrape) -> bool:
            truth = np.asarray(node_phase_currents(app.site, rig.fleet.terminal_currents()))
            return all(
                abs(
                    s.value("evcore_node_current_amperes", node_id=node.id, phase=phase)
                    - truth[j, k]
                )
                < 0.5
                for j, node in enumerate(app.site.nodes)
                for k, phase in enumerate(PHASES)
            )

        s3 = await _scrape_until(
            port,
            lambda s: nodes_match(s) and settled(s),
            "node currents = the fleet's, setpoints still 16 A",
        )
        # What the scrape computes from its reading is the API's GetNodeUtilisation.
        assert node_utilisation(read_edge(app)) == app.facade.node_utilisation()
        assert s3.value("evcore_chargers_charging") == 6
        for node in app.site.nodes:
            for k, phase in enumerate(PHASES):
                current = s3.value("evcore_node_current_amperes", node_id=node.id, phase=phase)
                limit = s3.value("evcore_node_phase_limit_amperes", node_id=node.id, phase=phase)
                assert limit == node.phase_limit_a[k]
                assert current <= limit + 1e-6
                ratio = s3.value("evcore_node_utilisation_ratio", node_id=node.id, phase=phase)
                assert abs(ratio - current / limit) < 1e-12
        assert s3.value("evcore_node_current_amperes", node_id="F1", phase="L1") > 40
        for cid in rig.fleet.charger_ids:
            for phase in PHASES:
                assert s3.value("evcore_charger_current_amperes", charger_id=cid, phase=phase) > 0

        # A curtailment (through the API's facade: stored before it answers).
        now = clock.now()
        await app.facade.post_curtailment("dso-1", "grid", 10.0, now + 0.5, now + 120.0)
        s4 = await scrape(port)
        assert s4.value("evcore_node_curtailment_cap_watts", node_id="grid") == 10_000.0
        assert s4.get("evcore_node_curtailment_cap_watts", node_id="F1") is None
        assert s4.value("evcore_node_power_limit_watts", node_id="grid") == 10_000.0
        assert s4.value("evcore_curtailments_active") == 1
        assert node_utilisation(read_edge(app)) == app.facade.node_utilisation()
        assert s4.value("evcore_curtailments_booked") == 1
        assert s4.value("evcore_curtailment_book_durable") == 1
        assert s4.value("evcore_curtailment_book_store_failures_total") == 0
        await rig.wait_for(
            lambda: app.facade.node_utilisation()[0]["power_kw"] <= 10.0,
            20,
            "the site under 10 kW by its meter values",
        )
        s5 = await scrape(port)
        assert s5.value("evcore_node_power_watts", node_id="grid") <= 10_000.0
        assert sum(s5.by("evcore_charger_setpoint_amperes", "charger_id").values()) <= 10_000 / 690

        # Bad requests on the live edge's endpoint, then a good scrape.
        assert (await request(port, b"\x00\xff garbage \r\n\r\n")).status == 400
        oversized = b"GET /metrics HTTP/1.1\r\nCookie: " + b"x" * 50_000 + b"\r\n\r\n"
        assert (await request(port, oversized)).status == 400
        await asyncio.sleep(1.5)  # three ticks
        s6 = await scrape(port)
        assert s6.value("evcore_decisions_total") > s5.value("evcore_decisions_total")
        assert rig.physics.violations == 0
    finally:
        await rig.stop()
        app.stop()
        await asyncio.wait_for(runner, 20)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_an_edge_without_the_section_has_no_endpoint() -> None:
    table = depot_table(2, per_feeder=2)
    app = EdgeApp(load_site(table), table, clock=WallClock())
    assert app.metrics_config is None


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1:70000", "localhost", "::1:9464"])
def test_a_bad_listen_is_refused_at_load_naming_the_key(listen: str) -> None:
    table = depot_table(2, per_feeder=2)
    table["metrics"] = {"listen": listen}
    with pytest.raises(MetricsConfigError, match=r"\[metrics\]\.listen"):
        EdgeApp(load_site(table), table, clock=WallClock())


def _evcore_edge_refuses(metrics: dict[str, str], tmp_path: Path) -> str:
    """``evcore edge`` on a two-charger site file with ``[metrics]`` = ``metrics``: it exits 2
    (a config error) before starting; its stderr."""
    table = depot_table(2, per_feeder=2)
    table["metrics"] = metrics
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    out = subprocess.run(
        [sys.executable, "-m", "evcore.cli", "edge", "--config", str(site_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stderr


def test_evcore_edge_refuses_a_bad_listen_before_starting(tmp_path: Path) -> None:
    stderr = _evcore_edge_refuses({"listen": "127.0.0.1:port"}, tmp_path)
    assert "[metrics].listen: port must be a number" in stderr


async def test_the_loop_does_not_spin_while_the_stations_are_away(tmp_path: Path) -> None:
    """Found by scraping evcore_decisions_total: once a TxProfile's refresh fell due while its
    station was offline, EdgeController._next_wake_in returned 0 and the loop decided without
    waiting (about 1,000-1,800 decisions/s) until the station was back."""
    table = depot_table(3, per_feeder=3, site_id="spin-depot")
    # Shared expiries every 13 s (failsafe_after_s - refresh_lead_s - fallback_guard_s): a
    # refresh falls due within 18 s of the last profile.
    table["edge"] = {
        "tick_s": 0.5,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
        "failsafe_after_s": 20.0,
        "refresh_lead_s": 5.0,
        "fallback_guard_s": 2.0,
    }
    table["metrics"] = {"listen": "127.0.0.1:0"}
    clock = WallClock()
    app = EdgeApp(load_site(table), table, clock=clock)
    runner = asyncio.create_task(app.run())
    await asyncio.wait_for(app.ready.wait(), 20)
    ctrl = app.controller
    prefix = app.central.config.path_prefix
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{app.central.port}{prefix}")
    try:
        await rig.start()
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.accepted and c.transaction_id for c in ctrl.state.chargers.values()),
            30,
            "TxProfiles accepted",
        )
        await rig.fleet.stop()  # the stations go away; their sessions stay open at the edge
        await asyncio.sleep(20.0)  # past the next refresh instant
        s1 = await scrape(app.metrics_port)
        await asyncio.sleep(2.0)
        s2 = await scrape(app.metrics_port)
        assert s2.value("evcore_ocpp_stations_connected") == 0
        per_s = (s2.value("evcore_decisions_total") - s1.value("evcore_decisions_total")) / 2.0
        assert per_s < 10, f"{per_s:.0f} decisions/s with tick_s = 0.5"
    finally:
        await rig.stop()
        app.stop()
        await asyncio.wait_for(runner, 20)


async def test_an_edges_endpoint_with_a_token_over_https(tmp_path: Path) -> None:
    """``[metrics] token_file`` and TLS files reach the edge's endpoint: HTTPS with the CA and
    the token gets the edge's metrics; without the token, 401; plain HTTP, no answer."""
    ca = cert_authority(tmp_path, "edge metrics CA")
    cert, key = ca.issue("edge-metrics", server=True)
    token = tmp_path / "metrics.token"
    token.write_text("edge-scrape-token\n")
    token.chmod(0o600)
    table = depot_table(2, per_feeder=2, site_id="tls-depot")
    table["metrics"] = {
        "listen": "127.0.0.1:0",
        "token_file": str(token),
        "tls_cert_file": cert,
        "tls_key_file": key,
    }
    app = EdgeApp(load_site(table), table, clock=WallClock())
    runner = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 20)
        port = app.metrics_port
        tls = ssl.create_default_context(cafile=str(ca.ca_path))
        s = await scrape(port, token="edge-scrape-token", tls=tls)
        assert s.value("evcore_chargers") == 2
        assert s.value("evcore_metrics_scrapes_refused_total", reason="missing") == 0
        assert (await get(port, tls=tls)).status == 401
        assert (await get(port, token="edge-scrape-token2", tls=tls)).status == 401
        await no_http_answer(port, None)  # plain HTTP
        s = await scrape(port, token="edge-scrape-token", tls=tls)
        assert s.by("evcore_metrics_scrapes_refused_total", "reason") == {
            "missing": 1,
            "wrong": 1,
        }
    finally:
        app.stop()
        await asyncio.wait_for(runner, 20)


def test_evcore_edge_refuses_a_missing_token_file_naming_the_key(tmp_path: Path) -> None:
    metrics = {"listen": "127.0.0.1:0", "token_file": str(tmp_path / "absent.token")}
    assert "[metrics].token_file: no such file" in _evcore_edge_refuses(metrics, tmp_path)
