//! Setpoint allocator: weighted max-min fair setpoints over the whole tree and all phases.
//!
//! 1. Eligibility and caps: connected, unfaulted sessions that still want energy; a cap per session
//!    from the charger maximum, the plan target (unless behind plan) and measured draw plus a
//!    margin (headroom reclaim, only from fresh readings taken at least `reclaim_ramp_s` after
//!    the session turned on: one taken earlier may show the vehicle still ramping up). Where the
//!    caller says which setpoint a reading was taken under (`Demand::read_under_a`), a reading
//!    showing the car drawing it (within `margin_a / 2`) does not cap: a car that takes all it
//!    is given is offered its full share again at once, instead of `margin_a` more per reading.
//! 2. Admission (the 6 A rule): what every charger holds anyway is reserved; then sessions are
//!    admitted in order of least laxity while every admitted session's minimum still fits;
//!    sessions inside their minimum on time (or at their switch cap) stay on, those inside their
//!    minimum off time stay off, and running sessions get a laxity bonus so that they do not
//!    flap.
//! 3. Water-filling: exact progressive filling. Each constraint (node × phase with the linear
//!    bound for line-to-line loads, node kW) has a level at which it saturates; the lowest
//!    saturates and its members freeze. A constraint's level never falls when others freeze
//!    members, so levels computed earlier are lower bounds: a heap pops the lowest, re-solves it
//!    if members froze since, and saturates it otherwise. The result is the weighted max-min fair
//!    point.
//! 4. Raise pass: the linear bound for line-to-line loads is up to 15 % tighter than the exact
//!    phasor limit, so sessions frozen at such a limit are raised toward their cap while the
//!    exact line currents hold (`raise_to_exact`).
//! 5. The result goes through the envelope in the same call: nothing leaves unchecked.
//!
//! Units inside: AC line amperes per charger terminal (DC power is converted).
use crate::envelope::{
    counting, enforce_limits, finish, held_value_at, last_sent_line_a, node_loads,
    sanitise_requested, snap_down, subtree_other, switch_cap_reached, Binding, ChargerInputs,
    Constraint, Counting, Decision, EnvelopeParams, NodeInputs, NodeLoads, FOLLOW_TOL,
};
use crate::error::{CoreError, CoreResult};
use crate::par;
use crate::topology::{ChargerKind, Halves, Topology, N_PHASES};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AllocatorParams {
    pub envelope: EnvelopeParams,
    /// Headroom reclaim: a running session is capped at its fresh measured draw plus this (A).
    pub margin_a: f64,
    /// Running sessions sort as if their laxity were this much smaller (admission hysteresis).
    pub admission_hysteresis_s: f64,
    /// Headroom reclaim: a reading taken less than this long after the session turned on (start
    /// or resume) may show the vehicle still ramping up and does not cap it (s; default
    /// `RECLAIM_RAMP_S`).
    pub reclaim_ramp_s: f64,
}

impl Default for AllocatorParams {
    fn default() -> Self {
        AllocatorParams {
            envelope: EnvelopeParams::default(),
            margin_a: 2.0,
            admission_hysteresis_s: 300.0,
            reclaim_ramp_s: RECLAIM_RAMP_S,
        }
    }
}

/// Per-session demand, one entry per charger (ignored where no vehicle is connected).
#[derive(Clone, Copy, Debug)]
pub struct Demand<'a> {
    pub energy_wanted_kwh: &'a [f64],
    /// Departure time (s, caller's clock); NaN = unknown (least urgent).
    pub departure_s: &'a [f64],
    /// Weight in the max-min fairness (> 0).
    pub priority: &'a [f64],
    /// Plan target (AC A per phase / DC W); NaN = no plan for this session.
    pub target_a: &'a [f64],
    pub target_w: &'a [f64],
    pub behind_plan: &'a [bool],
    /// The setpoint the charger was held to when its reading was taken (AC A per phase / DC
    /// W): the lowest in force in the `RAISE_RAMP_S` before it, as the car may still have been
    /// on its way up after a raise; NaN = not known. A reading showing the car drawing it
    /// releases the reclaim cap (module docs, 1).
    pub read_under_a: &'a [f64],
    pub read_under_w: &'a [f64],
}

/// Allocation result: the envelope's decision plus what the allocator computed before it.
#[derive(Clone, Debug)]
pub struct Allocation {
    pub decision: Decision,
    /// Water-filling value per charger (line A per terminal, linear bound) before the raise
    /// pass, steps and envelope.
    pub level_a: Vec<f64>,
    pub admitted: Vec<bool>,
}

/// The linear model the water-filling works on (also used by tests and certificates).
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Consumption floor and cap per charger (line A per terminal), setpoint floor and cap.
    pub floor: Vec<f64>,
    pub cap: Vec<f64>,
    pub set_floor: Vec<f64>,
    pub set_cap: Vec<f64>,
    pub weight: Vec<f64>,
    pub cap_binding: Vec<Binding>,
    /// Constraint capacities: index `node * 4 + slot` (slot 0..3 phases, 3 kW in W).
    pub capacity: Vec<f64>,
}

const SLOTS: usize = N_PHASES + 1;
/// Priority weights outside this range would turn water-filling levels into infinities; the
/// allocator clamps a weight into it (one bad priority must not stop every decision).
pub const PRIORITY_RANGE: (f64, f64) = (1e-6, 1e6);

/// The weight a priority counts with: clamped into `PRIORITY_RANGE` (0 and negatives count as
/// the smallest weight, +inf as the largest); NaN (unknown) counts as the default weight 1.
pub fn priority_weight(p: f64) -> f64 {
    if p.is_nan() {
        1.0
    } else {
        p.clamp(PRIORITY_RANGE.0, PRIORITY_RANGE.1)
    }
}

fn validate_demand(d: &Demand<'_>, n: usize) -> CoreResult<()> {
    for (name, len) in [
        ("energy_wanted_kwh", d.energy_wanted_kwh.len()),
        ("departure_s", d.departure_s.len()),
        ("priority", d.priority.len()),
        ("target_a", d.target_a.len()),
        ("target_w", d.target_w.len()),
        ("behind_plan", d.behind_plan.len()),
        ("read_under_a", d.read_under_a.len()),
        ("read_under_w", d.read_under_w.len()),
    ] {
        if len != n {
            return Err(CoreError::input(
                name,
                None,
                format!("has {len} rows, the site has {n}"),
            ));
        }
    }
    for i in 0..n {
        if d.energy_wanted_kwh[i].is_nan() {
            return Err(CoreError::input("energy_wanted_kwh", Some(i), "is NaN"));
        }
    }
    Ok(())
}

/// Relative tolerance within which floors that sum to a constraint's capacity count as exactly
/// full rather than over it (admission admits with the same 1e-9).
const FULL_TOL: f64 = 1e-9;

/// Solve `fixed + Σ a·clamp(w L, F, U) = cap` for the smallest L (members given by index).
/// Returns +inf when the constraint can never saturate; when the floors alone reach it, the
/// first level at which a member would rise above its floor (exactly full) or 0 (over).
///
/// With `D(L) = fixed + Σ a F + Σ_e c_e · min(L, b_e)` (events `+a w` at `U/w`, `−a w` at `F/w`),
/// a quickselect over the events finds the linear piece holding the root in expected O(m).
/// `window`: a bracket `(lo, hi]` known to hold the root (`D(lo) < cap <= D(hi)`; `(0, inf)`
/// when nothing is known): events outside it are folded into constants or slope in one pass.
/// Members are charger indices; `kw`: the constraint is a kW slot (coefficients as `Fill::coef`).
#[allow(clippy::too_many_arguments)]
fn saturation_level(
    members: &[u32],
    kw: bool,
    fill: &[Fill],
    fixed: f64,
    cap: f64,
    window: (f64, f64),
    events: &mut Vec<(f64, f64)>,
) -> f64 {
    let (lo, hi) = window;
    let mut base = fixed;
    let mut dmax = fixed;
    // Events at or left of `lo` are constants on the window, at or right of `hi` linear.
    let mut folded = 0.0;
    let mut slope = 0.0;
    events.clear();
    for &c in members {
        let x = &fill[c as usize];
        let a = x.coef(kw);
        let (w, f, u) = (x.weight, x.floor, x.cap);
        base += a * f;
        dmax += a * u;
        if u > f {
            for (b, e) in [(x.cap_level, a * w), (x.floor_level, -a * w)] {
                if b <= lo {
                    folded += e * b;
                } else if b >= hi {
                    slope += e;
                } else {
                    events.push((b, e));
                }
            }
        }
    }
    if dmax <= cap {
        return f64::INFINITY;
    }
    if base >= cap {
        // Floors (what members hold anyway, at least their minimum) fill the constraint. Exactly
        // full, D stays at `base` up to the first floor event: the level is the LARGEST L with
        // D(L) <= cap, i.e. that event, so members keep what they hold (5 chargers drawing 16 A
        // on an 80 A feeder stay at 16 A rather than being cut to their 6 A minimum). Over the
        // limit by more than rounding, nothing fits: 0 (every member at its minimum).
        if base > cap + FULL_TOL * (1.0 + cap.abs()) {
            return 0.0;
        }
        return members
            .iter()
            .map(|&c| &fill[c as usize])
            .filter(|x| x.cap > x.floor)
            .map(|x| x.floor_level)
            .fold(f64::INFINITY, f64::min);
    }
    let mut base = base + folded;
    let mut left = lo;
    let mut right = hi;
    if events.len() <= 32 {
        // Few events (a circuit, or a narrow window): sort them and walk the pieces.
        events.sort_unstable_by(|x, y| x.0.total_cmp(&y.0));
        let mut slope = slope + events.iter().map(|e| e.1).sum::<f64>();
        for &(b, c) in events.iter() {
            // On (left, b]: D(L) = base + slope·L.
            if base + slope * b >= cap {
                right = b;
                break;
            }
            base += c * b;
            slope -= c;
            left = b;
        }
        return last_piece(base, slope, cap, left, right);
    }
    // Invariant: for L in the bracket (left, right], D(L) = base + slope·L + Σ_{e in window}
    // c_e·min(L, b_e); events left of the window are constants (in `base`), right of it linear
    // (in `slope`). D(left) < cap <= D(right).
    let (mut lo, mut hi) = (0usize, events.len());
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    while lo < hi {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let pick = lo + (seed % (hi - lo) as u64) as usize;
        let pivot = events[pick].0;
        // Partition the window into [< pivot] and [>= pivot].
        let mut i = lo;
        let mut left_cb = 0.0;
        let mut right_c = 0.0;
        for j in lo..hi {
            let e = events[j];
            if e.0 < pivot {
                left_cb += e.1 * e.0;
                events.swap(i, j);
                i += 1;
            } else {
                right_c += e.1;
            }
        }
        let d_pivot = base + slope * pivot + left_cb + pivot * right_c;
        if d_pivot >= cap {
            // Root at or below the pivot: events at or right of it act linearly there.
            slope += right_c;
            right = pivot;
            hi = i;
        } else {
            // Root above the pivot: events left of it and equal to it are constants there.
            base += left_cb;
            let mut k = i;
            for j in i..hi {
                let e = events[j];
                if e.0 == pivot {
                    base += e.1 * e.0;
                    events.swap(k, j);
                    k += 1;
                }
            }
            left = pivot;
            lo = k;
        }
    }
    last_piece(base, slope, cap, left, right)
}

/// The root of `base + slope·L = cap` on the piece `(left, right]` that holds it. Rounding can
/// make the slope tiny or non-positive; the root is inside the bracket in exact arithmetic, so
/// keep it there.
fn last_piece(base: f64, slope: f64, cap: f64, left: f64, right: f64) -> f64 {
    let root = if slope > 0.0 {
        (cap - base) / slope
    } else if right.is_finite() {
        right
    } else {
        left
    };
    if root.is_nan() || !(left <= right) {
        return left;
    }
    root.clamp(left, right)
}

/// `fixed + Σ a·clamp(w L, F, U)`: a constraint's load at level `L` (one pass, no events).
fn load_at(members: &[u32], kw: bool, fill: &[Fill], fixed: f64, l: f64) -> f64 {
    members.iter().fold(fixed, |d, &c| {
        let x = &fill[c as usize];
        d + x.coef(kw) * (x.weight * l).max(x.floor).min(x.cap)
    })
}

/// One charger's data for the water-filling, packed together (one fetch per member): floor, cap and
/// weight of the model, and the levels at which it leaves its floor and reaches its cap.
#[derive(Clone, Copy, Debug, Default)]
struct Fill {
    floor: f64,
    cap: f64,
    weight: f64,
    floor_level: f64,
    cap_level: f64,
    /// Coefficient in the kW slots (`Topology::slot_coefs`; in a phase slot it is 1).
    kw_coef: f64,
}

impl Fill {
    /// The charger's coefficient in a constraint it is a member of: W per terminal ampere in a
    /// kW slot, 1 in a phase slot (the member lists hold charger indices only).
    #[inline]
    fn coef(&self, kw: bool) -> f64 {
        if kw {
            self.kw_coef
        } else {
            1.0
        }
    }
}

/// Which node × slot constraints what is held alone breaks as the envelope counts it (exact
/// line currents and kW, by more than `FOLLOW_TOL`, at nodes without an unbalance cap), given
/// the linear count `held_sum` against `capacity` (net of non-charger load). The linear count is
/// never below the exact one, so only where it is over is the exact count needed: node by node
/// from the chargers below each while those hold at most `max_work` chargers together, else in
/// one pass over the site.
fn exactly_over(
    topo: &Topology,
    cnt: &Counting,
    capacity: &[f64],
    held_sum: &[f64],
    max_work: usize,
) -> Vec<bool> {
    let nn = topo.n_nodes();
    let linear_over: Vec<usize> = (0..nn * SLOTS)
        .filter(|&k| {
            let cap = capacity[k];
            held_sum[k] > cap + FOLLOW_TOL * (1.0 + cap.abs())
        })
        .collect();
    let mut over = vec![false; nn * SLOTS];
    if !linear_over.is_empty() {
        let above = |v: f64, limit: f64| v > limit + FOLLOW_TOL * (1.0 + limit.abs());
        let limit_of = |k: usize| {
            let node = &topo.nodes[k / SLOTS];
            match k % SLOTS {
                N_PHASES => node.power_limit_kw.unwrap_or(f64::INFINITY),
                ph => node.phase_limit_a[ph],
            }
        };
        let work: usize = linear_over
            .iter()
            .map(|&k| topo.chargers_below(k / SLOTS).len())
            .sum();
        if work <= max_work {
            // A few nodes: count each from the chargers below it.
            let sub = subtree_other(topo, cnt);
            for &k in &linear_over {
                let i = k / SLOTS;
                if topo.nodes[i].unbalance_limit_a.is_some() {
                    continue;
                }
                let c = match k % SLOTS {
                    N_PHASES => Constraint::Power,
                    ph => Constraint::Phase(ph),
                };
                over[k] = above(held_value_at(topo, cnt, &sub, i, c), limit_of(k));
            }
        } else {
            let mut loads = NodeLoads::new(nn);
            node_loads(topo, cnt, &mut loads); // every setpoint 0: what is held alone
            for &k in &linear_over {
                let i = k / SLOTS;
                if topo.nodes[i].unbalance_limit_a.is_some() {
                    continue;
                }
                let v = match k % SLOTS {
                    N_PHASES => loads.power_w[i] / 1000.0,
                    ph => loads.line_a(i, ph),
                };
                over[k] = above(v, limit_of(k));
            }
        }
    }
    over
}

/// Per-constraint sums of per-charger amounts (linear coefficients), summed up the tree: `K` sums
/// in one pass over the chargers, each summed in the same order as it would be alone (an amount
/// of 0 adds nothing).
fn per_constraint<const K: usize>(
    topo: &Topology,
    halves: Option<Halves>,
    amount: impl Fn(usize) -> [f64; K] + Sync,
) -> [Vec<f64>; K] {
    let nk = topo.n_nodes() * SLOTS;
    let mut acc: [Vec<f64>; K] = std::array::from_fn(|_| vec![0.0; nk]);
    // Each charger's amounts at its parent (nodes from `node_base` on in `rows`).
    let add = |chargers: std::ops::Range<usize>, node_base: usize, mut rows: Vec<&mut [f64]>| {
        for c in chargers {
            let xs = amount(c);
            let co = topo.slot_coefs(c);
            let par = topo.hot(c).parent() - node_base;
            for (acc, x) in rows.iter_mut().zip(xs) {
                if x == 0.0 {
                    continue;
                }
                let row = &mut acc[par * SLOTS..par * SLOTS + SLOTS];
                for (r, &a) in row.iter_mut().zip(co) {
                    *r += a * x;
                }
            }
        }
    };
    let nc = topo.n_chargers();
    match halves {
        Some(h) => {
            // The halves share no parent: every node's sum in the same order.
            let (mut first, mut second) = (Vec::with_capacity(K), Vec::with_capacity(K));
            for v in acc.iter_mut() {
                let (a, b) = v.split_at_mut(h.node_at * SLOTS);
                first.push(a);
                second.push(b);
            }
            par::join(
                true,
                || add(0..h.charger_at, 0, first),
                || add(h.charger_at..nc, h.node_at, second),
            );
        }
        None => add(0..nc, 0, acc.iter_mut().map(|v| &mut v[..]).collect()),
    }
    for &i in topo.node_order().iter().rev() {
        if let Some(par) = topo.nodes[i].parent {
            for acc in acc.iter_mut() {
                add_row(acc, par, i);
            }
        }
    }
    acc
}

