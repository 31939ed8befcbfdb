"""Shared by the edge tests: an edge configuration that acts within seconds (the rig's stations
answer at once and apply profiles within about a second)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from evcore.clock import StepClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.coreio import RustCore
from evcore.site import load_site

FAST: dict[str, Any] = dict(
    tick_s=0.5,
    settle_s=3.0,
    failsafe_after_s=40.0,
    refresh_lead_s=10.0,
    fallback_guard_s=5.0,
    curtail_lead_s=3.0,
    min_on_s=0.0,
    min_off_s=0.0,
)


def stepped_controller(
    table: Mapping[str, Any], gateway: Any, **kwargs: Any
) -> tuple[EdgeController, StepClock]:
    """An edge controller on the Rust core (``core=`` another) over the site ``table``, on a
    step clock, with ``FAST`` timings (``cfg=EdgeConfig(...)`` others) and every charger
    online; other keyword arguments go to ``build_controller``."""
    clock = StepClock()
    cfg = kwargs.pop("cfg", None) or EdgeConfig(**FAST)
    core = kwargs.pop("core", None) or RustCore(load_site(table), table)
    ctrl = build_controller(
        table,
        core=core,
        gateway=gateway,
        clock=clock,
        cfg=cfg,
        **kwargs,
    )
    for c in ctrl.state.chargers.values():
        c.online = True
    return ctrl, clock


async def settle(ctrl: EdgeController, clock: StepClock, rounds: int = 4) -> None:
    """Decide, let the answers arrive, advance past ``settle_s``; ``rounds`` times."""
    for _ in range(rounds):
        await ctrl.decide("test")
        await asyncio.sleep(0)
        if ctrl._sends:
            await asyncio.gather(*ctrl._sends)
        clock.advance(ctrl.cfg.settle_s + 0.1)
