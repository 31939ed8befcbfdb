//! Planner input: the horizon, the network it must respect, the sessions and the economics.
//!
//! Every number carries its unit in its name. All times are UTC seconds since the Unix epoch.
//! `validate` refuses NaN, infinities and negative values (prices may be negative) and names the
//! field that was wrong.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::PlanError;

/// A value per planning step, or one value for the whole horizon (length 1).
pub type Series = Vec<f64>;

fn one_zero() -> Series {
    vec![0.0]
}
fn zeros3() -> [Series; 3] {
    [vec![0.0], vec![0.0], vec![0.0]]
}
fn one() -> f64 {
    1.0
}
fn default_efficiency() -> f64 {
    0.95
}
fn default_window_s() -> f64 {
    900.0
}

/// How a charger is connected to the site's three lines (see docs/site-file.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiring {
    ThreePhase,
    LineToNeutral,
    LineToLine,
}

/// AC chargers are set in amperes per phase, DC chargers in watts of output power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChargerKind {
    #[default]
    Ac,
    Dc,
}

/// A node of the site tree with its limits over the horizon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanNode {
    pub id: String,
    #[serde(default)]
    pub parent: Option<String>,
    /// Allowed continuous line current per site phase, each a [`Series`].
    pub phase_limit_a: [Series; 3],
    /// Forecast non-charger line current per site phase (subtracted from the limit).
    #[serde(default = "zeros3")]
    pub other_load_a: [Series; 3],
    /// Cap on the active power through the node (grid curtailments live here), if any.
    #[serde(default)]
    pub power_limit_kw: Option<Series>,
    /// Forecast non-charger active power through the node. At the root this is the site
    /// meter's other load, which also enters the energy cost and the demand charge.
    #[serde(default = "one_zero")]
    pub other_load_kw: Series,
}

/// A charger: where it hangs, how it is wired, what it accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanCharger {
    pub id: String,
    pub parent: String,
    #[serde(default)]
    pub kind: ChargerKind,
    pub wiring: Wiring,
    /// Site phase indices (0, 1, 2) the charger's terminals land on: 3 for three-phase,
    /// 1 for line-to-neutral, 2 for line-to-line (current out on the first, back on the second).
    pub phases: Vec<usize>,
    /// Voltage across the charger's terminals: L-N for line-to-neutral and three-phase (and DC),
    /// L-L for line-to-line.
    pub voltage_v: f64,
    /// AC: lowest non-zero setpoint per phase (IEC 61851: at least 6 A).
    #[serde(default)]
    pub min_a: Option<f64>,
    #[serde(default)]
    pub max_a: Option<f64>,
    #[serde(default)]
    pub min_w: Option<f64>,
    #[serde(default)]
    pub max_w: Option<f64>,
    /// DC only: AC→DC efficiency.
    #[serde(default = "default_efficiency")]
    pub efficiency: f64,
    /// DC only: auxiliary load (W: cooling, power electronics) the charger draws from the grid
    /// on top of its output over the efficiency. Counted as other load of its node and every
    /// node above it in each step a session with energy to deliver is connected to it, whether
    /// the plan charges it or not (the plan does not model the on/off switch of that load).
    #[serde(default)]
    pub aux_w: f64,
}

/// A charging session, connected now (`arrival_s <= start_s`) or expected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanSession {
    pub id: String,
    pub charger_id: String,
    pub arrival_s: f64,
    pub departure_s: f64,
    /// Energy still to deliver (kWh).
    pub energy_requested_kwh: f64,
    /// Vehicle limit below the charger's (AC), if lower.
    #[serde(default)]
    pub max_a: Option<f64>,
    /// Vehicle limit below the charger's (DC), if lower.
    #[serde(default)]
    pub max_w: Option<f64>,
    /// Weight of the non-delivery penalty (1 = normal).
    #[serde(default = "one")]
    pub priority: f64,
}

