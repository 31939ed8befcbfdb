//! Hand-solvable cases with known optima, plus the guarantees the rest of evcore relies on.

use super::*;

const T0: f64 = 1_699_999_200.0; // clock-aligned to 15 min

fn node(id: &str, parent: Option<&str>, limit_a: f64) -> PlanNode {
    PlanNode {
        id: id.into(),
        parent: parent.map(Into::into),
        phase_limit_a: [vec![limit_a], vec![limit_a], vec![limit_a]],
        other_load_a: [vec![0.0], vec![0.0], vec![0.0]],
        power_limit_kw: None,
        other_load_kw: vec![0.0],
    }
}

fn ac(id: &str, parent: &str, wiring: Wiring, phases: &[usize], v: f64, max_a: f64) -> PlanCharger {
    PlanCharger {
        id: id.into(),
        parent: parent.into(),
        kind: ChargerKind::Ac,
        wiring,
        phases: phases.to_vec(),
        voltage_v: v,
        min_a: None,
        max_a: Some(max_a),
        min_w: None,
        max_w: None,
        efficiency: 0.95,
        aux_w: 0.0,
    }
}

fn session(id: &str, charger: &str, hours: f64, kwh: f64) -> PlanSession {
    PlanSession {
        id: id.into(),
        charger_id: charger.into(),
        arrival_s: T0 - 60.0,
        departure_s: T0 + hours * 3600.0,
        energy_requested_kwh: kwh,
        max_a: None,
        max_w: None,
        priority: 1.0,
    }
}

fn input(step_s: Vec<f64>, price: Vec<f64>) -> PlanInput {
    PlanInput {
        start_s: T0,
        step_s,
        price_per_kwh: price,
        pv_kw: vec![0.0],
        demand_charge_per_kw: 0.0,
        demand_window_s: 900.0,
        peak_floor_kw: 0.0,
        current_window_energy_kwh: 0.0,
        weights: PlanWeights {
            non_delivery_per_kwh: 10.0,
            charge_early_per_kwh: 0.0,
            urgency_per_kwh: 0.0,
            equal_share: 0.0,
            smooth: 0.0,
        },
        nodes: vec![node("root", None, 100.0)],
        chargers: vec![],
        sessions: vec![],
    }
}

fn targets(out: &PlanOutput, session: usize) -> Vec<f64> {
    out.rows
        .iter()
        .filter(|r| r.session == session)
        .map(|r| r.target)
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn single_session_gets_exactly_its_energy_at_the_price() {
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 1.0, 2.3)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    let t = targets(&out, 0);
    assert_eq!(t.len(), 1);
    assert!(close(t[0], 10.0, 1e-5), "{t:?}");
    assert!(close(out.summary.objective_relaxed, 0.23, 1e-5));
    assert!(close(out.summary.terms.energy_cost, 0.23, 1e-5));
    assert!(out.summary.shortfall_kwh[0] < 1e-6);
}

#[test]
fn energy_moves_to_the_cheap_step() {
    let mut inp = input(vec![3600.0, 3600.0], vec![0.3, 0.1]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 2.0, 2.3)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let t = targets(&out, 0);
    assert!(t[0].abs() < 1e-4 && close(t[1], 10.0, 1e-5), "{t:?}");
    assert!(close(out.summary.objective_relaxed, 0.23, 1e-5));
}

#[test]
fn binding_phase_limit_goes_to_priority_and_rounding_keeps_the_limit() {
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.nodes = vec![node("root", None, 20.0)];
    inp.chargers = vec![
        ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 16.0),
        ac("c2", "root", Wiring::LineToNeutral, &[0], 230.0, 16.0),
    ];
    let mut s1 = session("s1", "c1", 1.0, 3.68);
    s1.priority = 2.0;
    inp.sessions = vec![s1, session("s2", "c2", 1.0, 3.68)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    // Relaxed: 16 A and 4 A; 0.1·20·0.23 + 10·(3.68 − 0.92).
    assert!(close(out.summary.objective_relaxed, 0.46 + 27.6, 1e-5));
    // 4 A is below the 6 A minimum and 6 A does not fit under 20 A: rounded to 0.
    assert!(close(targets(&out, 0)[0], 16.0, 1e-5));
    assert_eq!(targets(&out, 1)[0], 0.0);
    assert!(out
        .summary
        .binding
        .iter()
        .any(|b| b.kind == "phase_limit" && b.node == "root" && b.phase == Some(0)));
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
}

#[test]
fn line_to_line_loads_meet_the_exact_cone() {
    // AB and CA loads both load line A: |I_A| = sqrt(x1² + x2² + x1·x2) ≤ 30·√3 → x1 = x2 = 30.
    let mut inp = input(vec![3600.0], vec![0.0]);
    let mut root = node("root", None, 1000.0);
    root.phase_limit_a[0] = vec![30.0 * 3f64.sqrt()];
    inp.nodes = vec![root];
    inp.chargers = vec![
        ac("ab", "root", Wiring::LineToLine, &[0, 1], 208.0, 40.0),
        ac("ca", "root", Wiring::LineToLine, &[2, 0], 208.0, 40.0),
    ];
    inp.sessions = vec![
        session("s1", "ab", 1.0, 10.0),
        session("s2", "ca", 1.0, 10.0),
    ];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    assert_eq!(out.summary.second_order_cones, 1, "line A mixes two angles");
    for s in 0..2 {
        let t = targets(&out, s)[0];
        assert!(close(t, 30.0, 1e-4), "session {s}: {t}");
    }
    // A linear I_AB + I_CA check would have allowed only 26 A each.
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
}

