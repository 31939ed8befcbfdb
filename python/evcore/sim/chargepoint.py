"""Simulated OCPP charge points (1.6J and 2.0.1), many per process.

Owns one simulated station: its WebSocket session to a central system, its connectors (EVSEs) with
an EV model each, the charging profiles it holds (replaced or refused by its version's rules) and
the composite schedule it applies (stack levels, purposes, validity, TxDefault fallback, after a
settable delay), its meter (registers, power, per-terminal current) and the MeterValues it reports,
and misbehaviour on command (disconnect, go offline and replay, ignore profiles, send garbage, stop
reporting, lose profiles on reboot). It validates every CALL the central system sends against the
OCPP schemas and records violations.

It talks to the rest only through its OCPP socket; time comes from the injected clock.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import math
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from evcore.clock import Clock
from evcore.ocpp import validation
from evcore.ocpp.metering import parse_timestamp
from evcore.ocpp.v16 import iso
from evcore.sim.ev import EV, MIN_PILOT_A

LOG = logging.getLogger("evcore.sim")

_PURPOSE = {
    "ChargePointMaxProfile": "max",
    "ChargingStationMaxProfile": "max",
    "TxDefaultProfile": "default",
    "TxProfile": "tx",
}
_PURPOSE_201 = {
    "max": "ChargingStationMaxProfile",
    "default": "TxDefaultProfile",
    "tx": "TxProfile",
}


@dataclass
class HeldProfile:
    """A charging profile as the simulated station keeps it."""

    id: int
    evse: int
    purpose: str  # "max", "default" or "tx"
    stack: int
    tx_id: str | None
    kind: str
    valid_from: float | None
    valid_to: float | None
    start: float | None
    duration: float | None
    unit: str
    periods: list[tuple[float, float, int | None]]
    received_at: float = 0.0
    #: 2.0.1 chargingLimitSource: who installed it (a central system: "CSO").
    limit_source: str = "CSO"

    def to_2_0_1(self) -> dict[str, Any]:
        """This profile as a 2.0.1 ``ChargingProfileType`` (ReportChargingProfiles)."""
        sched: dict[str, Any] = {
            "id": self.id,
            "chargingRateUnit": self.unit,
            "chargingSchedulePeriod": [
                {"startPeriod": int(sp), "limit": limit}
                | ({"numberPhases": phases} if phases is not None else {})
                for sp, limit, phases in self.periods
            ],
        }
        if self.start is not None:
            sched["startSchedule"] = iso(self.start)
        if self.duration is not None:
            sched["duration"] = int(self.duration)
        out: dict[str, Any] = {
            "id": self.id,
            "stackLevel": self.stack,
            "chargingProfilePurpose": _PURPOSE_201[self.purpose],
            "chargingProfileKind": self.kind,
            "chargingSchedule": [sched],
        }
        if self.valid_from is not None:
            out["validFrom"] = iso(self.valid_from)
        if self.valid_to is not None:
            out["validTo"] = iso(self.valid_to)
        if self.tx_id is not None:
            out["transactionId"] = self.tx_id
        return out


def _overlap(a: HeldProfile, b: HeldProfile) -> bool:
    """Whether two profiles' validity periods overlap (without ``validFrom`` a profile is valid
    from its receipt, without ``validTo`` for good)."""
    a_from = a.valid_from if a.valid_from is not None else a.received_at
    b_from = b.valid_from if b.valid_from is not None else b.received_at
    a_to = a.valid_to if a.valid_to is not None else math.inf
    b_to = b.valid_to if b.valid_to is not None else math.inf
    return a_from < b_to and b_from < a_to


def _rejected(reason_code: str, info: str) -> dict[str, Any]:
    return {"status": "Rejected", "statusInfo": {"reasonCode": reason_code, "additionalInfo": info}}


def _water_fill(total: float, wants: dict[int, float]) -> dict[int, float]:
    """Max-min fair shares of ``total`` among ``wants`` (none above its want)."""
    out: dict[int, float] = {}
    left = max(0.0, total)
    pending = sorted(wants.items(), key=lambda kv: kv[1])
    while pending:
        fair = left / len(pending)
        key, want = pending.pop(0)
        give = min(max(0.0, want), fair)
        out[key] = give
        left -= give
    return out


class OffsetClock:
    """A station's own clock: ``base`` shifted by ``offset_s`` (> 0 runs ahead). Only the time
    of day is off (timestamps, profile schedules); it sleeps and measures ages like ``base``."""

    def __init__(self, base: Clock, offset_s: float) -> None:
        self.base = base
        self.offset_s = offset_s

    def now(self) -> float:
        return self.base.now() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


class TxRef:
    """One transaction's id as the station learns it (1.6: from the StartTransaction answer)."""

    __slots__ = ("id",)

    def __init__(self, tx_id: str | None = None) -> None:
        self.id = tx_id


@dataclass
class SimConnector:
    """One EVSE with one connector and its electrical model."""

    evse_id: int = 1
    connector_id: int = 1
    kind: str = "ac"
    wiring: str = "three_phase"
    voltage_v: float = 230.0
    max_a: float = 32.0
    steps_a: tuple[float, ...] | None = None
    max_w: float = 50_000.0
    #: DC: the lowest output the power stage runs at (0: none).
    min_w: float = 0.0
    #: DC: what it does with a limit above 0 but below ``min_w``: ``"stop"`` (offers nothing,
    #: as an AC pilot below 6 A) or ``"minimum"`` (runs at ``min_w``, above the limit).
    below_min_w: str = "stop"
    efficiency: float = 0.95
    aux_w: float = 0.0
    charger_id: str | None = None
    #: The energy register to the car (``location`` Outlet, OCPP's default, reported without
    #: one): a DC charger's DC output, what its battery takes.
    register_wh: float = 1_000_000.0
    #: DC: the AC input meter (``location`` Inlet): the output over the efficiency plus the
    #: auxiliary load while it charges.
    inlet_register_wh: float = 1_000_000.0
    #: DC: the registers it reports, ``Outlet`` and/or ``Inlet``; a 1.6 meterStart / meterStop
    #: is the first one's. (AC: the outlet's only.)
    dc_registers: tuple[str, ...] = ("Outlet", "Inlet")
    # state
    ev: EV | None = None
    id_tag: str = "EVCORE-SIM"
    status: str = "Available"
    tx_ref: TxRef = field(default_factory=TxRef)
    tx_active: bool = False
    tx_start_register_wh: float = 0.0
    tx_started_at: float | None = None
    available: bool = True
    #: What the charger currently allows (A per phase for AC, W for DC), after steps and pilot.
    offered: float = 0.0
    terminal_a: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    power_w: float = 0.0
    #: When a transaction stopped between two steps, the instant its energy was counted to
    #: (monotonic; the next step counts from there); None: from the station's last step.
    energy_to: float | None = None

    @property
    def tx_id(self) -> str | None:
        return self.tx_ref.id

    @property
    def terminals(self) -> int:
        return 1 if self.wiring in ("line_to_neutral", "line_to_line") else 3

    @property
    def hardware_limit(self) -> float:
        return self.max_w if self.kind == "dc" else self.max_a

    @property
    def transaction_register_wh(self) -> float:
        """The register a 1.6 meterStart / meterStop gives: the outlet's, or the inlet's for a
        DC charger that reports only that one."""
        if self.kind == "dc" and self.dc_registers and self.dc_registers[0] == "Inlet":
            return self.inlet_register_wh
        return self.register_wh


