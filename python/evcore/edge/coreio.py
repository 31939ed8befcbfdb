"""The Rust allocator and envelope behind ``CorePort``: site state in, enforced setpoints out.

What this module owns: turning ``SiteState`` into the core's per-charger and per-node columns
(docs/envelope.md), calling ``evcore.allocator.allocate`` (which runs the envelope in the same
call), and reading back the setpoints and their reasons. Curtailments become a curtailed copy of the
topology (a node's ``power_limit_kw`` lowered, never raised), loaded and validated by the core. The
failsafe level is the core's fair-share allocation with every charger connected and asking for its
maximum, nothing measured (non-charger load at its configured maximum) on that topology.

What it must never do: compute, clamp or round a setpoint itself. Values pass through unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from evcore.edge import failsafe as failsafe_timing
from evcore.edge.config import EdgeConfig
from evcore.edge.faults import is_suspect
from evcore.edge.ports import EnforcedSetpoints
from evcore.edge.state import ChargerState, SiteState

F64 = npt.NDArray[np.float64]

# The core's weight range (allocator.rs PRIORITY_RANGE): a weight outside it fails the whole
# decision, so every priority is clamped into it here.
# A curtailment to 0 kW is modelled as this limit (the core rejects power_limit_kw <= 0).
MIN_CAP_KW = 1e-6
CORE_PRIORITY_MIN = 1e-6
CORE_PRIORITY_MAX = 1e6


def core_priority(priority: float, weight: float = 1.0) -> float:
    """A session's weight for the core, always inside the core's range (NaN counts as 1)."""
    w = priority * weight
    if not math.isfinite(w):
        w = CORE_PRIORITY_MAX if w == math.inf else 1.0
    return min(CORE_PRIORITY_MAX, max(CORE_PRIORITY_MIN, w))


def _allocate_fn() -> Any:
    """``evcore._core.allocate``: allocation and envelope in one Rust call (docs/envelope.md)."""
    from evcore._core import allocate

    return allocate


#: ``least_laxity``: a session with this much less laxity than another gets twice its weight (s).
LAXITY_DOUBLING_S = 1800.0


def _priority_from_laxity(chargers: Sequence[ChargerState], now_wall: float) -> dict[str, float]:
    """``least_laxity``: weights that favour the least laxity (the core still enforces everything).

    Laxity = time to departure − time needed at full rate. A session's weight doubles per
    ``LAXITY_DOUBLING_S`` of laxity it has less than the most lax session with a known departure
    (weight 1; so is a session whose departure or energy is not known), at most 2**19. Continuous
    in the laxities: weights by rank (2**(n-1) for the least lax, halving per rank) swapped at
    every overtaking, and the setpoints swung with them (twin, depot: 12,019 setpoints sent and 2
    sessions fewer met than with these weights, docs/twin.md).
    """
    lax: list[tuple[float, str]] = []
    for c in chargers:
        if c.departure is None or c.energy_requested_kwh is None:
            lax.append((math.inf, c.charger_id))
            continue
        remaining_kwh = max(0.0, c.energy_requested_kwh - c.session_energy_wh / 1000.0)
        # What the charger can give this car: its voltage and phases (a single-phase charger,
        # a 208 V site, a single-phase car seen on three phases), not 230 V on three phases.
        rate_kw = c.max_value * c.w_per_a_drawn() / 1000.0
        need_s = remaining_kwh / rate_kw * 3600.0 if rate_kw > 0 else math.inf
        lax.append((c.departure - now_wall - need_s, c.charger_id))
    finite = [x for x, _ in lax if math.isfinite(x)]
    top = max(finite, default=0.0)
    return {
        cid: 2.0 ** min(19.0, (top - x) / LAXITY_DOUBLING_S) if math.isfinite(x) else 1.0
        for x, cid in lax
    }  # core: <= 1e6


def inputs_digest(
    chargers: Mapping[str, Any],
    nodes: Mapping[str, Any],
    demand: Mapping[str, Any],
    params: Mapping[str, float],
    caps_kw: Mapping[str, float],
) -> str:
    """SHA-256 (hex) of everything a decision's core call was given: the per-charger state and
    demand columns, the node columns, the parameters and the curtailment caps (the audit
    contract's ``inputs_digest``). Each part is named in the hash, so that equal bytes under
    different columns give different digests."""
    h = hashlib.sha256()
    for part, cols in (("chargers", chargers), ("nodes", nodes), ("demand", demand)):
        for name in sorted(cols):
            v = cols[name]
            h.update(f"{part}.{name}:".encode())
            if isinstance(v, np.ndarray):
                h.update(str(v.dtype).encode())
                h.update(np.ascontiguousarray(v).tobytes())
            else:
                h.update("\x1f".join(map(str, v)).encode())
    for name, value in sorted(params.items()):
        h.update(f"params.{name}={float(value)!r};".encode())
    for node, cap in sorted(caps_kw.items()):
        h.update(f"cap.{node}={float(cap)!r};".encode())
    return h.hexdigest()


class RustCore:
    """``CorePort`` on ``evcore._core`` through the core room's typed facade.

    ``clock_offset_s(charger_id)``: how far that charger's station clock runs from the edge's (s;
    > 0 ahead, ``None`` unknown), e.g. ``CentralSystem.clock_offset_s``. A station ahead reaches
    the final (failsafe) period of its TxProfile that much before ``validTo`` by our clock, one
    behind holds the profile that much after it: both count so.
    """

    def __init__(
        self,
        site: Any,
        site_table: Mapping[str, Any],
        *,
        clock_offset_s: Callable[[str], float | None] | None = None,
    ) -> None:
        self._allocate = _allocate_fn()
        from evcore._core import RAISE_RAMP_S

        self._raise_ramp_s = float(RAISE_RAMP_S)
        self._clock_offset_s = clock_offset_s
        self._site = site
        self._site_table = dict(site_table)
        self._topologies: dict[tuple[tuple[str, float], ...], Any] = {(): site}
        self.charger_ids: list[str] = list(site.charger_ids)
        self.node_ids: list[str] = list(site.node_ids)
        self._index = {cid: i for i, cid in enumerate(self.charger_ids)}
        self._is_dc = np.array([site.charger(cid).kind == "dc" for cid in self.charger_ids])
        self._max_a = np.array([float(site.charger(cid).max_a) for cid in self.charger_ids])
        self.last_codes: dict[str, str] = {}
        self.last_nodes: dict[str, str] = {}

    # ---- topology under curtailments -----------------------------------------------------------
    def topology(self, caps_kw: Mapping[str, float]) -> Any:
        key = tuple(sorted(caps_kw.items()))
        topo = self._topologies.get(key)
        if topo is None:
            from evcore.site import load_site

            table = copy.deepcopy(self._site_table)
            for node in table.get("nodes", []):
                cap = caps_kw.get(node.get("id"))
                if cap is not None:
                    # The core's topology needs a positive limit; a curtailment to 0 kW becomes
                    # one too small for any charger's minimum, so everything under it gets 0.
                    cap = max(cap, MIN_CAP_KW)
                    old = node.get("power_limit_kw")
                    node["power_limit_kw"] = cap if old is None else min(float(old), cap)
            topo = load_site(table)
            if len(self._topologies) > 64:
                self._topologies = {(): self._site}
            self._topologies[key] = topo
        return topo

    # ---- columns --------------------------------------------------------------------------------
    def _columns(
        self,
        state: SiteState,
        *,
        now_mono: float,
        failsafe: Mapping[str, float],
        requested: Mapping[str, float],
        now_wall: float,
        cfg: EdgeConfig,
        ignoring: Collection[str] = (),
    ) -> dict[str, Any]:
        n = len(self.charger_ids)
        nan = math.nan
        cols: dict[str, Any] = {
            "charger_id": self.charger_ids,
            "requested_a": np.zeros(n),
            "requested_w": np.zeros(n),
            "measured_l1_a": np.full(n, nan),
            "measured_l2_a": np.full(n, nan),
            "measured_l3_a": np.full(n, nan),
            "measured_age_s": np.full(n, math.inf),
            "last_sent_a": np.full(n, nan),
            "last_sent_w": np.full(n, nan),
            "last_sent_confirmed": np.zeros(n, dtype=bool),
            "connected": np.zeros(n, dtype=bool),
            "faulted": np.zeros(n, dtype=bool),
            "profile_unknown": np.zeros(n, dtype=bool),
            "on_since_s": np.full(n, nan),
            "off_since_s": np.full(n, nan),
            "switches": np.zeros(n),
        }
        for i, cid in enumerate(self.charger_ids):
            c = state.chargers[cid]
            active = c.demand_active and c.transaction_id is not None
            cols["connected"][i] = active
            cols["faulted"][i] = c.faulted
            req = requested.get(cid, 0.0) if active else 0.0
            cols["requested_w" if c.is_dc else "requested_a"][i] = req
            if c.measured_at is not None:
                cols["measured_age_s"][i] = max(0.0, now_mono - c.measured_at)
                for k, v in enumerate(c.terminal_a):
                    if v is not None:
                        cols[f"measured_l{k + 1}_a"][i] = v
            unit = "last_sent_w" if c.is_dc else "last_sent_a"
            # Unknown (edge start, boot): counted at the charger's maximum by the envelope. So is
            # a session that started while its charger's first TxDefault of ours may not be
            # applied: its car may draw the charger's maximum until then (idle: ``idle_level``).
            cols["profile_unknown"][i] = (
                c.profile_unknown
                or cid in ignoring
                # A stale TxDefault may hold it (unseen under its last session): until a
                # TxProfile of ours holds this session, its car may draw up to its maximum.
                or (c.transaction_id is not None and c.default_unknown and not c.tx_profile_held)
                or (
                    c.transaction_id is not None
                    and c.session_in_gap
                    and c.default_unapplied(now_mono)
                )
            )
            fs_level = failsafe.get(cid, 0.0)
            # The station's own clock decides when its profile ends: one running ahead falls back
            # (or a paused one rises) to the final level before validTo by ours, one behind after.
            offset = self._clock_offset_s(cid) if self._clock_offset_s is not None else None
            lead_s, lag_s = failsafe_timing.lead_lag(offset)
            in_force = (
                c.transaction_id is not None
                and c.expires_at is not None
                and now_wall < c.expires_at + lag_s + cfg.fallback_guard_s
            )
            if active or in_force:
                # Online: what it was last sent counts once accepted. Until then (a decrease on
                # its way, rejected or unanswered; a re-send after a reconnect) the higher of that
                # and what it held before. Offline with its TxProfile still in force (H1): the
                # highest it may hold, never less than the failsafe level it falls back to.
                confirmed = active and c.accepted and not c.needs_resend
                held = [v for v in (c.sent, c.holding) if v is not None]
                if not active:
                    held += [fs_level, c.tx_default or 0.0]
                value: float = nan
                if confirmed and c.sent is not None:
                    value = c.sent
                elif held:
                    value = max(held)
                replaced = c.replaced_default(now_mono)
                if replaced is not None and (c.expires_at is None or not confirmed):
                    # No TxProfile of this session accepted: the car is held by its TxDefault,
                    # and a lowered one accepted less than settle_s ago may not be applied yet.
                    value = replaced if math.isnan(value) else max(value, replaced)
                    confirmed = False
                if active and not c.tx_profile_held:
                    # Held by its TxDefault alone: by the one it holds, one on its way (a raise
                    # that left while it was idle reaches the car once accepted: F2 of the
                    # 2026-12-05 review) or one it replaced still settling (above).
                    bound = max(
                        (v for v in (c.tx_default, c.tx_default_sent) if v is not None),
                        default=math.nan,
                    )
                    if not math.isnan(bound) and (math.isnan(value) or bound > value + 1e-9):
                        value = bound
                        confirmed = False
                # A refresh that is due and not accepted: the profile ends in its final level at
                # validTo (a paused one rises to it). Until then it holds what it was sent, so
                # the final level counts from one decision (tick + guard) before validTo. Counting
                # it from the refresh instant held every paused charger's failsafe level in
                # reserve for the whole refresh lead and starved the others (the twin's depot
                # delivered 40 % less). All by the station's clock (``lead_s``).
                station_now = now_wall + lead_s
                if (
                    c.expires_at is not None
                    and c.sent is not None
                    and c.final_level is not None
                    and station_now
                    >= failsafe_timing.refresh_at(c.expires_at, c.sent, fs_level, cfg)
                    and station_now >= c.expires_at - cfg.fallback_guard_s - cfg.tick_s
                ):
                    value = max(value, c.final_level) if not math.isnan(value) else c.final_level
                    confirmed = False
                cols[unit][i] = value
                cols["last_sent_confirmed"][i] = confirmed
            else:
                # Idle: the charger may start drawing its TxDefault (failsafe) level at any moment,
                # before the edge hears of the car. Count it there ("unconfirmed" = held), or at
                # a TxDefault still on its way (or accepted lower but maybe not yet applied), or
                # at what it reported it enforces. One that
                # never accepted a TxDefault of ours (and reported nothing), or whose first one
                # may not be applied yet, may let a car draw its maximum (M3).
                cols[unit][i] = c.idle_level(fs_level, now_mono)
                cols["last_sent_confirmed"][i] = False
            if c.on_since is not None:
                cols["on_since_s"][i] = c.on_since
            if c.off_since is not None:
                cols["off_since_s"][i] = c.off_since
            cols["switches"][i] = float(c.switches)
        return cols

    def _nodes(self, state: SiteState, now_mono: float) -> dict[str, Any]:
        nn = len(self.node_ids)
        cols: dict[str, Any] = {
            "node_id": self.node_ids,
            "other_load_l1_a": np.full(nn, math.nan),
            "other_load_l2_a": np.full(nn, math.nan),
            "other_load_l3_a": np.full(nn, math.nan),
            "other_load_age_s": np.full(nn, math.inf),
        }
        for j, nid in enumerate(self.node_ids):
            got = state.other_load_a.get(nid)
            if got is not None:
                (l1, l2, l3), at = got
                cols["other_load_l1_a"][j] = l1
                cols["other_load_l2_a"][j] = l2
                cols["other_load_l3_a"][j] = l3
                cols["other_load_age_s"][j] = max(0.0, now_mono - at)
        return cols

    def _call(
        self,
        topo: Any,
        chargers: dict[str, Any],
        nodes: dict[str, Any],
        demand: dict[str, Any],
        params: dict[str, float],
        explain: bool,
    ) -> tuple[dict[str, float], dict[str, str]]:
        batch = pa.RecordBatch.from_pydict({**chargers, **demand})
        node_batch = pa.RecordBatch.from_pydict(nodes)
        result = self._allocate(topo.topology, batch, node_batch, params=params, explain=explain)
        setpoint_a = np.asarray(result.column("setpoint_a"), dtype=np.float64)
        setpoint_w = np.asarray(result.column("setpoint_w"), dtype=np.float64)
        reasons = result.column("reason").to_pylist() if explain else None
        out: dict[str, float] = {}
        why: dict[str, str] = {}
        for i, cid in enumerate(self.charger_ids):
            out[cid] = float(setpoint_w[i] if self._is_dc[i] else setpoint_a[i])
            if reasons is not None:
                why[cid] = str(reasons[i])
        self.last_codes = dict(
            zip(self.charger_ids, result.column("binding").to_pylist(), strict=True)
        )
        self.last_nodes = {
            cid: node
            for cid, node in zip(
                self.charger_ids, result.column("binding_node").to_pylist(), strict=True
            )
            if node
        }
        return out, why

    # ---- CorePort -------------------------------------------------------------------------------
    def decide(
        self,
        state: SiteState,
        *,
        now_wall: float,
        now_mono: float,
        caps_kw: Mapping[str, float],
        targets: Mapping[str, float] | None,
        failsafe: Mapping[str, float],
        cfg: EdgeConfig,
        behind_plan: Collection[str] = (),
    ) -> EnforcedSetpoints:
        n = len(self.charger_ids)
        chargers = [state.chargers[cid] for cid in self.charger_ids]
        requested = {c.charger_id: c.max_value for c in chargers}
        # One that keeps ignoring its profile (suspect) or is faulted may draw anything up to
        # its maximum, whatever it is told: the core counts it there, like an unknown profile.
        ignoring = {c.charger_id for c in chargers if c.faulted or is_suspect(c, now_mono, cfg)}
        cols = self._columns(
            state,
            now_mono=now_mono,
            failsafe=failsafe,
            requested=requested,
            now_wall=now_wall,
            cfg=cfg,
            ignoring=ignoring,
        )
        nodes = self._nodes(state, now_mono)
        weights = _priority_from_laxity(chargers, now_wall) if cfg.policy == "least_laxity" else {}
        demand: dict[str, Any] = {
            "charger_id": self.charger_ids,
            "energy_wanted_kwh": np.full(n, math.inf),
            "departure_s": np.full(n, math.nan),
            "priority": np.ones(n),
            "target_a": np.full(n, math.nan),
            "target_w": np.full(n, math.nan),
            "behind_plan": np.zeros(n, dtype=bool),
            "read_under_a": np.full(n, math.nan),
            "read_under_w": np.full(n, math.nan),
        }
        for i, c in enumerate(chargers):
            # The setpoint its reading was taken under: the lowest in force over the time a car
            # takes to follow a raise (a reading right after one may show the car on its way).
            if c.measured_at is not None:
                under = c.lowest_sent(c.measured_at - self._raise_ramp_s, c.measured_at)
                if under is not None:
                    demand["read_under_w" if c.is_dc else "read_under_a"][i] = under
            if c.energy_requested_kwh is not None:
                demand["energy_wanted_kwh"][i] = max(
                    0.0, c.energy_requested_kwh - c.session_energy_wh / 1000.0
                )
            if c.departure is not None:
                # The core's clock for departures is the monotonic one of this decision.
                demand["departure_s"][i] = now_mono + (c.departure - now_wall)
            demand["priority"][i] = core_priority(c.priority, weights.get(c.charger_id, 1.0))
            if targets is not None and c.charger_id in targets:
                demand["target_w" if c.is_dc else "target_a"][i] = targets[c.charger_id]
                demand["behind_plan"][i] = c.charger_id in behind_plan
        params = {
            "now_s": now_mono,
            "stale_after_s": cfg.stale_after_s,
            "min_on_s": cfg.min_on_s,
            "min_off_s": cfg.min_off_s,
            "max_switches": float(cfg.max_switches),
            "margin_a": cfg.reclaim_margin_a,
            "reclaim_ramp_s": cfg.reclaim_ramp_s,
        }
        setpoints, why = self._call(self.topology(caps_kw), cols, nodes, demand, params, True)
        digest = inputs_digest(cols, nodes, demand, params, caps_kw)
        return EnforcedSetpoints(setpoints, why, digest, self.last_codes, self.last_nodes)

    def failsafe_levels(
        self,
        caps_kw: Mapping[str, float],
        *,
        at_max: Collection[str] = (),
        held: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Fair shares of every charger asking its maximum (no measurements, non-charger load at
        its maximum); a charger in ``at_max`` is counted at its maximum (as one whose profile is
        unknown: it may not obey our TxDefault), so the others' levels fit beside it; one in
        ``held`` at least at that level (charger unit: A, DC W; what it may still hold, as a
        setpoint sent and not confirmed lower)."""
        n = len(self.charger_ids)
        nan = math.nan
        last_a = np.zeros(n)
        last_w = np.zeros(n)
        for cid, value in (held or {}).items():
            i = self._index.get(cid)
            if i is not None:
                (last_w if self._is_dc[i] else last_a)[i] = value
        cols: dict[str, Any] = {
            "charger_id": self.charger_ids,
            "requested_a": self._max_a.copy(),
            "requested_w": np.array(
                [
                    float(self._site.charger(cid).max_w) if self._is_dc[i] else 0.0
                    for i, cid in enumerate(self.charger_ids)
                ]
            ),
            "measured_l1_a": np.full(n, nan),
            "measured_l2_a": np.full(n, nan),
            "measured_l3_a": np.full(n, nan),
            "measured_age_s": np.full(n, math.inf),
            "last_sent_a": last_a,
            "last_sent_w": last_w,
            "last_sent_confirmed": np.array(
                [cid not in (held or {}) for cid in self.charger_ids], dtype=bool
            ),
            "connected": np.ones(n, dtype=bool),
            "faulted": np.zeros(n, dtype=bool),
            "profile_unknown": np.array([cid in at_max for cid in self.charger_ids], dtype=bool),
            "on_since_s": np.full(n, nan),
            "off_since_s": np.full(n, nan),
            "switches": np.zeros(n),
        }
        nn = len(self.node_ids)
        nodes: dict[str, Any] = {
            "node_id": self.node_ids,
            "other_load_l1_a": np.full(nn, nan),
            "other_load_l2_a": np.full(nn, nan),
            "other_load_l3_a": np.full(nn, nan),
            "other_load_age_s": np.full(nn, math.inf),
        }
        demand: dict[str, Any] = {
            "charger_id": self.charger_ids,
            "energy_wanted_kwh": np.full(n, math.inf),
            "departure_s": np.full(n, nan),
            "priority": np.ones(n),
            "target_a": np.full(n, nan),
            "target_w": np.full(n, nan),
            "behind_plan": np.zeros(n, dtype=bool),
        }
        params = {"now_s": 0.0, "stale_after_s": 0.0}
        levels, _ = self._call(self.topology(caps_kw), cols, nodes, demand, params, False)
        return levels
