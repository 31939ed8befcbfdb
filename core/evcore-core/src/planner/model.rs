//! The planning model as Clarabel data: min ½xᵀPx + qᵀx  s.t.  Ax + s = b, s ∈ K.
//!
//! Variables, in this order:
//! - `x[s,k]`: rate of session `s` in step `k` (A per phase for AC, kW output for DC), only for the
//!   steps that overlap the session's window;
//! - `u[s]`: energy not delivered by departure (kWh), one per session with variables;
//! - `g[k]`: power imported at the site meter (kW), one per step;
//! - `D`: the billing period's peak window average (kW), only when the demand charge is positive.
//!
//! Cones, in this order: equalities (energy balance), one nonnegative block (bounds, imports, power
//! caps, collinear line currents, demand windows), then one 3-D second-order cone per line current
//! that mixes phasor angles (line-to-line loads): `‖Σ c·x‖ ≤ headroom`.

use std::collections::HashMap;

use clarabel::algebra::CscMatrix;
use clarabel::solver::SupportedConeT;

use super::input::{at, first_index, ChargerKind, PlanInput, Wiring};

/// The smallest rate (A per phase, DC kW) a session is planned with; below it, none.
const MIN_PLANNED_RATE: f64 = 1e-6;

/// One planned rate: session `session` in step `step`, present for `frac` of the step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Var {
    pub session: usize,
    pub step: usize,
    pub frac: f64,
}

/// Per-session data the model and the rounding pass need.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    pub charger: usize,
    pub dc: bool,
    /// Index of the first `x` variable and how many (contiguous, consecutive steps).
    pub first_var: usize,
    pub n_vars: usize,
    /// Index of `u`, when the session has variables.
    pub u_var: Option<usize>,
    /// Rates (what the vehicle draws) when on: at least `min_rate`, at most `max_rate`.
    pub min_rate: f64,
    pub max_rate: f64,
    /// The charger's minimum setpoint (A per phase, DC kW): what it is sent when on. Above
    /// `min_rate` where the vehicle takes less than it (it is on, drawing what it takes).
    pub set_min: f64,
    pub vehicle_kw_per_unit: f64,
    pub site_kw_per_unit: f64,
    pub energy_kwh: f64,
    pub priority: f64,
}

/// A limit on one node's line (`phase`) or active power (`phase == None`) in one step.
#[derive(Debug, Clone)]
pub(crate) struct LimitCon {
    pub node: usize,
    pub phase: Option<usize>,
    pub step: usize,
    /// Limit minus forecast other load, before the safety margin.
    pub headroom: f64,
    /// Variable index and its complex (re, im) coefficient; im is 0 for power rows.
    pub entries: Vec<(usize, f64, f64)>,
    /// Second-order cone (mixed angles) rather than a linear row.
    pub soc: bool,
}

/// A demand window row: Σ coef·g[step] + past_kw ≤ D.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DemandRow {
    pub window_start_s: f64,
    pub coefs: Vec<(usize, f64)>,
    pub past_kw: f64,
}

pub(crate) struct Model {
    pub steps: usize,
    pub step_start_s: Vec<f64>,
    pub sessions: Vec<SessionInfo>,
    pub vars: Vec<Var>,
    pub n_x: usize,
    pub d_var: Option<usize>,
    pub n: usize,
    pub limits: Vec<LimitCon>,
    pub demand: Vec<DemandRow>,
    pub p: CscMatrix<f64>,
    pub q: Vec<f64>,
    pub a: CscMatrix<f64>,
    pub b: Vec<f64>,
    pub cones: Vec<SupportedConeT<f64>>,
    /// Rows in the nonnegative block before the limit rows, for reporting sizes.
    pub m: usize,
}

const TWO_PI_3: f64 = 2.0 * std::f64::consts::PI / 3.0;

/// Phase angle of site phase `p` (positive sequence A, B, C).
fn theta(p: usize) -> f64 {
    -(p as f64) * TWO_PI_3
}