/// Weights of the objective's terms besides the energy price and the demand charge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanWeights {
    /// Penalty per kWh not delivered by departure (times the session's priority).
    pub non_delivery_per_kwh: f64,
    /// Charge early: cost per kWh delivered at the end of the horizon (linear in time from 0 now).
    #[serde(default)]
    pub charge_early_per_kwh: f64,
    /// Urgency: cost per kWh delivered at a session's departure (linear in time from 0 now, over
    /// each session's own time left). Unlike `charge_early_per_kwh` it tells sessions apart:
    /// among plans of equal cost and peak it finishes the sessions that leave first first
    /// (earliest deadline first), which leaves each car time for the CC-CV taper the plan does
    /// not model.
    #[serde(default)]
    pub urgency_per_kwh: f64,
    /// Equal share: weight of Σ (rate/max)²·step_h.
    #[serde(default)]
    pub equal_share: f64,
    /// Smooth profiles: weight of Σ ((rate_k+1 − rate_k)/max)².
    #[serde(default)]
    pub smooth: f64,
}

impl Default for PlanWeights {
    fn default() -> Self {
        Self {
            non_delivery_per_kwh: 10.0,
            charge_early_per_kwh: 1e-3,
            urgency_per_kwh: 0.0,
            equal_share: 1e-4,
            // Off by default: smoothing couples consecutive steps of a session, which doubles
            // the KKT frontier and roughly doubles the solve time (see docs/planner.md).
            smooth: 0.0,
        }
    }
}

/// Everything one planning call needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanInput {
    /// Start of the horizon ("now"), UTC seconds.
    pub start_s: f64,
    /// Step lengths in seconds; may grow with distance from now.
    pub step_s: Vec<f64>,
    /// Energy price per step (per kWh imported at the site meter).
    pub price_per_kwh: Series,
    /// Forecast local PV at the site meter (kW); offsets imports, never credited against limits.
    #[serde(default = "one_zero")]
    pub pv_kw: Series,
    /// Demand charge per kW of the billing period's peak window average (pre-scaled to the horizon).
    #[serde(default)]
    pub demand_charge_per_kw: f64,
    /// Clock-aligned demand window length: 900 or 1800 s.
    #[serde(default = "default_window_s")]
    pub demand_window_s: f64,
    /// Peak already reached this billing period (kW): the floor of the demand term.
    #[serde(default)]
    pub peak_floor_kw: f64,
    /// Energy imported at the meter since the current demand window began (kWh).
    #[serde(default)]
    pub current_window_energy_kwh: f64,
    #[serde(default)]
    pub weights: PlanWeights,
    pub nodes: Vec<PlanNode>,
    pub chargers: Vec<PlanCharger>,
    pub sessions: Vec<PlanSession>,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> PlanError {
    PlanError::Input {
        field: field.into(),
        message: message.into(),
    }
}

/// Plausibility bounds per field name (magnitude, unit). A finite value beyond them is a unit or
/// data error (Wh for kWh, a placeholder for "no limit"), and the solver meets it as a badly
/// scaled problem: before these, 1e7 kWh came back `infeasible`, 1e12 A or a 1e300 limit
/// `infeasible` (dual), a 1e300 price `failed`, instead of an error naming the field. Each is
/// orders of magnitude above any site (docs/planner.md lists them); "no cap" is an absent
/// `power_limit_kw`, or up to 1e6 kW.
pub const BOUNDS: &[(&str, f64, &str)] = &[
    ("start_s", 1e11, "s"),
    ("arrival_s", 1e11, "s"),
    ("departure_s", 1e11, "s"),
    ("step_s", 1e7, "s"),
    ("demand_window_s", 1e7, "s"),
    ("price_per_kwh", 1e4, "per kWh"),
    ("demand_charge_per_kw", 1e6, "per kW"),
    ("pv_kw", 1e6, "kW"),
    ("power_limit_kw", 1e6, "kW"),
    ("other_load_kw", 1e5, "kW"),
    ("peak_floor_kw", 1e6, "kW"),
    ("current_window_energy_kwh", 1e6, "kWh"),
    ("energy_requested_kwh", 1e4, "kWh"),
    ("phase_limit_a", 1e5, "A"),
    ("other_load_a", 1e5, "A"),
    ("max_a", 1e5, "A"),
    ("min_a", 1e5, "A"),
    ("max_w", 1e7, "W"),
    ("min_w", 1e7, "W"),
    ("voltage_v", 1e4, "V"),
    ("aux_w", 1e6, "W"),
    ("priority", 1e6, ""),
    ("non_delivery_per_kwh", 1e9, ""),
    ("charge_early_per_kwh", 1e9, ""),
    ("urgency_per_kwh", 1e9, ""),
    ("equal_share", 1e9, ""),
    ("smooth", 1e9, ""),
];