/// `v[par] += v[child]` for one node's `SLOTS` entries.
#[inline]
fn add_row<T: Copy + std::ops::AddAssign>(v: &mut [T], par: usize, child: usize) {
    let from: [T; SLOTS] = v[child * SLOTS..child * SLOTS + SLOTS]
        .try_into()
        .expect("SLOTS entries");
    for (r, x) in v[par * SLOTS..par * SLOTS + SLOTS].iter_mut().zip(from) {
        *r += x;
    }
}

/// Headroom reclaim: a reading taken less than this long after the session turned on (start or
/// resume) may show the vehicle still ramping up, so it does not cap the session (s). The
/// default of `AllocatorParams::reclaim_ramp_s`.
pub const RECLAIM_RAMP_S: f64 = 30.0;

/// Whether a reading taken at `read_at_s` may cap a session that turned on at `on_since_s`
/// (NaN: unknown, long ago): taken at least `ramp_s` after it.
#[inline]
pub fn ramped(read_at_s: f64, on_since_s: f64, ramp_s: f64) -> bool {
    !on_since_s.is_finite() || read_at_s >= on_since_s + ramp_s
}

/// Headroom reclaim after a raise: a reading taken less than this long after the setpoint rose
/// may show the vehicle still on its way up (the station applies the profile, the vehicle
/// follows within seconds: IEC 61851-1 gives it 5 s). The caller's `read_under_a` is the lowest
/// setpoint in force over this long before the reading.
pub const RAISE_RAMP_S: f64 = 15.0;

/// How much more than it draws a car that takes all it is given may be offered per reading
/// (a factor): the probe for what it would take doubles per reading instead of adding
/// `margin_a`, and a burst of raises stays bounded (sessions whose weights change every tick,
/// as under least laxity, swing less).
pub const PROBE_GROWTH: f64 = 2.0;

/// The reclaim cap (line A) of a running session whose largest terminal reads `meas_a`
/// (module docs, 1): `meas_a + margin_a`; none (+inf) for a reading taken before the session
/// ramped; `PROBE_GROWTH × meas_a` when larger and the reading shows the car drawing (within
/// `margin_a / 2`) the setpoint `under_a` (line A; NaN: not known) it was taken under.
#[inline]
pub fn reclaim_cap(
    read_at_s: f64,
    on_since_s: f64,
    meas_a: f64,
    under_a: f64,
    margin_a: f64,
    ramp_s: f64,
) -> f64 {
    if !ramped(read_at_s, on_since_s, ramp_s) {
        return f64::INFINITY;
    }
    let cap = meas_a + margin_a;
    if under_a > 0.0 && meas_a >= under_a - 0.5 * margin_a {
        cap.max(PROBE_GROWTH * meas_a)
    } else {
        cap
    }
}

/// What the model reads per session.
struct Sessions<'a> {
    topo: &'a Topology,
    ch: &'a ChargerInputs<'a>,
    demand: &'a Demand<'a>,
    p: &'a AllocatorParams,
    ep: &'a EnvelopeParams,
    /// What each charger holds regardless of its new setpoint.
    held: &'a [f64],
}

/// The model's per-charger rows and admission inputs, for chargers `base..`.
struct ModelRows<'a> {
    base: usize,
    set_floor: &'a mut [f64],
    set_cap: &'a mut [f64],
    floor: &'a mut [f64],
    cap: &'a mut [f64],
    cap_binding: &'a mut [Binding],
    candidate: &'a mut [bool],
    binding: &'a mut [Binding],
    locked_on: &'a mut [bool],
    key: &'a mut [f64],
}

crate::par::split_rows!(ModelRows {
    set_floor,
    set_cap,
    floor,
    cap,
    cap_binding,
    candidate,
    binding,
    locked_on,
    key
});

impl Sessions<'_> {
    /// Eligibility, caps and admission key of each session of `out` (see the module docs).
    fn rows(&self, out: ModelRows<'_>) {
        let ModelRows {
            base,
            set_floor,
            set_cap,
            floor,
            cap,
            cap_binding,
            candidate,
            binding,
            locked_on,
            key,
        } = out;
        let (topo, ch, demand) = (self.topo, self.ch, self.demand);
        for i in 0..key.len() {
            let c = base + i;
            let spec = topo.hot(c);
            let nt = spec.wiring.terminals();
            let last = last_sent_line_a(topo, c, ch);
            let is_on = last > 0.0;
            let at_cap = switch_cap_reached(ch.switches[c], self.ep.max_switches);
            let on_t = ch.on_since_s[c];
            let off_t = ch.off_since_s[c];
            if ch.faulted[c] {
                binding[i] = Binding::Fault;
                continue;
            }
            if !ch.connected[c] {
                binding[i] = Binding::Disconnected;
                continue;
            }
            if !(demand.energy_wanted_kwh[c] > 0.0) {
                binding[i] = Binding::Demand;
                continue;
            }
            if !is_on
                && ((off_t.is_finite() && self.ep.now_s - off_t < self.ep.min_off_s) || at_cap)
            {
                binding[i] = Binding::Hysteresis;
                continue;
            }
            locked_on[i] =
                is_on && ((on_t.is_finite() && self.ep.now_s - on_t < self.ep.min_on_s) || at_cap);
            let f = spec.min_a;
            let mut u = spec.max_a;
            let mut cb = Binding::ChargerMax;
            // Plan target caps the session unless it is behind its plan.
            let t = spec.line_a(demand.target_a[c], demand.target_w[c]);
            if !t.is_nan() && !demand.behind_plan[c] {
                if t <= 0.0 && !locked_on[i] {
                    binding[i] = Binding::Plan;
                    continue;
                }
                if t < u {
                    u = t.max(f);
                    cb = Binding::Plan;
                }
            }
            // Headroom reclaim from fresh measurements of a running session (module docs, 1).
            let age = ch.measured_age_s[c];
            if is_on
                && !ch.profile_unknown[c]
                && age.is_finite()
                && age >= 0.0
                && age <= self.ep.stale_after_s
            {
                let meas = [
                    ch.measured_l1_a[c],
                    ch.measured_l2_a[c],
                    ch.measured_l3_a[c],
                ];
                let mx = meas[..nt]
                    .iter()
                    .map(|v| if v.is_nan() { spec.max_a } else { v.abs() })
                    .fold(0.0, f64::max);
                let under = spec.line_a(demand.read_under_a[c], demand.read_under_w[c]);
                let rc = reclaim_cap(
                    self.ep.now_s - age,
                    on_t,
                    mx,
                    under,
                    self.p.margin_a,
                    self.p.reclaim_ramp_s,
                );
                if rc < u {
                    u = rc.max(f);
                    cb = Binding::Demand;
                }
            }
            set_floor[i] = f;
            set_cap[i] = u;
            floor[i] = f.max(self.held[c]);
            cap[i] = u.max(self.held[c]);
            cap_binding[i] = cb;
            candidate[i] = true;
            let rate_w = spec.watts_per_terminal_a() * nt as f64 * spec.max_a.max(1e-9);
            let need_s = demand.energy_wanted_kwh[c] * 3.6e6 / rate_w;
            let dep = demand.departure_s[c];
            let lax = if dep.is_nan() {
                f64::INFINITY
            } else {
                dep - self.ep.now_s - need_s
            };
            key[i] = if locked_on[i] {
                f64::NEG_INFINITY
            } else if is_on {
                lax - self.p.admission_hysteresis_s
            } else {
                lax
            };
        }
    }
}

/// Build the linear model and run admission; returns the model and the admitted mask.
#[allow(clippy::too_many_arguments)]
fn model_and_admission(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    demand: &Demand<'_>,
    p: &AllocatorParams,
    halves: Option<Halves>,
) -> (Model, Vec<bool>, Vec<Binding>, Counting) {
    let n = topo.n_chargers();
    let nn = topo.n_nodes();
    let ep = &p.envelope;
    let cnt = counting(topo, ch, nodes, ep, halves);
    let mut m = Model {
        floor: vec![0.0; n],
        cap: vec![0.0; n],
        set_floor: vec![0.0; n],
        set_cap: vec![0.0; n],
        weight: demand
            .priority
            .iter()
            .map(|&p| priority_weight(p))
            .collect(),
        cap_binding: vec![Binding::None; n],
        capacity: vec![0.0; nn * SLOTS],
    };
    // Capacities net of non-charger load (linear: per phase amps; kW in W).
    for i in 0..nn {
        let node = &topo.nodes[i];
        for ph in 0..N_PHASES {
            m.capacity[i * SLOTS + ph] = node.phase_limit_a[ph];
        }
        m.capacity[i * SLOTS + N_PHASES] =
            node.power_limit_kw.map_or(f64::INFINITY, |k| k * 1000.0);
    }
    let sub_other: Vec<[f64; N_PHASES]> = {
        let mut acc = cnt.other.clone();
        for &i in topo.node_order().iter().rev() {
            if let Some(par) = topo.nodes[i].parent {
                for k in 0..N_PHASES {
                    acc[par][k] += acc[i][k];
                }
            }
        }
        acc
    };
    for i in 0..nn {
        for ph in 0..N_PHASES {
            m.capacity[i * SLOTS + ph] -= sub_other[i][ph];
            m.capacity[i * SLOTS + N_PHASES] -= sub_other[i][ph] * topo.voltage_ln_v;
        }
    }
    // What each charger holds regardless of its new setpoint (max over its terminals). Where
    // that alone is over a limit (chargers measured above it), no setpoint can make the counted
    // load fit; the envelope then sizes setpoints so that the node fits when its chargers follow
    // them, and the model does the same: the chargers on such a constraint count without their
    // measurements (what they hold otherwise: an unconfirmed decrease, an unknown profile).
    let held_of = |h: &[[f64; N_PHASES]], c: usize| {
        let nt = topo.hot(c).terminals();
        h[c][..nt].iter().copied().fold(0.0, f64::max)
    };
    // Over as the envelope judges it: exact line currents and kW of what is held alone, by more
    // than `FOLLOW_TOL`, at a node without an unbalance cap. (The linear count is never below
    // the exact one: only where it is over is the exact count needed, node by node when those
    // nodes hold fewer chargers together than the site, else in one pass over the site.)
    let mut held: Vec<f64> = (0..n).map(|c| held_of(&cnt.held, c)).collect();
    let [held_sum] = per_constraint(topo, halves, |c| [held[c]]);
    let over = exactly_over(topo, &cnt, &m.capacity, &held_sum, n);
    let mut following = vec![false; n];
    if over.iter().any(|&o| o) {
        for (c, f) in following.iter_mut().enumerate() {
            let co = topo.slot_coefs(c);
            *f = topo
                .ancestors(c)
                .iter()
                .any(|&i| (0..SLOTS).any(|slot| co[slot] != 0.0 && over[i * SLOTS + slot]));
            if *f {
                held[c] = held_of(&cnt.held_cmd, c);
            }
        }
    }
    let mut candidate = vec![false; n];
    let mut binding = vec![Binding::None; n];
    let mut locked_on = vec![false; n];
    let mut key = vec![0.0; n];
    {
        let rows = ModelRows {
            base: 0,
            set_floor: &mut m.set_floor,
            set_cap: &mut m.set_cap,
            floor: &mut m.floor,
            cap: &mut m.cap,
            cap_binding: &mut m.cap_binding,
            candidate: &mut candidate,
            binding: &mut binding,
            locked_on: &mut locked_on,
            key: &mut key,
        };
        let of = Sessions {
            topo,
            ch,
            demand,
            p,
            ep,
            held: &held,
        };
        match halves {
            Some(h) => {
                let (first, second) = rows.split_at(h.charger_at);
                par::join(true, || of.rows(first), || of.rows(second));
            }
            None => of.rows(rows),
        }
    }
    // Every charger holds what it holds whether admitted or not (fresh measurement, unconfirmed
    // setpoint): reserve that first, so that a session admitted early is not pushed over a limit
    // by the holdings of a session refused later. Admission then takes `floor − held` more.
    // (No limit stays no limit: inf − finite is inf.)
    // One pass for the sums below (each summed in the order it would be alone): what is held
    // (again only where a charger now counts as following), what admission takes beyond it, and
    // what the non-candidates hold (never admitted: with every candidate admitted, that is all
    // the water-filling must take off the capacities).
    let tol = 1e-9;
    let short_of = |r: f64, e: f64| {
        let t = r - e;
        !(t >= -tol * (1.0 + t.abs()) || r == f64::INFINITY)
    };
    let sums = |held: &[f64], m: &Model, refetch: bool| {
        let [held_again, extra_sum, non_candidate_held] = per_constraint(topo, halves, |c| {
            let h = held[c];
            [
                if refetch { h } else { 0.0 },
                if candidate[c] { m.floor[c] - h } else { 0.0 },
                if candidate[c] { 0.0 } else { h.max(0.0) },
            ]
        });
        (held_again, extra_sum, non_candidate_held)
    };
    let (held_again, mut extra_sum, mut non_candidate_held) =
        sums(&held, &m, following.iter().any(|&f| f));
    let mut held_sum = if following.iter().any(|&f| f) {
        held_again
    } else {
        held_sum
    };
    // A constraint whose room is taken by what its chargers hold only because they draw what
    // they were sent (a car that took a feeder at its maximum) would refuse a session plugged
    // in beside them for as long as they draw it: the holders' draw is their floor, so they
    // keep it. Where a candidate's minimum does not fit beside what is held but every
    // candidate's minimum would fit if the chargers that draw what they were sent followed
    // their setpoints, those chargers count as if they did, as on a constraint measured over:
    // the holders are lowered to their shares and the newcomer waits in the envelope (which
    // does not cut what a setpoint below a charger's holding would not change) until that room
    // is read free. Where the minimums do not fit even then, the running sessions keep what
    // they hold and the least-laxity order decides among the others, as before; so do sessions
    // on a valid plan. (Sharing those as if followed too moved room from cars drawing it to
    // cars that could not use it before the next reading: the eu-three-phase twin delivered
    // 3-15 kWh less under the planner policies that way.)
    let short0 = m
        .capacity
        .iter()
        .zip(&held_sum)
        .zip(&extra_sum)
        .any(|((&cap, &h), &e)| short_of(cap - h, e));
    if short0 {
        // What each charger would hold if it followed its setpoint: only one that draws what it
        // was sent (within the reclaim margin), or may still draw what it was sent before (its
        // last setpoint unconfirmed), is expected to; one drawing more, or faulted, holds what
        // it draws.
        // A session on a valid plan (not behind it) holds what the plan gives it: the plan,
        // which counts the newcomer too, decides when it yields.
        let on_plan = |c: usize| {
            let t = match topo.hot(c).kind {
                ChargerKind::Ac => demand.target_a[c],
                ChargerKind::Dc => demand.target_w[c],
            };
            !t.is_nan() && !demand.behind_plan[c]
        };
        let followed: Vec<f64> = (0..n)
            .map(|c| {
                let h = held_of(&cnt.held_cmd, c);
                let follows = !ch.faulted[c]
                    && (!ch.last_sent_confirmed[c]
                        || cnt.measured_a[c] <= last_sent_line_a(topo, c, ch) + p.margin_a);
                if !following[c] && follows && h < held[c] && !on_plan(c) {
                    h
                } else {
                    held[c]
                }
            })
            .collect();
        let [held_f, extra_f] = per_constraint(topo, halves, |c| {
            let h = followed[c];
            [
                h,
                if candidate[c] {
                    m.set_floor[c].max(h) - h
                } else {
                    0.0
                },
            ]
        });
        let mut starved_up: Vec<bool> = (0..nn * SLOTS)
            .map(|k| {
                let cap = m.capacity[k];
                short_of(cap - held_sum[k], extra_sum[k]) && !short_of(cap - held_f[k], extra_f[k])
            })
            .collect();
        for &i in topo.node_order() {
            if let Some(par) = topo.nodes[i].parent {
                for slot in 0..SLOTS {
                    starved_up[i * SLOTS + slot] |= starved_up[par * SLOTS + slot];
                }
            }
        }
        let mut changed = false;
        for c in 0..n {
            let h = followed[c];
            if !(h < held[c]) {
                continue;
            }
            let co = topo.slot_coefs(c);
            let par = topo.hot(c).parent();
            let up = &starved_up[par * SLOTS..par * SLOTS + SLOTS];
            if co.iter().zip(up).any(|(&a, &s)| a != 0.0 && s) {
                following[c] = true;
                held[c] = h;
                if candidate[c] {
                    m.floor[c] = m.set_floor[c].max(h);
                    m.cap[c] = m.set_cap[c].max(h);
                }
                changed = true;
            }
        }
        if changed {
            let (again, extra, non_cand) = sums(&held, &m, true);
            held_sum = again;
            extra_sum = extra;
            non_candidate_held = non_cand;
        }
    }
    let mut remaining: Vec<f64> = m
        .capacity
        .iter()
        .zip(&held_sum)
        .map(|(&cap, &h)| cap - h)
        .collect();
    let mut admitted = vec![false; n];
    // When every candidate's minimum fits at once, the order does not matter: all are admitted
    // without sorting by laxity.
    let all_fit = remaining
        .iter()
        .zip(&extra_sum)
        .all(|(&r, &e)| !short_of(r, e));
    if all_fit {
        admitted.copy_from_slice(&candidate);
    } else {
        let subtract = |remaining: &mut [f64], c: usize, amount: f64| {
            if amount <= 0.0 {
                return;
            }
            let cc = topo.slot_coefs(c);
            for &i in topo.ancestors(c) {
                for (slot, &a) in cc.iter().enumerate() {
                    let r = &mut remaining[i * SLOTS + slot];
                    // No limit stays no limit (inf − inf would be NaN).
                    if a != 0.0 && *r != f64::INFINITY {
                        *r -= a * amount;
                    }
                }
            }
        };
        // A constraint that holds even with every candidate's minimum in it cannot refuse anyone:
        // a candidate none of whose constraints is short is admitted whatever the order (so are
        // sessions that must stay on, or that already hold their minimum: they come first in the
        // order anyway). Only the others need the least-laxity order; the always-admitted ones
        // are taken off `remaining` first, which changes no check (they share no short
        // constraint with the others, and a constraint that is not short passes any subset).
        let short: Vec<bool> = remaining
            .iter()
            .zip(&extra_sum)
            .map(|(&r, &e)| short_of(r, e))
            .collect();
        // Per node × slot: whether it or a node above it is short (parents come first).
        let mut short_up = short;
        for &i in topo.node_order() {
            if let Some(par) = topo.nodes[i].parent {
                for slot in 0..SLOTS {
                    short_up[i * SLOTS + slot] |= short_up[par * SLOTS + slot];
                }
            }
        }
        // What the always-admitted take, added at their parents and summed up the tree.
        let mut first = vec![0.0; nn * SLOTS];
        // Chargers `chargers` (their `admitted` from `chargers.start`, their parents from
        // `node_base` on in `first`); returns those that need the order, ascending.
        let always = |chargers: std::ops::Range<usize>,
                      node_base: usize,
                      admitted: &mut [bool],
                      first: &mut [f64]| {
            let mut order: Vec<usize> = Vec::new();
            let base = chargers.start;
            for c in chargers {
                if !candidate[c] {
                    continue;
                }
                let need = m.floor[c] - held[c];
                let cc = topo.slot_coefs(c);
                let par = topo.hot(c).parent();
                let on_short = || {
                    let up = &short_up[par * SLOTS..par * SLOTS + SLOTS];
                    cc.iter().zip(up).any(|(&a, &s)| a != 0.0 && s)
                };
                if locked_on[c] || need <= 0.0 || !on_short() {
                    admitted[c - base] = true;
                    if need > 0.0 {
                        let p = par - node_base;
                        let row = &mut first[p * SLOTS..p * SLOTS + SLOTS];
                        for (r, &a) in row.iter_mut().zip(cc) {
                            *r += a * need;
                        }
                    }
                } else {
                    order.push(c);
                }
            }
            order
        };
        let mut order = match halves {
            Some(h) => {
                let (a0, a1) = admitted.split_at_mut(h.charger_at);
                let (f0, f1) = first.split_at_mut(h.node_at * SLOTS);
                let (mut order, second) = par::join(
                    true,
                    || always(0..h.charger_at, 0, a0, f0),
                    || always(h.charger_at..n, h.node_at, a1, f1),
                );
                order.extend_from_slice(&second);
                order
            }
            None => always(0..n, 0, &mut admitted, &mut first),
        };
        for &i in topo.node_order().iter().rev() {
            if let Some(par) = topo.nodes[i].parent {
                add_row(&mut first, par, i);
            }
        }
        for (r, &f) in remaining.iter_mut().zip(&first) {
            // No limit stays no limit (inf − inf would be NaN).
            if *r != f64::INFINITY {
                *r -= f;
            }
        }
        order.sort_by(|&a, &b| key[a].total_cmp(&key[b]).then(a.cmp(&b)));
        for &c in &order {
            let need = m.floor[c] - held[c];
            // A session that already holds its minimum adds nothing by being admitted: refusing
            // it would only give a false reason where what is held fills a node (or more; the
            // envelope then pauses what that node controls and names it).
            let cc = topo.slot_coefs(c);
            let fits = locked_on[c]
                || need <= 0.0
                || topo.ancestors(c).iter().all(|&i| {
                    (0..SLOTS).all(|slot| {
                        let a = cc[slot];
                        a == 0.0 || remaining[i * SLOTS + slot] >= a * need - tol * (1.0 + a * need)
                    })
                });
            if fits {
                admitted[c] = true;
                subtract(&mut remaining, c, need);
            } else {
                binding[c] = Binding::Admission;
            }
        }
    }
    // The water-filling sees capacity net of non-admitted holdings.
    let refused_held = if all_fit {
        non_candidate_held
    } else {
        let [h] = per_constraint(topo, halves, |c| {
            [if admitted[c] { 0.0 } else { held[c].max(0.0) }]
        });
        h
    };
    for (cap, &h) in m.capacity.iter_mut().zip(&refused_held) {
        *cap -= h;
    }
    for c in 0..n {
        if !admitted[c] {
            m.floor[c] = 0.0;
            m.cap[c] = 0.0;
            m.set_floor[c] = 0.0;
            m.set_cap[c] = 0.0;
        }
    }
    (m, admitted, binding, cnt)
}

