"""OCPP 2.0.1: handlers for what a charging station sends, builders for what the CSMS sends.

Protocol only: frames become events, requests become payloads; no limit is decided here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ocpp.v201.enums import Action

from evcore.ocpp.connection import HandlerError, on
from evcore.ocpp.handlers import SharedHandlers, composite_periods, iso, schedule_periods
from evcore.ocpp.metering import parse_timestamp
from evcore.ocpp.oneline import can_keep, keepable

if TYPE_CHECKING:
    from evcore.ocpp.server import ChargerInfo, LimitRequest

PURPOSE = {
    "tx": "TxProfile",
    "tx_default": "TxDefaultProfile",
    "station_max": "ChargingStationMaxProfile",
}


class Connection201(SharedHandlers):
    version = "2.0.1"
    frame_error_code = "RpcFrameworkError"
    format_error_code = "FormatViolation"
    unknown_type_code = "MessageTypeNotSupported"

    @on(Action.boot_notification)
    async def on_boot(self, p: dict[str, Any]) -> dict[str, Any]:
        cs = p["chargingStation"]
        self.csms._on_boot(
            self,
            vendor=cs["vendorName"],
            model=cs["model"],
            serial=cs.get("serialNumber"),
            firmware=cs.get("firmwareVersion"),
            reason=p["reason"],
        )
        return self.boot_accepted()

    @on(Action.status_notification)
    async def on_status(self, p: dict[str, Any]) -> dict[str, Any]:
        at = self._ts(p["timestamp"])
        await self.csms._on_status(
            self.station, p["evseId"], p["connectorId"], p["connectorStatus"], "NoError", at
        )
        return {}

    @on(Action.authorize)
    async def on_authorize(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"idTokenInfo": {"status": "Accepted"}}

    @on(Action.transaction_event)
    async def on_transaction_event(self, p: dict[str, Any]) -> dict[str, Any]:
        info = p["transactionInfo"]
        transaction_id = info["transactionId"]
        if not can_keep(transaction_id):
            # The id the station is answered with (TxProfiles): an escaped copy would name no
            # transaction of the station's. Refused before any state.
            raise HandlerError(
                "PropertyConstraintViolation",
                f"transactionInfo.transactionId: {transaction_id!r} holds a NUL character or a "
                "lone surrogate, which no record can keep",
            )
        at = self._tx_ts(p["timestamp"])
        evse = p.get("evse") or {}
        id_token = (p.get("idToken") or {}).get("idToken")
        await self.csms._on_transaction_event_2_0_1(
            self.station,
            event_type=p["eventType"],
            transaction_id=transaction_id,
            seq_no=p["seqNo"],
            evse_id=evse.get("id"),
            id_tag=None if id_token is None else keepable(id_token),
            at=at,
            meter_values=p.get("meterValue") or [],
            reason=info.get("stoppedReason"),
            offline=bool(p.get("offline", False)),
        )
        out: dict[str, Any] = {}
        if id_token is not None:
            out["idTokenInfo"] = {"status": "Accepted"}
        return out

    @on(Action.meter_values)
    async def on_meter_values(self, p: dict[str, Any]) -> dict[str, Any]:
        await self.csms._on_meter_values(self.station, p["evseId"], p["meterValue"], None)
        return {}

    # Heartbeat, SecurityEventNotification, FirmwareStatusNotification, LogStatusNotification
    # and DataTransfer: SharedHandlers.

    @on(Action.report_charging_profiles)
    async def on_report_charging_profiles(self, p: dict[str, Any]) -> dict[str, Any]:
        self.csms._on_profile_report(self.station, p)
        return {}

    @on(Action.notify_ev_charging_needs)
    async def on_ev_charging_needs(self, p: dict[str, Any]) -> dict[str, Any]:
        # Accepted (K15.FR.03): the edge sends every session a TxProfile of its own.
        self.csms._on_notification(self.station, "NotifyEVChargingNeeds", p)
        return {"status": "Accepted"}

    # The rest of the ISO 15118 exchange and a station's own limits are heard and passed on as
    # notifications (they were CALLERRORs: NotImplemented). The edge's counting does not rest on
    # them: a limit the station applies below ours only lowers what it draws.
    @on(Action.notify_ev_charging_schedule)
    async def on_ev_charging_schedule(self, p: dict[str, Any]) -> dict[str, Any]:
        self.csms._on_notification(self.station, "NotifyEVChargingSchedule", p)
        return {"status": "Accepted"}

    @on(Action.notify_charging_limit)
    async def on_notify_charging_limit(self, p: dict[str, Any]) -> dict[str, Any]:
        self.csms._on_notification(self.station, "NotifyChargingLimit", p)
        return {}

    @on(Action.cleared_charging_limit)
    async def on_cleared_charging_limit(self, p: dict[str, Any]) -> dict[str, Any]:
        self.csms._on_notification(self.station, "ClearedChargingLimit", p)
        return {}

    @on(Action.notify_event)
    async def on_notify_event(self, p: dict[str, Any]) -> dict[str, Any]:
        self.csms._on_notification(self.station, "NotifyEvent", p)
        return {}


def configure_calls(
    measurands: tuple[str, ...], interval_s: int
) -> list[tuple[str, dict[str, Any]]]:
    def var(component: str, name: str, value: str) -> dict[str, Any]:
        return {
            "component": {"name": component},
            "variable": {"name": name},
            "attributeValue": value,
        }

    m = ",".join(measurands)
    return [
        (
            "SetVariables",
            {
                "setVariableData": [
                    var("SampledDataCtrlr", "TxUpdatedMeasurands", m),
                    var("SampledDataCtrlr", "TxUpdatedInterval", str(interval_s)),
                    var("AlignedDataCtrlr", "Measurands", m),
                    var("AlignedDataCtrlr", "Interval", str(interval_s)),
                ]
            },
        )
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
    evse = 0 if req.purpose == "station_max" else charger.evse_id
    unit, periods, valid_to = schedule_periods(charger, req, start)
    profile: dict[str, Any] = {
        "id": profile_id,
        "stackLevel": stack_level,
        "chargingProfilePurpose": PURPOSE[req.purpose],
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [
            {
                "id": profile_id,
                "startSchedule": iso(start),
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": periods,
            }
        ],
    }
    if valid_to is not None:
        profile["validTo"] = valid_to
    if req.purpose == "tx":
        assert transaction_id is not None
        profile["transactionId"] = transaction_id
    return "SetChargingProfile", {"evseId": evse, "chargingProfile": profile}


def clear_charging_profile(
    evse_id: int | None, purpose: str | None, profile_id: int | None, stack_level: int | None
) -> tuple[str, dict[str, Any]]:
    p: dict[str, Any] = {}
    if profile_id is not None:
        p["chargingProfileId"] = profile_id
    crit: dict[str, Any] = {}
    if evse_id is not None:
        crit["evseId"] = evse_id
    if purpose is not None:
        crit["chargingProfilePurpose"] = PURPOSE[purpose]
    if stack_level is not None:
        crit["stackLevel"] = stack_level
    if crit:
        p["chargingProfileCriteria"] = crit
    return "ClearChargingProfile", p


def get_charging_profiles(
    request_id: int, evse_id: int, purpose: str, stack_level: int | None = None
) -> tuple[str, dict[str, Any]]:
    """The profiles of ``purpose`` on ``evse_id`` (at ``stack_level`` only, if given), to be
    reported in ReportChargingProfiles with ``request_id`` (K09)."""
    criterion: dict[str, Any] = {"chargingProfilePurpose": PURPOSE[purpose]}
    if stack_level is not None:
        criterion["stackLevel"] = stack_level
    payload = {"requestId": request_id, "evseId": evse_id, "chargingProfile": criterion}
    return "GetChargingProfiles", payload


def composite_schedule(
    evse_id: int, duration_s: int, unit: str | None
) -> tuple[str, dict[str, Any]]:
    p: dict[str, Any] = {"evseId": evse_id, "duration": duration_s}
    if unit is not None:
        p["chargingRateUnit"] = unit
    return "GetCompositeSchedule", p


def parse_composite(
    payload: dict[str, Any],
) -> tuple[float | None, str | None, list[tuple[int, float, int | None]]]:
    sched = payload.get("schedule")
    if not sched:
        return None, None, []
    periods = composite_periods(sched)
    return parse_timestamp(sched["scheduleStart"]), sched.get("chargingRateUnit"), periods
