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


class GatewayAnswer:
    def __init__(self, accepted: bool) -> None:
        self.accepted = accepted


class ToldGateway:
    """A gateway double: answers each profile at once (Accepted), but for the purposes in
    ``reject`` (Rejected) and in ``hold`` (answered by ``release``; never, if not released).
    ``calls`` keeps every ``(charger_id, kwargs)`` in order."""

    def __init__(self) -> None:
        self.reject: set[str] = set()
        self.hold: set[str] = set()
        self.waiting: list[asyncio.Future[bool]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> GatewayAnswer:
        self.calls.append((charger_id, kwargs))
        purpose = kwargs["purpose"]
        if purpose in self.reject:
            return GatewayAnswer(False)
        if purpose in self.hold:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.waiting.append(fut)
            return GatewayAnswer(await fut)
        return GatewayAnswer(True)

    def release(self, accepted: bool = True) -> None:
        for fut in self.waiting:
            if not fut.done():
                fut.set_result(accepted)
        self.waiting.clear()
