"""A plain numpy implementation of the allocator's model, admission and water-filling.

It exists to check and time the Rust allocator from outside (benchmark and tests), so it shares
no code with it: the same rules (docs/envelope.md), written with vectorised numpy. The result to
compare is ``level_a`` (the water-filling value before steps and envelope) and ``admitted``.
Each filling round solves every constraint's saturation level exactly from its members' sorted
breakpoints; constraints whose level is the lowest among their members' constraints saturate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evcore.site import Site

__all__ = ["ReferenceResult", "SiteArrays", "fairness_violations", "reference_allocate"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
SLOTS = 4
# Headroom reclaim, as allocator.rs: a reading taken less than this long after the session turned
# on may show the car still ramping up; it does not cap the session (s).
RECLAIM_RAMP_S = 30.0
# A car that takes all it is given may be offered this many times its draw (allocator.rs).
PROBE_GROWTH = 2.0


@dataclass
class SiteArrays:
    """Static structure of a site as flat arrays (build once per site)."""

    n: int
    n_nodes: int
    nt: I64
    uses: npt.NDArray[np.bool_]  # (n, 3) charger touches site phase
    volt: F64
    dc: npt.NDArray[np.bool_]
    min_a: F64
    max_a: F64
    max_w: F64
    eff: F64
    aux: F64
    parent_of_node: I64
    node_order: I64
    # constraint membership pairs: charger, constraint index (node*4+slot), coefficient
    pc: I64
    pk: I64
    pa: F64
    phase_limit: F64  # (n_nodes, 3)
    kw_limit: F64  # (n_nodes,), inf when none
    other_max: F64  # (n_nodes, 3)
    v_ln: float
    parent_of_charger: I64
    node_depth: I64
    # phasor coefficient of a charger's per-terminal current on each site line (unity power
    # factor, balanced voltages at 0°, −120°, +120°)
    line_coef: npt.NDArray[np.complex128]  # (n, 3)
    node_l2l: npt.NDArray[np.bool_]  # a line-to-line charger below the node
    has_unbalance: npt.NDArray[np.bool_]  # the node has an unbalance cap

    @classmethod
    def build(cls, site: Site) -> SiteArrays:
        n, nn = len(site.chargers), len(site.nodes)
        nidx = {x.id: i for i, x in enumerate(site.nodes)}
        parent = np.array([-1 if x.parent is None else nidx[x.parent] for x in site.nodes])
        depth = np.array([x.depth for x in site.nodes])
        uses = np.zeros((n, 3), dtype=bool)
        for i, c in enumerate(site.chargers):
            uses[i, list(c.phases)] = True
        nt = np.array([3 if c.wiring == "three_phase" else 1 for c in site.chargers])
        volt = np.array([c.voltage_v for c in site.chargers])
        pcs: list[int] = []
        pks: list[int] = []
        pas: list[float] = []
        unit = np.exp(1j * np.array([0.0, -2.0 * np.pi / 3.0, 2.0 * np.pi / 3.0]))
        line_coef = np.zeros((n, 3), dtype=np.complex128)
        node_l2l = np.zeros(nn, dtype=bool)
        for i, c in enumerate(site.chargers):
            if c.wiring == "line_to_line":
                a, b = c.phases
                d = unit[a] - unit[b]
                line_coef[i, a] += d / abs(d)
                line_coef[i, b] -= d / abs(d)
            else:
                for p in c.phases:
                    line_coef[i, p] += unit[p]
            cur = nidx[c.parent]
            while cur >= 0:
                if c.wiring == "line_to_line":
                    node_l2l[cur] = True
                for p in range(3):
                    if uses[i, p]:
                        pcs.append(i)
                        pks.append(cur * SLOTS + p)
                        pas.append(1.0)
                pcs.append(i)
                pks.append(cur * SLOTS + 3)
                pas.append(float(volt[i] * nt[i]))
                cur = int(parent[cur])
        return cls(
            n=n,
            n_nodes=nn,
            nt=nt,
            uses=uses,
            volt=volt,
            dc=np.array([c.kind == "dc" for c in site.chargers]),
            min_a=np.array([c.min_a for c in site.chargers]),
            max_a=np.array([c.max_a for c in site.chargers]),
            max_w=np.array([c.max_w or 0.0 for c in site.chargers]),
            eff=np.array([c.efficiency or 1.0 for c in site.chargers]),
            aux=np.array([c.aux_w or 0.0 for c in site.chargers]),
            parent_of_node=parent,
            node_order=np.argsort(depth, kind="stable"),
            pc=np.array(pcs, dtype=np.int64),
            pk=np.array(pks, dtype=np.int64),
            pa=np.array(pas),
            phase_limit=np.array([x.phase_limit_a for x in site.nodes], dtype=np.float64),
            kw_limit=np.array(
                [math.inf if x.power_limit_kw is None else x.power_limit_kw for x in site.nodes]
            ),
            other_max=np.array([x.other_load_max_a for x in site.nodes], dtype=np.float64),
            v_ln=site.voltage_ln_v,
            parent_of_charger=np.array([nidx[c.parent] for c in site.chargers], dtype=np.int64),
            node_depth=depth.astype(np.int64),
            line_coef=line_coef,
            node_l2l=node_l2l,
            has_unbalance=np.array([x.unbalance_limit_a is not None for x in site.nodes]),
        )

    def dc_line_a(self, w: F64) -> F64:
        out: F64 = np.where(w > 0, (w / self.eff + self.aux) / (3.0 * self.volt), 0.0)
        return out


@dataclass
class ReferenceResult:
    level_a: F64
    raised_a: F64  # after the raise pass to the exact phasor limits (before steps and envelope)
    admitted: npt.NDArray[np.bool_]
    floor: F64
    cap: F64
    weight: F64
    capacity: F64  # per constraint (node*4+slot), net of non-admitted holdings
    held: F64  # per charger: counted regardless of its new setpoint (line A, max over terminals)
    capacity_gross: F64  # per constraint, net of non-charger load only
    held_counted: F64  # per charger: what the envelope counts it at whatever its setpoint


def _col(cols: Mapping[str, npt.ArrayLike], name: str) -> F64:
    return np.asarray(cols[name], dtype=np.float64)


def reference_allocate(
    sa: SiteArrays,
    ch: Mapping[str, npt.ArrayLike],
    nodes: Mapping[str, npt.ArrayLike],
    params: Mapping[str, float],
) -> ReferenceResult:
    n = sa.n
    now = params.get("now_s", 0.0)
    stale = params.get("stale_after_s", 60.0)
    min_on = params.get("min_on_s", 60.0)
    min_off = params.get("min_off_s", 180.0)
    max_sw = params.get("max_switches", math.inf)
    margin = params.get("margin_a", 2.0)
    hyst = params.get("admission_hysteresis_s", 300.0)
    ramp_s = params.get("reclaim_ramp_s", RECLAIM_RAMP_S)
    with np.errstate(invalid="ignore"):
        # Counting: what each charger holds regardless of its new setpoint (max over terminals).
        age = _col(ch, "measured_age_s")
        fresh = np.isfinite(age) & (age >= 0) & (age <= stale)
        meas = np.stack([_col(ch, f"measured_l{k}_a") for k in (1, 2, 3)], axis=1)
        meas = np.where(np.isnan(meas), sa.max_a[:, None], np.abs(meas))
        term_mask = np.arange(3)[None, :] < sa.nt[:, None]
        meas_max = np.where(term_mask, meas, 0.0).max(axis=1)
        held = np.where(fresh, meas_max, 0.0)
        ls_w = _col(ch, "last_sent_w")
        ls = np.where(
            sa.dc,
            np.where(np.isnan(ls_w), np.nan, sa.dc_line_a(np.minimum(ls_w, sa.max_w))),
            _col(ch, "last_sent_a"),
        )
        ls = np.where(np.isnan(ls), sa.max_a, np.maximum(ls, 0.0))
        confirmed = np.asarray(ch["last_sent_confirmed"], dtype=bool)
        held = np.where(confirmed, held, np.maximum(held, ls))
        unknown = np.asarray(ch["profile_unknown"], dtype=bool)
        # Unknown profile state: its maximum, or a fresh reading above it.
        held = np.where(unknown, np.maximum(sa.max_a, np.where(fresh, meas_max, 0.0)), held)
        held_counted = held
        # What it holds even when it follows its new setpoint (its own measurement left out).
        held_cmd = np.where(unknown, held, np.where(confirmed, 0.0, ls))
        # Node non-charger load and capacities.
        nage = _col(nodes, "other_load_age_s")
        nfresh = np.isfinite(nage) & (nage >= 0) & (nage <= stale)
        other_m = np.stack([_col(nodes, f"other_load_l{k}_a") for k in (1, 2, 3)], axis=1)
        other_m = np.where(np.isnan(other_m), sa.other_max, np.maximum(other_m, 0.0))
        other = np.where(nfresh[:, None], other_m, sa.other_max)
        sub = other.copy()
        for i in sa.node_order[::-1]:
            p = sa.parent_of_node[i]
            if p >= 0:
                sub[p] += sub[i]
        capacity = np.empty(sa.n_nodes * SLOTS)
        capacity.reshape(-1, SLOTS)[:, :3] = sa.phase_limit - sub
        capacity.reshape(-1, SLOTS)[:, 3] = sa.kw_limit * 1000.0 - sub.sum(axis=1) * sa.v_ln

        # Where what is held alone is over a phase or kW limit (chargers measured above it; exact
        # line currents, by more than 1e-9, at a node without an unbalance cap), no setpoint
        # makes the counted load fit: the chargers on such a constraint count as if they
        # followed their setpoints (the envelope sizes them that way).
        over = _held_over(sa, held, other).reshape(-1)
        following = np.zeros(n, dtype=bool)
        following[sa.pc[over[sa.pk]]] = True
        held = np.where(following, held_cmd, held)
        faulted = np.asarray(ch["faulted"], dtype=bool)
        connected = np.asarray(ch["connected"], dtype=bool)
        energy = _col(ch, "energy_wanted_kwh")
        is_on = ls > 0
        sw = _col(ch, "switches")
        # At or above a finite cap, or a count not known (NaN); no cap is never reached.
        at_cap = (~(sw < max_sw) & math.isfinite(max_sw)) | np.isnan(sw)
        on_t, off_t = _col(ch, "on_since_s"), _col(ch, "off_since_s")
        cand = ~faulted & connected & (energy > 0)
        locked_off = ~is_on & ((np.isfinite(off_t) & (now - off_t < min_off)) | at_cap)
        cand &= ~locked_off
        locked_on = is_on & ((np.isfinite(on_t) & (now - on_t < min_on)) | at_cap)
        f = sa.min_a.copy()
        u = sa.max_a.copy()
        tw = _col(ch, "target_w")
        t = np.where(
            sa.dc,
            np.where(np.isnan(tw), np.nan, sa.dc_line_a(np.minimum(tw, sa.max_w))),
            _col(ch, "target_a"),
        )
        behind = np.asarray(ch["behind_plan"], dtype=bool)
        plan = ~np.isnan(t) & ~behind
        cand &= ~(plan & (t <= 0) & ~locked_on)
        u = np.where(plan & (t < u), np.maximum(t, f), u)
        # Headroom reclaim: only from a reading taken reclaim_ramp_s after the session turned on.
        ramped = ~np.isfinite(on_t) | (now - age >= on_t + ramp_s)
        # A reading showing the car drawing (within margin / 2) the setpoint it was taken under
        # caps it at PROBE_GROWTH x its draw instead, where that is more.
        under_a = _col(ch, "read_under_a") if "read_under_a" in ch else np.full(n, np.nan)
        under_w = _col(ch, "read_under_w") if "read_under_w" in ch else np.full(n, np.nan)
        under = np.where(
            sa.dc,
            np.where(np.isnan(under_w), np.nan, sa.dc_line_a(np.minimum(under_w, sa.max_w))),
            under_a,
        )
        takes_all = (under > 0) & (meas_max >= under - 0.5 * margin)
        rcap = np.where(
            takes_all, np.maximum(meas_max + margin, PROBE_GROWTH * meas_max), meas_max + margin
        )
        reclaim = is_on & ~unknown & fresh & ramped & (rcap < u)
        u = np.where(reclaim, np.maximum(rcap, f), u)
        floor = np.maximum(f, held)
        cap = np.maximum(u, held)
        rate_w = sa.volt * sa.nt * np.maximum(sa.max_a, 1e-9)
        need_s = energy * 3.6e6 / rate_w
        dep = _col(ch, "departure_s")
        lax = np.where(np.isnan(dep), math.inf, dep - now - need_s)
        key = np.where(locked_on, -math.inf, np.where(is_on, lax - hyst, lax))
    # Priority weights are clamped into [1e-6, 1e6]; NaN (unknown) counts as 1.
    prio = _col(ch, "priority")
    weight = np.where(np.isnan(prio), 1.0, np.clip(prio, 1e-6, 1e6))

    pc, pk, pa = sa.pc, sa.pk, sa.pa
    # Where a candidate's minimum does not fit beside what is held but every candidate's
    # minimum would fit if the chargers that draw what they were sent (within the margin; or
    # whose last setpoint is unconfirmed) followed their setpoints, those count as if they did:
    # a car holding a full feeder is lowered to its share instead of keeping it while a
    # newcomer waits for ever.
    rem0 = capacity.copy()
    np.subtract.at(rem0, pk, pa * held[pc])
    trial0 = rem0.copy()
    np.subtract.at(trial0, pk, np.where(cand[pc], pa * (floor - held)[pc], 0.0))

    def short_of(rem: F64, trial: F64) -> npt.NDArray[np.bool_]:
        with np.errstate(invalid="ignore"):
            out: npt.NDArray[np.bool_] = ~(
                (trial >= -1e-9 * (1 + np.abs(trial))) | (rem == math.inf)
            )
        return out

    short = short_of(rem0, trial0)
    if short.any():
        follows = ~faulted & (~confirmed | (np.where(fresh, meas_max, 0.0) <= ls + margin))
        # A session on a valid plan holds what the plan gives it (the plan decides).
        followed = np.where(~following & follows & (held_cmd < held) & ~plan, held_cmd, held)
        rem_f = capacity.copy()
        np.subtract.at(rem_f, pk, pa * followed[pc])
        trial_f = rem_f.copy()
        extra_f = np.maximum(f, followed) - followed
        np.subtract.at(trial_f, pk, np.where(cand[pc], pa * extra_f[pc], 0.0))
        starved = short & ~short_of(rem_f, trial_f)
        on_starved = np.zeros(n, dtype=bool)
        on_starved[pc[starved[pk] & (pa != 0)]] = True
        held = np.where(on_starved, followed, held)
        floor = np.maximum(f, held)
        cap = np.maximum(u, held)

    # Admission: least laxity first while the floors fit. Every charger holds what it holds
    # whether admitted or not: that is reserved first, admission takes floor - held more.
    rem = capacity.copy()
    np.subtract.at(rem, pk, pa * held[pc])
    admitted = np.zeros(n, dtype=bool)
    order = np.lexsort((np.arange(n), key))
    order = order[cand[order]]
    extra = floor - held
    trial = rem.copy()
    np.subtract.at(trial, pk, np.where(cand[pc], pa * extra[pc], 0.0))
    if np.all(trial >= -1e-9 * (1 + np.abs(trial))):
        admitted[order] = True  # every floor fits: the greedy admits all
    else:
        starts = np.searchsorted(pc, np.arange(n + 1))
        for c in order:
            sl = slice(starts[c], starts[c + 1])
            ks, a = pk[sl], pa[sl]
            need = a * extra[c]
            # Holding its minimum already, a session adds nothing by being admitted.
            if locked_on[c] or extra[c] <= 0 or np.all(rem[ks] >= need - 1e-9 * (1 + need)):
                admitted[c] = True
                rem[ks] -= need
    net = capacity.copy()
    np.subtract.at(net, pk, np.where(admitted[pc], 0.0, pa * held[pc]))
    floor = np.where(admitted, floor, 0.0)
    cap = np.where(admitted, cap, 0.0)
    set_floor = np.where(admitted, f, 0.0)
    set_cap = np.where(admitted, u, 0.0)

    level, _frozen_k = _water_fill(sa, floor, cap, weight, net, admitted)
    with np.errstate(invalid="ignore"):
        level_a = np.where(np.isinf(level), set_cap, np.clip(weight * level, set_floor, set_cap))
    level_a = np.where(admitted, level_a, 0.0)
    raised_a = _raise_exact(sa, level_a, set_cap, weight, held_counted, other, admitted)
    return ReferenceResult(
        level_a, raised_a, admitted, floor, cap, weight, net, held, capacity, held_counted
    )


def _held_over(sa: SiteArrays, held: F64, other: F64) -> npt.NDArray[np.bool_]:
    """(n_nodes, 4): phase and kW limits that what is held alone (every setpoint 0) exceeds."""
    nn = sa.n_nodes
    unit = np.exp(1j * np.array([0.0, -2.0 * np.pi / 3.0, 2.0 * np.pi / 3.0]))
    own = np.zeros((nn, 3), dtype=np.complex128)
    np.add.at(own, sa.parent_of_charger, held[:, None] * sa.line_coef)
    own += other * unit
    pw = np.bincount(sa.parent_of_charger, weights=held * sa.volt * sa.nt, minlength=nn)
    pw = pw + other.sum(axis=1) * sa.v_ln
    for i in sa.node_order[::-1]:
        p = sa.parent_of_node[i]
        if p >= 0:
            own[p] += own[i]
            pw[p] += pw[i]
    tol = 1e-9  # the envelope's tolerance (FOLLOW_TOL = TOL_A)
    out = np.zeros((nn, SLOTS), dtype=bool)
    with np.errstate(invalid="ignore"):
        out[:, :3] = np.abs(own) > sa.phase_limit + tol * (1.0 + np.abs(sa.phase_limit))
        out[:, 3] = pw / 1000.0 > sa.kw_limit + tol * (1.0 + np.abs(sa.kw_limit))
    out[sa.has_unbalance] = False
    return out


@dataclass
class _Group:
    """The raisable chargers below the nodes of one depth (``g``: each one's node group)."""

    g: I64
    ng: int
    c: I64
    load0: npt.NDArray[np.complex128]  # (ng, 3) exact line currents at the water-filling values
    power0: F64
    limit: F64  # (ng, 3)
    kw_w: F64
    w: F64
    x: F64
    held: F64
    cand: F64
    coef: npt.NDArray[np.complex128]  # (m, 3)
    watts: F64
    tight_ph: npt.NDArray[np.bool_]  # (ng, 3)
    tight_kw: npt.NDArray[np.bool_]

    def fits(self, level: F64) -> npt.NDArray[np.bool_]:
        """Per node: whether its line currents and kW hold with its chargers at ``level``."""
        r = np.minimum(self.cand, np.maximum(self.x, self.w * level[self.g]))
        dcur = np.maximum(r, self.held) - np.maximum(self.x, self.held)
        load = self.load0.copy()
        for ph in range(3):
            add = dcur * self.coef[:, ph]
            load[:, ph] += np.bincount(self.g, weights=add.real, minlength=self.ng)
            load[:, ph] += 1j * np.bincount(self.g, weights=add.imag, minlength=self.ng)
        power = self.power0 + np.bincount(self.g, weights=dcur * self.watts, minlength=self.ng)
        fit = 1.0 + 1e-10  # a limit tight before the raise must not read as broken from rounding
        # Limits tight before the raise are left out: no charger left on them moves them.
        ok: npt.NDArray[np.bool_] = np.all(
            (np.abs(load) <= self.limit * fit) | self.tight_ph, axis=1
        ) & ((power <= self.kw_w * fit) | self.tight_kw)
        return ok


def _raise_exact(
    sa: SiteArrays,
    x: F64,
    set_cap: F64,
    weight: F64,
    held: F64,
    other: F64,
    admitted: npt.NDArray[np.bool_],
) -> F64:
    """On a site with line-to-line loads, raise every admitted charger below its cap toward it
    while every node's exact line currents and kW hold: nodes deepest first; at each node the
    chargers on a limit already tight there stay, the others share one weighted level found by
    bisection (all nodes of one depth at once)."""
    raisable = admitted & (x < set_cap - 1e-9)
    if not sa.node_l2l.any() or not raisable.any():
        return x.copy()
    nn = sa.n_nodes
    counted = np.where(admitted, np.maximum(x, held), held)
    watts = sa.volt * sa.nt
    own = np.zeros((nn, 3), dtype=np.complex128)
    np.add.at(own, sa.parent_of_charger, counted[:, None] * sa.line_coef)
    unit = np.exp(1j * np.array([0.0, -2.0 * np.pi / 3.0, 2.0 * np.pi / 3.0]))
    own += other * unit
    pw = np.bincount(sa.parent_of_charger, weights=counted * watts, minlength=nn)
    pw += other.sum(axis=1) * sa.v_ln
    for i in sa.node_order[::-1]:
        p = sa.parent_of_node[i]
        if p >= 0:
            own[p] += own[i]
            pw[p] += pw[i]
    kw_w = sa.kw_limit * 1000.0
    cand = np.where(raisable, set_cap, x)
    pair = sa.pk % SLOTS == 3  # one entry per (charger, ancestor node)
    ac, an = sa.pc[pair], sa.pk[pair] // SLOTS
    keep = raisable[ac]
    ac, an = ac[keep], an[keep]
    for d in range(int(sa.node_depth.max()), -1, -1):
        sel = (sa.node_depth[an] == d) & (cand[ac] > x[ac])
        if not sel.any():
            continue
        c, nodes = ac[sel], an[sel]
        grp_nodes, g = np.unique(nodes, return_inverse=True)
        ng = len(grp_nodes)
        # Limits already tight at the water-filling values keep the chargers on them where they
        # are; the others share the node's level.
        mag0 = np.abs(own[grp_nodes])
        lim0 = sa.phase_limit[grp_nodes]
        with np.errstate(divide="ignore", invalid="ignore"):
            tight_ph = (mag0 > 0) & ~(mag0 < lim0 * (1 - 1e-9))
            tight_kw = (pw[grp_nodes] > 0) & ~(pw[grp_nodes] < kw_w[grp_nodes] * (1 - 1e-9))
        stay = tight_kw[g] | np.any(tight_ph[g] & (sa.line_coef[c] != 0), axis=1)
        cand[c[stay]] = x[c[stay]]
        c, g = c[~stay], g[~stay]
        if not len(c):
            continue

        grp = _Group(
            g,
            ng,
            c,
            own[grp_nodes],
            pw[grp_nodes],
            sa.phase_limit[grp_nodes],
            kw_w[grp_nodes],
            weight[c],
            x[c],
            held[c],
            cand[c],
            sa.line_coef[c],
            watts[c],
            tight_ph,
            tight_kw,
        )
        fits = grp.fits
        wc, cc = weight[c], cand[c]
        hi_l = np.zeros(ng)
        np.maximum.at(hi_l, g, cc / wc)
        if fits(hi_l).all():
            continue
        lo, hi = np.zeros(ng), hi_l.copy()
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            ok = fits(mid)
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        level = np.where(fits(hi_l), hi_l, lo)
        cand[c] = np.minimum(cc, np.maximum(x[c], wc * level[g]))
    return np.where(raisable, cand, x)


def _water_fill(
    sa: SiteArrays,
    floor: F64,
    cap: F64,
    weight: F64,
    capacity: F64,
    admitted: npt.NDArray[np.bool_],
) -> tuple[F64, I64]:
    n = sa.n
    nk = sa.n_nodes * SLOTS
    keep = admitted[sa.pc]
    pc, pk, pa = sa.pc[keep], sa.pk[keep], sa.pa[keep]
    dmax = np.bincount(pk, weights=pa * cap[pc], minlength=nk)
    active = np.isfinite(capacity) & (dmax > capacity)
    level = np.full(n, math.inf)
    frozen_k = np.full(n, -1, dtype=np.int64)  # the constraint that froze each charger
    frozen = np.zeros(n, dtype=bool)
    fixed = np.zeros(nk)
    while active.any():
        live = active[pk] & ~frozen[pc]
        lc, lk, la = pc[live], pk[live], pa[live]
        lam = _saturation_levels(lc, lk, la, floor, cap, weight, fixed, capacity, active, nk)
        cmin = np.full(n, math.inf)
        np.minimum.at(cmin, lc, lam[lk])
        gap = np.full(nk, -math.inf)
        with np.errstate(invalid="ignore"):
            np.maximum.at(gap, lk, np.where(np.isfinite(lam[lk]), lam[lk] - cmin[lc], np.inf))
        ready = active & np.isfinite(lam) & (gap <= 0)
        sel = ready[lk]
        newly_c = lc[sel]
        level[newly_c] = lam[lk[sel]]
        first = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first, newly_c, lk[sel])
        frozen_k[newly_c] = first[newly_c]
        newly = np.zeros(n, dtype=bool)
        newly[newly_c] = True
        frozen |= newly
        v = np.clip(weight * level, floor, cap)
        add = newly[pc]
        fixed += np.bincount(pk[add], weights=pa[add] * v[pc[add]], minlength=nk)
        still = active & ~ready & np.isfinite(lam)
        if not newly.any() and still.sum() == active.sum():
            break
        active = still
    return level, frozen_k


