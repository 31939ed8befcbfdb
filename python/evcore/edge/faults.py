"""Detecting a charger that ignores its profile, from its meter values.

What this module owns: the overdrawing → suspect → faulted state machine. A charger whose measured
current is above every limit it may still have been applying (a lowered one gets ``settle_s`` to
take effect) by more than ``ignore_threshold_a`` (DC: its AC input against setpoint / efficiency +
aux_w, in W, the threshold at 3 × its line-to-neutral voltage)
is overdrawing: ``suspect_since`` is set and the allocator may no longer raise it. After
``ignore_after_s`` of that it is *suspect*: counted at its maximum, like a charger whose profile is
unknown. After ``fault_after_s`` more it is *faulted* and reported. Covering its load is not done
here: the envelope counts every charger at least at its fresh measurement, and ``coreio`` passes a
suspect or faulted charger to the core as unknown, so the others are reduced in the decision that
sees it.
"""

from __future__ import annotations

from enum import StrEnum

from evcore.edge.config import EdgeConfig
from evcore.edge.state import ChargerState


def dc_input_w(c: ChargerState, setpoint_w: float) -> float:
    """The AC input (W) a DC charger may draw at ``setpoint_w``: with its efficiency and
    auxiliary load (site file ``efficiency``, ``aux_w``); meters measure the input."""
    return setpoint_w / c.dc_efficiency + c.dc_aux_w


def threshold(c: ChargerState, cfg: EdgeConfig) -> float:
    """``ignore_threshold_a`` in the charger's unit (DC: W, at its own voltage)."""
    return cfg.ignore_threshold_a * (c.dc_w_per_a if c.is_dc else 1.0)


class FaultChange(StrEnum):
    SUSPECT = "suspect"
    FAULTED = "faulted"
    CLEARED = "cleared"


def overdraw(c: ChargerState, settle_s: float) -> float | None:
    """How far the latest measurement is above every limit the charger may still have been
    applying when it was taken (A or W); None when unknown or not yet judgeable."""
    if c.measured_at is None:
        return None
    bound = c.allowed_bound(c.measured_at, settle_s)
    if bound is None:
        return None
    if c.is_dc:
        return None if c.measured_w is None else c.measured_w - dc_input_w(c, bound)
    m = c.measured_max_a()
    return None if m is None else m - bound


def check_ignored(c: ChargerState, now_mono: float, cfg: EdgeConfig) -> FaultChange | None:
    """Advance ``c``'s suspect/faulted state from its latest measurement; return what changed.

    The measurement is compared with the highest limit the charger may still have been applying
    (``ChargerState.allowed_bound``), so a decrease gets ``settle_s`` to take effect and a later
    raise of the setpoint does not hide an overdraw measured before it.
    """
    if c.faulted:
        return None
    over = overdraw(c, cfg.settle_s)
    if over is None or over <= threshold(c, cfg):
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
        unit = "W" if c.is_dc else "A"
        bound = c.allowed_bound(c.measured_at or now_mono, cfg.settle_s) or 0.0
        c.fault_reason = (
            f"ignores its profile: draws {over + bound:.1f} {unit} against an accepted "
            f"{bound:.1f} {unit} for {held_for:.0f} s"
        )
        return FaultChange.FAULTED
    return None


def draws_above_limit(c: ChargerState, now_mono: float, cfg: EdgeConfig) -> bool:
    """A fresh measurement above the limit the charger holds now, by more than the threshold.

    Not a judgement (the limit may have been lowered a moment ago): the allocator just must not
    raise such a charger to meet its draw, which would hide an overdraw before it can be judged.
    """
    if c.holding is None or c.measured_at is None or now_mono - c.measured_at > cfg.stale_after_s:
        return False
    if c.is_dc:
        return c.measured_w is not None and c.measured_w > dc_input_w(c, c.holding) + threshold(
            c, cfg
        )
    m = c.measured_max_a()
    return m is not None and m > c.holding + cfg.ignore_threshold_a


def is_suspect(c: ChargerState, now_mono: float, cfg: EdgeConfig) -> bool:
    return c.suspect_since is not None and now_mono - c.suspect_since >= cfg.ignore_after_s
