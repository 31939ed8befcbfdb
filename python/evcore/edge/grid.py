"""Grid signals: curtailments ("at most X kW at node N from T1 to T2") and price updates.

What this module owns: validating signals, keeping the book of them, and answering "which power caps
apply at node N at time t (with the lead time that lets decreases be confirmed by T1)" and "when
does the answer next change". A curtailment never *raises* a limit: the core takes the lower of the
site file's ``power_limit_kw`` and the curtailment. It never decides a setpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("evcore.edge")

#: How long past its end the issue time of a curtailment's last revision is kept (to ignore an
#: older revision redelivered late): the events stream's default retention, which holds the grid
#: subject (``BusConfig.events_max_age_s``).
REVISION_KEEP_S = 30 * 24 * 3600.0


class GridSignalError(ValueError):
    """A grid signal is malformed; the message names the field."""


class UnknownNode(GridSignalError):
    """A grid signal names a node the site does not have."""


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
            raise UnknownNode(f"curtailment {self.signal_id}: unknown node_id {self.node_id!r}")
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
    """Known curtailments; superseded by id (a repeated id replaces the earlier signal).

    Per id it also keeps the issue time (``GridSignal.issued_at``) of the revision it holds or
    of the cancel that removed it (``revision_is_older``, ``note_revision``): a redelivered older
    revision or cancel is ignored. ``snapshot``/``restore`` carry both across a restart."""

    def __init__(
        self, node_ids: Collection[str], lead_s: float, grid_node: str | None = None
    ) -> None:
        #: The site's node ids (the controller checks a building meter's node against them too).
        self.node_ids = frozenset(node_ids)
        self._lead_s = lead_s
        #: The site's grid connection (the tree's root): where a signal naming a node this site
        #: does not have is applied (``at_known_node``).
        self.grid_node = grid_node if grid_node in self.node_ids else None
        self._by_id: dict[str, Curtailment] = {}
        # id -> (issued_at of the last revision applied, keep the mark until)
        self._issued: dict[str, tuple[float, float]] = {}

    def at_known_node(self, c: Curtailment) -> Curtailment:
        """``c``, or, when it names a node this site does not have, ``c`` at the grid connection.
        Every node's load is part of the grid connection's, so the limit there is at least as
        tight. A grid signal arrives with nobody to tell of a refusal: refusing it left the site
        under the higher share it held while the cloud counted the lower one as taken (review
        2026-12-05: the cloud's stored topology named the root otherwise, 350 kW on 300)."""
        if c.node_id in self.node_ids or self.grid_node is None:
            return c
        log.warning(
            "curtailment %s: node %r is not in this site; applied at the grid connection %r",
            c.signal_id,
            c.node_id,
            self.grid_node,
        )
        return dataclasses.replace(c, node_id=self.grid_node)

    def add(self, c: Curtailment) -> None:
        c.validate(self.node_ids)
        self._by_id[c.signal_id] = c

    def cancel(self, signal_id: str) -> bool:
        return self._by_id.pop(signal_id, None) is not None

    def get(self, signal_id: str) -> Curtailment | None:
        return self._by_id.get(signal_id)

    def revision_is_older(self, signal_id: str, issued_at: float | None) -> bool:
        """Whether a revision (or cancel) issued at ``issued_at`` is older than the one applied
        last for this id. Equal is not older (a redelivery of the same revision); no issue time
        is never older."""
        held = self._issued.get(signal_id)
        return issued_at is not None and held is not None and issued_at < held[0]

    def same_instant(self, signal_id: str, issued_at: float | None) -> bool:
        """Whether the revision (or cancel) applied last for this id was issued at ``issued_at``."""
        held = self._issued.get(signal_id)
        return issued_at is not None and held is not None and issued_at == held[0]

    def note_revision(self, signal_id: str, issued_at: float | None, keep_until: float) -> None:
        """Record the issue time of the revision (or cancel) just applied; kept until
        ``keep_until`` + ``REVISION_KEEP_S``."""
        if issued_at is None or not math.isfinite(issued_at):
            return
        until = keep_until + REVISION_KEEP_S if math.isfinite(keep_until) else math.inf
        self._issued[signal_id] = (issued_at, until)

    def prune(self, now: float) -> None:
        for sid in [s for s, c in self._by_id.items() if c.end <= now]:
            del self._by_id[sid]
        for sid in [s for s, (_, until) in self._issued.items() if until <= now]:
            del self._issued[sid]

    def snapshot(self, saved_at: float | None = None, seq: int | None = None) -> str:
        """The book as JSON (curtailments held and the revision marks), for the edge's store;
        ``seq`` (increasing with every copy written, kept across restarts) tells two copies of
        the book apart, ``saved_at`` (wall clock, which can step back) only copies without one."""
        return json.dumps(
            {
                "v": 1,
                "seq": seq,
                "saved_at": saved_at,
                "curtailments": [
                    [c.signal_id, c.node_id, c.max_kw, c.start, c.end] for c in self._by_id.values()
                ],
                "issued": {sid: [t, until] for sid, (t, until) in self._issued.items()},
            },
            sort_keys=True,
        )

    def restore(self, text: str, now: float) -> list[str]:
        """Load a ``snapshot`` (at start, before the first decision): ended curtailments are
        dropped, and what is already in the book (a newer revision) is kept. Returns what could
        not be restored (an unknown node: the site file changed), in words."""
        data: Any = json.loads(text)
        skipped: list[str] = []
        for sid, raw in dict(data.get("issued", {})).items():
            t, until = float(raw[0]), float(raw[1])
            if until > now and (sid not in self._issued or self._issued[sid][0] < t):
                self._issued[str(sid)] = (t, until)
        for row in data.get("curtailments", []):
            c = Curtailment(str(row[0]), str(row[1]), float(row[2]), float(row[3]), float(row[4]))
            if c.end <= now or c.signal_id in self._by_id:
                continue
            c = self.at_known_node(c)  # the site file changed: never dropped while a root holds
            try:
                self.add(c)
            except GridSignalError as exc:
                skipped.append(str(exc))
        return skipped

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
