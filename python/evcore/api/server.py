"""The edge API server: ``EdgeApi`` over ``grpc.aio``, with auth, health and reflection.

``EdgeApiServer(facade, config, site_id=…, clock=…, store=…)`` serves the facade; ``start()`` binds
the socket (``listen``; port 0 picks a free port, see ``port``), ``stop(grace_s)`` drains. Reads
and steering go only through the :class:`EdgeFacade`; decisions come from the audit trail in the
store when one is given (durable across restarts), else from the facade. Handlers never decide a
setpoint: steering is an event for the controller's next decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio
from grpc_health.v1.health import aio as health_aio

from evcore.api import convert
from evcore.api.auth import AuthInterceptor, Credentials, TokensFile, current_principal
from evcore.api.facade import EdgeFacade, FacadeError, NotApplicable, UnknownTarget
from evcore.api.serving import add_health, bind, start_serving, stop_serving
from evcore.audit.log import record_from_mapping
from evcore.clock import Clock
from evcore.edge.state import priority_error
from evcore.filewatch import file_signature
from evcore.planner import PRICE_BOUND_PER_KWH
from evcore.site.sections import Key, Section
from evcore.store.base import Store, StoreUnavailable
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from evcore.v1.audit_pb2 import AuditRecord

log = logging.getLogger("evcore.api")

T = TypeVar("T")
Req = TypeVar("Req")
Res = TypeVar("Res")
_View = TypeVar("_View", pb.SessionView, pb.SetpointView)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EdgeApi"].full_name
DEFAULT_DECISIONS = 50
MAX_DECISIONS = 1000
#: Without a store, paging back (``before_seq``) looks through every decision the edge keeps in
#: memory (``ControllerFacade(keep_decisions=)``, 1,000 by default).
MAX_RECENT_SCAN = 100_000
WATCH_QUEUE = 1000
#: The largest audit seq a store holds (a signed 64-bit column).
MAX_SEQ = 2**63 - 1
#: Change streams one caller (one token or client certificate name) may hold open, and the server:
#: each holds up to WATCH_QUEUE changes and a subscription the control loop feeds. A client that
#: reconnects without cancelling its old stream would otherwise pile them up without end.
MAX_WATCHES_PER_CALLER = 16
MAX_WATCHES = 64
#: HTTP/2 keepalive: the server pings each connection every ``keepalive_time_ms`` and drops one
#: whose client does not answer within ``keepalive_timeout_ms`` (a frozen or cut-off client: its
#: watch would otherwise hold a place, and its queue, for good). The same timeout bounds the ping
#: a stop sends with its GOAWAY: a watch whose client stopped reading waits inside a write, where
#: it never hears of the stop, and with gRPC's default (20 s) ``stop(grace_s)`` took about 18 s
#: whatever its grace. ``max_pings_without_data`` 0: an idle watch is pinged too.
SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.http2.max_pings_without_data", 0),
)
#: The longest id a request may name (a charger, node, transaction, curtailment or signal): ids
#: come from the site file, OCPP and grid operators, all far shorter. A longer one is refused
#: before anything looks it up (an error quoting a 100 kB id was too large for the reply).
MAX_ID_CHARS = 256
#: The most a ListDecisions reply carries: gRPC clients take 4 MiB by default, and on a site of
#: a few hundred chargers (a setpoint and a reason each per record) 1000 records are tens of MB.
MAX_REPLY_BYTES = 3_670_016  # 3.5 MiB
#: Trailing metadata of a ListDecisions reply cut to MAX_REPLY_BYTES: how many were left out.
LEFT_OUT_KEY = "evcore-decisions-left-out"
#: The longest free text (an operator's reason): it is logged and echoed to every watcher.
MAX_TEXT_CHARS = 1024


class _WatchQueue(asyncio.Queue[pb.Change]):
    """One watch's changes, and how many it lost (dropped, oldest first, while it did not read)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize=maxsize)
        self.lost = 0


