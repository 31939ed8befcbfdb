"""How far a station's clock is from the central system's, estimated from what it sends.

What this module owns: one estimate per station of ``station clock - central clock`` (seconds),
from the timestamps of its MeterValues, StatusNotification, StartTransaction / StopTransaction and
TransactionEvent messages against the central system's clock when they arrive. A timestamp says
when the station measured or decided something, which is never after it sent the message, so each
sample is at most the true offset (less by the network latency and the sample's age). The estimate
is the highest sample of the last ``window_s`` (kept as per-minute maxima): close to the true
offset from below, and a burst of old samples (a StopTransaction's transactionData, messages
replayed after a reconnect) never lowers it. It keeps its last value while the station sends no
timestamp (an idle charger), so a lead once seen is not forgotten. A lead is real at once (no
timestamp is later than its message); the central system reports a lag only once two minutes of
samples show it: a single old timestamp (a StartTransaction replayed after hours offline) looks
like hours of lag.

It never decides anything from the estimate: the edge uses it (``coreio``) to count when a
station that runs ahead reaches the final (failsafe) period of its profile.
"""

from __future__ import annotations

import math

#: Beyond this (either way), the central system logs one WARNING for the station.
WARN_OFFSET_S = 5.0


class ClockOffset:
    """Running estimate of one station's clock offset (station - central, seconds)."""

    __slots__ = ("_bucket_s", "_buckets", "_window_s", "warned")

    def __init__(self, *, window_s: float = 600.0, bucket_s: float = 60.0) -> None:
        self._bucket_s = bucket_s
        self._window_s = window_s
        #: [(bucket index on the central clock, highest offset seen in it)], oldest first.
        self._buckets: list[tuple[int, float]] = []
        #: The offset was logged as beyond ``WARN_OFFSET_S`` once.
        self.warned = False

    def observe(self, station_ts: float, received_at: float) -> None:
        """One timestamp ``station_ts`` (station clock) of a message that arrived at
        ``received_at`` (central clock)."""
        sample = station_ts - received_at
        if not math.isfinite(sample):
            return
        k = math.floor(received_at / self._bucket_s)
        buckets = self._buckets
        if buckets and buckets[-1][0] == k:
            if sample > buckets[-1][1]:
                buckets[-1] = (k, sample)
            return
        if buckets and buckets[-1][0] > k:  # the central clock stepped back: start over
            buckets.clear()
        buckets.append((k, sample))
        oldest = k - math.ceil(self._window_s / self._bucket_s)
        while buckets[0][0] < oldest:
            del buckets[0]

    @property
    def minutes(self) -> int:
        """Minutes (of our clock, within the window) in which samples arrived."""
        return len(self._buckets)

    @property
    def offset_s(self) -> float | None:
        """Station clock minus central clock (s; > 0: the station runs ahead); ``None`` before
        the station sent any timestamp."""
        if not self._buckets:
            return None
        return max(v for _, v in self._buckets)
