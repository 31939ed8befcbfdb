"""OCPP 1.6J: handlers for what a charge point sends, builders for what the central system sends.

Protocol only: this module turns 1.6 frames into the central system's events and the edge's
requests into 1.6 payloads. It never decides a limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ocpp.v16.enums import Action

from evcore.ocpp.connection import on
from evcore.ocpp.handlers import SharedHandlers, composite_periods, schedule_periods
from evcore.ocpp.handlers import iso as iso  # callers use v16.iso
from evcore.ocpp.metering import parse_timestamp
from evcore.ocpp.oneline import keepable

if TYPE_CHECKING:
    from evcore.ocpp.server import ChargerInfo, LimitRequest

PURPOSE = {
    "tx": "TxProfile",
    "tx_default": "TxDefaultProfile",
    "station_max": "ChargePointMaxProfile",
}


class Connection16(SharedHandlers):
    version = "1.6"
    frame_error_code = "FormationViolation"
    format_error_code = "FormationViolation"

    @on(Action.boot_notification)
    async def on_boot(self, p: dict[str, Any]) -> dict[str, Any]:
        self.csms._on_boot(
            self,
            vendor=p["chargePointVendor"],
            model=p["chargePointModel"],
            serial=p.get("chargePointSerialNumber") or p.get("chargeBoxSerialNumber"),
            firmware=p.get("firmwareVersion"),
            reason=None,
        )
        return self.boot_accepted()

    @on(Action.status_notification)
    async def on_status(self, p: dict[str, Any]) -> dict[str, Any]:
        at = self._ts(p.get("timestamp")) if p.get("timestamp") else self.clock.now()
        await self.csms._on_status(
            self.station, p["connectorId"], 1, p["status"], p["errorCode"], at
        )
        return {}

    @on(Action.authorize)
    async def on_authorize(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"idTagInfo": {"status": "Accepted"}}

    @on(Action.start_transaction)
    async def on_start_transaction(self, p: dict[str, Any]) -> dict[str, Any]:
        at = self._tx_ts(p["timestamp"])
        tx_id = await self.csms._on_start_1_6(
            self.station,
            connector_id=p["connectorId"],
            id_tag=keepable(p["idTag"]),
            meter_start_wh=float(p["meterStart"]),
            at=at,
        )
        return {"transactionId": tx_id, "idTagInfo": {"status": "Accepted"}}

    @on(Action.stop_transaction)
    async def on_stop_transaction(self, p: dict[str, Any]) -> dict[str, Any]:
        at = self._tx_ts(p["timestamp"])
        tx_id = str(p["transactionId"])
        ack = {"idTagInfo": {"status": "Accepted"}} if p.get("idTag") else {}
        tx = await self.csms._stop_target_1_6(self.station, tx_id)
        if not tx.ended:
            data = p.get("transactionData") or ()
            await self.csms._tx_meter_values(self.station, None, data, tx_id, "transactionData")
        # A replayed stop (ended already): its samples and its end were kept the first time, and
        # _on_stop publishes its end again only if that attempt's publish failed.
        await self.csms._on_stop(
            self.station,
            tx_id,
            meter_stop_wh=float(p["meterStop"]),
            at=at,
            reason=p.get("reason", "Local"),
        )
        return ack

    @on(Action.meter_values)
    async def on_meter_values(self, p: dict[str, Any]) -> dict[str, Any]:
        tx = p.get("transactionId")
        tx_id = str(tx) if tx is not None else None
        await self.csms._on_meter_values(self.station, p["connectorId"], p["meterValue"], tx_id)
        return {}

    # Heartbeat, SecurityEventNotification, FirmwareStatusNotification, LogStatusNotification
    # and DataTransfer: SharedHandlers.

    @on(Action.signed_firmware_status_notification)
    async def on_signed_firmware_status(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.station_status("SignedFirmwareStatusNotification", p)

    @on(Action.diagnostics_status_notification)
    async def on_diagnostics_status(self, p: dict[str, Any]) -> dict[str, Any]:
        return await self.station_status("DiagnosticsStatusNotification", p)


# ---- builders: (action, payload) for what the central system sends ------------------------------


def configure_calls(
    measurands: tuple[str, ...], interval_s: int
) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("ChangeConfiguration", {"key": "MeterValuesSampledData", "value": ",".join(measurands)}),
        ("ChangeConfiguration", {"key": "MeterValueSampleInterval", "value": str(interval_s)}),
    ]


def set_charging_profile(
    charger: ChargerInfo,
    req: LimitRequest,
    *,
    profile_id: int,
    stack_level: int,
    transaction_id: str | None,
    start: float,
) -> tuple[str, dict[str, Any]]:
    """SetChargingProfile for ``req``; its schedule starts at ``start``
    (``handlers.schedule_start``)."""
    connector = 0 if req.purpose == "station_max" else charger.evse_id
    unit, periods, valid_to = schedule_periods(charger, req, start)
    profile: dict[str, Any] = {
        "chargingProfileId": profile_id,
        "stackLevel": stack_level,
        "chargingProfilePurpose": PURPOSE[req.purpose],
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "startSchedule": iso(start),
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": periods,
        },
    }
    if valid_to is not None:
        profile["validTo"] = valid_to
    if req.purpose == "tx":
        assert transaction_id is not None
        profile["transactionId"] = int(transaction_id)
    return "SetChargingProfile", {"connectorId": connector, "csChargingProfiles": profile}


def clear_charging_profile(
    connector_id: int | None, purpose: str | None, profile_id: int | None, stack_level: int | None
) -> tuple[str, dict[str, Any]]:
    p: dict[str, Any] = {}
    if profile_id is not None:
        p["id"] = profile_id
    if connector_id is not None:
        p["connectorId"] = connector_id
    if purpose is not None:
        p["chargingProfilePurpose"] = PURPOSE[purpose]
    if stack_level is not None:
        p["stackLevel"] = stack_level
    return "ClearChargingProfile", p


def composite_schedule(
    connector_id: int, duration_s: int, unit: str | None
) -> tuple[str, dict[str, Any]]:
    p: dict[str, Any] = {"connectorId": connector_id, "duration": duration_s}
    if unit is not None:
        p["chargingRateUnit"] = unit
    return "GetCompositeSchedule", p


def parse_composite(
    payload: dict[str, Any],
) -> tuple[float | None, str | None, list[tuple[int, float, int | None]]]:
    sched = payload.get("chargingSchedule")
    if not sched:
        return None, None, []
    start = payload.get("scheduleStart") or sched.get("startSchedule")
    periods = composite_periods(sched)
    return (parse_timestamp(start) if start else None), sched.get("chargingRateUnit"), periods
