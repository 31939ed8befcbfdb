//! The safety envelope: the last step before any setpoint leaves the system.
//!
//! It takes requested setpoints and what is known about every charger and node, and returns
//! setpoints that keep every node's line currents, kW and unbalance caps within limits as counted
//! conservatively: each charger terminal counts as the largest of its new setpoint, its fresh
//! measurement and its last sent setpoint while that is unconfirmed; a charger whose profile state
//! is unknown counts at its maximum; stale non-charger load counts at its configured maximum.
//! It never raises a setpoint above the request. It must hold for every input, NaN and inf
//! included, and applying it twice changes nothing.
use crate::error::{CoreError, CoreResult};
use crate::topology::{ChargerKind, Topology, Wiring, N_PHASES, PHASE_ANGLE_RAD};
use std::fmt::Write as _;

/// Why a setpoint is what it is. The string codes are part of the Python interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    None,
    Demand,
    Plan,
    Admission,
    Hysteresis,
    Disconnected,
    Fault,
    ChargerMax,
    MinCurrent,
    Step,
    Ramp,
    NodePhase,
    NodePower,
    Unbalance,
    StaleTelemetry,
    UnconfirmedDecrease,
    UnknownProfile,
}

impl Binding {
    pub fn code(self) -> &'static str {
        match self {
            Binding::None => "none",
            Binding::Demand => "demand",
            Binding::Plan => "plan",
            Binding::Admission => "admission",
            Binding::Hysteresis => "hysteresis",
            Binding::Disconnected => "disconnected",
            Binding::Fault => "fault",
            Binding::ChargerMax => "charger_max",
            Binding::MinCurrent => "min_current",
            Binding::Step => "step",
            Binding::Ramp => "ramp",
            Binding::NodePhase => "node_phase",
            Binding::NodePower => "node_power",
            Binding::Unbalance => "unbalance",
            Binding::StaleTelemetry => "stale_telemetry",
            Binding::UnconfirmedDecrease => "unconfirmed_decrease",
            Binding::UnknownProfile => "unknown_profile",
        }
    }
    pub const ALL: [Binding; 17] = [
        Binding::None,
        Binding::Demand,
        Binding::Plan,
        Binding::Admission,
        Binding::Hysteresis,
        Binding::Disconnected,
        Binding::Fault,
        Binding::ChargerMax,
        Binding::MinCurrent,
        Binding::Step,
        Binding::Ramp,
        Binding::NodePhase,
        Binding::NodePower,
        Binding::Unbalance,
        Binding::StaleTelemetry,
        Binding::UnconfirmedDecrease,
        Binding::UnknownProfile,
    ];
}

/// Site-wide parameters of one envelope call. Times are seconds on the caller's clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnvelopeParams {
    pub now_s: f64,
    /// A measurement older than this is stale (not counted; other load then counts at its maximum).
    pub stale_after_s: f64,
    /// A paused charger stays paused at least this long after `off_since`.
    pub min_off_s: f64,
    /// A running charger should stay on this long after `on_since` (honoured by the allocator;
    /// the envelope pauses anyway when safety needs it).
    pub min_on_s: f64,
    /// Pauses/resumes allowed per session; a paused charger at the cap stays paused.
    pub max_switches: f64,
    /// Largest increase above the last sent setpoint in one call (A per phase; inf = none).
    pub max_increase_a: f64,
}

impl Default for EnvelopeParams {
    fn default() -> Self {
        EnvelopeParams {
            now_s: 0.0,
            stale_after_s: 60.0,
            min_off_s: 0.0,
            min_on_s: 0.0,
            max_switches: f64::INFINITY,
            max_increase_a: f64::INFINITY,
        }
    }
}

