"""The event bus: one interface (:class:`Bus`), two implementations (in-process, NATS JetStream).

Transport only: it knows subjects and delivery, never what an event means. Build one with
:func:`bus_from_config`; subjects come from :class:`Subjects`. See docs/bus.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evcore.bus.api import (
    BadPayload,
    Bus,
    BusError,
    BusMessage,
    BusStats,
    BusTimeout,
    BusUnavailable,
    Handler,
    NoResponders,
    OutboxReports,
    Payload,
    PayloadTooLarge,
    ProcessedIdStore,
    SetAsideListener,
    StreamSpec,
    Subscription,
    decode,
    decoded,
)
from evcore.bus.config import BusConfig, default_streams, parse_bus_config
from evcore.bus.dedupe import ProcessedIds
from evcore.bus.inprocess import InProcessBus
from evcore.bus.outbox import OutboxFull, OutboxLoss, SetAside
from evcore.bus.subjects import Subjects, escape_token, subject_matches, unescape_token
from evcore.clock import Clock

if TYPE_CHECKING:
    from evcore.bus.natsbus import NatsConnection

__all__ = [
    "BadPayload",
    "Bus",
    "BusConfig",
    "BusError",
    "BusMessage",
    "BusStats",
    "BusTimeout",
    "BusUnavailable",
    "Handler",
    "InProcessBus",
    "NoResponders",
    "OutboxFull",
    "OutboxLoss",
    "OutboxReports",
    "Payload",
    "PayloadTooLarge",
    "ProcessedIdStore",
    "ProcessedIds",
    "SetAside",
    "SetAsideListener",
    "StreamSpec",
    "Subjects",
    "Subscription",
    "bus_from_config",
    "decode",
    "decoded",
    "default_streams",
    "escape_token",
    "parse_bus_config",
    "subject_matches",
    "unescape_token",
]


def bus_from_config(
    section: Mapping[str, Any] | None,
    site_id: str,
    clock: Clock,
    *,
    connection: NatsConnection | None = None,
) -> Bus:
    """The bus the site file asks for (``[bus] kind = "inprocess" | "nats"``); not yet started.
    ``connection``: a NATS connection to share with other sites' buses (NATS only)."""
    cfg = parse_bus_config(section)
    if cfg.kind == "nats":
        from evcore.bus.natsbus import NatsBus

        return NatsBus(site_id, cfg, clock=clock, connection=connection)
    return InProcessBus(
        site_id,
        clock=clock,
        streams=cfg.streams(site_id),
        subscriber_queue_size=cfg.subscriber_queue_size,
    )
