"""Which status code a failure behind the edge API reaches the caller as, over a real socket.

A missing charger or node (the facade's ``UnknownTarget``) is NOT_FOUND, a bad value
(``FacadeError``) INVALID_ARGUMENT; a store that cannot be reached is UNAVAILABLE, naming the store
(clients retry on it); anything else is a bug: INTERNAL, with its traceback in the log. Review of
the API's error mapping: a KeyError or IndexError from a bug was NOT_FOUND with a bare key as its
message, a ValueError from a bug INVALID_ARGUMENT, both unlogged; PostgreSQL down was INTERNAL; a
change feed that failed was UNAVAILABLE without a traceback and one that ended was a clean end.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from evcore.api import FacadeError
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from pg_testkit import TcpRelay
from test_api_edge import OPERATOR, VIEWER, Edge, auth, serving

API_LOG = "evcore.api"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Edge]:
    """The API on the seeded embedded store (``test_api_edge.edge``)."""
    async with serving(open_store({"path": str(tmp_path / "store")}, tmp_path), tmp_path) as e:
        yield e


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == API_LOG and r.exc_info is not None]


def _key_error() -> Any:
    return {}["transaction_id"]


def _index_error() -> Any:
    return [][0]


@pytest.mark.parametrize(
    ("bug", "error"),
    [(_key_error, "KeyError"), (_index_error, "IndexError")],
    ids=["KeyError", "IndexError"],
)
async def test_a_lookup_error_from_a_bug_is_internal_and_logged_not_found_is_a_missing_target(
    api: Edge, caplog: pytest.LogCaptureFixture, bug: Any, error: str
) -> None:
    """Before: NOT_FOUND, the message a bare key ('transaction_id') or 'list index out of range',
    nothing logged: a caller was told the charger does not exist."""
    api.facade.sessions = bug  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger=API_LOG):
        err = await _failure(api.stub.ListSessions(pb.ListSessionsRequest(), metadata=auth(VIEWER)))
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert f"{bug.__name__} failed: {error}(" in (err.details() or "")
    assert len(_tracebacks(caplog)) == 1
    # A charger that does not exist is still NOT_FOUND, naming it, and nothing is logged for it.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=API_LOG):
        err = await _failure(
            api.stub.SetChargerAvailability(
                pb.SetChargerAvailabilityRequest(charger_id="C99", available=False),
                metadata=auth(OPERATOR),
            )
        )
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == "unknown charger_id 'C99'"
    assert _tracebacks(caplog) == []


async def test_a_value_error_from_a_bug_is_internal_and_logged_a_facade_error_invalid_argument(
    api: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: INVALID_ARGUMENT "could not convert string to float: 'on'", nothing logged: the
    caller was told its request was wrong, and would not know to report it."""

    def set_availability(charger_id: str, available: bool) -> None:
        float("on")  # a bug behind the facade

    api.facade.set_availability = set_availability  # type: ignore[method-assign,assignment]
    request = pb.SetChargerAvailabilityRequest(charger_id="C1", available=False)
    with caplog.at_level(logging.ERROR, logger=API_LOG):
        err = await _failure(api.stub.SetChargerAvailability(request, metadata=auth(OPERATOR)))
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert "set_availability failed: ValueError" in (err.details() or "")
    assert len(_tracebacks(caplog)) == 1
    # The facade's own refusal of a value stays INVALID_ARGUMENT, unlogged.
    caplog.clear()

    async def set_departure(
        charger_id: str, departure: float, energy_requested_kwh: float | None = None
    ) -> None:
        raise FacadeError(f"departure for {charger_id} is before the session started")

    api.facade.set_departure = set_departure  # type: ignore[method-assign,assignment]
    early = pb.SetSessionDepartureRequest(charger_id="C1")
    early.departure.FromSeconds(int(api.clock.now()) + 3600)
    with caplog.at_level(logging.ERROR, logger=API_LOG):
        err = await _failure(api.stub.SetSessionDeparture(early, metadata=auth(OPERATOR)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "before" in (err.details() or "")
    assert _tracebacks(caplog) == []


@pytest.fixture
async def relay() -> AsyncIterator[TcpRelay]:
    r = TcpRelay()
    await r.start()
    yield r
    r.cut()


async def test_postgresql_going_away_is_unavailable_naming_the_store_and_a_retry_then_works(
    relay: TcpRelay, pg_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The edge's PostgreSQL store goes away while the API serves, then comes back. Before: the
    decisions (read from the store by the API) and the site state (read by the facade) were
    INTERNAL "ListDecisions failed: StoreUnavailable(...)", which clients do not retry."""
    section = {"kind": "postgres", "dsn": relay.dsn(), "schema": pg_schema}
    store = open_store(section, tmp_path)
    async with serving(store, tmp_path) as edge:
        md = auth(VIEWER)
        got = await edge.stub.ListDecisions(pb.ListDecisionsRequest(), metadata=md)
        assert len(got.decisions) == 3

        relay.cut()
        with caplog.at_level(logging.WARNING, logger=API_LOG):
            for call in (
                edge.stub.ListDecisions(pb.ListDecisionsRequest(), metadata=md),
                edge.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=md),
                edge.stub.ListSessions(pb.ListSessionsRequest(), metadata=md),
            ):
                err = await _failure(call)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "PostgreSQL store" in (err.details() or "")
                assert pg_schema in (err.details() or "")
        # Logged once per call, as an outage rather than a bug (no traceback).
        warned = [r for r in caplog.records if r.name == API_LOG and "unavailable" in r.message]
        assert len(warned) == 3 and _tracebacks(caplog) == []

        await relay.restore()
        got = await edge.stub.ListDecisions(pb.ListDecisionsRequest(), metadata=md)
        assert [d.decision_id for d in got.decisions] == ["D2", "D1", "D0"]


async def test_an_embedded_store_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    """The SQLite file cannot be opened (here: its path is a directory). Before: INTERNAL."""
    (tmp_path / "store" / "records.sqlite").mkdir(parents=True)
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    async with serving(store, tmp_path, seed=False) as edge:
        err = await _failure(
            edge.stub.ListDecisions(pb.ListDecisionsRequest(), metadata=auth(VIEWER))
        )
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "records.sqlite" in (err.details() or "")


async def test_a_store_bug_stays_internal_and_logged(
    api: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    """A store closed under a serving API is a bug of the shutdown order, not an outage."""
    await api.store.close()
    with caplog.at_level(logging.ERROR, logger=API_LOG):
        err = await _failure(
            api.stub.ListDecisions(pb.ListDecisionsRequest(), metadata=auth(VIEWER))
        )
    assert err.code() == grpc.StatusCode.INTERNAL, err.details()
    assert len(_tracebacks(caplog)) == 1


def _feed_of(api: Edge, items: list[Mapping[str, Any]], end: BaseException | None) -> None:
    """The facade's change feed: ``items``, then ``end`` raised (or the feed ends, when None)."""

    async def watch() -> AsyncIterator[Mapping[str, Any]]:
        for item in items:
            yield item
        if end is not None:
            raise end

    api.facade.watch = watch  # type: ignore[method-assign]


async def test_a_change_feed_that_fails_by_a_bug_is_internal_and_logged(
    api: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: UNAVAILABLE "change feed ended" (a client would resubscribe into the same bug for
    ever) and only the exception's repr in the log."""
    _feed_of(api, [{"kind": "decision", "decision": 7}], KeyError("charger_id"))
    got = []
    with caplog.at_level(logging.ERROR, logger=API_LOG):
        call = api.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for change in call:
                got.append(change.decision_id)
    assert got == ["7"]  # what the feed gave before it failed still went out
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert "KeyError('charger_id')" in (err.value.details() or "")
    assert len(_tracebacks(caplog)) == 1


@pytest.mark.parametrize("end", [None, "store"], ids=["ended", "store-unavailable"])
async def test_a_change_feed_that_ends_or_loses_its_store_is_unavailable(
    api: Edge, end: str | None
) -> None:
    """Before: a feed that ended was a clean end of the stream (OK: "there is no more"), though
    the edge's changes go on (a client is to watch again); one that lost its store was only
    "change feed ended"; and either lost the change it gave last."""
    from evcore.store import StoreUnavailable

    exc = StoreUnavailable("SQLite store records.sqlite: disk I/O error") if end else None
    _feed_of(api, [{"kind": "decision", "decision": 7}], exc)
    call = api.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(VIEWER))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for change in call:
            got.append(change.decision_id)
    assert got == ["7"]  # before, the change the feed gave last was lost with its end
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    if end:
        assert "records.sqlite" in (err.value.details() or "")
