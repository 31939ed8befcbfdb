//! Horizon planner: charging schedules for the next hours as a Clarabel QP/SOCP.
//!
//! It owns the planning model (energy price, demand charge, non-delivery penalty, regularisers,
//! node/phase limits with exact line-to-line cones), the rounding pass for the 6 A rule and the
//! re-use of one Clarabel solver across receding-horizon calls. It never sends anything: its
//! schedule is an input to the allocator, and every setpoint still passes the envelope.
//!
//! Energy is soft (a shortfall is penalised), limits are hard. Solver trouble (time limit,
//! numerical failure, infeasible limits) comes back as a [`PlanStatus`], never as a panic.

// Numeric code indexes several parallel arrays by step and variable.
#![allow(clippy::needless_range_loop)]

mod input;
mod model;
mod round;

use std::time::Instant;

use clarabel::solver::{
    DefaultSettings, DefaultSettingsBuilder, DefaultSolver, IPSolver, SolverStatus, SupportedConeT,
};
use serde::Serialize;

pub use input::{
    ChargerKind, PlanCharger, PlanInput, PlanNode, PlanSession, PlanWeights, Series, Wiring,
};
use model::Model;

/// Errors of the planner: only bad input. Solver outcomes are statuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("{field}: {message}")]
    Input { field: String, message: String },
}

/// How a planning call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    /// Solved to the requested tolerance; the schedule is valid.
    Optimal,
    /// Solved to reduced accuracy; the schedule is valid (limits checked after rounding).
    Suboptimal,
    /// The hard limits cannot hold even with every charger off (e.g. other load above a limit).
    Infeasible,
    /// The wall-clock budget ran out: no schedule, fall back to the allocator.
    TimeLimit,
    /// Numerical failure or iteration limit: no schedule, fall back to the allocator.
    Failed,
}

impl PlanStatus {
    pub fn has_schedule(self) -> bool {
        matches!(self, PlanStatus::Optimal | PlanStatus::Suboptimal)
    }
}

/// The objective broken into its terms (currency units; regularisers are unitless weights).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ObjectiveTerms {
    pub energy_cost: f64,
    pub demand_charge: f64,
    pub non_delivery: f64,
    pub charge_early: f64,
    pub equal_share: f64,
    pub smooth: f64,
    pub total: f64,
}

/// A constraint that holds with (almost) no slack in the relaxed optimum.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BindingConstraint {
    /// `phase_limit`, `power_limit` or `demand_peak`.
    pub kind: String,
    pub node: String,
    /// Site phase index for `phase_limit`.
    pub phase: Option<usize>,
    pub step: usize,
    pub step_start_s: f64,
    /// The limit minus forecast other load (A or kW); for `demand_peak` the peak (kW).
    pub headroom: f64,
}

/// One planned rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanRow {
    pub session: usize,
    pub step: usize,
    /// A per phase (AC) or W (DC).
    pub target: f64,
    pub dc: bool,
}

/// Everything but the schedule rows.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub status: PlanStatus,
    /// Objective of the relaxed problem as Clarabel reports it (what cvxpy compares against).
    pub objective_relaxed: f64,
    pub terms_relaxed: ObjectiveTerms,
    /// Terms of the returned (rounded, 6 A rule) schedule.
    pub terms: ObjectiveTerms,
    pub solver_status: String,
    pub iterations: u32,
    /// Model build and solver setup.
    pub setup_time_s: f64,
    /// Clarabel's solve.
    pub solve_time_s: f64,
    pub total_time_s: f64,
    pub reused_solver: bool,
    /// The first solve ended short of `Solved` and was repeated with iterative refinement.
    pub refined_retry: bool,
    pub variables: usize,
    pub constraints: usize,
    pub second_order_cones: usize,
    pub binding: Vec<BindingConstraint>,
    /// Per session, in input order (rounded schedule).
    pub delivered_kwh: Vec<f64>,
    pub shortfall_kwh: Vec<f64>,
    /// Highest step-average import at the site meter in the rounded schedule (kW).
    pub peak_kw: f64,
    pub step_start_s: Vec<f64>,
    pub step_s: Vec<f64>,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct PlanOutput {
    pub summary: PlanSummary,
    pub rows: Vec<PlanRow>,
}

