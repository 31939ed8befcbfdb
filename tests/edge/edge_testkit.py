"""Shared by the edge tests: an edge configuration that acts within seconds (the rig's stations
answer at once and apply profiles within about a second)."""

from __future__ import annotations

from typing import Any

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