#[test]
fn demand_charge_flattens_the_profile() {
    let mut inp = input(vec![900.0, 900.0], vec![0.0]);
    inp.demand_charge_per_kw = 1.0;
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 0.5, 2.3)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let t = targets(&out, 0);
    assert!(close(t[0], 20.0, 1e-4) && close(t[1], 20.0, 1e-4), "{t:?}");
    assert!(close(out.summary.objective_relaxed, 4.6, 1e-5));

    // The period's peak is a floor: under it, the demand term is constant.
    inp.peak_floor_kw = 10.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(close(out.summary.objective_relaxed, 10.0, 1e-5));
}

#[test]
fn impossible_limit_is_a_status_not_an_error() {
    let mut inp = input(vec![3600.0], vec![0.1]);
    let mut root = node("root", None, 20.0);
    root.other_load_a[0] = vec![25.0];
    inp.nodes = vec![root];
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 1.0, 2.3)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Infeasible);
    assert!(out.rows.is_empty());
    assert_eq!(out.summary.binding[0].node, "root");
}

#[test]
fn a_limit_exactly_at_the_other_load_plans_nothing_there() {
    // No room at all (limit = forecast other load) is not "exceeded": the plan is made, with 0
    // on that line; it was refused as infeasible when the safety margin made the room negative.
    let mut inp = input(vec![3600.0, 3600.0], vec![0.1]);
    let mut root = node("root", None, 20.0);
    root.other_load_a[0] = vec![20.0, 0.0];
    inp.nodes = vec![root];
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 2.0, 2.3)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    let t = targets(&out, 0);
    assert!(t[0].abs() < 1e-6 && close(t[1], 10.0, 1e-3), "{t:?}");
}

#[test]
fn too_much_demand_degrades_to_as_much_as_possible() {
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 1.0, 50.0)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    assert!(close(targets(&out, 0)[0], 32.0, 1e-6));
    assert!(close(
        out.summary.shortfall_kwh[0],
        50.0 - 32.0 * 0.23,
        1e-5
    ));
}

#[test]
fn bad_input_names_the_field() {
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 1.0, f64::NAN)];
    let err = plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    let PlanError::Input { field, .. } = &err;
    assert_eq!(field, "sessions[0](s1).energy_requested_kwh");

    // Absurd finite values: refused naming the field, not solved into infeasible / failed.
    inp.sessions = vec![session("s1", "c1", 1.0, 1e7)];
    let PlanError::Input { field, message } =
        plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    assert_eq!(field, "sessions[0](s1).energy_requested_kwh");
    assert!(message.contains("at most 1e4 kWh"), "{message}");
    inp.sessions = vec![session("s1", "c1", 1.0, 2.0)];
    inp.chargers[0].max_a = Some(1e12);
    let PlanError::Input { field, .. } = plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    assert_eq!(field, "chargers[0](c1).max_a");
    inp.chargers[0].max_a = Some(32.0);
    inp.nodes[0].phase_limit_a[1] = vec![1e300];
    let PlanError::Input { field, .. } = plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    assert_eq!(field, "nodes[0](root).phase_limit_a[1][0]");
    inp.nodes[0].phase_limit_a[1] = vec![100.0];
    inp.price_per_kwh = vec![-1e300];
    let PlanError::Input { field, message } =
        plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    assert_eq!(field, "price_per_kwh[0]");
    assert!(
        message.contains("between -1e4 and 1e4 per kWh"),
        "{message}"
    );
    inp.price_per_kwh = vec![1e4];
    assert!(plan(&inp, PlannerSettings::default(), 5.0).is_ok());
    inp.price_per_kwh = vec![0.1];
    inp.chargers[0].min_a = Some(3.0);
    let PlanError::Input { field, .. } = plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    assert_eq!(field, "chargers[0](c1).min_a");

    // Two sessions on one charger: back to back is fine, overlapping is refused.
    inp.chargers[0].min_a = None;
    let mut next = session("s2", "c1", 2.0, 2.0);
    next.arrival_s = T0 + 3600.0;
    inp.sessions.push(next.clone());
    assert!(plan(&inp, PlannerSettings::default(), 5.0).is_ok());
    next.arrival_s = T0 + 1800.0;
    inp.sessions[1] = next;
    let PlanError::Input { field, message } =
        plan(&inp, PlannerSettings::default(), 5.0).unwrap_err();
    assert_eq!(field, "sessions[1](s2).arrival_s");
    assert!(message.contains("\"s1\""), "{message}");
}

