//! After the solve: the objective of any schedule, the 6 A rounding pass, exact limit checks and
//! the binding-constraint report.

use super::input::{at, PlanInput};
use super::model::{LimitCon, Model};
use super::{BindingConstraint, ObjectiveTerms};

pub(crate) struct Evaluation {
    pub terms: ObjectiveTerms,
    pub delivered_kwh: Vec<f64>,
    pub shortfall_kwh: Vec<f64>,
    pub peak_kw: f64,
}

fn kwh_per_unit(model: &Model, input: &PlanInput, v: usize) -> f64 {
    let var = model.vars[v];
    model.sessions[var.session].vehicle_kw_per_unit * var.frac * input.step_s[var.step] / 3600.0
}

/// The model's objective for rates `y` (one per `x` variable), with the other variables at
/// their best values: shortfall = requested − delivered, import = max(0, net), peak = max window.
pub(crate) fn evaluate(model: &Model, input: &PlanInput, y: &[f64]) -> Evaluation {
    let w = &input.weights;
    let mut t = ObjectiveTerms::default();
    let mut delivered = vec![0.0; input.sessions.len()];
    let root = input
        .nodes
        .iter()
        .position(|n| n.parent.is_none())
        .unwrap_or(0);
    let mut net = vec![0.0; model.steps];
    for k in 0..model.steps {
        net[k] = at(&input.nodes[root].other_load_kw, k) - at(&input.pv_kw, k);
    }
    for (v, var) in model.vars.iter().enumerate() {
        let s = &model.sessions[var.session];
        delivered[var.session] += kwh_per_unit(model, input, v) * y[v];
        net[var.step] += var.frac * s.site_kw_per_unit * y[v];
        t.charge_early += model.q[v] * y[v];
        let d_h = input.step_s[var.step] / 3600.0;
        t.equal_share += w.equal_share * d_h * (y[v] / s.max_rate).powi(2);
    }
    for s in &model.sessions {
        for j in 1..s.n_vars {
            let (a, b) = (s.first_var + j - 1, s.first_var + j);
            t.smooth += w.smooth * ((y[b] - y[a]) / s.max_rate).powi(2);
        }
    }
    let mut shortfall = vec![0.0; input.sessions.len()];
    for (i, s) in model.sessions.iter().enumerate() {
        shortfall[i] = (s.energy_kwh - delivered[i]).max(0.0);
        t.non_delivery += w.non_delivery_per_kwh * s.priority * shortfall[i];
    }
    let g: Vec<f64> = net.iter().map(|v| v.max(0.0)).collect();
    for k in 0..model.steps {
        t.energy_cost += at(&input.price_per_kwh, k) * g[k] * input.step_s[k] / 3600.0;
    }
    if model.d_var.is_some() {
        let mut peak = input.peak_floor_kw;
        for r in &model.demand {
            let avg: f64 = r.coefs.iter().map(|&(k, c)| c * g[k]).sum::<f64>() + r.past_kw;
            peak = peak.max(avg);
        }
        t.demand_charge = input.demand_charge_per_kw * peak;
    }
    t.total = t.energy_cost
        + t.demand_charge
        + t.non_delivery
        + t.charge_early
        + t.equal_share
        + t.smooth;
    Evaluation {
        terms: t,
        delivered_kwh: delivered,
        shortfall_kwh: shortfall,
        peak_kw: g.iter().cloned().fold(0.0, f64::max),
    }
}

/// Value of a limit's left-hand side for rates `y`: |Σ c·y| (A) or Σ kW·y.
pub(crate) fn limit_value(l: &LimitCon, y: &[f64]) -> f64 {
    let (mut re, mut im) = (0.0, 0.0);
    for &(v, cr, ci) in &l.entries {
        re += cr * y[v];
        im += ci * y[v];
    }
    if l.phase.is_some() {
        (re * re + im * im).sqrt()
    } else {
        re
    }
}

/// Every limit's left-hand side at the rates `seen`, with its (re, im) sums for updates.
struct LimitValues {
    value: Vec<f64>,
    sums: Vec<(f64, f64)>,
    seen: Vec<f64>,
}