/// `f64::total_cmp`'s order as an unsigned integer (sign bit flipped for non-negative values,
/// every bit flipped for negative ones): compared as `u64`, keys order as their levels do.
#[inline]
fn order_key(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

#[inline]
fn from_order_key(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

/// The constraints' saturation levels (lower bounds until recomputed), lowest first, ties by
/// index. The initial keys, one per constraint, are sorted once and popped from the front;
/// keys pushed later go to a binary heap, which thus holds only the constraints re-solved or
/// probed so far.
struct LevelQueue {
    init: Vec<(u64, usize)>,
    next: usize,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>>,
}

/// Sort `(key, index)` pairs with distinct indices given in ascending index order, as
/// `sort_unstable` would (the pairs are distinct, so any sort gives this one order): a stable
/// radix sort by key, one byte at a time from the lowest (bytes every key shares skipped), keeps
/// equal keys in index order.
fn sort_keys(v: Vec<(u64, usize)>) -> Vec<(u64, usize)> {
    if v.len() <= 64 {
        let mut v = v;
        v.sort_unstable();
        return v;
    }
    let mut hist = [[0usize; 256]; 8];
    for &(k, _) in &v {
        for (d, h) in hist.iter_mut().enumerate() {
            h[((k >> (8 * d)) & 0xff) as usize] += 1;
        }
    }
    let mut src = v;
    let mut dst = vec![(0u64, 0usize); src.len()];
    for (d, h) in hist.iter_mut().enumerate() {
        if h.contains(&src.len()) {
            continue; // every key has the same byte here
        }
        let mut pos = 0;
        for x in h.iter_mut() {
            let count = *x;
            *x = pos;
            pos += count;
        }
        for &e in &src {
            let b = ((e.0 >> (8 * d)) & 0xff) as usize;
            dst[h[b]] = e;
            h[b] += 1;
        }
        std::mem::swap(&mut src, &mut dst);
    }
    src
}

impl LevelQueue {
    fn new(init: Vec<(u64, usize)>) -> Self {
        let init = sort_keys(init);
        LevelQueue {
            init,
            next: 0,
            heap: std::collections::BinaryHeap::new(),
        }
    }
    fn push(&mut self, level: f64, a: usize) {
        self.heap.push(std::cmp::Reverse((order_key(level), a)));
    }
    fn pop(&mut self) -> Option<(f64, usize)> {
        let first = self.init.get(self.next).copied();
        let later = self.heap.peek().map(|r| r.0);
        let (k, a) = match (first, later) {
            (Some(x), Some(y)) if y < x => self.heap.pop().map(|r| r.0)?,
            (Some(x), _) => {
                self.next += 1;
                x
            }
            (None, Some(_)) => self.heap.pop().map(|r| r.0)?,
            (None, None) => return None,
        };
        Some((from_order_key(k), a))
    }
}

/// The water-filling's first level of each binding constraint, from its members' fill records.
struct FirstSolves<'a> {
    mem: &'a [u32],
    off: &'a [usize],
    len: &'a [usize],
    act_k: &'a [usize],
    fill: &'a [Fill],
    capacity: &'a [f64],
    /// Up to this many members a constraint is solved exactly at once.
    big: usize,
}

impl FirstSolves<'_> {
    /// Levels of constraints `start..start + lam.len()`. Small constraints (a circuit of a few
    /// chargers) are solved exactly. A larger one (a panel already) gets a lower bound,
    /// `D(L) <= Σ a·F + L·Σ a·w` gives `λ >= (capacity − Σ a·F) / Σ a·w`, and is solved only
    /// when it reaches the top of the heap, by then with fewer unfrozen members.
    fn levels(&self, start: usize, lam: &mut [f64]) {
        let mut events: Vec<(f64, f64)> = Vec::new();
        for (i, l) in lam.iter_mut().enumerate() {
            let a = start + i;
            let mem_a = &self.mem[self.off[a]..self.off[a] + self.len[a]];
            let k = self.act_k[a];
            let kw = k % SLOTS == N_PHASES;
            if self.len[a] <= self.big {
                *l = saturation_level(
                    mem_a,
                    kw,
                    self.fill,
                    0.0,
                    self.capacity[k],
                    (0.0, f64::INFINITY),
                    &mut events,
                );
                continue;
            }
            let (mut base, mut slope) = (0.0, 0.0);
            for &c in mem_a {
                let x = &self.fill[c as usize];
                let co = x.coef(kw);
                base += co * x.floor;
                slope += co * x.weight;
            }
            let lb = (self.capacity[k] - base) / slope;
            *l = if lb > 0.0 { lb } else { 0.0 };
        }
    }
}

/// Progressive filling on the model: freeze level per admitted charger (+inf: only its cap binds)
/// and, per charger, the constraint that froze it (`node * 4 + slot`).
///
/// Event-driven rather than in rounds: every binding constraint (node × slot whose members'
/// caps exceed it) gets its saturation level once; a heap pops the lowest. A constraint's level
/// only rises when members of it freeze elsewhere (their load becomes fixed at a level no higher
/// than its own), so a level computed before such a freeze is a lower bound: popped while stale,
/// it is recomputed and pushed back; popped while current, it is the lowest level of all
/// constraints and saturates, freezing its members. Big constraints high up the tree are thus
/// only re-solved when they could be next, not after every freeze below them.
pub fn water_fill(topo: &Topology, m: &Model, admitted: &[bool]) -> (Vec<f64>, Vec<Option<usize>>) {
    water_fill_split(topo, m, admitted, par::halves(topo, true))
}

/// `water_fill` with the first solves of the constraints split over two threads when `halves`.
fn water_fill_split(
    topo: &Topology,
    m: &Model,
    admitted: &[bool],
    halves: Option<Halves>,
) -> (Vec<f64>, Vec<Option<usize>>) {
    let n = topo.n_chargers();
    let nn = topo.n_nodes();
    let nk = nn * SLOTS;
    let mut level = vec![f64::INFINITY; n];
    let mut frozen_by: Vec<Option<usize>> = vec![None; n];
    // In one pass over the chargers: their fill records; the largest possible load per
    // constraint and how many members each has (admitted chargers with a coefficient on it),
    // both summed up the tree below; the highest level at which any member can still rise
    // (scale for probing large constraints).
    let mut dmax = vec![0.0f64; nk];
    let mut count = vec![0usize; nk];
    // Chargers `chargers` (parents from `node_base` on in `dmax`, `count`): their fill records
    // and the highest cap level among the admitted ones (the max of exact values: the same
    // whatever the split).
    let records = |chargers: std::ops::Range<usize>,
                   node_base: usize,
                   dmax: &mut [f64],
                   count: &mut [usize]| {
        let mut fill: Vec<Fill> = Vec::with_capacity(chargers.len());
        let mut top_level = 0.0;
        for c in chargers {
            let (f, u, w) = (m.floor[c], m.cap[c], m.weight[c]);
            let co = topo.slot_coefs(c);
            debug_assert!(co[..N_PHASES].iter().all(|&x| x == 0.0 || x == 1.0));
            let x = Fill {
                floor: f,
                cap: u,
                weight: w,
                floor_level: f / w,
                cap_level: u / w,
                kw_coef: co[N_PHASES],
            };
            fill.push(x);
            if admitted[c] {
                top_level = f64::max(top_level, x.cap_level);
                let p = topo.hot(c).parent() - node_base;
                let d = &mut dmax[p * SLOTS..p * SLOTS + SLOTS];
                for (r, &a) in d.iter_mut().zip(co) {
                    *r += a * u;
                }
                let k = &mut count[p * SLOTS..p * SLOTS + SLOTS];
                for (r, &a) in k.iter_mut().zip(co) {
                    *r += usize::from(a != 0.0);
                }
            }
        }
        (fill, top_level)
    };
    let (fill, top_level) = match halves {
        Some(h) => {
            let (d0, d1) = dmax.split_at_mut(h.node_at * SLOTS);
            let (k0, k1) = count.split_at_mut(h.node_at * SLOTS);
            let ((mut fill, top0), (fill1, top1)) = par::join(
                true,
                || records(0..h.charger_at, 0, d0, k0),
                || records(h.charger_at..n, h.node_at, d1, k1),
            );
            fill.extend_from_slice(&fill1);
            (fill, f64::max(top0, top1))
        }
        None => records(0..n, 0, &mut dmax, &mut count),
    };
    for &i in topo.node_order().iter().rev() {
        if let Some(par) = topo.nodes[i].parent {
            add_row(&mut dmax, par, i);
            add_row(&mut count, par, i);
        }
    }
    // Binding constraints and their members (flat): `mem[off[a]..off[a] + len[a]]` are the
    // members of active constraint `a` not yet known to be frozen (charger indices, 4 bytes: a
    // member's coefficient is `Fill::coef`), in charger order. Sized from
    // the counts, then filled in one pass over the chargers (`cursor`: next free entry of each
    // binding node × slot; `usize::MAX` where the node × slot does not bind).
    let mut act_k: Vec<usize> = Vec::new();
    let mut off: Vec<usize> = Vec::new();
    let mut len: Vec<usize> = Vec::new();
    let mut cursor = vec![usize::MAX; nk];
    let mut total = 0;
    for k in 0..nk {
        let cap = m.capacity[k];
        if !(cap == f64::INFINITY || dmax[k] <= cap) {
            act_k.push(k);
            off.push(total);
            len.push(count[k]);
            cursor[k] = total;
            total += count[k];
        }
    }
    // Bit `slot` set: the node × slot binds (most nodes have few binding slots, many none).
    let mut binding_slots = vec![0u8; nn];
    for &k in &act_k {
        binding_slots[k / SLOTS] |= 1 << (k % SLOTS);
    }
    // (A site of more than 4 billion chargers would not fit in memory.)
    assert!(u32::try_from(n).is_ok(), "more chargers than u32 indices");
    let mut mem: Vec<u32> = vec![0; total];
    for c in 0..n {
        if !admitted[c] {
            continue;
        }
        let co = topo.slot_coefs(c);
        let mut on: u8 = 0;
        for (slot, &coef) in co.iter().enumerate() {
            on |= u8::from(coef != 0.0) << slot;
        }
        for &i in topo.ancestors(c) {
            let mut bits = binding_slots[i] & on;
            while bits != 0 {
                let slot = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let cur = &mut cursor[i * SLOTS + slot];
                mem[*cur] = c as u32;
                *cur += 1;
            }
        }
    }
    let na = act_k.len();
    let mut fixed = vec![0.0; na];
    let mut lam = vec![f64::INFINITY; na];
    let mut dirty = vec![false; na];
    let mut done = vec![false; na];
    let mut frozen = vec![false; n];
    // What each charger adds to a phase and to a kW constraint once frozen (coefficient × the
    // value it froze at: its load is fixed from then on).
    let mut frozen_val = vec![[0.0; 2]; n];
    let is_kw = |a: usize| act_k[a] % SLOTS == N_PHASES;
    let mut events: Vec<(f64, f64)> = Vec::new();
    let mut initial: Vec<(u64, usize)> = Vec::with_capacity(na);
    // Initial keys (`FirstSolves::levels`): exact for small constraints, a lower bound for large
    // ones; on a large site two ranges of constraints on two threads.
    const BIG: usize = 16;
    let first = FirstSolves {
        mem: &mem,
        off: &off,
        len: &len,
        act_k: &act_k,
        fill: &fill,
        capacity: &m.capacity,
        big: BIG,
    };
    match halves {
        Some(_) if na > 1 => {
            // Two ranges of constraints with about as much work each: an exact solve sorts its
            // members' events (some 16 times the cost per member of a bound's one pass).
            let cost = |l: usize| if l <= BIG { 16 * l + 16 } else { l };
            let work: usize = len.iter().map(|&l| cost(l)).sum();
            let mid = len
                .iter()
                .scan(0, |acc, &l| {
                    *acc += cost(l);
                    Some(*acc)
                })
                .position(|acc| acc >= work / 2)
                .map_or(na, |a| a + 1)
                .min(na);
            let (lam0, lam1) = lam.split_at_mut(mid);
            par::join(true, || first.levels(0, lam0), || first.levels(mid, lam1));
        }
        _ => first.levels(0, &mut lam),
    }
    for a in 0..na {
        if len[a] <= BIG {
            if lam[a] < f64::INFINITY {
                initial.push((order_key(lam[a]), a));
            } else {
                done[a] = true;
            }
        } else {
            dirty[a] = true;
            initial.push((order_key(lam[a]), a));
        }
    }
    let mut heap = LevelQueue::new(initial);
    while let Some((l, a)) = heap.pop() {
        if done[a] {
            continue;
        }
        let (o, k) = (off[a], act_k[a]);
        let kw = is_kw(a);
        // A constraint is current while none of its members froze since it was solved (they
        // leave the live list, and add their fixed load, when it is next solved). One scan
        // tells; it is the scan that saturating the constraint makes anyway. The compaction
        // goes on from the first frozen member the scan finds (those before it stay).
        let mut j = 0;
        let mut end = len[a];
        let list = &mut mem[o..o + end];
        let stale = dirty[a] || {
            while j < end && !frozen[list[j] as usize] {
                j += 1;
            }
            j < end
        };
        if stale {
            // Frozen members are fixed load now; the last live entry takes a frozen one's place
            // (entries past the new end are never read again).
            let mut fx = fixed[a];
            let slot = usize::from(kw);
            while j < end {
                let c = list[j] as usize;
                if frozen[c] {
                    fx += frozen_val[c][slot];
                    end -= 1;
                    list[j] = list[end];
                } else {
                    j += 1;
                }
            }
            fixed[a] = fx;
            len[a] = end;
            let live = &mem[o..o + end];
            let cap = m.capacity[k];
            let mut window = (l, f64::INFINITY);
            if end > BIG {
                // Large: probe a higher level first (one cheap pass). Still below capacity
                // there, that level is a better lower bound: push it back and let the
                // constraints below it freeze their members first. Otherwise solve, with the
                // root bracketed between the old bound and the probe.
                // (Above every member's cap level a constraint is as full as it gets: solve.)
                let probe = (2.0 * l).max(0.125 * top_level);
                if probe > l && probe < top_level {
                    let d = load_at(live, kw, &fill, fixed[a], probe);
                    if d < cap - FULL_TOL * (1.0 + cap.abs()) {
                        // Only a lower bound: solve when it comes back up.
                        dirty[a] = true;
                        lam[a] = probe;
                        heap.push(probe, a);
                        continue;
                    }
                    window = (l, probe);
                }
            }
            lam[a] = saturation_level(live, kw, &fill, fixed[a], cap, window, &mut events);
            dirty[a] = false;
            if lam[a] < f64::INFINITY {
                heap.push(lam[a], a);
            } else {
                done[a] = true; // can no longer saturate
            }
            continue;
        }
        done[a] = true;
        // Current: every member is live (the scan above found none frozen).
        for &c in &mem[o..o + len[a]] {
            let c = c as usize;
            frozen[c] = true;
            level[c] = l;
            frozen_by[c] = Some(k);
            let x = &fill[c];
            let v = (x.weight * l).clamp(x.floor, x.cap);
            frozen_val[c] = [1.0 * v, x.kw_coef * v];
        }
    }
    (level, frozen_by)
}