#[test]
fn an_iteration_limit_is_a_failed_status_with_no_schedule() {
    // The caller falls back to the allocator on `failed`, as on `time_limit`.
    let mut inp = input(vec![900.0; 16], vec![0.2]);
    inp.chargers = (0..6)
        .map(|i| {
            ac(
                &format!("c{i}"),
                "root",
                Wiring::LineToLine,
                &[i % 3, (i + 1) % 3],
                208.0,
                32.0,
            )
        })
        .collect();
    inp.sessions = (0..6)
        .map(|i| session(&format!("s{i}"), &format!("c{i}"), 4.0, 20.0))
        .collect();
    let settings = PlannerSettings {
        max_iter: 2,
        ..PlannerSettings::default()
    };
    let mut p = Planner::new(settings);
    let out = p.plan(&inp, 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Failed);
    assert_eq!(out.summary.solver_status, "MaxIterations");
    assert!(out.summary.refined_retry);
    assert!(out.rows.is_empty());
    assert!(!out.summary.status.has_schedule());
    // The failed solver is not kept: the next plan of the same structure starts afresh (a
    // solver that failed numerically kept the scaling that failed it and failed every later
    // plan). A plan that ends without failing keeps it (the control below).
    let again = p.plan(&inp, 5.0).unwrap();
    assert_eq!(again.summary.status, PlanStatus::Failed);
    assert!(!again.summary.reused_solver);
    let mut kept = Planner::default();
    assert!(!kept.plan(&inp, 5.0).unwrap().summary.reused_solver);
    assert!(kept.plan(&inp, 5.0).unwrap().summary.reused_solver);
    // With enough iterations the same input plans.
    let ok = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(ok.summary.status, PlanStatus::Optimal);
}

#[test]
fn replanning_with_same_structure_reuses_the_solver() {
    let mut inp = input(vec![3600.0, 3600.0], vec![0.3, 0.1]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 2.0, 2.3)];
    let mut p = Planner::default();
    let a = p.plan(&inp, 5.0).unwrap();
    assert!(!a.summary.reused_solver);
    inp.price_per_kwh = vec![0.1, 0.3];
    let b = p.plan(&inp, 5.0).unwrap();
    assert!(b.summary.reused_solver);
    let t = targets(&b, 0);
    assert!(close(t[0], 10.0, 1e-5) && t[1].abs() < 1e-4, "{t:?}");
    // A new session changes the structure: a fresh solver, still correct.
    inp.chargers
        .push(ac("c2", "root", Wiring::LineToNeutral, &[1], 230.0, 32.0));
    inp.sessions.push(session("s2", "c2", 2.0, 2.3));
    let c = p.plan(&inp, 5.0).unwrap();
    assert!(!c.summary.reused_solver);
    assert!(close(c.summary.objective_relaxed, 0.46, 1e-5));
}

#[test]
fn rounded_schedules_obey_the_six_amp_rule_and_every_limit() {
    // A crowded line-to-line site: many sessions, a tight transformer.
    let mut inp = input(vec![300.0; 12], vec![0.2]);
    inp.weights = PlanWeights::default();
    inp.nodes = vec![node("root", None, 90.0), node("p1", Some("root"), 60.0)];
    let pairs = [[0usize, 1usize], [1, 2], [2, 0]];
    for i in 0..12 {
        let parent = if i % 2 == 0 { "root" } else { "p1" };
        inp.chargers.push(ac(
            &format!("c{i}"),
            parent,
            Wiring::LineToLine,
            &pairs[i % 3],
            208.0,
            32.0,
        ));
        let mut s = session(
            &format!("s{i}"),
            &format!("c{i}"),
            0.5 + (i as f64) * 0.05,
            4.0 + i as f64,
        );
        s.arrival_s = T0 + (i as f64) * 120.0;
        inp.sessions.push(s);
    }
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(out.summary.status.has_schedule());
    for r in &out.rows {
        assert!(
            r.target == 0.0 || (r.target >= 6.0 && r.target <= 32.0 + 1e-9),
            "{r:?}"
        );
    }
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
    // Rounding never costs more energy than the relaxation could deliver.
    let relaxed_short = out.summary.terms_relaxed.non_delivery;
    assert!(out.summary.terms.non_delivery >= relaxed_short - 1e-6);
}

