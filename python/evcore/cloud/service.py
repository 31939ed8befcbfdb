"""The cloud's ``CloudApi`` over ``grpc.aio``: edges upload their audit chains and telemetry, put
their topology and fetch plans (proto/evcore/v1/cloud_api.proto; semantics in docs/cloud.md).

``CloudApiServer(config, store, clock=…)``: ``start()`` binds (port 0 picks one), ``stop(grace_s)``
turns health NOT_SERVING and drains. Auth (the site's client certificate) runs in
:class:`evcore.cloud.auth.SiteAuthInterceptor` before any handler. Handlers store what a site
sent under that site, check the audit chain (evcore.cloud.store) and validate a topology in the
Rust core; they never change a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1.health import aio as health_aio

from evcore.api.convert import timestamp
from evcore.api.serving import add_health, bind, start_serving, stop_serving
from evcore.clock import Clock, WallClock
from evcore.cloud.auth import DirectIssuers, OperatorAuth, SiteAuthInterceptor, caller_site
from evcore.cloud.config import CloudConfig, CloudConfigError
from evcore.cloud.fleet import BusGridPublisher, FleetCoordinator, GridPublisher
from evcore.cloud.fleet_service import FLEET_SERVICE_NAME, FleetApiService
from evcore.cloud.retention import run_retention
from evcore.cloud.sitebuses import SiteBuses
from evcore.cloud.status import abort_for
from evcore.cloud.store import CloudStore
from evcore.cloud.topology import check_plausible, check_storable, site_from_topology
from evcore.errors import SiteConfigError
from evcore.metrics.cloud import CloudMetrics
from evcore.metrics.server import MetricsServer
from evcore.v1 import cloud_api_pb2 as pb
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from evcore.v1 import fleet_api_pb2_grpc as fpb_grpc
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.meter_pb2 import MeterSampleBatch
from evcore.v1.plan_pb2 import Plan
from evcore.v1.topology_pb2 import SiteTopology

log = logging.getLogger("evcore.cloud")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CloudApi"].full_name
# Items of a stream stored per transaction at most: what has arrived is stored as soon as the
# previous transaction is done, so a slow trickle is stored one by one and a burst in batches.
BATCH_ITEMS = 256
# An audit record takes 130 to 160 bytes per charger (its setpoint and binding with their
# reasons): gRPC's 4 MiB default refused a 40,000-charger decision (5.2 MB; the test).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Trailing metadata kept for clients written before UploadAck.contiguous_count (5) and
# .topology_version (6) existed; they carry the same numbers.
CONTIGUOUS_COUNT_KEY = "evcore-contiguous-count"
TOPOLOGY_VERSION_KEY = "evcore-topology-version"

Req = TypeVar("Req")
Res = TypeVar("Res")
Item = TypeVar("Item")


def _guarded(
    method: Callable[[Any, Req, Any], Awaitable[Res]],
) -> Callable[[Any, Req, Any], Awaitable[Res]]:
    """A handler whose refusals of input are its own aborts (a refused record, batch or
    topology; no plan): any error it raises is an unreachable database (UNAVAILABLE naming the
    store: the edge retries, uploads are idempotent) or a bug (INTERNAL, logged with its
    traceback), never the caller's bad input (:func:`evcore.cloud.status.abort_for`)."""

    @functools.wraps(method)
    async def run(self: Any, request: Req, context: Any) -> Res:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort_for(context, method.__name__, exc, log)

    return run


@dataclass
class _Failed:
    exc: BaseException


class _End:
    pass


_END = _End()


