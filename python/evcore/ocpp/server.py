"""The OCPP central system (CSMS): WebSocket server, station registry, events and commands.

Owns: who may connect (known stations only, security profiles 0–3, subprotocol ``ocpp1.6`` or
``ocpp2.0.1``), one session per station (a second connection replaces the first), transactions
(deduplicated across reconnects and offline replays; session energy from register differences:
the energy into the car, see ``TxState.session_energy_wh``),
the per-station call queue and the typed command API the edge controller uses. It never decides a
setpoint: ``set_limit`` sends what the edge asks, after the edge's envelope.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import inspect
import itertools
import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from evcore.clock import Clock
from evcore.ocpp import frames, v16, v201, validation
from evcore.ocpp.clockskew import WARN_OFFSET_S, ClockOffset
from evcore.ocpp.config import OcppConfig, OcppConfigError, parse_ocpp_section
from evcore.ocpp.connection import HandlerError, StationConnection
from evcore.ocpp.events import (
    BootEvent,
    ConfigurationEvent,
    ConnectionEvent,
    MeterSample,
    NotificationEvent,
    OcppEvent,
    ProfilePurpose,
    ProfileResult,
    SecurityEvent,
    StatusEvent,
    TransactionEvent,
)
from evcore.ocpp.handlers import schedule_start
from evcore.ocpp.metering import (
    MeterValueError,
    PhaseMap,
    check_plausible,
    parse_meter_value,
    phase_map_for,
    same_time_merged,
)
from evcore.ocpp.publish import EventPublisher
from evcore.ocpp.queue import CallOutcome, QueuedCall, StationCallQueue, Then

LOG = logging.getLogger("evcore.ocpp")

SUBPROTOCOLS = ("ocpp2.0.1", "ocpp1.6")
_VERSION_OF = {"ocpp1.6": "1.6", "ocpp2.0.1": "2.0.1"}
_CONNECTION_CLASS: dict[str, type[StationConnection]] = {
    "1.6": v16.Connection16,
    "2.0.1": v201.Connection201,
}

Listener = Callable[[OcppEvent], "Awaitable[None] | None"]


# ---- what the central system knows about the site --------------------------------------------

#: A DC charger's efficiency when the site file gives none (the core's default: topology.rs).
DC_EFFICIENCY_DEFAULT = 0.95


@dataclass(frozen=True)
class ChargerInfo:
    """One site charger as the protocol needs it (from the site file's ``[[chargers]]``)."""

    charger_id: str
    ocpp_id: str
    evse_id: int
    connector_id: int
    kind: str
    wiring: str
    phase_map: PhaseMap
    voltage_v: float
    #: DC only: rectifier efficiency and auxiliary draw (site file), for line currents from power.
    efficiency: float | None = None
    aux_w: float | None = None

    @property
    def number_phases(self) -> int:
        return self.phase_map.terminals

    def dc_input_w(self, output_w: float) -> float:
        """DC: the power drawn from the grid (W) for ``output_w`` delivered to the car: through
        the rectifier (site file ``efficiency``, 0.95 when it gives none, as the core takes it),
        plus the auxiliary load while it delivers; 0 for nothing delivered."""
        if output_w <= 0:
            return 0.0
        eff = self.efficiency if self.efficiency is not None else DC_EFFICIENCY_DEFAULT
        return output_w / eff + (self.aux_w or 0.0)

    def dc_line_a(self, power_w: float, *, at_inlet: bool) -> float:
        """DC: the AC line current per phase for a power measured at the outlet (delivered to
        the car: through the rectifier, plus auxiliaries) or at the inlet (the grid side)."""
        if power_w <= 0:
            return 0.0
        if not at_inlet:
            power_w = self.dc_input_w(power_w)
        return power_w / (3.0 * self.voltage_v)

    def car_wh_from_inlet(self, inlet_wh: float, interval_s: float) -> float:
        """DC: the energy into the car for ``inlet_wh`` counted at the charger's grid side over
        ``interval_s`` (between two readings): less the auxiliary load over the interval, times
        the efficiency (site file; 0.95 when it gives none). An approximation: the auxiliary
        load is taken as drawn over the whole interval (a charger that charged only part of it
        is counted short by ``aux_w`` x efficiency over the rest), the efficiency as the same
        at every power. AC: as it is."""
        if self.kind != "dc":
            return inlet_wh
        aux_wh = (self.aux_w or 0.0) * max(0.0, interval_s) / 3600.0
        eff = self.efficiency if self.efficiency is not None else DC_EFFICIENCY_DEFAULT
        return max(0.0, inlet_wh - aux_wh) * eff


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _site_phase_names(site: Any) -> list[str]:
    for candidate in (site, _get(site, "site"), _get(site, "meta")):
        names = _get(candidate, "phase_names") if candidate is not None else None
        if names:
            return list(names)
    return ["L1", "L2", "L3"]


def _site_id(site: Any) -> str:
    for candidate in (_get(site, "id"), _get(site, "site_id"), _get(_get(site, "site"), "id")):
        if isinstance(candidate, str):
            return candidate
    return "site"


def chargers_of(site: Any) -> list[ChargerInfo]:
    specs = _get(site, "chargers") or []
    if isinstance(specs, Mapping):
        specs = list(specs.values())
    names = _site_phase_names(site)
    out = []
    for spec in specs:
        wiring = _get(spec, "wiring", "three_phase")
        out.append(
            ChargerInfo(
                charger_id=_get(spec, "id"),
                ocpp_id=_get(spec, "ocpp_id") or _get(spec, "id"),
                evse_id=int(_get(spec, "evse_id", 1) or 1),
                connector_id=int(_get(spec, "connector_id", 1) or 1),
                kind=_get(spec, "kind", "ac") or "ac",
                wiring=wiring,
                phase_map=phase_map_for(wiring, list(_get(spec, "phases")), names),
                voltage_v=float(_get(spec, "voltage_v", 230.0) or 230.0),
                efficiency=_get(spec, "efficiency"),
                aux_w=_get(spec, "aux_w"),
            )
        )
    return out


# ---- requests and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class LimitRequest:
    charger_id: str
    purpose: ProfilePurpose
    limit_a: float | None
    limit_w: float | None
    valid_to: float | None
    final_limit: float | None
    wire_limit: float
    wire_final: float | None
    #: The session a TxProfile is for (the edge's view); None: whichever is active when sent.
    transaction_id: str | None = None


@dataclass(frozen=True, slots=True)
class LimitOrder:
    """One limit of :meth:`CentralSystem.send_limits`; fields as in ``set_limit``."""

    charger_id: str
    limit_a: float | None = None
    limit_w: float | None = None
    valid_to: float | None = None
    final_limit_a: float | None = None
    final_limit_w: float | None = None
    purpose: ProfilePurpose = "tx"
    #: ``tx`` only: the session the limit is for; see ``set_limit``.
    transaction_id: str | None = None


# Profile ids: _PROFILE_ID_BASE + EVSE x len(_PROFILE_SLOT) + the purpose's slot (see
# ``CentralSystem._profile_id``); unique per station, the same in every run, and above the ids
# earlier versions numbered from 100 by first use (a station may still hold those).
_PROFILE_ID_BASE = 1_000_000
_PROFILE_SLOT: dict[str, int] = {"tx_default": 0, "tx": 1, "station_max": 2}
#: How far above the configured stack level a 2.0.1 clash may raise ours (``_migrate``): a
#: station holding profiles of another id further up keeps refusing (the refusal stands).
_MAX_OUTRANK = 8


@dataclass(slots=True)
class LimitSend:
    """A limit handed to :meth:`CentralSystem.send_limits`.

    ``sent_at`` / ``sent_mono``: ``clock.now()`` / ``clock.monotonic()`` when its frame was handed
    to the station's socket (set at once when it went straight out, else when it is answered);
    ``result``: the :class:`ProfileResult` once answered, superseded, timed out, ….
    """

    charger_id: str
    purpose: ProfilePurpose
    result: asyncio.Future[ProfileResult]
    sent_at: float | None = None
    sent_mono: float | None = None


@dataclass(frozen=True)
class CommandResult:
    """Outcome of a command: ``status`` ``Result`` means the station answered ``payload``."""

    action: str
    status: str
    payload: dict[str, Any] | None = None
    error_code: str | None = None
    detail: str = ""

    @property
    def response_status(self) -> str | None:
        if self.payload is None:
            return None
        value = self.payload.get("status")
        return value if isinstance(value, str) else None

    @property
    def ok(self) -> bool:
        return self.status == "Result" and self.response_status in (None, "Accepted", "Unlocked")


@dataclass(frozen=True)
class CompositeSchedule:
    charger_id: str
    status: str
    start: float | None
    unit: str | None
    #: (start offset in s, limit in ``unit``, number of phases or None)
    periods: list[tuple[int, float, int | None]]
    detail: str = ""

    def limit_at(self, t: float) -> float | None:
        if self.start is None or not self.periods:
            return None
        offset = t - self.start
        current = None
        for start, limit, _ in self.periods:
            if start <= offset:
                current = limit
        return current


#: An ended transaction whose end the bus and store took is forgotten this long after it ended
#: (the central system's monotonic clock; ``CentralSystem(tx_keep_s=...)``): a station's replay of
#: its messages within it is still recognised as one; without an end the state of every session
#: stayed for good. Past it, a 2.0.1 event of the transaction is recognised from the store's record
#: (``_stored_tx``); without one, only an event that shows it live starts it (``_shows_live``).
TX_KEEP_S = 24 * 3600.0
#: The stop reason of a transaction ended because another started on its EVSE (``_supersede``).
SUPERSEDED = "Superseded"
#: 2.0.1 seqNos seen above the contiguous prefix kept one by one at most (beyond, the lowest
#: half folds into the prefix: a gap that old is a message the station will not send).
SEQ_KEEP = 4096
#: 1.6 StartTransaction keys (connector, idTag, meterStart, timestamp) kept per station, newest
#: last, whatever became of their transactions: a station resending a start whose answer it lost
#: gets the transactionId of the first time, also once the transaction is forgotten
#: (``tx_keep_s``). A station resends its queued transaction messages in order, so the start it
#: resends is one of its last few; about 150 bytes a key.
START_KEYS_KEEP = 64
#: The store's meta key under which a station's kept 1.6 start keys are written (JSON: a list of
#: [connectorId, idTag, meterStart, timestamp, transactionId], oldest first), so that a start
#: resent after a restart of the central system also gets its first transactionId.
START_KEYS_META = "ocpp.v16_start_keys.{ocpp_id}"
#: A station's firmware / diagnostics / log status equal to its last of that action within this
#: long is a resend of it (``_on_station_status``).
STATUS_RESEND_S = 3600.0
#: How many of a station's reused 2.0.1 transaction ids are kept (``Station.reused``).
REUSED_IDS_KEEP = 64
#: The store's meta key of a station's reused 2.0.1 transaction ids (JSON: {its id: [our ids]}).
REUSED_IDS_META = "ocpp.v201_reused_tx_ids.{ocpp_id}"


@dataclass
class TxState:
    #: Ours: the key in ``Station.transactions`` and what the events and the store name.
    transaction_id: str
    charger_id: str | None
    evse_id: int | None
    id_tag: str | None
    meter_start_wh: float | None
    last_register_wh: float | None = None
    started_at: float | None = None
    ended: bool = False
    # 2.0.1 seqNos handled: every one up to ``seq_low`` but those in ``unseen_seq``, and those
    # in ``seen_seq`` (above it).
    seq_low: int = -1
    seen_seq: set[int] = field(default_factory=set)
    unseen_seq: set[int] = field(default_factory=set)
    # The newest 2.0.1 TransactionEvent timestamp handled (the station's clock): an event with a
    # seqNo seen before is a replay only if it is no newer (``is_replay``).
    last_event_at: float | None = None
    # When it ended, by the central system's monotonic clock (for ``tx_keep_s``).
    ended_mono: float | None = None
    #: When this process heard its end (monotonic); None: not heard here (open, or taken back
    #: from the store: it ended before any boot this process saw). ``_new_after_boot``.
    end_heard_mono: float | None = None
    # Event kinds ("started", "ended") handed to local listeners, and those the bus and store
    # took: a kind emitted but not yet taken is published again when the station retries.
    emitted: set[str] = field(default_factory=set)
    published: set[str] = field(default_factory=set)
    # Where and why it ended (for publishing the end again).
    ended_at: float | None = None
    end_reason: str | None = None
    # 2.0.1: known only from events that did not show it live (an Updated of a transaction unknown
    # here, queued offline or older than the clock tolerance: ``_shows_live``). Its samples are
    # published, its end too; it is started (published, the EVSE's) only by an event that shows
    # it live.
    dormant: bool = False
    #: A register at the outlet (``location`` ``Outlet`` or none: what goes to the car) came with
    #: the session's meter values.
    outlet_seen: bool = False
    # The register at the charger's grid side (``location`` ``Inlet``): its first and last
    # reading (with its timestamp), and the energy into the car counted from it so far
    # (``note_inlet``). The session energy comes from it only when no outlet register came.
    inlet_start_wh: float | None = None
    inlet_last_wh: float | None = None
    inlet_last_at: float | None = None
    inlet_car_wh: float = 0.0
    #: The station's id of it when it is not ``transaction_id``: a 2.0.1 id the station used
    #: again for a new session (after a reboot), which is ours under another id
    #: (``CentralSystem._reused_id``). What goes on the wire (TxProfiles, RequestStop).
    station_tx_id: str = ""

    @property
    def wire_id(self) -> str:
        """The station's id of the transaction."""
        return self.station_tx_id or self.transaction_id

    @property
    def inlet_only(self) -> bool:
        """The session's registers are its station's inlet register only."""
        return not self.outlet_seen and self.inlet_last_wh is not None

    def session_energy_wh(self) -> float | None:
        """The energy into the car so far (Wh): the difference of the outlet register (1.6
        meterStart / meterStop included: OCPP's default location), or, for a station that meters
        only its inlet, the inlet register's converted for a DC charger (``note_inlet``). Not the
        grid's: a DC charger's AC input is that over its efficiency plus its auxiliary load."""
        if self.inlet_only:
            return self.inlet_car_wh
        if self.meter_start_wh is None or self.last_register_wh is None:
            return None
        return self.last_register_wh - self.meter_start_wh

    def registers_wh(self) -> tuple[float | None, float | None]:
        """The register the session energy counts on: at the start, and now."""
        if self.inlet_only:
            return self.inlet_start_wh, self.inlet_last_wh
        return self.meter_start_wh, self.last_register_wh

    def note_outlet(self, register_wh: float) -> None:
        """An outlet register reading of the session. The first after inlet readings only: the
        session energy goes on from what they counted (it fell back to the outlet's from then)."""
        if self.inlet_only and not self.ended:
            self.meter_start_wh = register_wh - self.inlet_car_wh
        self.outlet_seen = True
        if self.meter_start_wh is None:
            self.meter_start_wh = register_wh
        if not self.ended:
            self.last_register_wh = register_wh

    def note_inlet(self, register_wh: float, at: float, charger: ChargerInfo | None) -> None:
        """An inlet register reading of the session at ``at`` (the station's time). A DC
        charger's energy into the car is converted interval by interval (between two readings)
        with its efficiency and auxiliary load (``ChargerInfo.car_wh_from_inlet``); an interval
        in which the register stood still counts nothing (a paused session draws no auxiliary
        load here). A reading older than the last one (a replayed one) is skipped."""
        if self.inlet_last_wh is None:
            if self.meter_start_wh is not None and not self.outlet_seen:
                # 1.6 meterStart (or the store's start after a restart) of a station that meters
                # only its inlet: that register's.
                self.inlet_start_wh = self.inlet_last_wh = self.meter_start_wh
                self.inlet_last_at = self.started_at
            else:
                self.inlet_start_wh = self.inlet_last_wh = register_wh
                self.inlet_last_at = at
                return
        if self.ended:
            return
        last_wh, last_at = self.inlet_last_wh, self.inlet_last_at
        if last_at is not None and at < last_at:
            return
        assert last_wh is not None
        interval_s = at - last_at if last_at is not None else 0.0
        grown_wh = register_wh - last_wh
        if grown_wh > 0.0:
            self.inlet_car_wh += (
                charger.car_wh_from_inlet(grown_wh, interval_s) if charger else grown_wh
            )
        elif charger is None or charger.kind != "dc":
            self.inlet_car_wh += grown_wh  # AC: the difference as it is
        self.inlet_last_wh, self.inlet_last_at = register_wh, at

    def seq_seen(self, seq: int) -> bool:
        if seq <= self.seq_low:
            return seq not in self.unseen_seq
        return seq in self.seen_seq

    def is_replay(self, seq: int, at: float) -> bool:
        """A 2.0.1 event (seqNo ``seq``, timestamp ``at``) handled before: its seqNo seen and
        nothing newer than the newest event handled (a replay is a copy of an earlier event).
        A station that numbers its events from 0 again after a reboot in the middle of the
        transaction reuses seqNos with newer events; they were dropped as replays, its Ended
        too, and the transaction stayed open."""
        return self.seq_seen(seq) and (self.last_event_at is None or at <= self.last_event_at)

    def see_event(self, seq: int, at: float) -> None:
        """Book the event (seqNo ``seq``, timestamp ``at``) handled."""
        self.see_seq(seq)
        if self.last_event_at is None or at > self.last_event_at:
            self.last_event_at = at

    def see_seq(self, seq: int) -> None:
        """Book ``seq`` handled; the contiguous prefix absorbs what it can, so a session's
        set stays small (messages arrive in order, but for a retry)."""
        if seq <= self.seq_low:
            self.unseen_seq.discard(seq)
            return
        seen = self.seen_seq
        seen.add(seq)
        while self.seq_low + 1 in seen:
            self.seq_low += 1
            seen.discard(self.seq_low)
        if len(seen) > SEQ_KEEP:
            fold = sorted(seen)[: SEQ_KEEP // 2]
            self.seq_low = fold[-1]
            seen.difference_update(fold)

    def unsee_seq(self, seq: int) -> None:
        """``seq`` was not handled in full after all (its retry must be processed)."""
        if seq in self.seen_seq:
            self.seen_seq.discard(seq)
        elif seq <= self.seq_low:
            # A hole in the prefix. (Backing the prefix out to it put every number between into
            # ``seen_seq``: a station counting across transactions, folded at 10^9, filled the
            # memory with one renumbered event after a reboot whose publish failed.)
            self.unseen_seq.add(seq)


@dataclass
class Station:
    ocpp_id: str
    chargers: dict[int, ChargerInfo]
    queue: StationCallQueue
    connection: StationConnection | None = None
    version: str | None = None
    boot: BootEvent | None = None
    configuration: dict[str, str] = field(default_factory=dict)
    transactions: dict[str, TxState] = field(default_factory=dict)
    start_keys: dict[tuple[Any, ...], str] = field(default_factory=dict)
    #: The store's copy of ``start_keys`` was read since this process started; ours has keys
    #: it lacks (``_load_start_keys``, ``_save_start_keys``).
    start_keys_loaded: bool = False
    start_keys_unsaved: bool = False
    active_tx: dict[int, str] = field(default_factory=dict)
    status: dict[tuple[int, int], str] = field(default_factory=dict)
    last_seen: float | None = None
    worker: asyncio.Task[None] | None = None
    #: A CALL ``send_limits`` wrote directly, until answered (the worker waits for it).
    in_flight: asyncio.Future[CallOutcome] | None = None
    #: The worker holds a call taken from the queue (sending it or waiting for the slot).
    busy: bool = False
    #: Its clock's offset from ours, from the timestamps it sends (``clockskew``).
    clock_offset: ClockOffset = field(default_factory=ClockOffset)
    #: 2.0.1 TransactionEvents (transaction, seqNo) being handled, done when they are (a copy
    #: resent on a newer connection waits: ``_on_transaction_event_2_0_1``).
    handling: dict[tuple[str, int], asyncio.Future[None]] = field(default_factory=dict)
    #: 2.0.1 transaction ids the station used again for a new session: its id -> our ids of the
    #: later sessions, oldest first (the first session has the station's id). Kept in the store
    #: (``REUSED_IDS_META``) once read from it (``reused_loaded``).
    reused: dict[str, list[str]] = field(default_factory=dict)
    reused_loaded: bool = False
    #: When its last connection ended (our clock; None: not since this process started).
    gone_at: float | None = None
    #: When its last BootNotification came (our monotonic clock; None: none since this process
    #: started). ``CentralSystem._new_after_boot``.
    booted_mono: float | None = None
    #: The configuration round after its last BootNotification, while it runs (one at a time:
    #: ``CentralSystem._configure_after_boot``), and the connection of a Boot that came during
    #: it (the round starts again on it).
    configuring: asyncio.Task[None] | None = None
    configure_again: StationConnection | None = None
    #: Its last firmware / diagnostics / log status per action: (payload, when it came first).
    status_notes: dict[str, tuple[dict[str, Any], float]] = field(default_factory=dict)

    def charger(self, evse_id: int | None) -> ChargerInfo | None:
        if evse_id is None:
            return None
        return self.chargers.get(evse_id)

    def wire_tx_id(self, transaction_id: str) -> str:
        """The station's id of our transaction ``transaction_id``."""
        tx = self.transactions.get(transaction_id)
        return tx.wire_id if tx is not None else transaction_id


@dataclass
class _ProfileReport:
    """What a station reported to one GetChargingProfiles: (evseId, ChargingProfileType)."""

    profiles: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class StationState:
    ocpp_id: str
    connected: bool
    version: str | None
    boot: BootEvent | None
    configuration: dict[str, str]
    active_transactions: dict[int, str]
    status: dict[tuple[int, int], str]
    queued_calls: int


# ---- the central system ------------------------------------------------------------------------


class CentralSystem:
    """OCPP 1.6J / 2.0.1 central system for one site. See docs/ocpp.md."""

    def __init__(
        self,
        site: Any,
        *,
        clock: Clock,
        bus: Any = None,
        store: Any = None,
        config: OcppConfig | None = None,
        tx_keep_s: float = TX_KEEP_S,
    ) -> None:
        """``tx_keep_s``: how long an ended transaction whose end the bus and store took is kept
        in memory after it ended (``TX_KEEP_S``, a day); tests shorten it."""
        self.site = site
        self.clock = clock
        self.tx_keep_s = tx_keep_s
        sections = _get(site, "sections") or {}
        if config is None:
            path = _get(site, "path")
            config = parse_ocpp_section(
                sections.get("ocpp"), base_dir=path.parent if path is not None else None
            )
        self.config = config
        # A missing TLS file is a configuration error at load, naming its key and path (it was
        # a bare FileNotFoundError at start).
        config.check_tls_files()
        self._chargers = {c.charger_id: c for c in chargers_of(site)}
        self._stations: dict[str, Station] = {}
        for c in self._chargers.values():
            st = self._stations.get(c.ocpp_id)
            if st is None:
                st = Station(c.ocpp_id, {}, StationCallQueue(self.config.queue_bound))
                self._stations[c.ocpp_id] = st
            if c.evse_id in st.chargers:
                raise ValueError(
                    f"chargers {st.chargers[c.evse_id].charger_id!r} and {c.charger_id!r} share "
                    f"station {c.ocpp_id!r} EVSE {c.evse_id}"
                )
            st.chargers[c.evse_id] = c
        self._listeners: list[Listener] = []
        self._publisher = EventPublisher(
            _site_id(site),
            bus,
            store,
            clock_now=clock.now,
            evse_of=lambda cid: self._chargers[cid].evse_id,
            store_batch_window_s=self.config.store_batch_window_s,
        )
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._profile_ids: dict[tuple[str, int, str], int] = {}
        #: Limit requests per (station, EVSE, purpose) so far: a migration checks for a newer one.
        self._limit_seq: dict[tuple[str, int, str], int] = {}
        #: (station, EVSE, purpose) where the station can hold no profile of another id at the
        #: stack level we send there: ours was accepted there, or its profiles there were reported
        #: completely. Value: the transaction (TxProfile), else "". See ``_conflict_migration``.
        self._no_stranger: dict[tuple[str, int, str], str] = {}
        #: (station, EVSE, purpose) -> the stack level above the configured one that outranked a
        #: profile of another id (``_migrate``); kept across the station's reconnects for the life
        #: of this process (forgotten when it reconnects with another OCPP version).
        self._levels: dict[tuple[str, int, str], int] = {}
        self._last_limit: dict[tuple[str, int, str], float] = {}
        #: GetChargingProfiles of ``_migrate`` awaiting their report, by (station, requestId).
        self._reports: dict[tuple[str, int], _ProfileReport] = {}
        self._report_ids = itertools.count(int(clock.now()) % 1_000_000 * 1000 + 1)
        self._tx_counter = int(clock.now()) % 2_000_000 * 1000
        self._port = 0
        #: Sampled values skipped since this process started (``metering.PLAUSIBLE``, or
        #: unreadable inside a transaction message), by (station, measurand): a station
        #: sending them steadily (a SoC of -1 for "unknown") shows here, not only in the log.
        self.skipped_values: dict[tuple[str, str], int] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    def add_listener(self, callback: Listener) -> None:
        """``callback(event)`` for every event; may return an awaitable (run as an owned task)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        self._listeners.remove(callback)

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if cfg.security_profile < 2 and not cfg.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        assert cfg.tls_cert is not None
        cfg.check_tls_files()  # again: ``config`` may be replaced, files removed, since
        try:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (ssl.SSLError, OSError) as exc:
            files = ", ".join(repr(f) for f in (cfg.tls_cert, cfg.tls_key) if f is not None)
            raise OcppConfigError(
                f"[ocpp].tls_cert, [ocpp].tls_key: cannot load {files} "
                f"(a PEM certificate chain and its private key): {exc}"
            ) from None
        if cfg.tls_client_ca:
            try:
                ctx.load_verify_locations(cfg.tls_client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise OcppConfigError(
                    f"[ocpp].tls_client_ca: cannot load {cfg.tls_client_ca!r} "
                    f"(PEM CA certificates): {exc}"
                ) from None
            profiles = {cfg.profile_for(s) for s in self._stations}
            ctx.verify_mode = ssl.CERT_REQUIRED if profiles == {3} else ssl.CERT_OPTIONAL
        return ctx

    async def start(self) -> None:
        if self.config.gc_tuning:
            quiet_gc()
        for version in ("1.6", "2.0.1"):
            validation.precompile(
                version, ["BootNotification", "Heartbeat", "StatusNotification", "MeterValues"]
            )
        await self._restore_open_transactions()
        self._tls = self._ssl_context()
        self._server = await serve(
            self._session,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,  # type: ignore[arg-type]
            subprotocols=list(SUBPROTOCOLS),  # type: ignore[arg-type]
            ssl=self._tls,
            compression=None,
            # A link that died without a close is found by its unanswered ping: websockets
            # fails it (1011) and, no close frame coming back on a dead link, drops it after
            # close_timeout; the session ends and the station is reported gone. The pong's wait
            # is its own (pong_timeout_s): a station's pong waits behind the frame it is
            # sending, and received data does not count as a pong in websockets.
            ping_interval=self.config.ping_interval_s or None,
            ping_timeout=self.config.pong_timeout_s if self.config.ping_interval_s else None,
            close_timeout=min(10.0, self.config.ping_interval_s or 10.0),
            max_queue=64,
            max_size=self.config.max_frame_bytes,
        )
        sock = next(iter(self._server.sockets))
        self._port = sock.getsockname()[1]
        for st in self._stations.values():
            st.worker = asyncio.create_task(self._worker(st), name=f"ocpp-queue-{st.ocpp_id}")

    async def _restore_open_transactions(self) -> None:
        """Take back the transactions the store holds as open (after a restart of this process),
        so that a station replaying its StartTransaction / TransactionEvent gets the same
        transaction and no second start, and session energy still counts from the first register.
        """
        store = self._publisher.store
        lister = getattr(store, "list_open_transactions", None)
        if lister is None:
            return
        try:
            records = await lister()
        except Exception:
            LOG.exception("could not read open transactions from the store; starting without them")
            return
        # Oldest first: the newest open transaction of an EVSE is the one left active (store
        # order, by id, left any of them).
        for rec in sorted(records, key=lambda r: (r.started_at_s or 0.0, r.transaction_id)):
            charger = self._chargers.get(rec.charger_id)
            if charger is None:
                continue
            st = self._stations[charger.ocpp_id]
            if rec.transaction_id in st.transactions:
                continue
            tx = self._tx_from_record(rec, charger)
            st.transactions[rec.transaction_id] = tx
            st.active_tx[charger.evse_id] = rec.transaction_id
            if rec.transaction_id.isdigit():  # 1.6 ids we assigned: never hand one out again
                self._tx_counter = max(self._tx_counter, int(rec.transaction_id))
            if rec.meter_start_wh is not None and rec.started_at_s is not None:
                key = (charger.evse_id, rec.id_tag, rec.meter_start_wh, round(rec.started_at_s, 3))
                st.start_keys[key] = rec.transaction_id
        if records:
            LOG.info("restored %d open transactions from the store", len(records))
        for st in self._stations.values():
            if st.transactions and not st.reused_loaded:
                try:
                    await self._load_reused(st)  # which are ours for an id the station reused
                except Exception:
                    LOG.exception("station %s: could not read its reused ids", st.ocpp_id)

    def _tx_from_record(self, rec: Any, charger: ChargerInfo) -> TxState:
        """The state of a transaction the store holds (``TransactionRecord``): its start (and
        end) are in the store, so they were published and heard before."""
        tx = TxState(
            rec.transaction_id,
            charger.charger_id,
            charger.evse_id,
            rec.id_tag or None,
            rec.meter_start_wh,
            rec.meter_start_wh,
            rec.started_at_s,
        )
        tx.emitted.add("started")
        tx.published.add("started")
        if rec.ended_at_s is not None:
            tx.ended = True
            tx.ended_mono = self.clock.monotonic()
            tx.ended_at, tx.end_reason = rec.ended_at_s, rec.stop_reason or None
            if rec.meter_stop_wh is not None:
                tx.last_register_wh = rec.meter_stop_wh
            tx.emitted.add("ended")
            tx.published.add("ended")
        return tx

    async def _stored_tx(self, st: Station, transaction_id: str) -> TxState | None:
        """The store's record of a transaction of ``st`` not in memory (one ended and forgotten
        ``tx_keep_s`` after: the memory is bounded, the store is not), taken back, or None. A
        station retrying or replaying an event of it (a lost answer, then a day offline) gets it
        as it was: an ended one stays ended, and is never started again (published as started,
        sent TxProfiles, counted as charging). May raise (the store away): the handler's
        CALLERROR makes the station send the event again, nothing booked."""
        getter = getattr(self._publisher.store, "get_transaction", None)
        if getter is None:
            return None
        for charger in st.chargers.values():  # ids are the station's: any of its chargers
            rec = await getter(charger.charger_id, transaction_id)
            if rec is not None:
                tx = self._tx_from_record(rec, charger)
                st.transactions[transaction_id] = tx
                LOG.info(
                    "station %s: transaction %s taken back from the store (%s)",
                    st.ocpp_id,
                    transaction_id,
                    "ended" if tx.ended else "open",
                )
                return tx
        return None

    def _shows_live(self, st: Station, at: float, offline: bool) -> bool:
        """Whether a 2.0.1 event of a transaction unknown here (timestamp ``at``) shows it going
        on now: sent online when it happened (not ``offline``: E12, queued while offline) and
        no older than ``max_clock_skew_s`` by the station's clock. An older one is a retry or
        replay of the past (a transaction ended long ago and forgotten, ``tx_keep_s``): it is
        recorded, not started; the station's next online event of a live transaction starts it.
        """
        if offline:
            return False
        age_s = self.clock.now() - at
        offset = _offset(st.clock_offset)
        if offset is not None and offset < 0:
            age_s += offset  # its clock lags ours: its timestamps look that much older
        return age_s <= self.config.max_clock_skew_s

    async def stop(self) -> None:
        for st in self._stations.values():
            if st.worker is not None:
                st.worker.cancel()
            st.queue.fail_all("NotConnected", "central system stopped")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        workers = [st.worker for st in self._stations.values() if st.worker is not None]
        await asyncio.gather(*workers, *self._tasks, return_exceptions=True)
        for st in self._stations.values():
            st.worker = None
        if self.config.gc_tuning:
            gc.unfreeze()  # what was frozen at start may be garbage now: let the collector see it

    async def __aenter__(self) -> CentralSystem:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- handshake -----------------------------------------------------------------------
    def _station_from_path(self, path: str) -> str | None:
        path = path.split("?", 1)[0]
        prefix = self.config.path_prefix + "/"
        if not path.startswith(prefix):
            return None
        rest = path[len(prefix) :]
        if rest.endswith("/"):
            rest = rest[:-1]
        if not rest or "/" in rest:
            return None
        return unquote(rest)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        ocpp_id = self._station_from_path(request.path)
        if ocpp_id is None or ocpp_id not in self._stations:
            LOG.warning("refused unknown station at %r", request.path)
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown charging station\n")
        offered = [
            p.strip()
            for h in request.headers.get_all("Sec-WebSocket-Protocol")
            for p in h.split(",")
        ]
        if not any(p in SUBPROTOCOLS for p in offered):
            return connection.respond(
                HTTPStatus.BAD_REQUEST,
                "offer subprotocol ocpp1.6 or ocpp2.0.1 in Sec-WebSocket-Protocol\n",
            )
        profile = self.config.profile_for(ocpp_id)
        tls = self._tls is not None
        if profile >= 2 and not tls:
            return connection.respond(HTTPStatus.FORBIDDEN, "this station requires TLS\n")
        if profile == 3:
            return self._check_client_cert(connection, ocpp_id)
        if profile in (1, 2):
            return self._check_basic_auth(connection, request, ocpp_id)
        return None

    def _unauthorized(self, connection: ServerConnection, why: str) -> Response:
        response = connection.respond(HTTPStatus.UNAUTHORIZED, f"{why}\n")
        response.headers["WWW-Authenticate"] = 'Basic realm="ocpp", charset="UTF-8"'
        return response

    def _check_basic_auth(
        self, connection: ServerConnection, request: Request, ocpp_id: str
    ) -> Response | None:
        headers = request.headers.get_all("Authorization")
        if len(headers) > 1:  # (``headers.get`` raised: an HTTP 500)
            return self._unauthorized(connection, "malformed Authorization header")
        # The scheme name is case-insensitive and one or more spaces may follow it (RFC 7235
        # section 2.1, RFC 7617): stations sending "basic" or "BASIC" were refused.
        scheme, _, token = (headers[0] if headers else "").strip().partition(" ")
        if scheme.lower() != "basic":
            return self._unauthorized(connection, "Basic authentication required")
        try:
            decoded = base64.b64decode(token.lstrip(" "), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if b":" not in decoded:  # RFC 7617: user-id ":" password
            return self._unauthorized(connection, "malformed Authorization header")
        user, _, password = decoded.partition(b":")
        creds = self.config.credentials_for(ocpp_id)
        ok = False
        if creds is not None and user == ocpp_id.encode():
            for expected in creds.passwords():
                ok |= hmac.compare_digest(password, expected)
        if not ok:
            LOG.warning("station %s: wrong username or password", ocpp_id)
            return self._unauthorized(connection, "wrong username or password")
        return None

    def _check_client_cert(self, connection: ServerConnection, ocpp_id: str) -> Response | None:
        cert = connection.transport.get_extra_info("peercert") if connection.transport else None
        if not cert:
            return self._unauthorized(connection, "client certificate required")
        cn = None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    cn = value
        creds = self.config.credentials_for(ocpp_id)
        expected = (creds.serial if creds and creds.serial else None) or ocpp_id
        if cn != expected:
            LOG.warning("station %s: certificate CN %r, expected %r", ocpp_id, cn, expected)
            return self._unauthorized(connection, "certificate does not name this station")
        return None

    def _select_subprotocol(
        self, connection: ServerConnection, subprotocols: Iterable[str]
    ) -> str | None:
        for p in subprotocols:
            if p in SUBPROTOCOLS:
                return p
        return None

    # ---- sessions ------------------------------------------------------------------------
    async def _session(self, ws: ServerConnection) -> None:
        ocpp_id = self._station_from_path(ws.request.path if ws.request else "")
        version = _VERSION_OF.get(ws.subprotocol or "")
        if ocpp_id is None or version is None:
            await ws.close(1002, "no OCPP subprotocol")
            return
        st = self._stations[ocpp_id]
        conn = _CONNECTION_CLASS[version](st, ws, self, self.clock)
        if st.version is not None and st.version != version:
            self._forget_levels(st)
        old = st.connection
        st.connection = conn
        st.version = version
        st.last_seen = self.clock.now()
        if old is not None:
            old.closed = True
            old.fail_pending("Disconnected")
            self._emit(ConnectionEvent(ocpp_id, False, old.version, self.clock.now(), "replaced"))
            self._spawn(old.ws.close(1001, "replaced by a newer connection"))
        self._emit(ConnectionEvent(ocpp_id, True, version, self.clock.now()))
        reason = "closed"
        try:
            await conn.start()
        except ConnectionClosed:
            pass
        except Exception:
            LOG.exception("station %s: session failed", ocpp_id)
            reason = "error"
        finally:
            conn.closed = True
            conn.fail_pending("Disconnected")
            if st.connection is conn:
                st.connection = None
                st.gone_at = self.clock.now()
                st.queue.fail_all("Disconnected", "station disconnected")
                self._emit(ConnectionEvent(ocpp_id, False, version, self.clock.now(), reason))

    async def _worker(self, st: Station) -> None:
        while True:
            # Not while a CALL that ``send_limits`` wrote directly awaits its answer: the next
            # call stays in the queue meanwhile (a newer limit can still supersede it).
            item = await st.queue.get(ready=lambda st=st: st.in_flight is None)  # type: ignore[misc]
            st.busy = True
            try:
                await self._send_queued(st, item)
            finally:
                st.busy = False

    async def _send_queued(self, st: Station, item: QueuedCall) -> None:
        # One CALL in flight (``get`` waited for the slot already; this is a guard).
        while st.in_flight is not None:
            await asyncio.wait([st.in_flight])
        conn = st.connection
        if conn is None or conn.closed:
            _resolve(item, CallOutcome("NotConnected", detail="station not connected"))
            return
        if item.future.done():  # superseded or given up while waiting for the slot
            return
        try:
            built = item.builder()
        except Exception as exc:
            LOG.exception("station %s: building %s failed", st.ocpp_id, item.label)
            _resolve(item, CallOutcome("CallError", error_code="InternalError", detail=str(exc)))
            return
        if isinstance(built, CallOutcome):
            _resolve(item, built)
            return
        action, payload = built
        outcome = await conn.call_raw(action, payload, self.config.call_timeout_s)
        if item.then is not None and not item.future.done():
            try:
                outcome = await item.then(conn, outcome)
            except Exception as exc:
                LOG.exception("station %s: after %s", st.ocpp_id, item.label)
                outcome = CallOutcome("CallError", error_code="InternalError", detail=str(exc))
        _resolve(item, outcome)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _emit(self, event: OcppEvent) -> None:
        for cb in self._listeners:
            try:
                result = cb(event)
            except Exception:
                LOG.exception("listener failed on %r", event)
                continue
            if inspect.isawaitable(result):
                self._spawn(result)

    # ---- state ---------------------------------------------------------------------------
    def connected(self) -> set[str]:
        """OCPP ids of the stations connected now."""
        return {s.ocpp_id for s in self._stations.values() if s.connection is not None}

    def is_connected(self, charger_or_station: str) -> bool:
        st, _ = self._target(charger_or_station)
        return st.connection is not None

    def station_state(self, charger_or_station: str) -> StationState:
        st, _ = self._target(charger_or_station)
        return StationState(
            ocpp_id=st.ocpp_id,
            connected=st.connection is not None,
            version=st.version,
            boot=st.boot,
            configuration=dict(st.configuration),
            active_transactions=dict(st.active_tx),
            status=dict(st.status),
            queued_calls=len(st.queue),
        )

    def clock_offset_s(self, charger_or_station: str) -> float | None:
        """The station's clock minus ours (s; > 0: it runs ahead), estimated from the timestamps
        it sent (``clockskew``); ``None`` before it sent one, and for a lag not yet seen in two
        minutes of samples."""
        st, _ = self._target(charger_or_station)
        return _offset(st.clock_offset)

    def _schedule_start(self, st: Station, now: float) -> float:
        """The ``startSchedule`` of a profile sent to ``st`` at ``now`` (``schedule_start``); for
        a station whose clock is known to lag ours by more than ``max_clock_skew_s``, that much
        earlier again, so the profile is in force at once by its clock too (its final period
        still at ``validTo`` by ours). Before, such a station applied nothing of it until its
        clock reached the start, running meanwhile at its TxDefault or its maximum."""
        skew = self.config.max_clock_skew_s
        offset = _offset(st.clock_offset)
        if offset is not None and -offset > skew:
            return schedule_start(now + offset, skew)
        return schedule_start(now, skew)

    def _station_timestamp(self, st: Station, at: float) -> None:
        """A timestamp the station sent (accepted: not too far in the future) arrived now."""
        est = st.clock_offset
        est.observe(at, self.clock.now())
        offset = _offset(est)
        if not est.warned and offset is not None and abs(offset) > WARN_OFFSET_S:
            est.warned = True
            LOG.warning(
                "station %s: its clock runs %.1f s %s the central system's (from the timestamps "
                "it sends): its profiles' final (failsafe) periods begin that much %s by ours. "
                "Fix its NTP.",
                st.ocpp_id,
                abs(offset),
                "ahead of" if offset > 0 else "behind",
                "earlier" if offset > 0 else "later",
            )

    def charger(self, charger_id: str) -> ChargerInfo:
        try:
            return self._chargers[charger_id]
        except KeyError:
            raise KeyError(f"unknown charger {charger_id!r}") from None

    def _target(self, charger_or_station: str) -> tuple[Station, ChargerInfo | None]:
        c = self._chargers.get(charger_or_station)
        if c is not None:
            return self._stations[c.ocpp_id], c
        st = self._stations.get(charger_or_station)
        if st is None:
            raise KeyError(f"unknown charger or station {charger_or_station!r}")
        return st, None

    # ---- events from the handlers (never await a call here) ------------------------------
    def _on_boot(
        self,
        conn: StationConnection,
        *,
        vendor: str,
        model: str,
        serial: str | None,
        firmware: str | None,
        reason: str | None,
    ) -> None:
        st = conn.station
        ev = BootEvent(
            st.ocpp_id, conn.version, self.clock.now(), vendor, model, serial, firmware, reason
        )
        st.boot = ev
        st.booted_mono = self.clock.monotonic()
        self._emit(ev)
        if self.config.configure_on_boot:
            conn.after_reply(lambda: self._configure_after_boot(st, conn))

    def _configure_after_boot(self, st: Station, conn: StationConnection) -> None:
        """A round of configuration after a Boot, one at a time per station. A Boot means the
        station may have lost its settings, so each is followed by a complete round; one that
        comes during a round (a second Boot on the connection, or a reboot and reconnect) makes
        that round start again from its first call once the call in flight is answered. Before,
        each Boot spawned a round of its own: two interleaved on the station's call slot (each
        call twice) and the first reported results from before the second Boot."""
        if st.configuring is not None and not st.configuring.done():
            st.configure_again = conn
            return
        st.configure_again = None
        st.configuring = self._spawn(self._configure(st, conn))

    async def _configure(self, st: Station, conn: StationConnection) -> None:
        while True:
            st.configure_again = None
            results, whole = await self._configure_round(st, conn)
            again = st.configure_again
            if not whole and again is not None and again is st.connection and not again.closed:
                conn = again  # a Boot came during the round: all of it again, on its connection
                continue
            if not whole:
                # The connection ended or was replaced and no Boot came on the new one (yet):
                # nothing more is sent before the station boots there (its Boot starts a round).
                LOG.info("station %s: configuration round cut off: %s", st.ocpp_id, results)
            st.configuration = results
            self._emit(ConfigurationEvent(st.ocpp_id, self.clock.now(), results))
            return

    async def _configure_round(
        self, st: Station, conn: StationConnection
    ) -> tuple[dict[str, str], bool]:
        """One round on ``conn``: what the station answered per key, and whether the round was
        whole. Cut off (False) when a Boot came during it (the round starts again) or ``conn``
        ended or was replaced: the keys not sent then are ``Disconnected``."""
        mod = v16 if conn.version == "1.6" else v201
        calls = mod.configure_calls(self.config.measurands, self.config.sample_interval_s)
        results: dict[str, str] = {}
        whole = True
        for action, payload in calls:
            if action == "ChangeConfiguration":
                names = [str(payload["key"])]
            else:
                names = [
                    f"{d['component']['name']}.{d['variable']['name']}"
                    for d in payload["setVariableData"]
                ]
            if st.configure_again is not None or st.connection is not conn or conn.closed:
                whole = False
            if not whole:
                results.update(dict.fromkeys(names, "Disconnected"))
                continue
            out = await self._enqueue(st, _on_conn(st, conn, action, payload), label=action)
            if out.status == "Result" and out.payload and action == "ChangeConfiguration":
                results[names[0]] = str(out.payload.get("status", "?"))
            elif out.status == "Result" and out.payload:
                for r in out.payload.get("setVariableResult", []):
                    results[f"{r['component']['name']}.{r['variable']['name']}"] = r[
                        "attributeStatus"
                    ]
            else:
                results.update(dict.fromkeys(names, out.status))
        if st.configure_again is not None:
            whole = False
        return results, whole

    async def _on_status(
        self, st: Station, evse_id: int, connector_id: int, status: str, error: str, at: float
    ) -> None:
        charger = st.charger(evse_id)
        st.status[(evse_id, connector_id)] = status
        if charger is None and evse_id != 0:
            # An EVSE / connector the site file does not list: no charger's, and not the
            # station's own (``charger_id`` None is connector / EVSE 0). Before, it was published
            # and stored as the station's and overwrote it (an unmanaged connector's Faulted was
            # the station's). Answered all the same: a station retries a refused one.
            LOG.warning(
                "station %s: StatusNotification of EVSE/connector %s, which the site file does "
                "not list: %s %s, not recorded",
                st.ocpp_id,
                evse_id,
                status,
                error,
            )
            return
        ev = StatusEvent(
            charger.charger_id if charger else None,
            st.ocpp_id,
            evse_id,
            connector_id,
            status,
            error,
            at,
        )
        self._emit(ev)
        await self._publisher.publish(ev)

    def _end(self, st: Station, tx: TxState, at: float, reason: str | None) -> None:
        """Book ``tx`` ended (at ``at`` by the station, now by our monotonic clock, for
        ``tx_keep_s``); its EVSE no longer has it active."""
        tx.ended = True
        tx.ended_mono = tx.end_heard_mono = self.clock.monotonic()
        tx.ended_at, tx.end_reason = at, reason
        if tx.evse_id is not None and st.active_tx.get(tx.evse_id) == tx.transaction_id:
            del st.active_tx[tx.evse_id]

    async def _take_evse(self, st: Station, tx: TxState, at: float) -> None:
        """``tx`` becomes its EVSE's active transaction, superseding older ones, unless a newer
        one is active there (then this is a late message of an older transaction)."""
        if tx.evse_id is None:
            return
        current = st.transactions.get(st.active_tx.get(tx.evse_id, ""))
        if (
            current is not None
            and current is not tx
            and not current.ended
            and (current.started_at or 0.0) > (tx.started_at or 0.0)
        ):
            return
        st.active_tx[tx.evse_id] = tx.transaction_id
        await self._supersede(st, tx, at)

    async def _supersede(self, st: Station, tx: TxState, at: float) -> None:
        """A transaction starting (or going on) on ``tx``'s EVSE ends every other one still open
        there, at ``at``, reason ``Superseded``: an EVSE has one transaction at a time, and one
        whose end was lost (the station gave up its retries, lost power) stayed open for good,
        in the store too, where a restart could take it back as the EVSE's active transaction
        and every TxProfile then named a transaction the station did not have. An end set here
        and not yet published (the bus or store refused it) is published again on the retry."""
        started = tx.started_at or 0.0
        for other in list(st.transactions.values()):
            if other is tx or other.evse_id != tx.evse_id or other.charger_id is None:
                continue
            if (other.started_at or 0.0) > started:
                continue  # a newer one: this is a late message of an older transaction
            if not other.ended:
                LOG.warning(
                    "station %s: transaction %s starts on EVSE %s where %s was never ended: "
                    "ended now (Superseded)",
                    st.ocpp_id,
                    tx.transaction_id,
                    tx.evse_id,
                    other.transaction_id,
                )
                self._end(st, other, at, SUPERSEDED)
            if other.end_reason == SUPERSEDED and "ended" not in other.published:
                await self._tx_event(st, other, "ended", other.ended_at or at, SUPERSEDED)

    def _forget_ended(self, st: Station) -> None:
        """Drop ``st``'s transactions that ended more than ``tx_keep_s`` ago and whose end the
        bus and store took (a new one starting is when: the work is per session)."""
        now = self.clock.monotonic()
        gone = [
            tx_id
            for tx_id, tx in st.transactions.items()
            if tx.ended
            # (one never attributed to a charger publishes nothing: it waited for ever)
            and ("ended" in tx.published or tx.charger_id is None)
            and tx.ended_mono is not None
            and now - tx.ended_mono > self.tx_keep_s
        ]
        for tx_id in gone:
            del st.transactions[tx_id]
        # The 1.6 start keys outlive their transactions (``START_KEYS_KEEP``, bounded by count):
        # dropped with them, a resent StartTransaction got a new transactionId.

    def _next_tx_id(self) -> str:
        self._tx_counter += 1
        return str(self._tx_counter)

    async def _on_start_1_6(
        self, st: Station, *, connector_id: int, id_tag: str, meter_start_wh: float, at: float
    ) -> int:
        key = (connector_id, id_tag, meter_start_wh, round(at, 3))
        existing = st.start_keys.get(key)
        if existing is None and not st.start_keys_loaded:
            await self._load_start_keys(st)  # the first unknown start since this process began
            existing = st.start_keys.get(key)
        if existing is not None:  # a replay or a retry after a lost answer: same transaction
            known = st.transactions.get(existing)
            if known is None:
                # Ended and forgotten (``tx_keep_s``): taken back as it was, so that its resent
                # StopTransaction and MeterValues are replays, not a new end.
                known = await self._forgotten_start_1_6(st, existing, key)
            if known is not None and not known.ended:
                await self._supersede(st, known, at)  # an end it set that was not taken
            if known is not None and "started" not in known.published:
                # The first attempt's publish failed (its CALLERROR made the station retry):
                # publish it now, under the same event id.
                await self._tx_event(st, known, "started", known.started_at or at)
            await self._save_start_keys(st)  # the first attempt's write failed
            return int(existing)
        charger = st.charger(connector_id)
        if charger is None:
            raise HandlerError("PropertyConstraintViolation", f"unknown connectorId {connector_id}")
        self._forget_ended(st)
        tx_id = self._next_tx_id()
        st.start_keys[key] = tx_id
        while len(st.start_keys) > START_KEYS_KEEP:
            del st.start_keys[next(iter(st.start_keys))]
        st.start_keys_unsaved = True
        start_wh = self._plausible_register(st, tx_id, meter_start_wh, "meterStart")
        tx = TxState(tx_id, charger.charger_id, connector_id, id_tag, start_wh, start_wh, at)
        st.transactions[tx_id] = tx
        await self._take_evse(st, tx, at)
        await self._tx_event(st, tx, "started", at)
        # Before the answer: a failure is a CALLERROR, and the station's resend writes it again.
        await self._save_start_keys(st)
        return int(tx_id)

    async def _load_start_keys(self, st: Station) -> None:
        """Take the store's copy of ``st``'s 1.6 start keys (``START_KEYS_META``) into memory,
        behind those already there. May raise (the store away): the StartTransaction gets a
        CALLERROR and the station sends it again."""
        getter = getattr(self._publisher.store, "get_meta", None)
        text = await getter(START_KEYS_META.format(ocpp_id=st.ocpp_id)) if getter else None
        stored: dict[tuple[Any, ...], str] = {}
        try:
            for connector_id, id_tag, meter_start_wh, at, tx_id in json.loads(text or "[]"):
                key = (int(connector_id), str(id_tag), float(meter_start_wh), float(at))
                stored[key] = str(tx_id)
        except (ValueError, TypeError) as exc:
            LOG.warning("station %s: its stored 1.6 start keys are unreadable: %s", st.ocpp_id, exc)
        for tx_id in stored.values():  # never hand one out again
            if tx_id.isdigit():
                self._tx_counter = max(self._tx_counter, int(tx_id))
        merged = {**stored, **st.start_keys}
        st.start_keys = dict(list(merged.items())[-START_KEYS_KEEP:])
        st.start_keys_loaded = True

    async def _save_start_keys(self, st: Station) -> None:
        """Write ``st``'s 1.6 start keys to the store when it lacks some. May raise (as
        ``_load_start_keys``)."""
        setter = getattr(self._publisher.store, "set_meta", None)
        if not st.start_keys_unsaved or setter is None:
            return
        if not st.start_keys_loaded:
            await self._load_start_keys(st)
        rows = [[*key, tx_id] for key, tx_id in st.start_keys.items()]
        await setter(START_KEYS_META.format(ocpp_id=st.ocpp_id), json.dumps(rows))
        st.start_keys_unsaved = False

    async def _forgotten_start_1_6(
        self, st: Station, tx_id: str, key: tuple[Any, ...]
    ) -> TxState | None:
        """The transaction a kept start key names, forgotten since it ended (``tx_keep_s``):
        the store's record (``_stored_tx``), else rebuilt from the key as ended (only an ended
        transaction whose end was published is forgotten). Kept again for ``tx_keep_s``."""
        tx = await self._stored_tx(st, tx_id)
        if tx is not None:
            return tx
        connector_id, id_tag, meter_start_wh, at = key
        charger = st.charger(connector_id)
        if charger is None:
            return None
        tx = TxState(
            tx_id, charger.charger_id, connector_id, id_tag, meter_start_wh, meter_start_wh, at
        )
        tx.ended, tx.ended_mono = True, self.clock.monotonic()
        tx.emitted.update(("started", "ended"))
        tx.published.update(("started", "ended"))
        st.transactions[tx_id] = tx
        LOG.info(
            "station %s: StartTransaction of transaction %s resent after it was forgotten: "
            "same id, nothing published again",
            st.ocpp_id,
            tx_id,
        )
        return tx

    async def _tx_event(
        self,
        st: Station,
        tx: TxState,
        kind: str,
        at: float,
        reason: str | None = None,
        offline: bool = False,
    ) -> None:
        if tx.charger_id is None:
            return
        if kind in tx.published:
            return
        start_wh, now_wh = tx.registers_wh()
        ev = TransactionEvent(
            charger_id=tx.charger_id,
            ocpp_id=st.ocpp_id,
            transaction_id=tx.transaction_id,
            kind=kind,  # type: ignore[arg-type]
            at=self._heard_at(st, at, offline),
            station_at=at,
            id_tag=tx.id_tag,
            meter_start_wh=start_wh,
            meter_now_wh=now_wh,
            session_energy_wh=tx.session_energy_wh(),
            reason=reason,
            offline=offline,
        )
        if kind not in tx.emitted:  # local listeners hear each start and end once
            self._emit(ev)
            if kind != "updated":
                tx.emitted.add(kind)
        # May raise (the outbox's disk full, the store away): the handler's CALLERROR makes the
        # station send it again, and the repeat publishes what was not taken (same event id).
        await self._publisher.publish(ev)
        if kind != "updated":
            tx.published.add(kind)

    def _heard_at(self, st: Station, at: float, offline: bool) -> float:
        """The time a transaction event stamped ``at`` by ``st`` is heard at (``TransactionEvent
        .at``; the station's own stays in ``station_at`` and the record): its clock's known
        offset taken out (``clock_offset_s``, beyond ``max_clock_skew_s``), an offline event
        no earlier than the station's last disconnect (queued while it was away: not before it
        went), and never later than now (it cannot have happened after it arrived). The edge
        takes an offline start at this time: before, one stamped in 2000 by a clock that went
        back was a session 26 years old, one stamped hours ahead was refused."""
        heard = at
        offset = _offset(st.clock_offset)
        if offset is not None and abs(offset) > self.config.max_clock_skew_s:
            heard = at - offset
        if offline and st.gone_at is not None and heard < st.gone_at:
            heard = st.gone_at
        return min(heard, self.clock.now())

    async def _stop_target_1_6(self, st: Station, tx_id: str) -> TxState:
        """The transaction a 1.6 StopTransaction names: in memory, else the store's record (one
        ended and forgotten, ``tx_keep_s``: its resent stop is a replay, not a second end; one
        left open is attributed to its charger whatever the station's EVSEs), else
        ``_unknown_stop_1_6``."""
        tx = st.transactions.get(tx_id)
        if tx is None:
            tx = await self._stored_tx(st, tx_id)
        if tx is None:
            tx = self._unknown_stop_1_6(st, tx_id)
        return tx

    def _unknown_stop_1_6(self, st: Station, tx_id: str) -> TxState:
        """A StopTransaction for a transaction never seen started (another central system's, or
        this one restarted without a store). 1.6 StopTransaction names no connector: a one-EVSE
        station's is its only charger's; otherwise it cannot be attributed. Its session energy
        counts only from the first register seen (its ``transactionData``), never a raw register.
        """
        tx = st.transactions.get(tx_id)
        if tx is not None:
            return tx
        only = next(iter(st.chargers.values())) if len(st.chargers) == 1 else None
        LOG.warning(
            "station %s: StopTransaction for unknown transaction %s%s",
            st.ocpp_id,
            tx_id,
            f" (attributed to {only.charger_id})" if only else " (not attributed)",
        )
        tx = TxState(
            tx_id, only.charger_id if only else None, only.evse_id if only else None, None, None
        )
        st.transactions[tx_id] = tx
        return tx

    async def _on_stop(
        self, st: Station, tx_id: str, *, meter_stop_wh: float, at: float, reason: str | None
    ) -> None:
        tx = st.transactions.get(tx_id)
        if tx is not None and tx.ended:
            # A duplicate stop (replay): already counted; published again only if the first
            # attempt's publish failed.
            await self._tx_event(st, tx, "ended", tx.ended_at or at, tx.end_reason)
            return
        if tx is None:
            tx = self._unknown_stop_1_6(st, tx_id)
        # An implausible meterStop is skipped: the registers its meter values gave stand.
        stop_wh = self._plausible_register(st, tx_id, meter_stop_wh, "meterStop")
        if stop_wh is not None and tx.inlet_only:
            # meterStop is the register the station reports: its inlet one, its only one.
            charger = self._chargers.get(tx.charger_id) if tx.charger_id else None
            tx.note_inlet(stop_wh, at, charger)
        elif stop_wh is not None:
            tx.last_register_wh = stop_wh
        self._end(st, tx, at, reason)
        await self._tx_event(st, tx, "ended", at, reason)

    async def _on_transaction_event_2_0_1(
        self, st: Station, *, transaction_id: str, seq_no: int, **event: Any
    ) -> None:
        """A TransactionEvent, handled once any copy of the same message (transaction, seqNo)
        still being handled has finished: one read on a connection that has since dropped, its
        handler waiting on the bus or store while the station reconnected and resent it. Its
        outcome decides: handled, the resend is a replay; failed (its CALLERROR could not even
        be sent), the resend is handled. Before, the seqNo was booked while the first copy
        waited, so the resend was answered at once as a replay; when the first copy's publish
        then failed, the event reached neither bus nor store and the station, answered, never
        sent it again (``tests/ocpp/test_ocpp_reconnect_retry.py``)."""
        key = (transaction_id, seq_no)
        while (earlier := st.handling.get(key)) is not None:
            await asyncio.wait([earlier])
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.handling[key] = done
        try:
            await self._handle_transaction_event_2_0_1(
                st, transaction_id=transaction_id, seq_no=seq_no, **event
            )
        finally:
            del st.handling[key]
            done.set_result(None)

    async def _handle_transaction_event_2_0_1(
        self,
        st: Station,
        *,
        event_type: str,
        transaction_id: str,
        seq_no: int,
        evse_id: int | None,
        id_tag: str | None,
        at: float,
        meter_values: list[dict[str, Any]],
        reason: str | None,
        offline: bool,
    ) -> None:
        tx = self._tx_of_station_id(st, transaction_id, at)
        if tx is None and not st.reused_loaded:
            await self._load_reused(st)  # (after a restart: the id may be a reused one's)
            tx = self._tx_of_station_id(st, transaction_id, at)
        after_boot = event_type == "Started" and tx is not None and self._new_after_boot(st, tx, at)
        if tx is not None and not after_boot and tx.is_replay(seq_no, at):
            return  # replayed message: already handled
        if evse_id is not None and evse_id != 0 and evse_id not in st.chargers:
            # (before any state: a TxState of an unknown EVSE was kept for ever)
            raise HandlerError("PropertyConstraintViolation", f"unknown EVSE {evse_id}")
        new = False
        if tx is None:
            tx = await self._stored_tx_of_station_id(st, transaction_id, at)
            after_boot = (
                event_type == "Started" and tx is not None and self._new_after_boot(st, tx, at)
            )
        ours = transaction_id
        if (
            tx is not None
            and event_type == "Started"
            and tx.ended
            and ((tx.ended_at is not None and at > tx.ended_at) or after_boot)
        ) or (tx is None and transaction_id in st.transactions):
            # The station started a session under the id of one that ended before it (its
            # counter began again after a reboot): a new session, under an id of ours. Before,
            # it was taken for the ended one: nothing of it was published, no TxProfile could
            # name it. (Or the station's id is one of ours for another reused id.)
            ours = await self._reused_id(st, transaction_id)
            LOG.warning(
                "station %s: transaction id %s used again for a new session (started at %.3f, "
                "after its last one ended): it is transaction %s here",
                st.ocpp_id,
                transaction_id,
                at,
                ours,
            )
            tx = None
        if tx is None:
            if evse_id is None and len(st.chargers) == 1:
                evse_id = next(iter(st.chargers))
            charger = st.charger(evse_id)
            tx = TxState(
                ours,
                charger.charger_id if charger else None,
                evse_id,
                id_tag,
                None,
                started_at=at,
                # Only a Started begins a transaction of its own accord (E01, E12 offline too);
                # an Updated of one unknown here (forgotten a day after its end, no store) that
                # the station retries or replays must not open it again.
                dormant=event_type == "Updated" and not self._shows_live(st, at, offline),
                station_tx_id=transaction_id if ours != transaction_id else "",
            )
            if tx.dormant:
                LOG.warning(
                    "station %s: TransactionEvent(Updated) for unknown transaction %s, %s: "
                    "recorded, not started until an event shows it going on",
                    st.ocpp_id,
                    transaction_id,
                    "queued offline" if offline else f"{self.clock.now() - at:.0f} s old",
                )
            self._forget_ended(st)
            st.transactions[ours] = tx
            new = True
        else:
            if id_tag and tx.id_tag is None:
                tx.id_tag = id_tag
            if tx.evse_id is None and evse_id is not None and not tx.ended:
                # Started before its EVSE was known (TxStartPoint Authorized on a station of
                # several EVSEs: the EVSE comes with the cable): attributed now, its start
                # published below. Before, it stayed unattributed for good: no start or end
                # published, no TxProfile possible, its meter values dropped.
                charger = st.charger(evse_id)
                if charger is not None:
                    tx.evse_id, tx.charger_id = evse_id, charger.charger_id
        tx.see_event(seq_no, at)
        try:
            await self._tx_meter_values(
                st, tx.evse_id, meter_values, tx.transaction_id, "meterValue"
            )
            if tx.ended:
                # Ended already: only an end the bus or store did not take goes again.
                await self._tx_event(st, tx, "ended", tx.ended_at or at, tx.end_reason, offline)
                return
            if event_type == "Ended":
                self._end(st, tx, at, reason)
                await self._tx_event(st, tx, "ended", at, reason, offline)
            elif tx.dormant and not self._shows_live(st, at, offline):
                pass  # recorded (its samples above), not started: not shown going on
            elif new or "started" not in tx.published:
                tx.dormant = False
                await self._take_evse(st, tx, at)
                await self._tx_event(st, tx, "started", tx.started_at or at, None, offline)
            else:
                # The EVSE's transaction is this one (a restart may have taken back an older one
                # still open in the store as active).
                await self._take_evse(st, tx, at)
                await self._tx_event(st, tx, "updated", at, None, offline)
        except BaseException:
            # Not handled in full (a publish failed, or the handler was cancelled with its
            # connection): the station's retry of this seqNo is processed again rather than
            # answered as a replay.
            tx.unsee_seq(seq_no)
            raise

    def _new_after_boot(self, st: Station, tx: TxState, at: float) -> bool:
        """A 2.0.1 Started stamped ``at`` under the id of ``tx`` begins a new session because
        the station rebooted since ``tx`` ended: ``tx`` ended (heard before the station's last
        BootNotification, or taken back from the store: before any boot this process saw) and
        ``at`` is not ``tx``'s own start (a copy of that Started resent after the boot, our
        answer lost, has its time: within 0.5 ms, what the record's nanoseconds keep of it). A
        station whose clock went back at the reboot stamps its new session before the old end:
        by time alone it was a replay of the old Started (same seqNo, no newer), and dropped."""
        if not tx.ended or st.booted_mono is None:
            return False
        if tx.end_heard_mono is not None and tx.end_heard_mono >= st.booted_mono:
            return False
        return tx.started_at is None or abs(at - tx.started_at) > 0.0005

    def _tx_of_station_id(self, st: Station, station_id: str, at: float) -> TxState | None:
        """The transaction in memory that the station's ``station_id`` names for an event
        stamped ``at``: of the sessions under that id (``Station.reused``), the newest that
        started by then (a late event of an earlier one is that one's), else the oldest."""
        found = [
            tx
            for our_id in (station_id, *st.reused.get(station_id, ()))
            if (tx := st.transactions.get(our_id)) is not None and tx.wire_id == station_id
        ]
        for tx in reversed(found):
            if tx.started_at is None or at >= tx.started_at:
                return tx
        return found[0] if found else None

    async def _stored_tx_of_station_id(
        self, st: Station, station_id: str, at: float
    ) -> TxState | None:
        """``_tx_of_station_id`` for the store's records (``_stored_tx``)."""
        others = {i for sid, ids in st.reused.items() if sid != station_id for i in ids}
        for our_id in (*reversed(st.reused.get(station_id, ())), station_id):
            if our_id in st.transactions or our_id in others:
                continue  # in memory, not the station's (``_tx_of_station_id``); or ours
            tx = await self._stored_tx(st, our_id)
            if tx is None:
                continue
            if our_id != station_id:
                tx.station_tx_id = station_id
            if tx.started_at is None or at >= tx.started_at or our_id == station_id:
                return tx
        return None

    async def _reused_id(self, st: Station, station_id: str) -> str:
        """Our id for a new session under ``station_id``, which the station used before:
        ``{station_id}#{n}`` (n from 2), one neither in memory nor in the store; booked in
        ``Station.reused`` and the store (may raise: the event's CALLERROR, the station
        resends it)."""
        if not st.reused_loaded:
            await self._load_reused(st)
        ids = st.reused.setdefault(station_id, [])
        n = len(ids) + 2
        while True:
            ours = f"{station_id}#{n}"
            if ours not in st.transactions and not await self._in_store(st, ours):
                break
            n += 1
        ids.append(ours)
        st.reused[station_id] = st.reused.pop(station_id)  # the newest last
        while len(st.reused) > REUSED_IDS_KEEP:
            del st.reused[next(iter(st.reused))]
        setter = getattr(self._publisher.store, "set_meta", None)
        if setter is not None:
            await setter(REUSED_IDS_META.format(ocpp_id=st.ocpp_id), json.dumps(st.reused))
        return ours

    async def _in_store(self, st: Station, transaction_id: str) -> bool:
        getter = getattr(self._publisher.store, "get_transaction", None)
        if getter is None:
            return False
        for charger in st.chargers.values():
            if await getter(charger.charger_id, transaction_id) is not None:
                return True
        return False

    async def _load_reused(self, st: Station) -> None:
        """Take the store's copy of ``st``'s reused 2.0.1 ids (``REUSED_IDS_META``), and mark
        the transactions in memory that are ours for them. May raise (the store away)."""
        getter = getattr(self._publisher.store, "get_meta", None)
        text = await getter(REUSED_IDS_META.format(ocpp_id=st.ocpp_id)) if getter else None
        try:
            stored = json.loads(text or "{}")
            reused = {str(k): [str(i) for i in v] for k, v in dict(stored).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            LOG.warning("station %s: its stored reused ids are unreadable: %s", st.ocpp_id, exc)
            reused = {}
        for station_id, ids in st.reused.items():  # ours first: newer
            reused[station_id] = list(dict.fromkeys([*reused.get(station_id, []), *ids]))
        st.reused = reused
        st.reused_loaded = True
        for station_id, ids in reused.items():
            for our_id in ids:
                tx = st.transactions.get(our_id)
                if tx is not None:
                    tx.station_tx_id = station_id

    async def _on_meter_values(
        self,
        st: Station,
        evse_id: int,
        meter_values: Sequence[Mapping[str, Any]],
        tx_id: str | None,
    ) -> None:
        """A MeterValues message's ``meterValue``: a sample per instant (``same_time_merged``).
        A sampled value that cannot be read (a 1.6 SoC of "" or "n/a", a value of "nan", a
        2.0.1 multiplier out of range) or is read as a number no meter gives
        (``metering.PLAUSIBLE``: a SoC of -1 some stations send for "unknown") is skipped,
        logged naming its field and counted (``skipped_values``), and the rest of its reading
        kept: refusing the message lost the station's currents and power with it. A skipped
        register is no reading: the session energy stays on the registers read. What the
        schema refuses (validated before this) and a timestamp that cannot be read or is too
        far ahead still refuse the message."""
        for mv, where, names in same_time_merged(meter_values, "meterValue"):
            await self._on_meter_value(st, evse_id, mv, tx_id, where, lenient=True, names=names)

    async def _on_meter_value(
        self,
        st: Station,
        evse_id: int | None,
        mv: Mapping[str, Any],
        tx_id: str | None,
        where: str,
        lenient: bool = False,
        names: Sequence[str] | None = None,
    ) -> None:
        """One meterValue entry: a ``MeterSample``, the transaction's registers. ``lenient``
        (``_on_meter_values``, ``_tx_meter_values``): a sampled value that cannot be read or
        is outside ``metering.PLAUSIBLE`` is skipped, logged and counted (a skipped register
        is no reading: it never reaches the session's energy), else it raises. ``names``: its
        sampled values' names in the message (``same_time_merged``)."""
        tx = st.transactions.get(tx_id) if tx_id is not None else None
        if evse_id is None and tx is not None:
            evse_id = tx.evse_id
        if evse_id is not None and evse_id != 0 and evse_id not in st.chargers:
            raise HandlerError("PropertyConstraintViolation", f"unknown EVSE/connector {evse_id}")
        charger = st.charger(evse_id)
        if charger is None:
            return  # station-level meter (connector 0): not a charger's draw
        if tx is not None and tx.evse_id is not None and tx.evse_id != charger.evse_id:
            # The reading is its connector's; the transaction it names is another's. Before,
            # its register went into that transaction: 4,200 Wh published for a session of
            # another connector that had drawn nothing.
            LOG.warning(
                "station %s: %s of connector/EVSE %s names transaction %s of EVSE %s: "
                "not counted for that transaction",
                st.ocpp_id,
                where,
                charger.evse_id,
                tx_id,
                tx.evse_id,
            )
            tx = None
        dc = charger.kind == "dc"
        reading = parse_meter_value(
            st.version or "1.6",
            mv,
            terminals=charger.phase_map.terminals,
            field=where,
            dc=dc,
            lenient=lenient,
            names=names,
        )
        for measurand, why in reading.skipped:
            self._count_skipped(st, measurand)
            LOG.warning("station %s: sampled value skipped: %s", st.ocpp_id, why)
        if reading.skipped and reading.empty:
            return  # nothing left of it to publish (an empty sample is no reading of the draw)
        if dc and reading.power_w is not None and reading.terminal_a == [None, None, None]:
            # No grid-side current reported: the line currents follow from the power.
            line = charger.dc_line_a(reading.power_w, at_inlet=reading.power_at_inlet)
            reading.terminal_a = [line, line, line]
        if reading.at > self.clock.now() + self.config.max_clock_skew_s:
            raise HandlerError("PropertyConstraintViolation", f"{where}.timestamp in the future")
        self._station_timestamp(st, reading.at)
        if tx is None and tx_id is None:
            active = st.active_tx.get(charger.evse_id)
            tx = st.transactions.get(active) if active else None
        if tx is not None:
            # The outlet's first: an inlet register counts only for a session without one.
            if reading.energy_register_wh is not None:
                tx.note_outlet(reading.energy_register_wh)
            if reading.inlet_energy_register_wh is not None:
                tx.note_inlet(reading.inlet_energy_register_wh, reading.at, charger)
        register_wh = reading.energy_register_wh
        if register_wh is None:
            register_wh = reading.inlet_energy_register_wh
        t = reading.terminal_a
        # MeterSample.power_w is the charger's import from the grid (proto meter.proto; the edge
        # compares it with what a DC setpoint draws at the inlet). A DC charger's power at its
        # outlet (the default location) is what the car took: converted. Before, it went out as
        # it was, below what the charger drew by its losses and auxiliary load, and a DC charger
        # drawing above its setpoint had to go that much further before it was seen.
        power_w = reading.power_w
        if dc and power_w is not None and not reading.power_at_inlet:
            power_w = charger.dc_input_w(power_w)
        sample = MeterSample(
            charger_id=charger.charger_id,
            ocpp_id=st.ocpp_id,
            at=reading.at,
            site_phase_a=charger.phase_map.to_site(t),
            terminal_a=(t[0], t[1], t[2]),
            power_w=power_w,
            energy_register_wh=register_wh,
            offered_a=reading.offered_a,
            soc_percent=reading.soc_percent,
            transaction_id=tx.transaction_id if tx is not None else tx_id,
            session_energy_wh=tx.session_energy_wh() if tx is not None else None,
            context=reading.context,
        )
        self._emit(sample)
        await self._publisher.publish(sample)

    async def _tx_meter_values(
        self,
        st: Station,
        evse_id: int | None,
        meter_values: Sequence[dict[str, Any]],
        tx_id: str,
        field: str,
    ) -> None:
        """The meter values a transaction message carries (1.6 StopTransaction
        ``transactionData``, 2.0.1 TransactionEvent ``meterValue``). What cannot be read (a
        value, a timestamp, one too far ahead) is skipped and logged, never the message: the
        station retries a refused transaction message a few times, then drops it, and with it
        the transaction's start or end (before, a SoC of "" in a StopTransaction's
        transactionData, or a multiplier of 400 in a TransactionEvent, left the session open
        for good). Publishing failures still raise (the station's retry sends it again)."""
        for mv, where, names in same_time_merged(meter_values, field):
            try:
                await self._on_meter_value(st, evse_id, mv, tx_id, where, lenient=True, names=names)
            except (MeterValueError, HandlerError) as exc:
                LOG.warning(
                    "station %s: transaction %s: %s skipped: %s", st.ocpp_id, tx_id, where, exc
                )

    def _plausible_register(self, st: Station, tx_id: str, value: float, name: str) -> float | None:
        """A 1.6 meterStart / meterStop ``value`` (Wh), or None (logged, counted) when no
        register reads it (``metering.PLAUSIBLE``): the transaction is taken, its energy counts
        from the registers of its meter values instead."""
        try:
            return check_plausible("Energy.Active.Import.Register", value, name)
        except MeterValueError as exc:
            self._count_skipped(st, "Energy.Active.Import.Register")
            LOG.warning("station %s: transaction %s: %s skipped", st.ocpp_id, tx_id, exc)
            return None

    def _count_skipped(self, st: Station, measurand: str) -> None:
        key = (st.ocpp_id, measurand)
        self.skipped_values[key] = self.skipped_values.get(key, 0) + 1

    async def _on_security(
        self, st: Station, kind: str, info: str | None, at: float, version: str = ""
    ) -> None:
        ev = SecurityEvent(st.ocpp_id, at, kind, info, version)
        self._emit(ev)
        await self._publisher.publish(ev)

    def _on_notification(
        self,
        st: Station,
        action: str,
        payload: dict[str, Any],
        version: str = "",
        at: float | None = None,
    ) -> NotificationEvent:
        at = self.clock.now() if at is None else at
        ev = NotificationEvent(st.ocpp_id, at, action, dict(payload), version)
        self._emit(ev)
        return ev

    async def _on_station_status(
        self, st: Station, action: str, payload: dict[str, Any], version: str
    ) -> None:
        """Firmware / diagnostics / log status: to the listeners, then published and stored
        (``evcore.<site>.station_event.<station>``) before the station gets its answer.

        They carry no time of their own: a copy of the station's last one of that action
        (the same payload) within ``STATUS_RESEND_S`` of it is a resend (our answer lost, or
        refused when the store failed) and keeps its time, so the bus (event id: station,
        kind, status, time) and the store (keyed alike) take it once; the listeners heard it
        already. Before, every copy was a record of its own."""
        now = self.clock.now()
        last = st.status_notes.get(action)
        if last is not None and last[0] == payload and 0.0 <= now - last[1] <= STATUS_RESEND_S:
            ev = NotificationEvent(st.ocpp_id, last[1], action, dict(payload), version)
        else:
            st.status_notes[action] = (dict(payload), now)
            ev = self._on_notification(st, action, payload, version, now)
        await self._publisher.publish(ev)

    # ---- commands ------------------------------------------------------------------------
    async def _enqueue(
        self,
        st: Station,
        builder: Callable[[], tuple[str, dict[str, Any]] | CallOutcome],
        *,
        label: str,
        decrease: bool = False,
        supersede_key: Any = None,
    ) -> CallOutcome:
        if st.connection is None:
            return CallOutcome("NotConnected", detail=f"station {st.ocpp_id} not connected")
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        st.queue.put(QueuedCall(builder, fut, decrease, supersede_key, label=label))
        return await fut

    async def _command(
        self,
        target: str,
        build16: Callable[[Station, ChargerInfo | None], tuple[str, dict[str, Any]]],
        build201: Callable[[Station, ChargerInfo | None], tuple[str, dict[str, Any]]],
    ) -> CommandResult:
        st, charger = self._target(target)
        sent: list[str] = []

        def builder() -> tuple[str, dict[str, Any]] | CallOutcome:
            try:
                action, payload = (build16 if st.version == "1.6" else build201)(st, charger)
            except VersionMismatch as exc:
                return CallOutcome("NotSupported", detail=str(exc))
            sent.append(action)
            return action, payload

        out = await self._enqueue(st, builder, label="command")
        action = sent[0] if sent else ""
        return CommandResult(action, out.status, out.payload, out.error_code, out.detail)

    def _round(self, value: float, unit: str) -> float:
        if unit == "A" and self.config.whole_amperes:
            return float(math.floor(value + 1e-9))
        if unit == "W":
            return float(math.floor(value + 1e-9))
        return math.floor(value * 10 + 1e-9) / 10.0

    def _prepare_limit(
        self,
        charger_id: str,
        *,
        limit_a: float | None,
        limit_w: float | None,
        valid_to: float | None,
        final_limit_a: float | None,
        final_limit_w: float | None,
        purpose: ProfilePurpose,
        transaction_id: str | None = None,
    ) -> LimitRequest:
        """Check one limit request (a ``ValueError`` names what is wrong); no side effects."""
        charger = self.charger(charger_id)
        if purpose not in ("tx", "tx_default", "station_max"):
            raise ValueError(
                f"set_limit: purpose must be tx, tx_default or station_max, got {purpose!r}"
            )
        if (limit_a is None) == (limit_w is None):
            raise ValueError("set_limit: give exactly one of limit_a and limit_w")
        if charger.kind == "dc" and limit_w is None:
            raise ValueError(f"set_limit: {charger_id} is a DC charger; give limit_w")
        unit = "A" if limit_a is not None else "W"
        value = limit_a if limit_a is not None else limit_w
        assert value is not None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"set_limit: limit must be a finite number >= 0, got {value!r}")
        final = final_limit_a if unit == "A" else final_limit_w
        if final is not None and valid_to is None:
            raise ValueError("set_limit: a final limit needs valid_to (when it takes over)")
        if final is not None and (not math.isfinite(final) or final < 0):
            raise ValueError(f"set_limit: final limit must be >= 0, got {final!r}")
        if valid_to is not None and not math.isfinite(valid_to):
            raise ValueError(f"set_limit: valid_to must be a finite time, got {valid_to!r}")
        return LimitRequest(
            charger_id,
            purpose,
            limit_a,
            limit_w,
            valid_to,
            final,
            self._round(value, unit),
            self._round(final, unit) if final is not None else None,
            # Meaningless for a TxDefault or station maximum (they are for the EVSE / station).
            transaction_id if purpose == "tx" else None,
        )

    def _limit_call(
        self, req: LimitRequest
    ) -> tuple[Station, tuple[str, int, str], bool, int, Callable[..., Any], int]:
        """Book a checked request (profile id, last limit); (station, key, decrease, profile id,
        frame builder, request number for the key)."""
        charger = self._chargers[req.charger_id]
        purpose = req.purpose
        st = self._stations[charger.ocpp_id]
        evse_key = 0 if purpose == "station_max" else charger.evse_id
        key = (st.ocpp_id, evse_key, purpose)
        pid = self._profile_id(st.ocpp_id, charger, purpose)
        prev = self._last_limit.get(key)
        decrease = prev is None or req.wire_limit < prev
        self._last_limit[key] = req.wire_limit
        seq = self._limit_seq[key] = self._limit_seq.get(key, 0) + 1

        def builder(level: int | None = None) -> tuple[str, dict[str, Any]] | CallOutcome:
            tx_id = None
            if purpose == "tx":
                tx_id = st.active_tx.get(charger.evse_id)
                if tx_id is None:
                    return CallOutcome(
                        "NoTransaction", detail="a TxProfile needs an active transaction"
                    )
                if req.transaction_id is not None and tx_id != req.transaction_id:
                    # Built when it leaves: the session it was asked for ended meanwhile and
                    # another began; sent now it would bind the next session's car to it.
                    return CallOutcome(
                        "TransactionChanged",
                        detail=f"asked for transaction {req.transaction_id}, active {tx_id}",
                    )
            build = v16.set_charging_profile if st.version == "1.6" else v201.set_charging_profile
            return build(
                charger,
                req,
                profile_id=pid,
                stack_level=self._stack_level(key) if level is None else level,
                transaction_id=None if tx_id is None else st.wire_tx_id(tx_id),
                start=self._schedule_start(st, self.clock.now()),
            )

        return st, key, decrease, pid, builder, seq

    def _limit_result(
        self,
        req: LimitRequest,
        key: tuple[str, int, str],
        pid: int,
        requested_at: float,
        out: CallOutcome,
    ) -> ProfileResult:
        if out.status == "Result" and out.payload is not None:
            status = str(out.payload.get("status", "?"))
        else:
            status = out.status
        if (
            status != "Accepted"
            and status != "Superseded"
            and self._last_limit.get(key) == req.wire_limit
        ):
            # Unknown state at the charger: the next request is a decrease.
            self._last_limit.pop(key, None)
        if status == "Accepted":
            self._no_stranger[key] = self._holder(key, req.purpose)
        result = ProfileResult(
            charger_id=req.charger_id,
            purpose=req.purpose,
            status=status,
            limit_a=req.wire_limit if req.limit_a is not None else None,
            limit_w=req.wire_limit if req.limit_a is None else None,
            profile_id=pid,
            requested_at=requested_at,
            answered_at=out.answered_at,
            detail=out.detail or (out.error_code or ""),
            sent_at=out.sent_at,
            sent_mono=out.sent_mono,
        )
        self._emit(result)
        return result

    async def set_limit(
        self,
        charger_id: str,
        *,
        limit_a: float | None = None,
        limit_w: float | None = None,
        valid_to: float | None = None,
        final_limit_a: float | None = None,
        final_limit_w: float | None = None,
        purpose: ProfilePurpose = "tx",
        transaction_id: str | None = None,
    ) -> ProfileResult:
        """Send one charging limit (A for AC, W for DC) as the right profile kind.

        Enqueued on the station's queue: a decrease goes before other calls, a newer limit for
        the same charger and purpose supersedes this one while it is still queued. Returns when
        the charger answered, or the request was superseded, timed out or could not be sent.
        Values are rounded DOWN to what the wire allows (whole amperes if configured, else 0.1).
        Many limits at once: :meth:`send_limits` (puts them all on the wire without waiting).
        ``transaction_id`` (``tx`` only; ignored otherwise): the session the limit is for. When
        the station's active transaction on the EVSE is another one when the frame is built
        (it may wait in the queue) or resent, nothing is sent: status ``TransactionChanged``.
        """
        req = self._prepare_limit(
            charger_id,
            limit_a=limit_a,
            limit_w=limit_w,
            valid_to=valid_to,
            final_limit_a=final_limit_a,
            final_limit_w=final_limit_w,
            purpose=purpose,
            transaction_id=transaction_id,
        )
        now = self.clock.now()
        st, key, decrease, pid, builder, seq = self._limit_call(req)
        out = await self._enqueue(
            st, builder, label=f"limit {charger_id} {purpose}", decrease=decrease, supersede_key=key
        )
        migration = self._conflict_migration(st, req, key, seq, decrease, builder, out)
        if migration is not None:
            await asyncio.wait([migration])
            out = (
                CallOutcome("NotConnected", detail="central system stopped")
                if migration.cancelled()
                else migration.result()
            )
        return self._limit_result(req, key, pid, now, out)

    def send_limits(self, orders: Sequence[LimitOrder]) -> list[LimitSend]:
        """Hand many limits to their stations at once, in the given order, without awaiting.

        Synchronous: every order is checked first (a ``ValueError`` names the bad one and nothing
        is sent). Then, in order, each goes straight onto its station's socket when the station is
        connected and idle (no CALL of ours awaiting an answer, nothing queued): the frame is
        built (payloads valid by construction, see ``v16``/``v201``; the tests check them against
        the OCPP schemas) and written now, and ``LimitSend.sent_mono`` says when. Otherwise it
        takes the queued path of :meth:`set_limit` (decreases first, superseding). One CALL in
        flight per station either way: a station's worker waits for an answer to a CALL sent
        here. Answers are matched by message id; ``LimitSend.result`` resolves with the
        :class:`ProfileResult` (also emitted as an event), a timeout after ``call_timeout_s`` on
        the injected clock.
        """
        reqs = []
        for i, o in enumerate(orders):
            try:
                reqs.append(
                    self._prepare_limit(
                        o.charger_id,
                        limit_a=o.limit_a,
                        limit_w=o.limit_w,
                        valid_to=o.valid_to,
                        final_limit_a=o.final_limit_a,
                        final_limit_w=o.final_limit_w,
                        purpose=o.purpose,
                        transaction_id=o.transaction_id,
                    )
                )
            except (ValueError, KeyError) as exc:
                raise ValueError(f"send_limits: order {i} ({o.charger_id}): {exc}") from None
        loop = asyncio.get_running_loop()
        now = self.clock.now()
        start = schedule_start(now, self.config.max_clock_skew_s)
        start_iso = v16.iso(start)
        clock = self.clock
        # Pass 1: put every frame that can go now on its socket, doing nothing else per frame.
        written: list[tuple[str, asyncio.Future[CallOutcome], float, float] | None] = []
        for req in reqs:
            charger = self._chargers[req.charger_id]
            st = self._stations[charger.ocpp_id]
            conn = st.connection
            w = None
            if (
                conn is not None
                and not conn.closed
                and st.version is not None
                and st.in_flight is None
                and not st.busy
                and not len(st.queue)
                and (req.purpose != "tx" or charger.evse_id in st.active_tx)
                and (
                    req.transaction_id is None
                    or st.active_tx.get(charger.evse_id) == req.transaction_id
                )
            ):
                pid = self._profile_id(st.ocpp_id, charger, req.purpose)
                evse_key = 0 if req.purpose == "station_max" else charger.evse_id
                own = self._schedule_start(st, now)
                try:
                    payload = frames.set_charging_profile_json(
                        st.version,
                        charger,
                        req,
                        profile_id=pid,
                        stack_level=self._stack_level((st.ocpp_id, evse_key, req.purpose)),
                        transaction_id=_wire_tx(st, st.active_tx.get(charger.evse_id)),
                        start=own,
                        start_iso=start_iso if own == start else v16.iso(own),
                    )
                except Exception:
                    # Not buildable here (a 1.6 connection whose transaction id is not an
                    # integer, say): the queued path builds it again and answers with why. The
                    # frames already written keep their answers and slots.
                    LOG.exception("station %s: direct send of %s", st.ocpp_id, req.charger_id)
                    payload = None
                sent = None if payload is None else conn.send_now("SetChargingProfile", payload)
                if sent is not None:
                    st.in_flight = sent[1]  # one CALL in flight: the next one queues
                    # Freed by its answer (or timeout) whatever happens to the rest of this call.
                    sent[1].add_done_callback(self._slot_freer(st, sent[1]))
                    w = (sent[0], sent[1], clock.now(), clock.monotonic())
            written.append(w)
        # Pass 2: results, the queued path for the rest, timeouts.
        out: list[LimitSend] = []
        on_wire: list[tuple[StationConnection, str]] = []
        for req, w in zip(reqs, written, strict=True):
            st, key, decrease, pid, builder, seq = self._limit_call(req)
            handle = LimitSend(req.charger_id, req.purpose, loop.create_future())
            out.append(handle)
            if w is not None:
                unique_id, fut, handle.sent_at, handle.sent_mono = w
                assert st.connection is not None
                on_wire.append((st.connection, unique_id))
            else:
                # Busy, no transaction or not writable now: the queue (decrease first,
                # superseding) sends it, or says why not.
                fut = loop.create_future()
                if st.connection is None:
                    fut.set_result(
                        CallOutcome("NotConnected", detail=f"station {st.ocpp_id} not connected")
                    )
                else:
                    label = f"limit {req.charger_id} {req.purpose}"
                    st.queue.put(QueuedCall(builder, fut, decrease, key, label=label))
            fut.add_done_callback(
                self._limit_settler(handle, req, key, pid, now, (st, seq, decrease, builder))
            )
        if on_wire:
            self._spawn(self._expire_after(on_wire, self.config.call_timeout_s))
        return out

    def _profile_id(self, ocpp_id: str, charger: ChargerInfo, purpose: str) -> int:
        """One profile id per (station, EVSE, purpose): a new limit replaces the previous one.

        The id follows from the EVSE and the purpose alone, never from the order in which this
        process first sent them: a station keeps the profiles an earlier run of the central
        system set (a restart), and a profile with an id it holds replaces that one whatever its
        purpose (OCPP 1.6 SetChargingProfile, 2.0.1 likewise). Numbered by first use, a restarted
        edge sending in another order gave a TxDefault the id of a running session's TxProfile:
        the station dropped the TxProfile and the car fell to the TxDefault (0 A, or above what
        the edge counted it at)."""
        evse_key = 0 if purpose == "station_max" else charger.evse_id
        key = (ocpp_id, evse_key, purpose)
        pid = self._profile_ids.get(key)
        if pid is None:
            pid = _PROFILE_ID_BASE + evse_key * len(_PROFILE_SLOT) + _PROFILE_SLOT[purpose]
            self._profile_ids[key] = pid
        return pid

    def _stack_level(self, key: tuple[str, int, str]) -> int:
        """The stack level of our profiles for ``key``: the configured one unless ``_migrate``
        outranked a profile of another id there since this process started. Sending ours there
        stays safe when the other profile is gone: no profile of ours is below it to clash with,
        and ours replaces ours by its id."""
        return self._levels.get(key, self.config.stack_level)

    def _forget_levels(self, st: Station) -> None:
        """``st`` reconnected with another OCPP version (other firmware; 1.6 has no clash rule):
        its raised stack levels are learnt again (a refusal at the configured level and
        ``_migrate``); what was known clear there was known at those."""
        for key in [k for k in self._levels if k[0] == st.ocpp_id]:
            del self._levels[key]
            self._no_stranger.pop(key, None)

    def _holder(self, key: tuple[str, int, str], purpose: str) -> str:
        """What ``_no_stranger`` records for ``key`` now: a TxProfile's transaction, else ""."""
        if purpose != "tx":
            return ""
        return self._stations[key[0]].active_tx.get(key[1], "")

    def _conflict_migration(
        self,
        st: Station,
        req: LimitRequest,
        key: tuple[str, int, str],
        seq: int,
        decrease: bool,
        builder: Callable[..., Any],
        first: CallOutcome,
    ) -> asyncio.Future[CallOutcome] | None:
        """A 2.0.1 station's refusal of our profile that may be a clash with a profile it holds
        under another id: ask what it holds, send ours once more one stack level above the
        others'. None when it cannot be one (the refusal stands).

        A 2.0.1 station refuses a profile whose stack level, purpose and EVSE equal those of a
        profile it holds under another id with an overlapping validity (K01.FR.06), or a
        TxProfile with the stack level and transaction of another TxProfile (K01.FR.39); 1.6
        replaces such a profile instead, and 2.0.1 replaces one with the same id (K01.FR.05).
        Earlier versions of this central system numbered ids by first use, so a station may hold
        such a profile of ours under an old id. The refusal says no more (a reason code is
        optional and free text), so, unless the station can hold no other profile there
        (``_no_stranger``: ours was accepted there, which a holder of a clashing one would have
        refused, or its profiles there were reported since), see ``_migrate``. Never cleared:
        a clear takes effect at once and the charger would run above the other profile (up to
        its maximum) until ours applies. Never for a station maximum.
        """
        if st.version != "2.0.1" or st.connection is None or first.status != "Result":
            return None
        if first.payload is None or first.payload.get("status") != "Rejected":
            return None
        if req.purpose == "station_max" or self._limit_seq.get(key) != seq:
            return None
        held = self._no_stranger.get(key)
        if held is not None and held == self._holder(key, req.purpose):
            return None
        task = asyncio.ensure_future(self._migrate(st, req, key, seq, decrease, builder, first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _migrate(
        self,
        st: Station,
        req: LimitRequest,
        key: tuple[str, int, str],
        seq: int,
        decrease: bool,
        builder: Callable[..., Any],
        first: CallOutcome,
    ) -> CallOutcome:
        """GetChargingProfiles for the EVSE and our purpose, all stack levels (the report is
        collected from ReportChargingProfiles, for at most ``call_timeout_s``). When one of
        another id is reported at the stack level we sent at, the same limit once more (built
        anew, our id) at the lowest level above every profile of another id reported there:
        the station keeps applying the other one until ours applies, then ours (the composite
        schedule takes the highest stack level of a purpose); nothing is cleared, so the charger
        never runs above both. Accepted, that level is used for the key from then on, across
        reconnects (``_levels``). None there, or the level would be more than ``_MAX_OUTRANK``
        above the configured one: the refusal stands. The outcome is the request's (one
        ``ProfileResult``); a refusal of the resend is final. Each call is queued like any
        (decreases first); the resend is skipped once a newer limit for the key was requested
        (it is refused in turn and migrates itself)."""
        evse, purpose, sent_level = key[1], req.purpose, self._stack_level(key)
        ours = self._profile_ids[key]
        info = first.payload.get("statusInfo") if first.payload else None
        why = "Rejected" + (f" ({info['reasonCode']})" if info and info.get("reasonCode") else "")
        asked = f"GetChargingProfiles {v201.PURPOSE[purpose]} EVSE {evse}"

        def not_resent(note: str) -> CallOutcome:
            return replace(first, detail=f"{why}; {note}")

        def skip_if_stale() -> CallOutcome | None:
            if st.version != "2.0.1":
                return CallOutcome("Skipped", detail="station reconnected as 1.6: not resent")
            if self._limit_seq.get(key) != seq:
                return CallOutcome("Skipped", detail="a newer limit follows: not resent")
            return None

        request_id = next(self._report_ids)
        report = _ProfileReport()
        self._reports[(st.ocpp_id, request_id)] = report
        try:

            def get() -> tuple[str, dict[str, Any]] | CallOutcome:
                return skip_if_stale() or v201.get_charging_profiles(request_id, evse, purpose)

            LOG.info(
                "station %s: %s limit for %s %s; %s",
                st.ocpp_id,
                purpose,
                req.charger_id,
                why,
                asked,
            )
            got = await self._queue_call(st, get, decrease, f"get {purpose} for {req.charger_id}")
            answer = got.payload.get("status") if got.status == "Result" and got.payload else None
            if got.status == "Skipped":
                return not_resent(got.detail)
            if answer == "Accepted":
                complete = await self._wait_report(report, self.config.call_timeout_s)
            elif answer == "NoProfiles":
                complete = True
            else:
                return not_resent(f"{asked}: {answer or got.status}; not resent")
        finally:
            self._reports.pop((st.ocpp_id, request_id), None)
        reported = sorted(
            {
                (int(p["id"]), int(p.get("stackLevel", -1)))
                for e, p in report.profiles
                if e == evse and p.get("chargingProfilePurpose") == v201.PURPOSE[purpose]
            },
            key=lambda x: (x[1], x[0]),
        )
        foreign = [(pid, lvl) for pid, lvl in reported if pid != ours]
        seen = f"{asked}: {', '.join(f'{i} at {lvl}' for i, lvl in reported) or 'none'}" + (
            "" if complete else " (report incomplete)"
        )
        if not any(lvl == sent_level for _, lvl in foreign):
            if complete:  # it holds none of another id there: later refusals are final
                self._no_stranger[key] = self._holder(key, purpose)
            return not_resent(f"{seen}; none of another id at stack level {sent_level}: not resent")
        level = max(lvl for _, lvl in foreign) + 1
        if level > self.config.stack_level + _MAX_OUTRANK:
            return not_resent(f"{seen}; stack level {level} would be needed: not resent")
        note = f"{why}; {seen}; resent at stack level {level}"

        def resend() -> tuple[str, dict[str, Any]] | CallOutcome:
            return skip_if_stale() or builder(level=level)

        async def learn(conn: StationConnection, out: CallOutcome) -> CallOutcome:
            # In the worker's turn, before any other call of the station is built: the next
            # limit for the key goes at this level (at the configured one, with our id, it would
            # replace ours and clash again).
            if _answer(out) == "Accepted":
                self._levels[key] = level
            return out

        LOG.info("station %s: %s; resending at stack level %s", st.ocpp_id, seen, level)
        label = f"limit {req.charger_id} {purpose} at stack level {level}"
        out = await self._queue_call(st, resend, decrease, label, then=learn)
        if out.status == "Skipped":
            return not_resent(f"{seen}; {out.detail}")
        out.detail = f"{note}: {out.detail}" if out.detail else note
        LOG.info("station %s: %s; %s", st.ocpp_id, note, _answer(out))
        return out

    def _queue_call(
        self,
        st: Station,
        builder: Callable[[], tuple[str, dict[str, Any]] | CallOutcome],
        decrease: bool,
        label: str,
        *,
        then: Then | None = None,
    ) -> asyncio.Future[CallOutcome]:
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        if st.connection is None:
            fut.set_result(
                CallOutcome("NotConnected", detail=f"station {st.ocpp_id} not connected")
            )
            return fut
        st.queue.put(QueuedCall(builder, fut, decrease, None, label=label, then=then))
        return fut

    async def _wait_report(self, report: _ProfileReport, timeout_s: float) -> bool:
        """Wait for the last part of a ReportChargingProfiles (``tbc`` false); False on timeout."""
        waiter = asyncio.ensure_future(report.done.wait())
        timer = asyncio.ensure_future(self.clock.sleep(timeout_s))
        try:
            await asyncio.wait([waiter, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()
        return report.done.is_set()

    def _on_profile_report(self, st: Station, p: dict[str, Any]) -> None:
        """A ReportChargingProfiles part: kept for the GetChargingProfiles that asked for it."""
        report = self._reports.get((st.ocpp_id, int(p["requestId"])))
        if report is None:
            LOG.info(
                "station %s: ReportChargingProfiles for request %s ignored",
                st.ocpp_id,
                p["requestId"],
            )
            return
        evse = int(p["evseId"])
        report.profiles.extend((evse, prof) for prof in p["chargingProfile"])
        if not p.get("tbc", False):
            report.done.set()

    def _settle_limit(
        self,
        handle: LimitSend,
        req: LimitRequest,
        key: tuple[str, int, str],
        pid: int,
        requested_at: float,
        out: CallOutcome,
    ) -> None:
        if handle.sent_mono is not None and out.sent_mono is None:
            out.sent_at, out.sent_mono = handle.sent_at, handle.sent_mono
        result = self._limit_result(req, key, pid, requested_at, out)
        handle.sent_at, handle.sent_mono = result.sent_at, result.sent_mono
        if not handle.result.done():
            handle.result.set_result(result)

    def _limit_settler(
        self,
        handle: LimitSend,
        req: LimitRequest,
        key: tuple[str, int, str],
        pid: int,
        requested_at: float,
        call: tuple[Station, int, bool, Callable[..., Any]] | None = None,
    ) -> Callable[[asyncio.Future[CallOutcome]], None]:
        """Settle ``handle`` with a call's outcome; with ``call`` (station, request number,
        decrease, builder) a refusal may first go through ``_conflict_migration``."""

        def settle(f: asyncio.Future[CallOutcome]) -> None:
            out = CallOutcome("NotConnected", detail="cancelled") if f.cancelled() else f.result()
            if call is not None:
                st, seq, decrease, builder = call
                migration = self._conflict_migration(st, req, key, seq, decrease, builder, out)
                if migration is not None:
                    migration.add_done_callback(
                        self._limit_settler(handle, req, key, pid, requested_at)
                    )
                    return
            self._settle_limit(handle, req, key, pid, requested_at, out)

        return settle

    @staticmethod
    def _slot_freer(
        st: Station, fut: asyncio.Future[CallOutcome]
    ) -> Callable[[asyncio.Future[CallOutcome]], None]:
        def free(_: asyncio.Future[CallOutcome]) -> None:
            if st.in_flight is fut:
                st.in_flight = None
                st.queue.wake()

        return free

    async def _expire_after(
        self, calls: list[tuple[StationConnection, str]], timeout_s: float
    ) -> None:
        await self.clock.sleep(timeout_s)
        for conn, unique_id in calls:
            conn.expire(unique_id, f"no answer to SetChargingProfile in {timeout_s} s")

    async def clear_profile(
        self,
        charger_id: str,
        *,
        purpose: ProfilePurpose | None = None,
        stack_level: int | None = None,
    ) -> CommandResult:
        """Clear the profiles this central system set for a charger (by purpose if given)."""
        charger = self.charger(charger_id)
        profile_id = None
        if purpose is not None:
            evse_key = 0 if purpose == "station_max" else charger.evse_id
            key = (charger.ocpp_id, evse_key, purpose)
            profile_id = self._profile_ids.get(key)
            self._last_limit.pop(key, None)
            self._no_stranger.pop(key, None)
        else:
            for k in [k for k in self._no_stranger if k[:2] == (charger.ocpp_id, charger.evse_id)]:
                self._no_stranger.pop(k, None)
        evse = None if purpose == "station_max" else charger.evse_id
        return await self._command(
            charger_id,
            lambda st, c: v16.clear_charging_profile(evse, purpose, profile_id, stack_level),
            lambda st, c: v201.clear_charging_profile(
                evse, purpose, profile_id if purpose is not None else None, stack_level
            ),
        )

    async def clear_station_profiles(
        self, target: str, *, purpose: ProfilePurpose
    ) -> CommandResult:
        """Clear every profile of ``purpose`` on the station of ``target`` (a charger or OCPP id):
        all EVSEs, stack levels and ids, whoever set them (stale profiles an earlier controller
        left). Ours of that purpose go too: the next limit of that purpose counts as a decrease."""
        st, _ = self._target(target)
        for key in [k for k in self._last_limit if k[0] == st.ocpp_id and k[2] == purpose]:
            self._last_limit.pop(key, None)
        for key in [k for k in self._no_stranger if k[0] == st.ocpp_id and k[2] == purpose]:
            self._no_stranger.pop(key, None)
        return await self._command(
            target,
            lambda s, c: v16.clear_charging_profile(None, purpose, None, None),
            lambda s, c: v201.clear_charging_profile(None, purpose, None, None),
        )

    async def get_composite_schedule(
        self, charger_id: str, *, duration_s: int = 3600, unit: str | None = None
    ) -> CompositeSchedule:
        charger = self.charger(charger_id)
        res = await self._command(
            charger_id,
            lambda st, c: v16.composite_schedule(charger.evse_id, duration_s, unit),
            lambda st, c: v201.composite_schedule(charger.evse_id, duration_s, unit),
        )
        if res.status != "Result" or res.payload is None:
            return CompositeSchedule(charger_id, res.status, None, None, [], res.detail)
        st = self._stations[charger.ocpp_id]
        parse = v16.parse_composite if st.version == "1.6" else v201.parse_composite
        start, unit_got, periods = parse(res.payload)
        return CompositeSchedule(
            charger_id, str(res.payload.get("status")), start, unit_got, periods
        )

    async def remote_start(
        self, charger_id: str, id_tag: str, *, remote_start_id: int = 1
    ) -> CommandResult:
        charger = self.charger(charger_id)
        return await self._command(
            charger_id,
            lambda st, c: (
                "RemoteStartTransaction",
                {"connectorId": charger.evse_id, "idTag": id_tag},
            ),
            lambda st, c: (
                "RequestStartTransaction",
                {
                    "evseId": charger.evse_id,
                    "remoteStartId": remote_start_id,
                    "idToken": {"idToken": id_tag, "type": "Central"},
                },
            ),
        )

    async def remote_stop(
        self, charger_id: str, transaction_id: str | None = None
    ) -> CommandResult:
        charger = self.charger(charger_id)
        st = self._stations[charger.ocpp_id]
        ours = transaction_id or st.active_tx.get(charger.evse_id)
        if ours is None:
            return CommandResult(
                "RemoteStopTransaction", "NoTransaction", detail="no active transaction"
            )
        tx = st.wire_tx_id(ours)  # the station's id of it (one it used again: not ours)
        return await self._command(
            charger_id,
            lambda st, c: ("RemoteStopTransaction", {"transactionId": int(tx)}),
            lambda st, c: ("RequestStopTransaction", {"transactionId": tx}),
        )

    async def change_availability(self, target: str, *, operative: bool) -> CommandResult:
        _, charger = self._target(target)
        evse = charger.evse_id if charger else 0
        payload201: dict[str, Any] = {
            "operationalStatus": "Operative" if operative else "Inoperative"
        }
        if charger is not None:
            payload201["evse"] = {"id": evse}
        return await self._command(
            target,
            lambda s, c: (
                "ChangeAvailability",
                {"connectorId": evse, "type": "Operative" if operative else "Inoperative"},
            ),
            lambda s, c: ("ChangeAvailability", payload201),
        )

    async def reset(self, target: str, *, hard: bool = False) -> CommandResult:
        return await self._command(
            target,
            lambda s, c: ("Reset", {"type": "Hard" if hard else "Soft"}),
            lambda s, c: ("Reset", {"type": "Immediate" if hard else "OnIdle"}),
        )

    async def trigger_message(self, target: str, message: str) -> CommandResult:
        """``message`` as the version names it, e.g. ``MeterValues``, ``StatusNotification``."""

        def b16(s: Station, c: ChargerInfo | None) -> tuple[str, dict[str, Any]]:
            p: dict[str, Any] = {"requestedMessage": message}
            if c is not None:
                p["connectorId"] = c.evse_id
            return "TriggerMessage", p

        def b201(s: Station, c: ChargerInfo | None) -> tuple[str, dict[str, Any]]:
            p: dict[str, Any] = {"requestedMessage": message}
            if c is not None:
                p["evse"] = {"id": c.evse_id}
                if message == "StatusNotification":  # a status is a connector's (F06.FR.13)
                    p["evse"]["connectorId"] = c.connector_id
            return "TriggerMessage", p

        st, charger = self._target(target)
        if message == "StatusNotification" and st.version == "2.0.1" and charger is None:
            # 2.0.1 has no station-wide status: one trigger per connector (a station refuses
            # one without evse.connectorId, F06.FR.12/13); the first not accepted is returned.
            results = [await self._command(c.charger_id, b16, b201) for c in st.chargers.values()]
            return next((r for r in results if r.response_status != "Accepted"), results[-1])
        return await self._command(target, b16, b201)

    async def get_configuration(self, target: str, keys: list[str] | None = None) -> CommandResult:
        """OCPP 1.6 only."""
        return await self._command(
            target,
            lambda s, c: ("GetConfiguration", {"key": keys} if keys else {}),
            _only_in("1.6", "GetConfiguration"),
        )

    async def change_configuration(self, target: str, key: str, value: str) -> CommandResult:
        """OCPP 1.6 only."""
        return await self._command(
            target,
            lambda s, c: ("ChangeConfiguration", {"key": key, "value": value}),
            _only_in("1.6", "ChangeConfiguration"),
        )

    async def get_variables(self, target: str, variables: list[tuple[str, str]]) -> CommandResult:
        """OCPP 2.0.1 only: ``[(component, variable), …]``."""
        data = [{"component": {"name": c}, "variable": {"name": v}} for c, v in variables]
        return await self._command(
            target,
            _only_in("2.0.1", "GetVariables"),
            lambda s, c: ("GetVariables", {"getVariableData": data}),
        )

    async def set_variables(
        self, target: str, variables: list[tuple[str, str, str]]
    ) -> CommandResult:
        """OCPP 2.0.1 only: ``[(component, variable, value), …]``."""
        data = [
            {"component": {"name": c}, "variable": {"name": v}, "attributeValue": val}
            for c, v, val in variables
        ]
        return await self._command(
            target,
            _only_in("2.0.1", "SetVariables"),
            lambda s, c: ("SetVariables", {"setVariableData": data}),
        )

    async def unlock_connector(self, charger_id: str) -> CommandResult:
        charger = self.charger(charger_id)
        return await self._command(
            charger_id,
            lambda s, c: ("UnlockConnector", {"connectorId": charger.evse_id}),
            lambda s, c: (
                "UnlockConnector",
                {"evseId": charger.evse_id, "connectorId": charger.connector_id},
            ),
        )


#: Young-generation threshold with ``gc_tuning`` (CPython's default is 700 allocations).
GC_GEN0_THRESHOLD = 2000


def quiet_gc() -> None:
    """Keep cyclic garbage collection from stalling the event loop under many sessions.

    Everything allocated so far (modules, site, validators) is moved out of the collector's reach
    (``gc.freeze``), so a full collection no longer walks it; the young generation is collected
    after 2,000 allocations instead of 700. Process-wide, so opt-in (``ocpp.gc_tuning = true``);
    ``stop()`` unfreezes. With 1,000 chargers of ``bench/ocpp_loadgen.py`` the
    longest collection during a run went from 53 ms to 21 ms of CPU, all collections from 0.22 s
    to 0.14 s per 10 s.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


class VersionMismatch(Exception):
    pass


def _only_in(
    version: str, action: str
) -> Callable[[Station, ChargerInfo | None], tuple[str, dict[str, Any]]]:
    """The builder for the other version of a command that exists only in OCPP ``version``."""

    def f(s: Station, c: ChargerInfo | None) -> tuple[str, dict[str, Any]]:
        raise VersionMismatch(
            f"{action} exists only in OCPP {version}; station {s.ocpp_id} speaks {s.version}"
        )

    return f


def _fixed(
    action: str, payload: dict[str, Any]
) -> Callable[[], tuple[str, dict[str, Any]] | CallOutcome]:
    def build() -> tuple[str, dict[str, Any]] | CallOutcome:
        return action, payload

    return build


def _on_conn(
    st: Station, conn: StationConnection, action: str, payload: dict[str, Any]
) -> Callable[[], tuple[str, dict[str, Any]] | CallOutcome]:
    """A call for ``conn`` only: one still queued when the station reconnected is not sent on
    the new connection (before its Boot; the new Boot's round sends its own)."""

    def build() -> tuple[str, dict[str, Any]] | CallOutcome:
        if st.connection is not conn or conn.closed:
            return CallOutcome("Disconnected", detail="the connection it was for ended")
        return action, payload

    return build


def _offset(est: ClockOffset) -> float | None:
    """A station's clock offset as the central system reports it: a lead at once, a lag once two
    minutes of samples show it (one old timestamp, replayed after hours offline, is no lag)."""
    offset = est.offset_s
    if offset is not None and offset < 0 and est.minutes < 2:
        return None
    return offset


def _wire_tx(st: Station, transaction_id: str | None) -> str | None:
    return None if transaction_id is None else st.wire_tx_id(transaction_id)


def _answer(out: CallOutcome) -> str:
    if out.status == "Result" and out.payload is not None:
        return str(out.payload.get("status", "?"))
    return out.status


def _resolve(item: QueuedCall, outcome: CallOutcome) -> None:
    if not item.future.done():
        item.future.set_result(outcome)