#[test]
fn a_tiny_budget_gives_a_status() {
    let mut inp = input(vec![300.0; 144], vec![0.2]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", 12.0, 20.0)];
    let out = plan(&inp, PlannerSettings::default(), 1e-9).unwrap();
    assert_eq!(out.summary.status, PlanStatus::TimeLimit);
    assert!(out.rows.is_empty());
}

fn one_ln_session(step_s: Vec<f64>, price: Vec<f64>, kwh: f64) -> PlanInput {
    let hours = step_s.iter().sum::<f64>() / 3600.0;
    let mut inp = input(step_s, price);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    inp.sessions = vec![session("s1", "c1", hours, kwh)];
    inp
}

#[test]
fn demand_windows_are_clock_aligned_and_count_the_energy_already_in_the_window() {
    // Now is 5 min into a 15-min window: step 0 (10 min) closes it, step 1 (15 min) is the next.
    // Windows: 4·e_past + P0·600/900 and P1. Equal at the optimum with P0/6 + P1/4 = E:
    // D = 2·(E + e_past).
    let mut inp = one_ln_session(vec![600.0, 900.0], vec![0.0], 2.3);
    inp.start_s = T0 + 300.0;
    inp.sessions[0].arrival_s = T0;
    inp.sessions[0].departure_s = T0 + 1800.0;
    inp.demand_charge_per_kw = 1.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(
        close(out.summary.objective_relaxed, 4.6, 1e-5),
        "{:?}",
        out.summary
    );
    // P0 = 1.5·D = 6.9 kW, P1 = D = 4.6 kW at 230 V.
    let t = targets(&out, 0);
    assert!(close(t[0], 30.0, 1e-4) && close(t[1], 20.0, 1e-4), "{t:?}");
    inp.current_window_energy_kwh = 0.1;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(close(out.summary.objective_relaxed, 4.8, 1e-5));
    let t = targets(&out, 0);
    assert!(
        close(t[0], 6.6 / 0.23, 1e-4) && close(t[1], 4.8 / 0.23, 1e-4),
        "{t:?}"
    );
    assert!(out.summary.binding.iter().any(|b| b.kind == "demand_peak"));

    // A 30-min window holds both steps: only the total energy counts (2.3 kWh / 0.5 h), so the
    // free step 0 runs at 32 A and the rest (2.3 − 7.36/6 kWh) goes to step 1 at 0.1.
    inp.demand_window_s = 1800.0;
    inp.current_window_energy_kwh = 0.0;
    inp.price_per_kwh = vec![0.0, 0.1];
    let rest_kwh = 2.3 - 7.36 / 6.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(close(
        out.summary.objective_relaxed,
        4.6 + 0.1 * rest_kwh,
        1e-5
    ));
    assert!(
        close(targets(&out, 0)[0], 32.0, 1e-5),
        "{:?}",
        targets(&out, 0)
    );

    // The billing period's peak is a floor: below it, the demand term does not move.
    inp.peak_floor_kw = 6.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(close(
        out.summary.objective_relaxed,
        6.0 + 0.1 * rest_kwh,
        1e-5
    ));
}

#[test]
fn curtailment_limits_vary_over_the_horizon() {
    // Cheap step 0 is curtailed to 2.3 kW (10 A): the rest goes to the dear step 1.
    let mut inp = one_ln_session(vec![3600.0, 3600.0], vec![0.1, 0.3], 4.6);
    inp.nodes[0].power_limit_kw = Some(vec![2.3, 100.0]);
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let t = targets(&out, 0);
    assert!(close(t[0], 10.0, 1e-4) && close(t[1], 10.0, 1e-4), "{t:?}");
    assert!(close(out.summary.objective_relaxed, 0.23 + 0.69, 1e-5));
    assert!(out
        .summary
        .binding
        .iter()
        .any(|b| b.kind == "power_limit" && b.step == 0));

    // The same through a phase limit that drops to 8 A in step 0.
    inp.nodes[0].power_limit_kw = None;
    inp.nodes[0].phase_limit_a[0] = vec![8.0, 100.0];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let t = targets(&out, 0);
    assert!(close(t[0], 8.0, 1e-4) && close(t[1], 12.0, 1e-4), "{t:?}");
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
}

#[test]
fn other_load_and_pv_forecasts_shape_the_plan() {
    // Other load 1 kW; PV 3 kW in step 0 only: step 0 is free up to 2 kW of charging.
    let mut inp = one_ln_session(vec![3600.0, 3600.0], vec![0.3, 0.2], 2.3);
    inp.nodes[0].other_load_kw = vec![1.0];
    inp.pv_kw = vec![3.0, 0.0];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    // Step 0: 2 kWh free; step 1: 0.3 kWh plus the other load at 0.2.
    assert!(close(out.summary.objective_relaxed, 0.2 * 1.3, 1e-5));
    assert!(close(out.summary.terms_relaxed.energy_cost, 0.26, 1e-5));

    // Other load on a line takes its share of the phase limit.
    let mut inp = one_ln_session(vec![3600.0], vec![0.1], 50.0);
    inp.nodes[0].phase_limit_a[0] = vec![20.0];
    inp.nodes[0].other_load_a[0] = vec![12.0];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(close(targets(&out, 0)[0], 8.0, 1e-4));
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
}

#[test]
fn regularisers_charge_early_share_equally_and_smooth() {
    // Charge early: equal prices, the energy goes first.
    let mut inp = one_ln_session(vec![3600.0, 3600.0], vec![0.1], 2.3);
    inp.weights.charge_early_per_kwh = 0.01;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let t = targets(&out, 0);
    assert!(close(t[0], 10.0, 1e-4) && t[1].abs() < 1e-3, "{t:?}");
    assert!(out.summary.terms.charge_early > 0.0);

    // Equal share: two sessions short of energy under a 20 A line share it 10/10.
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.nodes = vec![node("root", None, 20.0)];
    inp.chargers = vec![
        ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0),
        ac("c2", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0),
    ];
    inp.sessions = vec![
        session("s1", "c1", 1.0, 20.0),
        session("s2", "c2", 1.0, 20.0),
    ];
    inp.weights.equal_share = 0.01;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    for s in 0..2 {
        assert!(close(targets(&out, s)[0], 10.0, 1e-4), "{:?}", out.rows);
    }

    // Smooth: alternating prices make a jumpy profile; the smoothing term flattens it.
    let jumps = |w: f64| {
        let mut inp = one_ln_session(vec![900.0; 8], vec![0.1, 0.3], 2.3);
        inp.price_per_kwh = (0..8).map(|k| if k % 2 == 0 { 0.1 } else { 0.3 }).collect();
        inp.weights.smooth = w;
        let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
        assert_eq!(out.summary.status, PlanStatus::Optimal);
        let t = targets(&out, 0);
        t.windows(2).map(|p| (p[1] - p[0]).abs()).sum::<f64>()
    };
    let (rough, smooth) = (jumps(0.0), jumps(1.0));
    assert!(rough > 50.0, "{rough}");
    assert!(smooth < 0.5 * rough, "{smooth} vs {rough}");
}