/// The bound of a field path such as `nodes[0](grid).phase_limit_a[1][3]` (its last name).
fn bound_of(field: &str) -> Option<(f64, &'static str)> {
    let name = field.rsplit('.').next().unwrap_or(field);
    let name = name.split('[').next().unwrap_or(name);
    BOUNDS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, b, unit)| (b, unit))
}

fn check_num(field: &str, v: f64, allow_negative: bool) -> Result<(), PlanError> {
    if !v.is_finite() {
        return Err(bad(field, format!("must be a finite number, got {v}")));
    }
    if !allow_negative && v < 0.0 {
        return Err(bad(field, format!("must not be negative, got {v}")));
    }
    if let Some((b, unit)) = bound_of(field) {
        if v.abs() > b {
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            let range = if allow_negative {
                format!("between -{b:e} and {b:e}{unit}")
            } else {
                format!("at most {b:e}{unit}")
            };
            return Err(bad(
                field,
                format!("must be {range} (plausibility bound, docs/planner.md), got {v:e}"),
            ));
        }
    }
    Ok(())
}

fn check_series(field: &str, s: &Series, steps: usize) -> Result<(), PlanError> {
    check_series_signed(field, s, steps, false)
}

fn check_series_signed(
    field: &str,
    s: &Series,
    steps: usize,
    allow_negative: bool,
) -> Result<(), PlanError> {
    if s.len() != 1 && s.len() != steps {
        return Err(bad(
            field,
            format!("needs 1 or {steps} values (one per step), got {}", s.len()),
        ));
    }
    for (i, v) in s.iter().enumerate() {
        check_num(&format!("{field}[{i}]"), *v, allow_negative)?;
    }
    Ok(())
}

/// Each id's first index (a later duplicate keeps the first: the caller names the duplicate).
pub(crate) fn first_index<'a>(ids: impl Iterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    let mut out = HashMap::new();
    for (i, id) in ids.enumerate() {
        out.entry(id).or_insert(i);
    }
    out
}

/// Value of a series at step `k` (broadcasting a single value).
pub(crate) fn at(s: &Series, k: usize) -> f64 {
    if s.len() == 1 {
        s[0]
    } else {
        s[k]
    }
}

