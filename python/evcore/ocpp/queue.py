"""The per-station call queue: OCPP-J allows one CALL in flight per direction.

Owns ordering only: decreases of a charging limit go before everything else, a limit that a newer
one for the same charger and purpose supersedes is dropped before it is sent, and the queue is
bounded. It never decides a limit and never talks to a socket (``evcore.ocpp.server`` does).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CallOutcome:
    """What became of one queued CALL.

    ``status``: ``Result`` (a CALLRESULT; ``payload`` holds it), ``CallError`` (``error_code``),
    ``Timeout``, ``Superseded``, ``QueueFull``, ``NotConnected``, ``Disconnected``, ``Skipped``
    (the builder decided at send time not to send, ``detail`` says why).
    """

    status: str
    payload: dict[str, Any] | None = None
    error_code: str | None = None
    detail: str = ""
    sent_at: float | None = None  # clock.now() when the frame was handed to the socket
    answered_at: float | None = None
    sent_mono: float | None = None  # clock.monotonic() at the same instant


#: Called just before sending; returns (action, payload) or a CallOutcome to skip sending.
Builder = Callable[[], "tuple[str, dict[str, Any]] | CallOutcome"]
#: Called by the worker with the station connection and the call's outcome, still holding the
#: station's one CALL in flight (it may make further calls); its result is the item's outcome.
Then = Callable[[Any, CallOutcome], Awaitable[CallOutcome]]


@dataclass(slots=True)
class QueuedCall:
    builder: Builder
    future: asyncio.Future[CallOutcome]
    decrease: bool = False
    supersede_key: Hashable | None = None
    seq: int = 0
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    then: Then | None = None


class StationCallQueue:
    """Pending CALLs for one station, ordered decreases first then FIFO; bounded."""

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError(f"queue bound must be >= 1, got {bound}")
        self.bound = bound
        self._items: list[QueuedCall] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def pending(self) -> list[QueuedCall]:
        return list(self._items)

    def put(self, item: QueuedCall) -> None:
        """Enqueue ``item``; drops a superseded one; resolves the loser when the queue is full."""
        if item.supersede_key is not None:
            kept: list[QueuedCall] = []
            for old in self._items:
                if old.supersede_key == item.supersede_key:
                    _resolve(old, CallOutcome("Superseded", detail=f"replaced by {item.label}"))
                else:
                    kept.append(old)
            self._items = kept
        if len(self._items) >= self.bound:
            # A decrease is safety-relevant: make room by refusing the newest non-decrease.
            victim_idx = None
            if item.decrease:
                for i in range(len(self._items) - 1, -1, -1):
                    if not self._items[i].decrease:
                        victim_idx = i
                        break
            if victim_idx is None:
                _resolve(item, CallOutcome("QueueFull", detail=f"queue bound {self.bound} reached"))
                return
            victim = self._items.pop(victim_idx)
            _resolve(victim, CallOutcome("QueueFull", detail="evicted for a decrease"))
        item.seq = next(self._seq)
        # Decreases first, FIFO within each group.
        pos = len(self._items)
        if item.decrease:
            pos = 0
            while pos < len(self._items) and self._items[pos].decrease:
                pos += 1
        self._items.insert(pos, item)
        self._changed.set()

    async def get(self, ready: Callable[[], bool] | None = None) -> QueuedCall:
        """The next call, once there is one and ``ready()`` (if given) is true. Until it is
        taken, a queued call can still be superseded or overtaken by a decrease."""
        while True:
            # Drop items whose waiter gave up.
            while self._items and self._items[0].future.done():
                self._items.pop(0)
            if self._items and (ready is None or ready()):
                return self._items.pop(0)
            self._changed.clear()
            await self._changed.wait()

    def wake(self) -> None:
        """Wake the worker waiting in ``get`` (it re-checks ``ready``; nothing is added)."""
        self._changed.set()

    def fail_all(self, status: str, detail: str = "") -> None:
        items, self._items = self._items, []
        for it in items:
            _resolve(it, CallOutcome(status, detail=detail))


def _resolve(item: QueuedCall, outcome: CallOutcome) -> None:
    if not item.future.done():
        item.future.set_result(outcome)