class ApiConfigError(ValueError):
    """The ``[api]`` section is wrong; the message names the key."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    # With a client CA, clients must present a certificate signed by it (mTLS).
    client_ca_file: Path | None = None


@dataclass
class ApiConfig:
    """The validated ``[api]`` section (docs/api.md)."""

    listen: str = "127.0.0.1:50051"
    credentials: Credentials = field(default_factory=Credentials)
    tls: TlsConfig | None = None
    reflection: bool = True
    enabled: bool = True
    #: ``tokens_file`` (read again when it changes) and the site file's own credentials.
    tokens_file: Path | None = None
    site_credentials: Credentials | None = None

    @staticmethod
    def from_section(section: Mapping[str, Any] | None, base_dir: Path | str) -> ApiConfig:
        s = _SECTION.read(section or {}, base_dir)
        creds = Credentials.from_config(s["tokens"], s["clients"])
        site_creds = Credentials(tokens=dict(creds.tokens), clients=dict(creds.clients))
        if "tokens_file" in s:
            creds.merge_file(s["tokens_file"])
        tls = TlsConfig(**_TLS_SECTION.read(s["tls"], base_dir)) if "tls" in s else None
        if creds.clients and (tls is None or tls.client_ca_file is None):
            raise ApiConfigError("[api] clients (mTLS identities) need [api.tls] client_ca_file")
        if not creds.tokens and not creds.clients:
            log.warning("[api]: no tokens or clients configured; every call will be refused")
        return ApiConfig(
            s["listen"],
            creds,
            tls,
            s["reflection"],
            s["enabled"],
            s.get("tokens_file"),
            site_creds,
        )


_SECTION = Section(
    "[api]",
    {
        "enabled": Key("bool", True),
        "listen": Key("host_port", "127.0.0.1:50051"),
        **dict.fromkeys(("tokens", "clients"), Key("any", ())),
        "tokens_file": Key("path"),
        "tls": Key("table"),
        "reflection": Key("bool", True),
    },
    ApiConfigError,
)
_TLS_SECTION = Section(
    "[api.tls]",
    {
        k: Key("path", required=k != "client_ca_file")
        for k in ("cert_file", "key_file", "client_ca_file")
    },
    ApiConfigError,
)


async def _maybe(value: T | Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def _abort_for(context: Any, where: str, exc: Exception) -> NoReturn:
    """End the call for an error nothing more specific caught: a store that cannot be reached is
    UNAVAILABLE (an outage: clients retry; its message names the store), anything else a bug,
    INTERNAL with its traceback in the log (instead of gRPC's bare UNKNOWN)."""
    if isinstance(exc, StoreUnavailable):
        log.warning("api: %s: store unavailable: %s", where, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{where}: store unavailable: {exc}")
    else:
        log.error("api: %s failed", where, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"{where} failed: {exc!r}")
    raise AssertionError("unreachable: abort raises") from exc


def _guarded(
    method: Callable[[Any, Req, Any], Awaitable[Res]],
) -> Callable[[Any, Req, Any], Awaitable[Res]]:
    """A unary handler whose unexpected errors become a status code (see :func:`_abort_for`)."""

    @functools.wraps(method)
    async def run(self: Any, request: Req, context: Any) -> Res:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(context, method.__name__, exc)

    return run


def _guarded_stream(
    method: Callable[[Any, Req, Any], AsyncGenerator[Res, None]],
) -> Callable[[Any, Req, Any], AsyncGenerator[Res, None]]:
    """:func:`_guarded` for a handler that streams its replies."""

    @functools.wraps(method)
    async def run(self: Any, request: Req, context: Any) -> AsyncGenerator[Res, None]:
        try:
            async with contextlib.aclosing(method(self, request, context)) as items:
                async for item in items:
                    yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort_for(context, method.__name__, exc)

    return run


def _loopback(listen: str) -> bool:
    """``host:port`` names a loopback address (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _wanted(request: pb.WatchChangesRequest, change: pb.Change) -> bool:
    """A change the watch asked for: every one, or those of its charger and every decision."""
    if not request.charger_id:
        return True
    if change.charger_id:
        return change.charger_id == request.charger_id
    return change.kind == "decision"


def _fitting(records: list[AuditRecord], budget: int) -> int:
    """How many of ``records`` (from the first) fit in a reply of ``budget`` bytes (at least one:
    a record too large alone is still the caller's to have)."""
    total = 0
    for n, record in enumerate(records):
        size = record.ByteSize()
        total += 1 + _varint_len(size) + size  # field tag, length, message
        if total > budget and n > 0:
            return n
    return len(records)


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _log_orphan(name: str, actor: str, task: asyncio.Future[Any]) -> None:
    """How a lever whose caller left ended (nobody else will hear of it)."""
    if task.cancelled():
        log.warning("api: %s by %s: its caller left and it was cancelled", name, actor)
    elif (exc := task.exception()) is not None:
        log.warning("api: %s by %s: its caller left, then it failed: %r", name, actor, exc)
    else:
        log.info("api: %s by %s: applied after its caller left (no answer sent)", name, actor)


def _bound_to(lever: Any, transaction_id: str) -> dict[str, str]:
    """``transaction_id=`` for a session lever that takes it (``EdgeFacade.set_priority``,
    ``set_departure``): the facade then refuses (``NotApplicable``) in the same step as the change
    when the charger's session is no longer that one. A facade that reads asynchronously has a gap
    between the API's look-up of the session and the change, in which the car may leave and the
    next one come: without it, a change meant for one car landed on the next. A lever without
    the keyword relies on the look-up alone (sound only for a facade whose ``sessions`` and lever
    are plain calls: both then run in one step of the event loop)."""
    if not transaction_id:
        return {}
    try:
        takes = "transaction_id" in inspect.signature(lever).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin, a C callable)
        takes = False
    return {"transaction_id": transaction_id} if takes else {}


#: The headers (initial metadata) a watch sends once it is subscribed to the edge's changes.
WATCH_ATTACHED = (("evcore-watch", "attached"),)
_SHUTTING_DOWN = "the edge API is shutting down; watch again (on this edge once it is back)"


def _actor() -> str:
    p = current_principal.get()
    return "unknown" if p is None else p.name


class EdgeApiService(pb_grpc.EdgeApiServicer):
    """The handlers; every one reads or steers through the facade only."""

    def __init__(
        self, facade: EdgeFacade, *, site_id: str, clock: Clock, store: Store | None = None
    ) -> None:
        self._facade = facade
        self._site_id = site_id
        self._clock = clock
        self._store = store
        self._watchers: set[_WatchQueue] = set()
        #: Watches open per caller name (MAX_WATCHES_PER_CALLER).
        self._watches_of: dict[str, int] = {}
        #: Levers running (see ``_lever``): owned here, so none is left behind unseen.
        self._levers: set[asyncio.Future[Any]] = set()
        #: Set by ``end_watches`` when the server stops: open watches end (UNAVAILABLE) at once
        #: instead of holding the stop for its whole grace, and new ones are refused.
        self._closing = asyncio.Event()

    def end_watches(self) -> None:
        """End every open ``WatchChanges`` with UNAVAILABLE (the server is stopping)."""
        self._closing.set()

    def allow_watches(self) -> None:
        """Serve watches again (the server is starting)."""
        self._closing.clear()

    # -- errors ---------------------------------------------------------------------------------
    async def _call(self, context: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a facade call; the facade's own refusals become status codes naming what was
        wrong. Only those: a KeyError or ValueError from a bug behind the facade is not the
        caller's unknown charger or bad value, it is INTERNAL (see :func:`_abort_for`)."""
        try:
            return await _maybe(fn(*args, **kwargs))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await self._refuse_for(context, fn, exc)

    async def _lever(self, context: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """:meth:`_call` for a lever: once called it runs to its end even when the caller
        leaves (its deadline passes, it cancels, the server stops): cut between its steps (in
        force, not yet stored) it would leave the edge half changed. The caller then hears
        nothing; the log says how it ended. The service owns the task (``stop`` waits for it)."""
        name = getattr(fn, "__name__", "lever")
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # a plain lever refusing (or failing) at once
            await self._refuse_for(context, fn, exc)
        if not inspect.isawaitable(result):
            return result
        task = asyncio.ensure_future(result)
        self._levers.add(task)
        task.add_done_callback(self._levers.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(_log_orphan, name, _actor()))
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._refuse_for(context, fn, exc)

    async def wait_levers(self, timeout_s: float) -> None:
        """Let levers whose callers left finish (at most ``timeout_s``)."""
        if self._levers:
            await asyncio.wait(set(self._levers), timeout=timeout_s)

    @staticmethod
    async def _refuse_for(context: Any, fn: Any, exc: Exception) -> NoReturn:
        """The status code of a facade call's error: the facade's own refusals name what was
        wrong; anything else is INTERNAL or UNAVAILABLE (:func:`_abort_for`)."""
        if isinstance(exc, UnknownTarget):
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        elif isinstance(exc, NotApplicable):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        elif isinstance(exc, FacadeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await _abort_for(context, getattr(fn, "__name__", "call"), exc)

    @staticmethod
    async def _require(context: Any, ok: bool, message: str) -> None:
        if not ok:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    @staticmethod
    async def _bounded(context: Any, **fields: str) -> None:
        """Each of ``fields`` (an id, or ``reason``) within its length; INVALID_ARGUMENT naming
        the field (not quoting it) when not."""
        for name, value in fields.items():
            limit = MAX_TEXT_CHARS if name == "reason" else MAX_ID_CHARS
            if len(value) > limit:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name} is {len(value)} characters long; at most {limit}",
                )

    async def _known_charger(
        self, context: Any, charger_id: str, state: Mapping[str, Any] | None = None
    ) -> None:
        """A charger a filter names is one of the site's: NOT_FOUND otherwise (an empty answer
        would read as "nothing there" for a typo)."""
        if state is None:
            state = await self._call(context, self._facade.site_state)
        known = {str(c.get("charger_id")) for c in state.get("chargers") or ()}
        if charger_id not in known:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown charger_id {charger_id!r}")

    @staticmethod
    async def _seconds(context: Any, ts: Any, field: str) -> float:
        """A Timestamp the caller sent, in seconds; INVALID_ARGUMENT when out of range (checked
        before anything is applied: a reply that failed after the change took effect told the
        caller it had not)."""
        try:
            return convert.checked_seconds(ts, field)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable: abort raises") from exc

    # -- reads ----------------------------------------------------------------------------------
    @_guarded
    async def GetSiteState(self, request: pb.GetSiteStateRequest, context: Any) -> pb.SiteState:
        d = await self._call(context, self._facade.site_state)
        return convert.site_state(d, site_id=self._site_id, now_s=self._clock.now())

    async def _charger_views(
        self,
        context: Any,
        rows_of: Callable[[], Any],
        view: Callable[[Mapping[str, Any]], _View],
        charger_id: str,
    ) -> list[_View]:
        """The facade's rows as views, of ``charger_id`` only when one is named (a charger of
        the site: NOT_FOUND otherwise), by charger."""
        if charger_id:
            await self._bounded(context, charger_id=charger_id)
            await self._known_charger(context, charger_id)
        rows = await self._call(context, rows_of)
        views = [view(r) for r in rows]
        if charger_id:
            views = [v for v in views if v.charger_id == charger_id]
        return sorted(views, key=lambda v: v.charger_id)

    @_guarded
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Any
    ) -> pb.ListSessionsResponse:
        views = await self._charger_views(
            context, self._facade.sessions, convert.session_view, request.charger_id
        )
        return pb.ListSessionsResponse(sessions=views)

    @_guarded
    async def ListSetpoints(
        self, request: pb.ListSetpointsRequest, context: Any
    ) -> pb.ListSetpointsResponse:
        views = await self._charger_views(
            context, self._facade.setpoints, convert.setpoint_view, request.charger_id
        )
        return pb.ListSetpointsResponse(setpoints=views)

    @_guarded
    async def GetNodeUtilisation(
        self, request: pb.GetNodeUtilisationRequest, context: Any
    ) -> pb.GetNodeUtilisationResponse:
        rows = await self._call(context, self._facade.node_utilisation)
        out = pb.GetNodeUtilisationResponse(nodes=[convert.node_utilisation(r) for r in rows])
        out.observed_at.CopyFrom(convert.timestamp(self._clock.now()))
        return out

    @_guarded
    async def ListDecisions(
        self, request: pb.ListDecisionsRequest, context: Any
    ) -> pb.ListDecisionsResponse:
        await self._bounded(context, charger_id=request.charger_id)
        limit = min(request.limit or DEFAULT_DECISIONS, MAX_DECISIONS)
        since_s = (
            await self._seconds(context, request.since, "since")
            if request.HasField("since")
            else None
        )
        charger = request.charger_id or None
        # A uint64; a client paging "from the top" may send its largest. No seq reaches
        # MAX_SEQ, so a larger bound is the same as it (SQLite cannot bind one past 2**63 - 1).
        before = min(request.before_seq, MAX_SEQ) if request.HasField("before_seq") else None
        records: list[AuditRecord]
        if self._store is not None:
            records = await self._store.audit_records(
                charger_id=charger,
                since_s=since_s,
                before_seq=before,
                limit=limit,
                newest_first=True,
            )
        else:
            # The edge's recent decisions in memory (no store): as far back as they go.
            rows = await self._call(
                context,
                self._facade.recent_decisions,
                charger_id=charger,
                limit=limit if before is None else MAX_RECENT_SCAN,
            )
            records = [record_from_mapping(r) for r in rows]
            if before is not None:
                records = [r for r in records if r.seq < before][:limit]
            if since_s is not None:
                records = [r for r in records if convert.seconds(r.decided_at) >= since_s]
        kept = _fitting(records, MAX_REPLY_BYTES)
        if kept < len(records):
            # Newest first: the older ones go. More than a client takes would reach it as
            # RESOURCE_EXHAUSTED, every time, with none of the records.
            context.set_trailing_metadata(((LEFT_OUT_KEY, str(len(records) - kept)),))
            log.info(
                "api: ListDecisions: %d of %d records fit in %d bytes; the older ones left out",
                kept,
                len(records),
                MAX_REPLY_BYTES,
            )
        return pb.ListDecisionsResponse(decisions=records[:kept])

    @_guarded_stream
    async def WatchChanges(
        self, request: pb.WatchChangesRequest, context: Any
    ) -> AsyncGenerator[pb.Change, None]:
        # Setpoint changes may come without a unit: take it from the charger (DC chargers are W).
        await self._bounded(context, charger_id=request.charger_id)
        state = await self._call(context, self._facade.site_state)
        if request.charger_id:
            await self._known_charger(context, request.charger_id, state)
        if self._closing.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
        caller = _actor()
        if self._watches_of.get(caller, 0) >= MAX_WATCHES_PER_CALLER:
            log.warning(
                "api: %s holds %d watches already: one more refused", caller, MAX_WATCHES_PER_CALLER
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{caller} holds {MAX_WATCHES_PER_CALLER} watches already (the most one caller "
                "may): cancel one (a client that reconnects must cancel its old stream)",
            )
        if len(self._watchers) >= MAX_WATCHES:
            log.warning("api: %d watches open: one more refused", MAX_WATCHES)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_WATCHES} watches are open on this edge (the most it serves); try later",
            )
        units = {str(c.get("charger_id")): c.get("unit") for c in state.get("chargers") or ()}
        queue = _WatchQueue(maxsize=WATCH_QUEUE)
        self._watchers.add(queue)

        async def pump() -> None:
            async for item in self._facade.watch():
                if "unit" not in item and units.get(str(item.get("charger_id"))):
                    item = {**item, "unit": units[str(item.get("charger_id"))]}
                self._offer(queue, convert.change(item, now_s=self._clock.now()))

        pump_task = asyncio.create_task(pump(), name="evcore-api-watch-pump")
        closing = asyncio.ensure_future(self._closing.wait())
        get: asyncio.Future[pb.Change] | None = None
        self._watches_of[caller] = self._watches_of.get(caller, 0) + 1
        try:
            # The pump's first step subscribes it to the facade's changes (up to its first
            # wait); then the caller is told (the stream's headers), so that it can read the
            # state knowing every later change reaches it. gRPC sends the headers with the first
            # message otherwise: on a quiet site a client had no way to know.
            await asyncio.sleep(0)
            try:
                await context.send_initial_metadata(WATCH_ATTACHED)
            except Exception as exc:  # (grpc's ExecuteBatchError: the call is over already)
                log.debug("api: a watch ended before it was attached (its caller left): %r", exc)
                return
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {get, pump_task, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    break
                if queue.lost:
                    yield self._lost_change(queue)
                if _wanted(request, change := get.result()):
                    yield change
            if closing.done():
                get.cancel()
                await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
            # The feed ended: the changes it gave before go out (a cancelled get leaves its item
            # in the queue), then the caller is told. The edge's changes go on, so an end is no
            # clean end of the stream (OK would say there is no more): UNAVAILABLE, watch again.
            get.cancel()
            while not queue.empty():
                if queue.lost:
                    yield self._lost_change(queue)
                if _wanted(request, change := queue.get_nowait()):
                    yield change
            failed = pump_task.exception()
            if failed is not None:
                raise failed  # a store outage or a bug: _guarded_stream says which
            log.warning("api: the change feed ended")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "change feed ended; watch again")
        finally:
            self._watchers.discard(queue)
            left = self._watches_of.pop(caller, 1) - 1
            if left > 0:
                self._watches_of[caller] = left
            closing.cancel()
            if get is not None:
                get.cancel()  # a watch that ends (the caller gone) left its get pending for good
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump_task

    @staticmethod
    def _offer(queue: _WatchQueue, change: pb.Change) -> None:
        if queue.full():
            queue.get_nowait()  # a slow watcher loses its oldest change, never stalls anyone
            queue.lost += 1
        queue.put_nowait(change)

    def _lost_change(self, queue: _WatchQueue) -> pb.Change:
        """The ``changes_lost`` change telling a watcher how many it lost since it last read
        (counted over every charger: a filtered watch lost at most that many of its own)."""
        n, queue.lost = queue.lost, 0
        c = pb.Change(
            kind="changes_lost",
            detail=f"{n} changes dropped: this watch fell behind (at most {WATCH_QUEUE} are kept "
            "for a watcher that does not read); read again with ListSetpoints/GetSiteState",
        )
        c.observed_at.CopyFrom(convert.timestamp(self._clock.now()))
        log.info("api: a watcher fell behind and lost %d changes", n)
        return c

    def _broadcast(self, kind: str, charger_id: str, detail: str) -> None:
        c = pb.Change(kind=kind, charger_id=charger_id, detail=detail)
        c.observed_at.CopyFrom(convert.timestamp(self._clock.now()))
        for q in list(self._watchers):
            self._offer(q, c)

    # -- steering -------------------------------------------------------------------------------
    async def _session_guard(self, context: Any, charger_id: str, transaction_id: str) -> str:
        """The charger has a session (and it is ``transaction_id`` when one was named); returns
        its transaction id, which the lever is then bound to (:func:`_bound_to`)."""
        await self._require(context, bool(charger_id), "charger_id is required")
        await self._bounded(context, charger_id=charger_id, transaction_id=transaction_id)
        sessions = await self._call(context, self._facade.sessions)
        current = [s for s in sessions if str(s.get("charger_id")) == charger_id]
        if not current:
            state = await self._call(context, self._facade.site_state)
            known = {str(c.get("charger_id")) for c in state.get("chargers") or ()}
            if charger_id not in known:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown charger_id {charger_id!r}")
            meant = f"transaction {transaction_id!r} is over: " if transaction_id else ""
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{meant}no session at charger {charger_id!r}"
            )
        tx = str(current[0].get("transaction_id") or "")
        if transaction_id and tx != transaction_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"charger {charger_id!r} now has transaction {tx!r}, not {transaction_id!r}",
            )
        return tx

    @_guarded
    async def SetChargerAvailability(
        self, request: pb.SetChargerAvailabilityRequest, context: Any
    ) -> pb.SteeringResponse:
        await self._require(context, bool(request.charger_id), "charger_id is required")
        await self._bounded(context, charger_id=request.charger_id, reason=request.reason)
        await self._lever(
            context, self._facade.set_availability, request.charger_id, request.available
        )
        what = "available" if request.available else "unavailable (held at 0 A)"
        detail = f"{request.charger_id} set {what} by {_actor()}"
        if request.reason:
            detail += f": {request.reason}"
        log.info("api: %s", detail)
        self._broadcast("availability", request.charger_id, detail)
        return pb.SteeringResponse(detail=detail)

    @_guarded
    async def ClearChargerFault(
        self, request: pb.ClearChargerFaultRequest, context: Any
    ) -> pb.SteeringResponse:
        await self._require(context, bool(request.charger_id), "charger_id is required")
        await self._bounded(context, charger_id=request.charger_id, reason=request.reason)
        note = f"by {_actor()}" + (f": {request.reason}" if request.reason else "")
        was = await self._lever(context, self._facade.clear_fault, request.charger_id, note)
        detail = f"fault of {request.charger_id} cleared {note} (it was: {was})"
        log.warning("api: %s", detail)
        self._broadcast("fault_cleared", request.charger_id, detail)
        return pb.SteeringResponse(detail=detail)

    @_guarded
    async def SetSessionPriority(
        self, request: pb.SetSessionPriorityRequest, context: Any
    ) -> pb.SteeringResponse:
        why = priority_error(request.priority)
        await self._require(context, why is None, why or "")
        tx = await self._session_guard(context, request.charger_id, request.transaction_id)
        await self._lever(
            context,
            self._facade.set_priority,
            request.charger_id,
            request.priority,
            **_bound_to(self._facade.set_priority, tx),
        )
        detail = f"priority of the session at {request.charger_id} set to {request.priority:g}"
        detail += f" by {_actor()}"
        log.info("api: %s", detail)
        self._broadcast("priority", request.charger_id, detail)
        return pb.SteeringResponse(detail=detail)

    @_guarded
    async def SetSessionDeparture(
        self, request: pb.SetSessionDepartureRequest, context: Any
    ) -> pb.SteeringResponse:
        await self._require(context, request.HasField("departure"), "departure is required")
        energy: float | None = None
        if request.HasField("energy_requested_kwh"):
            energy = request.energy_requested_kwh
            await self._require(
                context,
                math.isfinite(energy) and energy >= 0,
                f"energy_requested_kwh must be a finite number >= 0, got {energy!r}",
            )
        departure_s = await self._seconds(context, request.departure, "departure")
        now_s = self._clock.now()
        # A departure already past gives the session no laxity at all: least_laxity's top
        # weight, the most urgent car on the site, for as long as it charges. Hurrying a car is
        # what its priority is for.
        await self._require(
            context,
            departure_s > now_s,
            f"departure {convert.iso(departure_s)} is not after now ({convert.iso(now_s)}): a "
            "departure already past would make this car the most urgent on the site (to hurry "
            "it, raise its priority; local time sent as UTC?)",
        )
        tx = await self._session_guard(context, request.charger_id, request.transaction_id)
        await self._lever(
            context,
            self._facade.set_departure,
            request.charger_id,
            departure_s,
            energy,
            **_bound_to(self._facade.set_departure, tx),
        )
        detail = f"departure of the session at {request.charger_id} set to " + convert.iso(
            departure_s
        )
        if energy is not None:
            detail += f", {energy:g} kWh wanted"
        detail += f" by {_actor()}"
        log.info("api: %s", detail)
        self._broadcast("departure", request.charger_id, detail)
        return pb.SteeringResponse(detail=detail)

    @_guarded
    async def PostGridSignal(
        self, request: pb.PostGridSignalRequest, context: Any
    ) -> pb.PostGridSignalResponse:
        sig = request.signal
        which = sig.WhichOneof("signal")
        await self._require(context, which is not None, "signal has neither curtailment nor prices")
        await self._bounded(context, signal_id=sig.signal_id)
        if which == "curtailment":
            c = sig.curtailment
            await self._bounded(context, curtailment_id=c.curtailment_id, node_id=c.node_id)
            sid = c.curtailment_id or sig.signal_id
            await self._require(context, bool(sid), "curtailment_id (or signal_id) is required")
            if c.cancelled:
                found = await self._lever(context, self._facade.cancel_curtailment, sid)
                detail = f"curtailment {sid} " + ("cancelled" if found else "was not in force")
            else:
                await self._require(context, bool(c.node_id), "curtailment node_id is required")
                await self._require(
                    context,
                    math.isfinite(c.max_kw) and c.max_kw >= 0,
                    f"curtailment max_kw must be a finite number >= 0, got {c.max_kw!r}",
                )
                await self._require(
                    context,
                    c.HasField("start") and c.HasField("end"),
                    "curtailment start and end are required",
                )
                start_s = await self._seconds(context, c.start, "curtailment start")
                end_s = await self._seconds(context, c.end, "curtailment end")
                await self._require(context, end_s > start_s, "curtailment end must be after start")
                now_s = self._clock.now()
                await self._require(
                    context,
                    end_s > now_s,
                    f"curtailment end {convert.iso(end_s)} is already past (now "
                    f"{convert.iso(now_s)}): it would curtail nothing (local time sent as UTC?)",
                )
                await self._lever(
                    context, self._facade.post_curtailment, sid, c.node_id, c.max_kw, start_s, end_s
                )
                detail = (
                    f"curtailment {sid}: at most {c.max_kw:g} kW at {c.node_id} from "
                    f"{convert.iso(start_s)} to {convert.iso(end_s)}"
                )
        else:
            prices = sig.price_update.tariff.prices
            await self._bounded(context, tariff_id=sig.price_update.tariff.tariff_id)
            await self._require(context, len(prices) > 0, "price update has no prices")
            # An update replaces every point from its first start on: an interval without one
            # (1970-01-01 as read) would replace the whole book.
            for i, p in enumerate(prices):
                await self._require(context, p.HasField("start"), f"prices[{i}].start is required")
            points = sorted(
                [
                    (await self._seconds(context, p.start, f"prices[{i}].start"), p.price_per_kwh)
                    for i, p in enumerate(prices)
                ]
            )
            starts = [t for t, _ in points]
            await self._require(
                context,
                len(set(starts)) == len(starts),
                "prices: an interval start is given twice (which price holds would be a guess)",
            )
            # Negative prices are normal in day-ahead markets and planned (docs/planner.md).
            await self._require(
                context,
                all(math.isfinite(p) and abs(p) <= PRICE_BOUND_PER_KWH for _, p in points),
                f"price_per_kwh must be a finite number between -{PRICE_BOUND_PER_KWH:g} and "
                f"{PRICE_BOUND_PER_KWH:g} (the planner's bound)",
            )
            await self._lever(context, self._facade.post_prices, points)
            sid = sig.signal_id or sig.price_update.tariff.tariff_id
            detail = f"price update {sid}: {len(points)} interval(s)"
        durable = getattr(self._facade, "curtailments_durable", None)
        if which == "curtailment" and callable(durable) and durable() is False:
            # Applied, but the edge's store did not take the book: a restart would lose it.
            detail += "; applied but not yet durable (the edge's store is unavailable; retrying)"
            log.warning("api: curtailment %s applied but not yet stored", sid)
        detail += f" (from {_actor()})"
        log.info("api: grid signal %s", detail)
        self._broadcast("grid_signal", "", detail)
        return pb.PostGridSignalResponse(signal_id=sid, detail=detail)