impl LimitValues {
    fn new(model: &Model, y: &[f64]) -> Self {
        let sums: Vec<(f64, f64)> = model
            .limits
            .iter()
            .map(|l| {
                l.entries.iter().fold((0.0, 0.0), |(re, im), &(v, cr, ci)| {
                    (re + cr * y[v], im + ci * y[v])
                })
            })
            .collect();
        let value = model
            .limits
            .iter()
            .zip(&sums)
            .map(|(l, s)| {
                if l.phase.is_some() {
                    s.0.hypot(s.1)
                } else {
                    s.0
                }
            })
            .collect();
        Self {
            value,
            sums,
            seen: y.to_vec(),
        }
    }
}

fn tightened(h: f64, margin_rel: f64) -> f64 {
    h - margin_rel * (h.abs() + 1.0)
}

/// Limits exceeded by `y` beyond `margin_rel`-tightened headroom: (limit index, value).
pub(crate) fn violations(model: &Model, y: &[f64], margin_rel: f64) -> Vec<(usize, f64)> {
    model
        .limits
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let v = limit_value(l, y);
            (v > tightened(l.headroom, margin_rel) + 1e-9).then_some((i, v))
        })
        .collect()
}

pub(crate) fn describe(
    model: &Model,
    input: &PlanInput,
    l: &LimitCon,
    kind: &str,
) -> BindingConstraint {
    let kind = if kind.is_empty() || kind == "phase_limit" {
        if l.phase.is_some() {
            "phase_limit"
        } else {
            "power_limit"
        }
    } else {
        kind
    };
    BindingConstraint {
        kind: kind.into(),
        node: input.nodes[l.node].id.clone(),
        phase: l.phase,
        step: l.step,
        step_start_s: model.step_start_s[l.step],
        headroom: l.headroom,
    }
}

/// Constraints with (almost) no slack at the relaxed optimum `x`.
pub(crate) fn binding(
    model: &Model,
    input: &PlanInput,
    x: &[f64],
    margin_rel: f64,
) -> Vec<BindingConstraint> {
    let mut out: Vec<BindingConstraint> = model
        .limits
        .iter()
        .filter(|l| {
            let h = tightened(l.headroom, margin_rel);
            limit_value(l, x) >= h - 1e-4 * h.abs().max(1.0)
        })
        .map(|l| describe(model, input, l, ""))
        .collect();
    if model.d_var.is_some() {
        let ev = evaluate(model, input, x);
        let peak = if input.demand_charge_per_kw > 0.0 {
            ev.terms.demand_charge / input.demand_charge_per_kw
        } else {
            0.0
        };
        if peak > input.peak_floor_kw + 1e-6 {
            let mut net = vec![0.0; model.steps];
            let root = input
                .nodes
                .iter()
                .position(|n| n.parent.is_none())
                .unwrap_or(0);
            for (k, v) in net.iter_mut().enumerate() {
                *v = at(&input.nodes[root].other_load_kw, k) - at(&input.pv_kw, k);
            }
            for (v, var) in model.vars.iter().enumerate() {
                net[var.step] += var.frac * model.sessions[var.session].site_kw_per_unit * x[v];
            }
            for r in &model.demand {
                let avg: f64 = r
                    .coefs
                    .iter()
                    .map(|&(k, c)| c * net[k].max(0.0))
                    .sum::<f64>()
                    + r.past_kw;
                if avg >= peak - 1e-4 * peak.max(1.0) {
                    let step = r.coefs.first().map(|c| c.0).unwrap_or(0);
                    out.push(BindingConstraint {
                        kind: "demand_peak".into(),
                        node: input.nodes[root].id.clone(),
                        phase: None,
                        step,
                        step_start_s: r.window_start_s,
                        headroom: peak,
                    });
                }
            }
        }
    }
    out
}

/// Site import per step (kW, may be negative with PV) for rates `x`.
fn net_kw(model: &Model, input: &PlanInput, x: &[f64]) -> Vec<f64> {
    let root = input
        .nodes
        .iter()
        .position(|n| n.parent.is_none())
        .unwrap_or(0);
    let mut net = vec![0.0; model.steps];
    for (k, v) in net.iter_mut().enumerate() {
        *v = at(&input.nodes[root].other_load_kw, k) - at(&input.pv_kw, k);
    }
    for (v, var) in model.vars.iter().enumerate() {
        net[var.step] += var.frac * model.sessions[var.session].site_kw_per_unit * x[v];
    }
    net
}