#[test]
fn urgency_finishes_the_session_that_leaves_first_first() {
    // A 10 A line, flat price, two sessions wanting one step each at 10 A: every split of the two
    // steps costs the same. `charge_early_per_kwh` cannot tell them apart (the line's energy-time
    // sum is the same); urgency puts the one that leaves at 2 h in the first step.
    let mut inp = input(vec![3600.0, 3600.0], vec![0.1]);
    inp.nodes = vec![node("root", None, 10.0)];
    inp.chargers = vec![
        ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0),
        ac("c2", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0),
    ];
    inp.sessions = vec![
        session("late", "c2", 4.0, 2.3),
        session("early", "c1", 2.0, 2.3),
    ];
    inp.weights.urgency_per_kwh = 0.01;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let late = targets(&out, 0);
    let early = targets(&out, 1);
    assert!(
        close(early[0], 10.0, 1e-3) && early[1].abs() < 1e-3,
        "{early:?}"
    );
    assert!(
        late[0].abs() < 1e-3 && close(late[1], 10.0, 1e-3),
        "{late:?}"
    );
    assert!(out.summary.terms.charge_early > 0.0);
    // Off (the default): no preference, and no term.
    inp.weights.urgency_per_kwh = 0.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(out.summary.terms.charge_early.abs() < 1e-9);
}

#[test]
fn growing_steps_and_variables_only_inside_the_session_window() {
    // 5 min, 15 min, 1 h; the session arrives 7.5 min in and leaves half-way through the hour.
    let mut inp = input(vec![300.0, 900.0, 3600.0], vec![0.1]);
    inp.chargers = vec![ac("c1", "root", Wiring::LineToNeutral, &[0], 230.0, 32.0)];
    let mut s = session("s1", "c1", 0.0, 100.0);
    s.arrival_s = T0 + 450.0;
    s.departure_s = T0 + 1200.0 + 1800.0;
    inp.sessions = vec![s];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let steps: Vec<usize> = out.rows.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![1, 2], "no variable before arrival");
    // 2 rates, 1 shortfall, 3 imports, 2 root aggregates (steps with a rate); no demand variable.
    assert_eq!(out.summary.variables, 2 + 1 + 3 + 2);
    for r in &out.rows {
        assert!(close(r.target, 32.0, 1e-6));
    }
    // Energy over the part of each step the car is there: (750 + 1800) s at 7.36 kW.
    let kwh = 7.36 * 2550.0 / 3600.0;
    assert!(
        close(out.summary.delivered_kwh[0], kwh, 1e-6),
        "{:?}",
        out.summary
    );
    assert!(close(out.summary.terms.energy_cost, 0.1 * kwh, 1e-6));
}

fn dc(id: &str, max_w: f64, aux_w: f64) -> PlanCharger {
    PlanCharger {
        id: id.into(),
        parent: "root".into(),
        kind: ChargerKind::Dc,
        wiring: Wiring::ThreePhase,
        phases: vec![0, 1, 2],
        voltage_v: 230.0,
        min_a: None,
        max_a: None,
        min_w: Some(5_000.0),
        max_w: Some(max_w),
        efficiency: 0.95,
        aux_w,
    }
}

#[test]
fn dc_sessions_are_planned_in_watts_with_the_conversion_loss() {
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.chargers = vec![dc("dc", 50_000.0, 0.0)];
    inp.sessions = vec![session("s1", "dc", 1.0, 25.0)];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(out.rows[0].dc);
    assert!(close(out.rows[0].target, 25_000.0, 1e-5));
    assert!(close(
        out.summary.terms.energy_cost,
        0.1 * 25.0 / 0.95,
        1e-5
    ));
}