def _saturation_levels(
    lc: I64,
    lk: I64,
    la: F64,
    floor: F64,
    cap: F64,
    weight: F64,
    fixed: F64,
    capacity: F64,
    active: npt.NDArray[np.bool_],
    nk: int,
) -> F64:
    """Smallest L with fixed + Σ a·clip(w L, F, U) = capacity per constraint (exact); where the
    floors alone fill it, the first level at which a member rises (exactly full) or 0 (over)."""
    lam = np.full(nk, math.inf)
    w = weight[lc]
    # D(L) = base + Σ_e c_e·min(L, b_e): +a·w at U/w, −a·w at F/w.
    base = fixed + np.bincount(lk, weights=la * floor[lc], minlength=nk)
    saturated0 = active & (base >= capacity)
    # Floors fill it: exactly full (within 1e-9), the largest level with D(L) <= capacity is the
    # first floor event of a member that can rise; over it, 0.
    over = base > capacity + 1e-9 * (1.0 + np.abs(capacity))
    rise = np.full(nk, math.inf)
    can_rise = cap[lc] > floor[lc]
    np.minimum.at(rise, lk[can_rise], floor[lc[can_rise]] / w[can_rise])
    lam[saturated0] = np.where(over[saturated0], 0.0, rise[saturated0])
    b = np.concatenate([cap[lc] / w, floor[lc] / w])
    c = np.concatenate([la * w, -la * w])
    k = np.concatenate([lk, lk])
    order = np.lexsort((b, k))
    b, c, k = b[order], c[order], k[order]
    # Per group: S1_i = Σ_{e≤i} c_e b_e, R_i = Σ_{e>i} c_e.
    cb = c * b
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    grp = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(k)]))
    cum_cb = np.cumsum(cb)
    cum_c = np.cumsum(c)
    off_cb = np.r_[0.0, cum_cb][starts][grp]
    off_c = np.r_[0.0, cum_c][starts][grp]
    s1 = cum_cb - off_cb
    tot_c = np.bincount(grp, weights=c)[grp]
    r = tot_c - (cum_c - off_c)
    d_at = base[k] + s1 + b * r
    target = capacity[k]
    hit = d_at >= target
    # First event per group where D reaches the capacity.
    idx = np.flatnonzero(hit)
    if len(idx):
        first = np.full(len(starts), -1)
        g_hit = grp[idx]
        # idx is ascending: the first occurrence per group is the minimum
        uniq, pos = np.unique(g_hit, return_index=True)
        first[uniq] = idx[pos]
        for_groups = uniq
        i = first[for_groups]
        kk = k[i]
        prev_ok = i > starts[for_groups]
        # On the piece ending at event i: D(L) = base + S1_{i-1} + L·R_{i-1}.
        s1_prev = np.where(prev_ok, s1[np.maximum(i - 1, 0)], 0.0)
        r_prev = np.where(prev_ok, r[np.maximum(i - 1, 0)], tot_c[i])
        with np.errstate(divide="ignore", invalid="ignore"):
            sol = (target[i] - base[kk] - s1_prev) / r_prev
        sol = np.where(r_prev > 0, sol, b[i])
        sol = np.minimum(np.maximum(sol, 0.0), b[i])
        mask = active[kk] & ~saturated0[kk]
        lam[kk[mask]] = sol[mask]
    lam[~active] = math.inf
    return lam


