"""Grid signals: curtailments ("at most X kW at node N from T1 to T2") and price updates.

What this module owns: validating signals, keeping the book of them, and answering "which power caps
apply at node N at time t (with the lead time that lets decreases be confirmed by T1)" and "when
does the answer next change". A curtailment never *raises* a limit: the core takes the lower of the
site file's ``power_limit_kw`` and the curtailment. It never decides a setpoint.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass


class GridSignalError(ValueError):
    """A grid signal is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Curtailment:
    signal_id: str
    node_id: str
    max_kw: float
    start: float  # UTC seconds (T1): the limit holds from here
    end: float  # UTC seconds (T2): released here

    def validate(self, node_ids: Collection[str]) -> None:
        if not self.signal_id:
            raise GridSignalError("curtailment.signal_id: must not be empty")
        if self.node_id not in node_ids:
            raise GridSignalError(f"curtailment {self.signal_id}: unknown node_id {self.node_id!r}")
        if not math.isfinite(self.max_kw) or self.max_kw < 0:
            raise GridSignalError(
                f"curtailment {self.signal_id}: max_kw must be a finite number >= 0, "
                f"got {self.max_kw!r}"
            )
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise GridSignalError(f"curtailment {self.signal_id}: start and end must be finite")
        if self.end <= self.start:
            raise GridSignalError(
                f"curtailment {self.signal_id}: end ({self.end}) must be after start ({self.start})"
            )


@dataclass(frozen=True, slots=True)
class PricePoint:
    start: float  # UTC seconds
    price_per_kwh: float


class CurtailmentBook:
    """Known curtailments; superseded by id (a repeated id replaces the earlier signal)."""

    def __init__(self, node_ids: Collection[str], lead_s: float) -> None:
        self._node_ids = frozenset(node_ids)
        self._lead_s = lead_s
        self._by_id: dict[str, Curtailment] = {}

    def add(self, c: Curtailment) -> None:
        c.validate(self._node_ids)
        self._by_id[c.signal_id] = c

    def cancel(self, signal_id: str) -> bool:
        return self._by_id.pop(signal_id, None) is not None

    def prune(self, now: float) -> None:
        for sid in [s for s, c in self._by_id.items() if c.end <= now]:
            del self._by_id[sid]

    def __iter__(self) -> Iterator[Curtailment]:
        return iter(sorted(self._by_id.values(), key=lambda c: (c.start, c.signal_id)))

    def __len__(self) -> int:
        return len(self._by_id)

    def in_force(self, now: float) -> list[Curtailment]:
        """Curtailments the loop must already respect: from ``start - lead`` until ``end``."""
        return [c for c in self if c.start - self._lead_s <= now < c.end]

    def caps_kw(self, now: float, horizon_s: float = 0.0) -> dict[str, float]:
        """Per node the lowest cap in force at any time in ``[now, now + horizon_s]``."""
        caps: dict[str, float] = {}
        for c in self:
            if c.start - self._lead_s <= now + horizon_s and now < c.end:
                caps[c.node_id] = min(caps.get(c.node_id, math.inf), c.max_kw)
        return caps

    def next_change(self, now: float) -> float | None:
        """The next instant after ``now`` at which ``caps_kw(t)`` changes (lead start or end)."""
        times = [t for c in self for t in (c.start - self._lead_s, c.end) if t > now]
        return min(times) if times else None


def merge_prices(old: Iterable[PricePoint], update: Iterable[PricePoint]) -> list[PricePoint]:
    """A price update replaces every point at or after its first step; earlier points stay."""
    new = sorted(update, key=lambda p: p.start)
    for p in new:
        if not (math.isfinite(p.start) and math.isfinite(p.price_per_kwh)):
            raise GridSignalError(f"price update: non-finite point {p!r}")
    if not new:
        return sorted(old, key=lambda p: p.start)
    first = new[0].start
    return [p for p in sorted(old, key=lambda p: p.start) if p.start < first] + new


def price_at(points: Mapping[float, float] | Iterable[PricePoint], t: float) -> float | None:
    pts = (
        sorted(points.items())
        if isinstance(points, Mapping)
        else sorted((p.start, p.price_per_kwh) for p in points)
    )
    current: float | None = None
    for start, price in pts:
        if start <= t:
            current = price
        else:
            break
    return current
