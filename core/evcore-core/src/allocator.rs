//! Setpoint allocator: weighted max-min fair setpoints over the whole tree and all phases.
//!
//! 1. Eligibility and caps: connected, unfaulted sessions that still want energy; a cap per session
//!    from the charger maximum, the plan target (unless behind plan) and measured draw plus a
//!    margin (headroom reclaim, only from fresh measurements).
//! 2. Admission (the 6 A rule): sessions are admitted in order of least laxity while every
//!    admitted session's minimum still fits; sessions inside their minimum on time (or at their
//!    switch cap) stay on, those inside their minimum off time stay off, and running sessions get
//!    a laxity bonus so that they do not flap.
//! 3. Water-filling: progressive filling in rounds. Every round computes, for each constraint
//!    (node × phase with the linear bound for line-to-line loads, node kW), the level at which it
//!    saturates; every constraint whose level is the lowest among its members' constraints is
//!    saturated and its members frozen. This is exact progressive filling (a constraint's level
//!    never falls when others freeze members), so the result is the weighted max-min fair point.
//! 4. The result goes through the envelope in the same call: nothing leaves unchecked.
//!
//! Units inside: AC line amperes per charger terminal (DC power is converted).
use crate::envelope::{
    counting, enforce_limits, finish, last_sent_line_a, sanitise_request, snap_down, Binding,
    ChargerInputs, Decision, EnvelopeParams, NodeInputs,
};
use crate::error::{CoreError, CoreResult};
use crate::topology::{ChargerKind, Topology, N_PHASES};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AllocatorParams {
    pub envelope: EnvelopeParams,
    /// Headroom reclaim: a running session is capped at its fresh measured draw plus this (A).
    pub margin_a: f64,
    /// Running sessions sort as if their laxity were this much smaller (admission hysteresis).
    pub admission_hysteresis_s: f64,
}

