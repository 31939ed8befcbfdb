"""Refused edge API calls are exported to Prometheus, over real sockets (gRPC and HTTP): before,
the API counted its refusals internally (``AuthInterceptor.denied`` and ``unauthenticated``) and
counted bad arguments nowhere, and no scrape showed any of them: a dashboard with a stale token,
a script calling a lever with the wrong role or a broken client sending bad values went unseen.
Now ``evcore_api_calls_refused_total{method,reason}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from evcore.metrics import MetricsServer, Registry
from evcore.metrics.edge import api_families
from evcore.v1 import edge_api_pb2 as pb
from metrics_testkit import scrape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
from test_api_edge import OPERATOR, VIEWER, Edge, auth, edge  # noqa: F401

REFUSED = "evcore_api_calls_refused_total"


async def _refused(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_refused_api_calls_are_scraped_by_method_and_reason(edge: Edge) -> None:  # noqa: F811
    registry = Registry()
    registry.register(lambda: api_families(edge.server.auth.refused))
    metrics = MetricsServer(registry, port=0)
    await metrics.start()
    try:
        before = await scrape(metrics.port)
        assert before.types[REFUSED] == "counter" and before.series(REFUSED) == {}
        stub = edge.stub
        state = pb.GetSiteStateRequest()
        assert await _refused(stub.GetSiteState(state)) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            await _refused(stub.GetSiteState(state, metadata=auth("not-a-token")))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        lever = pb.SetSessionPriorityRequest(charger_id="C1", priority=2.0)
        assert (
            await _refused(stub.SetSessionPriority(lever, metadata=auth(VIEWER)))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        bad = pb.SetSessionPriorityRequest(charger_id="C1" * 200, priority=2.0)
        assert (
            await _refused(stub.SetSessionPriority(bad, metadata=auth(OPERATOR)))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        await stub.GetSiteState(state, metadata=auth(VIEWER))  # served: not counted
        after = await scrape(metrics.port)
        assert after.series(REFUSED) == {
            (("method", "GetSiteState"), ("reason", "unauthenticated")): 2.0,
            (("method", "SetSessionPriority"), ("reason", "invalid_argument")): 1.0,
            (("method", "SetSessionPriority"), ("reason", "permission_denied")): 1.0,
        }
    finally:
        await metrics.stop()