/// The raise pass keeps every value within `limit · RAISE_FIT` (a limit that is exactly tight
/// before the raise must not read as broken from rounding; the envelope's own tolerance is
/// larger, so it never cuts a raised value).
const RAISE_FIT: f64 = 1.0 + 1e-10;
/// A limit within this fraction of its value before the raise counts as tight.
const TIGHT_REL: f64 = 1e-9;

/// Value over limit (a 0 A limit holds a zero value; NaN counts as over).
#[inline]
fn ratio(value: f64, limit: f64) -> f64 {
    if value <= 0.0 {
        0.0
    } else if limit > 0.0 {
        value / limit
    } else {
        f64::INFINITY
    }
}

/// Result of the raise pass: per charger the value to request (line A per terminal) and, for
/// chargers it raised, the node (and phase; `None` = kW) that stopped them below their cap.
struct Raised {
    value_a: Vec<f64>,
    node: Vec<Option<usize>>,
    phase: Vec<Option<usize>>,
}

/// Raise pass after water-filling. The water-filling bounds a line-to-line load linearly
/// (`I_AB + I_CA` on line A), up to 2/√3 (≈ 15 %) above the exact phasor magnitude
/// `√(I_AB² + I_CA² + I_AB·I_CA)` the envelope counts, so it stops line-to-line sessions (and
/// their neighbours) below caps and plan targets that fit. On a site with line-to-line loads,
/// every admitted charger below its cap (plan target, reclaim cap or charger maximum) is raised
/// here toward it while every node's EXACT line currents and kW hold as the envelope counts them
/// (each terminal at max(value, held), non-charger load included). Nodes are visited deepest
/// first; at each node, the chargers on a limit that is already tight there stay where they are
/// and the others share one weighted level `L` (value `min(cand, max(x, w·L))`, the largest that
/// fits), so the split stays max-min fair within every node, and a node only ever lowers what
/// deeper nodes allowed.
/// Line currents only grow when a charger rises (every contribution to a line lies within ±30°
/// of the others), so what held at a deeper node still holds at the end, and the level at a node
/// is found exactly: the values are piecewise linear in `L`, so the node's line currents are
/// piecewise quadratic in magnitude; walking the members' breakpoints in order finds the piece
/// where a limit is first crossed and solves for the crossing there.
fn raise_to_exact(
    topo: &Topology,
    m: &Model,
    cnt: &mut Counting,
    level_a: &[f64],
    admitted: &[bool],
    halves: Option<Halves>,
) -> Raised {
    let n = topo.n_chargers();
    let mut out = Raised {
        value_a: level_a.to_vec(),
        node: vec![None; n],
        phase: vec![None; n],
    };
    // Without line-to-line loads the linear model is exact: nothing to raise.
    let root = topo.node_order().first().copied();
    if !root.is_some_and(|r| topo.node_has_line_to_line(r)) {
        return out;
    }
    let mut raisable = vec![false; n];
    par::each(halves, &mut raisable, |c| {
        admitted[c] && level_a[c] < m.set_cap[c] - 1e-9
    });
    if !raisable.iter().any(|&r| r) {
        return out;
    }
    par::each(halves, &mut cnt.s, |c| {
        if admitted[c] {
            level_a[c]
        } else {
            0.0
        }
    });
    let nn = topo.n_nodes();
    let mut loads = NodeLoads::new(nn);
    node_loads(topo, cnt, &mut loads);
    let mut cand = vec![0.0; n];
    par::each(halves, &mut cand, |c| {
        if raisable[c] {
            m.set_cap[c]
        } else {
            level_a[c]
        }
    });
    // Summed bottom-up: a node where even these bounds fit needs no look at its members.
    // (Each charger's bound at its parent; the halves share no parent.)
    let mut bound = vec![[0.0; N_PHASES + 1]; nn];
    let add_bounds =
        |chargers: std::ops::Range<usize>, node_base: usize, bound: &mut [[f64; N_PHASES + 1]]| {
            for c in chargers {
                if raisable[c] && cand[c] > level_a[c] {
                    let u = rise_of(topo, level_a, &cnt.held, c, cand[c]);
                    let b = &mut bound[topo.hot(c).parent() - node_base];
                    for (bk, uk) in b.iter_mut().zip(u) {
                        *bk += uk;
                    }
                }
            }
        };
    match halves {
        Some(h) => {
            let (first, second) = bound.split_at_mut(h.node_at);
            par::join(
                true,
                || add_bounds(0..h.charger_at, 0, first),
                || add_bounds(h.charger_at..n, h.node_at, second),
            );
        }
        None => add_bounds(0..n, 0, &mut bound),
    }
    let at = RaiseAt {
        topo,
        weight: &m.weight,
        held: &cnt.held,
        loads: &loads,
        level_a,
        raisable: &raisable,
    };
    let mut sc = RaiseScratch::default();
    // Nodes without nodes below them (circuits) share no charger and no bound: on a large site
    // the two halves raise theirs on two threads first, then the walk up the tree skips them.
    // (A node only depends on the nodes below it, so the order among these does not matter;
    // the bounds still add up the tree in the one order below.)
    let leaves_first = halves.is_some();
    if let Some(h) = halves {
        let (cand0, cand1) = cand.split_at_mut(h.charger_at);
        let (node0, node1) = out.node.split_at_mut(h.charger_at);
        let (phase0, phase1) = out.phase.split_at_mut(h.charger_at);
        let (bound0, bound1) = bound.split_at_mut(h.node_at);
        let leaves = |nodes: std::ops::Range<usize>,
                      mut o: RaiseOut<'_>,
                      bound: &mut [[f64; N_PHASES + 1]]| {
            let mut sc = RaiseScratch::default();
            for node in nodes.clone() {
                if topo.node_is_leaf(node) {
                    at.node(node, &mut o, &mut bound[node - nodes.start], &mut sc);
                }
            }
        };
        let at0 = RaiseOut {
            base: 0,
            cand: cand0,
            node: node0,
            phase: phase0,
        };
        let at1 = RaiseOut {
            base: h.charger_at,
            cand: cand1,
            node: node1,
            phase: phase1,
        };
        par::join(
            true,
            || leaves(0..h.node_at, at0, bound0),
            || leaves(h.node_at..nn, at1, bound1),
        );
    }
    let add_to_parent = |bound: &mut [[f64; N_PHASES + 1]], node: usize| {
        if let Some(p) = topo.nodes[node].parent {
            let u = bound[node];
            for (bk, uk) in bound[p].iter_mut().zip(u) {
                *bk += uk;
            }
        }
    };
    match halves {
        Some(h) if leaves_first => {
            // The other nodes level by level, deepest first: nodes of one depth share no charger
            // and each depends only on the nodes below it, all done by then; a node whose
            // chargers all lie in one half is raised on that half's thread (its new bound
            // returned), one holding both halves (or none) here. Each level's bounds are then
            // added to their parents in the walk's order (a parent's children all share one
            // depth), so every sum is the walk's.
            let mut depth = vec![0usize; nn];
            for &node in topo.node_order() {
                if let Some(p) = topo.nodes[node].parent {
                    depth[node] = depth[p] + 1;
                }
            }
            let deepest = depth.iter().copied().max().unwrap_or(0);
            let mut levels: Vec<Vec<usize>> = vec![Vec::new(); deepest + 1];
            for &node in topo.node_order().iter().rev() {
                levels[depth[node]].push(node);
            }
            let (mut first, mut second, mut both) = (Vec::new(), Vec::new(), Vec::new());
            for level in levels.iter().rev() {
                first.clear();
                second.clear();
                both.clear();
                for &node in level {
                    if topo.node_is_leaf(node) {
                        continue; // raised above
                    }
                    match topo.chargers_below(node) {
                        [a, .., z] | [a @ z] if *z < h.charger_at || *a >= h.charger_at => {
                            if *z < h.charger_at {
                                first.push(node);
                            } else {
                                second.push(node);
                            }
                        }
                        _ => both.push(node),
                    }
                }
                if !(first.is_empty() && second.is_empty()) {
                    let (cand0, cand1) = cand.split_at_mut(h.charger_at);
                    let (node0, node1) = out.node.split_at_mut(h.charger_at);
                    let (phase0, phase1) = out.phase.split_at_mut(h.charger_at);
                    let bound_now: &[[f64; N_PHASES + 1]] = &bound;
                    let raise = |nodes: &[usize], mut o: RaiseOut<'_>| {
                        let mut sc = RaiseScratch::default();
                        nodes
                            .iter()
                            .map(|&node| {
                                let mut b = bound_now[node];
                                at.node(node, &mut o, &mut b, &mut sc);
                                b
                            })
                            .collect::<Vec<_>>()
                    };
                    let at0 = RaiseOut {
                        base: 0,
                        cand: cand0,
                        node: node0,
                        phase: phase0,
                    };
                    let at1 = RaiseOut {
                        base: h.charger_at,
                        cand: cand1,
                        node: node1,
                        phase: phase1,
                    };
                    let (b0, b1) = par::join(
                        first.len() + second.len() > 1,
                        || raise(&first, at0),
                        || raise(&second, at1),
                    );
                    for (&node, b) in first.iter().zip(b0).chain(second.iter().zip(b1)) {
                        bound[node] = b;
                    }
                }
                for &node in &both {
                    let mut o = RaiseOut {
                        base: 0,
                        cand: &mut cand,
                        node: &mut out.node,
                        phase: &mut out.phase,
                    };
                    at.node(node, &mut o, &mut bound[node], &mut sc);
                }
                for &node in level {
                    add_to_parent(&mut bound, node);
                }
            }
        }
        _ => {
            for &node in topo.node_order().iter().rev() {
                let mut o = RaiseOut {
                    base: 0,
                    cand: &mut cand,
                    node: &mut out.node,
                    phase: &mut out.phase,
                };
                at.node(node, &mut o, &mut bound[node], &mut sc);
                add_to_parent(&mut bound, node);
            }
        }
    }
    for c in 0..n {
        if raisable[c] {
            out.value_a[c] = cand[c];
            if out.node[c].is_none() {
                // Raised to its cap: nothing at any node stopped it.
                out.node[c] = Some(usize::MAX);
            }
        }
    }
    out
}

/// What the raise pass at one node reads.
struct RaiseAt<'a> {
    topo: &'a Topology,
    weight: &'a [f64],
    held: &'a [[f64; N_PHASES]],
    loads: &'a NodeLoads,
    level_a: &'a [f64],
    raisable: &'a [bool],
}

/// What the raise pass at a node writes, for chargers `base..base + cand.len()` (a half of the
/// site, or all of it).
struct RaiseOut<'a> {
    base: usize,
    cand: &'a mut [f64],
    node: &'a mut [Option<usize>],
    phase: &'a mut [Option<usize>],
}

#[derive(Default)]
struct RaiseScratch {
    members: Vec<usize>,
    brk: Vec<(f64, usize, usize, bool)>,
}

