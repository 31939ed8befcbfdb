"""Strict OCPP schema validation, compiled once per action and run inline.

The ``ocpp`` library validates every message with jsonschema in a thread pool, which dominates
latency with many chargers. This module compiles the library's own JSON schemas (the same ones, so
validation is exactly as strict, formats included) with ``jsonschema-rs`` the first time an action
is seen and runs them inline on the event loop (about 8 µs for a MeterValues frame, against about
100 µs for fastjsonschema and more for jsonschema). It also maps a schema failure to the CALLERROR
code each version names.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import jsonschema_rs
import ocpp
from ocpp.v16.enums import Measurand as _Measurand16
from ocpp.v201.enums import MeasurandEnumType as _Measurand201

Validator = Callable[[Any], Any]

_SCHEMA_ROOT = os.path.dirname(os.path.realpath(ocpp.__file__))
_cache: dict[tuple[str, str, bool], Validator | None] = {}
_MEASURANDS: dict[str, frozenset[str]] = {
    "1.6": frozenset(m.value for m in _Measurand16),
    "2.0.1": frozenset(m.value for m in _Measurand201),
}


class SchemaError(Exception):
    """A payload broke its schema; ``code`` is the OCPP error code to answer with, ``path``
    where in the payload (keys and list indices; empty: the payload as a whole)."""

    def __init__(self, code: str, description: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.path = path


def _schema_path(version: str, action: str, response: bool) -> str:
    folder = "v16" if version == "1.6" else "v201"
    if version == "1.6":
        name = action + ("Response" if response else "")
    else:
        name = action + ("Response" if response else "Request")
    return os.path.join(_SCHEMA_ROOT, folder, "schemas", name + ".json")


def validator_for(version: str, action: str, *, response: bool) -> Validator | None:
    """The compiled validator for one message kind; ``None`` if the version has no such action."""
    key = (version, action, response)
    try:
        return _cache[key]
    except KeyError:
        pass
    path = _schema_path(version, action, response)
    compiled: Validator | None
    try:
        with open(path, encoding="utf-8-sig") as f:
            schema = json.load(f)
    except OSError:
        compiled = None
    else:
        compiled = jsonschema_rs.validator_for(schema, validate_formats=True).validate
    _cache[key] = compiled
    return compiled


def precompile(version: str, actions: list[str]) -> None:
    """Compile validators ahead of the first message (keeps the first frames fast)."""
    for action in actions:
        validator_for(version, action, response=False)
        validator_for(version, action, response=True)


def _code_for(version: str, rule: str | None) -> str:
    if rule == "type":
        return "TypeConstraintViolation"
    if rule in ("required", "minItems", "maxItems"):
        return (
            "OccurrenceConstraintViolation" if version != "1.6" else "OccurenceConstraintViolation"
        )
    if rule in ("enum", "maxLength", "minLength", "minimum", "maximum", "multipleOf", "format"):
        return "PropertyConstraintViolation"
    return "FormationViolation" if version == "1.6" else "FormatViolation"


def validate(version: str, action: str, payload: Any, *, response: bool) -> None:
    """Raise :class:`SchemaError` unless ``payload`` is valid (also one nested too deeply to
    check); ``KeyError`` if no schema exists."""
    v = validator_for(version, action, response=response)
    if v is None:
        raise KeyError(action)
    try:
        v(payload)
    except jsonschema_rs.ValidationError as exc:
        path = list(exc.schema_path)
        rule = str(path[-1]) if path else None
        where = "/".join(str(x) for x in exc.instance_path)
        raise SchemaError(
            _code_for(version, rule),
            f"{action}: {where + ': ' if where else ''}{exc.message}",
            tuple(exc.instance_path),
        ) from None
    except (ValueError, RecursionError) as exc:
        # jsonschema-rs gives up on a payload nested a few hundred levels deep ("Recursion limit
        # reached", a plain ValueError): no valid payload is, so it is a format error.
        raise SchemaError(_code_for(version, None), f"{action}: {exc}") from None


#: Each message's meter values: a part of them its schema refuses is dropped, not the message
#: (``without_refused_meter_values``).
_METER_FIELD = {
    "MeterValues": "meterValue",
    "StopTransaction": "transactionData",
    "TransactionEvent": "meterValue",
}
#: A sampled value each version's schema takes: in place of one it refuses while the rest of the
#: message is checked (removed after: the names in later errors stay the message's own).
_VALID_VALUE: dict[str, Any] = {"1.6": "0", "2.0.1": 0}
#: The label a dropped value is counted under when its measurand is none the version names.
UNKNOWN_MEASURAND = "unknown"


def _measurand(version: str, value: Any) -> str:
    """What a dropped sampled value measured, for its count: its measurand if the version
    names it (absent: the energy register, OCPP's default), else ``UNKNOWN_MEASURAND`` (a
    station's own string is no metric label)."""
    m = value.get("measurand", "Energy.Active.Import.Register") if isinstance(value, dict) else None
    return m if isinstance(m, str) and m in _MEASURANDS.get(version, ()) else UNKNOWN_MEASURAND


def without_refused_meter_values(
    version: str, action: str, payload: dict[str, Any], error: SchemaError
) -> tuple[dict[str, Any], list[tuple[str | None, str]]]:
    """A message carrying meter values (MeterValues, 1.6 StopTransaction, 2.0.1
    TransactionEvent) whose schema ``error`` lies in its meter values: a copy without each
    sampled value the schema refuses (in a transaction message also a meterValue entry whose
    fault is its own: its timestamp), and each dropped value's measurand (``_measurand``; None
    for an entry that held none) and why. Raises the ``SchemaError`` that refuses the message
    when a fault lies elsewhere (``error`` itself for another action): it names that field, by
    its index in the message. A MeterValues left with no entry is taken with an empty list.
    Refused whole, a transaction message was retried a few times and dropped, with the
    session's start or end (a unit "kwh" in a StopTransaction's transactionData: the session
    never ended); a MeterValues lost the station's currents with one SoC of "n/a" (a 2.0.1
    value as a string)."""
    field = _METER_FIELD.get(action)
    if field is None or field not in payload:
        raise error
    payload = copy.deepcopy(payload)
    dropped: list[tuple[str | None, str]] = []
    # What was refused is replaced by something valid, so that each later error names the
    # message's own index; the stand-ins go once the message is valid.
    stand_ins: set[int] = set()
    while True:
        path = error.path
        entries = payload.get(field)
        if len(path) < 2 or path[0] != field or not isinstance(path[1], int):
            raise error
        if not isinstance(entries, list) or not 0 <= path[1] < len(entries):
            raise error
        entry = entries[path[1]]
        values = entry.get("sampledValue") if isinstance(entry, dict) else None
        if id(entry) in stand_ins:
            raise error  # (not ours to drop twice: never, a stand-in is valid)
        if (
            len(path) >= 4
            and path[2] == "sampledValue"
            and isinstance(path[3], int)
            and isinstance(values, list)
            and 0 <= path[3] < len(values)
            and id(values[path[3]]) not in stand_ins
        ):
            dropped.append((_measurand(version, values[path[3]]), error.description))
            values[path[3]] = stand_in = {"value": _VALID_VALUE[version]}
        elif action == "MeterValues":
            # A reading's own fault (its timestamp): nothing of it is a reading, and a plain
            # MeterValues carries no session's start or end to keep: refused, naming it.
            raise error
        else:
            # The entry's own fault (its timestamp): each of its values goes with it.
            gone = [v for v in values if id(v) not in stand_ins] if isinstance(values, list) else []
            dropped += [(_measurand(version, v), error.description) for v in gone]
            if not gone:
                dropped.append((None, error.description))
            entries[path[1]] = stand_in = {
                "timestamp": "2000-01-01T00:00:00Z",
                "sampledValue": [{"value": _VALID_VALUE[version]}],
            }
        stand_ins.add(id(stand_in))
        try:
            validate(version, action, payload, response=False)
        except SchemaError as exc:
            error = exc  # each round replaces one part: it ends
        else:
            break
    kept: list[Any] = []
    for entry in entries:
        if id(entry) in stand_ins:
            continue
        entry["sampledValue"] = [v for v in entry["sampledValue"] if id(v) not in stand_ins]
        if entry["sampledValue"]:
            kept.append(entry)
    if kept or action == "MeterValues":  # required there: an empty list, nothing to read
        payload[field] = kept
    else:
        del payload[field]
    return payload, dropped
