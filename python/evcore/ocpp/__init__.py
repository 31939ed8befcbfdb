"""OCPP 1.6J / 2.0.1 central system: connections, auth, validation, per-station call queue.

Protocol only: it turns frames into events and the edge's requests into frames; it never decides a
setpoint. Public API: :class:`CentralSystem` and the event types (see docs/ocpp.md).
"""

from evcore.ocpp.config import OcppConfig, OcppConfigError, StationCredentials, parse_ocpp_section
from evcore.ocpp.events import (
    BootEvent,
    ConfigurationEvent,
    ConnectionEvent,
    MeterSample,
    NotificationEvent,
    OcppEvent,
    ProfileResult,
    SecurityEvent,
    StatusEvent,
    TransactionEvent,
)
from evcore.ocpp.server import (
    CentralSystem,
    ChargerInfo,
    CommandResult,
    CompositeSchedule,
    LimitOrder,
    LimitSend,
    StationState,
)

__all__ = [
    "BootEvent",
    "CentralSystem",
    "ChargerInfo",
    "CommandResult",
    "CompositeSchedule",
    "ConfigurationEvent",
    "ConnectionEvent",
    "LimitOrder",
    "LimitSend",
    "MeterSample",
    "NotificationEvent",
    "OcppConfig",
    "OcppConfigError",
    "OcppEvent",
    "ProfileResult",
    "SecurityEvent",
    "StationCredentials",
    "StationState",
    "StatusEvent",
    "TransactionEvent",
    "parse_ocpp_section",
]