impl RaiseAt<'_> {
    /// What a charger would add at a node if it rose to `to`: per site phase an upper bound of
    /// the line current (every terminal coefficient has magnitude 1) and, last, the watts.
    fn rise(&self, c: usize, to: f64) -> [f64; N_PHASES + 1] {
        rise_of(self.topo, self.level_a, self.held, c, to)
    }

    /// The raise at one node: lowers the candidates of the chargers below it that a limit of
    /// this node stops, and leaves in `bound` what those can still add.
    fn node(
        &self,
        node: usize,
        out: &mut RaiseOut<'_>,
        bound: &mut [f64; N_PHASES + 1],
        sc: &mut RaiseScratch,
    ) {
        let topo = self.topo;
        let loads = self.loads;
        let (level_a, raisable) = (self.level_a, self.raisable);
        let base = out.base;
        let spec = &topo.nodes[node];
        let kw_limit_w = spec.power_limit_kw.map_or(f64::INFINITY, |k| k * 1000.0);
        // A limit of this node already tight at the water-filling values (a phase without
        // line-to-line loads, where the linear model was exact, or the kW cap) lets none of the
        // chargers on it rise: they stay, the others share the level.
        let tight_at = |value: f64, limit: f64| !(ratio(value, limit) < 1.0 - TIGHT_REL);
        let line: [f64; N_PHASES] = std::array::from_fn(|ph| loads.line_a(node, ph));
        let tight_ph: [bool; N_PHASES] =
            std::array::from_fn(|ph| tight_at(line[ph], spec.phase_limit_a[ph]));
        let tight_kw = tight_at(loads.power_w[node], kw_limit_w);
        let allow = |limit: f64| if limit > 0.0 { limit * RAISE_FIT } else { 0.0 };
        let u = *bound;
        let quick = !tight_kw
            && !tight_ph.iter().any(|&t| t)
            && loads.power_w[node] + u[N_PHASES] <= allow(kw_limit_w)
            && (0..N_PHASES).all(|ph| line[ph] + u[ph] <= allow(spec.phase_limit_a[ph]));
        if !quick {
            'slow: {
                sc.members.clear();
                sc.members.extend(
                    topo.chargers_below(node)
                        .iter()
                        .copied()
                        .filter(|&c| raisable[c] && out.cand[c - base] > level_a[c]),
                );
                if sc.members.is_empty() {
                    break 'slow;
                }
                sc.members.retain(|&c| {
                    let phases = topo.hot(c).site_phases();
                    let on_tight = phases.iter().position(|&ph| tight_ph[usize::from(ph)]);
                    if tight_kw || on_tight.is_some() {
                        out.cand[c - base] = level_a[c];
                        out.node[c - base] = Some(node);
                        out.phase[c - base] = if tight_kw {
                            None
                        } else {
                            on_tight.map(|k| usize::from(phases[k]))
                        };
                        false
                    } else {
                        true
                    }
                });
                if sc.members.is_empty() {
                    break 'slow;
                }
                // Allowed values (A, W) of the limits not tight before the raise (a value of 0 always
                // fits; a zero limit allows only that). Tight ones are left out: no charger left on them
                // moves them.
                let allow = |limit: f64| if limit > 0.0 { limit * RAISE_FIT } else { 0.0 };
                let allow_ph: [f64; N_PHASES] = std::array::from_fn(|ph| {
                    if tight_ph[ph] {
                        f64::INFINITY
                    } else {
                        allow(spec.phase_limit_a[ph])
                    }
                });
                let allow_w = if tight_kw {
                    f64::INFINITY
                } else {
                    allow(kw_limit_w)
                };
                // Every member at its candidate value: most nodes fit, and need no search.
                {
                    let mut re = loads.re[node];
                    let mut im = loads.im[node];
                    let mut pw = loads.power_w[node];
                    for &c in &sc.members {
                        let x = level_a[c];
                        let r = out.cand[c - base];
                        let held = &self.held[c];
                        let v = topo.hot(c).watts_per_terminal_a();
                        let mut d = [0.0; N_PHASES];
                        for k in 0..topo.hot(c).terminals() {
                            d[k] = r.max(held[k]) - x.max(held[k]);
                            pw += d[k] * v;
                        }
                        for e in topo.terminal_entries(c) {
                            re[e.phase] += d[e.terminal] * e.re;
                            im[e.phase] += d[e.terminal] * e.im;
                        }
                    }
                    if pw <= allow_w
                        && (0..N_PHASES).all(|ph| {
                            re[ph] * re[ph] + im[ph] * im[ph] <= allow_ph[ph] * allow_ph[ph]
                        })
                    {
                        break 'slow;
                    }
                }
                // Each member terminal rises linearly (slope w per unit of level) between
                // `max(x, held)/w` and `cand/w`: the line currents and the power are piecewise linear in
                // the level. Walk the breakpoints in order; on the first piece where a limit is crossed,
                // solve for the crossing exactly (a quadratic for a phasor magnitude, linear for kW).
                sc.brk.clear();
                for &c in &sc.members {
                    let (x, w) = (level_a[c], self.weight[c]);
                    let held = &self.held[c];
                    for (k, &h) in held.iter().enumerate().take(topo.hot(c).terminals()) {
                        let start = x.max(h);
                        if start < out.cand[c - base] {
                            sc.brk.push((start / w, c, k, true));
                            sc.brk.push((out.cand[c - base] / w, c, k, false));
                        }
                    }
                }
                let mut re = loads.re[node];
                let mut im = loads.im[node];
                let mut pw = loads.power_w[node];
                let mut d_re = [0.0; N_PHASES];
                let mut d_im = [0.0; N_PHASES];
                let mut d_pw = 0.0;
                let mut cur = sc.brk.iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
                sc.brk.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
                // (level at which a limit is first crossed, which limit: phase or N_PHASES = kW)
                let mut crossing: Option<(f64, usize)> = None;
                for &(l, c, k, starts) in sc.brk.iter() {
                    let dl = l - cur;
                    if dl > 0.0 {
                        let mut nre = re;
                        let mut nim = im;
                        for ph in 0..N_PHASES {
                            nre[ph] += d_re[ph] * dl;
                            nim[ph] += d_im[ph] * dl;
                        }
                        let npw = pw + d_pw * dl;
                        let mut first = (f64::INFINITY, N_PHASES);
                        if !(npw <= allow_w) {
                            let t = if d_pw > 0.0 {
                                (allow_w - pw) / d_pw
                            } else {
                                0.0
                            };
                            first = (t.clamp(0.0, dl), N_PHASES);
                        }
                        for ph in 0..N_PHASES {
                            let lim = allow_ph[ph];
                            if nre[ph] * nre[ph] + nim[ph] * nim[ph] <= lim * lim {
                                continue;
                            }
                            // |(re + d_re t, im + d_im t)|² = lim², the root in [0, dl].
                            let a = d_re[ph] * d_re[ph] + d_im[ph] * d_im[ph];
                            let bh = re[ph] * d_re[ph] + im[ph] * d_im[ph];
                            let c0 = re[ph] * re[ph] + im[ph] * im[ph] - lim * lim;
                            let t = if !(c0 < 0.0) || !(a > 0.0) {
                                0.0
                            } else {
                                let disc = (bh * bh - a * c0).max(0.0).sqrt();
                                if bh >= 0.0 {
                                    -c0 / (bh + disc)
                                } else {
                                    (disc - bh) / a
                                }
                            };
                            let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, dl) };
                            if t < first.0 {
                                first = (t, ph);
                            }
                        }
                        if first.0 < f64::INFINITY {
                            crossing = Some((cur + first.0, first.1));
                            break;
                        }
                        re = nre;
                        im = nim;
                        pw = npw;
                        cur = l;
                    }
                    let sign = if starts { 1.0 } else { -1.0 };
                    let w = self.weight[c] * sign;
                    for e in topo.terminal_entries(c).iter().filter(|e| e.terminal == k) {
                        d_re[e.phase] += w * e.re;
                        d_im[e.phase] += w * e.im;
                    }
                    d_pw += w * topo.hot(c).watts_per_terminal_a();
                }
                let Some((lo, tight)) = crossing else {
                    break 'slow; // every member reaches its cap
                };
                for &c in &sc.members {
                    let r = (self.weight[c] * lo)
                        .max(level_a[c])
                        .min(out.cand[c - base]);
                    if r < out.cand[c - base] {
                        out.cand[c - base] = r;
                        out.node[c - base] = Some(node);
                        out.phase[c - base] = (tight < N_PHASES).then_some(tight);
                    }
                }
            }
            // What the members below can still add, after this node lowered some of them.
            let mut u = [0.0; N_PHASES + 1];
            for &c in &sc.members {
                if out.cand[c - base] > level_a[c] {
                    for (uk, rk) in u.iter_mut().zip(self.rise(c, out.cand[c - base])) {
                        *uk += rk;
                    }
                }
            }
            *bound = u;
        }
    }
}

/// What charger `c` would add at a node if it rose from its level to `to` (see `RaiseAt::rise`).
fn rise_of(
    topo: &Topology,
    level_a: &[f64],
    held: &[[f64; N_PHASES]],
    c: usize,
    to: f64,
) -> [f64; N_PHASES + 1] {
    let (x, h) = (level_a[c], &held[c]);
    let mut u = [0.0; N_PHASES + 1];
    for e in topo.terminal_entries(c) {
        u[e.phase] += to.max(h[e.terminal]) - x.max(h[e.terminal]);
    }
    let watts = topo.hot(c).watts_per_terminal_a();
    for &hk in h.iter().take(topo.hot(c).terminals()) {
        u[N_PHASES] += (to.max(hk) - x.max(hk)) * watts;
    }
    u
}

/// What the pass after the raise reads: per charger the allocator's reason and request from the
/// raised value, then the envelope's sanitising of that request.
struct Settle<'a> {
    topo: &'a Topology,
    m: &'a Model,
    ch: &'a ChargerInputs<'a>,
    p: &'a EnvelopeParams,
    admitted: &'a [bool],
    /// The model's reasons (admission, hysteresis, ...).
    binding: &'a [Binding],
    frozen_by: &'a [Option<usize>],
    raised: &'a Raised,
}

/// What it writes, for chargers `base..`: the sanitised value (line A per terminal) and the
/// decision's reason, node and phase.
struct Settled<'a> {
    base: usize,
    s: &'a mut [f64],
    binding: &'a mut [Binding],
    node: &'a mut [Option<usize>],
    phase: &'a mut [Option<usize>],
}

crate::par::split_rows!(Settled {
    s,
    binding,
    node,
    phase
});

impl Settle<'_> {
    fn chargers(&self, out: Settled<'_>) {
        let Settled {
            base,
            s,
            binding: dec_binding,
            node: bnode,
            phase: bphase,
        } = out;
        let (topo, m, raised) = (self.topo, self.m, self.raised);
        for i in 0..s.len() {
            let c = base + i;
            let admitted = self.admitted[c];
            let mut binding = self.binding[c];
            // The request: AC in A, DC in W, 0 when not admitted.
            let (mut req_a, mut req_w) = (0.0, 0.0);
            if admitted {
                let x = raised.value_a[c];
                match raised.node[c] {
                    Some(node) if x < m.set_cap[c] - 1e-9 => {
                        bnode[i] = Some(node);
                        match raised.phase[c] {
                            Some(ph) => {
                                binding = Binding::NodePhase;
                                bphase[i] = Some(ph);
                            }
                            None => binding = Binding::NodePower,
                        }
                    }
                    Some(_) => binding = m.cap_binding[c],
                    None => match self.frozen_by[c] {
                        Some(k) if x < m.set_cap[c] - 1e-9 => {
                            let slot = k % SLOTS;
                            bnode[i] = Some(k / SLOTS);
                            if slot < N_PHASES {
                                binding = Binding::NodePhase;
                                bphase[i] = Some(slot);
                            } else {
                                binding = Binding::NodePower;
                            }
                        }
                        _ => binding = m.cap_binding[c],
                    },
                }
                let snapped = snap_down(topo, c, x);
                if snapped < x - 1e-9 && matches!(binding, Binding::None | Binding::ChargerMax) {
                    binding = Binding::Step;
                }
                let spec = topo.hot(c);
                match spec.kind {
                    ChargerKind::Ac => req_a = snapped,
                    ChargerKind::Dc => req_w = spec.dc_power_w(snapped),
                }
            }
            let (x, b) = sanitise_requested(topo, c, req_a, req_w, self.ch, self.p);
            s[i] = x;
            let wanted = match topo.hot(c).kind {
                ChargerKind::Ac => req_a,
                ChargerKind::Dc => topo.hot(c).dc_line_a(req_w),
            };
            // Keep the allocator's reason unless the envelope changed the value.
            dec_binding[i] = if admitted && (x - wanted).abs() <= 1e-9 * (1.0 + wanted) {
                binding
            } else if admitted {
                bnode[i] = None;
                bphase[i] = None;
                b
            } else {
                binding
            };
        }
    }
}

pub fn allocate(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    demand: &Demand<'_>,
    p: &AllocatorParams,
    explain: bool,
) -> CoreResult<Allocation> {
    let halves = par::halves(topo, true);
    allocate_split(topo, ch, nodes, demand, p, explain, halves)
}

/// `allocate` with its work split into `halves` on two threads (`None`: one thread). The result
/// is the same either way, bit for bit.
fn allocate_split(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    demand: &Demand<'_>,
    p: &AllocatorParams,
    explain: bool,
    halves: Option<Halves>,
) -> CoreResult<Allocation> {
    let n = topo.n_chargers();
    ch.check(n)?;
    nodes.check(topo.n_nodes())?;
    p.envelope.validate()?;
    if !(p.margin_a >= 0.0 && p.margin_a.is_finite()) {
        return Err(CoreError::input(
            "margin_a",
            None,
            format!("must be finite and >= 0, got {}", p.margin_a),
        ));
    }
    if p.admission_hysteresis_s.is_nan() {
        return Err(CoreError::input("admission_hysteresis_s", None, "is NaN"));
    }
    if !(p.reclaim_ramp_s >= 0.0 && p.reclaim_ramp_s.is_finite()) {
        return Err(CoreError::input(
            "reclaim_ramp_s",
            None,
            format!("must be finite and >= 0, got {}", p.reclaim_ramp_s),
        ));
    }
    validate_demand(demand, n)?;
    let (m, admitted, binding, mut cnt) = model_and_admission(topo, ch, nodes, demand, p, halves);
    let (level, frozen_by) = water_fill_split(topo, &m, &admitted, halves);
    // Setpoints from freeze levels; then the envelope, in this same call.
    let mut level_a = vec![0.0; n];
    let levels = |base: usize, level_a: &mut [f64]| {
        for (i, v) in level_a.iter_mut().enumerate() {
            let c = base + i;
            if !admitted[c] {
                continue;
            }
            let l = level[c];
            *v = if l == f64::INFINITY {
                m.set_cap[c]
            } else {
                (m.weight[c] * l).clamp(m.set_floor[c], m.set_cap[c])
            };
        }
    };
    match halves {
        Some(h) => {
            let (first, second) = level_a.split_at_mut(h.charger_at);
            par::join(true, || levels(0, first), || levels(h.charger_at, second));
        }
        None => levels(0, &mut level_a),
    }
    // The counting the model was built on (it does not depend on the requests).
    let raised = raise_to_exact(topo, &m, &mut cnt, &level_a, &admitted, halves);
    // The counting does not depend on the requests: the one made before the raise serves.
    let mut dec = Decision {
        setpoint_a: vec![0.0; n],
        setpoint_w: vec![0.0; n],
        binding: vec![Binding::None; n],
        binding_node: vec![None; n],
        binding_phase: vec![None; n],
        binding_value: vec![f64::NAN; n],
        binding_limit: vec![f64::NAN; n],
        reason: Vec::new(),
    };
    let settle = Settle {
        topo,
        m: &m,
        ch,
        p: &p.envelope,
        admitted: &admitted,
        binding: &binding,
        frozen_by: &frozen_by,
        raised: &raised,
    };
    let all = Settled {
        base: 0,
        s: &mut cnt.s,
        binding: &mut dec.binding,
        node: &mut dec.binding_node,
        phase: &mut dec.binding_phase,
    };
    match halves {
        Some(h) => {
            let (first, second) = all.split_at(h.charger_at);
            par::join(true, || settle.chargers(first), || settle.chargers(second));
        }
        None => settle.chargers(all),
    }
    // Node values for allocator-bound reasons are filled by enforce_limits' final pass.
    enforce_limits(topo, &mut cnt, &mut dec, None, halves);
    finish(topo, ch, &cnt, &mut dec, explain, halves);
    Ok(Allocation {
        decision: dec,
        level_a,
        admitted,
    })
}

