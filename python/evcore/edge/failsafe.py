"""When profiles fall back to the failsafe level, and when they must be refreshed.

What this module owns: the timing of the failsafe. Every TxProfile the edge sends carries a
``validTo`` (and a final period at the failsafe level), so a charger whose controller died falls
back to its TxDefaultProfile level on its own. The *level* itself comes from the core (see
``coreio.failsafe_levels``): the failsafe level is never computed here.

Expiries are shared: all TxProfiles end on common instants, spaced ``failsafe_after_s -
refresh_lead_s - fallback_guard_s`` apart. If the edge dies, every charger therefore falls to its
failsafe level at the same instant, and a set of chargers that each fit only "all at failsafe" is
never mixed with others still at a higher TxProfile value. Chargers whose profile *rises* at expiry
(paused ones, below their failsafe level) get their expiry ``fallback_guard_s`` later than the ones
that fall, so the rise never overlaps the fall. A profile therefore ends at most
``failsafe_after_s`` after it left.
"""

from __future__ import annotations

import math

from evcore.edge.config import EdgeConfig


def spacing_s(cfg: EdgeConfig) -> float:
    """Distance between shared expiry instants."""
    return cfg.failsafe_after_s - cfg.refresh_lead_s - cfg.fallback_guard_s


def base_expiry(now: float, cfg: EdgeConfig) -> float:
    """The first shared expiry instant more than ``refresh_lead_s`` after ``now`` (UTC seconds).

    A profile sent at ``now`` is refreshed at ``base_expiry - refresh_lead_s`` (strictly later than
    ``now``), and ``base_expiry - now <= spacing + refresh_lead_s``.
    """
    step = spacing_s(cfg)
    k = math.floor((now + cfg.refresh_lead_s) / step) + 1
    return k * step


def valid_to(now: float, setpoint: float, failsafe_level: float, cfg: EdgeConfig) -> float:
    """``validTo`` for a TxProfile at ``setpoint`` sent at ``now`` (both in the charger's unit)."""
    expiry = base_expiry(now, cfg)
    if setpoint < failsafe_level:
        # Rises at expiry: after every other charger has fallen.
        return expiry + cfg.fallback_guard_s
    return expiry


def refresh_at(expires_at: float, setpoint: float, failsafe_level: float, cfg: EdgeConfig) -> float:
    """When a profile expiring at ``expires_at`` must be re-sent (UTC seconds)."""
    base = expires_at - cfg.fallback_guard_s if setpoint < failsafe_level else expires_at
    return base - cfg.refresh_lead_s


def horizon_s(cfg: EdgeConfig) -> float:
    """How far ahead a failsafe level must hold: a profile sent now ends at most this much later."""
    return cfg.failsafe_after_s + cfg.curtail_lead_s


def lead_lag(offset_s: float | None) -> tuple[float, float]:
    """A station clock's offset from ours (s, ahead > 0; None: not known) as how far it runs
    ahead and how far behind (each >= 0; both 0 when not known)."""
    if offset_s is None:
        return 0.0, 0.0
    return max(0.0, offset_s), max(0.0, -offset_s)