def offer(c: SimConnector, limit: float) -> float:
    """What ``c`` offers under ``limit`` (its units: A per phase for AC, W for DC): AC the
    highest of its steps at or below the limit and 0 below the 6 A pilot minimum; DC 0 below
    ``min_w``, or ``min_w`` when it runs at its minimum. The in-process twin's chargers offer
    the same (``evcore.sim.twin.SitePlant``)."""
    if not c.available:
        return 0.0
    if c.kind == "dc":
        offered = max(0.0, min(limit, c.max_w))
        if 0.0 < offered < c.min_w:
            offered = c.min_w if c.below_min_w == "minimum" else 0.0
        return offered
    allowed = max(0.0, min(limit, c.max_a))
    if c.steps_a:
        allowed = max((s for s in c.steps_a if s <= allowed + 1e-9), default=0.0)
    return allowed if allowed >= MIN_PILOT_A else 0.0


@dataclass
class Misbehaviour:
    ignore_profiles: bool = False  # answer Accepted, never apply
    reject_profiles: bool = False  # answer Rejected
    stop_reporting: bool = False  # no MeterValues
    lose_profiles_on_reboot: bool = False
    refuse_config_keys: set[str] = field(default_factory=set)  # ChangeConfiguration/SetVariables
    unanswered_actions: set[str] = field(default_factory=set)  # never answer these CALLs
    lose_answer_to: set[str] = field(default_factory=set)  # drop the link when this answer arrives
    #: CALLs of these actions wait for ``answer_gate`` before they are answered.
    gated_actions: set[str] = field(default_factory=set)
    answer_gate: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Out:
    action: str
    build: Callable[[], dict[str, Any]]
    tx_related: bool
    future: asyncio.Future[dict[str, Any] | None] | None = None
    on_result: Callable[[dict[str, Any]], None] | None = None


_SIM_ACTIONS_16 = (
    "SetChargingProfile ClearChargingProfile GetCompositeSchedule RemoteStartTransaction "
    "RemoteStopTransaction ChangeAvailability Reset TriggerMessage GetConfiguration "
    "ChangeConfiguration UnlockConnector DataTransfer"
).split()
_SIM_ACTIONS_201 = (
    "SetChargingProfile ClearChargingProfile GetCompositeSchedule RequestStartTransaction "
    "RequestStopTransaction ChangeAvailability Reset TriggerMessage GetVariables SetVariables "
    "UnlockConnector DataTransfer GetChargingProfiles"
).split()


