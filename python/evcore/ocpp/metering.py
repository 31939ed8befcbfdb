"""Turning OCPP sampled values into SI numbers on the site's phases.

Owns: units and multipliers (1.6 units such as ``kW``/``kWh``; 2.0.1 ``unitOfMeasure`` with a
power-of-ten multiplier), the charger-terminal → site-phase mapping from the site file's wiring,
where an energy register meters (its ``location``: the outlet, what goes to the car, or the inlet,
the charger's grid side) and timestamp parsing (bad or zone-less timestamps are refused). Never
keeps state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

_PHASE_INDEX = {
    "L1": 0,
    "L2": 1,
    "L3": 2,
    "L1-N": 0,
    "L2-N": 1,
    "L3-N": 2,
    "L1-L2": 0,
    "L2-L3": 1,
    "L3-L1": 2,
}

_SCALE = {"W": 1.0, "kW": 1000.0, "Wh": 1.0, "kWh": 1000.0, "A": 1.0, "Percent": 1.0, "V": 1.0}


class MeterValueError(ValueError):
    """A sampled value could not be read; the message names the field."""


class ImplausibleValue(MeterValueError):
    """A sampled value read as a finite number that no meter gives (``PLAUSIBLE``);
    ``measurand`` names what it claimed to be."""

    def __init__(self, message: str, measurand: str) -> None:
        super().__init__(message)
        self.measurand = measurand


#: The range a reading of each measurand can take (SI units, after unit and multiplier): beyond
#: it a finite number is no measurement (a negative import register, 10^33 Wh, 10^9 A, a SoC of
#: 250 %) and is treated like one that is not a number (``parse_meter_value``). Wide: a register
#: counts a charger's lifetime (350 kW for 20 years is 6e10 Wh); currents and powers of a whole
#: site fit.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "Energy.Active.Import.Register": (0.0, 1e12),
    "Current.Import": (-1e4, 1e4),
    "Current.Offered": (0.0, 1e4),
    "Power.Active.Import": (-1e8, 1e8),
    "SoC": (0.0, 100.0),
}


def check_plausible(measurand: str, value: float, where: str) -> float:
    """``value`` if a reading of ``measurand`` can take it (``PLAUSIBLE``), else
    ``ImplausibleValue`` naming ``where`` and the range."""
    lo, hi = PLAUSIBLE.get(measurand, (-math.inf, math.inf))
    if not lo <= value <= hi:
        raise ImplausibleValue(
            f"{where}: {measurand} of {value:g} is outside [{lo:g}, {hi:g}]", measurand
        )
    return value


#: The times a protobuf Timestamp holds (the bus messages, the store): 0001-01-01T00:00:00Z to
#: 9999-12-31T23:59:59Z. The schemas take times just outside (a zone offset past either end).
TIME_MIN_S = -62_135_596_800.0
TIME_MAX_S = 253_402_300_799.0


def parse_timestamp(value: Any, *, field: str = "timestamp", clamp: bool = False) -> float:
    """An RFC 3339 timestamp with a zone → seconds since the epoch. Raises MeterValueError, also
    for a time outside ``TIME_MIN_S`` … ``TIME_MAX_S`` (it failed in the publisher:
    InternalError on every retry), which ``clamp`` takes as the nearest end instead."""
    if not isinstance(value, str):
        raise MeterValueError(f"{field}: expected an RFC 3339 string, got {value!r}")
    try:
        # RFC 3339 5.6: "T" and "Z" may be lowercase (the schemas' date-time takes them);
        # fromisoformat does not.
        dt = datetime.fromisoformat(value.upper())
    except ValueError:
        raise MeterValueError(f"{field}: not a valid RFC 3339 timestamp: {value!r}") from None
    if dt.tzinfo is None:
        raise MeterValueError(f"{field}: timestamp without a time zone: {value!r}")
    t = dt.timestamp()
    if not TIME_MIN_S <= t <= TIME_MAX_S:
        if clamp:
            return min(max(t, TIME_MIN_S), TIME_MAX_S)
        raise MeterValueError(f"{field}: outside years 1 to 9999 UTC: {value!r}")
    return t


@dataclass(slots=True)
class Reading:
    """One meterValue entry reduced to the figures the control needs (SI units)."""

    at: float
    terminal_a: list[float | None]
    power_w: float | None = None
    #: The register of the energy to the car: ``location`` ``Outlet`` (OCPP's default, also when
    #: none is given), else ``EV`` (the car's own measurement).
    energy_register_wh: float | None = None
    #: The register at the charger's grid side (``location`` ``Inlet``): for a DC charger its AC
    #: input, the rectifier's losses and the auxiliary load included.
    inlet_energy_register_wh: float | None = None
    offered_a: float | None = None
    soc_percent: float | None = None
    context: str | None = None
    #: ``power_w`` was measured at the charger's grid side (``location`` ``Inlet``).
    power_at_inlet: bool = False
    #: Each sampled value skipped (``lenient``): its measurand and why.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing was read (every figure is missing)."""
        return (
            self.terminal_a == [None, None, None]
            and self.power_w is None
            and self.energy_register_wh is None
            and self.inlet_energy_register_wh is None
            and self.offered_a is None
            and self.soc_percent is None
        )