def fairness_violations(
    sa: SiteArrays, res: ReferenceResult, level_a: F64, tol: float = 1e-6
) -> list[str]:
    """Max-min fairness certificate for a consumption vector derived from ``level_a``.

    Every admitted session below its cap must sit in a saturated constraint (load at capacity)
    where no member that is above its floor has a higher weighted level than it."""
    cons = np.maximum(level_a, np.where(res.admitted, res.floor, 0.0))
    cons = np.where(res.admitted, np.clip(cons, res.floor, res.cap), 0.0)
    keep = res.admitted[sa.pc]
    pc, pk, pa = sa.pc[keep], sa.pk[keep], sa.pa[keep]
    nk = sa.n_nodes * SLOTS
    load = np.bincount(pk, weights=pa * cons[pc], minlength=nk)
    cap_k = res.capacity
    with np.errstate(invalid="ignore"):
        saturated = np.isfinite(cap_k) & (load >= cap_k - tol * (1 + np.abs(cap_k)))
    norm = cons / res.weight
    above_floor = cons > res.floor + tol
    maxnorm = np.full(nk, -math.inf)
    m = above_floor[pc]
    np.maximum.at(maxnorm, pk[m], norm[pc[m]])
    ok_pair = saturated[pk] & (norm[pc] >= maxnorm[pk] - tol * (1 + np.abs(maxnorm[pk])))
    bottleneck = np.zeros(sa.n, dtype=bool)
    bottleneck[pc[ok_pair]] = True
    at_cap = cons >= res.cap - tol
    bad = np.flatnonzero(res.admitted & ~at_cap & ~bottleneck)
    return [
        f"charger {i}: {cons[i]:.4f} A below cap {res.cap[i]:.4f} without bottleneck" for i in bad
    ]
