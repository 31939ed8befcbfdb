"""Detecting a charger that ignores its profile, from its meter values.

What this module owns: the suspect → faulted state machine. A charger whose measured current stays
above its accepted setpoint by more than ``ignore_threshold_a`` (DC: ``ignore_threshold_a`` × its
watts per ampere is not known here, so DC compares in W against ``ignore_threshold_a`` × 230 × 3)
for ``ignore_after_s`` after the profile had ``settle_s`` to take effect becomes *suspect*; after
``fault_after_s`` more it is *faulted* and reported. Covering its load is not done here: the
envelope counts every charger at least at its fresh measurement (and a faulted one as the core
says), so the others are reduced in the same decision that sees the measurement.
"""

from __future__ import annotations

from enum import StrEnum

from evcore.edge.config import EdgeConfig
from evcore.edge.state import ChargerState

# DC chargers are compared in W; a rough three-phase 230 V equivalent of the ampere threshold.
_DC_W_PER_A = 3 * 230.0


class FaultChange(StrEnum):
    SUSPECT = "suspect"
    FAULTED = "faulted"
    CLEARED = "cleared"


def overdraw(c: ChargerState) -> float | None:
    """How far the measured draw is above the accepted setpoint (A or W), None if unknown."""
    if c.holding is None or c.measured_at is None:
        return None
    if c.is_dc:
        return None if c.measured_w is None else c.measured_w - c.holding
    m = c.measured_max_a()
    return None if m is None else m - c.holding


def check_ignored(c: ChargerState, now_mono: float, cfg: EdgeConfig) -> FaultChange | None:
    """Advance ``c``'s suspect/faulted state from its latest measurement; return what changed."""
    if c.faulted:
        return None
    settled = (
        c.accepted
        and c.sent_at is not None
        and now_mono - c.sent_at >= cfg.settle_s
        and c.measured_at is not None
        and c.measured_at >= c.sent_at + cfg.settle_s
    )
    over = overdraw(c) if settled else None
    threshold = cfg.ignore_threshold_a * (_DC_W_PER_A if c.is_dc else 1.0)
    if over is None or over <= threshold:
        if c.suspect_since is not None:
            c.suspect_since = None
            return FaultChange.CLEARED
        return None
    if c.suspect_since is None:
        c.suspect_since = now_mono
        return FaultChange.SUSPECT
    held_for = now_mono - c.suspect_since
    if held_for >= cfg.ignore_after_s + cfg.fault_after_s:
        c.faulted = True
        c.fault_reason = (
            f"ignores its profile: draws {over + (c.holding or 0.0):.1f} against an accepted "
            f"{c.holding:.1f} for {held_for:.0f} s"
        )
        return FaultChange.FAULTED
    return None


def is_suspect(c: ChargerState, now_mono: float, cfg: EdgeConfig) -> bool:
    return c.suspect_since is not None and now_mono - c.suspect_since >= cfg.ignore_after_s
