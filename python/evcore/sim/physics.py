"""Site physics: the true line currents of the simulated site, and the violations count.

Owns sampling the simulated chargers' terminal currents at least every 100 ms of (simulated) time,
summing them over the site file's topology with the core's exact phasor rules
(``evcore.checker.node_phase_currents``; no phasor math here) and counting every node-phase sample
above its limit. No averaging: one sample over a limit on one phase of one node is one violation.
This count is the "violations" figure of every benchmark and scenario.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from evcore.clock import Clock

F64 = npt.NDArray[np.float64]

#: Tolerance for float noise when comparing a line current with its limit (A).
LIMIT_EPS_A = 1e-6


class SitePhysics:
    """Samples ``terminal_currents()`` every ``period_s`` and counts node-phase limit violations."""

    def __init__(
        self,
        site: Any,
        terminal_currents: Callable[[], F64],
        *,
        clock: Clock,
        period_s: float = 0.1,
        other_load_a: Callable[[float], F64] | F64 | None = None,
    ) -> None:
        if not 0 < period_s <= 0.1:
            raise ValueError(
                f"period_s must be in (0, 0.1] (at least every 100 ms), got {period_s}"
            )
        self.site = site
        self.terminal_currents = terminal_currents
        self.clock = clock
        self.period_s = period_s
        self.other_load_a = other_load_a
        self.node_ids = [n.id for n in site.nodes]
        self.limits_a = np.array([n.phase_limit_a for n in site.nodes], dtype=np.float64)
        self.samples = 0
        self.violations = 0
        self.violations_by_node: dict[str, int] = dict.fromkeys(self.node_ids, 0)
        self.worst_excess_a = 0.0
        self.peak_a = np.zeros_like(self.limits_a)
        self._task: asyncio.Task[None] | None = None

    def _other(self, now: float) -> F64 | None:
        if self.other_load_a is None:
            return None
        if callable(self.other_load_a):
            return np.asarray(self.other_load_a(now), dtype=np.float64)
        return np.asarray(self.other_load_a, dtype=np.float64)

    def line_currents(self) -> F64:
        """(nodes, 3) line currents now, in site node order."""
        from evcore.checker import node_phase_currents

        terminal = np.ascontiguousarray(self.terminal_currents(), dtype=np.float64)
        return np.asarray(
            node_phase_currents(self.site, terminal, self._other(self.clock.now())),
            dtype=np.float64,
        )

    def sample(self) -> int:
        """Take one sample; returns how many node-phases were over their limit in it."""
        currents = self.line_currents()
        over = currents > self.limits_a + LIMIT_EPS_A
        n = int(over.sum())
        self.samples += 1
        np.maximum(self.peak_a, currents, out=self.peak_a)
        if n:
            self.violations += n
            for i in np.nonzero(over.any(axis=1))[0]:
                self.violations_by_node[self.node_ids[i]] += int(over[i].sum())
            self.worst_excess_a = max(
                self.worst_excess_a, float((currents - self.limits_a)[over].max())
            )
        return n

    async def run(self) -> None:
        while True:
            self.sample()
            await self.clock.sleep(self.period_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="site-physics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
