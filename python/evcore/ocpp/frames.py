"""SetChargingProfile payloads serialised directly, for the batched send path (``send_limits``).

What this module owns: the JSON text of a SetChargingProfile request, written with string
formatting instead of building a dict, checking it against its schema and ``json.dumps``. It must
produce exactly the payload ``v16.set_charging_profile`` / ``v201.set_charging_profile`` build (the
tests compare ``json.loads`` of every combination of version, purpose, unit, ``valid_to`` and final
limit with them, and validate each against the OCPP JSON schemas), so its validity holds by
construction: every value in it is an int, a finite float (``LimitRequest`` limits are checked
finite and >= 0 before they get here), a fixed enum string or a JSON-escaped string.

It must never take a value that was not checked first (``CentralSystem._prepare_limit``).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from evcore.ocpp import v16, v201

if TYPE_CHECKING:
    from evcore.ocpp.server import ChargerInfo, LimitRequest


def _num(x: float) -> str:
    # json.dumps writes a float with float.__repr__ (e.g. 12.0, 7.5); the same here.
    if not math.isfinite(x):
        raise ValueError(f"a limit on the wire must be finite, got {x!r}")
    return repr(float(x))


def set_charging_profile_json(
    version: str,
    charger: ChargerInfo,
    req: LimitRequest,
    *,
    profile_id: int,
    stack_level: int,
    transaction_id: str | None,
    start: float,
    start_iso: str,
) -> str:
    """The SetChargingProfile request payload for ``req`` as JSON text; its schedule starts at
    ``start`` (``handlers.schedule_start``) and ``start_iso`` is ``v16.iso(start)``, computed
    once per batch."""
    evse = 0 if req.purpose == "station_max" else charger.evse_id
    ac = req.limit_w is None
    unit = "A" if ac else "W"
    phases = f',"numberPhases":{int(charger.number_phases)}' if ac else ""
    periods = f'{{"startPeriod":0,"limit":{_num(req.wire_limit)}{phases}}}'
    valid_to = ""
    if req.valid_to is not None and req.wire_final is not None:
        final_at = max(1, int(req.valid_to - start))
        periods += f',{{"startPeriod":{final_at},"limit":{_num(req.wire_final)}{phases}}}'
    elif req.valid_to is not None:
        valid_to = f',"validTo":"{v16.iso(req.valid_to)}"'
    schedule = (
        f'"startSchedule":"{start_iso}","chargingRateUnit":"{unit}",'
        f'"chargingSchedulePeriod":[{periods}]'
    )
    pid, level = int(profile_id), int(stack_level)
    if version == "1.6":
        tx = ""
        if req.purpose == "tx":
            assert transaction_id is not None
            tx = f',"transactionId":{int(transaction_id)}'
        return (
            f'{{"connectorId":{int(evse)},"csChargingProfiles":{{"chargingProfileId":{pid},'
            f'"stackLevel":{level},"chargingProfilePurpose":"{v16.PURPOSE[req.purpose]}",'
            f'"chargingProfileKind":"Absolute","chargingSchedule":{{{schedule}}}'
            f"{valid_to}{tx}}}}}"
        )
    tx = ""
    if req.purpose == "tx":
        assert transaction_id is not None
        tx = f',"transactionId":{json.dumps(str(transaction_id))}'
    return (
        f'{{"evseId":{int(evse)},"chargingProfile":{{"id":{pid},"stackLevel":{level},'
        f'"chargingProfilePurpose":"{v201.PURPOSE[req.purpose]}","chargingProfileKind":"Absolute",'
        f'"chargingSchedule":[{{"id":{pid},{schedule}}}]{valid_to}{tx}}}}}'
    )
