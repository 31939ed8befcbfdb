"""``evcore edge``: the controller wired to the central system, the bus, the store and the API.

What this module owns: building and running the parts of one edge process in one ``TaskGroup`` —
the OCPP central system (events → controller), the controller loop, grid signals and cloud plans
from the bus, the local planner, the audit log and store (when their rooms provide them), and the
gRPC API over the controller's ``EdgeFacade``. Shutdown on a signal: stop the loop, the API, the
central system, then drain the bus.

What it must never do: decide or alter a setpoint (that is ``controller`` + the core), or block the
control loop on the network (every bus/API/store call here is bounded or runs beside the loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from evcore.clock import Clock
from evcore.edge.config import EdgeConfig, EdgeConfigError
from evcore.edge.controller import EdgeController, SentProfile
from evcore.edge.ports import AuditSink, ChargerGateway, CorePort
from evcore.edge.state import ChargerState, SiteState

log = logging.getLogger("evcore.edge")


def read_site_table(path: str | Path) -> dict[str, Any]:
    """The raw site file (TOML) as a dict; an error names the file."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SystemExit(f"evcore edge: site file {p} does not exist") from None
    except OSError as exc:
        raise SystemExit(f"evcore edge: cannot read site file {p}: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SystemExit(f"evcore edge: site file {p} is not valid TOML: {exc}") from None


def charger_states(site_table: Mapping[str, Any]) -> tuple[SiteState, list[str]]:
    """Per-charger state from the site file's ``[[chargers]]`` (ids, kind, min/max) and node ids.

    The core has already validated the topology (``load_site``); this only reads the fields the
    controller keeps per charger, with the defaults of docs/site-file.md.
    """
    specs: list[ChargerState] = []
    evse: dict[str, int] = {}
    site = site_table.get("site") or {}
    for ch in site_table.get("chargers", []):
        cid = str(ch["id"])
        is_dc = ch.get("kind", "ac") == "dc"
        if is_dc:
            lo, hi = float(ch.get("min_w", 0.0)), float(ch["max_w"])
        else:
            lo, hi = float(ch.get("min_a", 6.0)), float(ch["max_a"])
        spec = ChargerState(cid, str(ch.get("ocpp_id", cid)), is_dc, lo, hi)
        if not is_dc:
            v = float(ch.get("voltage_v") or site.get("voltage_ln_v") or 230.0)
            wiring = str(ch.get("wiring", "three_phase"))
            n_ph = len(ch.get("phases") or ()) if wiring == "three_phase" else 1
            spec.ac_w_per_a = v * (n_ph or 3)
            spec.ac_phases = n_ph or 3
        if is_dc:
            v_ln = float(ch.get("voltage_v") or site.get("voltage_ln_v") or 230.0)
            spec.dc_efficiency = float(ch.get("efficiency", 0.95))
            spec.dc_aux_w = float(ch.get("aux_w", 0.0))
            spec.dc_w_per_a = 3 * v_ln
        specs.append(spec)
        evse[cid] = int(ch.get("evse_id", 1))
    nodes = [str(n["id"]) for n in site_table.get("nodes", [])]
    return SiteState.from_chargers(specs, evse), nodes


def build_controller(
    site_table: Mapping[str, Any],
    *,
    core: CorePort,
    gateway: ChargerGateway,
    clock: Clock,
    cfg: EdgeConfig | None = None,
    audit: AuditSink | None = None,
    on_sent: Any = None,
    clock_offset_s: Callable[[str], float | None] | None = None,
) -> EdgeController:
    """A controller for the site (also the twin's entry point: pass its clock and gateway).
    ``clock_offset_s(charger_id)``: how far its station's clock runs from ours (e.g.
    ``CentralSystem.clock_offset_s``); a station ahead has its profiles refreshed that much
    earlier."""
    state, nodes = charger_states(site_table)
    if cfg is None:
        cfg = EdgeConfig.from_site(site_table)
    return EdgeController(
        state=state,
        core=core,
        gateway=gateway,
        clock=clock,
        cfg=cfg,
        node_ids=nodes,
        grid_node=next(
            (str(n["id"]) for n in site_table.get("nodes", []) if not n.get("parent")), None
        ),
        audit=audit,
        on_sent=on_sent,
        config_version=_config_version(site_table),
        clock_offset_s=clock_offset_s,
    )


def audit_journal_path(cfg: EdgeConfig, site_path: str | Path | None) -> Path | None:
    """Where audit records the store does not take in time are journaled: ``[edge]
    audit_journal`` (relative to the site file's directory), by default ``evcore-audit-journal``
    beside the site file. A site given as a table (no file) has a journal only when
    ``audit_journal`` is an absolute path."""
    name = Path(cfg.audit_journal or "evcore-audit-journal")
    if name.is_absolute():
        return name
    if site_path is None:
        return None
    return Path(site_path).resolve().parent / name


def writable_dir(directory: Path, key: str) -> None:
    """Make ``directory`` if need be and check a file can be written in it, or EdgeConfigError
    naming ``key``. The audit journal found read-only only when the store failed (an /etc beside
    the site file under systemd's ProtectSystem) would stop every decision: none may leave
    unrecorded. So the edge does not start without it."""
    import tempfile

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".evcore-write-check-"):
            pass
    except OSError as exc:
        raise EdgeConfigError(
            f"{key}: cannot write in {directory} ({exc.strerror or exc}); give a path in a "
            "writable state directory, e.g. /var/lib/evcore/audit-journal"
        ) from None


