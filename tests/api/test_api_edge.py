"""The edge API over a real socket: reads, steering, grid signals, the change stream, health and
reflection, and every denial (UNAUTHENTICATED / PERMISSION_DENIED, with nothing changed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from api_test_facade import StoreFacade
from evcore.api import ApiConfig, ApiConfigError, AuthConfigError, EdgeApiServer, token_sha256
from evcore.audit import AuditLog, Decision
from evcore.clock import ManualClock
from evcore.store import SessionRecord, SqlStore, open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from evcore.v1.grid_pb2 import Curtailment, GridSignal, PriceUpdate
from evcore.v1.setpoint_pb2 import Setpoint
from evcore.v1.tariff_pb2 import PriceInterval, Tariff
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-0123456789"
GRID = "grid-operator-token-0123456789"
BOTH = "ops-and-grid-token-0123456789"
REASON = "held at 16 A: feeder F2 phase L1 at 63 of 63 A"


@dataclass
class Edge:
    server: EdgeApiServer
    facade: StoreFacade
    store: SqlStore
    clock: ManualClock
    channel: grpc.aio.Channel
    stub: pb_grpc.EdgeApiStub


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@contextlib.asynccontextmanager
async def serving(store: SqlStore, tmp_path: Path, *, seed: bool = True) -> AsyncIterator[Edge]:
    """An API server on 127.0.0.1 over ``store`` (seeded with two sessions, two setpoints and
    three decisions unless ``seed`` is false) and a client channel to it; ``store`` is closed
    at the end."""
    clock = ManualClock()
    facade = StoreFacade(store, clock)
    if seed:
        await store.open()
        await store.upsert_session(
            SessionRecord("S1", "C1", clock.now() - 600, transaction_id="T1", priority=1.0)
        )
        await store.upsert_session(
            SessionRecord("S2", "DC1", clock.now() - 60, transaction_id="T2", priority=1.0)
        )
        await store.record_setpoint_sent(
            Setpoint(charger_id="C1", setpoint_a=16.0, decision_id="D1"), clock.now()
        )
        await store.confirm_setpoint("C1", "D1", clock.now())
        await store.record_setpoint_sent(
            Setpoint(charger_id="DC1", setpoint_w=50_000.0, decision_id="D1"), clock.now()
        )
        log = AuditLog(store, clock=clock)
        for i in range(3):
            clock.advance(5)
            await log.append(
                Decision(
                    f"D{i}",
                    "tick",
                    setpoints=[
                        Setpoint(
                            charger_id="C1" if i != 1 else "C2", setpoint_a=16.0, reason=REASON
                        )
                    ],
                )
            )
    (tmp_path / "tokens.toml").write_text(
        f'[[tokens]]\nname = "grid"\ntoken_sha256 = "{token_sha256(GRID)}"\n'
        'roles = ["grid_operator"]\n'
    )
    config = ApiConfig.from_section(
        {
            "listen": "127.0.0.1:0",
            "tokens": [
                {"name": "dashboard", "token_sha256": token_sha256(VIEWER), "roles": ["viewer"]},
                {"name": "alice", "token": OPERATOR, "roles": ["operator"]},
                {"name": "ops", "token": BOTH, "roles": ["operator", "grid_operator"]},
            ],
            "tokens_file": "tokens.toml",
        },
        tmp_path,
    )
    server = EdgeApiServer(facade, config, site_id="depot", clock=clock, store=store)
    try:
        port = await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Edge(server, facade, store, clock, channel, pb_grpc.EdgeApiStub(channel))
        finally:
            await channel.close()
            await server.stop(0.5)
    finally:
        await store.close()


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[Edge]:
    async with serving(open_store({"path": str(tmp_path / "store")}, tmp_path), tmp_path) as e:
        yield e


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code()


async def test_viewer_reads_everything(edge: Edge) -> None:
    md = auth(VIEWER)
    state = await edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=md)
    assert state.site_id == "depot" and state.policy == "fair" and state.decision_count == 3
    by = {c.charger_id: c for c in state.chargers}
    assert by["C1"].setpoint_a == 16.0 and by["C1"].accepted and by["C1"].transaction_id == "T1"
    assert by["DC1"].setpoint_w == 50_000.0 and not by["DC1"].HasField("setpoint_a")
    assert list(by["C1"].measured_current_a) == [15.0, 15.5, 16.0]
    assert {
        f.charger_id: f.level_w if f.HasField("level_w") else f.level_a
        for f in state.failsafe_levels
    } == {"C1": 6.0, "C2": 0.0, "DC1": 0.0}

    sessions = await edge.stub.ListSessions(pb.ListSessionsRequest(), metadata=md)
    assert [(s.charger_id, s.transaction_id) for s in sessions.sessions] == [
        ("C1", "T1"),
        ("DC1", "T2"),
    ]
    only = await edge.stub.ListSessions(pb.ListSessionsRequest(charger_id="DC1"), metadata=md)
    assert [s.charger_id for s in only.sessions] == ["DC1"]

    setpoints = await edge.stub.ListSetpoints(pb.ListSetpointsRequest(), metadata=md)
    sp = {s.charger_id: s for s in setpoints.setpoints}
    assert sp["C1"].setpoint_a == 16.0 and sp["C1"].accepted and sp["C1"].failsafe_a == 6.0
    assert sp["DC1"].setpoint_w == 50_000.0 and not sp["DC1"].accepted

    nodes = await edge.stub.GetNodeUtilisation(pb.GetNodeUtilisationRequest(), metadata=md)
    util = {n.node_id: n.utilisation_ratio for n in nodes.nodes}
    assert util["F1"] == pytest.approx(16.0 / 16.0)  # phase L3 of F1 is at its limit
    assert util["GRID"] == pytest.approx(59.0 / 60.0)  # power, not current, is the closest

    decisions = await edge.stub.ListDecisions(pb.ListDecisionsRequest(charger_id="C1"), metadata=md)
    assert [d.decision_id for d in decisions.decisions] == ["D2", "D0"]  # newest first
    assert decisions.decisions[0].setpoints[0].reason == REASON
    since = pb.ListDecisionsRequest(limit=5)
    since.since.FromSeconds(int(edge.clock.now()) - 5)
    recent = await edge.stub.ListDecisions(since, metadata=md)
    assert [d.decision_id for d in recent.decisions] == ["D2", "D1"]


async def test_missing_or_bad_credentials_are_unauthenticated(edge: Edge) -> None:
    req = pb.GetSiteStateRequest()
    assert await code_of(edge.stub.GetSiteState(req)) == grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(edge.stub.GetSiteState(req, metadata=auth("not-a-token-at-all"))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert await code_of(edge.stub.GetSiteState(req, metadata=(("authorization", VIEWER),))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    steer = pb.SetChargerAvailabilityRequest(charger_id="C1", available=False)
    assert await code_of(edge.stub.SetChargerAvailability(steer)) == grpc.StatusCode.UNAUTHENTICATED
    assert edge.facade.chargers["C1"]["available"] is True
    assert edge.server.auth.unauthenticated == 4


async def test_each_denial_changes_nothing(edge: Edge) -> None:
    denied = grpc.StatusCode.PERMISSION_DENIED
    before_sessions = await edge.store.list_open_sessions()
    signal = GridSignal(
        signal_id="g1", curtailment=Curtailment(curtailment_id="c1", node_id="GRID", max_kw=40)
    )
    signal.curtailment.start.FromSeconds(int(edge.clock.now()))
    signal.curtailment.end.FromSeconds(int(edge.clock.now()) + 3600)
    departure = pb.SetSessionDepartureRequest(charger_id="C1")
    departure.departure.FromSeconds(int(edge.clock.now()) + 7200)
    steering = [
        (
            edge.stub.SetChargerAvailability,
            pb.SetChargerAvailabilityRequest(charger_id="C1", available=False),
        ),
        (edge.stub.SetSessionPriority, pb.SetSessionPriorityRequest(charger_id="C1", priority=5.0)),
        (edge.stub.SetSessionDeparture, departure),
        (edge.stub.ClearChargerFault, pb.ClearChargerFaultRequest(charger_id="C1")),
    ]
    edge.facade.chargers["C1"]["faulted"] = True
    for token in (VIEWER, GRID):  # neither a viewer nor a grid operator steers
        for method, request in steering:
            assert await code_of(method(request, metadata=auth(token))) == denied
    for token in (VIEWER, OPERATOR):  # only a grid operator posts grid signals
        req = pb.PostGridSignalRequest(signal=signal)
        assert await code_of(edge.stub.PostGridSignal(req, metadata=auth(token))) == denied
    reads = [
        (edge.stub.GetSiteState, pb.GetSiteStateRequest()),
        (edge.stub.ListSessions, pb.ListSessionsRequest()),
        (edge.stub.ListSetpoints, pb.ListSetpointsRequest()),
        (edge.stub.GetNodeUtilisation, pb.GetNodeUtilisationRequest()),
        (edge.stub.ListDecisions, pb.ListDecisionsRequest()),
    ]
    for method, request in reads:  # a grid operator token reads nothing
        assert await code_of(method(request, metadata=auth(GRID))) == denied
    watch = edge.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(GRID))
    assert await code_of(watch.read()) == denied
    assert edge.server.auth.denied == 8 + 2 + 5 + 1
    # Nothing changed.
    assert edge.facade.chargers["C1"]["available"] is True
    assert edge.facade.chargers["C1"]["faulted"] is True
    assert edge.facade.curtailments == {}
    assert await edge.store.list_open_sessions() == before_sessions


async def test_operator_steers_and_bad_requests_name_the_problem(edge: Edge) -> None:
    md = auth(OPERATOR)
    res = await edge.stub.SetChargerAvailability(
        pb.SetChargerAvailabilityRequest(charger_id="C2", available=False, reason="cable damaged"),
        metadata=md,
    )
    assert (
        "C2 set unavailable" in res.detail
        and "alice" in res.detail
        and "cable damaged" in res.detail
    )
    assert edge.facade.chargers["C2"]["available"] is False

    await edge.stub.SetSessionPriority(
        pb.SetSessionPriorityRequest(charger_id="C1", priority=3.5), metadata=md
    )
    s1 = await edge.store.get_session("S1")
    assert s1 is not None and s1.priority == 3.5

    dep = pb.SetSessionDepartureRequest(
        charger_id="C1", transaction_id="T1", energy_requested_kwh=30.0
    )
    dep.departure.FromSeconds(int(edge.clock.now()) + 7200)
    await edge.stub.SetSessionDeparture(dep, metadata=md)
    s1 = await edge.store.get_session("S1")
    assert (
        s1 is not None
        and s1.departure_s == int(edge.clock.now()) + 7200
        and s1.energy_requested_kwh == 30.0
    )

    # A stale request (the transaction has changed) does nothing.
    stale = pb.SetSessionPriorityRequest(charger_id="C1", transaction_id="T0", priority=9.0)
    assert (
        await code_of(edge.stub.SetSessionPriority(stale, metadata=md))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    no_session = pb.SetSessionPriorityRequest(charger_id="C2", priority=2.0)
    assert (
        await code_of(edge.stub.SetSessionPriority(no_session, metadata=md))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    unknown = pb.SetChargerAvailabilityRequest(charger_id="C99", available=False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.SetChargerAvailability(unknown, metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "C99" in (err.value.details() or "")
    for value in (float("nan"), 0.0, 1e9, 1e-9):
        bad = pb.SetSessionPriorityRequest(charger_id="C1", priority=value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await edge.stub.SetSessionPriority(bad, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in (
            err.value.details() or ""
        )
    early = pb.SetSessionDepartureRequest(charger_id="C1")
    early.departure.FromSeconds(int(edge.clock.now()) - 3600)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.SetSessionDeparture(early, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not after now" in (
        err.value.details() or ""
    )
    s1 = await edge.store.get_session("S1")
    assert s1 is not None and s1.priority == 3.5 and s1.departure_s == int(edge.clock.now()) + 7200


async def test_grid_operator_posts_curtailments_and_prices(edge: Edge) -> None:
    md = auth(GRID)
    now = int(edge.clock.now())
    sig = GridSignal(
        signal_id="dso-7", curtailment=Curtailment(curtailment_id="c7", node_id="GRID", max_kw=40.0)
    )
    sig.curtailment.start.FromSeconds(now + 600)
    sig.curtailment.end.FromSeconds(now + 4200)
    res = await edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=sig), metadata=md)
    assert res.signal_id == "c7" and "at most 40 kW at GRID" in res.detail
    assert edge.facade.curtailments["c7"] == ("GRID", 40.0, now + 600, now + 4200)

    backwards = GridSignal(
        curtailment=Curtailment(curtailment_id="c8", node_id="GRID", max_kw=40.0)
    )
    backwards.curtailment.start.FromSeconds(now + 600)
    backwards.curtailment.end.FromSeconds(now)
    req = pb.PostGridSignalRequest(signal=backwards)
    assert (
        await code_of(edge.stub.PostGridSignal(req, metadata=md))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    elsewhere = GridSignal(curtailment=Curtailment(curtailment_id="c9", node_id="NOPE", max_kw=1.0))
    elsewhere.curtailment.start.FromSeconds(now)
    elsewhere.curtailment.end.FromSeconds(now + 60)
    req = pb.PostGridSignalRequest(signal=elsewhere)
    assert await code_of(edge.stub.PostGridSignal(req, metadata=md)) == grpc.StatusCode.NOT_FOUND
    assert sorted(edge.facade.curtailments) == ["c7"]

    cancel = GridSignal(curtailment=Curtailment(curtailment_id="c7", cancelled=True))
    res = await edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=cancel), metadata=md)
    assert "cancelled" in res.detail and edge.facade.curtailments == {}

    tariff = Tariff(
        tariff_id="day-ahead",
        prices=[
            PriceInterval(duration_s=3600, price_per_kwh=0.30),
            PriceInterval(duration_s=3600, price_per_kwh=0.10),
        ],
    )
    tariff.prices[0].start.FromSeconds(now + 3600)
    tariff.prices[1].start.FromSeconds(now)
    prices = GridSignal(signal_id="p1", price_update=PriceUpdate(tariff=tariff))
    await edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=prices), metadata=auth(BOTH))
    assert edge.facade.prices == [(now, 0.10), (now + 3600, 0.30)]
    empty = pb.PostGridSignalRequest(signal=GridSignal(signal_id="x"))
    assert (
        await code_of(edge.stub.PostGridSignal(empty, metadata=md))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_watch_streams_changes(edge: Edge) -> None:
    call = edge.stub.WatchChanges(pb.WatchChangesRequest(charger_id="C1"), metadata=auth(VIEWER))
    # Wait until the server has subscribed to the facade before making changes.
    for _ in range(200):
        if edge.facade._watchers:
            break
        await asyncio.sleep(0.01)
    assert edge.facade._watchers
    edge.facade.emit(
        {"kind": "setpoint", "charger_id": "C2", "value": 8.0, "decision": 9}
    )  # filtered
    edge.facade.emit(
        {"kind": "setpoint", "charger_id": "C1", "purpose": "tx", "value": 10.0, "decision": 9}
    )
    edge.facade.emit({"kind": "decision", "decision": 9})
    other = edge.stub.WatchChanges(pb.WatchChangesRequest(charger_id="DC1"), metadata=auth(VIEWER))
    for _ in range(200):
        if len(edge.facade._watchers) == 2:
            break
        await asyncio.sleep(0.01)
    edge.facade.emit({"kind": "setpoint", "charger_id": "DC1", "value": 22_000.0, "decision": 10})
    dc = await asyncio.wait_for(other.read(), 5)
    assert dc.setpoint_w == 22_000.0 and not dc.HasField("setpoint_a")  # unit from the charger
    other.cancel()
    await edge.stub.SetChargerAvailability(
        pb.SetChargerAvailabilityRequest(charger_id="C1", available=False), metadata=auth(OPERATOR)
    )
    got = [await asyncio.wait_for(call.read(), 5) for _ in range(3)]
    assert [(c.kind, c.charger_id) for c in got[:2]] == [("setpoint", "C1"), ("decision", "")]
    assert got[0].setpoint_a == 10.0 and got[0].decision_id == "9" and got[0].purpose == "tx"
    assert got[2].kind == "availability" and "alice" in got[2].detail
    call.cancel()
    for _ in range(200):
        if not edge.facade._watchers:
            break
        await asyncio.sleep(0.01)
    assert not edge.facade._watchers  # the server let go of the feed
    # Nor does an ended watch leave its pending queue read behind (one task per watch, each
    # logged "Task was destroyed but it is pending!" when collected).
    await asyncio.sleep(0.05)
    left = [t for t in asyncio.all_tasks() if "Queue.get" in repr(t.get_coro()) and not t.done()]
    assert left == []


async def test_a_time_out_of_range_is_refused_before_anything_is_applied(edge: Edge) -> None:
    """Review of session 13: a millisecond epoch sent as seconds was applied, then the reply's
    text failed on it: INTERNAL, while the departure or curtailment was in force."""
    far = 1_700_000_000_000_000  # past year 9999
    dep = pb.SetSessionDepartureRequest(charger_id="C1")
    dep.departure.seconds = far
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.SetSessionDeparture(dep, metadata=auth(OPERATOR))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "departure is out of range" in (err.value.details() or "")
    s1 = await edge.store.get_session("S1")
    assert s1 is not None and s1.departure_s is None
    now = int(edge.clock.now())
    sig = GridSignal(curtailment=Curtailment(curtailment_id="c1", node_id="GRID", max_kw=5.0))
    sig.curtailment.start.FromSeconds(now)
    sig.curtailment.end.seconds = far
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=sig), metadata=auth(GRID))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "curtailment end is out of range" in (err.value.details() or "")
    assert edge.facade.curtailments == {}
    bad_nanos = pb.SetSessionDepartureRequest(charger_id="C1")
    bad_nanos.departure.seconds = now + 3600
    bad_nanos.departure.nanos = -5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.SetSessionDeparture(bad_nanos, metadata=auth(OPERATOR))
    assert "departure.nanos" in (err.value.details() or "")
    tariff = Tariff(tariff_id="t", prices=[PriceInterval(duration_s=3600, price_per_kwh=0.1)])
    tariff.prices[0].start.seconds = -far
    prices = GridSignal(signal_id="p", price_update=PriceUpdate(tariff=tariff))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.PostGridSignal(pb.PostGridSignalRequest(signal=prices), metadata=auth(GRID))
    assert "prices[0].start is out of range" in (err.value.details() or "")
    assert edge.facade.prices == []
    since = pb.ListDecisionsRequest()
    since.since.seconds = far
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.ListDecisions(since, metadata=auth(VIEWER))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_is_open_and_reflection_needs_a_token(edge: Edge) -> None:
    health = health_pb2_grpc.HealthStub(edge.channel)
    for service in ("", "evcore.v1.EdgeApi"):
        res = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert res.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(edge.channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")

    async def ask(md: Any) -> reflection_pb2.ServerReflectionResponse:
        call = refl.ServerReflectionInfo(iter([req]), metadata=md)
        async for res in call:
            return res
        raise AssertionError("no reflection answer")

    names = {s.name for s in (await ask(auth(VIEWER))).list_services_response.service}
    assert "evcore.v1.EdgeApi" in names and "grpc.health.v1.Health" in names
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ask(None)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_config_errors_name_the_entry(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="unknown role"):
        ApiConfig.from_section({"tokens": [{"token": OPERATOR, "roles": ["admin"]}]}, tmp_path)
    with pytest.raises(AuthConfigError, match="exactly one of token_sha256 or token"):
        ApiConfig.from_section({"tokens": [{"roles": ["viewer"]}]}, tmp_path)
    with pytest.raises(AuthConfigError, match="at least 16"):
        ApiConfig.from_section({"tokens": [{"token": "short", "roles": ["viewer"]}]}, tmp_path)
    with pytest.raises(AuthConfigError, match="cannot read tokens file"):
        ApiConfig.from_section({"tokens_file": "missing.toml"}, tmp_path)
    with pytest.raises(ApiConfigError, match="unknown key"):
        ApiConfig.from_section({"port": 1}, tmp_path)
    with pytest.raises(ApiConfigError, match="client_ca_file"):
        ApiConfig.from_section({"clients": [{"common_name": "x", "roles": ["viewer"]}]}, tmp_path)


async def test_a_failing_facade_gives_internal_not_a_traceback(edge: Edge) -> None:
    edge.facade.broken = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.GetNodeUtilisation(pb.GetNodeUtilisationRequest(), metadata=auth(VIEWER))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "node model not loaded" in (err.value.details() or "")
    # The server lives on.
    state = await edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=auth(VIEWER))
    assert state.site_id == "depot"


async def test_unmeasured_phases_and_a_conversion_bug(edge: Edge) -> None:
    md = auth(VIEWER)
    edge.facade.chargers["C2"]["measured_a"] = [None, 7.5, None]  # one phase measured so far
    state = await edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=md)
    c2 = next(c for c in state.chargers if c.charger_id == "C2")
    got = list(c2.measured_current_a)
    assert len(got) == 3 and got[1] == 7.5 and got[0] != got[0] and got[2] != got[2]  # NaN
    edge.facade.chargers["C2"]["measured_a"] = [None, None, None]  # never measured
    state = await edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=md)
    c2 = next(c for c in state.chargers if c.charger_id == "C2")
    assert list(c2.measured_current_a) == []

    # Data the conversion cannot read is a logged INTERNAL, not gRPC's bare UNKNOWN.
    edge.facade.site_state = lambda: {"faults": [42]}  # type: ignore[method-assign,assignment,return-value]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=md)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "GetSiteState failed" in (err.value.details() or "")


async def test_a_request_that_does_not_decode_is_invalid_argument_and_the_server_lives_on(
    edge: Edge,
) -> None:
    """Before: gRPC's bare UNKNOWN "Unexpected DecodeError". The caller's identity is checked
    first: without a token it stays UNAUTHENTICATED, whatever the bytes."""
    raw = edge.channel.unary_unary("/evcore.v1.EdgeApi/GetSiteState")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await raw(b"\xff\xff\xff\xff", metadata=auth(VIEWER))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message (4 bytes)" in str(bad.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as anon:
        await raw(b"\xff\xff\xff\xff")
    assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
    state = await edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=auth(VIEWER))
    assert state.site_id


@pytest.mark.parametrize(("listen", "warned"), [("0.0.0.0:0", True), ("127.0.0.1:0", False)])
async def test_tokens_on_a_network_address_without_tls_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, listen: str, warned: bool
) -> None:
    """Review of session 13: the production example served bearer tokens on 0.0.0.0 in clear
    text, against docs/api.md, and nothing said so."""
    config = ApiConfig.from_section(
        {"listen": listen, "tokens": [{"token": OPERATOR, "roles": ["operator"]}]}, tmp_path
    )
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    server = EdgeApiServer(
        StoreFacade(store, ManualClock()), config, site_id="s", clock=ManualClock(), store=store
    )
    with caplog.at_level("WARNING", logger="evcore.api"):
        await server.start()
    try:
        assert ("in clear text" in caplog.text) == warned
    finally:
        await server.stop()
        await store.close()