impl Default for AllocatorParams {
    fn default() -> Self {
        AllocatorParams {
            envelope: EnvelopeParams::default(),
            margin_a: 2.0,
            admission_hysteresis_s: 300.0,
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
}

/// Allocation result: the envelope's decision plus what the allocator computed before it.
#[derive(Clone, Debug)]
pub struct Allocation {
    pub decision: Decision,
    /// Water-filling value per charger (line A per terminal) before steps and envelope.
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
/// Priority weights outside this range would turn water-filling levels into infinities.
pub const PRIORITY_RANGE: (f64, f64) = (1e-6, 1e6);

fn validate_demand(d: &Demand<'_>, n: usize) -> CoreResult<()> {
    for (name, len) in [
        ("energy_wanted_kwh", d.energy_wanted_kwh.len()),
        ("departure_s", d.departure_s.len()),
        ("priority", d.priority.len()),
        ("target_a", d.target_a.len()),
        ("target_w", d.target_w.len()),
        ("behind_plan", d.behind_plan.len()),
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
        let w = d.priority[i];
        if !(PRIORITY_RANGE.0..=PRIORITY_RANGE.1).contains(&w) {
            return Err(CoreError::input(
                "priority",
                Some(i),
                format!(
                    "must be a number in [{}, {}], got {w}",
                    PRIORITY_RANGE.0, PRIORITY_RANGE.1
                ),
            ));
        }
        if d.energy_wanted_kwh[i].is_nan() {
            return Err(CoreError::input("energy_wanted_kwh", Some(i), "is NaN"));
        }
    }
    Ok(())
}

/// Per-charger coefficients in the 4 constraint slots of every node above it (linear bound):
/// 1 on each site phase it touches, W per A in the kW slot. Flat: `coefs[c * 4 + slot]`.
fn coef_table(topo: &Topology) -> Vec<f64> {
    let n = topo.n_chargers();
    let mut out = vec![0.0; n * SLOTS];
    for c in 0..n {
        for slot in 0..SLOTS {
            out[c * SLOTS + slot] = coef(topo, c, slot);
        }
    }
    out
}

/// Coefficient of a charger's per-terminal current in constraint slot (linear bound).
#[inline]
fn coef(topo: &Topology, c: usize, slot: usize) -> f64 {
    let spec = &topo.chargers[c];
    if slot == N_PHASES {
        spec.watts_per_terminal_a() * spec.wiring.terminals() as f64
    } else if spec.phases.contains(&slot) {
        1.0
    } else {
        0.0
    }
}

/// Solve `fixed + Σ a·clamp(w L, F, U) = cap` for the smallest L (members given by index).
/// Returns +inf when the constraint can never saturate, 0 when floors already reach it.
///
/// With `D(L) = fixed + Σ a F + Σ_e c_e · min(L, b_e)` (events `+a w` at `U/w`, `−a w` at `F/w`),
/// a quickselect over the events finds the linear piece holding the root in expected O(m).
fn saturation_level(
    members: &[(usize, f64)],
    floor: &[f64],
    capv: &[f64],
    weight: &[f64],
    fixed: f64,
    cap: f64,
    events: &mut Vec<(f64, f64)>,
) -> f64 {
    let mut base = fixed;
    let mut dmax = fixed;
    events.clear();
    for &(c, a) in members {
        let w = weight[c];
        base += a * floor[c];
        dmax += a * capv[c];
        if capv[c] > floor[c] {
            events.push((capv[c] / w, a * w));
            events.push((floor[c] / w, -a * w));
        }
    }
    if dmax <= cap {
        return f64::INFINITY;
    }
    if base >= cap {
        return 0.0;
    }
    // Invariant: for L in the bracket (left, right], D(L) = base + slope·L + Σ_{e in window}
    // c_e·min(L, b_e); events left of the window are constants (in `base`), right of it linear
    // (in `slope`). D(left) < cap <= D(right).
    let mut slope = 0.0;
    let mut left = 0.0f64;
    let mut right = f64::INFINITY;
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
    // One linear piece left. Rounding can make its slope tiny or non-positive; the root is inside
    // the bracket in exact arithmetic, so keep it there.
    let root = if slope > 0.0 {
        (cap - base) / slope
    } else if right.is_finite() {
        right
    } else {
        left
    };
    if root.is_nan() {
        return left;
    }
    root.clamp(left, right)
}

/// Build the linear model and run admission; returns the model and the admitted mask.
#[allow(clippy::too_many_arguments)]
fn model_and_admission(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    demand: &Demand<'_>,
    p: &AllocatorParams,
) -> (Model, Vec<bool>, Vec<Binding>, Vec<f64>) {
    let n = topo.n_chargers();
    let nn = topo.n_nodes();
    let ep = &p.envelope;
    let cnt = counting(topo, ch, nodes, ep);
    let mut m = Model {
        floor: vec![0.0; n],
        cap: vec![0.0; n],
        set_floor: vec![0.0; n],
        set_cap: vec![0.0; n],
        weight: demand.priority.to_vec(),
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
    let mut candidate = vec![false; n];
    let mut binding = vec![Binding::None; n];
    let mut locked_on = vec![false; n];
    let mut held = vec![0.0; n];
    let mut key = vec![0.0; n];
    for c in 0..n {
        let spec = &topo.chargers[c];
        let nt = spec.wiring.terminals();
        held[c] = cnt.held[c][..nt].iter().copied().fold(0.0, f64::max);
        let last = last_sent_line_a(topo, c, ch);
        let is_on = last > 0.0;
        let sw = ch.switches[c];
        let at_cap = !(sw < ep.max_switches);
        let on_t = ch.on_since_s[c];
        let off_t = ch.off_since_s[c];
        if ch.faulted[c] {
            binding[c] = Binding::Fault;
            continue;
        }
        if !ch.connected[c] {
            binding[c] = Binding::Disconnected;
            continue;
        }
        if !(demand.energy_wanted_kwh[c] > 0.0) {
            binding[c] = Binding::Demand;
            continue;
        }
        if !is_on && ((off_t.is_finite() && ep.now_s - off_t < ep.min_off_s) || at_cap) {
            binding[c] = Binding::Hysteresis;
            continue;
        }
        locked_on[c] = is_on && ((on_t.is_finite() && ep.now_s - on_t < ep.min_on_s) || at_cap);
        let f = spec.min_a;
        let mut u = spec.max_a;
        let mut cb = Binding::ChargerMax;
        // Plan target caps the session unless it is behind its plan.
        let t = match spec.kind {
            ChargerKind::Ac => demand.target_a[c],
            ChargerKind::Dc => {
                let w = demand.target_w[c];
                if w.is_nan() {
                    f64::NAN
                } else {
                    spec.dc_line_a(w.min(spec.max_w))
                }
            }
        };
        if !t.is_nan() && !demand.behind_plan[c] {
            if t <= 0.0 && !locked_on[c] {
                binding[c] = Binding::Plan;
                continue;
            }
            if t < u {
                u = t.max(f);
                cb = Binding::Plan;
            }
        }
        // Headroom reclaim from fresh measurements of a running session.
        let age = ch.measured_age_s[c];
        if is_on
            && !ch.profile_unknown[c]
            && age.is_finite()
            && age >= 0.0
            && age <= ep.stale_after_s
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
            if mx + p.margin_a < u {
                u = (mx + p.margin_a).max(f);
                cb = Binding::Demand;
            }
        }
        m.set_floor[c] = f;
        m.set_cap[c] = u;
        m.floor[c] = f.max(held[c]);
        m.cap[c] = u.max(held[c]);
        m.cap_binding[c] = cb;
        candidate[c] = true;
        let rate_w = spec.watts_per_terminal_a() * nt as f64 * spec.max_a.max(1e-9);
        let need_s = demand.energy_wanted_kwh[c] * 3.6e6 / rate_w;
        let dep = demand.departure_s[c];
        let lax = if dep.is_nan() {
            f64::INFINITY
        } else {
            dep - ep.now_s - need_s
        };
        key[c] = if locked_on[c] {
            f64::NEG_INFINITY
        } else if is_on {
            lax - p.admission_hysteresis_s
        } else {
            lax
        };
    }
    // Every non-candidate consumes what it holds (measured, unconfirmed) as fixed load.
    let coefs = coef_table(topo);
    let mut remaining = m.capacity.clone();
    let subtract = |remaining: &mut [f64], c: usize, amount: f64| {
        if amount <= 0.0 {
            return;
        }
        let cc = &coefs[c * SLOTS..c * SLOTS + SLOTS];
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
    for c in 0..n {
        if !candidate[c] {
            subtract(&mut remaining, c, held[c]);
        }
    }
    let mut order: Vec<usize> = (0..n).filter(|&c| candidate[c]).collect();
    order.sort_by(|&a, &b| key[a].total_cmp(&key[b]).then(a.cmp(&b)));
    let mut admitted = vec![false; n];
    let tol = 1e-9;
    for &c in &order {
        let need = m.floor[c];
        let fits = locked_on[c]
            || topo.ancestors(c).iter().all(|&i| {
                (0..SLOTS).all(|slot| {
                    let a = coefs[c * SLOTS + slot];
                    a == 0.0 || remaining[i * SLOTS + slot] >= a * need - tol * (1.0 + a * need)
                })
            });
        if fits {
            admitted[c] = true;
            subtract(&mut remaining, c, need);
        } else {
            binding[c] = Binding::Admission;
            subtract(&mut remaining, c, held[c]);
        }
    }
    // The water-filling sees capacity net of non-admitted holdings.
    let mut capacity = m.capacity.clone();
    for c in 0..n {
        if !admitted[c] {
            subtract(&mut capacity, c, held[c]);
        }
    }
    m.capacity = capacity;
    for c in 0..n {
        if !admitted[c] {
            m.floor[c] = 0.0;
            m.cap[c] = 0.0;
            m.set_floor[c] = 0.0;
            m.set_cap[c] = 0.0;
        }
    }
    (m, admitted, binding, held)
}

/// Progressive filling on the model: freeze level per admitted charger (+inf: only its cap binds)
/// and, per charger, the constraint that froze it (`node * 4 + slot`).
pub fn water_fill(topo: &Topology, m: &Model, admitted: &[bool]) -> (Vec<f64>, Vec<Option<usize>>) {
    let n = topo.n_chargers();
    let nn = topo.n_nodes();
    let coefs = coef_table(topo);
    let mut level = vec![f64::INFINITY; n];
    let mut frozen_by: Vec<Option<usize>> = vec![None; n];
    let mut frozen = vec![false; n];
    // Members per constraint that can bind at all (the rest never saturate).
    let mut active: Vec<usize> = Vec::new();
    let mut members: Vec<Vec<(usize, f64)>> = vec![Vec::new(); nn * SLOTS];
    let mut dmax = [0.0f64; SLOTS];
    for i in 0..nn {
        dmax.fill(0.0);
        let below = topo.chargers_below(i);
        for &c in below {
            if admitted[c] {
                for (slot, d) in dmax.iter_mut().enumerate() {
                    *d += coefs[c * SLOTS + slot] * m.cap[c];
                }
            }
        }
        for (slot, &d) in dmax.iter().enumerate() {
            let k = i * SLOTS + slot;
            let cap = m.capacity[k];
            if cap == f64::INFINITY || d <= cap {
                continue;
            }
            let mem: Vec<(usize, f64)> = below
                .iter()
                .filter(|&&c| admitted[c] && coefs[c * SLOTS + slot] != 0.0)
                .map(|&c| (c, coefs[c * SLOTS + slot]))
                .collect();
            members[k] = mem;
            active.push(k);
        }
    }
    let mut fixed = vec![0.0; nn * SLOTS];
    let mut lam = vec![f64::INFINITY; nn * SLOTS];
    let mut charger_min = vec![f64::INFINITY; n];
    let mut events: Vec<(f64, f64)> = Vec::new();
    let mut newly: Vec<usize> = Vec::new();
    while !active.is_empty() {
        for &k in &active {
            // Frozen members are fixed load now.
            members[k].retain(|&(c, _)| !frozen[c]);
            lam[k] = saturation_level(
                &members[k],
                &m.floor,
                &m.cap,
                &m.weight,
                fixed[k],
                m.capacity[k],
                &mut events,
            );
            for &(c, _) in &members[k] {
                charger_min[c] = f64::INFINITY;
            }
        }
        for &k in &active {
            let l = lam[k];
            for &(c, _) in &members[k] {
                if l < charger_min[c] {
                    charger_min[c] = l;
                }
            }
        }
        let mut next = Vec::with_capacity(active.len());
        newly.clear();
        for &k in &active {
            let l = lam[k];
            if l == f64::INFINITY {
                continue; // can no longer saturate
            }
            if members[k].iter().all(|&(c, _)| charger_min[c] >= l) {
                for &(c, _) in &members[k] {
                    if level[c] == f64::INFINITY {
                        level[c] = l;
                        frozen_by[c] = Some(k);
                        newly.push(c);
                    }
                }
            } else {
                next.push(k);
            }
        }
        for &c in &newly {
            frozen[c] = true;
            let v = (m.weight[c] * level[c]).clamp(m.floor[c], m.cap[c]);
            let cc = &coefs[c * SLOTS..c * SLOTS + SLOTS];
            for &i in topo.ancestors(c) {
                for (slot, &a) in cc.iter().enumerate() {
                    if a != 0.0 {
                        fixed[i * SLOTS + slot] += a * v;
                    }
                }
            }
        }
        if newly.is_empty() && next.len() == active.len() {
            break; // no progress is impossible in exact arithmetic; guard anyway
        }
        active = next;
    }
    (level, frozen_by)
}

pub fn allocate(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    demand: &Demand<'_>,
    p: &AllocatorParams,
    explain: bool,
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
    validate_demand(demand, n)?;
    let (m, admitted, mut binding, _held) = model_and_admission(topo, ch, nodes, demand, p);
    let (level, frozen_by) = water_fill(topo, &m, &admitted);
    // Setpoints from freeze levels; then the envelope, in this same call.
    let mut level_a = vec![0.0; n];
    let mut req_a = vec![0.0; n];
    let mut req_w = vec![0.0; n];
    let mut bnode: Vec<Option<usize>> = vec![None; n];
    let mut bphase: Vec<Option<usize>> = vec![None; n];
    for c in 0..n {
        if !admitted[c] {
            continue;
        }
        let l = level[c];
        let x = if l == f64::INFINITY {
            m.set_cap[c]
        } else {
            (m.weight[c] * l).clamp(m.set_floor[c], m.set_cap[c])
        };
        level_a[c] = x;
        match frozen_by[c] {
            Some(k) if x < m.set_cap[c] - 1e-9 => {
                let slot = k % SLOTS;
                bnode[c] = Some(k / SLOTS);
                if slot < N_PHASES {
                    binding[c] = Binding::NodePhase;
                    bphase[c] = Some(slot);
                } else {
                    binding[c] = Binding::NodePower;
                }
            }
            _ => binding[c] = m.cap_binding[c],
        }
        let snapped = snap_down(topo, c, x);
        if snapped < x - 1e-9 && matches!(binding[c], Binding::None | Binding::ChargerMax) {
            binding[c] = Binding::Step;
        }
        let spec = &topo.chargers[c];
        match spec.kind {
            ChargerKind::Ac => req_a[c] = snapped,
            ChargerKind::Dc => req_w[c] = spec.dc_power_w(snapped),
        }
    }
    let env_in = ChargerInputs {
        requested_a: &req_a,
        requested_w: &req_w,
        ..*ch
    };
    let mut cnt = counting(topo, &env_in, nodes, &p.envelope);
    let mut dec = Decision {
        setpoint_a: vec![0.0; n],
        setpoint_w: vec![0.0; n],
        binding: vec![Binding::None; n],
        binding_node: bnode,
        binding_phase: bphase,
        binding_value: vec![f64::NAN; n],
        binding_limit: vec![f64::NAN; n],
        reason: Vec::new(),
    };
    for c in 0..n {
        let (x, b) = sanitise_request(topo, c, &env_in, &p.envelope);
        cnt.s[c] = x;
        let wanted = match topo.chargers[c].kind {
            ChargerKind::Ac => req_a[c],
            ChargerKind::Dc => topo.chargers[c].dc_line_a(req_w[c]),
        };
        // Keep the allocator's reason unless the envelope changed the value.
        dec.binding[c] = if admitted[c] && (x - wanted).abs() <= 1e-9 * (1.0 + wanted) {
            binding[c]
        } else if admitted[c] {
            dec.binding_node[c] = None;
            dec.binding_phase[c] = None;
            b
        } else {
            binding[c]
        };
    }
    // Node values for allocator-bound reasons are filled by enforce_limits' final pass.
    enforce_limits(topo, &mut cnt, &mut dec, None);
    finish(topo, &env_in, &cnt, &mut dec, explain);
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
    let (m, admitted, _, _) = model_and_admission(topo, ch, nodes, demand, p);
    Ok((m, admitted))
}