class _TlsFiles:
    """The ``[api.tls]`` files, loaded again when they change, so a renewed certificate (or a new
    client CA) serves from the next handshake without a restart. gRPC asks at every handshake
    (``on_handshake``, in one of its threads); while a file's mtime is under ``_SETTLE_S`` old they
    are loaded at every handshake (a renewal writes two files). Files that do not load together
    (the certificate written, its key not yet; a broken file) leave the pair in force serving
    until it expires: refusing every handshake would lock every operator out."""

    _SETTLE_S = 2.0

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self.paths = tuple(p for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p)
        self._seen = self._signatures()
        self._failure = ""
        #: Configurations loaded after the start (for tests and the log).
        self.reloads = 0

    def _signatures(self) -> tuple[tuple[int, ...] | None, ...]:
        return tuple(file_signature(p) for p in self.paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files as a configuration; OSError or ssl.SSLError when they do not load
        together (checked with the ssl module: gRPC would only fail the handshakes)."""
        import ssl

        tls = self.tls
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            check.load_verify_locations(cafile=tls.client_ca_file)
        return grpc.ssl_server_certificate_configuration(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
        )

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """What the start serves; OSError (``[api.tls]: cannot read certificate or key``) for
        files that cannot be read or do not load together."""
        return self._load()

    def on_handshake(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and load, else None (keep the one in
        force). Never raises: it runs inside gRPC's handshake."""
        import time

        try:
            seen = self._signatures()
            now = time.time()
            settled = all(s is not None and now - s[3] / 1e9 > self._SETTLE_S for s in seen)
            if seen == self._seen and settled:
                return None
            self._seen = seen
            try:
                fresh = self._load()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                if str(exc) != self._failure:
                    self._failure = str(exc)
                    log.warning(
                        "api: the [api.tls] files changed but cannot be loaded; the certificate "
                        "loaded before still serves: %s",
                        exc,
                    )
                return None
            self._failure = ""
            self.reloads += 1
            log.info("api: [api.tls] files loaded again; the new certificate serves")
            return fresh
        except Exception:  # a bug here must not fail every handshake
            log.exception("api: checking the [api.tls] files failed")
            return None


class EdgeApiServer:
    """The gRPC server around :class:`EdgeApiService`, with auth, health and reflection."""

    def __init__(
        self,
        facade: EdgeFacade,
        config: ApiConfig,
        *,
        site_id: str,
        clock: Clock,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.service = EdgeApiService(facade, site_id=site_id, clock=clock, store=store)
        mtls = config.tls is not None and config.tls.client_ca_file is not None
        tokens_file = (
            None
            if config.tokens_file is None
            else TokensFile(
                config.site_credentials or Credentials(), config.tokens_file, config.credentials
            )
        )
        self.auth = AuthInterceptor(config.credentials, mtls=mtls, tokens_file=tokens_file)
        self.health = health_aio.HealthServicer()
        self._server: aio.Server | None = None
        self.port = 0
        #: With [api.tls]: its files, loaded again when they change (no restart to renew).
        self.tls_files: _TlsFiles | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        server = aio.server(interceptors=[self.auth], options=SERVER_OPTIONS)
        self.service.allow_watches()
        pb_grpc.add_EdgeApiServicer_to_server(self.service, server)
        add_health(server, self.health, [SERVICE_NAME], reflection_on=self.config.reflection)
        tls = self.config.tls

        def credentials() -> grpc.ServerCredentials | None:
            if tls is None:
                return None
            self.tls_files = _TlsFiles(tls)
            return grpc.dynamic_ssl_server_credentials(
                self.tls_files.initial(),
                self.tls_files.on_handshake,
                require_client_authentication=tls.client_ca_file is not None,
            )

        port = bind(
            server,
            self.config.listen,
            credentials,
            error=ApiConfigError,
            tls_section="[api.tls]",
            where="[api] ",
        )
        await start_serving(server, self.health, [SERVICE_NAME])
        self._server = server
        self.port = int(port)
        log.info("api: EdgeApi listening on %s (port %d)", self.config.listen, port)
        if tls is None and self.config.credentials.tokens and not _loopback(self.config.listen):
            log.warning(
                "api: bearer tokens on %s without TLS cross the network in clear text: listen "
                "on loopback (behind a TLS-terminating proxy) or add [api.tls] (docs/api.md)",
                self.config.listen,
            )
        return self.port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Health NOT_SERVING, open watches ended (UNAVAILABLE: they never end by themselves and
        would hold the stop for all of ``grace_s``), then other calls get ``grace_s``."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.service.end_watches()
        await stop_serving(self._server, self.health, grace_s)
        await self.service.wait_levers(grace_s or 0.0)
        self._server = None