def _number(version: str, sv: Mapping[str, Any], where: str) -> float:
    raw = sv.get("value")
    if version == "1.6":
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise MeterValueError(f"{where}.value: not a number: {raw!r}") from None
        unit = sv.get("unit")
        scale = _SCALE.get(unit, 1.0) if unit else 1.0
    else:
        if not isinstance(raw, (int, float)):
            raise MeterValueError(f"{where}.value: not a number: {raw!r}")
        value = float(raw)
        uom = sv.get("unitOfMeasure") or {}
        unit = uom.get("unit")
        scale = _SCALE.get(unit, 1.0) if unit else 1.0
        mult = uom.get("multiplier", 0)
        if mult:
            try:
                scale *= 10.0 ** int(mult)
            except OverflowError:  # (it raised out of the handler: InternalError)
                raise MeterValueError(
                    f"{where}.unitOfMeasure.multiplier: out of range: {mult!r}"
                ) from None
    scaled = value * scale
    if not math.isfinite(scaled):
        raise MeterValueError(f"{where}.value: not finite: {raw!r}")
    return scaled


def same_time_merged(
    meter_values: Sequence[Mapping[str, Any]], field: str
) -> list[tuple[Mapping[str, Any], str, list[str]]]:
    """The ``meterValue`` entries of one message, those stamped alike (the same timestamp text)
    as one entry, in order of first appearance: (entry, its name, each of its sampled values'
    names as the message places them). A station sending one entry per measurand at one instant
    (the register in one, the currents in the next) sends one reading: as samples of their own
    at the same time, the store and the bus (one sample per charger and time) kept the first."""
    out: list[tuple[Mapping[str, Any], str, list[str]]] = []
    by_time: dict[str, tuple[list[Any], list[str]]] = {}
    for i, mv in enumerate(meter_values):
        values = list(mv.get("sampledValue") or ())
        names = [f"{field}[{i}].sampledValue[{j}]" for j in range(len(values))]
        stamp = mv.get("timestamp")
        earlier = by_time.get(stamp) if isinstance(stamp, str) else None
        if earlier is not None:
            earlier[0].extend(values)
            earlier[1].extend(names)
            continue
        merged = {**mv, "sampledValue": values}
        out.append((merged, f"{field}[{i}]", names))
        if isinstance(stamp, str):
            by_time[stamp] = (values, names)
    return out