/// Per-unit phasor contributions of a charger to the three site lines, and its active power per unit.
/// Unit: 1 A per phase (AC) or 1 kW of output (DC).
pub(crate) fn charger_coefficients(c: &super::input::PlanCharger) -> ([(f64, f64); 3], f64, f64) {
    let mut lines = [(0.0, 0.0); 3];
    match (c.kind, c.wiring) {
        (ChargerKind::Dc, _) => {
            let a_per_kw = 1000.0 / (c.efficiency * 3.0 * c.voltage_v);
            for &p in &c.phases {
                lines[p] = (a_per_kw * theta(p).cos(), a_per_kw * theta(p).sin());
            }
            (lines, 1.0 / c.efficiency, 1.0)
        }
        (ChargerKind::Ac, Wiring::LineToNeutral) => {
            let p = c.phases[0];
            lines[p] = (theta(p).cos(), theta(p).sin());
            (lines, c.voltage_v / 1000.0, c.voltage_v / 1000.0)
        }
        (ChargerKind::Ac, Wiring::LineToLine) => {
            let (pa, pb) = (c.phases[0], c.phases[1]);
            let re = theta(pa).cos() - theta(pb).cos();
            let im = theta(pa).sin() - theta(pb).sin();
            let norm = (re * re + im * im).sqrt();
            lines[pa] = (re / norm, im / norm);
            lines[pb] = (-re / norm, -im / norm);
            (lines, c.voltage_v / 1000.0, c.voltage_v / 1000.0)
        }
        (ChargerKind::Ac, Wiring::ThreePhase) => {
            for &p in &c.phases {
                lines[p] = (theta(p).cos(), theta(p).sin());
            }
            (
                lines,
                3.0 * c.voltage_v / 1000.0,
                3.0 * c.voltage_v / 1000.0,
            )
        }
    }
}

/// Triplet collector for a CSC matrix.
struct Triplets {
    i: Vec<usize>,
    j: Vec<usize>,
    v: Vec<f64>,
}

impl Triplets {
    fn new() -> Self {
        Self {
            i: Vec::new(),
            j: Vec::new(),
            v: Vec::new(),
        }
    }
    fn push(&mut self, i: usize, j: usize, v: f64) {
        self.i.push(i);
        self.j.push(j);
        self.v.push(v);
    }
}

