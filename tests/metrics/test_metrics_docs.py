"""docs/metrics.md names what the endpoints serve, no more and no less: each metric table's
names, types and labels against a real scrape of a running ``EdgeApp`` with ``[metrics]`` (a
token, a store, a NATS bus on the shared nats-server and ``[api]``, so every conditional family
is served) and of a real ``CloudApiServer``; every ``evcore_…`` name the page mentions anywhere
is served by one of them. Before, nothing compared them: the page said the skipped values'
``measurand`` was one of five while the central system counted ``unknown`` and any OCPP
measurand (b7c6ff4), and ``evcore_metrics_scrapes_refused_total`` was in no table."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from bus_testkit import SHARED_NATS, make_nats_bus, unique_site
from evcore.clock import WallClock
from evcore.cloud import CloudApiServer, CloudConfig, open_cloud_store
from evcore.edge.sitegen import depot_table
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from metrics_testkit import Scrape, ocpp16_reading, ocpp16_station, running_edge, scrape

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
TOKEN = "docs-scrape-token"
_ROW = re.compile(r"^\| `(evcore_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", re.M)


def _tables(start: str, end: str) -> dict[str, tuple[str, frozenset[str]]]:
    """The metric tables between the headings ``start`` and ``end``: name -> (type, label
    names); a label's values in parentheses after it are not labels."""
    text = DOC.read_text(encoding="utf-8")
    part = text[text.index(start) : text.index(end)]
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for name, kind, labels in _ROW.findall(part):
        assert name not in out, f"{name} documented twice"
        out[name] = (kind, frozenset(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels))))
    return out


def _example_helps_are_served(served: Scrape) -> None:
    """The ``# HELP`` lines of the page's example scrapes that name a family ``served`` has are
    the text it serves."""
    helps = re.findall(r"^# HELP (\S+) (.*)$", DOC.read_text(encoding="utf-8"), re.M)
    assert {n: h for n, h in helps if n in served.helps} == {
        n: served.helps[n] for n, _ in helps if n in served.helps
    }


def _check(doc: dict[str, tuple[str, frozenset[str]]], served: Scrape) -> int:
    """The tables say what the scrape serves; how many labelled families had samples to check
    their labels on."""
    assert set(served.types) - set(doc) == set(), "served, not documented"
    assert set(doc) - set(served.types) == set(), "documented, not served"
    assert {n: k for n, (k, _) in doc.items()} == served.types
    checked = 0
    for name, (_, labels) in doc.items():
        seen = {frozenset(k for k, _ in key) for key in served.series(name)}
        assert seen in (set(), {labels}), (name, labels, seen)
        checked += bool(seen and labels)
    return checked


async def test_the_edge_metric_tables_are_what_an_edge_serves(tmp_path: Path) -> None:
    token = tmp_path / "metrics.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    site = unique_site()
    table = depot_table(2, per_feeder=2, site_id=site)
    table["edge"] = {"audit_journal": str(tmp_path / "journal")}
    table["metrics"] = {"listen": "127.0.0.1:0", "token_file": str(token)}
    table["api"] = {
        "listen": "127.0.0.1:0",
        "tokens": [{"name": "noc", "token": "noc-token-0123456789", "roles": ["viewer"]}],
    }
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    # A NatsBus (the shared nats-server): it serves its outbox's cap, the in-process bus none.
    bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox")
    try:
        async with (
            running_edge(table, store=store, bus=bus) as app,
            ocpp16_station(app, "CP0001") as station,
        ):
            # A series of the families that have one only once something happened.
            mv = {"connectorId": 1, "meterValue": ocpp16_reading(app.clock.now() - 1, "")}
            assert (await station.call("MeterValues", mv))[0] == 3
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.api_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await pb_grpc.EdgeApiStub(channel).GetSiteState(pb.GetSiteStateRequest())
            now = app.clock.now()
            await app.facade.post_curtailment("dso-1", "grid", 50.0, now, now + 60.0)
            served = await scrape(app.metrics_port, token=TOKEN)
    finally:
        cleanup = make_nats_bus(site, SHARED_NATS, tmp_path / "cleanup")
        await cleanup.start()
        await cleanup.delete_streams()
        await cleanup.close()
    checked = _check(_tables("## Metrics\n", "### Alerts worth having"), served)
    for name in (
        "evcore_ocpp_values_skipped_total",
        "evcore_api_calls_refused_total",
        "evcore_metrics_scrapes_refused_total",
        "evcore_node_curtailment_cap_watts",
        "evcore_charger_current_amperes",
        "evcore_edge_info",
    ):
        assert served.series(name), f"{name}: no series to check its labels on"
    assert checked >= 15, checked  # 18 here: all but the DC ones and, at times, a setpoint
    # Every name the page mentions (prose, alerts, the example runs) is served by the edge or
    # the cloud (whose names are checked below).
    mentioned = set(re.findall(r"\bevcore_[a-z0-9_]*[a-z0-9]", DOC.read_text(encoding="utf-8")))
    cloud = _tables("## The cloud service", "## For developers")
    assert mentioned - set(served.types) - set(cloud) == set()
    _example_helps_are_served(served)


async def test_the_cloud_metric_table_is_what_the_cloud_serves(tmp_path: Path) -> None:
    token = tmp_path / "metrics.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    cfg = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "insecure": True,
            "store": {"url": "sqlite:store"},
            "metrics": {"listen": "127.0.0.1:0", "token_file": str(token)},
        },
        tmp_path,
    )
    server = CloudApiServer(cfg, open_cloud_store(cfg.store_url), clock=WallClock())
    await server.start()
    try:
        served = await scrape(server.metrics_port, token=TOKEN)
    finally:
        await server.stop()
    doc = _tables("## The cloud service", "## For developers")
    doc |= _tables("### The endpoint", "### Alerts worth having")
    assert _check(doc, served) >= 1  # the endpoint's reasons
    _example_helps_are_served(served)