/// Solver settings. Tolerances are Clarabel's; the benchmark hands the same ones to cvxpy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct PlannerSettings {
    pub tol_gap_abs: f64,
    pub tol_gap_rel: f64,
    pub tol_feas: f64,
    pub max_iter: u32,
    /// Every hard limit is tightened by this fraction (plus as many A / kW) so the solver's
    /// feasibility tolerance never puts a plan above a limit.
    pub limit_margin_rel: f64,
    /// Clarabel's iterative refinement of every KKT solve. Off by default: on the ACN-like
    /// cases it is half of the solve time and changes the objective by < 1e-6 relative (the
    /// termination tolerances above still hold). A solve that ends without `Solved` is retried
    /// once with it on, within the budget.
    #[serde(default)]
    pub iterative_refinement: bool,
}

impl Default for PlannerSettings {
    fn default() -> Self {
        Self {
            tol_gap_abs: 1e-7,
            tol_gap_rel: 1e-7,
            tol_feas: 1e-7,
            max_iter: 200,
            limit_margin_rel: 1e-6,
            iterative_refinement: false,
        }
    }
}

/// Sparsity structure of a model: equal structure means Clarabel's data updates apply.
#[derive(PartialEq)]
struct Structure {
    n: usize,
    m: usize,
    p_colptr: Vec<usize>,
    p_rowval: Vec<usize>,
    a_colptr: Vec<usize>,
    a_rowval: Vec<usize>,
    cones: Vec<(u8, usize)>,
}

impl Structure {
    fn of(m: &Model) -> Self {
        Self {
            n: m.n,
            m: m.m,
            p_colptr: m.p.colptr.clone(),
            p_rowval: m.p.rowval.clone(),
            a_colptr: m.a.colptr.clone(),
            a_rowval: m.a.rowval.clone(),
            cones: m
                .cones
                .iter()
                .map(|c| match c {
                    SupportedConeT::ZeroConeT(d) => (0, *d),
                    SupportedConeT::NonnegativeConeT(d) => (1, *d),
                    SupportedConeT::SecondOrderConeT(d) => (2, *d),
                    _ => (9, 0),
                })
                .collect(),
        }
    }
}

struct Cached {
    structure: Structure,
    solver: DefaultSolver<f64>,
}

/// A planner that keeps its Clarabel solver between calls. When a re-plan has the same
/// structure (same sessions, steps and network), only the data is updated
/// (`update_P/q/A/b`, presolve off), which saves the setup and the symbolic factorisation.
pub struct Planner {
    settings: PlannerSettings,
    cached: Option<Cached>,
}

// SAFETY: the only non-`Send` part of `DefaultSolver` is the optional user-callback storage
// (raw pointers for the C API). The planner never installs callbacks, and the solver owns all
// of its other data, so moving a `Planner` to another thread moves no shared state.
unsafe impl Send for Planner {}

impl Default for Planner {
    fn default() -> Self {
        Self::new(PlannerSettings::default())
    }
}

fn clarabel_settings(s: &PlannerSettings, time_limit_s: f64) -> DefaultSettings<f64> {
    DefaultSettingsBuilder::default()
        .verbose(false)
        .presolve_enable(false)
        .input_sparse_dropzeros(false)
        .tol_gap_abs(s.tol_gap_abs)
        .tol_gap_rel(s.tol_gap_rel)
        .tol_feas(s.tol_feas)
        .max_iter(s.max_iter)
        .time_limit(time_limit_s)
        .iterative_refinement_enable(s.iterative_refinement)
        .build()
        .unwrap_or_default()
}

impl Planner {
    pub fn new(settings: PlannerSettings) -> Self {
        Self {
            settings,
            cached: None,
        }
    }

    pub fn settings(&self) -> &PlannerSettings {
        &self.settings
    }