impl EnvelopeParams {
    pub fn validate(&self) -> CoreResult<()> {
        let checks: [(&str, f64, bool); 6] = [
            ("now_s", self.now_s, self.now_s.is_finite()),
            (
                "stale_after_s",
                self.stale_after_s,
                self.stale_after_s >= 0.0,
            ),
            ("min_off_s", self.min_off_s, self.min_off_s >= 0.0),
            ("min_on_s", self.min_on_s, self.min_on_s >= 0.0),
            ("max_switches", self.max_switches, self.max_switches >= 0.0),
            (
                "max_increase_a",
                self.max_increase_a,
                self.max_increase_a >= 0.0,
            ),
        ];
        for (name, v, ok) in checks {
            if !ok || v.is_nan() {
                return Err(CoreError::input(
                    name,
                    None,
                    format!("invalid parameter value {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// Per-charger inputs (one entry per topology charger, in topology order). AC values are amperes
/// per phase; DC values are watts. Measured currents are per charger terminal L1..L3 (for
/// line-to-neutral and line-to-line chargers only L1 is used).
#[derive(Clone, Copy, Debug)]
pub struct ChargerInputs<'a> {
    pub requested_a: &'a [f64],
    pub requested_w: &'a [f64],
    pub measured_l1_a: &'a [f64],
    pub measured_l2_a: &'a [f64],
    pub measured_l3_a: &'a [f64],
    pub measured_age_s: &'a [f64],
    pub last_sent_a: &'a [f64],
    pub last_sent_w: &'a [f64],
    pub last_sent_confirmed: &'a [bool],
    pub connected: &'a [bool],
    pub faulted: &'a [bool],
    pub profile_unknown: &'a [bool],
    pub on_since_s: &'a [f64],
    pub off_since_s: &'a [f64],
    pub switches: &'a [f64],
}

/// Per-node inputs: measured non-charger load per site phase and its age.
#[derive(Clone, Copy, Debug)]
pub struct NodeInputs<'a> {
    pub other_load_l1_a: &'a [f64],
    pub other_load_l2_a: &'a [f64],
    pub other_load_l3_a: &'a [f64],
    pub other_load_age_s: &'a [f64],
}

/// Where a constraint binds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Constraint {
    Phase(usize),
    Power,
    /// Unbalance between a high phase and a low phase.
    Unbalance(usize, usize),
}

/// The envelope's decision for every charger.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    /// AC: amperes per phase (0 = paused). DC: the AC line current per phase it draws.
    pub setpoint_a: Vec<f64>,
    /// DC: watts (0 = paused); AC: the active power the setpoint allows.
    pub setpoint_w: Vec<f64>,
    pub binding: Vec<Binding>,
    pub binding_node: Vec<Option<usize>>,
    pub binding_phase: Vec<Option<usize>>,
    /// Value and limit of the binding constraint (A or kW), for the reason sentence.
    pub binding_value: Vec<f64>,
    pub binding_limit: Vec<f64>,
    /// Filled only when asked (`explain`).
    pub reason: Vec<String>,
}

/// Counted current of each charger terminal and node other load: the state the checks work on.
pub(crate) struct Counting {
    /// Controllable part: new setpoint (line amps per terminal; DC converted).
    pub s: Vec<f64>,
    /// Uncontrollable part per terminal (3 per charger): fresh measurement, unconfirmed last sent,
    /// unknown profile.
    pub held: Vec<[f64; N_PHASES]>,
    pub held_unconfirmed: Vec<bool>,
    /// Non-charger load per node and phase as counted, and whether it is the stale maximum.
    pub other: Vec<[f64; N_PHASES]>,
    pub other_stale: Vec<bool>,
}

const TOL_A: f64 = 1e-9;

fn fresh(age: f64, stale_after: f64) -> bool {
    age.is_finite() && age >= 0.0 && age <= stale_after
}

fn sane_meas(v: f64, max_a: f64) -> f64 {
    if v.is_nan() {
        max_a.max(0.0)
    } else {
        v.abs()
    }
}

fn check_len(name: &str, len: usize, want: usize) -> CoreResult<()> {
    if len != want {
        return Err(CoreError::input(
            name,
            None,
            format!("has {len} rows, the site has {want}"),
        ));
    }
    Ok(())
}

impl ChargerInputs<'_> {
    pub fn check(&self, n: usize) -> CoreResult<()> {
        check_len("requested_a", self.requested_a.len(), n)?;
        check_len("requested_w", self.requested_w.len(), n)?;
        check_len("measured_l1_a", self.measured_l1_a.len(), n)?;
        check_len("measured_l2_a", self.measured_l2_a.len(), n)?;
        check_len("measured_l3_a", self.measured_l3_a.len(), n)?;
        check_len("measured_age_s", self.measured_age_s.len(), n)?;
        check_len("last_sent_a", self.last_sent_a.len(), n)?;
        check_len("last_sent_w", self.last_sent_w.len(), n)?;
        check_len("last_sent_confirmed", self.last_sent_confirmed.len(), n)?;
        check_len("connected", self.connected.len(), n)?;
        check_len("faulted", self.faulted.len(), n)?;
        check_len("profile_unknown", self.profile_unknown.len(), n)?;
        check_len("on_since_s", self.on_since_s.len(), n)?;
        check_len("off_since_s", self.off_since_s.len(), n)?;
        check_len("switches", self.switches.len(), n)
    }
}

impl NodeInputs<'_> {
    pub fn check(&self, n: usize) -> CoreResult<()> {
        check_len("other_load_l1_a", self.other_load_l1_a.len(), n)?;
        check_len("other_load_l2_a", self.other_load_l2_a.len(), n)?;
        check_len("other_load_l3_a", self.other_load_l3_a.len(), n)?;
        check_len("other_load_age_s", self.other_load_age_s.len(), n)
    }
}

/// Last sent setpoint of a charger as AC line amps per terminal (NaN: unknown → its maximum).
pub(crate) fn last_sent_line_a(topo: &Topology, c: usize, ch: &ChargerInputs<'_>) -> f64 {
    let spec = &topo.chargers[c];
    let v = match spec.kind {
        ChargerKind::Ac => ch.last_sent_a[c],
        ChargerKind::Dc => {
            let w = ch.last_sent_w[c];
            if w.is_nan() {
                f64::NAN
            } else {
                spec.dc_line_a(w.min(spec.max_w))
            }
        }
    };
    if v.is_nan() {
        spec.max_a
    } else {
        v.max(0.0)
    }
}

pub(crate) fn counting(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    p: &EnvelopeParams,
) -> Counting {
    let n = topo.n_chargers();
    let mut held = vec![[0.0; N_PHASES]; n];
    let mut held_unconfirmed = vec![false; n];
    for c in 0..n {
        let spec = &topo.chargers[c];
        let nt = spec.wiring.terminals();
        let h = &mut held[c];
        if ch.profile_unknown[c] {
            for x in h.iter_mut().take(nt) {
                *x = spec.max_a;
            }
            continue;
        }
        if fresh(ch.measured_age_s[c], p.stale_after_s) {
            let m = [
                ch.measured_l1_a[c],
                ch.measured_l2_a[c],
                ch.measured_l3_a[c],
            ];
            for k in 0..nt {
                h[k] = sane_meas(m[k], spec.max_a);
            }
        }
        if !ch.last_sent_confirmed[c] {
            let ls = last_sent_line_a(topo, c, ch);
            if ls > 0.0 {
                held_unconfirmed[c] = true;
            }
            for x in h.iter_mut().take(nt) {
                *x = x.max(ls);
            }
        }
    }
    let nn = topo.n_nodes();
    let mut other = vec![[0.0; N_PHASES]; nn];
    let mut other_stale = vec![false; nn];
    for i in 0..nn {
        let max = topo.nodes[i].other_load_max_a;
        if fresh(nodes.other_load_age_s[i], p.stale_after_s) {
            let m = [
                nodes.other_load_l1_a[i],
                nodes.other_load_l2_a[i],
                nodes.other_load_l3_a[i],
            ];
            for k in 0..N_PHASES {
                // Unknown (NaN) → the configured maximum; export (negative) is not credited.
                other[i][k] = if m[k].is_nan() { max[k] } else { m[k].max(0.0) };
            }
        } else {
            other[i] = max;
            other_stale[i] = max.iter().any(|&x| x > 0.0);
        }
    }
    Counting {
        s: vec![0.0; n],
        held,
        held_unconfirmed,
        other,
        other_stale,
    }
}

/// Per-node aggregates of the counted currents.
#[derive(Clone, Debug)]
pub(crate) struct NodeLoads {
    pub re: Vec<[f64; N_PHASES]>,
    pub im: Vec<[f64; N_PHASES]>,
    pub power_w: Vec<f64>,
    /// spc[h][l]: what a single-phase car on each charger whose L1 is on h takes off line l.
    pub spc: Vec<[[f64; N_PHASES]; N_PHASES]>,
}

impl NodeLoads {
    pub fn new(nn: usize) -> Self {
        NodeLoads {
            re: vec![[0.0; N_PHASES]; nn],
            im: vec![[0.0; N_PHASES]; nn],
            power_w: vec![0.0; nn],
            spc: vec![[[0.0; N_PHASES]; N_PHASES]; nn],
        }
    }
    pub fn line_a(&self, n: usize, p: usize) -> f64 {
        self.re[n][p].hypot(self.im[n][p])
    }
}

#[inline]
fn terminal_counted(cnt: &Counting, c: usize, k: usize) -> f64 {
    cnt.s[c].max(cnt.held[c][k])
}

/// Add the charger's counted terminal currents (or, with `sign = -1`, remove them) at node `n`.
#[inline]
fn add_charger(
    topo: &Topology,
    cnt: &Counting,
    c: usize,
    n: usize,
    loads: &mut NodeLoads,
    sign: f64,
) {
    let spec = &topo.chargers[c];
    let v = spec.watts_per_terminal_a();
    for e in topo.terminal_entries(c) {
        let i = terminal_counted(cnt, c, e.terminal) * sign;
        loads.re[n][e.phase] += i * e.re;
        loads.im[n][e.phase] += i * e.im;
    }
    let nt = spec.wiring.terminals();
    for k in 0..nt {
        loads.power_w[n] += terminal_counted(cnt, c, k) * v * sign;
    }
    if spec.single_phase_car {
        let h = spec.phases[0];
        for k in 0..nt {
            let l = spec.phases[k];
            if l != h {
                loads.spc[n][h][l] += terminal_counted(cnt, c, k) * sign;
            }
        }
    }
}

/// Counted loads of every node: chargers added at their parent, then summed up the tree.
pub(crate) fn node_loads(topo: &Topology, cnt: &Counting, loads: &mut NodeLoads) {
    let nn = topo.n_nodes();
    for n in 0..nn {
        let mut re = [0.0; N_PHASES];
        let mut im = [0.0; N_PHASES];
        let mut pw = 0.0;
        for (p, &angle) in PHASE_ANGLE_RAD.iter().enumerate() {
            let (s, c) = angle.sin_cos();
            re[p] = cnt.other[n][p] * c;
            im[p] = cnt.other[n][p] * s;
            pw += cnt.other[n][p] * topo.voltage_ln_v;
        }
        loads.re[n] = re;
        loads.im[n] = im;
        loads.power_w[n] = pw;
        loads.spc[n] = [[0.0; N_PHASES]; N_PHASES];
    }
    for c in 0..topo.n_chargers() {
        add_charger(topo, cnt, c, topo.chargers[c].parent, loads, 1.0);
    }
    for &n in topo.node_order().iter().rev() {
        if let Some(p) = topo.nodes[n].parent {
            for k in 0..N_PHASES {
                loads.re[p][k] += loads.re[n][k];
                loads.im[p][k] += loads.im[n][k];
                for l in 0..N_PHASES {
                    loads.spc[p][k][l] += loads.spc[n][k][l];
                }
            }
            loads.power_w[p] += loads.power_w[n];
        }
    }
}

/// Worst-case unbalance (largest minus smallest line current) at a node, with every three-phase
/// charger that may carry a single-phase car drawing on its L1 alone when that is worse.
pub(crate) fn unbalance_at(topo: &Topology, loads: &NodeLoads, n: usize) -> (f64, usize, usize) {
    unbalance_of(loads, n, topo.node_has_line_to_line(n))
}

fn unbalance_of(loads: &NodeLoads, n: usize, l2l: bool) -> (f64, usize, usize) {
    let mag: [f64; N_PHASES] = std::array::from_fn(|p| loads.line_a(n, p));
    let mut worst = (0.0, 0, 1);
    for h in 0..N_PHASES {
        for l in 0..N_PHASES {
            if h == l {
                continue;
            }
            let low = if l2l {
                // Phasor sums: bound the low line from below by removing every single-phase car.
                let off: f64 = (0..N_PHASES)
                    .filter(|&x| x != l)
                    .map(|x| loads.spc[n][x][l])
                    .sum();
                (mag[l] - off).max(0.0)
            } else {
                mag[l] - loads.spc[n][h][l]
            };
            let u = mag[h] - low;
            if u > worst.0 {
                worst = (u, h, l);
            }
        }
    }
    worst
}

/// The value of one constraint at node `n` (A or kW) and its limit.
fn constraint_value(topo: &Topology, loads: &NodeLoads, n: usize, k: Constraint) -> (f64, f64) {
    let node = &topo.nodes[n];
    match k {
        Constraint::Phase(p) => (loads.line_a(n, p), node.phase_limit_a[p]),
        Constraint::Power => (
            loads.power_w[n] / 1000.0,
            node.power_limit_kw.unwrap_or(f64::INFINITY),
        ),
        Constraint::Unbalance(_, _) => (
            unbalance_at(topo, loads, n).0,
            node.unbalance_limit_a.unwrap_or(f64::INFINITY),
        ),
    }
}

fn violated(v: f64, limit: f64) -> bool {
    // NaN counts as violated: it can only come from absurd inputs, and 0 is then the safe answer.
    !(v <= limit + TOL_A * (1.0 + limit.abs()))
}

/// Violated constraints, top of the tree first; per-phase and kW limits first, unbalance only
/// once those hold (lowering a charger can raise unbalance, never a line current).
fn find_violations(
    topo: &Topology,
    loads: &NodeLoads,
    exempt: &[[bool; 5]],
) -> Vec<(usize, Constraint)> {
    let mut out = Vec::new();
    for &n in topo.node_order() {
        let node = &topo.nodes[n];
        for p in 0..N_PHASES {
            if !exempt[n][p] && violated(loads.line_a(n, p), node.phase_limit_a[p]) {
                out.push((n, Constraint::Phase(p)));
            }
        }
        if let Some(kw) = node.power_limit_kw {
            if !exempt[n][3] && violated(loads.power_w[n] / 1000.0, kw) {
                out.push((n, Constraint::Power));
            }
        }
    }
    if !out.is_empty() {
        return out;
    }
    for &n in topo.node_order() {
        if let Some(u) = topo.nodes[n].unbalance_limit_a {
            let (v, h, l) = unbalance_at(topo, loads, n);
            if !exempt[n][4] && violated(v, u) {
                out.push((n, Constraint::Unbalance(h, l)));
            }
        }
    }
    out
}

fn exempt_slot(k: Constraint) -> usize {
    match k {
        Constraint::Phase(p) => p,
        Constraint::Power => 3,
        Constraint::Unbalance(_, _) => 4,
    }
}

/// Whether lowering charger `c` helps constraint `k`.
fn contributes(topo: &Topology, c: usize, k: Constraint) -> bool {
    let spec = &topo.chargers[c];
    match k {
        Constraint::Phase(p) => spec.phases.contains(&p),
        Constraint::Power => true,
        Constraint::Unbalance(h, l) => match spec.wiring {
            Wiring::LineToNeutral => spec.phases[0] == h,
            Wiring::LineToLine => spec.phases.contains(&h) && !spec.phases.contains(&l),
            Wiring::ThreePhase => spec.single_phase_car && spec.phases[0] == h,
        },
    }
}

/// Non-charger load summed over each node's subtree (re, im per phase; W).
pub(crate) struct SubtreeOther {
    re: Vec<[f64; N_PHASES]>,
    im: Vec<[f64; N_PHASES]>,
    w: Vec<f64>,
}

pub(crate) fn subtree_other(topo: &Topology, cnt: &Counting) -> SubtreeOther {
    let nn = topo.n_nodes();
    let mut out = SubtreeOther {
        re: vec![[0.0; N_PHASES]; nn],
        im: vec![[0.0; N_PHASES]; nn],
        w: vec![0.0; nn],
    };
    for n in 0..nn {
        for (p, &angle) in PHASE_ANGLE_RAD.iter().enumerate() {
            let (s, c) = angle.sin_cos();
            out.re[n][p] = cnt.other[n][p] * c;
            out.im[n][p] = cnt.other[n][p] * s;
            out.w[n] += cnt.other[n][p] * topo.voltage_ln_v;
        }
    }
    for &n in topo.node_order().iter().rev() {
        if let Some(p) = topo.nodes[n].parent {
            for k in 0..N_PHASES {
                out.re[p][k] += out.re[n][k];
                out.im[p][k] += out.im[n][k];
            }
            out.w[p] += out.w[n];
        }
    }
    out
}

/// One constraint's value at node `n`, recomputed from the chargers below it (O(subtree)).
fn single_node_value(
    topo: &Topology,
    cnt: &Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
    scratch: &mut NodeLoads,
) -> f64 {
    scratch.re[0] = sub.re[n];
    scratch.im[0] = sub.im[n];
    scratch.power_w[0] = sub.w[n];
    scratch.spc[0] = [[0.0; N_PHASES]; N_PHASES];
    for &c in topo.chargers_below(n) {
        add_charger(topo, cnt, c, 0, scratch, 1.0);
    }
    match k {
        Constraint::Phase(p) => scratch.line_a(0, p),
        Constraint::Power => scratch.power_w[0] / 1000.0,
        Constraint::Unbalance(_, _) => unbalance_of(scratch, 0, topo.node_has_line_to_line(n)).0,
    }
}

/// Largest allowed setpoint not above `x` (line amps per terminal): 0, or on a step in
/// `[min_a, max_a]`. DC: `min_a` is the line current at `min_w`.
pub(crate) fn snap_down(topo: &Topology, c: usize, x: f64) -> f64 {
    let spec = &topo.chargers[c];
    if !(x > 0.0) {
        return 0.0;
    }
    let x = x.min(spec.max_a);
    if x + 1e-12 < spec.min_a {
        return 0.0;
    }
    if spec.steps_a.is_empty() {
        return x.max(spec.min_a);
    }
    let mut best = 0.0;
    for &s in &spec.steps_a {
        if s <= x + 1e-12 {
            best = s;
        } else {
            break;
        }
    }
    best
}

/// Sanitise one request: charger limits, fault, connection, ramp, hysteresis, 6 A rule, steps.
/// Returns line amps per terminal and the binding that shaped it.
pub(crate) fn sanitise_request(
    topo: &Topology,
    c: usize,
    ch: &ChargerInputs<'_>,
    p: &EnvelopeParams,
) -> (f64, Binding) {
    let spec = &topo.chargers[c];
    if ch.faulted[c] {
        return (0.0, Binding::Fault);
    }
    if !ch.connected[c] {
        return (0.0, Binding::Disconnected);
    }
    let mut binding = Binding::None;
    let mut x = match spec.kind {
        ChargerKind::Ac => ch.requested_a[c],
        ChargerKind::Dc => {
            let w = ch.requested_w[c];
            if w.is_nan() {
                0.0
            } else if w > spec.max_w {
                binding = Binding::ChargerMax;
                spec.max_a
            } else {
                spec.dc_line_a(w)
            }
        }
    };
    if !(x > 0.0) {
        return (0.0, Binding::None);
    }
    if x > spec.max_a {
        x = spec.max_a;
        binding = Binding::ChargerMax;
    }
    let last = last_sent_line_a(topo, c, ch);
    if p.max_increase_a.is_finite() && x > last + p.max_increase_a {
        x = last + p.max_increase_a;
        binding = Binding::Ramp;
    }
    let was_off = !(last > 0.0);
    if was_off {
        let off = ch.off_since_s[c];
        if off.is_finite() && p.now_s - off < p.min_off_s {
            return (0.0, Binding::Hysteresis);
        }
        let sw = ch.switches[c];
        if !(sw < p.max_switches) && sw.is_finite() || sw.is_nan() {
            return (0.0, Binding::Hysteresis);
        }
    }
    let snapped = snap_down(topo, c, x);
    if snapped == 0.0 {
        return (
            0.0,
            if x < spec.min_a {
                Binding::MinCurrent
            } else {
                Binding::Step
            },
        );
    }
    if snapped < x - 1e-12 && binding == Binding::None {
        binding = Binding::Step;
    }
    (snapped, binding)
}

/// Apply the envelope. `explain` fills `Decision::reason` with one sentence per charger.
pub fn enforce(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    p: &EnvelopeParams,
    explain: bool,
) -> CoreResult<Decision> {
    ch.check(topo.n_chargers())?;
    nodes.check(topo.n_nodes())?;
    p.validate()?;
    let n = topo.n_chargers();
    let mut cnt = counting(topo, ch, nodes, p);
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
    for c in 0..n {
        let (x, b) = sanitise_request(topo, c, ch, p);
        cnt.s[c] = x;
        dec.binding[c] = b;
    }
    enforce_limits(topo, &mut cnt, &mut dec, None);
    finish(topo, ch, &cnt, &mut dec, explain);
    Ok(dec)
}

/// Lower setpoints until every constraint holds (or, where even 0 for the chargers it controls
/// cannot satisfy it, set those to 0). `protected` chargers (if any) are lowered last — unused by
/// the envelope itself.
pub(crate) fn enforce_limits(
    topo: &Topology,
    cnt: &mut Counting,
    dec: &mut Decision,
    _protected: Option<&[bool]>,
) {
    let nn = topo.n_nodes();
    let mut loads = NodeLoads::new(nn);
    let mut scratch = NodeLoads::new(1);
    let mut exempt = vec![[false; 5]; nn];
    let sub = subtree_other(topo, cnt);
    let mut rounds = 0;
    loop {
        node_loads(topo, cnt, &mut loads);
        let viol = find_violations(topo, &loads, &exempt);
        if viol.is_empty() {
            break;
        }
        rounds += 1;
        let last_resort = rounds > 50;
        for (n, k) in viol {
            // Earlier fixes in this round may already have cured this one.
            let v = single_node_value(topo, cnt, &sub, n, k, &mut scratch);
            let (_, limit) = constraint_value(topo, &loads, n, k);
            if !violated(v, limit) {
                continue;
            }
            let mut members: Vec<usize> = topo
                .chargers_below(n)
                .iter()
                .copied()
                .filter(|&c| cnt.s[c] > 0.0 && (last_resort || contributes(topo, c, k)))
                .collect();
            if members.is_empty() && matches!(k, Constraint::Unbalance(_, _)) {
                // Nothing that helps directly is still on: lower everything below the node.
                members = topo
                    .chargers_below(n)
                    .iter()
                    .copied()
                    .filter(|&c| cnt.s[c] > 0.0)
                    .collect();
            }
            let mut saved: Vec<f64> = members.iter().map(|&c| cnt.s[c]).collect();
            for &c in &members {
                cnt.s[c] = 0.0;
            }
            let mut floor = single_node_value(topo, cnt, &sub, n, k, &mut scratch);
            if violated(floor, limit) && matches!(k, Constraint::Unbalance(_, _)) {
                // Lowering the high phase alone cannot do it: cap everything below the node.
                for (j, &c) in members.iter().enumerate() {
                    cnt.s[c] = saved[j];
                }
                members = topo
                    .chargers_below(n)
                    .iter()
                    .copied()
                    .filter(|&c| cnt.s[c] > 0.0)
                    .collect();
                saved = members.iter().map(|&c| cnt.s[c]).collect();
                for &c in &members {
                    cnt.s[c] = 0.0;
                }
                floor = single_node_value(topo, cnt, &sub, n, k, &mut scratch);
            }
            let stale = cnt.other_stale[n];
            let code = match k {
                Constraint::Phase(_) if stale => Binding::StaleTelemetry,
                Constraint::Phase(_) => Binding::NodePhase,
                Constraint::Power if stale => Binding::StaleTelemetry,
                Constraint::Power => Binding::NodePower,
                Constraint::Unbalance(_, _) => Binding::Unbalance,
            };
            let phase = match k {
                Constraint::Phase(p) | Constraint::Unbalance(p, _) => Some(p),
                Constraint::Power => None,
            };
            if violated(floor, limit) {
                // Even 0 cannot satisfy it: everything it controls stays at 0. Unbalance may still
                // be cured by lowering other chargers, so it is exempted only once all are at 0.
                let all_off = topo.chargers_below(n).iter().all(|&c| cnt.s[c] == 0.0);
                if !matches!(k, Constraint::Unbalance(_, _)) || all_off {
                    exempt[n][exempt_slot(k)] = true;
                }
                for &c in &members {
                    dec.binding[c] = code;
                    dec.binding_node[c] = Some(n);
                    dec.binding_phase[c] = phase;
                    dec.binding_value[c] = floor;
                    dec.binding_limit[c] = limit;
                }
                if members.is_empty() && !last_resort {
                    // Nothing controllable contributes; nothing more can be done here.
                }
                continue;
            }
            // Bisection on a common cap: the largest level that satisfies the constraint.
            let mut lo = 0.0;
            let mut hi = saved.iter().copied().fold(0.0, f64::max);
            for _ in 0..60 {
                let mid = 0.5 * (lo + hi);
                for (j, &c) in members.iter().enumerate() {
                    cnt.s[c] = saved[j].min(mid);
                }
                let v = single_node_value(topo, cnt, &sub, n, k, &mut scratch);
                if v <= limit {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            for (j, &c) in members.iter().enumerate() {
                let capped = saved[j].min(lo);
                let snapped = snap_down(topo, c, capped);
                cnt.s[c] = snapped;
                if snapped < saved[j] {
                    dec.binding[c] = code;
                    dec.binding_node[c] = Some(n);
                    dec.binding_phase[c] = phase;
                    dec.binding_limit[c] = limit;
                }
            }
        }
        if rounds > 60 {
            // Cannot happen for monotone constraints; as a last guard pause everything still
            // contributing to a violation.
            node_loads(topo, cnt, &mut loads);
            for (n, k) in find_violations(topo, &loads, &exempt) {
                for &c in topo.chargers_below(n) {
                    if cnt.s[c] > 0.0 {
                        cnt.s[c] = 0.0;
                        dec.binding[c] = Binding::NodePhase;
                        dec.binding_node[c] = Some(n);
                    }
                }
                exempt[n][exempt_slot(k)] = true;
            }
        }
    }
    // Values of the binding constraints after the fix, for the reasons.
    for c in 0..topo.n_chargers() {
        if let Some(n) = dec.binding_node[c] {
            if dec.binding_value[c].is_nan() {
                let k = match dec.binding[c] {
                    Binding::NodePower => Constraint::Power,
                    Binding::Unbalance => Constraint::Unbalance(0, 0),
                    Binding::StaleTelemetry if dec.binding_phase[c].is_none() => Constraint::Power,
                    _ => Constraint::Phase(dec.binding_phase[c].unwrap_or(0)),
                };
                let (v, l) = constraint_value(topo, &loads, n, k);
                dec.binding_value[c] = v;
                dec.binding_limit[c] = l;
            }
        }
    }
}

pub(crate) fn finish(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    cnt: &Counting,
    dec: &mut Decision,
    explain: bool,
) {
    let n = topo.n_chargers();
    for c in 0..n {
        let spec = &topo.chargers[c];
        let x = cnt.s[c];
        match spec.kind {
            ChargerKind::Ac => {
                dec.setpoint_a[c] = x;
                dec.setpoint_w[c] = x * spec.voltage_v * spec.wiring.terminals() as f64;
            }
            ChargerKind::Dc => {
                dec.setpoint_a[c] = x;
                dec.setpoint_w[c] = spec.dc_power_w(x);
            }
        }
        if dec.binding[c] == Binding::None {
            if ch.profile_unknown[c] {
                dec.binding[c] = Binding::UnknownProfile;
            } else if cnt.held_unconfirmed[c] && cnt.held[c][0] > x {
                dec.binding[c] = Binding::UnconfirmedDecrease;
            }
        }
    }
    if explain {
        dec.reason = (0..n).map(|c| reason(topo, cnt, dec, c)).collect();
    }
}

fn fmt_a(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{:.0}", x)
    } else {
        format!("{:.1}", x)
    }
}

/// One human sentence per charger, e.g. "held at 16 A: feeder F2 phase L1 at 63 of 63 A".
pub(crate) fn reason(topo: &Topology, cnt: &Counting, dec: &Decision, c: usize) -> String {
    let spec = &topo.chargers[c];
    let mut s = String::new();
    let head = if spec.kind == ChargerKind::Dc {
        format!("{} W", fmt_a(dec.setpoint_w[c]))
    } else {
        format!("{} A", fmt_a(dec.setpoint_a[c]))
    };
    let lead = if dec.setpoint_a[c] > 0.0 {
        format!("held at {head}")
    } else {
        "paused".to_string()
    };
    let node_desc = |n: usize| {
        let node = &topo.nodes[n];
        format!("{} {}", node.kind, node.id)
    };
    let _ = match dec.binding[c] {
        Binding::None => write!(s, "{head}: as requested"),
        Binding::Demand => write!(s, "{lead}: no energy wanted"),
        Binding::Plan => write!(s, "{lead}: plan target"),
        Binding::Admission => write!(
            s,
            "{lead}: not admitted (more urgent sessions take the minimum current first)"
        ),
        Binding::Hysteresis => write!(s, "{lead}: minimum off time or switch cap"),
        Binding::Disconnected => write!(s, "{lead}: no vehicle connected"),
        Binding::Fault => write!(s, "{lead}: charger faulted"),
        Binding::ChargerMax => write!(s, "{lead}: charger maximum {} A", fmt_a(spec.max_a)),
        Binding::MinCurrent => write!(
            s,
            "{lead}: below the minimum current {} A",
            fmt_a(spec.min_a)
        ),
        Binding::Step => write!(s, "{lead}: charger accepts only its allowed steps"),
        Binding::Ramp => write!(s, "{lead}: ramp limit"),
        Binding::NodePhase | Binding::StaleTelemetry | Binding::NodePower | Binding::Unbalance => {
            let n = dec.binding_node[c].unwrap_or(0);
            let ph = dec.binding_phase[c]
                .map(|p| topo.phase_names[p].as_str())
                .unwrap_or("");
            let (v, l) = (dec.binding_value[c], dec.binding_limit[c]);
            let stale = if dec.binding[c] == Binding::StaleTelemetry {
                " (non-charger load stale: counted at its maximum)"
            } else {
                ""
            };
            match dec.binding[c] {
                Binding::NodePower => {
                    write!(s, "{lead}: {} at {:.1} of {:.1} kW", node_desc(n), v, l)
                }
                Binding::Unbalance => write!(
                    s,
                    "{lead}: {} unbalance (phase {ph} highest) at {} of {} A",
                    node_desc(n),
                    fmt_a(v),
                    fmt_a(l)
                ),
                _ if dec.binding_phase[c].is_none() => {
                    write!(
                        s,
                        "{lead}: {} at {:.1} of {:.1} kW{stale}",
                        node_desc(n),
                        v,
                        l
                    )
                }
                _ => write!(
                    s,
                    "{lead}: {} phase {ph} at {} of {} A{stale}",
                    node_desc(n),
                    fmt_a(v),
                    fmt_a(l)
                ),
            }
        }
        Binding::UnconfirmedDecrease => write!(
            s,
            "{head}: counted at {} A until the charger confirms the decrease",
            fmt_a(cnt.held[c][0])
        ),
        Binding::UnknownProfile => write!(
            s,
            "{head}: counted at its maximum {} A (profile state unknown)",
            fmt_a(spec.max_a)
        ),
    };
    s
}