def parse_meter_value(
    version: str,
    meter_value: Mapping[str, Any],
    *,
    terminals: int,
    field: str = "meterValue",
    dc: bool = False,
    lenient: bool = False,
    names: Sequence[str] | None = None,
) -> Reading:
    """Read one ``meterValue`` entry. ``terminals`` is how many phase terminals the charger has.
    A sampled value that cannot be read (no number, not finite, a multiplier out of range) or
    one no meter gives (``PLAUSIBLE``: ``ImplausibleValue``) raises ``MeterValueError`` naming
    it; ``lenient``: it is skipped instead, and its measurand and why are listed in
    ``Reading.skipped`` (the timestamp still raises: without it nothing of the entry is a
    reading).

    A current with a phase wins over one without (a phase-less current fills only the
    terminals no phase current was reported for), whatever their order.

    ``dc``: a DC charger's ``Current.Import`` counts only at ``location`` ``Inlet`` (its grid
    side); at the outlet (the default location) it is the DC current to the car, not a line
    current. Its power is the outlet's when reported there (what W limits are about), else the
    inlet's (``power_at_inlet``).

    ``names``: each sampled value's name in errors (``same_time_merged``), else
    ``{field}.sampledValue[i]``.
    """
    at = parse_timestamp(meter_value.get("timestamp"), field=f"{field}.timestamp")
    reading = Reading(at=at, terminal_a=[None, None, None])
    power_phases: list[float] = []
    power_total: float | None = None
    inlet_total: float | None = None
    inlet_phases: list[float] = []
    ev_register: float | None = None
    phaseless_a: float | None = None
    for i, sv in enumerate(meter_value.get("sampledValue") or ()):
        measurand = sv.get("measurand") or "Energy.Active.Import.Register"
        if measurand not in (
            "Energy.Active.Import.Register",
            "Current.Import",
            "Power.Active.Import",
            "Current.Offered",
            "SoC",
        ):
            continue
        if version == "1.6" and sv.get("format") == "SignedData":
            # A signed meter record (calibration-law chargers), not a number: the reading is in
            # the same meterValue's Raw entries. Refusing it would refuse the whole message.
            continue
        try:
            where = names[i] if names is not None else f"{field}.sampledValue[{i}]"
            value = check_plausible(measurand, _number(version, sv, where), where + ".value")
        except MeterValueError as exc:
            if not lenient:
                raise
            reading.skipped.append((measurand, str(exc)))
            continue
        phase = sv.get("phase")
        if dc and measurand in ("Current.Import", "Power.Active.Import"):
            at_inlet = sv.get("location") == "Inlet"
            if measurand == "Current.Import" and not at_inlet:
                continue  # DC to the car: says nothing about the line currents
            if measurand == "Power.Active.Import" and at_inlet:
                if phase in _PHASE_INDEX:
                    inlet_phases.append(value)
                else:
                    inlet_total = value
                continue
        if reading.context is None:
            reading.context = sv.get("context")
        if measurand == "Current.Import":
            if phase is None:
                # Applied below, where no phase current came: a station reporting both (the
                # phase-less one their mean or sum) had its phase currents replaced by it when
                # it came after them.
                phaseless_a = value
            elif phase in _PHASE_INDEX:
                if terminals == 1:
                    # One terminal: whatever the charger calls its phase, the site file says
                    # where it lands. Some report all three labels, the unused ones at 0.
                    old = reading.terminal_a[0]
                    reading.terminal_a[0] = value if old is None else max(old, value)
                else:
                    reading.terminal_a[_PHASE_INDEX[phase]] = value
        elif measurand == "Power.Active.Import":
            if phase in _PHASE_INDEX:
                power_phases.append(value)
            else:
                power_total = value
        elif measurand == "Energy.Active.Import.Register":
            if phase is None:
                # Ignoring the location took a DC charger's AC input (Inlet) for the energy
                # into its car whenever it came last. A register of the cable or the charger's
                # body is neither.
                location = sv.get("location") or "Outlet"
                if location == "Outlet":
                    reading.energy_register_wh = value
                elif location == "Inlet":
                    reading.inlet_energy_register_wh = value
                elif location == "EV":
                    ev_register = value
        elif measurand == "Current.Offered":
            reading.offered_a = value
        elif measurand == "SoC":
            reading.soc_percent = value
    if phaseless_a is not None:
        # A phase-less current: on a multi-phase charger the same on every terminal.
        n = 1 if terminals == 1 else 3
        for k in range(n):
            if reading.terminal_a[k] is None:
                reading.terminal_a[k] = phaseless_a
    if reading.energy_register_wh is None:
        reading.energy_register_wh = ev_register
    if power_total is not None:
        reading.power_w = power_total
    elif power_phases:
        reading.power_w = sum(power_phases)
    elif inlet_total is not None or inlet_phases:
        reading.power_w = inlet_total if inlet_total is not None else sum(inlet_phases)
        reading.power_at_inlet = True
    return reading


@dataclass(frozen=True, slots=True)
class PhaseMap:
    """How one charger's terminals land on the site's phases (from the site file)."""

    wiring: str
    #: Site phase index for each charger terminal in use.
    site_index: tuple[int, ...]

    @property
    def terminals(self) -> int:
        return 1 if self.wiring in ("line_to_neutral", "line_to_line") else 3

    def to_site(
        self, terminal_a: Sequence[float | None]
    ) -> tuple[float | None, float | None, float | None]:
        out: list[float | None] = [None, None, None]
        if self.wiring == "line_to_line":
            # The branch current flows out on line a and back on line b: both carry it.
            current = terminal_a[0]
            a, b = self.site_index[0], self.site_index[1]
            out[a] = current
            out[b] = current
            if current is not None:
                for k in range(3):
                    if out[k] is None:
                        out[k] = 0.0
        elif self.wiring == "line_to_neutral":
            out[self.site_index[0]] = terminal_a[0]
            if terminal_a[0] is not None:
                for k in range(3):
                    if out[k] is None:
                        out[k] = 0.0
        else:
            for term, site_idx in enumerate(self.site_index):
                out[site_idx] = terminal_a[term]
        return (out[0], out[1], out[2])


def phase_map_for(wiring: str, phases: Sequence[str | int], phase_names: Sequence[str]) -> PhaseMap:
    """``phases``: the site phases the charger's terminals land on, as names or indices."""
    try:
        idx = tuple(
            p if isinstance(p, int) and 0 <= p < 3 else list(phase_names).index(str(p))
            for p in phases
        )
    except ValueError:
        raise ValueError(
            f"phases {list(phases)!r} not among site phases {list(phase_names)!r}"
        ) from None
    return PhaseMap(wiring=wiring, site_index=idx)