#[test]
fn a_dc_chargers_auxiliary_load_counts_against_the_limits_and_the_cost() {
    // 100 A per phase at 230 V L-N: 69 kW from the grid. A 3 kW auxiliary load leaves
    // (69 - 3) x 0.95 = 62.7 kW of output; without it the plan took 65.55 kW of output, which
    // drew 72 kW (104.3 A) from the grid.
    let mut inp = input(vec![3600.0], vec![0.1]);
    inp.chargers = vec![dc("dc", 150_000.0, 3_000.0), dc("idle", 150_000.0, 3_000.0)];
    // "idle" has a car that wants nothing: its auxiliary load is not counted.
    inp.sessions = vec![
        session("s1", "dc", 1.0, 500.0),
        session("s2", "idle", 1.0, 0.0),
    ];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let w = targets(&out, 0)[0];
    let grid_a = (w / 0.95 + 3_000.0) / (3.0 * 230.0);
    assert!(grid_a <= 100.0 + 1e-6, "{w} W out draws {grid_a} A");
    assert!(w > 62_000.0, "{w}");
    // The energy cost is the grid's: output over the efficiency plus the auxiliary load.
    let kwh = w / 1000.0;
    assert!(
        close(
            out.summary.terms.energy_cost,
            0.1 * (kwh / 0.95 + 3.0),
            1e-4
        ),
        "{:?}",
        out.summary.terms
    );
    // The independent check counts it too: the old plan's 65.55 kW is over the limit.
    let mut over = out.rows.clone();
    let i = over.iter().position(|r| r.session == 0).unwrap();
    over[i].target = 65_550.0;
    assert_eq!(check_schedule(&inp, &over).unwrap().len(), 3); // one per phase
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
    // Refused where it means nothing, and when it is not a number.
    let mut bad_ac = input(vec![3600.0], vec![0.1]);
    let mut c = ac("a", "root", Wiring::ThreePhase, &[0, 1, 2], 230.0, 32.0);
    c.aux_w = 50.0;
    bad_ac.chargers = vec![c];
    assert!(
        matches!(bad_ac.validate(), Err(PlanError::Input { field, .. }) if field.ends_with(".aux_w"))
    );
    inp.chargers[0].aux_w = f64::NAN;
    assert!(
        matches!(inp.validate(), Err(PlanError::Input { field, .. }) if field.ends_with(".aux_w"))
    );
}

#[test]
fn an_auxiliary_load_with_no_room_left_plans_zero_there_not_infeasible() {
    // The edge lowers a limit to a hair above the other load where chargers outside the plan
    // hold the rest. A waiting DC session's 300 W auxiliary load counted on top made the plan
    // infeasible (example depot: 4 of 70 plans). It plans 0 in that step and charges after.
    let base = || {
        let mut inp = input(vec![900.0, 900.0], vec![0.1, 0.1]);
        inp.chargers = vec![dc("dc", 90_000.0, 300.0)];
        inp.sessions = vec![session("s1", "dc", 1.0, 20.0)];
        inp
    };
    let mut by_kw = base();
    by_kw.nodes[0].other_load_kw = vec![41.4];
    by_kw.nodes[0].power_limit_kw = Some(vec![41.401, 141.4]);
    let mut by_a = base();
    by_a.nodes[0].other_load_a = [vec![60.0], vec![60.0], vec![60.0]];
    by_a.nodes[0].phase_limit_a = [
        vec![60.001, 100.0],
        vec![60.001, 100.0],
        vec![60.001, 100.0],
    ];
    for inp in [by_kw, by_a] {
        let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
        assert_eq!(out.summary.status, PlanStatus::Optimal, "{:?}", out.summary);
        let t = targets(&out, 0);
        assert_eq!(t[0], 0.0, "{t:?}");
        assert!(t[1] > 5_000.0, "{t:?}");
        // The independent check counts the auxiliary load whole: step 0 is over by it.
        assert!(!check_schedule(&inp, &out.rows).unwrap().is_empty());
    }
    // An other load over the limit before the auxiliary load is still infeasible.
    let mut over = base();
    over.nodes[0].other_load_kw = vec![41.4];
    over.nodes[0].power_limit_kw = Some(vec![41.0, 141.4]);
    let out = plan(&over, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Infeasible);
}

/// Profiling aid, not a test: `EVCORE_PLAN_JSON=file cargo test --profile ci -p evcore-core --lib
/// profile_plan_from_json -- --ignored --nocapture` times build, setup and solve of one input
/// (the core input JSON, as `evcore.planner.to_core_input` writes it), with and without
/// Clarabel's iterative refinement.
#[test]
#[ignore]
fn profile_plan_from_json() {
    let Ok(path) = std::env::var("EVCORE_PLAN_JSON") else {
        return;
    };
    let text = std::fs::read_to_string(path).unwrap();
    let inp: PlanInput = serde_json::from_str(&text).unwrap();
    for refine in [false, true] {
        let settings = PlannerSettings {
            iterative_refinement: refine,
            ..PlannerSettings::default()
        };
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let m = model::Model::build(&inp, settings.limit_margin_rel);
            let build = t.elapsed().as_secs_f64();
            let out = plan(&inp, settings, 60.0).unwrap();
            let s = &out.summary;
            println!(
                "refinement {refine}: build {:.1} ms, setup {:.1} ms, solve {:.1} ms, total {:.1} ms, \
                 iters {}, obj {:.9}, n {} m {} nnz(A) {} nnz(P) {}",
                build * 1e3,
                s.setup_time_s * 1e3,
                s.solve_time_s * 1e3,
                s.total_time_s * 1e3,
                s.iterations,
                s.objective_relaxed,
                m.n,
                m.m,
                m.a.nzval.len(),
                m.p.nzval.len()
            );
        }
    }
}