async def _batches(
    requests: AsyncIterator[Item], max_items: int
) -> AsyncGenerator[list[Item], None]:
    """The stream's items in lists of what has arrived (at most ``max_items``), in order. A reader
    task keeps receiving while the previous list is being stored."""
    queue: asyncio.Queue[Item | _Failed | _End] = asyncio.Queue(maxsize=max_items * 2)

    async def read() -> None:
        try:
            async for item in requests:
                await queue.put(item)
        except Exception as exc:
            await queue.put(_Failed(exc))
            return
        await queue.put(_END)

    reader = asyncio.create_task(read(), name="evcore-cloud-stream-reader")
    try:
        done = False
        while not done:
            first = await queue.get()
            pending: list[Item | _Failed | _End] = [first]
            while len(pending) < max_items and not queue.empty():
                pending.append(queue.get_nowait())
            batch: list[Item] = []
            failed: _Failed | None = None
            for x in pending:
                if isinstance(x, _End):
                    done = True
                elif isinstance(x, _Failed):
                    failed = x
                else:
                    batch.append(x)
            if batch:
                yield batch
            if failed is not None:
                raise failed.exc
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


class CloudApiService(pb_grpc.CloudApiServicer):
    """The handlers; every one acts for the site the interceptor authenticated."""

    def __init__(self, store: CloudStore, *, clock: Clock, batch_items: int = BATCH_ITEMS) -> None:
        self._store = store
        self._clock = clock
        self._batch_items = batch_items

    def _ack(
        self,
        stored: int,
        duplicates: int,
        contiguous_seq: int = -1,
        *,
        topology_version: int = 0,
    ) -> pb.UploadAck:
        ack = pb.UploadAck(
            stored_count=stored,
            duplicate_count=duplicates,
            contiguous_seq=max(0, contiguous_seq),
            contiguous_count=contiguous_seq + 1,
            topology_version=topology_version,
        )
        ack.stored_at.CopyFrom(timestamp(self._clock.now()))
        return ack

    @_guarded
    async def UploadAudit(
        self, request_iterator: AsyncIterator[AuditRecord], context: Any
    ) -> pb.UploadAck:
        site = caller_site()
        stored = duplicates = 0
        contiguous: int | None = None
        async with contextlib.aclosing(_batches(request_iterator, self._batch_items)) as batches:
            async for batch in batches:
                result = await self._store.put_audit(site, batch, now_s=self._clock.now())
                stored += result.stored
                duplicates += result.duplicates
                contiguous = result.contiguous_seq
                if result.refused is not None:
                    log.warning(
                        "cloud: audit of site %r refused at %s (%d stored before it in the stream)",
                        site,
                        result.refused,
                        stored,
                    )
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{result.refused}; this stream's {stored} record(s) before it were stored "
                        f"and {duplicates} were repeats; nothing after it was stored",
                        (
                            ("evcore-refused-seq", str(result.refused.seq)),
                            ("evcore-stored-count", str(stored)),
                            ("evcore-duplicate-count", str(duplicates)),
                            (CONTIGUOUS_COUNT_KEY, str(contiguous + 1)),
                        ),
                    )
        if contiguous is None:
            contiguous = await self._store.contiguous_seq(site)
        context.set_trailing_metadata(((CONTIGUOUS_COUNT_KEY, str(contiguous + 1)),))
        return self._ack(stored, duplicates, contiguous)

    @_guarded
    async def UploadTelemetry(
        self, request_iterator: AsyncIterator[MeterSampleBatch], context: Any
    ) -> pb.UploadAck:
        site = caller_site()
        stored = duplicates = 0
        async with contextlib.aclosing(_batches(request_iterator, self._batch_items)) as batches:
            async for batch in batches:
                result = await self._store.put_telemetry(site, batch, now_s=self._clock.now())
                stored += result.stored
                duplicates += result.duplicates
                if result.refused is not None:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{result.refused}; this stream's {stored} batch(es) before it were stored "
                        f"and {duplicates} were repeats; nothing after it was stored",
                        (
                            ("evcore-stored-count", str(stored)),
                            ("evcore-duplicate-count", str(duplicates)),
                        ),
                    )
        return self._ack(stored, duplicates)

    @_guarded
    async def PutTopology(self, request: SiteTopology, context: Any) -> pb.UploadAck:
        site = caller_site()
        try:
            # Off the event loop: a large site takes the core a while to validate.
            check_storable(request)
            await asyncio.to_thread(lambda: check_plausible(site_from_topology(request)))
        except SiteConfigError as exc:
            node = str(getattr(exc, "node", "") or "")
            field = str(getattr(exc, "field", "") or "")
            log.warning("cloud: topology of site %r refused: %s", site, exc)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"topology of site {site!r} refused: {exc}",
                (("evcore-node", node), ("evcore-field", field)),
            )
        version, stored = await self._store.put_topology(site, request, now_s=self._clock.now())
        if stored:
            log.info("cloud: site %r topology version %d stored", site, version)
        context.set_trailing_metadata(((TOPOLOGY_VERSION_KEY, str(version)),))
        return self._ack(1 if stored else 0, 0 if stored else 1, topology_version=version)

    @_guarded
    async def GetPlan(self, request: pb.GetPlanRequest, context: Any) -> Plan:
        site = caller_site()
        plan = await self._store.newest_plan(site, newer_than_version=request.newer_than_version)
        if plan is None:
            what = (
                f"no plan newer than version {request.newer_than_version}"
                if request.newer_than_version
                else "no plan"
            )
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{what} for site {site!r}")
        assert plan is not None
        return plan