def _config_version(site_table: Mapping[str, Any]) -> str:
    import hashlib
    import json

    blob = json.dumps(site_table, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


class EdgeApp:
    """One edge process: ``await EdgeApp.from_file(path, clock).run()`` until ``stop()``."""

    def __init__(
        self,
        site: Any,
        site_table: Mapping[str, Any],
        *,
        clock: Clock,
        cfg: EdgeConfig | None = None,
        bus: Any = None,
        store: Any = None,
        audit: AuditSink | None = None,
        on_sent: Any = None,
    ) -> None:
        from evcore.edge.coreio import RustCore
        from evcore.metrics import MetricsConfig
        from evcore.ocpp import CentralSystem

        # Files named in the site file are relative to its directory.
        base = getattr(site, "path", None)
        site_dir = Path(base).resolve().parent if base else Path.cwd()
        #: ``[metrics]`` (None: no endpoint); checked first so a bad one stops the edge at load.
        self.metrics_config = MetricsConfig.from_section(site_table.get("metrics"), site_dir)
        from evcore.edge.cloudlink import CloudLinkConfig, CloudLinkConfigError

        #: ``[cloud]`` (None: no link to the cloud), checked at load like ``[metrics]``.
        self.cloud_config = CloudLinkConfig.from_section(site_table.get("cloud"), site_dir)
        if self.cloud_config is not None and store is None:
            raise CloudLinkConfigError(
                "[cloud] needs the edge's store (the audit chain is uploaded from it)"
            )
        self.site = site
        self.site_table = site_table
        self.clock = clock
        self.bus = bus
        self.store = store
        self.central = CentralSystem(site, clock=clock, bus=bus, store=store)
        self.core = RustCore(site, site_table, clock_offset_s=self.central.clock_offset_s)
        self.recorder: Any = None
        if audit is None and store is not None:
            from evcore.audit.log import AuditLog
            from evcore.edge.recording import AuditRecorder

            if cfg is None:
                cfg = EdgeConfig.from_site(site_table)
            site_id = str(site_table["site"]["id"])
            audit_log = AuditLog(store, clock=clock, bus=bus, site_id=site_id if bus else "")
            # The store gets half the controller's audit budget; the journal write the rest.
            self.recorder = AuditRecorder(
                audit_log,
                store,
                journal_path=audit_journal_path(cfg, getattr(site, "path", None)),
                append_timeout_s=max(cfg.audit_timeout_s / 2, 1e-3),
            )
            audit = self.recorder
        self.controller = build_controller(
            site_table,
            core=self.core,
            gateway=self.central,
            clock=clock,
            cfg=cfg,
            audit=audit,
            on_sent=on_sent,
            clock_offset_s=self.central.clock_offset_s,
        )
        self.central.add_listener(self.controller.on_event)
        self.publisher: Any = None
        if bus is not None:
            from evcore.edge.publishing import EdgePublisher

            self.publisher = EdgePublisher(
                bus, str(site_table["site"]["id"]), self.controller, clock
            )
            self.publisher.install()
        self.sessions: Any = None
        if store is not None:
            from evcore.edge.recording import SessionKeeper

            self.sessions = SessionKeeper(store, clock)
            self.controller.on_session = self.sessions
            self.controller.on_session_energy = self.sessions.note_energy
            self.controller.on_late_session = self.sessions.late
        from evcore.edge.facade import ControllerFacade
        from evcore.edge.signals import BookWriter, book_fallback_path

        #: Writes the curtailment book to the store (bus and API signals); retried while down.
        self.book = (
            None
            if store is None
            else BookWriter(
                self.controller,
                store,
                fallback=book_fallback_path(
                    audit_journal_path(self.controller.cfg, getattr(site, "path", None))
                ),
            )
        )
        self.facade = ControllerFacade(self.controller, site=site, book=self.book, store=store)
        if self.recorder is not None:
            self.recorder.on_durable = self.facade.record_decision
        from evcore.edge.planning import LocalPlanner, PlannerSection

        self.planner = LocalPlanner(
            site, self.controller, PlannerSection.from_table(site_table.get("planner"))
        )
        self.api: Any = None
        self.api_port = 0
        self.metrics: Any = None
        self.metrics_port = 0
        #: The link to the cloud (``[cloud]``): runs beside the loop, never holds it up.
        self.cloud: Any = None
        if self.cloud_config is not None:
            from evcore.cloud.topology import topology_from_site
            from evcore.edge.cloudlink import CloudLink

            self.cloud = CloudLink(
                self.cloud_config,
                site_id=str(site_table["site"]["id"]),
                store=store,
                clock=clock,
                topology=topology_from_site(site, config_version=_config_version(site_table)),
                ctrl=self.controller,
            )
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    @classmethod
    def from_file(cls, path: str | Path, clock: Clock, **kwargs: Any) -> EdgeApp:
        from evcore.site import load_site

        table = read_site_table(path)
        site = load_site(path)
        if "store" not in kwargs:
            from evcore.store import open_store

            kwargs["store"] = open_store(table.get("store"), Path(path).resolve().parent)
        return cls(site, table, clock=clock, **kwargs)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        ctrl = self.controller
        if self.recorder is not None:
            journal = audit_journal_path(ctrl.cfg, getattr(self.site, "path", None))
            if journal is not None:
                writable_dir(journal.parent, "[edge].audit_journal")
        if self.store is not None:
            from evcore.edge.recording import recover, recover_unavailable

            await self.store.open()
            n = await recover(ctrl.state, self.store, self.sessions)
            # Chargers an operator made unavailable stay held at 0 A (a restart gave them back).
            await recover_unavailable(ctrl.state, self.store)
            if n:
                log.info("recovered %d last setpoints from the store", n)
            # Curtailments in force that the grid consumer acknowledged before a restart are in
            # the store (or, after a store outage, its local copy), not on the bus any more: back
            # in the book before the first decision.
            assert self.book is not None
            k = await self.book.load()
            if k:
                log.info("restored %d curtailment(s) from the store", k)
            # The month's demand peak already paid for (the local planner's demand windows).
            self.planner.store = self.store
            await self.planner.load_windows()
        if self.bus is not None:
            await self.bus.start()
        if self.recorder is not None and self.recorder.journal_pending:
            # Records a crash (or a store outage) left in the journal go first in the chain,
            # before the loop decides (after the bus started: the audit log publishes them).
            left = await self.recorder.replay_journal()
            log.info("audit journal: %d record(s) still pending after start", left)
        await self.central.start()
        subs: list[Any] = []
        try:
            if self.bus is not None:
                from evcore.edge.signals import GRID_DURABLE, subscribe_signals

                # Durable: a curtailment published while the edge was down applies when it starts;
                # the book is stored before the ack, unless the store is failing (then retried).
                subs = await subscribe_signals(
                    self.bus, ctrl, grid_durable=GRID_DURABLE, writer=self.book
                )
            if "api" in self.site_table:
                from evcore.api import ApiConfig, EdgeApiServer

                base = getattr(self.site, "path", None)
                site_dir = Path(base).parent if base else Path.cwd()
                api_config = ApiConfig.from_section(self.site_table.get("api"), site_dir)
                if api_config.enabled:  # `enabled = false`: no port open (it was served anyway)
                    self.api = EdgeApiServer(
                        self.facade,
                        api_config,
                        site_id=str(self.site_table["site"]["id"]),
                        clock=self.clock,
                        store=self.store,
                    )
                    self.api_port = await self.api.start()
                else:
                    log.info("api: [api] enabled = false: not served")
            if self.metrics_config is not None:
                from evcore.metrics import MetricsServer, Registry
                from evcore.metrics.edge import edge_collector

                registry = Registry()
                registry.register(edge_collector(self))
                self.metrics = MetricsServer.from_config(registry, self.metrics_config)
                self.metrics_port = await self.metrics.start()
            async with asyncio.TaskGroup() as tg:
                loop_task = tg.create_task(ctrl.run())
                plan_task = tg.create_task(self.planner.run())
                retention: asyncio.Task[None] | None = None
                if self.store is not None:
                    from evcore.store import run_retention

                    retention = tg.create_task(run_retention(self.store, self.clock))
                rewrite: asyncio.Task[None] | None = None
                if self.book is not None:
                    rewrite = tg.create_task(self.book.run())
                mover: asyncio.Task[None] | None = None
                if self.recorder is not None and self.recorder.journal is not None:
                    mover = tg.create_task(self.recorder.keep_moving())
                link: asyncio.Task[None] | None = None
                if self.cloud is not None:
                    link = tg.create_task(self.cloud.run())
                self.ready.set()
                await self._stop.wait()
                if self.api is not None:
                    # First, while the controller still decides: health NOT_SERVING, watches
                    # ended, calls in flight (a lever among them) finished within the grace.
                    # Stopped after the controller (and the planner's wait for a plan mid-solve,
                    # up to plan_budget_s + 2 s), a lever was answered OK and applied to a state
                    # no decision read again, while health said SERVING (review 2026-12-06).
                    try:
                        await self.api.stop(grace_s=2.0)
                    except Exception:
                        log.exception("api: stopping the edge API failed")
                ctrl.stop()
                self.planner.stop()
                if link is not None:
                    # Not waited for: a call in flight to a slow cloud would hold the stop up
                    # to its timeout (review 2026-12-05: 19 s with timeout_s 20).
                    self.cloud.stop()
                    link.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await link
                if retention is not None:
                    retention.cancel()
                if mover is not None:
                    mover.cancel()
                if rewrite is not None:
                    rewrite.cancel()
                await loop_task
                await plan_task
        finally:
            if self.cloud is not None:
                with contextlib.suppress(Exception):
                    await self.cloud.close()
            if self.metrics is not None:
                with contextlib.suppress(Exception):
                    await self.metrics.stop()
            if self.api is not None:
                with contextlib.suppress(Exception):
                    await self.api.stop(grace_s=2.0)
            for s in subs:
                with contextlib.suppress(Exception):
                    await s.stop()
            await self.central.stop()
            if self.recorder is not None:
                await self.recorder.drain()
                with contextlib.suppress(Exception):
                    res = self.recorder.audit_log.close()
                    if inspect.isawaitable(res):
                        await res
            if self.sessions is not None:
                await self.sessions.drain()
            if self.publisher is not None:
                await self.publisher.drain()
            if self.bus is not None:
                with contextlib.suppress(Exception):
                    await self.bus.close()
            if self.book is not None:
                await self.book.aclose()
                if self.book.dirty:  # a last try (bounded) before the store closes
                    await self.book.save()
            if self.store is not None:
                with contextlib.suppress(Exception):
                    await self.store.close()


def log_sent(sent: SentProfile) -> None:
    log.debug(
        "sent %s %s %.1f (%s, decision %d)",
        sent.charger_id,
        sent.purpose,
        sent.value,
        sent.kind.value,
        sent.decision,
    )
