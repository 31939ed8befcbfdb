"""Typed in-process events the central system hands to its listeners (the edge controller).

Every event names the site charger it concerns (``charger_id`` from the site file) as well as the
OCPP identity. Currents are already mapped to SITE phases, multipliers and units applied; energy of
a session is a register difference. These dataclasses are also what the bus adapter converts to the
contracts' protobuf messages (``evcore.ocpp.publish``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ProfilePurpose = Literal["tx", "tx_default", "station_max"]


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    ocpp_id: str
    connected: bool
    version: str
    at: float
    #: Why a connection ended: "closed", "replaced", "error".
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BootEvent:
    ocpp_id: str
    version: str
    at: float
    vendor: str
    model: str
    serial: str | None
    firmware: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class ConfigurationEvent:
    """What a station answered to the configuration sent at boot (measurands, interval)."""

    ocpp_id: str
    at: float
    #: key -> status as the station answered ("Accepted", "Rejected", "NotSupported", "Timeout"…).
    results: dict[str, str]

    @property
    def refused(self) -> dict[str, str]:
        return {k: v for k, v in self.results.items() if v not in ("Accepted", "RebootRequired")}


@dataclass(frozen=True, slots=True)
class StatusEvent:
    charger_id: str | None  # None for the station as a whole (connector 0 / no EVSE)
    ocpp_id: str
    evse_id: int
    connector_id: int
    status: str
    error_code: str
    at: float


@dataclass(frozen=True, slots=True)
class MeterSample:
    charger_id: str
    ocpp_id: str
    at: float
    #: Line current per SITE phase (site phase order), None where not measured.
    site_phase_a: tuple[float | None, float | None, float | None]
    #: Current per CHARGER terminal (its own L1, L2, L3), as reported.
    terminal_a: tuple[float | None, float | None, float | None]
    #: Active power drawn from the grid (W, all phases): a DC charger's power reported at its
    #: outlet is converted with its efficiency and auxiliary load.
    power_w: float | None
    energy_register_wh: float | None
    offered_a: float | None
    soc_percent: float | None
    transaction_id: str | None
    session_energy_wh: float | None
    context: str | None = None


@dataclass(frozen=True, slots=True)
class TransactionEvent:
    charger_id: str
    ocpp_id: str
    transaction_id: str
    kind: Literal["started", "updated", "ended"]
    at: float
    id_tag: str | None
    meter_start_wh: float | None
    meter_now_wh: float | None
    session_energy_wh: float | None
    reason: str | None = None
    offline: bool = False
    #: The station's own timestamp of it (its clock), kept in the record (the bus message's
    #: ``occurred_at``, the store). ``at`` is that bounded for the edge: never later than the
    #: central system received it, a known offset of the station's clock taken out, an offline
    #: event no earlier than the station's last disconnect (``CentralSystem._heard_at``).
    #: None: the same as ``at``.
    station_at: float | None = None


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    ocpp_id: str
    at: float
    #: The security event type as sent (e.g. "TamperDetectionActivated").
    kind: str
    #: techInfo, when sent.
    info: str | None
    #: OCPP version of the connection ("1.6" or "2.0.1").
    version: str = ""


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """Firmware / diagnostics / log status and EV charging needs, kept for operators."""

    ocpp_id: str
    #: When the edge received it (these notifications carry no time of their own).
    at: float
    action: str
    payload: dict[str, object] = field(default_factory=dict)
    #: OCPP version of the connection ("1.6" or "2.0.1").
    version: str = ""


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """Outcome of one :meth:`CentralSystem.set_limit` request.

    ``status``: ``Accepted`` / ``Rejected`` (the charger's answer), ``Superseded`` (a newer limit
    for the same charger and purpose replaced it before it was sent), ``Timeout``, ``NotConnected``,
    ``NoTransaction`` (tx purpose without an active transaction), ``TransactionChanged`` (tx
    purpose asked for a transaction that is no longer the active one when it would leave; nothing
    sent), ``QueueFull``, ``Disconnected`` (the connection dropped while waiting), ``CallError``
    (the charger answered with a CALLERROR).
    """

    charger_id: str
    purpose: ProfilePurpose
    status: str
    limit_a: float | None
    limit_w: float | None
    profile_id: int | None
    requested_at: float
    answered_at: float | None
    detail: str = ""
    #: When its frame was handed to the socket (``clock.now()`` / ``clock.monotonic()``); None if
    #: it never left (superseded, not connected, …).
    sent_at: float | None = None
    sent_mono: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "Accepted"


OcppEvent = (
    ConnectionEvent
    | BootEvent
    | ConfigurationEvent
    | StatusEvent
    | MeterSample
    | TransactionEvent
    | SecurityEvent
    | NotificationEvent
    | ProfileResult
)