def _read_ca(key: str, path: Path) -> bytes:
    """A CA file's bytes; one that cannot be read is a ``CloudConfigError`` naming the key and
    the file (it ended ``evcore cloud serve`` in a traceback)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CloudConfigError(f"{key}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc


class CloudApiServer:
    """The gRPC server around :class:`CloudApiService`, with site auth, health and reflection."""

    def __init__(
        self,
        config: CloudConfig,
        store: CloudStore,
        *,
        clock: Clock,
        grid_publisher: GridPublisher | None = None,
        site_buses: SiteBuses | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.service = CloudApiService(store, clock=clock)
        self.fleet: FleetCoordinator | None = None
        # The sites' buses the fleet publishes on, when this server opened them itself.
        self._owned_buses: SiteBuses | None = None
        self._operator_ca_pem = b""
        self._resplits: asyncio.Task[None] | None = None
        self._republish: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._clock = clock
        operators: OperatorAuth | None = None
        if config.fleet is not None:
            if grid_publisher is None:
                # The sites' buses the audit consumers read (one per site, one outbox file each),
                # else buses of its own. Their retries and back-offs are transport timing on the
                # wall clock, whatever clock stamps the records (a test's manual clock never
                # advances).
                if site_buses is None:
                    site_buses = self._owned_buses = SiteBuses(config.bus or {}, WallClock())
                grid_publisher = BusGridPublisher(site_buses.get)
            self.fleet = FleetCoordinator(
                store,
                grid_publisher,
                clock=clock,
                demand_window_s=config.fleet.demand_window_s,
                resplit_change_ratio=config.fleet.resplit_change_ratio,
                resplit_min_kw=config.fleet.resplit_min_kw,
                ramp_s=config.fleet.ramp_s,
                ack_timeout_s=config.fleet.ack_timeout_s,
            )
            ca = config.fleet.operator_ca_file
            ca_pem = None if ca is None else _read_ca("[fleet].operator_ca_file", ca)
            try:
                operators = OperatorAuth(config.fleet.operators, ca_pem)
            except ValueError as exc:  # not PEM certificates
                raise CloudConfigError(
                    f"[fleet].operator_ca_file: {str(ca)!r} holds no PEM CA certificate: {exc}"
                ) from exc
            self._operator_ca_pem = ca_pem or b""
        sites: DirectIssuers | None = None
        if config.tls is not None and not config.insecure:
            ca = config.tls.client_ca_file
            sites_pem = _read_ca("[tls].client_ca_file", ca)
            try:
                sites = DirectIssuers(sites_pem)
            except ValueError as exc:  # not PEM certificates
                raise CloudConfigError(
                    f"[tls].client_ca_file: {str(ca)!r} holds no PEM CA certificate: {exc}"
                ) from exc
        self.auth = SiteAuthInterceptor(insecure=config.insecure, operators=operators, sites=sites)
        #: ``[metrics]``: call and upload counters, served by ``metrics_server`` (None: none).
        self.metrics: CloudMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.metrics_port = 0
        if config.metrics is not None:
            self.metrics = CloudMetrics(clock, auth=self.auth)
        self.health = health_aio.HealthServicer()
        self._server: aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Open the store, bind and serve; returns the bound port."""
        await self.store.open()
        interceptors: list[Any] = [self.auth]
        if self.metrics is not None:
            interceptors.append(self.metrics.interceptor)  # inside auth: the site is known
        server = aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        pb_grpc.add_CloudApiServicer_to_server(self.service, server)
        names = [SERVICE_NAME]
        if self.fleet is not None:
            fpb_grpc.add_FleetApiServicer_to_server(FleetApiService(self.fleet), server)
            names.append(FLEET_SERVICE_NAME)
        add_health(server, self.health, names, reflection_on=self.config.reflection)
        tls = self.config.tls

        def credentials() -> grpc.ServerCredentials | None:
            if tls is None:
                if not self.config.insecure:
                    raise CloudConfigError("no [tls] and not insecure")
                log.warning(
                    "cloud: INSECURE MODE: no TLS, any caller may act as any site through the "
                    "x-evcore-site-id header. For local development only; never on a network."
                )
                return None
            # Operators' certificates are accepted at the handshake beside the sites'; the
            # interceptor tells them apart by issuer.
            roots = tls.client_ca_file.read_bytes()
            if self.fleet is not None and self._operator_ca_pem:
                if self._operator_ca_pem.strip() == roots.strip():
                    raise CloudConfigError(
                        "[fleet] operator_ca_file is the sites' CA: every site would be an "
                        "operator; give operators their own CA"
                    )
                roots = roots.rstrip(b"\n") + b"\n" + self._operator_ca_pem
            return grpc.ssl_server_credentials(
                [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                root_certificates=roots,
                require_client_auth=True,
            )

        port = bind(
            server, self.config.listen, credentials, error=CloudConfigError, tls_section="[tls]"
        )
        await start_serving(server, self.health, names)
        self._server = server
        self.port = int(port)
        if self.config.retention.enabled:
            self._retention = asyncio.create_task(
                run_retention(self.store, self._clock, self.config.retention),
                name="evcore-cloud-retention",
            )
        if self.fleet is not None and self.config.fleet:
            # A revision stored by an earlier run that stopped before publishing it goes out now.
            self._republish = asyncio.create_task(
                self.fleet.run_republish(self.config.fleet.republish_every_s),
                name="evcore-cloud-fleet-republish",
            )
        if self.fleet is not None and self.config.fleet and self.config.fleet.resplit_every_s > 0:
            self._resplits = asyncio.create_task(
                self.fleet.run_resplits(self.config.fleet.resplit_every_s),
                name="evcore-cloud-fleet-resplits",
            )
        if self.metrics is not None and self.config.metrics is not None:
            self.metrics_server = MetricsServer.from_config(
                self.metrics.registry, self.config.metrics
            )
            self.metrics_port = await self.metrics_server.start()
        log.info(
            "cloud: CloudApi listening on %s (port %d), store %s",
            self.config.listen,
            port,
            self.store.description,
        )
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING first, then in-flight calls get ``grace_s`` to finish."""
        if self._server is None:
            return
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        for task in (self._resplits, self._republish, self._retention):
            if task is not None:
                task.cancel()
                # A task that ended in an error is said here, not raised: raised, it ended the
                # stop before the gRPC server and the buses were stopped.
                (ended,) = await asyncio.gather(task, return_exceptions=True)
                if isinstance(ended, Exception):
                    log.error(
                        "cloud: task %s had ended: %r", task.get_name(), ended, exc_info=ended
                    )
        self._resplits = self._republish = self._retention = None
        await stop_serving(
            self._server, self.health, self.config.stop_grace_s if grace_s is None else grace_s
        )
        self._server = None
        if self._owned_buses is not None:
            await self._owned_buses.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