impl Model {
    /// Build the model. `margin_rel` tightens every hard limit by that fraction (plus as many
    /// amperes/kW) so that the solver's feasibility tolerance never lands a plan above a limit.
    pub(crate) fn build(input: &PlanInput, margin_rel: f64) -> Model {
        let steps = input.step_s.len();
        let mut step_start_s = Vec::with_capacity(steps);
        let mut t = input.start_s;
        for d in &input.step_s {
            step_start_s.push(t);
            t += d;
        }
        let end_s = t;
        let horizon_s = end_s - input.start_s;

        // Node tree: ancestors of every node (itself included).
        // Ids by map, not by scanning (O(n²) in sessions x chargers before).
        let node_at = first_index(input.nodes.iter().map(|n| n.id.as_str()));
        let charger_at = first_index(input.chargers.iter().map(|c| c.id.as_str()));
        let node_index = |id: &str| node_at.get(id).copied();
        let root = input
            .nodes
            .iter()
            .position(|n| n.parent.is_none())
            .unwrap_or(0);
        let mut ancestors: Vec<Vec<usize>> = Vec::with_capacity(input.nodes.len());
        for (i, _) in input.nodes.iter().enumerate() {
            let mut chain = vec![i];
            let mut cur = i;
            while let Some(p) = input.nodes[cur].parent.as_deref().and_then(node_index) {
                if chain.contains(&p) {
                    break;
                }
                chain.push(p);
                cur = p;
            }
            ancestors.push(chain);
        }

        let coeffs: Vec<_> = input.chargers.iter().map(charger_coefficients).collect();
        let charger_node: Vec<usize> = input
            .chargers
            .iter()
            .map(|c| node_index(&c.parent).unwrap_or(root))
            .collect();
        // in_subtree[node][charger]
        let mut in_subtree = vec![vec![false; input.chargers.len()]; input.nodes.len()];
        for (c, &n) in charger_node.iter().enumerate() {
            for &a in &ancestors[n] {
                in_subtree[a][c] = true;
            }
        }

        // Sessions and their variables.
        let mut sessions = Vec::with_capacity(input.sessions.len());
        let mut vars = Vec::new();
        for (si, s) in input.sessions.iter().enumerate() {
            let ci = charger_at.get(s.charger_id.as_str()).copied().unwrap_or(0);
            let c = &input.chargers[ci];
            let dc = c.kind == ChargerKind::Dc;
            let (min_rate, max_rate) = if dc {
                let max_w = c.max_w.unwrap_or(0.0).min(s.max_w.unwrap_or(f64::INFINITY));
                (c.min_w.unwrap_or(0.0) / 1000.0, max_w / 1000.0)
            } else {
                let max_a = c.max_a.unwrap_or(0.0).min(s.max_a.unwrap_or(f64::INFINITY));
                (c.min_a.unwrap_or(6.0), max_a)
            };
            // A rate too small to plan with is none (1 / max_rate² scales its terms: 1e-160 A
            // put infinities into P and the whole site's plan failed).
            let max_rate = if max_rate < MIN_PLANNED_RATE {
                0.0
            } else {
                max_rate
            };
            // A vehicle that takes less than the charger's minimum draws what it takes once the
            // charger is on: rounding raised its rate to the charger's minimum before, above
            // what it can draw (four 5 kW vehicles on 10 kW-minimum chargers were planned to
            // draw 42 kW under a 25 kW cap, and delivered energy was counted from that). Its
            // rate stays at most what it takes; its target (the setpoint) is the charger's
            // minimum (`set_min`).
            let set_min = min_rate;
            let min_rate = min_rate.min(max_rate);
            let first_var = vars.len();
            if max_rate > 0.0 {
                for k in 0..steps {
                    let a = step_start_s[k].max(s.arrival_s);
                    let b = (step_start_s[k] + input.step_s[k]).min(s.departure_s);
                    if b > a {
                        vars.push(Var {
                            session: si,
                            step: k,
                            frac: (b - a) / input.step_s[k],
                        });
                    }
                }
            }
            let n_vars = vars.len() - first_var;
            sessions.push(SessionInfo {
                charger: ci,
                dc,
                first_var,
                n_vars,
                u_var: None,
                min_rate,
                max_rate: max_rate.max(0.0),
                set_min,
                vehicle_kw_per_unit: coeffs[ci].2,
                site_kw_per_unit: coeffs[ci].1,
                energy_kwh: s.energy_requested_kwh,
                priority: s.priority,
            });
        }
        let n_x = vars.len();
        let mut n = n_x;
        for s in sessions.iter_mut() {
            if s.n_vars > 0 {
                s.u_var = Some(n);
                n += 1;
            }
        }
        let g_off = n;
        n += steps;
        let d_var = if input.demand_charge_per_kw > 0.0 {
            n += 1;
            Some(n - 1)
        } else {
            None
        };

        let mut vars_by_step: Vec<Vec<usize>> = vec![Vec::new(); steps];
        for (v, var) in vars.iter().enumerate() {
            vars_by_step[var.step].push(v);
        }

        // Aggregates z[node, group, step] = Σ rates of the chargers of one wiring group (same
        // phasors and kW per unit) in the node's subtree. Limits are written on these, so a rate
        // appears in one aggregation row per step instead of every limit row of every ancestor:
        // same model, far less fill in the KKT factorisation.
        let mut groups: Vec<([(f64, f64); 3], f64)> = Vec::new();
        let mut group_of = Vec::with_capacity(input.chargers.len());
        for (lines, kw, _) in &coeffs {
            let same = |g: &([(f64, f64); 3], f64)| {
                (g.1 - kw).abs() <= 1e-12
                    && g.0
                        .iter()
                        .zip(lines)
                        .all(|(a, b)| (a.0 - b.0).abs() <= 1e-12 && (a.1 - b.1).abs() <= 1e-12)
            };
            match groups.iter().position(same) {
                Some(i) => group_of.push(i),
                None => {
                    groups.push((*lines, *kw));
                    group_of.push(groups.len() - 1);
                }
            }
        }
        let mut z_index: HashMap<(usize, usize, usize), usize> = HashMap::new();
        let mut z_keys: Vec<(usize, usize, usize)> = Vec::new();
        let mut direct: HashMap<(usize, usize, usize), Vec<usize>> = HashMap::new();
        for (v, var) in vars.iter().enumerate() {
            let c = sessions[var.session].charger;
            let grp = group_of[c];
            let home = charger_node[c];
            direct.entry((home, grp, var.step)).or_default().push(v);
            for &a in &ancestors[home] {
                z_index.entry((a, grp, var.step)).or_insert_with(|| {
                    z_keys.push((a, grp, var.step));
                    n += 1;
                    n - 1
                });
            }
        }
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); input.nodes.len()];
        for (i, nd) in input.nodes.iter().enumerate() {
            if let Some(p) = nd.parent.as_deref().and_then(node_index) {
                if p != i {
                    children[p].push(i);
                }
            }
        }

        // Hard limits: node power caps and line currents. A limit the rates below it cannot
        // reach even all at their maximum cannot bind and is left out: a "no cap" placeholder
        // (1e6 kW) beside kW-sized rates and other load made the problem so badly scaled that
        // Clarabel called it infeasible (1,000 kW of other load under a 1e6 kW cap).
        let can_bind = |entries: &[(usize, f64, f64)], headroom: f64| {
            let reach: f64 = entries
                .iter()
                .map(|&(v, re, im)| (re * re + im * im).sqrt() * sessions[vars[v].session].max_rate)
                .sum();
            headroom < reach * 1.01 + 1.0
        };
        let mut limits = Vec::new();
        for (ni, node) in input.nodes.iter().enumerate() {
            if let Some(cap) = &node.power_limit_kw {
                for k in 0..steps {
                    let entries: Vec<(usize, f64, f64)> = vars_by_step[k]
                        .iter()
                        .filter(|&&v| in_subtree[ni][sessions[vars[v].session].charger])
                        .map(|&v| (v, sessions[vars[v].session].site_kw_per_unit, 0.0))
                        .collect();
                    let headroom = at(cap, k) - at(&node.other_load_kw, k);
                    if !entries.is_empty() && can_bind(&entries, headroom) {
                        limits.push(LimitCon {
                            node: ni,
                            phase: None,
                            step: k,
                            headroom,
                            entries,
                            soc: false,
                        });
                    }
                }
            }
            for ph in 0..3 {
                // Chargers in the subtree that load this line, and whether their phasors are collinear.
                let mut dir: Option<(f64, f64)> = None;
                let mut collinear = true;
                for c in 0..input.chargers.len() {
                    let (re, im) = coeffs[c].0[ph];
                    let mag = (re * re + im * im).sqrt();
                    if !in_subtree[ni][c] || mag == 0.0 {
                        continue;
                    }
                    let u = (re / mag, im / mag);
                    match dir {
                        None => dir = Some(u),
                        Some(d) => {
                            if (d.0 - u.0).abs() > 1e-9 || (d.1 - u.1).abs() > 1e-9 {
                                collinear = false;
                            }
                        }
                    }
                }
                if dir.is_none() {
                    continue;
                }
                for k in 0..steps {
                    let entries: Vec<(usize, f64, f64)> = vars_by_step[k]
                        .iter()
                        .filter_map(|&v| {
                            let c = sessions[vars[v].session].charger;
                            let (re, im) = coeffs[c].0[ph];
                            (in_subtree[ni][c] && (re != 0.0 || im != 0.0)).then_some((v, re, im))
                        })
                        .collect();
                    let headroom = at(&node.phase_limit_a[ph], k) - at(&node.other_load_a[ph], k);
                    if !entries.is_empty() && can_bind(&entries, headroom) {
                        limits.push(LimitCon {
                            node: ni,
                            phase: Some(ph),
                            step: k,
                            headroom,
                            entries,
                            soc: !collinear,
                        });
                    }
                }
            }
        }

        // Demand windows, clock-aligned.
        let mut demand: Vec<DemandRow> = Vec::new();
        if d_var.is_some() {
            let w = input.demand_window_s;
            let mut ws = (input.start_s / w).floor() * w;
            while ws < end_s {
                let we = ws + w;
                let mut coefs = Vec::new();
                for k in 0..steps {
                    let a = step_start_s[k].max(ws);
                    let b = (step_start_s[k] + input.step_s[k]).min(we);
                    if b > a {
                        coefs.push((k, (b - a) / w));
                    }
                }
                let mut past_kw = if ws < input.start_s {
                    input.current_window_energy_kwh * 3600.0 / w
                } else {
                    0.0
                };
                // A window the horizon end cuts: the site goes on importing after it, at least
                // the root's other load less PV as forecast for the last step (the chargers'
                // load there is not known: none is planned). Counting nothing there let a plan
                // put a spike into the last steps that raised the billed peak (70 kW billed
                // against 50 kW planned in tests `a_window_cut_by_the_horizon_end_...`).
                if we > end_s {
                    let last = steps - 1;
                    let tail_kw = (at(&input.nodes[root].other_load_kw, last)
                        - at(&input.pv_kw, last))
                    .max(0.0);
                    past_kw += tail_kw * (we - end_s.max(ws)) / w;
                }
                let row = DemandRow {
                    window_start_s: ws,
                    coefs,
                    past_kw,
                };
                let dup = demand
                    .last()
                    .is_some_and(|r| r.coefs == row.coefs && r.past_kw == row.past_kw);
                if !dup && !row.coefs.is_empty() {
                    demand.push(row);
                }
                ws = we;
            }
        }

        // Objective.
        let w = &input.weights;
        let mut q = vec![0.0; n];
        let mut pt = Triplets::new();
        for (v, var) in vars.iter().enumerate() {
            let s = &sessions[var.session];
            let d_h = input.step_s[var.step] / 3600.0;
            let kwh_per_unit = s.vehicle_kw_per_unit * var.frac * d_h;
            let mid = step_start_s[var.step] + 0.5 * input.step_s[var.step] - input.start_s;
            q[v] = w.charge_early_per_kwh * (mid / horizon_s) * kwh_per_unit;
            if w.urgency_per_kwh > 0.0 {
                let departure_s = input.sessions[var.session].departure_s;
                let left_s = (departure_s - input.start_s).max(input.step_s[var.step]);
                q[v] += w.urgency_per_kwh * (mid / left_s).min(1.0) * kwh_per_unit;
            }
            let inv2 = 1.0 / (s.max_rate * s.max_rate);
            if w.equal_share > 0.0 {
                pt.push(v, v, 2.0 * w.equal_share * d_h * inv2);
            }
        }
        for s in &sessions {
            if let Some(u) = s.u_var {
                q[u] = w.non_delivery_per_kwh * s.priority;
            }
            let inv2 = 1.0 / (s.max_rate * s.max_rate);
            if w.smooth <= 0.0 {
                continue;
            }
            for j in 1..s.n_vars {
                let (a, b) = (s.first_var + j - 1, s.first_var + j);
                let wm = 2.0 * w.smooth * inv2;
                pt.push(a, a, wm);
                pt.push(b, b, wm);
                pt.push(a, b, -wm);
            }
        }
        for k in 0..steps {
            q[g_off + k] = at(&input.price_per_kwh, k) * input.step_s[k] / 3600.0;
        }
        if let Some(d) = d_var {
            q[d] = input.demand_charge_per_kw;
        }
        let p = CscMatrix::new_from_triplets(n, n, pt.i, pt.j, pt.v);

        // Constraints.
        let mut at_ = Triplets::new();
        let mut b = Vec::new();
        let mut cones = Vec::new();
        let mut row = 0usize;
        // Energy balance: Σ kWh·x + u = E.
        for s in &sessions {
            if let Some(u) = s.u_var {
                for v in s.first_var..s.first_var + s.n_vars {
                    let var = vars[v];
                    let kwh = s.vehicle_kw_per_unit * var.frac * input.step_s[var.step] / 3600.0;
                    at_.push(row, v, kwh);
                }
                at_.push(row, u, 1.0);
                b.push(s.energy_kwh);
                row += 1;
            }
        }
        // Aggregation: z[n,g,k] − Σ z[child,g,k] − Σ x (chargers directly under n) = 0.
        for &(nd, grp, k) in &z_keys {
            at_.push(row, z_index[&(nd, grp, k)], 1.0);
            for &ch in &children[nd] {
                if let Some(&zc) = z_index.get(&(ch, grp, k)) {
                    at_.push(row, zc, -1.0);
                }
            }
            if let Some(vs) = direct.get(&(nd, grp, k)) {
                for &v in vs {
                    at_.push(row, v, -1.0);
                }
            }
            b.push(0.0);
            row += 1;
        }
        if row > 0 {
            cones.push(SupportedConeT::ZeroConeT(row));
        }
        let nonneg_start = row;
        for (v, var) in vars.iter().enumerate() {
            at_.push(row, v, -1.0);
            b.push(0.0);
            at_.push(row + 1, v, 1.0);
            b.push(sessions[var.session].max_rate);
            row += 2;
        }
        for s in &sessions {
            if let Some(u) = s.u_var {
                at_.push(row, u, -1.0);
                b.push(0.0);
                row += 1;
            }
        }
        let root_node = &input.nodes[root];
        for k in 0..steps {
            at_.push(row, g_off + k, -1.0);
            b.push(0.0);
            row += 1;
            // Σ f·kW·x − g ≤ pv − other, with Σ kW·x taken from the root's aggregates and
            // the part of a step before arrival / after departure taken off.
            for (grp, gd) in groups.iter().enumerate() {
                if let Some(&z) = z_index.get(&(root, grp, k)) {
                    at_.push(row, z, gd.1);
                }
            }
            for &v in &vars_by_step[k] {
                let var = vars[v];
                if var.frac < 1.0 {
                    at_.push(
                        row,
                        v,
                        -(1.0 - var.frac) * sessions[var.session].site_kw_per_unit,
                    );
                }
            }
            at_.push(row, g_off + k, -1.0);
            b.push(at(&input.pv_kw, k) - at(&root_node.other_load_kw, k));
            row += 1;
            // A negative price pays for imports: g must not run off above what is drawn. With
            // g ≤ Σ f·kW·x + max(0, other − pv), g is the import exactly while the other load
            // covers the PV (else at most the PV surplus above it), and a kWh charged there
            // earns the price: the plan charges more in that step, never more than the
            // sessions still want (Σ kWh·x ≤ E), so the problem stays bounded.
            if at(&input.price_per_kwh, k) < 0.0 {
                at_.push(row, g_off + k, 1.0);
                for (grp, gd) in groups.iter().enumerate() {
                    if let Some(&z) = z_index.get(&(root, grp, k)) {
                        at_.push(row, z, -gd.1);
                    }
                }
                for &v in &vars_by_step[k] {
                    let var = vars[v];
                    if var.frac < 1.0 {
                        at_.push(
                            row,
                            v,
                            (1.0 - var.frac) * sessions[var.session].site_kw_per_unit,
                        );
                    }
                }
                b.push((at(&root_node.other_load_kw, k) - at(&input.pv_kw, k)).max(0.0));
                row += 1;
            }
        }
        // A limit the forecast other load leaves no room under (h = 0, or less than the margin)
        // plans 0 there; only a limit the other load already exceeds (h < 0) is infeasible.
        let tighten = |h: f64| {
            let t = h - margin_rel * (h.abs() + 1.0);
            if h >= 0.0 {
                t.max(0.0)
            } else {
                t
            }
        };
        // A limit's left-hand side over the node's aggregates: (z, re, im) per wiring group.
        let z_terms = |l: &LimitCon| -> Vec<(usize, f64, f64)> {
            let mut out = Vec::new();
            for (grp, gd) in groups.iter().enumerate() {
                if let Some(&z) = z_index.get(&(l.node, grp, l.step)) {
                    match l.phase {
                        Some(p) if gd.0[p] != (0.0, 0.0) => out.push((z, gd.0[p].0, gd.0[p].1)),
                        Some(_) => {}
                        None => out.push((z, gd.1, 0.0)),
                    }
                }
            }
            out
        };
        for l in limits.iter().filter(|l| !l.soc) {
            for (z, re, im) in z_terms(l) {
                let coef = if l.phase.is_some() {
                    (re * re + im * im).sqrt()
                } else {
                    re
                };
                at_.push(row, z, coef);
            }
            b.push(tighten(l.headroom));
            row += 1;
        }
        if let Some(d) = d_var {
            for r in &demand {
                for &(k, c) in &r.coefs {
                    at_.push(row, g_off + k, c);
                }
                at_.push(row, d, -1.0);
                b.push(-r.past_kw);
                row += 1;
            }
            at_.push(row, d, -1.0);
            b.push(-input.peak_floor_kw);
            row += 1;
        }
        cones.push(SupportedConeT::NonnegativeConeT(row - nonneg_start));
        for l in limits.iter().filter(|l| l.soc) {
            // s = (headroom, Σ re·x, Σ im·x) ∈ SOC; the first row of A stays empty.
            b.push(tighten(l.headroom));
            for (z, re, im) in z_terms(l) {
                at_.push(row + 1, z, -re);
                at_.push(row + 2, z, -im);
            }
            b.push(0.0);
            b.push(0.0);
            row += 3;
            cones.push(SupportedConeT::SecondOrderConeT(3));
        }
        let a = CscMatrix::new_from_triplets(row, n, at_.i, at_.j, at_.v);

        Model {
            steps,
            step_start_s,
            sessions,
            vars,
            n_x,
            d_var,
            n,
            limits,
            demand,
            p,
            q,
            a,
            b,
            cones,
            m: row,
        }
    }
}
