"""The twin's virtual clock keeps only live sleepers: a cancelled sleep (a timeout that did not
fire) no longer stays in the heap while an earlier live sleeper exists (review A: 100,000
cancelled one-hour sleeps beside a 1 s ticker left 100,001 entries), and the sleepers left still
wake in deadline order, those due at the same instant in the order they went to sleep."""

from __future__ import annotations

import asyncio
import contextlib

from evcore.sim.vclock import VirtualClock


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_cancelled_sleeps_behind_a_live_ticker_do_not_pile_up() -> None:
    clock = VirtualClock()

    async def ticker() -> None:  # a control loop: always a live sleeper due soon
        while True:
            await clock.sleep(1.0)

    tick = asyncio.ensure_future(ticker())
    most = 0
    for i in range(5000):
        timeout = asyncio.ensure_future(clock.sleep(3600.0))
        await asyncio.sleep(0)
        await _cancel(timeout)
        most = max(most, len(clock._sleepers))
        if i % 500 == 499:
            await clock.advance(1.0)
    await _cancel(tick)
    # The ticker and the cancelled timeouts since the last rebuild: at most about twice the live.
    assert most <= 4, most
    assert clock.next_deadline() is None


async def test_sleepers_wake_in_order_across_rebuilds() -> None:
    clock = VirtualClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    # Deadlines out of order, two at the same instant, and many cancelled around them so that
    # the heap is rebuilt several times while they wait.
    live = [("c", 30.0), ("a", 10.0), ("b1", 20.0), ("b2", 20.0), ("d", 40.0)]
    tasks = []
    for n, (name, seconds) in enumerate(live):
        tasks.append(asyncio.ensure_future(sleeper(name, seconds)))
        await asyncio.sleep(0)
        doomed = [asyncio.ensure_future(clock.sleep(5.0 + n)) for _ in range(50)]
        await asyncio.sleep(0)
        for t in doomed:
            await _cancel(t)
    assert len(clock._sleepers) < 2 * len(live) + 2
    await clock.advance(25.0)
    assert woke == ["a", "b1", "b2"]
    late = asyncio.ensure_future(clock.sleep(100.0))
    await asyncio.sleep(0)
    await _cancel(late)
    await clock.advance(100.0)
    assert woke == ["a", "b1", "b2", "c", "d"]
    await asyncio.gather(*tasks)
    assert clock.wakeups == len(live)
    assert clock.next_deadline() is None