impl PlanInput {
    /// Refuse anything the model cannot use, naming the field.
    pub fn validate(&self) -> Result<(), PlanError> {
        check_num("start_s", self.start_s, true)?;
        if self.step_s.is_empty() {
            return Err(bad("step_s", "needs at least one step"));
        }
        for (i, d) in self.step_s.iter().enumerate() {
            check_num(&format!("step_s[{i}]"), *d, false)?;
            if *d <= 0.0 {
                return Err(bad(format!("step_s[{i}]"), "must be positive"));
            }
        }
        let t = self.step_s.len();
        // Day-ahead prices go negative (surplus wind and sun): the model then counts the import
        // at that price up to what the chargers and the other load draw (docs/planner.md).
        check_series_signed("price_per_kwh", &self.price_per_kwh, t, true)?;
        check_series("pv_kw", &self.pv_kw, t)?;
        check_num("demand_charge_per_kw", self.demand_charge_per_kw, false)?;
        check_num("demand_window_s", self.demand_window_s, false)?;
        if self.demand_window_s < 60.0 {
            return Err(bad(
                "demand_window_s",
                "must be at least 60 s (usually 900 or 1800)",
            ));
        }
        check_num("peak_floor_kw", self.peak_floor_kw, false)?;
        check_num(
            "current_window_energy_kwh",
            self.current_window_energy_kwh,
            false,
        )?;
        let w = &self.weights;
        check_num(
            "weights.non_delivery_per_kwh",
            w.non_delivery_per_kwh,
            false,
        )?;
        check_num(
            "weights.charge_early_per_kwh",
            w.charge_early_per_kwh,
            false,
        )?;
        check_num("weights.urgency_per_kwh", w.urgency_per_kwh, false)?;
        check_num("weights.equal_share", w.equal_share, false)?;
        check_num("weights.smooth", w.smooth, false)?;

        if self.nodes.is_empty() {
            return Err(bad("nodes", "needs at least the root node"));
        }
        // Ids are looked up in maps (first occurrence), not by scanning: validation was
        // O(n²) in chargers and sessions (40,000 sessions: 25 s before the solver's budget
        // began; docs/planner.md).
        let node_at = first_index(self.nodes.iter().map(|n| n.id.as_str()));
        let mut roots = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            let f = format!("nodes[{i}]({})", n.id);
            if n.parent.is_none() {
                roots += 1;
            } else if let Some(p) = &n.parent {
                if !node_at.contains_key(p.as_str()) {
                    return Err(bad(format!("{f}.parent"), format!("unknown node {p:?}")));
                }
            }
            for ph in 0..3 {
                check_series(&format!("{f}.phase_limit_a[{ph}]"), &n.phase_limit_a[ph], t)?;
                check_series(&format!("{f}.other_load_a[{ph}]"), &n.other_load_a[ph], t)?;
            }
            if let Some(p) = &n.power_limit_kw {
                check_series(&format!("{f}.power_limit_kw"), p, t)?;
            }
            check_series(&format!("{f}.other_load_kw"), &n.other_load_kw, t)?;
            if node_at[n.id.as_str()] != i {
                return Err(bad(format!("{f}.id"), "duplicate node id"));
            }
        }
        if roots != 1 {
            return Err(bad(
                "nodes",
                format!("exactly one node needs no parent, found {roots}"),
            ));
        }
        // Walking up from every node must reach the root (no cycles).
        for (i, n) in self.nodes.iter().enumerate() {
            let mut cur = n;
            let mut hops = 0;
            while let Some(p) = &cur.parent {
                hops += 1;
                if hops > self.nodes.len() {
                    return Err(bad(format!("nodes[{i}]({}).parent", n.id), "parent cycle"));
                }
                cur = node_at
                    .get(p.as_str())
                    .map(|&j| &self.nodes[j])
                    .ok_or_else(|| bad(format!("nodes[{i}]({}).parent", n.id), "unknown node"))?;
            }
        }