#[test]
fn a_remainder_below_one_step_at_the_minimum_is_still_planned() {
    // 0.1 kWh left: the relaxed optimum is about 1.7 A for 15 min, below the 6 A minimum.
    // The rounded plan switches on at 6 A in the cheapest step, the earliest one with
    // charge-early on (the car stops when full).
    let mut inp = one_ln_session(vec![900.0; 4], vec![0.1], 0.1);
    inp.weights.charge_early_per_kwh = 0.01;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    let t = targets(&out, 0);
    assert_eq!(t, vec![6.0, 0.0, 0.0, 0.0]);
    assert!(out.summary.shortfall_kwh[0] == 0.0);
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());

    // No room for the minimum: nothing is switched on, the shortfall is reported.
    inp.nodes[0].phase_limit_a[0] = vec![5.0];
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert!(targets(&out, 0).iter().all(|&a| a == 0.0));
    assert!(close(out.summary.shortfall_kwh[0], 0.1, 1e-6));
}

/// One three-phase 230 V session on a 25.6 A grid, on a growing step grid: two dear 5-min steps
/// (1.0), then cheap 15-min ones (0.05). 1 A for 15 min delivers 3 × 0.23 × 0.25 = 0.1725 kWh
/// (0.0575 kWh in 5 min, so a dear step can take a small remainder above 6 A: the trap).
fn dear_then_cheap(cheap_steps: usize, kwh: f64) -> PlanInput {
    let mut price = vec![1.0, 1.0];
    price.extend(vec![0.05; cheap_steps]);
    let mut step_s = vec![300.0, 300.0];
    step_s.extend(vec![900.0; cheap_steps]);
    let hours = step_s.iter().sum::<f64>() / 3600.0;
    let mut inp = input(step_s, price);
    inp.nodes = vec![node("root", None, 25.6)];
    inp.chargers = vec![ac(
        "c1",
        "root",
        Wiring::ThreePhase,
        &[0, 1, 2],
        230.0,
        32.0,
    )];
    inp.sessions = vec![session("s1", "c1", hours, kwh)];
    inp
}

#[test]
fn rounding_puts_lost_energy_in_the_cheapest_steps_not_the_first() {
    // 3 kWh over 8 cheap steps: the relaxation spreads 2.17 A per cheap step (below 6 A).
    // Optimum: all 3 kWh in cheap steps, energy cost 3 × 0.05 = 0.15; the dear steps stay off.
    let inp = dear_then_cheap(8, 3.0);
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    assert!(close(out.summary.terms_relaxed.energy_cost, 0.15, 1e-5));
    let t = targets(&out, 0);
    assert_eq!(&t[..2], &[0.0, 0.0], "{t:?}");
    assert!(
        t.iter()
            .all(|&a| a == 0.0 || (6.0 - 1e-9..=25.6).contains(&a)),
        "{t:?}"
    );
    assert!(close(out.summary.delivered_kwh[0], 3.0, 1e-6));
    assert!(
        close(out.summary.terms.energy_cost, 0.15, 1e-5),
        "{:?}",
        out.summary.terms
    );
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());
}

#[test]
fn a_remainder_below_the_minimum_moves_energy_instead_of_using_a_dear_step() {
    // 5 kWh, charge-early on: the relaxation fills the first cheap step at the 25.6 A limit
    // (4.416 kWh) and leaves 0.584 kWh (3.39 A) for the next one. Rounded: the next cheap step
    // at 6 A (1.035 kWh) and the first at (5 − 1.035) / 0.1725 = 22.985 A, exactly 5 kWh at
    // 0.05 (0.25), where switching on a dear step at 10.2 A would cost 0.584 × 1.0 more.
    let mut inp = dear_then_cheap(4, 5.0);
    inp.weights.charge_early_per_kwh = 1e-3;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    let t = targets(&out, 0);
    let first = (5.0 - 6.0 * 0.1725) / 0.1725;
    assert!(t[0] == 0.0 && t[1] == 0.0, "{t:?}");
    assert!(close(t[2], first, 1e-5) && t[3] == 6.0, "{t:?}");
    assert!(t[4] == 0.0 && t[5] == 0.0, "{t:?}");
    assert!(close(out.summary.delivered_kwh[0], 5.0, 1e-6));
    assert!(
        close(out.summary.terms.energy_cost, 0.25, 1e-5),
        "{:?}",
        out.summary.terms
    );
    assert!(check_schedule(&inp, &out.rows).unwrap().is_empty());

    // 0.5 kWh: less than one cheap step at 6 A. It is planned at 6 A in the first cheap step
    // (the car stops when full), never in a dear step.
    let mut inp = dear_then_cheap(4, 0.5);
    inp.weights.charge_early_per_kwh = 1e-3;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(targets(&out, 0), vec![0.0, 0.0, 6.0, 0.0, 0.0, 0.0]);
}