    /// Plan within `budget_s` seconds of wall clock (model build included).
    pub fn plan(&mut self, input: &PlanInput, budget_s: f64) -> Result<PlanOutput, PlanError> {
        let t0 = Instant::now();
        if !budget_s.is_finite() || budget_s <= 0.0 {
            return Err(PlanError::Input {
                field: "budget_s".into(),
                message: format!("must be a positive number of seconds, got {budget_s}"),
            });
        }
        input.validate()?;
        let with_aux = input.with_aux_load(true);
        let input: &PlanInput = &with_aux;
        let model = Model::build(input, self.settings.limit_margin_rel);
        let n_soc = model
            .cones
            .iter()
            .filter(|c| matches!(c, SupportedConeT::SecondOrderConeT(_)))
            .count();
        let mut summary = PlanSummary {
            status: PlanStatus::Failed,
            objective_relaxed: f64::NAN,
            terms_relaxed: ObjectiveTerms::default(),
            terms: ObjectiveTerms::default(),
            solver_status: String::new(),
            iterations: 0,
            setup_time_s: 0.0,
            solve_time_s: 0.0,
            total_time_s: 0.0,
            reused_solver: false,
            refined_retry: false,
            variables: model.n,
            constraints: model.m,
            second_order_cones: n_soc,
            binding: Vec::new(),
            delivered_kwh: vec![0.0; input.sessions.len()],
            shortfall_kwh: input
                .sessions
                .iter()
                .map(|s| s.energy_requested_kwh)
                .collect(),
            peak_kw: 0.0,
            step_start_s: model.step_start_s.clone(),
            step_s: input.step_s.clone(),
            message: String::new(),
        };

        // Limits that cannot hold even with every charger off: say so, do not solve.
        let impossible: Vec<BindingConstraint> = model
            .limits
            .iter()
            .filter(|l| l.headroom < 0.0)
            .map(|l| round::describe(&model, input, l, "phase_limit"))
            .collect();
        if !impossible.is_empty() {
            summary.status = PlanStatus::Infeasible;
            summary.message = format!(
                "{} limit(s) are exceeded by the forecast other load alone",
                impossible.len()
            );
            summary.binding = impossible;
            summary.total_time_s = t0.elapsed().as_secs_f64();
            return Ok(PlanOutput {
                summary,
                rows: Vec::new(),
            });
        }

        let remaining = budget_s - t0.elapsed().as_secs_f64();
        if remaining <= 0.0 {
            summary.status = PlanStatus::TimeLimit;
            summary.message = "budget spent building the model".into();
            summary.total_time_s = t0.elapsed().as_secs_f64();
            return Ok(PlanOutput {
                summary,
                rows: Vec::new(),
            });
        }
        let settings = clarabel_settings(&self.settings, remaining);
        let structure = Structure::of(&model);
        let reuse = self
            .cached
            .as_ref()
            .is_some_and(|c| c.structure == structure && c.solver.is_data_update_allowed());
        if reuse {
            if let Some(c) = self.cached.as_mut() {
                let ok = c.solver.update_settings(settings.clone()).is_ok()
                    && c.solver.update_P(&model.p.nzval).is_ok()
                    && c.solver.update_q(&model.q).is_ok()
                    && c.solver.update_A(&model.a.nzval).is_ok()
                    && c.solver.update_b(&model.b).is_ok();
                if !ok {
                    self.cached = None;
                }
            }
        } else {
            self.cached = None;
        }
        summary.reused_solver = self.cached.is_some();
        if self.cached.is_none() {
            match DefaultSolver::new(
                &model.p,
                &model.q,
                &model.a,
                &model.b,
                &model.cones,
                settings,
            ) {
                Ok(solver) => {
                    self.cached = Some(Cached { structure, solver });
                }
                Err(e) => {
                    summary.status = PlanStatus::Failed;
                    summary.message = format!("solver setup failed: {e}");
                    summary.total_time_s = t0.elapsed().as_secs_f64();
                    return Ok(PlanOutput {
                        summary,
                        rows: Vec::new(),
                    });
                }
            }
        }
        summary.setup_time_s = t0.elapsed().as_secs_f64();
        let Some(cached) = self.cached.as_mut() else {
            summary.message = "solver unavailable".into();
            return Ok(PlanOutput {
                summary,
                rows: Vec::new(),
            });
        };
        let t1 = Instant::now();
        cached.solver.solve();
        let retry = !self.settings.iterative_refinement
            && !matches!(
                cached.solver.solution.status,
                SolverStatus::Solved
                    | SolverStatus::PrimalInfeasible
                    | SolverStatus::DualInfeasible
                    | SolverStatus::MaxTime
            );
        let first = cached.solver.solution.status;
        let first_iterations = cached.solver.solution.iterations;
        let remaining = budget_s - t0.elapsed().as_secs_f64();
        if retry && remaining > 0.0 {
            let mut s = clarabel_settings(&self.settings, remaining);
            s.iterative_refinement_enable = true;
            if cached.solver.update_settings(s).is_ok() {
                cached.solver.solve();
                summary.refined_retry = true;
                summary.message = format!(
                    "first solve without iterative refinement ended {first:?} after \
                     {first_iterations} iterations; retried with it"
                );
            }
        }
        summary.solve_time_s = t1.elapsed().as_secs_f64();
        let sol = &cached.solver.solution;
        summary.solver_status = format!("{:?}", sol.status);
        summary.iterations = sol.iterations;
        summary.status = match sol.status {
            SolverStatus::Solved => PlanStatus::Optimal,
            SolverStatus::AlmostSolved => PlanStatus::Suboptimal,
            SolverStatus::PrimalInfeasible
            | SolverStatus::AlmostPrimalInfeasible
            | SolverStatus::DualInfeasible
            | SolverStatus::AlmostDualInfeasible => PlanStatus::Infeasible,
            SolverStatus::MaxTime => PlanStatus::TimeLimit,
            _ => PlanStatus::Failed,
        };
        if !summary.status.has_schedule() {
            summary.message = format!("no schedule: solver ended with {:?}", sol.status);
            summary.total_time_s = t0.elapsed().as_secs_f64();
            if matches!(summary.status, PlanStatus::Failed) {
                // A solver that failed numerically keeps the scaling that failed it: reused, it
                // failed every later plan of the same structure. The next one starts afresh.
                self.cached = None;
            }
            return Ok(PlanOutput {
                summary,
                rows: Vec::new(),
            });
        }
        summary.objective_relaxed = sol.obj_val;
        let x: Vec<f64> = sol.x[..model.n_x].to_vec();
        summary.terms_relaxed = round::evaluate(&model, input, &x).terms;
        summary.binding = round::binding(&model, input, &x, self.settings.limit_margin_rel);

        let y = round::round(&model, input, &x, self.settings.limit_margin_rel);
        let ev = round::evaluate(&model, input, &y);
        summary.terms = ev.terms;
        summary.delivered_kwh = ev.delivered_kwh;
        summary.shortfall_kwh = ev.shortfall_kwh;
        summary.peak_kw = ev.peak_kw;
        let rows = model
            .vars
            .iter()
            .zip(&y)
            .map(|(v, &r)| {
                let s = &model.sessions[v.session];
                let dc = s.dc;
                // On, it is sent at least the charger's minimum (the 6 A rule; a vehicle taking
                // less draws what it takes: its rate).
                let target = if r > 0.0 { r.max(s.set_min) } else { r };
                PlanRow {
                    session: v.session,
                    step: v.step,
                    target: if dc { target * 1000.0 } else { target },
                    dc,
                }
            })
            .collect();
        summary.total_time_s = t0.elapsed().as_secs_f64();
        Ok(PlanOutput { summary, rows })
    }
}