        let charger_at = first_index(self.chargers.iter().map(|c| c.id.as_str()));
        for (i, c) in self.chargers.iter().enumerate() {
            let f = format!("chargers[{i}]({})", c.id);
            if !node_at.contains_key(c.parent.as_str()) {
                return Err(bad(
                    format!("{f}.parent"),
                    format!("unknown node {:?}", c.parent),
                ));
            }
            if charger_at[c.id.as_str()] != i {
                return Err(bad(format!("{f}.id"), "duplicate charger id"));
            }
            let need = match (c.kind, c.wiring) {
                (ChargerKind::Dc, Wiring::ThreePhase) => 3,
                (ChargerKind::Dc, _) => {
                    return Err(bad(
                        format!("{f}.wiring"),
                        "DC chargers are connected three-phase",
                    ))
                }
                (_, Wiring::ThreePhase) => 3,
                (_, Wiring::LineToNeutral) => 1,
                (_, Wiring::LineToLine) => 2,
            };
            if c.phases.len() != need || c.phases.iter().any(|p| *p > 2) {
                return Err(bad(
                    format!("{f}.phases"),
                    format!("needs {need} distinct site phase indices in 0..=2"),
                ));
            }
            for a in 0..c.phases.len() {
                if c.phases[..a].contains(&c.phases[a]) {
                    return Err(bad(format!("{f}.phases"), "phases must be distinct"));
                }
            }
            check_num(&format!("{f}.voltage_v"), c.voltage_v, false)?;
            if c.voltage_v <= 0.0 {
                return Err(bad(format!("{f}.voltage_v"), "must be positive"));
            }
            match c.kind {
                ChargerKind::Ac => {
                    let max = c
                        .max_a
                        .ok_or_else(|| bad(format!("{f}.max_a"), "required for AC"))?;
                    check_num(&format!("{f}.max_a"), max, false)?;
                    let min = c.min_a.unwrap_or(6.0);
                    check_num(&format!("{f}.min_a"), min, false)?;
                    if min < 6.0 {
                        return Err(bad(
                            format!("{f}.min_a"),
                            "must be at least 6 A (IEC 61851: there is no 1-5 A)",
                        ));
                    }
                    if max < min {
                        return Err(bad(format!("{f}.max_a"), "must be at least min_a"));
                    }
                    if c.aux_w != 0.0 {
                        return Err(bad(
                            format!("{f}.aux_w"),
                            "only DC chargers have an auxiliary load here (an AC charger's \
                             own draw is part of its setpoint)",
                        ));
                    }
                }
                ChargerKind::Dc => {
                    let max = c
                        .max_w
                        .ok_or_else(|| bad(format!("{f}.max_w"), "required for DC"))?;
                    check_num(&format!("{f}.max_w"), max, false)?;
                    let min = c.min_w.unwrap_or(0.0);
                    check_num(&format!("{f}.min_w"), min, false)?;
                    if max < min {
                        return Err(bad(format!("{f}.max_w"), "must be at least min_w"));
                    }
                    check_num(&format!("{f}.efficiency"), c.efficiency, false)?;
                    check_num(&format!("{f}.aux_w"), c.aux_w, false)?;
                    if c.efficiency <= 0.0 || c.efficiency > 1.0 {
                        return Err(bad(format!("{f}.efficiency"), "must be in (0, 1]"));
                    }
                }
            }
        }

        let session_at = first_index(self.sessions.iter().map(|s| s.id.as_str()));
        // Per charger, the sessions seen so far on it (usually one or two).
        let mut on_charger: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in self.sessions.iter().enumerate() {
            let f = format!("sessions[{i}]({})", s.id);
            if !charger_at.contains_key(s.charger_id.as_str()) {
                return Err(bad(
                    format!("{f}.charger_id"),
                    format!("unknown charger {:?}", s.charger_id),
                ));
            }
            if session_at[s.id.as_str()] != i {
                return Err(bad(format!("{f}.id"), "duplicate session id"));
            }
            check_num(&format!("{f}.arrival_s"), s.arrival_s, true)?;
            check_num(&format!("{f}.departure_s"), s.departure_s, true)?;
            if s.departure_s <= s.arrival_s {
                return Err(bad(format!("{f}.departure_s"), "must be after arrival_s"));
            }
            // One car per charger at a time: two overlapping windows would each be planned up
            // to the charger's maximum.
            let earlier = on_charger.entry(s.charger_id.as_str()).or_default();
            if let Some(o) = earlier
                .iter()
                .map(|&j| &self.sessions[j])
                .find(|o| o.arrival_s < s.departure_s && s.arrival_s < o.departure_s)
            {
                return Err(bad(
                    format!("{f}.arrival_s"),
                    format!(
                        "overlaps session {:?} on charger {:?} (one session per charger at a time)",
                        o.id, s.charger_id
                    ),
                ));
            }
            earlier.push(i);
            check_num(
                &format!("{f}.energy_requested_kwh"),
                s.energy_requested_kwh,
                false,
            )?;
            if let Some(v) = s.max_a {
                check_num(&format!("{f}.max_a"), v, false)?;
            }
            if let Some(v) = s.max_w {
                check_num(&format!("{f}.max_w"), v, false)?;
            }
            check_num(&format!("{f}.priority"), s.priority, false)?;
        }
        Ok(())
    }
}