class SimChargePoint:
    """A simulated station with one or more connectors, speaking OCPP ``version``."""

    def __init__(
        self,
        ocpp_id: str,
        connectors: list[SimConnector],
        *,
        url: str,
        clock: Clock,
        version: str = "1.6",
        password: str | None = None,
        username: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        apply_delay_s: float = 1.0,
        tick_s: float = 0.1,
        sample_interval_s: float = 10.0,
        reconnect_delay_s: float = 1.0,
        call_timeout_s: float = 10.0,
        vendor: str = "evcore",
        model: str = "SimCP",
        serial: str | None = None,
        subprotocols: list[str] | None = None,
        clock_offset_s: float = 0.0,
    ) -> None:
        if version not in ("1.6", "2.0.1"):
            raise ValueError(f"version must be '1.6' or '2.0.1', got {version!r}")
        if not connectors:
            raise ValueError("a station needs at least one connector")
        self.ocpp_id = ocpp_id
        self.version = version
        self.connectors = {c.evse_id: c for c in connectors}
        self.url = url
        self._base_clock = clock
        self.clock: Clock = clock
        self.clock_offset_s = clock_offset_s
        self.password = password
        self.username = username or ocpp_id
        self.ssl_context = ssl_context
        self.apply_delay_s = apply_delay_s
        self.tick_s = tick_s
        self.sample_interval_s = sample_interval_s
        self.reconnect_delay_s = reconnect_delay_s
        self.call_timeout_s = call_timeout_s
        self.vendor, self.model, self.serial = vendor, model, serial or ocpp_id
        self.subprotocols = subprotocols or ["ocpp1.6" if version == "1.6" else "ocpp2.0.1"]
        self.misbehaviour = Misbehaviour()
        #: Measurands the station reports (a fresh station reports only the register).
        self.measurands: list[str] = ["Energy.Active.Import.Register"]
        self.config: dict[str, str] = {
            "MeterValuesSampledData": "Energy.Active.Import.Register",
            "MeterValueSampleInterval": str(int(sample_interval_s)),
            "HeartbeatInterval": "300",
        }
        self.variables: dict[str, str] = {
            "SampledDataCtrlr.TxUpdatedMeasurands": "Energy.Active.Import.Register",
            "SampledDataCtrlr.TxUpdatedInterval": str(int(sample_interval_s)),
            "AlignedDataCtrlr.Measurands": "Energy.Active.Import.Register",
            "AlignedDataCtrlr.Interval": "0",
        }
        self.profiles: list[HeldProfile] = []
        self._pending_profiles: list[tuple[float, HeldProfile]] = []
        # observations for tests and scenarios
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.invalid_calls: list[str] = []
        self.call_errors: list[list[Any]] = []
        self.results: list[tuple[str, dict[str, Any]]] = []
        #: What the station answered to the central system's CALLs, in order: (action, payload).
        self.answers: list[tuple[str, dict[str, Any]]] = []
        self.last_error: BaseException | None = None
        self.boot_status: str | None = None
        self.connections = 0
        self.connected = asyncio.Event()
        # internals
        self._ws: ClientConnection | None = None
        self._outbox: deque[_Out] = deque()
        self._outbox_changed = asyncio.Event()
        self._outbox_drained = asyncio.Event()
        self._pending: dict[str, tuple[str, asyncio.Future[list[Any]]]] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(0)
        self._tx_counter = itertools.count(1)
        self._need_boot = True
        self._stopping = False
        self._offline_until = 0.0
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_tick: float | None = None
        self._last_sample: float | None = None
        self._force_drop = asyncio.Event()
        self._side_tasks: set[asyncio.Future[None]] = set()

    @property
    def clock_offset_s(self) -> float:
        """How far the station's clock is from the injected one (s; > 0 runs ahead): its
        timestamps and the profiles it applies follow its own clock (``OffsetClock``)."""
        return self.clock.offset_s if isinstance(self.clock, OffsetClock) else 0.0

    @clock_offset_s.setter
    def clock_offset_s(self, offset_s: float) -> None:
        self.clock = OffsetClock(self._base_clock, offset_s) if offset_s else self._base_clock

    @property
    def station_unit(self) -> str:
        """The unit of the station's own composite schedule: W with a DC EVSE, else A."""
        return "W" if any(c.kind == "dc" for c in self.connectors.values()) else "A"

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._run(), name=f"sim-{self.ocpp_id}"),
            asyncio.create_task(self._ticker(), name=f"sim-tick-{self.ocpp_id}"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        if self._ws is not None:
            await self._ws.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def wait_connected(self, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout_s)

    async def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued message was sent and answered."""

        async def idle() -> None:
            while self._outbox:
                self._outbox_drained.clear()
                await self._outbox_drained.wait()

        await asyncio.wait_for(idle(), timeout_s)

    def _headers(self) -> dict[str, str]:
        if self.password is None:
            return {}
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    async def _run(self) -> None:
        while not self._stopping:
            wait = self._offline_until - self.clock.now()
            if wait > 0:
                await self.clock.sleep(wait)
                continue
            try:
                async with connect(
                    self.url,
                    subprotocols=self.subprotocols,  # type: ignore[arg-type]
                    additional_headers=self._headers(),
                    ssl=self.ssl_context,
                    open_timeout=10,
                    compression=None,
                    ping_interval=None,
                ) as ws:
                    self._ws = ws
                    self.connections += 1
                    self._force_drop.clear()
                    await self._session(ws)
            except (OSError, InvalidStatus, ConnectionClosed, TimeoutError) as exc:
                self.last_error = exc
            finally:
                self._ws = None
                self.connected.clear()
                for _, fut in self._pending.values():
                    if not fut.done():
                        fut.cancel()
                self._pending.clear()
            if self._stopping:
                break
            await self.clock.sleep(self.reconnect_delay_s)

    async def _session(self, ws: ClientConnection) -> None:
        receiver = asyncio.create_task(self._receive(ws))
        sender = asyncio.create_task(self._sender(ws))
        dropper = asyncio.create_task(self._force_drop.wait())
        try:
            if self._need_boot:
                self._enqueue_front_boot()
            self.connected.set()
            await asyncio.wait({receiver, sender, dropper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (receiver, sender, dropper):
                t.cancel()
            await asyncio.gather(receiver, sender, dropper, return_exceptions=True)
            if not ws.state.name == "CLOSED":
                await ws.close()

    # ---- misbehaviour and control ----------------------------------------------------------
    async def disconnect(self) -> None:
        """Drop the connection now; the station reconnects after ``reconnect_delay_s``."""
        self._force_drop.set()

    async def go_offline(self, duration_s: float) -> None:
        """Drop the connection and stay away ``duration_s``; transaction messages queue up and are
        replayed in order when the station is back (as real stations do)."""
        self._offline_until = self.clock.now() + duration_s
        self._force_drop.set()

    async def reboot(self) -> None:
        """Restart: drop the link, boot again; lose profiles if so misbehaving."""
        if self.misbehaviour.lose_profiles_on_reboot:
            self.profiles.clear()
            self._pending_profiles.clear()
        self._need_boot = True
        self._force_drop.set()

    async def send_raw(self, text: str) -> None:
        """Send an arbitrary frame (garbage) on the live connection."""
        if self._ws is None:
            raise RuntimeError(f"{self.ocpp_id}: not connected")
        await self._ws.send(text)

    def plug_in(
        self, evse_id: int, ev: EV, *, id_tag: str = "EVCORE-SIM", start: bool = True
    ) -> None:
        c = self.connectors[evse_id]
        if c.ev is not None:
            raise RuntimeError(f"{self.ocpp_id} EVSE {evse_id}: a vehicle is already plugged in")
        c.ev = ev
        c.id_tag = id_tag
        self._set_status(c, "Preparing")
        if start:
            self._start_transaction(c)

    def unplug(self, evse_id: int, *, reason: str = "EVDisconnected") -> None:
        c = self.connectors[evse_id]
        if c.tx_active:
            self._stop_transaction(c, reason)
        c.ev = None
        self._set_status(c, "Available")

    def terminal_a(self, evse_id: int) -> tuple[float, float, float]:
        t = self.connectors[evse_id].terminal_a
        return (t[0], t[1], t[2])

    # ---- outgoing ------------------------------------------------------------------------
    def _enqueue(self, out: _Out, *, front: bool = False) -> None:
        if self._ws is None and not out.tx_related:
            return  # offline: only transaction messages are kept (OCPP offline behaviour)
        if front:
            self._outbox.appendleft(out)
        else:
            self._outbox.append(out)
        self._outbox_changed.set()

    def call(self, action: str, payload: dict[str, Any]) -> asyncio.Future[dict[str, Any] | None]:
        """Queue one CALL; the future gets the CALLRESULT payload (None on CALLERROR)."""
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Out(action, lambda: payload, False, fut))
        if self._ws is None and not fut.done():
            fut.set_result(None)
        return fut

    def _enqueue_front_boot(self) -> None:
        if self.version == "1.6":
            payload: dict[str, Any] = {
                "chargePointVendor": self.vendor,
                "chargePointModel": self.model,
                "chargePointSerialNumber": self.serial,
            }
        else:
            payload = {
                "reason": "PowerUp",
                "chargingStation": {
                    "vendorName": self.vendor,
                    "model": self.model,
                    "serialNumber": self.serial,
                },
            }

        def booted(result: dict[str, Any]) -> None:
            self.boot_status = result.get("status")
            if self.boot_status == "Accepted":
                self._need_boot = False
                for c in self.connectors.values():
                    self._set_status(c, c.status, force=True)

        self._outbox.appendleft(_Out("BootNotification", lambda: payload, True, on_result=booted))
        self._outbox_changed.set()

    async def _sender(self, ws: ClientConnection) -> None:
        while True:
            while not self._outbox:
                self._outbox_drained.set()
                self._outbox_changed.clear()
                await self._outbox_changed.wait()
            out = self._outbox[0]
            if self._need_boot and out.action != "BootNotification":
                self._enqueue_front_boot()
                continue
            payload = out.build()
            unique_id = f"{self.ocpp_id}-{next(self._ids)}"
            fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._pending[unique_id] = (out.action, fut)
            await ws.send(json.dumps([2, unique_id, out.action, payload]))
            timer: asyncio.Future[None] = asyncio.ensure_future(
                self.clock.sleep(self.call_timeout_s)
            )
            try:
                await asyncio.wait(
                    cast(list[asyncio.Future[Any]], [fut, timer]),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                timer.cancel()
            self._pending.pop(unique_id, None)
            if not fut.done():
                fut.cancel()
                LOG.warning("%s: no answer to %s", self.ocpp_id, out.action)
                self._outbox.popleft()
                if out.future is not None and not out.future.done():
                    out.future.set_result(None)
                continue
            frame = fut.result()
            if out.action in self.misbehaviour.lose_answer_to:
                # The answer "gets lost": drop the link; the message stays queued and is resent.
                self.misbehaviour.lose_answer_to.discard(out.action)
                self._force_drop.set()
                return
            self._outbox.popleft()
            if frame[0] == 3:
                result = frame[2]
                self.results.append((out.action, result))
                if out.on_result is not None:
                    out.on_result(result)
                if out.future is not None and not out.future.done():
                    out.future.set_result(result)
            else:
                self.call_errors.append(frame)
                if out.future is not None and not out.future.done():
                    out.future.set_result(None)

    # ---- incoming ------------------------------------------------------------------------
    async def _receive(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                msg = json.loads(raw)
            except ValueError:
                self.invalid_calls.append(f"not JSON: {raw!r}")
                continue
            if not isinstance(msg, list) or not msg:
                self.invalid_calls.append(f"not an array: {raw!r}")
                continue
            if msg[0] in (3, 4):
                entry = self._pending.get(msg[1])
                if entry is not None and not entry[1].done():
                    entry[1].set_result(msg)
                elif msg[0] == 4:
                    self.call_errors.append(msg)
                continue
            if msg[0] == 2 and len(msg) == 4:
                await self._handle_call(ws, msg[1], msg[2], msg[3])

    async def _handle_call(
        self, ws: ClientConnection, unique_id: str, action: str, payload: dict[str, Any]
    ) -> None:
        self.received.append((action, payload))
        if action in self.misbehaviour.unanswered_actions:
            return
        if action in self.misbehaviour.gated_actions:
            await self.misbehaviour.answer_gate.wait()
        handlers = _SIM_ACTIONS_16 if self.version == "1.6" else _SIM_ACTIONS_201
        if action not in handlers:
            await ws.send(json.dumps([4, unique_id, "NotImplemented", f"sim has no {action}", {}]))
            return
        try:
            validation.validate(self.version, action, payload, response=False)
        except (validation.SchemaError, KeyError) as exc:
            self.invalid_calls.append(f"{action}: {exc}")
            code = getattr(exc, "code", "FormationViolation")
            await ws.send(json.dumps([4, unique_id, code, str(exc), {}]))
            return
        after: list[Callable[[], None]] = []
        response = getattr(self, "_on_" + action)(payload, after)
        validation.validate(self.version, action, response, response=True)
        self.answers.append((action, response))
        await ws.send(json.dumps([3, unique_id, response]))
        for fn in after:
            fn()

    # ---- transactions and status ---------------------------------------------------------
    def _set_status(self, c: SimConnector, status: str, *, force: bool = False) -> None:
        if c.status == status and not force:
            return
        c.status = status
        now = iso(self.clock.now())
        if self.version == "1.6":
            payload: dict[str, Any] = {
                "connectorId": c.evse_id,
                "errorCode": "NoError",
                "status": status,
                "timestamp": now,
            }
        else:
            status201 = {
                "Preparing": "Occupied",
                "Charging": "Occupied",
                "SuspendedEV": "Occupied",
                "SuspendedEVSE": "Occupied",
                "Finishing": "Occupied",
            }.get(status, status)
            payload = {
                "timestamp": now,
                "connectorStatus": status201,
                "evseId": c.evse_id,
                "connectorId": c.connector_id,
            }
        self._enqueue(_Out("StatusNotification", lambda: payload, False))

    def _meter_value(self, c: SimConnector, context: str, *, full: bool = True) -> dict[str, Any]:
        sampled: list[dict[str, Any]] = []

        def add(
            measurand: str,
            value: float,
            unit: str,
            phase: str | None = None,
            location: str | None = None,
        ) -> None:
            sv: dict[str, Any] = {"measurand": measurand, "context": context}
            if c.kind == "dc" and measurand in ("Current.Import", "Power.Active.Import"):
                location = "Inlet"  # the grid side: line currents, rectifier input
            if location is not None:
                sv["location"] = location
            if self.version == "1.6":
                sv["value"] = f"{value:.3f}"
                sv["unit"] = unit
            else:
                sv["value"] = round(value, 3)
                sv["unitOfMeasure"] = {"unit": unit}
            if phase is not None:
                sv["phase"] = phase
            sampled.append(sv)

        measurands = set(self.measurands) if full else {"Energy.Active.Import.Register"}
        if "Energy.Active.Import.Register" in measurands:
            if c.kind != "dc":
                add("Energy.Active.Import.Register", c.register_wh, "Wh")
            for where in c.dc_registers if c.kind == "dc" else ():
                if where == "Outlet":  # the default location: the DC energy into the car
                    add("Energy.Active.Import.Register", c.register_wh, "Wh")
                else:
                    add("Energy.Active.Import.Register", c.inlet_register_wh, "Wh", None, "Inlet")
        if "Power.Active.Import" in measurands:
            add("Power.Active.Import", c.power_w, "W")
        if "Current.Import" in measurands:
            for i in range(c.terminals):
                add("Current.Import", c.terminal_a[i], "A", f"L{i + 1}")
        if "Current.Offered" in measurands and c.kind == "ac":
            add("Current.Offered", c.offered, "A")
        if "SoC" in measurands and c.ev is not None:
            add("SoC", c.ev.soc_percent, "Percent")
        return {"timestamp": iso(self.clock.now()), "sampledValue": sampled}

    def _start_transaction(self, c: SimConnector) -> None:
        c.tx_active = True
        c.tx_start_register_wh = c.register_wh
        c.tx_started_at = self.clock.now()
        offline = self._ws is None
        ref = c.tx_ref = TxRef()
        if self.version == "1.6":
            payload = {
                "connectorId": c.evse_id,
                "idTag": c.id_tag,
                "meterStart": int(c.transaction_register_wh),
                "timestamp": iso(self.clock.now()),
            }

            def started(result: dict[str, Any]) -> None:
                ref.id = str(result["transactionId"])

            self._enqueue(_Out("StartTransaction", lambda: payload, True, on_result=started))
        else:
            ref.id = f"{self.ocpp_id}-tx{next(self._tx_counter)}"
            ev_payload = self._tx_event(c, "Started", "CablePluggedIn", offline, full=False)
            self._enqueue(_Out("TransactionEvent", lambda: ev_payload, True))
        self._set_status(c, "Charging")

    def _tx_event(
        self,
        c: SimConnector,
        event_type: str,
        trigger: str,
        offline: bool,
        *,
        full: bool = True,
        reason: str | None = None,
    ) -> dict[str, Any]:
        info: dict[str, Any] = {"transactionId": c.tx_id}
        if reason is not None:
            info["stoppedReason"] = reason
        context = {
            "Started": "Transaction.Begin",
            "Ended": "Transaction.End",
        }.get(event_type, "Sample.Periodic")
        p: dict[str, Any] = {
            "eventType": event_type,
            "timestamp": iso(self.clock.now()),
            "triggerReason": trigger,
            "seqNo": next(self._seq),
            "transactionInfo": info,
            "evse": {"id": c.evse_id, "connectorId": c.connector_id},
            "meterValue": [self._meter_value(c, context, full=full)],
        }
        if offline:
            p["offline"] = True
        if event_type == "Started":
            p["idToken"] = {"idToken": c.id_tag, "type": "Central"}
        return p

    def _stop_transaction(self, c: SimConnector, reason: str) -> None:
        offline = self._ws is None
        self._count_energy_to_now(c)
        c.tx_active = False
        # A TxProfile lives as long as its transaction (both versions say so): one sent without
        # a transactionId (1.6 allows it) must not carry over to the next session on this EVSE.
        self.profiles = [
            q for q in self.profiles if not (q.purpose == "tx" and q.evse == c.evse_id)
        ]
        self._pending_profiles = [
            (t, q)
            for t, q in self._pending_profiles
            if not (q.purpose == "tx" and q.evse == c.evse_id)
        ]
        if self.version == "1.6":
            register = int(c.transaction_register_wh)
            at = iso(self.clock.now())
            ref = c.tx_ref

            def build() -> dict[str, Any]:
                return {
                    "transactionId": int(ref.id) if ref.id is not None else -1,
                    "meterStop": register,
                    "timestamp": at,
                    "reason": reason,
                }

            self._enqueue(_Out("StopTransaction", build, True))
        else:
            p = self._tx_event(
                c,
                "Ended",
                "EVDeparted" if reason == "EVDisconnected" else "RemoteStop",
                offline,
                full=False,
                reason=reason,
            )
            self._enqueue(_Out("TransactionEvent", lambda: p, True))
        c.terminal_a = [0.0, 0.0, 0.0]
        c.power_w = 0.0
        self._set_status(c, "Finishing")

    def _send_meter_values(self, c: SimConnector, context: str = "Sample.Periodic") -> None:
        if self.version == "1.6":
            mv = self._meter_value(c, context)
            ref = c.tx_ref if c.tx_active else None

            def build() -> dict[str, Any]:
                p: dict[str, Any] = {"connectorId": c.evse_id, "meterValue": [mv]}
                if ref is not None and ref.id is not None:
                    p["transactionId"] = int(ref.id)
                return p

            self._enqueue(_Out("MeterValues", build, c.tx_active))
        elif c.tx_active:
            p = self._tx_event(c, "Updated", "MeterValuePeriodic", self._ws is None)
            self._enqueue(_Out("TransactionEvent", lambda: p, True))
        else:
            payload = {"evseId": c.evse_id, "meterValue": [self._meter_value(c, context)]}
            self._enqueue(_Out("MeterValues", lambda: payload, False))

    # ---- physics -------------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await self.clock.sleep(self.tick_s)
            self.step()

    def step(self) -> None:
        """Advance the connectors to the clock's now: apply due profiles, charge, sample.

        Elapsed time (energy, the apply delay, the reporting interval) is the clock's monotonic
        time; the time of day (profile schedules, timestamps) the station's own clock. On the
        time of day, a station clock set an hour ahead mid-run put an hour of energy into one
        step, and one set back ten minutes waited ten minutes to apply a profile."""
        now = self.clock.now()
        mono = self.clock.monotonic()
        last = self._last_tick if self._last_tick is not None else mono
        dt = max(0.0, mono - last)
        self._last_tick = mono
        due = [p for t, p in self._pending_profiles if t <= mono]
        if due:
            self._pending_profiles = [(t, p) for t, p in self._pending_profiles if t > mono]
            for p in due:
                self._install(p)
        shares = self._station_shares(now)
        for c in self.connectors.values():
            c_dt = dt if c.energy_to is None else max(0.0, mono - c.energy_to)
            c.energy_to = None
            self._advance(c, now, c_dt, shares.get(c.evse_id, math.inf))
        # Reports fall due every sample_interval_s from the first step, and go out at the step
        # nearest each due instant: counted from the step that sent the last one, a 12 s
        # interval on 5 s steps reported every 15 s, and float noise on 0.1 s steps made some
        # 60 s intervals 60.1 s.
        if self._last_sample is None:
            self._last_sample = mono
        elif mono >= self._last_sample + self.sample_interval_s - self.tick_s / 2.0:
            self._last_sample = max(
                self._last_sample + self.sample_interval_s, mono - self.sample_interval_s
            )
            if not self.misbehaviour.stop_reporting:
                for c in self.connectors.values():
                    if c.tx_active:
                        self._send_meter_values(c)

    def _advance(self, c: SimConnector, now: float, dt: float, share: float = math.inf) -> None:
        c.offered = offer(c, min(self.limit_at(c.evse_id, now), share))
        self._count_energy(c, dt)
        if not c.tx_active or c.ev is None:
            c.terminal_a = [0.0, 0.0, 0.0]
            c.power_w = 0.0
            return
        # The step that reaches the battery's target draws only what fills it: the battery
        # stops at its target (a whole step at full power went past it, and past 100 % the
        # registers counted energy the battery never took).
        fill_w = c.ev.room_wh * 3600.0 / self.tick_s if self.tick_s > 0 else math.inf
        if c.kind == "dc":
            p_dc = min(c.ev.dc_draw_w(c.offered), fill_w)
            c.power_w = p_dc / c.efficiency + (c.aux_w if p_dc > 0 else 0.0)
            line = c.power_w / (3.0 * c.voltage_v)
            c.terminal_a = [line, line, line]
        else:
            draw = c.ev.ac_draw_a(c.offered)
            n = 1 if c.terminals == 1 or c.ev.phases == 1 else min(3, c.ev.phases)
            draw = min(draw, fill_w / (c.voltage_v * n))
            c.terminal_a = [draw if i < n else 0.0 for i in range(3)]
            c.power_w = draw * c.voltage_v * n
        status = (
            "Charging" if c.power_w > 0 else ("SuspendedEV" if c.offered > 0 else "SuspendedEVSE")
        )
        if c.status in ("Charging", "SuspendedEV", "SuspendedEVSE"):
            self._set_status(c, status)

    @staticmethod
    def _count_energy(c: SimConnector, dt: float) -> None:
        """Energy over ``dt`` at the draw of the previous state (explicit Euler)."""
        # ``power_w`` is the AC input. A DC charger's car gets the input less the auxiliary load,
        # times the efficiency (crediting aux_w × efficiency to it put 10.9 kWh into a 10 kW car
        # in 1 h): its outlet register counts that, its inlet register the input. (Its outlet
        # register counted the input: the central system took the grid's energy for the car's.)
        if dt > 0 and c.power_w > 0:
            if c.kind == "dc":
                to_car_wh = max(0.0, c.power_w - c.aux_w) * c.efficiency * dt / 3600.0
                c.inlet_register_wh += c.power_w * dt / 3600.0
            else:
                to_car_wh = c.power_w * dt / 3600.0
            c.register_wh += to_car_wh
            if c.ev is not None:
                c.ev.add_energy(to_car_wh)

    def _count_energy_to_now(self, c: SimConnector) -> None:
        """Count ``c``'s energy up to now, between two steps (a transaction stops): the car
        drew until it left, not until the last step (the time since was lost from the battery
        and the registers)."""
        if self._last_tick is None:
            return
        mono = self.clock.monotonic()
        since = self._last_tick if c.energy_to is None else max(self._last_tick, c.energy_to)
        self._count_energy(c, max(0.0, mono - since))
        c.energy_to = mono

    # ---- profiles and the composite schedule ---------------------------------------------
    def _install(self, p: HeldProfile) -> None:
        # 1.6: the same id, or the same stack level and purpose on the connector, is replaced.
        # 2.0.1: only the same id (K01.FR.05); a clash was refused on receipt (K01.FR.06/.39).
        v16 = self.version == "1.6"
        self.profiles = [
            q
            for q in self.profiles
            if q.id != p.id
            and not (v16 and q.evse == p.evse and q.purpose == p.purpose and q.stack == p.stack)
        ]
        self.profiles.append(p)

    def _schedule_start(self, p: HeldProfile, c: SimConnector | None) -> float:
        """Where ``p``'s periods and duration count from on ``c``: its ``startSchedule``; without
        one, a Relative profile from the start of ``c``'s transaction in progress (OCPP 1.6
        ChargingProfileKindType, 2.0.1 ChargingProfileKindEnumType: "relative to ... the start
        of a transaction / session"), and with none in progress from now, as if one started now
        (the spec leaves it open; EVerest's libocpp, ``calculate_start``, does this): its first
        period is what a car plugging in now gets, and the composite schedule of an idle EVSE
        shows that. Any other profile from its arrival."""
        if p.start is not None:
            return p.start
        if p.kind == "Relative":
            if c is not None and c.tx_active and c.tx_started_at is not None:
                return c.tx_started_at
            return self.clock.now()
        return p.received_at

    def _profile_period(
        self, p: HeldProfile, c: SimConnector | None, t: float
    ) -> tuple[float, int | None] | None:
        """The period of ``p`` in force at ``t``: (limit in ``p.unit``, numberPhases), or None."""
        if p.valid_from is not None and t < p.valid_from:
            return None
        if p.valid_to is not None and t >= p.valid_to:
            return None
        offset = t - self._schedule_start(p, c)
        if p.kind == "Recurring" and offset >= 0:
            offset = offset % 86400.0
        if offset < 0 or (p.duration is not None and offset >= p.duration):
            return None
        found = None
        for start_period, limit, phases in p.periods:
            if start_period <= offset:
                found = (limit, phases)
        return found

    def _profile_value(self, p: HeldProfile, c: SimConnector, t: float) -> float | None:
        period = self._profile_period(p, c, t)
        return None if period is None else self._to_unit(c, period[0], p.unit, period[1])

    def _to_unit(self, c: SimConnector, limit: float, unit: str, phases: int | None) -> float:
        n = phases or (3 if c.terminals == 3 else 1)
        if c.kind == "dc":
            return limit if unit == "W" else limit * c.voltage_v * 3
        if unit == "A":
            return limit
        return limit / (c.voltage_v * n)

    def limit_at(self, evse_id: int, t: float) -> float:
        """The composite limit of ``evse_id`` at ``t`` (A per phase for AC, W for DC): its
        TxProfile (or TxDefault, of the EVSE or of 0) and the station maximum, under its hardware
        maximum. The station maximum caps the EVSEs together too (``_station_shares``)."""
        return self._limit_at(evse_id, t, with_max=True)

    def _limit_at(self, evse_id: int, t: float, *, with_max: bool) -> float:
        c = self.connectors[evse_id]

        def best(cands: list[HeldProfile]) -> float | None:
            for p in sorted(cands, key=lambda q: -q.stack):
                v = self._profile_value(p, c, t)
                if v is not None:
                    return v
            return None

        tx_limit = None
        if c.tx_active and c.tx_id is not None:
            tx_limit = best(
                [
                    p
                    for p in self.profiles
                    if p.purpose == "tx"
                    and p.evse == evse_id
                    and (p.tx_id is None or p.tx_id == c.tx_id)
                ]
            )
        if tx_limit is None:
            tx_limit = best(
                [p for p in self.profiles if p.purpose == "default" and p.evse == evse_id]
            )
        if tx_limit is None:
            tx_limit = best([p for p in self.profiles if p.purpose == "default" and p.evse == 0])
        max_limit = best([p for p in self.profiles if p.purpose == "max"]) if with_max else None
        value = c.hardware_limit
        for v in (tx_limit, max_limit):
            if v is not None:
                value = min(value, v)
        return value

    def station_max_at(self, t: float) -> tuple[float, str, int | None] | None:
        """The station maximum (ChargePointMaxProfile / ChargingStationMaxProfile, on 0) in force
        at ``t``: (limit, unit, numberPhases) of the highest stack level that has a period then."""
        for p in sorted((q for q in self.profiles if q.purpose == "max"), key=lambda q: -q.stack):
            period = self._profile_period(p, None, t)
            if period is not None:
                return period[0], p.unit, period[1]
        return None

    def _station_shares(self, now: float) -> dict[int, float]:
        """Per EVSE, the most the station maximum leaves it now (its units; none: no maximum).

        The maximum holds for the station as a whole, every EVSE together (OCPP 1.6 3.13.2,
        2.0.1 K01): it is shared among the EVSEs with a car charging, max-min fair on what each
        car takes under its own limit, then what is left up to each EVSE's own limit. An EVSE
        whose share falls below its minimum (the 6 A pilot, a DC ``min_w``) cannot run on it:
        the car that started last gets nothing and the rest share again, until each share is
        0 or runs. An EVSE without a car is offered the whole maximum (a car plugging in is
        shared at the next step)."""
        cap = self.station_max_at(now)
        if cap is None:
            return {}
        total, unit, phases = cap
        total = max(0.0, total)
        per_unit = {
            e: self._to_unit(c, 1.0, unit, phases) for e, c in self.connectors.items()
        }  # the EVSE's units per unit of the maximum
        users = sorted(
            (
                c
                for c in self.connectors.values()
                if c.tx_active and c.ev is not None and c.available and per_unit[c.evse_id] > 0
            ),
            key=lambda c: (c.tx_started_at or 0.0, c.evse_id),
        )
        own: dict[int, float] = {}
        want: dict[int, float] = {}
        least: dict[int, float] = {}
        for c in users:
            k = per_unit[c.evse_id]
            offered = offer(c, self._limit_at(c.evse_id, now, with_max=False))
            assert c.ev is not None
            takes = c.ev.dc_draw_w(offered) if c.kind == "dc" else c.ev.ac_draw_a(offered)
            own[c.evse_id] = offered / k
            want[c.evse_id] = min(takes, offered) / k
            if c.kind == "dc":
                least[c.evse_id] = c.min_w / k
            else:
                steps = [x for x in c.steps_a or () if x >= MIN_PILOT_A]
                least[c.evse_id] = (min(steps) if steps else MIN_PILOT_A) / k
        while True:
            share = _water_fill(total, want)
            left = total - sum(share.values())
            extra = _water_fill(left, {e: own[e] - share[e] for e in share})
            share = {e: share[e] + extra[e] for e in share}
            # A car that takes nothing (full, or its EVSE offers nothing) need not run.
            running = [c.evse_id for c in users if want.get(c.evse_id, 0.0) > 0.0]
            if not any(share[e] < least[e] - 1e-9 for e in running):
                break
            want.pop(running[-1])
            own.pop(running[-1])
        out = {e: total * k for e, k in per_unit.items()}  # EVSEs without a car
        for c in users:
            out[c.evse_id] = share.get(c.evse_id, 0.0) * per_unit[c.evse_id]
        return out

    def station_limit_at(self, t: float, unit: str) -> float:
        """The station's composite limit at ``t`` in ``unit`` (connector 0 / EVSE 0 of
        GetCompositeSchedule, the grid connection's expected most): the sum of every EVSE's own
        limit, under the station maximum."""
        total = 0.0
        for e, c in self.connectors.items():
            total += self._limit_at(e, t, with_max=False) / self._to_unit(c, 1.0, unit, None)
        cap = self.station_max_at(t)
        if cap is not None:
            c = next(iter(self.connectors.values()))
            value, cap_unit, phases = cap
            in_unit = self._to_unit(c, value, cap_unit, phases) / self._to_unit(c, 1.0, unit, None)
            total = min(total, in_unit)
        return total

    def composite(
        self, evse_id: int, duration_s: int, unit: str | None = None
    ) -> list[tuple[int, float]]:
        """The composite schedule from now for ``duration_s``: [(offset_s, limit)], in the
        EVSE's units (A per phase for AC, W for DC); EVSE 0: the station's, in ``unit``."""
        now = self.clock.now()
        marks = {0.0}
        # A Relative profile's periods count from each EVSE's transaction start: the marks of
        # every EVSE it may apply to, and of its arrival (a station maximum's). Counted from its
        # arrival alone, a Relative profile's changes were reported as late as it had come after
        # the transaction's start.
        conns = list(self.connectors.values()) if evse_id == 0 else [self.connectors[evse_id]]
        for p in self.profiles:
            for t in (p.valid_from, p.valid_to):
                if t is not None:
                    marks.add(t - now)
            for start in {self._schedule_start(p, c) for c in (None, *conns)}:
                for sp, _, _ in p.periods:
                    marks.add(start + sp - now)
                if p.duration is not None:
                    marks.add(start + p.duration - now)
        out: list[tuple[int, float]] = []
        for m in sorted(x for x in marks if 0 <= x < duration_s):
            if evse_id == 0:
                v = self.station_limit_at(now + math.ceil(m), unit or self.station_unit)
            else:
                v = self.limit_at(evse_id, now + math.ceil(m))
            if not out or out[-1][1] != v:
                out.append((math.ceil(m), v))
        return out

    def _parse_profile(self, evse: int, raw: dict[str, Any]) -> HeldProfile:
        if self.version == "1.6":
            sched = raw["chargingSchedule"]
            pid = raw["chargingProfileId"]
            tx = raw.get("transactionId")
        else:
            sched = raw["chargingSchedule"][0]
            pid = raw["id"]
            tx = raw.get("transactionId")
        start = sched.get("startSchedule")
        return HeldProfile(
            id=int(pid),
            evse=evse,
            purpose=_PURPOSE[raw["chargingProfilePurpose"]],
            stack=int(raw["stackLevel"]),
            tx_id=str(tx) if tx is not None else None,
            kind=raw["chargingProfileKind"],
            valid_from=parse_timestamp(raw["validFrom"]) if raw.get("validFrom") else None,
            valid_to=parse_timestamp(raw["validTo"]) if raw.get("validTo") else None,
            start=parse_timestamp(start) if start else None,
            duration=float(sched["duration"]) if sched.get("duration") is not None else None,
            unit=sched["chargingRateUnit"],
            periods=[
                (float(p["startPeriod"]), float(p["limit"]), p.get("numberPhases"))
                for p in sched["chargingSchedulePeriod"]
            ],
            received_at=self.clock.now(),
        )

    # ---- handlers for CALLs from the central system ---------------------------------------
    def _on_SetChargingProfile(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        if self.version == "1.6":
            evse, raw = p["connectorId"], p["csChargingProfiles"]
        else:
            evse, raw = p["evseId"], p["chargingProfile"]
        if self.misbehaviour.reject_profiles:
            return {"status": "Rejected"}
        profile = self._parse_profile(evse, raw)
        if profile.purpose == "tx":
            c = self.connectors.get(evse)
            if (
                c is None
                or not c.tx_active
                or (profile.tx_id is not None and profile.tx_id != c.tx_id)
            ):
                return {"status": "Rejected"}
        if evse != 0 and evse not in self.connectors:
            return {"status": "Rejected"}
        if profile.purpose == "max" and evse != 0:
            return {"status": "Rejected"}  # a station maximum lives on connector/EVSE 0 only
        if self.version != "1.6":
            clash = self._conflict_2_0_1(profile)
            if clash is not None:
                return clash
        if not self.misbehaviour.ignore_profiles:
            due = self.clock.monotonic() + self.apply_delay_s  # elapsed time, not its clock's
            self._pending_profiles.append((due, profile))
        return {"status": "Accepted"}

    def _conflict_2_0_1(self, p: HeldProfile) -> dict[str, Any] | None:
        """The Rejected answer to a 2.0.1 profile that clashes with one held under another id.

        1.6 replaces a profile of the same stack level and purpose (on the same connector); 2.0.1
        does not: the CSMS shall not send a profile whose stack level, purpose and EVSE equal those
        of another profile (another id) whose validity overlaps (K01.FR.06), nor a TxProfile with
        the stack level and transaction of another TxProfile (K01.FR.39), and stations refuse
        one (the reason codes are those EVerest's libocpp sends). Only the same id replaces
        (K01.FR.05). Profiles still waiting for the apply delay count as held."""
        held = [*self.profiles, *(q for _, q in self._pending_profiles)]
        for q in held:
            if q.id == p.id or q.purpose != p.purpose or q.stack != p.stack:
                continue
            if p.purpose == "tx":
                if q.tx_id == p.tx_id:
                    return _rejected("InvalidStackLevel", f"TxProfile {q.id} holds this level")
            elif q.evse == p.evse and _overlap(q, p):
                return _rejected("DuplicateProfile", f"profile {q.id} holds this level")
        return None

    def hold_profile(self, profile: HeldProfile) -> None:
        """Install ``profile`` as if a central system had set it earlier (tests, scenarios)."""
        self.profiles = [q for q in self.profiles if q.id != profile.id]
        self.profiles.append(profile)

    def _on_ClearChargingProfile(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        if self.version == "1.6":
            pid, evse = p.get("id"), p.get("connectorId")
            purpose, stack = p.get("chargingProfilePurpose"), p.get("stackLevel")
        else:
            crit = p.get("chargingProfileCriteria") or {}
            pid, evse = p.get("chargingProfileId"), crit.get("evseId")
            purpose, stack = crit.get("chargingProfilePurpose"), crit.get("stackLevel")

        def match(q: HeldProfile) -> bool:
            if pid is not None:
                return bool(q.id == pid)
            return (
                (evse is None or q.evse == evse)
                and (purpose is None or q.purpose == _PURPOSE[purpose])
                and (stack is None or q.stack == stack)
            )

        before = len(self.profiles) + len(self._pending_profiles)
        self.profiles = [q for q in self.profiles if not match(q)]
        self._pending_profiles = [(t, q) for t, q in self._pending_profiles if not match(q)]
        removed = before != len(self.profiles) + len(self._pending_profiles)
        return {"status": "Accepted" if removed else "Unknown"}

    def _on_GetChargingProfiles(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        """2.0.1 K09: the profiles held (applied or waiting for the apply delay) that match the
        criteria, reported after the answer in ReportChargingProfiles CALLs, one per EVSE and
        chargingLimitSource, sorted by stack level, ``tbc`` on all but the last."""
        crit = p["chargingProfile"]
        evse, purpose = p.get("evseId"), crit.get("chargingProfilePurpose")
        stack, ids = crit.get("stackLevel"), crit.get("chargingProfileId")
        sources = crit.get("chargingLimitSource")

        def match(q: HeldProfile) -> bool:
            return (
                (evse is None or q.evse == evse)
                and (purpose is None or q.purpose == _PURPOSE[purpose])
                and (stack is None or q.stack == stack)
                and (ids is None or q.id in ids)
                and (sources is None or q.limit_source in sources)
            )

        held = [q for q in [*self.profiles, *(q for _, q in self._pending_profiles)] if match(q)]
        if not held:
            return {"status": "NoProfiles"}
        groups: dict[tuple[int, str], list[HeldProfile]] = {}
        for q in held:
            groups.setdefault((q.evse, q.limit_source), []).append(q)
        keys = sorted(groups)
        for n, (g_evse, source) in enumerate(keys):
            report: dict[str, Any] = {
                "requestId": p["requestId"],
                "chargingLimitSource": source,
                "evseId": g_evse,
                "chargingProfile": [
                    q.to_2_0_1() for q in sorted(groups[(g_evse, source)], key=lambda q: q.stack)
                ],
            }
            if n < len(keys) - 1:
                report["tbc"] = True
            after.append(partial(self._send_report, report))
        return {"status": "Accepted"}

    def _send_report(self, report: dict[str, Any]) -> None:
        self.call("ReportChargingProfiles", report)

    def _on_GetCompositeSchedule(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        evse = p["connectorId"] if self.version == "1.6" else p["evseId"]
        if evse != 0 and evse not in self.connectors:
            return {"status": "Rejected"}
        periods = []
        if evse == 0:  # the station as a whole: the grid connection's expected most
            unit = p.get("chargingRateUnit") or self.station_unit
            for offset, limit in self.composite(0, int(p["duration"]), unit):
                periods.append({"startPeriod": offset, "limit": round(limit, 1)})
        else:
            c = self.connectors[evse]
            unit = p.get("chargingRateUnit") or ("W" if c.kind == "dc" else "A")
            for offset, limit in self.composite(evse, int(p["duration"])):
                value = limit
                if c.kind == "ac" and unit == "W":
                    value = limit * c.voltage_v * c.terminals
                periods.append({"startPeriod": offset, "limit": round(value, 1)})
        now = iso(self.clock.now())
        if self.version == "1.6":
            return {
                "status": "Accepted",
                "connectorId": evse,
                "scheduleStart": now,
                "chargingSchedule": {
                    "duration": int(p["duration"]),
                    "startSchedule": now,
                    "chargingRateUnit": unit,
                    "chargingSchedulePeriod": periods,
                },
            }
        return {
            "status": "Accepted",
            "schedule": {
                "evseId": evse,
                "duration": int(p["duration"]),
                "scheduleStart": now,
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": periods,
            },
        }

    def _remote_start(self, evse: int | None, id_tag: str, after: list[Callable[[], None]]) -> bool:
        c = self.connectors.get(evse) if evse is not None else next(iter(self.connectors.values()))
        if c is None or c.tx_active or not c.available:
            return False
        c.id_tag = id_tag

        def go() -> None:
            if c.ev is None:
                c.ev = EV()
            self._start_transaction(c)

        after.append(go)
        return True

    def _on_RemoteStartTransaction(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        ok = self._remote_start(p.get("connectorId"), p["idTag"], after)
        return {"status": "Accepted" if ok else "Rejected"}

    def _on_RequestStartTransaction(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        ok = self._remote_start(p.get("evseId"), p["idToken"]["idToken"], after)
        return {"status": "Accepted" if ok else "Rejected"}

    def _remote_stop(self, tx_id: str, after: list[Callable[[], None]]) -> bool:
        for c in self.connectors.values():
            if c.tx_active and c.tx_id == tx_id:
                after.append(lambda c=c: self._stop_transaction(c, "Remote"))  # type: ignore[misc]
                return True
        return False

    def _on_RemoteStopTransaction(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        return {
            "status": "Accepted"
            if self._remote_stop(str(p["transactionId"]), after)
            else "Rejected"
        }

    def _on_RequestStopTransaction(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        return {
            "status": "Accepted" if self._remote_stop(p["transactionId"], after) else "Rejected"
        }

    def _on_ChangeAvailability(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        if self.version == "1.6":
            evse, operative = p["connectorId"], p["type"] == "Operative"
        else:
            evse, operative = (
                (p.get("evse") or {}).get("id", 0),
                p["operationalStatus"] == "Operative",
            )
        targets = (
            list(self.connectors.values())
            if evse == 0
            else [self.connectors[evse]]
            if evse in self.connectors
            else []
        )
        if not targets:
            return {"status": "Rejected"}
        for c in targets:
            c.available = operative
            if not c.tx_active:
                after.append(
                    partial(self._set_status, c, "Available" if operative else "Unavailable")
                )
        return {"status": "Accepted"}

    def _on_Reset(self, p: dict[str, Any], after: list[Callable[[], None]]) -> dict[str, Any]:
        after.append(self._reboot_soon)
        return {"status": "Accepted"}

    def _reboot_soon(self) -> None:
        task = asyncio.ensure_future(self.reboot())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _on_TriggerMessage(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        what = p["requestedMessage"]
        evse = p.get("connectorId") if self.version == "1.6" else (p.get("evse") or {}).get("id")
        cons = (
            [self.connectors[evse]] if evse in self.connectors else list(self.connectors.values())
        )
        if what == "MeterValues":
            after.extend([lambda c=c: self._send_meter_values(c, "Trigger") for c in cons])  # type: ignore[misc]
        elif what == "StatusNotification":
            after.extend([lambda c=c: self._set_status(c, c.status, force=True) for c in cons])  # type: ignore[misc]
        elif what == "Heartbeat":
            after.append(lambda: self._enqueue(_Out("Heartbeat", dict, False)))
        elif what == "BootNotification":
            after.append(self._enqueue_front_boot)
        else:
            return {"status": "NotImplemented"}
        return {"status": "Accepted"}

    def _apply_setting(self, key: str, value: str) -> None:
        if key in ("MeterValuesSampledData", "SampledDataCtrlr.TxUpdatedMeasurands"):
            self.measurands = [m.strip() for m in value.split(",") if m.strip()]
        elif key in ("MeterValueSampleInterval", "SampledDataCtrlr.TxUpdatedInterval"):
            self.sample_interval_s = max(1.0, float(value))

    def _on_GetConfiguration(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        keys = p.get("key") or list(self.config)
        known = [
            {"key": k, "readonly": False, "value": self.config[k]} for k in keys if k in self.config
        ]
        unknown = [k for k in keys if k not in self.config]
        out: dict[str, Any] = {"configurationKey": known}
        if unknown:
            out["unknownKey"] = unknown
        return out

    def _on_ChangeConfiguration(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        key, value = p["key"], p["value"]
        if key not in self.config:
            return {"status": "NotSupported"}
        if key in self.misbehaviour.refuse_config_keys:
            return {"status": "Rejected"}
        self.config[key] = value
        self._apply_setting(key, value)
        return {"status": "Accepted"}

    def _on_GetVariables(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        results = []
        for d in p["getVariableData"]:
            name = f"{d['component']['name']}.{d['variable']['name']}"
            r: dict[str, Any] = {"component": d["component"], "variable": d["variable"]}
            if name in self.variables:
                r["attributeStatus"] = "Accepted"
                r["attributeValue"] = self.variables[name]
            else:
                r["attributeStatus"] = "UnknownVariable"
            results.append(r)
        return {"getVariableResult": results}

    def _on_SetVariables(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        results = []
        for d in p["setVariableData"]:
            name = f"{d['component']['name']}.{d['variable']['name']}"
            if name not in self.variables:
                status = "UnknownVariable"
            elif name in self.misbehaviour.refuse_config_keys:
                status = "Rejected"
            else:
                status = "Accepted"
                self.variables[name] = d["attributeValue"]
                self._apply_setting(name, d["attributeValue"])
            results.append(
                {"attributeStatus": status, "component": d["component"], "variable": d["variable"]}
            )
        return {"setVariableResult": results}

    def _on_UnlockConnector(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        evse = p["connectorId"] if self.version == "1.6" else p["evseId"]
        if evse not in self.connectors:
            return {"status": "NotSupported" if self.version == "1.6" else "UnknownConnector"}
        return {"status": "Unlocked"}

    def _on_DataTransfer(
        self, p: dict[str, Any], after: list[Callable[[], None]]
    ) -> dict[str, Any]:
        return {"status": "UnknownVendorId"}
