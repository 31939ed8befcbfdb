"""The digital twin's virtual clock.

``VirtualClock`` implements the ``Clock`` protocol of ``evcore.clock``. Simulated time moves only
when the twin's driver calls ``run_until``, and the driver only moves it once **every queue is
drained**: no ready callback in the event loop (socket reads included, since the selector is polled
on every loop iteration), no job in the loop's executor, and no work a component has declared with
``busy()``. Then it jumps straight to the earliest sleeper's deadline. Same inputs and seed, same
order of wake-ups, same results — however fast or slow the machine is.

What this module must never do: read the wall clock to decide simulated time, or wake a sleeper
before everything woken earlier has settled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that says how many jobs are still running (thread work is a queue too)."""

    def __init__(self, max_workers: int = 2) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="evcore-twin")
        self.in_flight = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.in_flight += 1
        fut = super().submit(fn, *args, **kwargs)
        loop = _running_loop()

        def _done(_f: concurrent.futures.Future[Any]) -> None:
            # Decrement on the loop thread so the driver never sees a torn count.
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._finish)
            else:
                self._finish()

        fut.add_done_callback(_done)
        return fut

    def _finish(self) -> None:
        self.in_flight -= 1


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs every job at once on the submitting thread. Work a component hands to a thread (a
    planner's solve) then lands at a fixed point among the events of the same simulated instant,
    instead of whenever the machine finishes it: the twin stays reproducible."""

    in_flight = 0  # a job is done before ``submit`` returns

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # delivered to the awaiting coroutine, as a thread would
            fut.set_exception(e)
        return fut


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class VirtualClock:
    """Simulated time for the twin; satisfies ``evcore.clock.Clock``.

    ``sleep`` registers a deadline and waits; nothing wakes until the driver (``run_until`` or
    ``advance``) moves time past it. Sleepers due at the same instant wake in the order they went to
    sleep, so runs are reproducible.
    """

    def __init__(self, start: float = DEFAULT_START, *, settle_spins: int = 3) -> None:
        if start != start or start in (float("inf"), float("-inf")):
            raise ValueError(f"VirtualClock: start must be a finite number, got {start!r}")
        if settle_spins < 1:
            raise ValueError(f"VirtualClock: settle_spins must be >= 1, got {settle_spins}")
        self._start = float(start)
        self._now = float(start)
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        # Entries of ``_sleepers`` whose sleep was cancelled (their future done, never woken).
        # They are dropped when they reach the top, and the heap rebuilt from the live entries
        # once they are more than half of it: a cancelled timeout behind a live earlier sleeper
        # (a control loop's tick) would otherwise stay for its whole deadline.
        self._cancelled = 0
        self._busy = 0
        self._settle_spins = settle_spins
        self._executor: CountingExecutor | InlineExecutor | None = None
        self.wakeups = 0

    # -- the Clock protocol -------------------------------------------------------------------
    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        if seconds != seconds:
            raise ValueError("VirtualClock.sleep: seconds is NaN")
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        try:
            await fut
        finally:
            # Cancelled (the future with it) or left by another error: its entry is still in the
            # heap, or was popped as done at the top just before (counted -1 there: even). Only
            # a rebuild in between leaves the count one high, until the next rebuild.
            if fut.cancelled() or not fut.done():
                fut.cancel()
                self._forget_one()

    # -- driving time ---------------------------------------------------------------------------
    @property
    def start(self) -> float:
        return self._start

    def next_deadline(self) -> float | None:
        """The earliest live sleeper's deadline, or None."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled sleepers
            self._cancelled -= 1
        return self._sleepers[0][0] if self._sleepers else None

    def _forget_one(self) -> None:
        """One more cancelled entry in the heap; rebuild it once they are more than half."""
        self._cancelled += 1
        if self._cancelled * 2 > len(self._sleepers):
            # Same (deadline, sequence) keys: the live sleepers keep their order.
            self._sleepers = [e for e in self._sleepers if not e[2].done()]
            heapq.heapify(self._sleepers)
            self._cancelled = 0

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Declare work in progress that the event loop cannot see (e.g. a reply awaited on a socket
        whose peer has not written yet); time does not move while any is open."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def install_executor(
        self, loop: asyncio.AbstractEventLoop, *, inline: bool = False
    ) -> CountingExecutor | InlineExecutor:
        """Give ``loop`` a default executor whose jobs count as queued work (``inline``: one that
        runs each job at once, for runs that must not depend on thread timing)."""
        ex: CountingExecutor | InlineExecutor = InlineExecutor() if inline else CountingExecutor()
        loop.set_default_executor(ex)
        self._executor = ex
        return ex

    def _loop_idle(self, loop: asyncio.AbstractEventLoop) -> bool:
        # ``_ready`` is the loop's queue of runnable callbacks (CPython's BaseEventLoop). The
        # driver's own wake-up sits in it while we look, hence "<= 1".
        ready = getattr(loop, "_ready", None)
        if ready is not None and len(ready) > 1:
            return False
        if self._executor is not None and self._executor.in_flight > 0:
            return False
        return self._busy == 0

    async def drain(self, *, max_spins: int = 1_000_000) -> None:
        """Return once the loop has been idle for ``settle_spins`` consecutive iterations."""
        loop = asyncio.get_running_loop()
        idle = 0
        for _ in range(max_spins):
            await asyncio.sleep(0)
            if self._loop_idle(loop):
                idle += 1
                if idle >= self._settle_spins:
                    return
            else:
                idle = 0
        raise RuntimeError(
            f"VirtualClock.drain: the event loop never went idle in {max_spins} iterations "
            "(a component is busy-looping on sleep(0)?)"
        )

    def _wake_due(self) -> int:
        woken = 0
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
                woken += 1
            else:
                self._cancelled -= 1
        self.wakeups += woken
        return woken

    async def run_until(self, t: float) -> None:
        """Drain, then jump to the next deadline, again and again, until time reaches ``t``."""
        if t != t:
            raise ValueError("VirtualClock.run_until: t is NaN")
        await self.drain()
        while True:
            nxt = self.next_deadline()
            if nxt is None or nxt > t:
                break
            self._now = max(self._now, nxt)
            self._wake_due()
            await self.drain()
        self._now = max(self._now, t)
        self._wake_due()
        await self.drain()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper on the way in deadline order."""
        if seconds < 0 or seconds != seconds:
            raise ValueError(
                f"VirtualClock.advance: seconds must be a non-negative number, got {seconds!r}"
            )
        await self.run_until(self._now + seconds)

    def set_time(self, t: float) -> None:
        """Move time forward synchronously (for loops that do not use asyncio); wakes nothing."""
        if t < self._now or t != t:
            raise ValueError(f"VirtualClock.set_time: time may only move forward, got {t!r}")
        self._now = t