impl PlanInput {
    /// The input with every DC charger's auxiliary load counted as other load (line current
    /// and kW) of its node and each node above it, in every step a session with energy to
    /// deliver is connected to it. Borrowed unchanged when no DC charger has one. Call after
    /// `validate`.
    ///
    /// Before this the plan saw a DC charger's grid draw as its output over the efficiency
    /// only: up to `aux_w` per charging DC session more than planned reached the limits, the
    /// energy cost and the demand windows (about 7 kW on the example depot).
    ///
    /// With `up_to_limits` (the plan), a node's other load grows by the auxiliary load only up
    /// to its limit in that step (phase limit in A, kW cap), never past it: a step with no room
    /// left for it plans 0 under that node, as a step with no room at all does. Counted whole, a
    /// limit that the caller had lowered to a hair above the other load (the room chargers
    /// outside the plan hold, `evcore.edge.planning.leave_held_room`) was over by the auxiliary
    /// load of a waiting DC session, and the whole plan came back `infeasible` (4 of 70 plans in
    /// the example depot's planner_cost run, the allocator alone until the next). An other load
    /// over the limit before the auxiliary load is still infeasible. `check_schedule` counts it
    /// whole (`up_to_limits` false): it judges the limits, not the plan.
    pub(crate) fn with_aux_load(&self, up_to_limits: bool) -> std::borrow::Cow<'_, PlanInput> {
        use std::borrow::Cow;
        let charger_at = first_index(self.chargers.iter().map(|c| c.id.as_str()));
        let has_aux = self.sessions.iter().any(|s| {
            charger_at.get(s.charger_id.as_str()).is_some_and(|&c| {
                let c = &self.chargers[c];
                c.kind == ChargerKind::Dc && c.aux_w > 0.0 && s.energy_requested_kwh > 0.0
            })
        });
        if !has_aux {
            return Cow::Borrowed(self);
        }
        let steps = self.step_s.len();
        let node_at = first_index(self.nodes.iter().map(|n| n.id.as_str()));
        let mut out = self.clone();
        let expand = |s: &mut Series| {
            if s.len() == 1 {
                *s = vec![s[0]; steps];
            }
        };
        for s in &self.sessions {
            let Some(&ci) = charger_at.get(s.charger_id.as_str()) else {
                continue;
            };
            let c = &self.chargers[ci];
            if c.kind != ChargerKind::Dc || c.aux_w <= 0.0 || s.energy_requested_kwh <= 0.0 {
                continue;
            }
            let line_a = c.aux_w / (3.0 * c.voltage_v);
            let kw = c.aux_w / 1000.0;
            let mut t = self.start_s;
            for (k, &d) in self.step_s.iter().enumerate() {
                let connected = t.max(s.arrival_s) < (t + d).min(s.departure_s);
                t += d;
                if !connected {
                    continue;
                }
                let mut node = node_at.get(c.parent.as_str()).copied();
                let mut hops = 0;
                while let Some(ni) = node {
                    let n = &mut out.nodes[ni];
                    for &p in &c.phases {
                        expand(&mut n.other_load_a[p]);
                        n.other_load_a[p][k] += line_a;
                    }
                    expand(&mut n.other_load_kw);
                    n.other_load_kw[k] += kw;
                    hops += 1;
                    node = match (&self.nodes[ni].parent, hops > self.nodes.len()) {
                        (Some(p), false) => node_at.get(p.as_str()).copied(),
                        _ => None,
                    };
                }
            }
        }
        if up_to_limits {
            for (n, before) in out.nodes.iter_mut().zip(&self.nodes) {
                for p in 0..3 {
                    cap_added(
                        &mut n.other_load_a[p],
                        &before.other_load_a[p],
                        &before.phase_limit_a[p],
                    );
                }
                if let Some(limit) = &before.power_limit_kw {
                    cap_added(&mut n.other_load_kw, &before.other_load_kw, limit);
                }
            }
        }
        Cow::Owned(out)
    }
}

/// `with_load` (a series that `before` grew into) brought down, step by step, to the larger of
/// `limit` and `before`: what was added counts only up to the limit. Unchanged series are left.
fn cap_added(with_load: &mut Series, before: &Series, limit: &Series) {
    if with_load == before {
        return;
    }
    for (k, v) in with_load.iter_mut().enumerate() {
        *v = v.min(at(limit, k).max(at(before, k)));
    }
}