/// Demand window averages (kW) for a site import profile.
fn window_avgs(model: &Model, net: &[f64]) -> Vec<f64> {
    model
        .demand
        .iter()
        .map(|r| {
            r.coefs
                .iter()
                .map(|&(k, c)| c * net[k].max(0.0))
                .sum::<f64>()
                + r.past_kw
        })
        .collect()
}

/// What the rounding pass needs to price energy as it places it: the site import per step and
/// the demand window averages, kept current as rates change.
struct SiteState {
    net: Vec<f64>,
    avgs: Vec<f64>,
    windows_of_step: Vec<Vec<(usize, f64)>>,
    /// The relaxed optimum's peak (kW, floor included): windows the rounding took energy from
    /// are below it and cost no demand charge to refill up to it.
    peak_kw: f64,
    demand: bool,
}

impl SiteState {
    fn new(model: &Model, input: &PlanInput, y: &[f64], peak_kw: f64) -> Self {
        let net = net_kw(model, input, y);
        let avgs = window_avgs(model, &net);
        let mut windows_of_step = vec![Vec::new(); model.steps];
        for (r, row) in model.demand.iter().enumerate() {
            for &(k, c) in &row.coefs {
                windows_of_step[k].push((r, c));
            }
        }
        Self {
            net,
            avgs,
            windows_of_step,
            peak_kw,
            demand: model.d_var.is_some() && input.demand_charge_per_kw > 0.0,
        }
    }

    fn at_peak(&self, r: usize) -> bool {
        self.avgs[r] >= self.peak_kw - 1e-6 * self.peak_kw.max(1.0)
    }

    /// Marginal cost of one more kWh delivered by rate `v` at rates `y`: energy price at the
    /// site meter (0 in a step where PV exceeds the load), the demand charge when the step lies
    /// in a window already at the peak, and the charge-early / equal-share gradients.
    fn cost_per_kwh(&self, model: &Model, input: &PlanInput, y: &[f64], v: usize) -> f64 {
        let var = model.vars[v];
        let s = &model.sessions[var.session];
        let per = kwh_per_unit(model, input, v);
        if per <= 0.0 {
            return f64::INFINITY;
        }
        let k = var.step;
        let d_h = input.step_s[k] / 3600.0;
        let site_kw = var.frac * s.site_kw_per_unit;
        let energy = if self.net[k] >= -1e-9 {
            at(&input.price_per_kwh, k) * site_kw * d_h
        } else {
            0.0
        };
        let mut demand = 0.0;
        if self.demand {
            for &(r, c) in &self.windows_of_step[k] {
                if self.at_peak(r) {
                    demand = f64::max(demand, input.demand_charge_per_kw * c * site_kw);
                }
            }
        }
        let w = &input.weights;
        let share = 2.0 * w.equal_share * d_h * y[v].max(0.0) / (s.max_rate * s.max_rate);
        (energy + demand + model.q[v] + share) / per
    }

    fn change(&mut self, model: &Model, v: usize, delta: f64) {
        let var = model.vars[v];
        let k = var.step;
        let before = self.net[k].max(0.0);
        self.net[k] += delta * var.frac * model.sessions[var.session].site_kw_per_unit;
        let d_import = self.net[k].max(0.0) - before;
        for &(r, c) in &self.windows_of_step[k] {
            self.avgs[r] += c * d_import;
        }
    }
}