/// The model the allocator worked on (for certificates in tests and benchmarks).
pub fn allocation_model(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    demand: &Demand<'_>,
    p: &AllocatorParams,
) -> CoreResult<(Model, Vec<bool>)> {
    ch.check(topo.n_chargers())?;
    nodes.check(topo.n_nodes())?;
    validate_demand(demand, topo.n_chargers())?;
    let (m, admitted, _, _) =
        model_and_admission(topo, ch, nodes, demand, p, par::halves(topo, true));
    Ok((m, admitted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::tests::{
        as_request, cases, gen_inputs, gen_params, gen_site, grid_measured_over, Check, Inputs,
        Rng, NOW,
    };
    use crate::envelope::{enforce, enforce_split, Decision};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    struct Want {
        energy: Vec<f64>,
        departure: Vec<f64>,
        priority: Vec<f64>,
        target_a: Vec<f64>,
        target_w: Vec<f64>,
        behind: Vec<bool>,
        under_a: Vec<f64>,
        under_w: Vec<f64>,
    }

    impl Want {
        fn new(n: usize) -> Self {
            Want {
                energy: vec![20.0; n],
                departure: vec![f64::NAN; n],
                priority: vec![1.0; n],
                target_a: vec![f64::NAN; n],
                target_w: vec![f64::NAN; n],
                behind: vec![false; n],
                under_a: vec![f64::NAN; n],
                under_w: vec![f64::NAN; n],
            }
        }
        fn demand(&self) -> Demand<'_> {
            Demand {
                energy_wanted_kwh: &self.energy,
                departure_s: &self.departure,
                priority: &self.priority,
                target_a: &self.target_a,
                target_w: &self.target_w,
                behind_plan: &self.behind,
                read_under_a: &self.under_a,
                read_under_w: &self.under_w,
            }
        }
    }

    fn gen_want(r: &mut Rng, n: usize) -> Want {
        let mut w = Want::new(n);
        for c in 0..n {
            w.energy[c] = match r.below(6) {
                0 => 0.0,
                1 => f64::INFINITY,
                2 => -1.0,
                _ => r.range(0.1, 60.0),
            };
            w.departure[c] = if r.chance(0.2) {
                f64::NAN
            } else {
                NOW + r.range(-600.0, 30_000.0)
            };
            w.priority[c] = [1.0, 1.0, 2.0, 0.5, 3.0][r.below(5)];
            if r.chance(0.3) {
                w.target_a[c] = r.range(0.0, 32.0);
                w.target_w[c] = r.range(0.0, 20_000.0);
                w.behind[c] = r.chance(0.3);
            }
            if r.chance(0.5) {
                w.under_a[c] = r.range(0.0, 32.0);
                w.under_w[c] = r.range(0.0, 20_000.0);
            }
        }
        w
    }

    fn alloc(topo: &Topology, x: &Inputs, w: &Want, p: &AllocatorParams) -> Allocation {
        allocate(topo, &x.chargers(), &x.nodes(), &w.demand(), p, true).expect("valid inputs")
    }

    #[test]
    fn nobody_starts_or_rises_below_a_node_measured_over_its_limit() {
        // The water-filling shares the grid as if followed (25 A each); the envelope, which the
        // allocation passes, keeps a at what it was sent and b off while the grid is over.
        let (t, x) = grid_measured_over();
        let p = AllocatorParams::default();
        let a = alloc(&t, &x, &Want::new(2), &p);
        assert!(a.decision.setpoint_a[0] <= 16.0 + 1e-9, "{a:?}");
        assert_eq!(a.decision.setpoint_a[1], 0.0, "{a:?}");
        Check {
            topo: &t,
            x: &x,
            p: p.envelope,
        }
        .invariants(&a.decision)
        .unwrap();
    }

    /// Replace every non-finite or negative input by a plain one (for the fairness certificate,
    /// which is about the model, not about absurd telemetry).
    fn tame(x: &mut Inputs) {
        let fix = |v: &mut Vec<f64>, d: f64| {
            for a in v.iter_mut() {
                if !(a.is_finite() && *a >= 0.0 && *a < 1e6) {
                    *a = d;
                }
            }
        };
        for k in 0..3 {
            fix(&mut x.m[k], 0.0);
            fix(&mut x.o[k], 0.0);
        }
        fix(&mut x.last_a, 0.0);
        fix(&mut x.last_w, 0.0);
    }

    /// Linear-model coefficient of charger `c` in slot `slot` (1 per site phase it touches, W per
    /// A of every terminal for the kW slot): the model docs/envelope.md describes.
    fn lin(topo: &Topology, c: usize, slot: usize) -> f64 {
        let s = &topo.chargers[c];
        if slot == 3 {
            s.voltage_v * s.wiring.terminals() as f64
        } else if s.phases.contains(&slot) {
            1.0
        } else {
            0.0
        }
    }

    /// Max-min fairness certificate: every admitted session below its cap sits in a saturated
    /// constraint where no member above its floor has a higher weighted level.
    fn fairness(topo: &Topology, m: &Model, adm: &[bool], level_a: &[f64]) -> Result<(), String> {
        let n = topo.n_chargers();
        let cons: Vec<f64> = (0..n)
            .map(|c| {
                if adm[c] {
                    level_a[c].clamp(m.floor[c], m.cap[c])
                } else {
                    0.0
                }
            })
            .collect();
        let tol = |x: f64| 1e-6 * (1.0 + x.abs());
        for c in 0..n {
            if !adm[c] || cons[c] >= m.cap[c] - tol(m.cap[c]) {
                continue;
            }
            let norm = cons[c] / m.weight[c];
            let mut ok = false;
            for &i in topo.ancestors(c) {
                for slot in 0..4 {
                    if lin(topo, c, slot) == 0.0 {
                        continue;
                    }
                    let capk = m.capacity[i * 4 + slot];
                    let members: Vec<usize> = topo
                        .chargers_below(i)
                        .iter()
                        .copied()
                        .filter(|&d| adm[d] && lin(topo, d, slot) != 0.0)
                        .collect();
                    let load: f64 = members.iter().map(|&d| lin(topo, d, slot) * cons[d]).sum();
                    let top = members
                        .iter()
                        .filter(|&&d| cons[d] > m.floor[d] + 1e-9)
                        .map(|&d| cons[d] / m.weight[d])
                        .fold(f64::NEG_INFINITY, f64::max);
                    if load >= capk - tol(capk) && norm >= top - tol(top) {
                        ok = true;
                    }
                }
            }
            if !ok {
                return Err(format!(
                    "charger {c} at {} below cap {} without a bottleneck",
                    cons[c], m.cap[c]
                ));
            }
        }
        Ok(())
    }

    fn same(a: &Decision, b: &Decision) -> Result<(), String> {
        for c in 0..a.setpoint_a.len() {
            if (a.setpoint_a[c] - b.setpoint_a[c]).abs() > 1e-9 * (1.0 + a.setpoint_a[c]) {
                return Err(format!(
                    "charger {c}: {} vs {}",
                    a.setpoint_a[c], b.setpoint_a[c]
                ));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(192))]

        /// Whatever comes in, the allocator's output holds every limit and is a fixed point of
        /// the envelope (it has passed it).
        #[test]
        fn allocation_passes_the_envelope(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let topo = gen_site(&mut r, 14);
            let x = gen_inputs(&mut r, &topo);
            let w = gen_want(&mut r, topo.n_chargers());
            let p = AllocatorParams { envelope: gen_params(&mut r), ..Default::default() };
            let a = alloc(&topo, &x, &w, &p);
            let y = as_request(&topo, &x, &a.decision);
            let chk = Check { topo: &topo, x: &y, p: p.envelope };
            if let Err(e) = chk.invariants(&a.decision) {
                prop_assert!(false, "{e}");
            }
            let again = enforce(&topo, &y.chargers(), &y.nodes(), &p.envelope, false).unwrap();
            if let Err(e) = same(&a.decision, &again) {
                prop_assert!(false, "envelope changed the allocation: {e}");
            }
            for c in 0..topo.n_chargers() {
                if a.decision.setpoint_a[c] > 0.0 {
                    prop_assert!(a.admitted[c], "charger {c} runs without admission");
                }
            }
        }

        /// On plain telemetry the water-filling levels are weighted max-min fair.
        #[test]
        fn water_filling_is_max_min_fair(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let topo = gen_site(&mut r, 14);
            let mut x = gen_inputs(&mut r, &topo);
            tame(&mut x);
            let w = gen_want(&mut r, topo.n_chargers());
            let p = AllocatorParams { envelope: gen_params(&mut r), ..Default::default() };
            let a = alloc(&topo, &x, &w, &p);
            let (m, adm) = allocation_model(&topo, &x.chargers(), &x.nodes(), &w.demand(), &p).unwrap();
            prop_assert_eq!(&adm, &a.admitted);
            if let Err(e) = fairness(&topo, &m, &adm, &a.level_a) {
                prop_assert!(false, "{e}");
            }
        }
    }

    /// A grid over feeders over circuits with 150–450 chargers of mixed wiring, limits sized
    /// per charger so that hundreds of sessions share the upper constraints.
    fn large_site(r: &mut Rng) -> Topology {
        large_site_with(r, false)
    }

    /// `large_site`; `contiguous`: each feeder holds a run of consecutive circuits (its chargers
    /// in one range, as in the benchmark's site) instead of every `n_feeders`-th circuit.
    fn large_site_with(r: &mut Rng, contiguous: bool) -> Topology {
        let n = 150 + r.below(300);
        let n_feeders = 2 + r.below(3);
        let n_circuits = n.div_ceil(6);
        let mut nodes = vec![format!(
            r#"{{"id": "grid", "phase_limit_a": {}, "power_limit_kw": {}}}"#,
            (n as f64 * r.range(4.0, 12.0)).round(),
            (n as f64 * r.range(3.0, 9.0)).round()
        )];
        for f in 0..n_feeders {
            nodes.push(format!(
                r#"{{"id": "f{f}", "parent": "grid", "phase_limit_a": {}}}"#,
                (n as f64 / n_feeders as f64 * r.range(4.0, 14.0)).round()
            ));
        }
        for c in 0..n_circuits {
            nodes.push(format!(
                r#"{{"id": "k{c}", "parent": "f{}", "phase_limit_a": {}}}"#,
                if contiguous {
                    c * n_feeders / n_circuits
                } else {
                    c % n_feeders
                },
                r.range(40.0, 90.0).round()
            ));
        }
        let ph = ["L1", "L2", "L3"];
        let chargers: Vec<String> = (0..n)
            .map(|i| {
                let (wiring, phases, v) = match r.below(4) {
                    0 => ("line_to_neutral", format!(r#"["{}"]"#, ph[i % 3]), 230),
                    1 => (
                        "line_to_line",
                        format!(r#"["{}", "{}"]"#, ph[i % 3], ph[(i + 1) % 3]),
                        400,
                    ),
                    _ => (
                        "three_phase",
                        format!(r#"["{}", "{}", "{}"]"#, ph[i % 3], ph[(i + 1) % 3], ph[(i + 2) % 3]),
                        230,
                    ),
                };
                format!(
                    r#"{{"id": "c{i}", "parent": "k{}", "wiring": "{wiring}", "phases": {phases}, "voltage_v": {v}, "max_a": {}}}"#,
                    i / 6,
                    [16.0, 32.0][r.below(2)]
                )
            })
            .collect();
        Topology::from_json(&format!(
            r#"{{"site": {{"id": "s"}}, "nodes": [{}], "chargers": [{}]}}"#,
            nodes.join(","),
            chargers.join(",")
        ))
        .unwrap()
    }

    proptest! {
        #![proptest_config(cases(24))]

        /// Large sites (constraints with hundreds of members take the water-filling's probing
        /// path for large constraints): still weighted max-min fair, still through the envelope.
        #[test]
        fn water_filling_is_max_min_fair_on_large_sites(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let topo = large_site(&mut r);
            let mut x = gen_inputs(&mut r, &topo);
            tame(&mut x);
            let w = gen_want(&mut r, topo.n_chargers());
            let p = AllocatorParams { envelope: gen_params(&mut r), ..Default::default() };
            let a = alloc(&topo, &x, &w, &p);
            let (m, adm) = allocation_model(&topo, &x.chargers(), &x.nodes(), &w.demand(), &p).unwrap();
            prop_assert_eq!(&adm, &a.admitted);
            if let Err(e) = fairness(&topo, &m, &adm, &a.level_a) {
                prop_assert!(false, "{e}");
            }
        }

        /// The work split over two threads (as on sites of `par::MIN_CHARGERS` and more) gives
        /// the same allocation, bit for bit, as one thread.
        #[test]
        fn two_threads_give_the_same_bits(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            // Feeders over runs of circuits (raised level by level on two threads) or over
            // every n-th circuit (holding both halves: raised on one).
            let topo = large_site_with(&mut r, seed % 2 == 0);
            let halves = topo.halves();
            prop_assert!(halves.is_some(), "large_site lists chargers circuit by circuit");
            let x = gen_inputs(&mut r, &topo);
            let w = gen_want(&mut r, topo.n_chargers());
            let p = AllocatorParams { envelope: gen_params(&mut r), ..Default::default() };
            let (ch, nodes, demand) = (x.chargers(), x.nodes(), w.demand());
            let one = allocate_split(&topo, &ch, &nodes, &demand, &p, true, None).unwrap();
            let two = allocate_split(&topo, &ch, &nodes, &demand, &p, true, halves).unwrap();
            if let Err(e) = same_bits(&one, &two) {
                prop_assert!(false, "{e}");
            }
            // The envelope alone, on the same inputs as requests.
            let one = enforce_split(&topo, &ch, &nodes, &p.envelope, true, None).unwrap();
            let two = enforce_split(&topo, &ch, &nodes, &p.envelope, true, halves).unwrap();
            let as_alloc = |d: Decision| Allocation { decision: d, level_a: Vec::new(), admitted: Vec::new() };
            if let Err(e) = same_bits(&as_alloc(one), &as_alloc(two)) {
                prop_assert!(false, "envelope: {e}");
            }
        }
    }

    /// Every output of two allocations equal bit for bit.
    fn same_bits(a: &Allocation, b: &Allocation) -> Result<(), String> {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (x, y) = (&a.decision, &b.decision);
        let pairs = [
            ("setpoint_a", &x.setpoint_a, &y.setpoint_a),
            ("setpoint_w", &x.setpoint_w, &y.setpoint_w),
            ("binding_value", &x.binding_value, &y.binding_value),
            ("binding_limit", &x.binding_limit, &y.binding_limit),
            ("level_a", &a.level_a, &b.level_a),
        ];
        for (name, u, v) in pairs {
            if bits(u) != bits(v) {
                return Err(format!("{name} differs"));
            }
        }
        if x.binding != y.binding
            || x.binding_node != y.binding_node
            || x.binding_phase != y.binding_phase
            || x.reason != y.reason
            || a.admitted != b.admitted
        {
            return Err("bindings, reasons or admission differ".into());
        }
        Ok(())
    }

    // ---- example tests ----------------------------------------------------------------------

    fn site(limit: &str, chargers: &[(&str, &str, f64)]) -> Topology {
        let cs: Vec<String> = chargers
            .iter()
            .map(|(id, ph, max)| {
                format!(r#"{{"id": "{id}", "parent": "g", "wiring": "line_to_neutral", "phases": ["{ph}"], "voltage_v": 230, "max_a": {max}}}"#)
            })
            .collect();
        Topology::from_json(&format!(
            r#"{{"site": {{"id": "s"}}, "nodes": [{{"id": "g", "phase_limit_a": {limit}}}], "chargers": [{}]}}"#,
            cs.join(",")
        ))
        .unwrap()
    }

    fn params() -> AllocatorParams {
        AllocatorParams {
            envelope: EnvelopeParams {
                now_s: NOW,
                min_on_s: 60.0,
                min_off_s: 180.0,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn weighted_water_filling_splits_by_priority_and_respects_caps() {
        let t = site(
            "48",
            &[("a", "L1", 32.0), ("b", "L1", 32.0), ("c", "L1", 32.0)],
        );
        let x = Inputs::quiet(&t);
        let mut w = Want::new(3);
        w.priority = vec![1.0, 1.0, 2.0];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[12.0, 12.0, 24.0]);
        assert_eq!(a.decision.binding[0], Binding::NodePhase);
        let t = site(
            "50",
            &[("a", "L1", 10.0), ("b", "L1", 32.0), ("c", "L1", 32.0)],
        );
        let a = alloc(&t, &x, &Want::new(3), &params());
        close(&a.decision.setpoint_a, &[10.0, 20.0, 20.0]);
        assert_eq!(a.decision.binding[0], Binding::ChargerMax);
    }

    #[test]
    fn six_amp_rule_admits_least_laxity_first() {
        let t = site(
            "20",
            &[
                ("a", "L1", 32.0),
                ("b", "L1", 32.0),
                ("c", "L1", 32.0),
                ("d", "L1", 32.0),
            ],
        );
        let x = Inputs::quiet(&t);
        let mut w = Want::new(4);
        w.departure = vec![NOW + 3600.0, NOW + 7200.0, NOW + 1800.0, NOW + 5400.0];
        let a = alloc(&t, &x, &w, &params());
        assert_eq!(a.admitted, vec![true, false, true, true]);
        assert_eq!(a.decision.binding[1], Binding::Admission);
        close(
            &a.decision.setpoint_a,
            &[20.0 / 3.0, 0.0, 20.0 / 3.0, 20.0 / 3.0],
        );
    }

    #[test]
    fn admission_hysteresis_keeps_running_sessions_and_paused_ones_paused() {
        let t = site(
            "20",
            &[
                ("a", "L1", 32.0),
                ("b", "L1", 32.0),
                ("c", "L1", 32.0),
                ("d", "L1", 32.0),
            ],
        );
        let mut w = Want::new(4);
        w.departure = vec![NOW + 3600.0, NOW + 7200.0, NOW + 1800.0, NOW + 5400.0];
        // b (most laxity) has been on for 10 s: inside its minimum on time it stays admitted.
        let mut x = Inputs::quiet(&t);
        x.last_a[1] = 6.0;
        x.on_since[1] = NOW - 10.0;
        let a = alloc(&t, &x, &w, &params());
        assert!(a.admitted[1], "{:?}", a.admitted);
        assert_eq!(a.admitted.iter().filter(|&&v| v).count(), 3);
        // Long on, but its laxity is within the hysteresis bonus of d's: it keeps its slot.
        x.on_since[1] = NOW - 3600.0;
        w.departure[1] = NOW + 5500.0;
        let a = alloc(&t, &x, &w, &params());
        assert!(a.admitted[1] && !a.admitted[3], "{:?}", a.admitted);
        // c (least laxity) was paused 30 s ago: the minimum off time keeps it off.
        let mut x = Inputs::quiet(&t);
        x.off_since[2] = NOW - 30.0;
        let a = alloc(&t, &x, &w, &params());
        assert!(!a.admitted[2]);
        assert_eq!(a.decision.binding[2], Binding::Hysteresis);
        // At the switch cap a paused session stays paused; a running one stays on.
        let mut p = params();
        p.envelope.max_switches = 4.0;
        let mut x = Inputs::quiet(&t);
        x.switches = vec![4.0, 4.0, 0.0, 0.0];
        x.last_a[1] = 6.0;
        x.on_since[1] = NOW - 3600.0;
        let a = alloc(&t, &x, &w, &p);
        assert!(!a.admitted[0] && a.admitted[1], "{:?}", a.admitted);
    }

    #[test]
    fn headroom_is_reclaimed_from_fresh_measurements_only() {
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let mut x = Inputs::quiet(&t);
        x.last_a = vec![20.0, 20.0];
        x.on_since = vec![NOW - 3600.0; 2];
        x.m[0][0] = 8.0;
        x.m[0][1] = 29.0;
        let a = alloc(&t, &x, &Want::new(2), &params());
        close(&a.decision.setpoint_a, &[10.0, 30.0]);
        assert_eq!(a.decision.binding[0], Binding::Demand);
        // The same draws, measured too long ago: nothing is reclaimed.
        x.m_age = vec![600.0, 600.0];
        let a = alloc(&t, &x, &Want::new(2), &params());
        close(&a.decision.setpoint_a, &[20.0, 20.0]);
    }

    /// Review 67 (depot): chargers that follow their setpoints on an exactly full node, read a
    /// hair above them (meter rounding, here 2e-5 A on 40 A: over by less than the 2e-6 the
    /// envelope used to require before sizing setpoints "as if followed"), were paused by the
    /// plain rule, resumed, paused... They keep their setpoints.
    #[test]
    fn chargers_read_a_hair_over_an_exactly_full_node_keep_their_setpoints() {
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let mut x = Inputs::quiet(&t);
        x.last_a = vec![20.0, 20.0];
        x.on_since = vec![NOW - 3600.0; 2];
        x.m[0] = vec![20.00001, 20.00001];
        let a = alloc(&t, &x, &Want::new(2), &params());
        close(&a.decision.setpoint_a, &[20.0, 20.0]);
    }

    /// A car that draws all it was sent rose only `margin_a` per reading once room freed (its
    /// reading capped it at draw + 2 A, the session's start long past). Where the caller says
    /// which setpoint the reading was taken under (`read_under_a`), a reading showing the car at
    /// it caps it at twice its draw instead (`PROBE_GROWTH`); a car that draws less than it was
    /// under is still reclaimed and stays so; a DC charger's setpoint in W is compared as the
    /// line current it draws.
    #[test]
    fn a_car_drawing_all_it_was_sent_gets_the_room_that_frees_at_once() {
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let mut x = Inputs::quiet(&t);
        let mut w = Want::new(2);
        // a shared the feeder with b (20 A each) and draws its 20 A; b's car has gone.
        x.last_a = vec![20.0, 0.0];
        x.on_since = vec![NOW - 3600.0, f64::NAN];
        x.m[0] = vec![20.0, 0.0];
        x.connected = vec![true, false];
        // Not known what the reading was taken under: 2 A more per reading, as before.
        close(
            &alloc(&t, &x, &w, &params()).decision.setpoint_a,
            &[22.0, 0.0],
        );
        // Taken under 20 A: the whole of its maximum at once.
        w.under_a = vec![20.0, f64::NAN];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[32.0, 0.0]);
        assert_eq!(a.decision.binding[0], Binding::ChargerMax);
        // The probe doubles per reading: a car reading 8 A under 8 A may have 16 A next.
        x.m[0][0] = 8.0;
        w.under_a = vec![8.0, f64::NAN];
        close(
            &alloc(&t, &x, &w, &params()).decision.setpoint_a,
            &[16.0, 0.0],
        );
        x.m[0][0] = 20.0;
        w.under_a = vec![20.0, f64::NAN];
        // Within margin_a / 2 of it still counts as all of it; more below it does not.
        x.m[0][0] = 19.0;
        close(
            &alloc(&t, &x, &w, &params()).decision.setpoint_a,
            &[32.0, 0.0],
        );
        x.m[0][0] = 18.9;
        close(
            &alloc(&t, &x, &w, &params()).decision.setpoint_a,
            &[20.9, 0.0],
        );
        // Sent 32 A, the car takes 25 A under it: reclaimed to 27 A, and kept there while it
        // draws 25 A under 27 A.
        x.last_a = vec![32.0, 0.0];
        w.under_a = vec![32.0, f64::NAN];
        x.m[0][0] = 25.0;
        close(
            &alloc(&t, &x, &w, &params()).decision.setpoint_a,
            &[27.0, 0.0],
        );
        x.last_a = vec![27.0, 0.0];
        w.under_a = vec![27.0, f64::NAN];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[27.0, 0.0]);
        assert_eq!(a.decision.binding[0], Binding::Demand);
        // The same for a DC charger, its setpoint in W.
        let dc = Topology::from_json(
            r#"{"site": {"id": "s"}, "nodes": [{"id": "g", "phase_limit_a": 200}], "chargers": [{"id": "d", "parent": "g", "kind": "dc", "wiring": "three_phase", "phases": ["L1","L2","L3"], "voltage_v": 230, "max_w": 90000, "efficiency": 0.95, "aux_w": 200}]}"#,
        )
        .unwrap();
        let mut x = Inputs::quiet(&dc);
        let mut w = Want::new(1);
        let line_a = dc.hot(0).dc_line_a(45_000.0);
        x.last_w = vec![45_000.0];
        x.on_since = vec![NOW - 3600.0];
        x.m[0] = vec![line_a];
        x.m[1] = vec![line_a];
        x.m[2] = vec![line_a];
        let capped = alloc(&dc, &x, &w, &params()).decision.setpoint_w[0];
        assert!(capped < 50_000.0, "{capped}");
        w.under_w = vec![45_000.0];
        let released = alloc(&dc, &x, &w, &params()).decision.setpoint_w[0];
        assert!((released - 90_000.0).abs() < 1e-6, "{released}");
    }

    /// Review 67 (depot, a lone bus): the reclaim capped a session at its draw + 2 A from every
    /// fresh reading, also one taken while the vehicle was still ramping up after it started or
    /// resumed, so it climbed 2 A per reading (about an hour to 90 kW). A reading taken less than
    /// `RECLAIM_RAMP_S` after the session turned on no longer caps it.
    #[test]
    fn a_reading_taken_while_the_vehicle_ramps_up_does_not_cap_it() {
        let t = site("80", &[("a", "L1", 32.0)]);
        let mut x = Inputs::quiet(&t);
        // Resumed 5 s ago at 10 A; the reading 1 s old still shows the car ramping (0 A).
        x.last_a = vec![10.0];
        x.on_since = vec![NOW - 5.0];
        let a = alloc(&t, &x, &Want::new(1), &params());
        close(&a.decision.setpoint_a, &[32.0]);
        assert_eq!(a.decision.binding[0], Binding::ChargerMax);
        // A reading taken before it turned on (40 s old) does not cap it either.
        x.m_age = vec![40.0];
        close(
            &alloc(&t, &x, &Want::new(1), &params()).decision.setpoint_a,
            &[32.0],
        );
        // The next readings (60 s apart): the car follows what it was sent and keeps it.
        let mut sent = 32.0;
        x.m_age = vec![1.0];
        for k in 1..=3 {
            x.on_since = vec![NOW - 5.0 - 60.0 * k as f64];
            x.last_a = vec![sent];
            x.m[0][0] = sent;
            let a = alloc(&t, &x, &Want::new(1), &params());
            close(&a.decision.setpoint_a, &[32.0]);
            sent = a.decision.setpoint_a[0];
        }
        // Past the ramp, a car that draws well under its setpoint is reclaimed (draw + 2 A), also
        // from a reading taken 30 s after it turned on (40 s ago, the reading 10 s old).
        x.m[0][0] = 12.0;
        let a = alloc(&t, &x, &Want::new(1), &params());
        close(&a.decision.setpoint_a, &[14.0]);
        assert_eq!(a.decision.binding[0], Binding::Demand);
        x.on_since = vec![NOW - 40.0];
        x.m_age = vec![10.0];
        close(
            &alloc(&t, &x, &Want::new(1), &params()).decision.setpoint_a,
            &[14.0],
        );
        // The ramp is a parameter (`[edge] reclaim_ramp_s`): with 60 s that reading (taken 30 s
        // after it turned on) is still the ramp; with 5 s one taken 6 s after it caps.
        let slow = AllocatorParams {
            reclaim_ramp_s: 60.0,
            ..params()
        };
        close(
            &alloc(&t, &x, &Want::new(1), &slow).decision.setpoint_a,
            &[32.0],
        );
        let quick = AllocatorParams {
            reclaim_ramp_s: 5.0,
            ..params()
        };
        x.on_since = vec![NOW - 7.0];
        x.m_age = vec![1.0];
        close(
            &alloc(&t, &x, &Want::new(1), &quick).decision.setpoint_a,
            &[14.0],
        );
        close(
            &alloc(&t, &x, &Want::new(1), &params()).decision.setpoint_a,
            &[32.0],
        );
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let p = AllocatorParams {
                reclaim_ramp_s: bad,
                ..params()
            };
            let err = allocate(
                &t,
                &x.chargers(),
                &x.nodes(),
                &Want::new(1).demand(),
                &p,
                true,
            );
            assert!(
                matches!(&err, Err(e) if e.to_string().contains("reclaim_ramp_s")),
                "{bad}"
            );
        }
    }

    #[test]
    fn plan_targets_cap_sessions_unless_behind_plan() {
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let x = Inputs::quiet(&t);
        let mut w = Want::new(2);
        w.target_a = vec![8.0, f64::NAN];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[8.0, 32.0]);
        assert_eq!(a.decision.binding[0], Binding::Plan);
        w.behind = vec![true, false];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[20.0, 20.0]);
        // A target of 0 pauses the session (the plan wants nothing now).
        w.behind = vec![false, false];
        w.target_a = vec![0.0, f64::NAN];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[0.0, 32.0]);
        assert_eq!(a.decision.binding[0], Binding::Plan);
        // Documented (docs/envelope.md): a target between 0 and min_a runs at min_a, the least
        // the charger can run at (the planner's rounding pass emits 0 or at least min_a).
        w.target_a = vec![3.0, f64::NAN];
        let a = alloc(&t, &x, &w, &params());
        close(&a.decision.setpoint_a, &[6.0, 32.0]);
        assert_eq!(a.decision.binding[0], Binding::Plan);
        // A session inside its minimum on time is not paused by a target of 0: it holds min_a.
        let mut x = Inputs::quiet(&t);
        x.last_a = vec![16.0, 0.0];
        x.on_since = vec![NOW - 10.0, f64::NAN];
        let p = AllocatorParams {
            envelope: EnvelopeParams {
                min_on_s: 300.0,
                ..params().envelope
            },
            ..params()
        };
        w.target_a = vec![0.0, f64::NAN];
        let a = alloc(&t, &x, &w, &p);
        close(&a.decision.setpoint_a, &[6.0, 32.0]);
    }

    #[test]
    fn admission_reserves_what_refused_sessions_hold() {
        // b draws 10 A it was given earlier (fresh measurement) though it was paused since: it
        // holds 10 A whatever happens. a and c (more urgent) each need 6 A of the 20 A: only one
        // of them fits beside b. Admitting both would leave the envelope to pause them.
        let t = site(
            "20",
            &[("a", "L1", 32.0), ("b", "L1", 32.0), ("c", "L1", 32.0)],
        );
        let mut x = Inputs::quiet(&t);
        x.m[0][1] = 10.0;
        let mut w = Want::new(3);
        w.departure = vec![NOW + 1800.0, NOW + 9000.0, NOW + 3600.0];
        let a = alloc(&t, &x, &w, &params());
        assert_eq!(a.admitted, vec![true, true, false], "{:?}", a.decision);
        assert_eq!(a.decision.binding[2], Binding::Admission);
        assert!(a.decision.setpoint_a[0] >= 6.0, "{:?}", a.decision);
        let counted = a.decision.setpoint_a[0] + a.decision.setpoint_a[1].max(10.0);
        assert!(counted <= 20.0 + 1e-9, "{:?}", a.decision);
    }

    #[test]
    fn line_to_line_sessions_are_raised_to_the_exact_phasor_limit() {
        // AB and CA at I each put √3·I on line A. The linear bound stops them at 35/2 = 17.5 A;
        // the exact limit is 35/√3 = 20.2 A, and the raise pass takes them there.
        let t = Topology::from_json(
            r#"{"site": {"id": "s"}, "nodes": [{"id": "g", "kind": "grid", "phase_limit_a": 35}], "chargers": [
            {"id": "ab", "parent": "g", "wiring": "line_to_line", "phases": ["L1","L2"], "voltage_v": 400, "max_a": 32},
            {"id": "ca", "parent": "g", "wiring": "line_to_line", "phases": ["L3","L1"], "voltage_v": 400, "max_a": 32}]}"#,
        )
        .unwrap();
        let x = Inputs::quiet(&t);
        let a = alloc(&t, &x, &Want::new(2), &params());
        close(&a.level_a, &[17.5, 17.5]);
        let exact = 35.0 / 3f64.sqrt();
        for c in 0..2 {
            assert!(
                (a.decision.setpoint_a[c] - exact).abs() < 1e-6,
                "{:?}",
                a.decision
            );
            assert_eq!(a.decision.binding[c], Binding::NodePhase);
            assert_eq!(a.decision.binding_node[c], Some(0));
        }
        // A plan target that fits the exact limit is met, the other session takes what is left.
        let mut w = Want::new(2);
        w.target_a = vec![19.0, f64::NAN];
        let a = alloc(&t, &x, &w, &params());
        assert!(
            (a.decision.setpoint_a[0] - 19.0).abs() < 1e-9,
            "{:?}",
            a.decision
        );
        assert_eq!(a.decision.binding[0], Binding::Plan);
        // Line A: 19² + b² + 19·b = 35² → b = 21.3 A.
        let b = (-19.0 + (19.0f64 * 19.0 - 4.0 * (19.0 * 19.0 - 35.0 * 35.0)).sqrt()) / 2.0;
        assert!(
            (a.decision.setpoint_a[1] - b).abs() < 1e-6,
            "{b} {:?}",
            a.decision
        );
        // Weighted: the common level splits by priority.
        let mut w = Want::new(2);
        w.priority = vec![1.0, 2.0];
        let a = alloc(&t, &x, &w, &params());
        let (i1, i2) = (a.decision.setpoint_a[0], a.decision.setpoint_a[1]);
        assert!((i2 - 2.0 * i1).abs() < 1e-6, "{:?}", a.decision);
        assert!((i1 * i1 + i2 * i2 + i1 * i2).sqrt() <= 35.0 * RAISE_FIT);
        assert!((i1 * i1 + i2 * i2 + i1 * i2).sqrt() >= 35.0 - 1e-6);
    }

    /// Five three-phase chargers on an 80 A feeder, all running at a confirmed 16 A and drawing
    /// `draw` A (fresh) on each phase, each asking for 32 A.
    fn full_feeder(draw: &[f64]) -> (Topology, Allocation) {
        let cs: Vec<String> = (0..5)
            .map(|i| format!(r#"{{"id": "c{i}", "parent": "f1", "wiring": "three_phase", "voltage_v": 230, "max_a": 32}}"#))
            .collect();
        let t = Topology::from_json(&format!(
            r#"{{"site": {{"id": "s"}}, "nodes": [{{"id": "grid", "phase_limit_a": 160}},
            {{"id": "f1", "parent": "grid", "phase_limit_a": 80}}], "chargers": [{}]}}"#,
            cs.join(",")
        ))
        .unwrap();
        let mut x = Inputs::quiet(&t);
        x.last_a = vec![16.0; 5];
        x.on_since = vec![NOW - 3600.0; 5];
        for ph in 0..3 {
            x.m[ph] = draw.to_vec();
        }
        let a = alloc(&t, &x, &Want::new(5), &params());
        (t, a)
    }

    #[test]
    fn exactly_full_feeder_keeps_the_fair_share_instead_of_the_minimum() {
        // Regression: at exactly 80 of 80 A every floor (what each charger holds) summed to the
        // limit, the feeder's level solved to 0 and everyone was cut to 6 A (a 16 -> 6 A sawtooth).
        for draw in [16.0, 15.9] {
            let (t, a) = full_feeder(&[draw; 5]);
            assert_eq!(a.admitted, vec![true; 5], "{draw}: {:?}", a.decision);
            close(&a.decision.setpoint_a, &[16.0; 5]);
            for c in 0..5 {
                assert_eq!(a.decision.binding[c], Binding::NodePhase, "{draw}");
                assert_eq!(
                    a.decision.binding_node[c],
                    Some(t.node_index("f1").unwrap())
                );
            }
            // Counted as the envelope counts (max of setpoint and measured draw): 80 of 80 A.
            let counted: f64 = (0..5).map(|c| a.decision.setpoint_a[c].max(draw)).sum();
            assert!(counted <= 80.0 + 1e-9, "{draw}: {counted}");
        }
        // Unequal holdings that fill the feeder exactly: the charger over the fair level is
        // lowered to it, the others keep what they draw; nobody is cut to the minimum.
        let (_, a) = full_feeder(&[20.0, 15.0, 15.0, 15.0, 15.0]);
        close(&a.decision.setpoint_a, &[15.0; 5]);
        // Just over (80.5 A measured): no setpoint can bring the counted load under the limit.
        // Pausing all five (the old rule) brought them all back next tick: a 16 -> 0 -> 16 A
        // sawtooth. Now the feeder is sized to fit when the chargers follow their setpoints:
        // 16 A each (80 A), the reason names the feeder with its measured 80.5 A.
        let (t, a) = full_feeder(&[16.1; 5]);
        close(&a.decision.setpoint_a, &[16.0; 5]);
        assert_eq!(a.admitted, vec![true; 5]);
        let f1 = t.node_index("f1").unwrap();
        for c in 0..5 {
            assert_eq!(
                a.decision.binding[c],
                Binding::NodePhase,
                "{:?}",
                a.decision
            );
            assert_eq!(a.decision.binding_node[c], Some(f1));
            assert!((a.decision.binding_value[c] - 80.5).abs() < 1e-9);
            assert_eq!(a.decision.binding_limit[c], 80.0);
        }
        // Unequal draws over the limit: the water-filling shares the feeder as if each followed
        // its setpoint (16 A each), not by what each happens to draw now.
        let (_, a) = full_feeder(&[20.0, 16.0, 16.0, 16.0, 16.0]);
        close(&a.decision.setpoint_a, &[16.0; 5]);
    }

    /// Session 9 (edge restart test): what a charger draws counted as its floor, so a car that
    /// took an exactly full feeder (a first TxDefault at its maximum) kept it for ever and a car
    /// plugged in beside it was refused admission tick after tick. Now the full feeder is shared
    /// as if followed: the first car is lowered at once, the second starts as soon as that
    /// decrease is confirmed and read, and neither is paused on the way.
    #[test]
    fn a_car_holding_an_exactly_full_feeder_makes_room_for_one_plugged_in_beside_it() {
        for draw in [32.0, 31.0] {
            let t = site("32", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
            let mut x = Inputs::quiet(&t);
            x.last_a = vec![32.0, 0.0];
            x.on_since = vec![NOW - 3600.0, f64::NAN];
            x.m[0][0] = draw;
            let p = params();
            // Tick 1: a is lowered to its share, b waits for that room (named: the feeder).
            let a = alloc(&t, &x, &Want::new(2), &p);
            close(&a.decision.setpoint_a, &[16.0, 0.0]);
            assert_eq!(
                a.decision.binding[1],
                Binding::NodePhase,
                "{draw}: {:?}",
                a.decision
            );
            assert!(a.admitted[1], "{draw}");
            // Tick 2: the decrease sent, not confirmed yet: the same.
            x.last_a = vec![16.0, 0.0];
            x.confirmed = vec![false, true];
            let a = alloc(&t, &x, &Want::new(2), &p);
            close(&a.decision.setpoint_a, &[16.0, 0.0]);
            // Tick 3: confirmed and followed: b starts at its share.
            x.confirmed = vec![true, true];
            x.m[0][0] = 16.0;
            let a = alloc(&t, &x, &Want::new(2), &p);
            close(&a.decision.setpoint_a, &[16.0, 16.0]);
        }
        // A car drawing more than it was sent (paused, still read at 10 A) is not expected to
        // follow: it keeps its holding and the newcomer is refused as before; nor is a faulted
        // charger drawing what it was sent.
        for (limit, faulted) in [("32", true), ("20", false)] {
            let t = site(limit, &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
            let mut x = Inputs::quiet(&t);
            if faulted {
                x.last_a = vec![32.0, 0.0];
                x.on_since = vec![NOW - 3600.0, f64::NAN];
                x.m[0][0] = 32.0;
                x.faulted = vec![true, false];
            } else {
                x.m[0][0] = 16.0;
            }
            let a = alloc(&t, &x, &Want::new(2), &params());
            assert_eq!(
                a.decision.binding[1],
                Binding::Admission,
                "{limit}: {:?}",
                a.decision
            );
        }
    }

    #[test]
    fn reclaimed_headroom_is_explained_as_a_low_draw_not_as_no_energy_wanted() {
        // a draws 3 A of the 20 A it was given (energy need unknown: +inf): capped at 3 + 2 A,
        // and held at its 6 A minimum; the reason says it draws little, not "no energy wanted".
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let mut x = Inputs::quiet(&t);
        x.last_a = vec![20.0, 20.0];
        x.on_since = vec![NOW - 3600.0; 2];
        x.m[0][0] = 3.0;
        x.m[0][1] = 20.0;
        let mut w = Want::new(2);
        w.energy = vec![f64::INFINITY, f64::INFINITY];
        let a = allocate(&t, &x.chargers(), &x.nodes(), &w.demand(), &params(), true).unwrap();
        close(&a.decision.setpoint_a, &[6.0, 22.0]);
        assert_eq!(a.decision.binding[0], Binding::Demand);
        assert_eq!(
            a.decision.reason[0],
            "held at 6 A: the vehicle draws only 3 A (the rest is offered to others)"
        );
        // A session that wants nothing more is paused, and that is what its reason says.
        w.energy[0] = 0.0;
        let a = allocate(&t, &x.chargers(), &x.nodes(), &w.demand(), &params(), true).unwrap();
        assert_eq!(a.decision.setpoint_a[0], 0.0);
        assert_eq!(a.decision.reason[0], "paused: no energy wanted");
    }

    /// Both ways of finding what is over on what is held alone (node by node, one pass over the
    /// site) agree, on random sites with every node × slot taken as linearly over.
    #[test]
    fn exactly_over_node_by_node_equals_one_pass() {
        let mut some_over = 0;
        for seed in 0..200u64 {
            let mut r = Rng::new(seed);
            let topo = if seed % 2 == 0 {
                gen_site(&mut r, 12)
            } else {
                large_site(&mut r)
            };
            let x = gen_inputs(&mut r, &topo);
            let cnt = counting(&topo, &x.chargers(), &x.nodes(), &gen_params(&mut r), None);
            let nk = topo.n_nodes() * SLOTS;
            let (cap, held) = (vec![0.0; nk], vec![f64::INFINITY; nk]);
            let by_node = exactly_over(&topo, &cnt, &cap, &held, usize::MAX);
            let one_pass = exactly_over(&topo, &cnt, &cap, &held, 0);
            assert_eq!(by_node, one_pass, "seed {seed}");
            some_over += usize::from(by_node.iter().any(|&o| o));
        }
        assert!(some_over > 20, "only {some_over} sites had a node over");
    }

    #[test]
    fn level_queue_pops_in_total_order_with_ties_by_index() {
        let vals = [
            3.5,
            0.0,
            -0.0,
            1e-300,
            f64::INFINITY,
            -2.0,
            f64::NAN,
            7.25,
            3.5,
            f64::MIN_POSITIVE,
        ];
        for &x in &vals {
            assert_eq!(from_order_key(order_key(x)).to_bits(), x.to_bits());
        }
        let mut want: Vec<(f64, usize)> = vals.iter().copied().zip(0..).collect();
        // Half the keys at the start, the rest pushed while popping.
        let mut q = LevelQueue::new(want[..5].iter().map(|&(x, a)| (order_key(x), a)).collect());
        for &(x, a) in &want[5..] {
            q.push(x, a);
        }
        want.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        let got: Vec<(u64, usize)> = std::iter::from_fn(|| q.pop())
            .map(|(x, a)| (x.to_bits(), a))
            .collect();
        let want: Vec<(u64, usize)> = want.iter().map(|&(x, a)| (x.to_bits(), a)).collect();
        assert_eq!(got, want);
    }

    /// The initial keys' radix sort gives `sort_unstable`'s order (indices ascending on input,
    /// so equal keys stay in index order), whatever bytes the keys share or not.
    #[test]
    fn initial_keys_sort_as_sort_unstable() {
        let mut r = Rng::new(7);
        let special = [0.0, -0.0, f64::INFINITY, f64::NAN, -3.0, 1e-300, 16.0];
        for len in [0, 1, 63, 64, 65, 300, 5000] {
            for mode in 0..4 {
                let keys: Vec<(u64, usize)> = (0..len)
                    .map(|a| {
                        let x = match mode {
                            0 => r.range(0.0, 100.0),
                            1 => (r.below(8) as f64) * 0.5, // many ties
                            2 => special[r.below(special.len())],
                            _ => 16.0 + (r.below(3) as f64) * f64::EPSILON * 16.0, // low bytes
                        };
                        (order_key(x), a)
                    })
                    .collect();
                let mut want = keys.clone();
                want.sort_unstable();
                assert_eq!(sort_keys(keys), want, "len {len} mode {mode}");
            }
        }
    }

    #[test]
    fn priority_outside_the_range_is_clamped_not_an_error() {
        // One bad priority must not stop every decision: it counts at the nearest bound.
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let x = Inputs::quiet(&t);
        let p = params();
        let mut w = Want::new(2);
        for (bad, clamped) in [
            (0.0, PRIORITY_RANGE.0),
            (-5.0, PRIORITY_RANGE.0),
            (1e-300, PRIORITY_RANGE.0),
            (f64::NEG_INFINITY, PRIORITY_RANGE.0),
            (1e9, PRIORITY_RANGE.1),
            (f64::INFINITY, PRIORITY_RANGE.1),
            (f64::NAN, 1.0),
        ] {
            w.priority = vec![1.0, bad];
            let a = alloc(&t, &x, &w, &p);
            w.priority = vec![1.0, clamped];
            let b = alloc(&t, &x, &w, &p);
            assert_eq!(a.admitted, vec![true; 2], "{bad}");
            close(&a.decision.setpoint_a, &b.decision.setpoint_a);
            assert!(
                a.decision.setpoint_a.iter().sum::<f64>() <= 40.0 + 1e-9,
                "{bad}"
            );
        }
        // The smallest weight gets what is left once the other is at its maximum, the largest
        // leaves the other what is left once it is at its maximum.
        w.priority = vec![1.0, 0.0];
        close(&alloc(&t, &x, &w, &p).decision.setpoint_a, &[32.0, 8.0]);
        w.priority = vec![1.0, f64::INFINITY];
        close(&alloc(&t, &x, &w, &p).decision.setpoint_a, &[8.0, 32.0]);
    }

    #[test]
    fn bad_demand_is_an_error_naming_column_and_row() {
        let t = site("40", &[("a", "L1", 32.0), ("b", "L1", 32.0)]);
        let x = Inputs::quiet(&t);
        let mut w = Want::new(2);
        w.energy[0] = f64::NAN;
        let e = allocate(&t, &x.chargers(), &x.nodes(), &w.demand(), &params(), false).unwrap_err();
        assert!(e.to_string().contains("energy_wanted_kwh"), "{e}");
    }

    /// Rust-only timing driver on the benchmark's inputs: `evcore bench allocator --sizes 10000
    /// --dump DIR` writes the site and one tick's columns (raw f64), then
    /// `EVCORE_BENCH_DUMP=DIR [EVCORE_BENCH_REPS=100] cargo test -p evcore-core --profile ci --
    /// --ignored --nocapture bench_dump` prints the median of the whole call and of its first
    /// parts, and writes the outputs to DIR/out.txt (to compare versions).
    #[test]
    #[ignore]
    fn bench_dump() {
        use std::time::Instant;
        let Ok(dir) = std::env::var("EVCORE_BENCH_DUMP") else {
            return;
        };
        let reps: usize = std::env::var("EVCORE_BENCH_REPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100);
        let text = std::fs::read_to_string(format!("{dir}/site.json")).unwrap();
        let topo = Topology::from_json(&text).unwrap();
        let col = |name: &str| -> Vec<f64> {
            let b = std::fs::read(format!("{dir}/{name}.f64")).unwrap();
            b.chunks_exact(8)
                .map(|x| f64::from_le_bytes(x.try_into().unwrap()))
                .collect()
        };
        let flag = |name: &str| -> Vec<bool> { col(name).iter().map(|&x| x != 0.0).collect() };
        // Columns a dump of an earlier version lacks: NaN (not known).
        let optional = |name: &str| -> Vec<f64> {
            if std::path::Path::new(&format!("{dir}/{name}.f64")).exists() {
                col(name)
            } else {
                vec![f64::NAN; topo.n_chargers()]
            }
        };
        let pj: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/params.json"))
                .unwrap()
                .replace("Infinity", "null"),
        )
        .unwrap();
        let g = |k: &str| pj[k].as_f64().unwrap_or(f64::INFINITY);
        let p = AllocatorParams {
            envelope: EnvelopeParams {
                now_s: g("now_s"),
                stale_after_s: g("stale_after_s"),
                min_on_s: g("min_on_s"),
                min_off_s: g("min_off_s"),
                max_switches: g("max_switches"),
                max_increase_a: g("max_increase_a"),
            },
            margin_a: g("margin_a"),
            admission_hysteresis_s: g("admission_hysteresis_s"),
            reclaim_ramp_s: pj["reclaim_ramp_s"].as_f64().unwrap_or(RECLAIM_RAMP_S),
        };
        let x = Inputs {
            req_a: col("requested_a"),
            req_w: col("requested_w"),
            m: [
                col("measured_l1_a"),
                col("measured_l2_a"),
                col("measured_l3_a"),
            ],
            m_age: col("measured_age_s"),
            last_a: col("last_sent_a"),
            last_w: col("last_sent_w"),
            confirmed: flag("last_sent_confirmed"),
            connected: flag("connected"),
            faulted: flag("faulted"),
            unknown: flag("profile_unknown"),
            on_since: col("on_since_s"),
            off_since: col("off_since_s"),
            switches: col("switches"),
            o: [
                col("other_load_l1_a"),
                col("other_load_l2_a"),
                col("other_load_l3_a"),
            ],
            o_age: col("other_load_age_s"),
        };
        let w = Want {
            energy: col("energy_wanted_kwh"),
            departure: col("departure_s"),
            priority: col("priority"),
            target_a: col("target_a"),
            target_w: col("target_w"),
            behind: flag("behind_plan"),
            under_a: optional("read_under_a"),
            under_w: optional("read_under_w"),
        };
        let (ch, nodes, demand) = (x.chargers(), x.nodes(), w.demand());
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] * 1e3
        };
        let mut total = Vec::new();
        let mut out = None;
        for _ in 0..reps {
            let t0 = Instant::now();
            out = Some(allocate(&topo, &ch, &nodes, &demand, &p, false).unwrap());
            total.push(t0.elapsed().as_secs_f64());
        }
        let a = out.unwrap();
        let mut s = String::new();
        for c in 0..topo.n_chargers() {
            let d = &a.decision;
            s += &format!(
                "{c} {:.9} {:.9} {:.9} {} {} {:?} {:?} {:.6} {:.6}\n",
                d.setpoint_a[c],
                d.setpoint_w[c],
                a.level_a[c],
                a.admitted[c],
                d.binding[c].code(),
                d.binding_node[c],
                d.binding_phase[c],
                d.binding_value[c],
                d.binding_limit[c]
            );
        }
        std::fs::write(format!("{dir}/out.txt"), s).unwrap();
        // The parts, one after another as `allocate` runs them.
        let (mut t_model, mut t_fill, mut t_rest) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            let halves = par::halves(&topo, true);
            let (m, adm, _, _) = model_and_admission(&topo, &ch, &nodes, &demand, &p, halves);
            let t1 = Instant::now();
            let _ = water_fill_split(&topo, &m, &adm, halves);
            let t2 = Instant::now();
            t_model.push((t1 - t0).as_secs_f64());
            t_fill.push((t2 - t1).as_secs_f64());
        }
        for i in 0..reps {
            t_rest.push(total[i] - t_model[i] - t_fill[i]);
        }
        println!(
            "n={} total {:.3} ms  model+admission {:.3}  water_fill {:.3}  rest (raise+envelope) ~{:.3}",
            topo.n_chargers(),
            med(total),
            med(t_model),
            med(t_fill),
            med(t_rest)
        );
        // One thread against two, call by call in turn (the machine's other load then hits
        // both alike): EVCORE_BENCH_SPLIT=1.
        if std::env::var("EVCORE_BENCH_SPLIT").is_ok() {
            let halves = topo.halves();
            // [one thread, two threads] × [model + admission, water-filling, whole call].
            let mut t = [
                [Vec::new(), Vec::new(), Vec::new()],
                [Vec::new(), Vec::new(), Vec::new()],
            ];
            for _ in 0..reps {
                for (w, h) in [None, halves].into_iter().enumerate() {
                    let t0 = Instant::now();
                    let (m, adm, _, _) = model_and_admission(&topo, &ch, &nodes, &demand, &p, h);
                    let t1 = Instant::now();
                    let _ = water_fill_split(&topo, &m, &adm, h);
                    let t2 = Instant::now();
                    let a = allocate_split(&topo, &ch, &nodes, &demand, &p, false, h).unwrap();
                    let t3 = Instant::now();
                    drop(a);
                    t[w][0].push((t1 - t0).as_secs_f64());
                    t[w][1].push((t2 - t1).as_secs_f64());
                    t[w][2].push((t3 - t2).as_secs_f64());
                }
            }
            let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min) * 1e3;
            for (w, name) in ["one thread", "two threads"].iter().enumerate() {
                let [m, f, a] = &t[w];
                println!(
                    "split {:?} {name}: call min {:.3} median {:.3} ms; model+admission {:.3} / {:.3}; water_fill {:.3} / {:.3}",
                    halves.map(|h| h.charger_at),
                    min(a),
                    med(a.clone()),
                    min(m),
                    med(m.clone()),
                    min(f),
                    med(f.clone())
                );
            }
        }
    }
    /// Seeds that once broke the fairness certificate on large sites: a large constraint
    /// re-probed after its first solve was taken as solved at the probe level (a lower bound).
    #[test]
    fn large_site_fairness_regressions() {
        for seed in [2637742430305229523u64, 1129783167621042906] {
            let mut r = Rng::new(seed);
            let topo = large_site(&mut r);
            let mut x = gen_inputs(&mut r, &topo);
            tame(&mut x);
            let w = gen_want(&mut r, topo.n_chargers());
            let p = AllocatorParams {
                envelope: gen_params(&mut r),
                ..Default::default()
            };
            let a = alloc(&topo, &x, &w, &p);
            let (m, adm) =
                allocation_model(&topo, &x.chargers(), &x.nodes(), &w.demand(), &p).unwrap();
            assert_eq!(fairness(&topo, &m, &adm, &a.level_a), Ok(()), "seed {seed}");
        }
    }
}