/// Plan once with a fresh solver.
pub fn plan(
    input: &PlanInput,
    settings: PlannerSettings,
    budget_s: f64,
) -> Result<PlanOutput, PlanError> {
    Planner::new(settings).plan(input, budget_s)
}

/// Line currents (A) and node powers (kW) a schedule causes, checked against every hard limit
/// exactly, independently of the solver. Returns the violations (limit, value, headroom).
pub fn check_schedule(input: &PlanInput, rows: &[PlanRow]) -> Result<Vec<String>, PlanError> {
    input.validate()?;
    let with_aux = input.with_aux_load(false);
    let input: &PlanInput = &with_aux;
    let model = Model::build(input, 0.0);
    let mut y = vec![0.0; model.n_x];
    for r in rows {
        if let Some(v) = model
            .vars
            .iter()
            .position(|v| v.session == r.session && v.step == r.step)
        {
            // What the vehicle draws at that target: at most what it takes.
            let rate = if r.dc { r.target / 1000.0 } else { r.target };
            y[v] = rate.min(model.sessions[r.session].max_rate);
        }
    }
    Ok(round::violations(&model, &y, 0.0)
        .into_iter()
        .map(|(i, value)| {
            let l = &model.limits[i];
            let d = round::describe(&model, input, l, "");
            format!(
                "node {} phase {:?} step {}: {value} > {}",
                d.node, d.phase, d.step, l.headroom
            )
        })
        .collect())
}

#[cfg(test)]
mod tests;
