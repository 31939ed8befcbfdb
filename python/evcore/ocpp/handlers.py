"""The station-to-CSMS handlers whose logic is the same in OCPP 1.6 and 2.0.1, and the helpers the
two version modules share.

Only what is identical in both versions lives here (action names, payload fields, replies); what
differs by version stays in ``v16`` / ``v201``. Like them, protocol only: it never decides a limit.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from evcore.ocpp.connection import HandlerError, StationConnection, on
from evcore.ocpp.metering import parse_timestamp
from evcore.ocpp.oneline import keepable

if TYPE_CHECKING:
    from evcore.ocpp.server import ChargerInfo, LimitRequest

LOG = logging.getLogger("evcore.ocpp")


def iso(t: float) -> str:
    return (
        datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class SharedHandlers(StationConnection):
    """Handlers with the same action name, fields and reply in 1.6 and 2.0.1.

    The action names are the wire strings (equal to both versions' ``Action`` enum values).
    ``self.version`` is the version the events carry.
    """

    def boot_accepted(self) -> dict[str, Any]:
        """The BootNotification reply, once the version's handler has reported the boot."""
        return {
            "status": "Accepted",
            "currentTime": iso(self.clock.now()),
            "interval": self.csms.config.heartbeat_interval_s,
        }

    @on("Heartbeat")
    async def on_heartbeat(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"currentTime": iso(self.clock.now())}

    @on("SecurityEventNotification")
    async def on_security_event(self, p: dict[str, Any]) -> dict[str, Any]:
        # Never refused for its time: an event an operator must see (a station whose clock was
        # set wrong says so with one, stamped by that clock).
        at = self._tx_ts(p["timestamp"], "security event")
        info = p.get("techInfo")
        await self.csms._on_security(
            self.station,
            keepable(p["type"]),
            None if info is None else keepable(info),
            at,
            self.version,
        )
        return {}

    @on("FirmwareStatusNotification")
    async def on_firmware_status(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.station_status("FirmwareStatusNotification", p)

    @on("LogStatusNotification")
    async def on_log_status(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.station_status("LogStatusNotification", p)

    @on("DataTransfer")
    async def on_data_transfer(self, p: dict[str, Any]) -> dict[str, Any]:
        if p["vendorId"] not in self.csms.config.data_transfer_vendor_ids:
            return {"status": "UnknownVendorId"}
        self.csms._on_notification(self.station, "DataTransfer", p)
        return {"status": "Accepted"}

    async def station_status(self, action: str, p: dict[str, Any]) -> dict[str, Any]:
        """A firmware / diagnostics / log status notification: a station event, empty reply."""
        await self.csms._on_station_status(self.station, action, p, self.version)
        return {}

    def _ts(self, value: Any) -> float:
        at = parse_timestamp(value)
        if at > self.clock.now() + self.csms.config.max_clock_skew_s:
            raise HandlerError("PropertyConstraintViolation", f"timestamp in the future: {value}")
        self.csms._station_timestamp(self.station, at)
        return at

    def _tx_ts(self, value: Any, what: str = "transaction message") -> float:
        """The timestamp of a message that starts, updates or ends a transaction (or a security
        event): one further ahead than ``max_clock_skew_s`` is taken and logged, not refused
        (refused, the station retried it a few times and dropped it, and with it the session's
        start or end); what the edge hears is bounded (``CentralSystem._heard_at``). It is not
        taken for the station's clock (``clockskew``): a garbage year would be its offset for
        10 minutes. One outside the years the record holds is taken as the nearest it holds
        (the same on every resend: a 1.6 start's key)."""
        at = parse_timestamp(value, clamp=True)
        ahead_s = at - self.clock.now()
        if ahead_s > self.csms.config.max_clock_skew_s:
            LOG.warning(
                "station %s: %s stamped %s, %.0f s ahead of the central system's clock: taken "
                "as received (its clock is off; fix its NTP)",
                self.station.ocpp_id,
                what,
                value,
                ahead_s,
            )
        else:
            self.csms._station_timestamp(self.station, at)
        return at


# ---- builders ------------------------------------------------------------------------------------


def schedule_start(now: float, max_clock_skew_s: float) -> float:
    """The ``startSchedule`` of a profile sent at ``now``: ``max_clock_skew_s`` earlier, in whole
    seconds. A station whose clock is behind ours by up to that much applies the profile at once
    (a schedule starting in its future is not in force yet, and the profile it replaced is gone:
    it would run at its TxDefault or hardware maximum meanwhile); one in its past is in force
    from its first period. The final period still begins at ``valid_to`` by our clock."""
    return float(math.floor(now - max(0.0, max_clock_skew_s)))


def schedule_periods(
    charger: ChargerInfo, req: LimitRequest, start: float
) -> tuple[str, list[dict[str, Any]], str | None]:
    """A SetChargingProfile schedule's rate unit, periods and ``validTo`` (same in both versions).

    ``start`` is the schedule's ``startSchedule`` (``schedule_start``). A final limit after
    ``valid_to`` becomes a second period, its ``startPeriod`` counted from ``start`` so that it
    begins at ``valid_to`` (at most a second earlier: whole seconds); without one the profile
    ends at ``valid_to`` (the returned ``validTo``, else ``None``).
    """
    unit = "W" if req.limit_w is not None else "A"
    first: dict[str, Any] = {"startPeriod": 0, "limit": req.wire_limit}
    if unit == "A":
        first["numberPhases"] = charger.number_phases
    periods = [first]
    valid_to = None
    if req.valid_to is not None and req.wire_final is not None:
        final: dict[str, Any] = {
            "startPeriod": max(1, int(req.valid_to - start)),
            "limit": req.wire_final,
        }
        if unit == "A":
            final["numberPhases"] = charger.number_phases
        periods.append(final)
    elif req.valid_to is not None:
        valid_to = iso(req.valid_to)
    return unit, periods, valid_to


def composite_periods(sched: dict[str, Any]) -> list[tuple[int, float, int | None]]:
    """A GetCompositeSchedule answer's periods as (start s, limit, phases)."""
    return [
        (int(p["startPeriod"]), float(p["limit"]), p.get("numberPhases"))
        for p in sched.get("chargingSchedulePeriod", ())
    ]