/// Turn the relaxed rates into rates that obey the 6 A rule (0 or within [min, max]) and every
/// hard limit, delivering what the relaxation delivered at (close to) its cost:
/// 1. rates below the minimum go to 0, then as many as fit are raised to the minimum (largest
///    relaxed rate first, never beyond the session's energy);
/// 2. each session's lost energy is placed in its steps by the relaxation's marginal cost per
///    kWh, cheapest first: raising rates that are on, switching on at the minimum or more where
///    the remaining energy allows it;
/// 3. a remainder smaller than one step at the minimum goes to the cheapest step with room for
///    the minimum that is no dearer than the next option: energy is moved there from the
///    session's dearest other steps so the total stays exact, or, if they cannot spare it, the
///    step is planned at the minimum (the car stops when full; without this a nearly full car
///    never finishes).
///
/// Raising only ever uses headroom measured conservatively (|Σ + c·δ| ≤ |Σ| + |c|·δ), so every
/// step keeps every limit.
pub(crate) fn round(model: &Model, input: &PlanInput, x: &[f64], margin_rel: f64) -> Vec<f64> {
    let nx = model.n_x;
    let mut y: Vec<f64> = (0..nx)
        .map(|v| {
            let s = &model.sessions[model.vars[v].session];
            x[v].clamp(0.0, s.max_rate)
        })
        .collect();
    // Per rate, the limits it enters with its coefficient: the room and the limits' values
    // are kept up to date per change, not recomputed over every entry (that was quadratic in
    // the sessions of a step: 10,000 sessions spent 1.9 s here after a 0.5 s solve).
    let mut limits_of_var: Vec<Vec<(usize, f64, f64)>> = vec![Vec::new(); nx];
    for (i, l) in model.limits.iter().enumerate() {
        for &(v, cr, ci) in &l.entries {
            limits_of_var[v].push((i, cr, ci));
        }
    }
    let relaxed_peak_kw = window_avgs(model, &net_kw(model, input, &y))
        .into_iter()
        .fold(input.peak_floor_kw, f64::max);
    let target_kwh = {
        let ev = evaluate(model, input, &y);
        ev.delivered_kwh
    };
    let mut candidates: Vec<(usize, f64)> = Vec::new();
    for v in 0..nx {
        let s = &model.sessions[model.vars[v].session];
        if y[v] < s.min_rate {
            if y[v] > 1e-6 {
                candidates.push((v, y[v]));
            }
            y[v] = 0.0;
        }
    }
    let mut lhs = LimitValues::new(model, &y);
    let mut delivered = evaluate(model, input, &y).delivered_kwh;

    // Largest room a rate `v` can grow by without leaving any limit (conservative bound).
    let room = |v: usize, lhs: &LimitValues| -> f64 {
        let mut r = f64::INFINITY;
        for &(i, cr, ci) in &limits_of_var[v] {
            let l = &model.limits[i];
            let c = if l.phase.is_some() {
                (cr * cr + ci * ci).sqrt()
            } else {
                cr
            };
            if c > 0.0 {
                r = r.min((tightened(l.headroom, margin_rel) - lhs.value[i]) / c);
            }
        }
        r.max(0.0)
    };
    let recompute = |v: usize, y: &[f64], lhs: &mut LimitValues| {
        let d = y[v] - lhs.seen[v];
        if d != 0.0 {
            for &(i, cr, ci) in &limits_of_var[v] {
                let sum = &mut lhs.sums[i];
                sum.0 += cr * d;
                sum.1 += ci * d;
                lhs.value[i] = if model.limits[i].phase.is_some() {
                    sum.0.hypot(sum.1)
                } else {
                    sum.0
                };
            }
            lhs.seen[v] = y[v];
        }
    };

    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    for &(v, _) in &candidates {
        let si = model.vars[v].session;
        let s = &model.sessions[si];
        let add_kwh = kwh_per_unit(model, input, v) * s.min_rate;
        if delivered[si] + add_kwh > s.energy_kwh + 1e-9 {
            continue;
        }
        if room(v, &lhs) >= s.min_rate {
            y[v] = s.min_rate;
            recompute(v, &y, &mut lhs);
            delivered[si] += add_kwh;
        }
    }
    let mut site = SiteState::new(model, input, &y, relaxed_peak_kw);
    // Place each session's lost energy, cheapest steps first (ties: larger relaxed rate, then
    // earlier step), priced at the rates so far (a window that earlier sessions filled back to
    // the peak now carries the demand charge).
    for (si, s) in model.sessions.iter().enumerate() {
        let mut need = target_kwh[si] - delivered[si];
        if need <= 1e-9 {
            continue;
        }
        let mut order: Vec<usize> = (s.first_var..s.first_var + s.n_vars)
            .filter(|&v| kwh_per_unit(model, input, v) > 0.0)
            .collect();
        // Steps that are off, have room for the minimum, but would deliver more than what is
        // still needed at the minimum (cheapest first).
        let mut blocked: Vec<(usize, f64)> = Vec::new();
        let mut priced: Vec<(usize, f64)> = order
            .iter()
            .map(|&v| (v, site.cost_per_kwh(model, input, &y, v)))
            .collect();
        priced.sort_by(|a, b| {
            a.1.total_cmp(&b.1)
                .then(x[b.0].total_cmp(&x[a.0]))
                .then(a.0.cmp(&b.0))
        });
        order = priced.iter().map(|p| p.0).collect();
        let cost: Vec<f64> = priced.iter().map(|p| p.1).collect();
        for (&v, &c) in order.iter().zip(&cost) {
            if need <= 1e-9 {
                break;
            }
            if let Some(&(_, cb)) = blocked.first() {
                // Dearer than switching on at the first blocked step: the remainder goes
                // there instead.
                if c > cb + 1e-9 * cb.abs().max(1.0) {
                    break;
                }
            }
            let per = kwh_per_unit(model, input, v);
            let r = room(v, &lhs);
            let want = need / per;
            let new = if y[v] >= s.min_rate {
                (y[v] + r.min(want)).min(s.max_rate)
            } else if r >= s.min_rate {
                if want < s.min_rate {
                    blocked.push((v, c));
                    continue;
                }
                want.min(r).min(s.max_rate)
            } else {
                continue;
            };
            if new > y[v] {
                need -= (new - y[v]) * per;
                site.change(model, v, new - y[v]);
                y[v] = new;
                recompute(v, &y, &mut lhs);
            }
        }
        if need > 1e-6 {
            let mut spots: Vec<usize> = blocked.iter().map(|b| b.0).collect();
            if spots.is_empty() {
                spots = order
                    .iter()
                    .copied()
                    .filter(|&v| y[v] == 0.0 && room(v, &lhs) >= s.min_rate)
                    .collect();
            }
            let cost_of = |w: usize| -> f64 {
                order
                    .iter()
                    .position(|&v| v == w)
                    .map_or(f64::INFINITY, |i| cost[i])
            };
            let spare = |w: usize, y: &[f64]| -> f64 {
                order
                    .iter()
                    .filter(|&&v| v != w && y[v] >= s.min_rate)
                    .map(|&v| (y[v] - s.min_rate) * kwh_per_unit(model, input, v))
                    .sum()
            };
            let excess = |w: usize| kwh_per_unit(model, input, w) * s.min_rate - need;
            // Exact if the session's other steps can give up the excess (cheapest such step),
            // else the step whose minimum costs least (the car stops when full).
            let spot = spots
                .iter()
                .copied()
                .find(|&w| spare(w, &y) >= excess(w))
                .map(|w| (w, true))
                .or_else(|| {
                    spots
                        .iter()
                        .copied()
                        .min_by(|&a, &b| {
                            let ca = cost_of(a) * kwh_per_unit(model, input, a);
                            let cb = cost_of(b) * kwh_per_unit(model, input, b);
                            ca.total_cmp(&cb)
                        })
                        .map(|w| (w, false))
                });
            if let Some((w, exact)) = spot {
                if exact {
                    let mut excess = excess(w);
                    // Take it from the dearest steps first.
                    for &v in order.iter().rev() {
                        if excess <= 1e-12 {
                            break;
                        }
                        if v == w || y[v] < s.min_rate {
                            continue;
                        }
                        let per = kwh_per_unit(model, input, v);
                        let cut = ((y[v] - s.min_rate) * per).min(excess);
                        site.change(model, v, -cut / per);
                        y[v] -= cut / per;
                        excess -= cut;
                        recompute(v, &y, &mut lhs);
                    }
                }
                site.change(model, w, s.min_rate - y[w]);
                y[w] = s.min_rate;
                recompute(w, &y, &mut lhs);
                need = 0.0;
            }
        }
        delivered[si] = target_kwh[si] - need.max(0.0);
    }
    // Last line of defence: anything still above a true limit is switched off there.
    loop {
        let bad = violations(model, &y, 0.0);
        if bad.is_empty() {
            break;
        }
        for (i, _) in bad {
            for &(v, _, _) in &model.limits[i].entries {
                y[v] = 0.0;
            }
        }
    }
    y
}