#[test]
fn a_negative_price_draws_the_energy_into_its_step_and_stays_bounded() {
    // 0.10, then -0.02 (surplus wind), then 0.10: the session's 2.3 kWh go into the paid step,
    // no more than requested, and the import there is what the charger draws.
    let mut inp = one_ln_session(vec![3600.0; 3], vec![0.1, -0.02, 0.1], 2.3);
    inp.weights.charge_early_per_kwh = 1e-3;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(
        out.summary.status,
        PlanStatus::Optimal,
        "{}",
        out.summary.message
    );
    let t = targets(&out, 0);
    assert!(
        t[0] < 1e-4 && close(t[1], 10.0, 1e-4) && t[2] < 1e-4,
        "{t:?}"
    );
    assert!(close(out.summary.delivered_kwh[0], 2.3, 1e-5));
    assert!(
        close(out.summary.terms.energy_cost, -0.046, 1e-4),
        "{:?}",
        out.summary.terms
    );
    // More energy than the negative step holds: the rest at the positive price, not more.
    let mut inp = one_ln_session(vec![3600.0; 3], vec![0.1, -0.02, 0.1], 10.0);
    inp.weights.non_delivery_per_kwh = 1000.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    let t = targets(&out, 0);
    assert!(close(t[1], 32.0, 1e-4), "{t:?}");
    assert!(close(out.summary.delivered_kwh[0], 10.0, 1e-5));
    // Every step negative with a building load and PV: still bounded, energy as requested.
    let mut inp = one_ln_session(vec![3600.0; 2], vec![-0.05], 3.0);
    inp.nodes[0].other_load_kw = vec![2.0];
    inp.pv_kw = vec![5.0, 0.0];
    inp.demand_charge_per_kw = 1.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(
        out.summary.status,
        PlanStatus::Optimal,
        "{}",
        out.summary.message
    );
    assert!(close(out.summary.delivered_kwh[0], 3.0, 1e-5));
    assert!(out.summary.terms_relaxed.energy_cost.is_finite());
}

#[test]
fn a_window_cut_by_the_horizon_end_counts_the_other_load_after_it() {
    // 13 five-minute steps from a window start (12:00-13:05), 30 kW of building load all day,
    // a 30 kWh session leaving at 13:05. The window 13:00-13:15 is cut by the horizon: the
    // building still imports 30 kW in its last 10 minutes. Billed peak at best: 54 kW (24 kW of
    // charging for an hour, then 72 kW for 5 minutes). Before: the planner saw 50 kW (nothing
    // imported after the horizon) and planned 120 kW in the last step: 70 kW billed.
    let mut inp = input(vec![300.0; 13], vec![0.1]);
    inp.nodes = vec![node("root", None, 400.0)];
    inp.nodes[0].other_load_kw = vec![30.0];
    inp.chargers = vec![ac(
        "c1",
        "root",
        Wiring::ThreePhase,
        &[0, 1, 2],
        230.0,
        250.0,
    )];
    inp.sessions = vec![session("s1", "c1", 65.0 / 60.0, 30.0)];
    inp.demand_charge_per_kw = 50.0;
    inp.weights.non_delivery_per_kwh = 1000.0;
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(out.summary.status, PlanStatus::Optimal);
    assert!(close(out.summary.delivered_kwh[0], 30.0, 1e-4));
    let mut import: Vec<f64> = targets(&out, 0).iter().map(|a| 30.0 + a * 0.69).collect();
    import.extend([30.0, 30.0]); // 13:05-13:15: the building after the horizon
    let billed = import
        .chunks(3)
        .map(|w| w.iter().sum::<f64>() / 3.0)
        .fold(0.0, f64::max);
    let planned = out.summary.terms.demand_charge / 50.0;
    assert!(billed <= 54.0 + 0.05, "billed {billed} kW, {import:?}");
    assert!(
        close(planned, billed, 1e-3),
        "planned {planned} kW, billed {billed} kW"
    );
}

#[test]
fn a_cap_no_rate_can_reach_does_not_spoil_the_solve() {
    // 1,000 kW of other load under a 1e6 kW "no cap" placeholder: Clarabel called the badly
    // scaled problem PrimalInfeasible while its rows were kept.
    let mut inp = input(vec![900.0; 8], vec![0.2]);
    inp.nodes = vec![node("root", None, 16.0)];
    inp.nodes[0].other_load_kw = vec![1000.0];
    inp.nodes[0].power_limit_kw = Some(vec![1e6]);
    inp.chargers = vec![ac(
        "c1",
        "root",
        Wiring::ThreePhase,
        &[0, 1, 2],
        230.0,
        32.0,
    )];
    inp.sessions = vec![session("s1", "c1", 2.0, 10.0)];
    inp.weights = PlanWeights {
        non_delivery_per_kwh: 1000.0,
        ..PlanWeights::default()
    };
    let out = plan(&inp, PlannerSettings::default(), 5.0).unwrap();
    assert_eq!(
        out.summary.status,
        PlanStatus::Optimal,
        "{}",
        out.summary.message
    );
    assert!(close(out.summary.delivered_kwh[0], 10.0, 1e-5));
}
