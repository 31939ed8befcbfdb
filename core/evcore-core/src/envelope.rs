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
use crate::par;
use crate::topology::{phase_unit, ChargerKind, Halves, Topology, Wiring, N_PHASES};
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
    /// The part of `held` that does not come from the charger's own fresh measurement (a
    /// decrease not yet confirmed, an unknown profile state): what it may still draw even when
    /// it follows its new setpoint.
    pub held_cmd: Vec<[f64; N_PHASES]>,
    /// Largest fresh measured terminal current (0 when stale or none).
    pub measured_a: Vec<f64>,
    pub held_unconfirmed: Vec<bool>,
    /// The last setpoint sent (line A per terminal; 0 when unknown): where a node is measured
    /// over a limit, nothing below it rises above this.
    pub last_a: Vec<f64>,
    /// Non-charger load per node and phase as counted, and whether it is the stale maximum.
    pub other: Vec<[f64; N_PHASES]>,
    pub other_stale: Vec<bool>,
}

const TOL_A: f64 = 1e-9;
/// What is held alone must be over a limit by more than this (relative) before setpoints are
/// sized for chargers that follow them: the tolerance of `violated`, so that no over is left in
/// between. It was 2e-6, and held alone over by less (a bus following its share of an exactly
/// full 700 kW transformer, read 0.0005 A above it by the meter's rounding: 0.3 W over) was
/// paused by the plain rule, resumed, paused again, until its switch cap kept it off for the
/// night (review 67, depot: 180 kWh short).
pub(crate) const FOLLOW_TOL: f64 = TOL_A;

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
    let v = last_sent_raw_line_a(topo, c, ch);
    if v.is_nan() {
        topo.hot(c).max_a
    } else {
        v.max(0.0)
    }
}

/// The last setpoint sent as line amperes per terminal (DC converted); NaN when unknown.
fn last_sent_raw_line_a(topo: &Topology, c: usize, ch: &ChargerInputs<'_>) -> f64 {
    topo.hot(c).line_a(ch.last_sent_a[c], ch.last_sent_w[c])
}

/// The per-charger part of `Counting` for chargers `base..base + held.len()`.
struct ChargerCounts<'a> {
    base: usize,
    held: &'a mut [[f64; N_PHASES]],
    held_cmd: &'a mut [[f64; N_PHASES]],
    measured_a: &'a mut [f64],
    held_unconfirmed: &'a mut [bool],
    last_a: &'a mut [f64],
}

crate::par::split_rows!(ChargerCounts {
    held,
    held_cmd,
    measured_a,
    held_unconfirmed,
    last_a
});

/// What each charger of `out` holds regardless of its new setpoint (see `Counting`).
fn count_chargers(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    p: &EnvelopeParams,
    out: ChargerCounts<'_>,
) {
    let ChargerCounts {
        base,
        held,
        held_cmd,
        measured_a,
        held_unconfirmed,
        last_a,
    } = out;
    for i in 0..held.len() {
        let c = base + i;
        let spec = topo.hot(c);
        let nt = spec.terminals();
        let h = &mut held[i];
        // One reading of the last setpoint serves both: unknown counts as 0 for what may not
        // rise (`last_a`) and as the maximum for what an unconfirmed charger may hold.
        let last_raw = last_sent_raw_line_a(topo, c, ch);
        last_a[i] = if last_raw.is_nan() {
            0.0
        } else {
            last_raw.max(0.0)
        };
        if fresh(ch.measured_age_s[c], p.stale_after_s) {
            let m = [
                ch.measured_l1_a[c],
                ch.measured_l2_a[c],
                ch.measured_l3_a[c],
            ];
            for k in 0..nt {
                h[k] = sane_meas(m[k], spec.max_a);
                measured_a[i] = measured_a[i].max(h[k]);
            }
        }
        if ch.profile_unknown[c] {
            // Its maximum, or more if a fresh meter reading says so (a wrong site file must not
            // hide a current that is really flowing).
            for x in h.iter_mut().take(nt) {
                *x = x.max(spec.max_a);
            }
            held_cmd[i] = *h;
            continue;
        }
        if !ch.last_sent_confirmed[c] {
            let ls = if last_raw.is_nan() {
                spec.max_a
            } else {
                last_a[i]
            };
            if ls > 0.0 {
                held_unconfirmed[i] = true;
            }
            for k in 0..nt {
                h[k] = h[k].max(ls);
                held_cmd[i][k] = ls;
            }
        }
    }
}

pub(crate) fn counting(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    p: &EnvelopeParams,
    halves: Option<Halves>,
) -> Counting {
    let n = topo.n_chargers();
    let mut held = vec![[0.0; N_PHASES]; n];
    let mut held_cmd = vec![[0.0; N_PHASES]; n];
    let mut measured_a = vec![0.0f64; n];
    let mut held_unconfirmed = vec![false; n];
    let mut last_a = vec![0.0f64; n];
    {
        let all = ChargerCounts {
            base: 0,
            held: &mut held,
            held_cmd: &mut held_cmd,
            measured_a: &mut measured_a,
            held_unconfirmed: &mut held_unconfirmed,
            last_a: &mut last_a,
        };
        match halves {
            Some(h) => {
                let (first, second) = all.split_at(h.charger_at);
                par::join(
                    true,
                    || count_chargers(topo, ch, p, first),
                    || count_chargers(topo, ch, p, second),
                );
            }
            None => count_chargers(topo, ch, p, all),
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
        held_cmd,
        measured_a,
        held_unconfirmed,
        last_a,
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
        // The plain square root is as exact as `hypot` for finite amperes far from overflow
        // (within an ulp) and several times faster. An infinite current counted as it is (an
        // absurd measurement: the invariants hold for any input) makes a component infinite or
        // NaN (inf x 0 on the phase whose unit phasor has no imaginary part), and the root NaN,
        // which no limit check catches: it counts as infinite, as `hypot` takes it. Before
        // (e2c95f3 to this), an infinite building load on L1 passed every check of its node
        // (property test seed 4734383080977946574: a charger left on under an infinite
        // unbalance).
        let (re, im) = (self.re[n][p], self.im[n][p]);
        let m = (re * re + im * im).sqrt();
        if m.is_nan() {
            f64::INFINITY
        } else {
            m
        }
    }
}

#[inline]
/// What charger `c` counts at on its every terminal whatever its setpoint: below this its
/// setpoint changes no node's counted load.
fn held_floor(topo: &Topology, cnt: &Counting, c: usize) -> f64 {
    let nt = topo.hot(c).terminals();
    cnt.held[c][..nt]
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
}

fn terminal_counted(cnt: &Counting, c: usize, k: usize) -> f64 {
    cnt.s[c].max(cnt.held[c][k])
}

/// Add the charger's terminal currents, given by `current(cnt, charger, terminal)` (each taken
/// once), at node `n`.
#[inline]
fn add_charger_as(
    topo: &Topology,
    cnt: &Counting,
    c: usize,
    n: usize,
    loads: &mut NodeLoads,
    current: impl Fn(&Counting, usize, usize) -> f64,
) {
    let spec = topo.hot(c);
    let nt = spec.terminals();
    let mut t = [0.0; N_PHASES];
    for (k, tk) in t.iter_mut().enumerate().take(nt) {
        *tk = current(cnt, c, k);
    }
    let (re, im) = (&mut loads.re[n], &mut loads.im[n]);
    for e in topo.terminal_entries(c) {
        let i = t[e.terminal];
        re[e.phase] += i * e.re;
        im[e.phase] += i * e.im;
    }
    let v = spec.watts_per_terminal_a();
    let pw = &mut loads.power_w[n];
    for &tk in &t[..nt] {
        *pw += tk * v;
    }
    if spec.single_phase_car {
        let h = spec.phase(0);
        let spc = &mut loads.spc[n][h];
        for k in 0..nt {
            let l = spec.phase(k);
            if l != h {
                spc[l] += t[k];
            }
        }
    }
}

/// Counted loads of every node: chargers added at their parent, then summed up the tree.
pub(crate) fn node_loads(topo: &Topology, cnt: &Counting, loads: &mut NodeLoads) {
    let nn = topo.n_nodes();
    let unit = phase_unit();
    for n in 0..nn {
        let mut re = [0.0; N_PHASES];
        let mut im = [0.0; N_PHASES];
        let mut pw = 0.0;
        for (p, &(c, s)) in unit.iter().enumerate() {
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
        add_charger_as(topo, cnt, c, topo.hot(c).parent(), loads, terminal_counted);
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

/// Violated constraints, deepest nodes first (a cut at a circuit may cure its feeder; a cut at
/// the feeder first would take more than needed from the circuit's chargers); per-phase and kW
/// limits first, unbalance only once those hold (lowering a charger can raise unbalance, never a
/// line current).
fn find_violations(
    topo: &Topology,
    loads: &NodeLoads,
    exempt: &[[bool; 5]],
) -> Vec<(usize, Constraint)> {
    let mut out = Vec::new();
    for &n in topo.node_order().iter().rev() {
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
    for &n in topo.node_order().iter().rev() {
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
    let unit = phase_unit();
    for n in 0..nn {
        for (p, &(c, s)) in unit.iter().enumerate() {
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
    single_node_value_as(topo, cnt, sub, n, k, scratch, terminal_counted)
}

/// As `single_node_value`, with the chargers' terminal currents given by `current`.
fn single_node_value_as(
    topo: &Topology,
    cnt: &Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
    scratch: &mut NodeLoads,
    current: fn(&Counting, usize, usize) -> f64,
) -> f64 {
    scratch.re[0] = sub.re[n];
    scratch.im[0] = sub.im[n];
    scratch.power_w[0] = sub.w[n];
    scratch.spc[0] = [[0.0; N_PHASES]; N_PHASES];
    for &c in topo.chargers_below(n) {
        add_charger_as(topo, cnt, c, 0, scratch, current);
    }
    match k {
        Constraint::Phase(p) => scratch.line_a(0, p),
        Constraint::Power => scratch.power_w[0] / 1000.0,
        Constraint::Unbalance(_, _) => unbalance_of(scratch, 0, topo.node_has_line_to_line(n)).0,
    }
}

/// A phase or kW value at node `n` as `node_loads` counts it (every charger at the larger of its
/// setpoint and what it holds; non-charger load as counted), from the chargers below it alone.
pub(crate) fn held_value_at(
    topo: &Topology,
    cnt: &Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
) -> f64 {
    single_node_value(topo, cnt, sub, n, k, &mut NodeLoads::new(1))
}

/// A charger that follows its new setpoint draws at most it, plus what it may hold for reasons
/// other than its own measurement (an unconfirmed decrease, an unknown profile state).
#[inline]
fn terminal_followed(cnt: &Counting, c: usize, k: usize) -> f64 {
    cnt.s[c].max(cnt.held_cmd[c][k])
}

/// A phase or kW value at node `n` when every charger below it follows its new setpoint (their
/// measurements left out); non-charger load as counted.
fn single_node_followed(
    topo: &Topology,
    cnt: &Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
    scratch: &mut NodeLoads,
) -> f64 {
    single_node_value_as(topo, cnt, sub, n, k, scratch, terminal_followed)
}

/// Constraint `k`'s value at node `n` with the chargers `off` at 0 (restored on return).
fn value_with_off(
    topo: &Topology,
    cnt: &mut Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
    off: &[usize],
    scratch: &mut NodeLoads,
) -> f64 {
    let saved: Vec<f64> = off.iter().map(|&c| cnt.s[c]).collect();
    for &c in off {
        cnt.s[c] = 0.0;
    }
    let v = single_node_value(topo, cnt, sub, n, k, scratch);
    for (&c, &x) in off.iter().zip(&saved) {
        cnt.s[c] = x;
    }
    v
}

/// Whether constraint `k` of node `n` is over its limit beyond the followed rule's tolerance
/// on what is held alone: every charger below the node at 0.
fn held_alone_over(
    topo: &Topology,
    cnt: &mut Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
    limit: f64,
    scratch: &mut NodeLoads,
) -> bool {
    let v = value_with_off(topo, cnt, sub, n, k, topo.chargers_below(n), scratch);
    v > limit + FOLLOW_TOL * (1.0 + limit.abs())
}

/// Whether node `n`'s counted unbalance is over `limit` at a pair of lines whose contributors
/// (the chargers lowering which helps that pair), at 0, would bring it within.
fn contributors_cure(
    topo: &Topology,
    cnt: &mut Counting,
    sub: &SubtreeOther,
    n: usize,
    limit: f64,
    scratch: &mut NodeLoads,
) -> bool {
    let v = single_node_value(topo, cnt, sub, n, Constraint::Unbalance(0, 0), scratch);
    if !violated(v, limit) {
        return false;
    }
    let (_, h, l) = unbalance_of(scratch, 0, topo.node_has_line_to_line(n));
    let k = Constraint::Unbalance(h, l);
    let members: Vec<usize> = topo
        .chargers_below(n)
        .iter()
        .copied()
        .filter(|&c| cnt.s[c] > 0.0 && contributes(topo, c, k))
        .collect();
    !members.is_empty()
        && !violated(
            value_with_off(topo, cnt, sub, n, k, &members, scratch),
            limit,
        )
}

/// The largest common cap `x` such that constraint `k` of node `n` holds (`value <= limit`) with
/// every member `members.0[j]` at `min(members.1[j], x)` (they are at 0 on entry, where the
/// value is `floor`; they are left at their capped values). A phase or kW constraint is solved
/// exactly (`piecewise_cap`) and the solve checked by counting the node; an unbalance
/// constraint, or a solve the count does not confirm, goes by bisection (60 counts of the node).
#[allow(clippy::too_many_arguments)]
fn common_cap(
    topo: &Topology,
    cnt: &mut Counting,
    sub: &SubtreeOther,
    n: usize,
    k: Constraint,
    members: (&[usize], &[f64]),
    floor: f64,
    limit: f64,
) -> f64 {
    let (members, saved) = members;
    let mut scratch = NodeLoads::new(1);
    let hi = saved.iter().copied().fold(0.0, f64::max);
    let value_at = |cnt: &mut Counting, x: f64, scratch: &mut NodeLoads| {
        for (j, &c) in members.iter().enumerate() {
            cnt.s[c] = saved[j].min(x);
        }
        single_node_value(topo, cnt, sub, n, k, scratch)
    };
    let start = match k {
        Constraint::Phase(p) => {
            // The node's line phasor with every member at 0 (the count `floor` came from).
            value_at(cnt, 0.0, &mut scratch);
            Some((scratch.re[0][p], scratch.im[0][p]))
        }
        Constraint::Power => Some((floor, 0.0)),
        Constraint::Unbalance(_, _) => None,
    };
    if let Some(x) = start.and_then(|at0| piecewise_cap(topo, cnt, k, (members, saved), at0, limit))
    {
        // Rounding may put the solved cap a hair over: step down a few ulps before giving up.
        let mut x = x.min(hi);
        if !(x > 0.0) {
            return 0.0; // over at 0 already (within the tolerance), and rising with x
        }
        for _ in 0..4 {
            if value_at(cnt, x, &mut scratch) <= limit {
                return x;
            }
            x -= x.abs() * 4.0 * f64::EPSILON + f64::MIN_POSITIVE;
            if !(x > 0.0) {
                break;
            }
        }
    }
    let (mut lo, mut hi) = (0.0, hi);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if value_at(cnt, mid, &mut scratch) <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `common_cap`'s exact solve of a phase or kW constraint: the first `x` at which the value
/// reaches `limit` (`None` if it never does, or the inputs are not finite). Each member terminal
/// with coefficient `a` on the constraint (complex for a phase: its share of the line phasor)
/// adds `a · (clamp(x, held, max(held, saved)) − held)` to the value at 0 (`at0`: the line
/// phasor, or the kW as `(kW, 0)`), so the value is piecewise linear in `x` (a kW; a phase's
/// phasor, whose magnitude is found on each piece from a quadratic).
fn piecewise_cap(
    topo: &Topology,
    cnt: &Counting,
    k: Constraint,
    members: (&[usize], &[f64]),
    at0: (f64, f64),
    limit: f64,
) -> Option<f64> {
    let (members, saved) = members;
    let phase = match k {
        Constraint::Phase(p) => Some(p),
        Constraint::Power => None,
        Constraint::Unbalance(_, _) => return None,
    };
    // Slope changes: `+a` where a terminal starts to follow `x`, `−a` where it reaches its cap.
    let mut events: Vec<(f64, f64, f64)> = Vec::with_capacity(members.len() * 2 * N_PHASES);
    for (j, &c) in members.iter().enumerate() {
        let spec = topo.hot(c);
        let held = &cnt.held[c];
        let mut add = |t: usize, re: f64, im: f64| {
            let (lo, up) = (held[t], saved[j]);
            if up > lo {
                events.push((lo, re, im));
                events.push((up, -re, -im));
            }
        };
        match phase {
            Some(p) => {
                for e in topo.terminal_entries(c) {
                    if e.phase == p {
                        add(e.terminal, e.re, e.im);
                    }
                }
            }
            None => {
                for t in 0..spec.terminals() {
                    add(t, spec.watts_per_terminal_a() / 1000.0, 0.0);
                }
            }
        }
    }
    let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    if !finite(&[at0.0, at0.1, limit]) || events.iter().any(|e| !finite(&[e.0, e.1, e.2])) {
        return None;
    }
    let value = |re: f64, im: f64| match phase {
        Some(_) => (re * re + im * im).sqrt(),
        None => re,
    };
    if !(value(at0.0, at0.1) <= limit) {
        return Some(0.0);
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut x, (mut re, mut im), (mut sre, mut sim)) = (0.0, at0, (0.0, 0.0));
    for &(at, dre, dim) in &events {
        if at > x {
            let d = at - x;
            let (re_at, im_at) = (re + sre * d, im + sim * d);
            if value(re_at, im_at) > limit {
                // The root on this piece: kW linear; a phase `|A + B t| = limit`, with
                // `|A| <= limit`: `t = (L² − |A|²) / (b + sqrt(b² + |B|² (L² − |A|²)))`.
                let t = match phase {
                    None => (limit - re) / sre,
                    Some(_) => {
                        let room = (limit * limit - (re * re + im * im)).max(0.0);
                        let b = re * sre + im * sim;
                        let bb = sre * sre + sim * sim;
                        let den = b + (b * b + bb * room).sqrt();
                        if den > 0.0 {
                            room / den
                        } else {
                            return None;
                        }
                    }
                };
                return (t.is_finite() && t >= 0.0).then_some(x + t.min(d));
            }
            x = at;
            re = re_at;
            im = im_at;
        }
        sre += dre;
        sim += dim;
    }
    None // never over on these pieces (leave it to the bisection)
}

/// Whether a session that made `switches` pauses and resumes has reached the cap `max_switches`:
/// at or above a finite cap, or a count not known (NaN). No cap (`max_switches` infinite) is
/// never reached by a count, even an infinite one. (An infinite count passed a finite cap here
/// while the allocator held it: 16 A from the envelope, 0 A from the allocator.)
pub(crate) fn switch_cap_reached(switches: f64, max_switches: f64) -> bool {
    (!(switches < max_switches) && max_switches.is_finite()) || switches.is_nan()
}

/// Largest allowed setpoint not above `x` (line amps per terminal): 0, or on a step in
/// `[min_a, max_a]`. DC: `min_a` is the line current at `min_w`.
pub(crate) fn snap_down(topo: &Topology, c: usize, x: f64) -> f64 {
    let spec = topo.hot(c);
    if !(x > 0.0) {
        return 0.0;
    }
    let x = x.min(spec.max_a);
    if x + 1e-12 < spec.min_a {
        return 0.0;
    }
    // DC: a line current that only feeds the auxiliary load delivers no power: that is off.
    if spec.kind == ChargerKind::Dc && !(spec.dc_power_w(x) > 0.0) {
        return 0.0;
    }
    if !spec.has_steps {
        return x.max(spec.min_a);
    }
    let mut best = 0.0;
    for &s in &topo.chargers[c].steps_a {
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
    sanitise_requested(topo, c, ch.requested_a[c], ch.requested_w[c], ch, p)
}

/// `sanitise_request` with the request given (`requested_a`, `requested_w`: the charger's
/// entries of those columns; the other columns from `ch`).
pub(crate) fn sanitise_requested(
    topo: &Topology,
    c: usize,
    requested_a: f64,
    requested_w: f64,
    ch: &ChargerInputs<'_>,
    p: &EnvelopeParams,
) -> (f64, Binding) {
    let spec = topo.hot(c);
    if ch.faulted[c] {
        return (0.0, Binding::Fault);
    }
    if !ch.connected[c] {
        return (0.0, Binding::Disconnected);
    }
    let mut binding = Binding::None;
    let mut x = match spec.kind {
        ChargerKind::Ac => requested_a,
        ChargerKind::Dc => {
            let w = requested_w;
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
        if switch_cap_reached(ch.switches[c], p.max_switches) {
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
    enforce_split(topo, ch, nodes, p, explain, par::halves(topo, true))
}

/// `enforce` with its counting split into `halves` on two threads (`None`: one thread). The
/// decision is the same either way, bit for bit.
pub(crate) fn enforce_split(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    nodes: &NodeInputs<'_>,
    p: &EnvelopeParams,
    explain: bool,
    halves: Option<Halves>,
) -> CoreResult<Decision> {
    ch.check(topo.n_chargers())?;
    nodes.check(topo.n_nodes())?;
    p.validate()?;
    let n = topo.n_chargers();
    let mut cnt = counting(topo, ch, nodes, p, halves);
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
    enforce_limits(topo, &mut cnt, &mut dec, None, halves);
    finish(topo, ch, &cnt, &mut dec, explain, halves);
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
    halves: Option<Halves>,
) {
    let nn = topo.n_nodes();
    let mut loads = NodeLoads::new(nn);
    let mut scratch = NodeLoads::new(1);
    let mut exempt = vec![[false; 5]; nn];
    let sub = subtree_other(topo, cnt);
    let mut rounds = 0;
    // Nodes whose unbalance, over on what is held alone, was sized to fit when followed (and
    // exempted), and nodes where that did not last: there the plain rule (all below at 0).
    let mut followed_unb: Vec<usize> = Vec::new();
    let mut no_follow = vec![false; nn];
    'settle: loop {
        node_loads(topo, cnt, &mut loads);
        let viol = find_violations(topo, &loads, &exempt);
        if viol.is_empty() {
            // A later fix (a node above or below lowering chargers below one of these) may
            // have broken a followed unbalance fit: pause all below that node then. Or it may
            // have moved the worst pair of lines to one that lowering cures: lower as usual
            // then (a second call on the output would). Each node once; settle again.
            let mut again = false;
            for &n in &followed_unb {
                let k = Constraint::Unbalance(0, 0);
                let limit = topo.nodes[n].unbalance_limit_a.unwrap_or(f64::INFINITY);
                if violated(
                    single_node_followed(topo, cnt, &sub, n, k, &mut scratch),
                    limit,
                ) {
                    no_follow[n] = true;
                    again = true;
                    // The high line, for the reason.
                    single_node_value(topo, cnt, &sub, n, k, &mut scratch);
                    let (_, h, _) = unbalance_of(&scratch, 0, topo.node_has_line_to_line(n));
                    for &c in topo.chargers_below(n) {
                        if cnt.s[c] > 0.0 {
                            cnt.s[c] = 0.0;
                            dec.binding[c] = Binding::Unbalance;
                            dec.binding_node[c] = Some(n);
                            dec.binding_phase[c] = Some(h);
                            dec.binding_value[c] = f64::NAN;
                            dec.binding_limit[c] = limit;
                        }
                    }
                } else if contributors_cure(topo, cnt, &sub, n, limit, &mut scratch) {
                    no_follow[n] = true;
                    again = true;
                    exempt[n][exempt_slot(k)] = false;
                }
            }
            followed_unb.retain(|&n| !no_follow[n]);
            if again {
                continue 'settle;
            }
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
            let unb = matches!(k, Constraint::Unbalance(_, _));
            if violated(floor, limit)
                && (unb || topo.nodes[n].unbalance_limit_a.is_none())
                && !no_follow[n]
                && floor > limit + FOLLOW_TOL * (1.0 + limit.abs())
                && (!unb || held_alone_over(topo, cnt, &sub, n, k, limit, &mut scratch))
            {
                // Even 0 cannot bring the counted load within the limit: what is held (measured
                // draw above all) is over it. Pausing everything would only bring everything
                // back next tick (a sawtooth). If the node fits when every charger below it
                // follows its new setpoint, lower the members to a common cap that makes it fit
                // that way, keep the constraint out of later rounds (its counted value cannot
                // hold) and name it, with its measured value, for every member.
                for (j, &c) in members.iter().enumerate() {
                    if unb {
                        // Nothing rises (below): sized on that, or a charger on the low line
                        // counted at its request would make room it never takes.
                        saved[j] = saved[j].min(cnt.last_a[c]);
                    }
                    cnt.s[c] = saved[j];
                }
                let fits = |cnt: &Counting, scratch: &mut NodeLoads| {
                    !violated(single_node_followed(topo, cnt, &sub, n, k, scratch), limit)
                };
                let fixed = if fits(cnt, &mut scratch) {
                    true // as requested, it fits when followed
                } else {
                    for &c in &members {
                        cnt.s[c] = 0.0;
                    }
                    if fits(cnt, &mut scratch) {
                        // Bisection on a common cap: the largest that fits when followed.
                        let mut lo = 0.0;
                        let mut hi = saved.iter().copied().fold(0.0, f64::max);
                        for _ in 0..60 {
                            let mid = 0.5 * (lo + hi);
                            for (j, &c) in members.iter().enumerate() {
                                cnt.s[c] = saved[j].min(mid);
                            }
                            if fits(cnt, &mut scratch) {
                                lo = mid;
                            } else {
                                hi = mid;
                            }
                        }
                        for (j, &c) in members.iter().enumerate() {
                            cnt.s[c] = snap_down(topo, c, saved[j].min(lo));
                        }
                        true
                    } else {
                        false // members stay at 0
                    }
                };
                if fixed {
                    // While it is measured over, nothing below it rises: a charger that draws
                    // more than it was sent (the cause, most likely) must not be joined by
                    // others starting or rising on the room its setpoint leaves.
                    for &c in &members {
                        cnt.s[c] = snap_down(topo, c, cnt.s[c].min(cnt.last_a[c]));
                    }
                }
                // Unbalance is not monotone in the setpoints (lowering a charger on the low
                // line raises it): what the caps and steps left must fit when followed too, or
                // the plain rule applies (every member at 0).
                let fixed = fixed && (!unb || fits(cnt, &mut scratch));
                if unb && !fixed {
                    for &c in &members {
                        cnt.s[c] = 0.0;
                    }
                }
                if fixed {
                    // Unbalance: lowering may still cure the counted value at another pair of
                    // lines (a charger kept on the low line holds it up): then the next round
                    // lowers those as usual; exempt only when it cannot.
                    if !unb || !contributors_cure(topo, cnt, &sub, n, limit, &mut scratch) {
                        if unb {
                            followed_unb.push(n);
                        }
                        exempt[n][exempt_slot(k)] = true;
                    }
                    let measured = single_node_value(topo, cnt, &sub, n, k, &mut scratch);
                    for &c in &members {
                        if dec.binding_node[c] == Some(n) && violated(dec.binding_value[c], limit) {
                            continue; // another phase of this node, over too, named first
                        }
                        dec.binding[c] = code;
                        dec.binding_node[c] = Some(n);
                        dec.binding_phase[c] = phase;
                        dec.binding_value[c] = measured;
                        dec.binding_limit[c] = limit;
                    }
                    continue;
                }
                // Not even then (held for other reasons, non-charger load): as below.
            }
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
            // The largest common cap that satisfies the constraint (members are at 0 now).
            let lo = common_cap(topo, cnt, &sub, n, k, (&members, &saved), floor, limit);
            for (j, &c) in members.iter().enumerate() {
                // Below what it holds on every terminal anyway, a lower setpoint counts the same:
                // such a member (a car lowered to its share, still read at its old draw) keeps
                // its setpoint rather than being paused for nothing.
                let capped = saved[j].min(lo.max(held_floor(topo, cnt, c)));
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
    // Values of the binding constraints after the fix, for the reasons (chargers in a row often
    // name the same one: the last value is kept; each half keeps its own, the values are the
    // same).
    let values = |base: usize, value: &mut [f64], limit: &mut [f64]| {
        let mut last: Option<(usize, Constraint, (f64, f64))> = None;
        for i in 0..value.len() {
            let c = base + i;
            if let Some(n) = dec.binding_node[c] {
                if value[i].is_nan() {
                    let k = match dec.binding[c] {
                        Binding::NodePower => Constraint::Power,
                        Binding::Unbalance => Constraint::Unbalance(0, 0),
                        Binding::StaleTelemetry if dec.binding_phase[c].is_none() => {
                            Constraint::Power
                        }
                        _ => Constraint::Phase(dec.binding_phase[c].unwrap_or(0)),
                    };
                    let (v, l) = match last {
                        Some((ln, lk, vl)) if ln == n && lk == k => vl,
                        _ => {
                            let vl = constraint_value(topo, &loads, n, k);
                            last = Some((n, k, vl));
                            vl
                        }
                    };
                    value[i] = v;
                    limit[i] = l;
                }
            }
        }
    };
    let (value, limit) = (&mut dec.binding_value, &mut dec.binding_limit);
    match halves {
        Some(h) => {
            let (v0, v1) = value.split_at_mut(h.charger_at);
            let (l0, l1) = limit.split_at_mut(h.charger_at);
            par::join(true, || values(0, v0, l0), || values(h.charger_at, v1, l1));
        }
        None => values(0, value, limit),
    }
}

pub(crate) fn finish(
    topo: &Topology,
    ch: &ChargerInputs<'_>,
    cnt: &Counting,
    dec: &mut Decision,
    explain: bool,
    halves: Option<Halves>,
) {
    let n = topo.n_chargers();
    let all = Finished {
        base: 0,
        setpoint_a: &mut dec.setpoint_a,
        setpoint_w: &mut dec.setpoint_w,
        binding: &mut dec.binding,
    };
    match halves {
        Some(h) => {
            let (first, second) = all.split_at(h.charger_at);
            par::join(
                true,
                || finish_chargers(topo, ch, cnt, first),
                || finish_chargers(topo, ch, cnt, second),
            );
        }
        None => finish_chargers(topo, ch, cnt, all),
    }
    if explain {
        let reasons = dec_reasons(topo, cnt, dec, n, halves);
        dec.reason = reasons;
    }
}

/// One sentence per charger (`reason`), the two halves on two threads when `halves`.
fn dec_reasons(
    topo: &Topology,
    cnt: &Counting,
    dec: &Decision,
    n: usize,
    halves: Option<Halves>,
) -> Vec<String> {
    let sentences = |r: std::ops::Range<usize>| -> Vec<String> {
        r.map(|c| reason(topo, cnt, dec, c)).collect()
    };
    match halves {
        Some(h) => {
            let (mut first, second) = par::join(
                true,
                || sentences(0..h.charger_at),
                || sentences(h.charger_at..n),
            );
            first.extend(second);
            first
        }
        None => sentences(0..n),
    }
}

/// The decision's per-charger columns `finish` writes, for chargers `base..`.
struct Finished<'a> {
    base: usize,
    setpoint_a: &'a mut [f64],
    setpoint_w: &'a mut [f64],
    binding: &'a mut [Binding],
}

crate::par::split_rows!(Finished {
    setpoint_a,
    setpoint_w,
    binding
});

/// Setpoints (A, W) from the counted values, and the reasons that only the counting gives.
fn finish_chargers(topo: &Topology, ch: &ChargerInputs<'_>, cnt: &Counting, out: Finished<'_>) {
    let Finished {
        base,
        setpoint_a,
        setpoint_w,
        binding,
    } = out;
    for i in 0..setpoint_a.len() {
        let c = base + i;
        let spec = topo.hot(c);
        let x = cnt.s[c];
        match spec.kind {
            ChargerKind::Ac => {
                setpoint_a[i] = x;
                setpoint_w[i] = x * spec.voltage_v * spec.terminals() as f64;
            }
            ChargerKind::Dc => {
                setpoint_a[i] = x;
                setpoint_w[i] = spec.dc_power_w(x);
            }
        }
        if binding[i] == Binding::None {
            if ch.profile_unknown[c] {
                binding[i] = Binding::UnknownProfile;
            } else if cnt.held_unconfirmed[c] && cnt.held[c][0] > x {
                binding[i] = Binding::UnconfirmedDecrease;
            }
        }
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
        if node.kind == node.id {
            node.id.clone()
        } else {
            format!("{} {}", node.kind, node.id)
        }
    };
    let _ = match dec.binding[c] {
        Binding::None => write!(s, "{head}: as requested"),
        // With a setpoint, `demand` is the headroom reclaim: the vehicle draws less than it was
        // offered (a session that wants no energy is not charged at all).
        Binding::Demand if dec.setpoint_a[c] > 0.0 => write!(
            s,
            "{lead}: the vehicle draws only {} A (the rest is offered to others)",
            fmt_a(cnt.measured_a[c])
        ),
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
            // Over its limit on what is held alone (measured draw), yet this charger is on: its
            // setpoint is sized so that the node fits once the chargers follow their setpoints.
            let over = dec.setpoint_a[c] > 0.0 && violated(v, l);
            let lead = if over && dec.setpoint_a[c] < cnt.measured_a[c] - 0.05 {
                format!("lowered to {head} (drawing {} A)", fmt_a(cnt.measured_a[c]))
            } else {
                lead
            };
            let stale = if over {
                if dec.binding[c] == Binding::StaleTelemetry {
                    " measured, non-charger load stale (counted at its maximum): sized to fit when chargers follow their setpoints"
                } else {
                    " measured: sized to fit when chargers follow their setpoints"
                }
            } else {
                stale
            };
            match dec.binding[c] {
                Binding::NodePower => {
                    write!(
                        s,
                        "{lead}: {} at {:.1} of {:.1} kW{stale}",
                        node_desc(n),
                        v,
                        l
                    )
                }
                Binding::Unbalance => write!(
                    s,
                    "{lead}: {} unbalance (phase {ph} highest) at {} of {} A{}",
                    node_desc(n),
                    fmt_a(v),
                    fmt_a(l),
                    if over { stale } else { "" }
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
        Binding::UnknownProfile => {
            let counted = cnt.held[c].iter().copied().fold(0.0, f64::max);
            if counted > spec.max_a {
                write!(
                    s,
                    "{head}: counted at its measured {} A, above its maximum {} A (profile state unknown)",
                    fmt_a(counted),
                    fmt_a(spec.max_a)
                )
            } else {
                write!(
                    s,
                    "{head}: counted at its maximum {} A (profile state unknown)",
                    fmt_a(spec.max_a)
                )
            }
        }
    };
    s
}

#[cfg(test)]
pub(crate) mod tests {
    //! Envelope tests. `gen` builds random sites and inputs (NaN, inf, negative and absurd values
    //! included) and `Check` recomputes every node's counted line currents from the wiring alone,
    //! so the properties judge the envelope from outside its own bookkeeping.
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Case count for property tests: modest in CI, `PROPTEST_CASES` overrides.
    pub(crate) fn cases(default: u32) -> ProptestConfig {
        let n = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        ProptestConfig::with_cases(n)
    }

    /// splitmix64: a tiny deterministic generator driven by the proptest seed.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed)
        }
        pub(crate) fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        pub(crate) fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
        pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.unit()
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        pub(crate) fn chance(&mut self, p: f64) -> bool {
            self.unit() < p
        }
        /// Mostly `lo..hi`, sometimes 0, negative, NaN, ±inf or absurdly large.
        pub(crate) fn nasty(&mut self, lo: f64, hi: f64) -> f64 {
            match self.below(20) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => -self.range(0.0, hi),
                4 => 1e300,
                5 => 0.0,
                _ => self.range(lo, hi),
            }
        }
    }

    const PH: [&str; 3] = ["L1", "L2", "L3"];

    /// A random valid site: a tree up to 5 levels deep with three-phase (rotated), line-to-neutral,
    /// line-to-line and DC chargers, optional kW and unbalance caps, steps and other load.
    pub(crate) fn gen_site(r: &mut Rng, max_chargers: usize) -> Topology {
        let n_nodes = 1 + r.below(7);
        let mut nodes = Vec::new();
        let mut depth = vec![0usize];
        for i in 0..n_nodes {
            let mut node = json!({"id": format!("n{i}")});
            if i > 0 {
                let mut p = r.below(i);
                while depth[p] >= 4 {
                    p = r.below(i);
                }
                depth.push(depth[p] + 1);
                node["parent"] = json!(format!("n{p}"));
            }
            let lim: Vec<f64> = (0..3).map(|_| r.range(12.0, 120.0).round()).collect();
            node["phase_limit_a"] = json!(lim);
            if r.chance(0.3) {
                node["power_limit_kw"] = json!(r.range(4.0, 60.0));
            }
            if r.chance(0.25) {
                node["unbalance_limit_a"] = json!(r.range(10.0, 30.0));
            }
            if r.chance(0.3) {
                let o: Vec<f64> = (0..3).map(|_| r.range(0.0, 10.0)).collect();
                node["other_load_max_a"] = json!(o);
            }
            nodes.push(node);
        }
        let n_chargers = 1 + r.below(max_chargers);
        let mut chargers = Vec::new();
        for i in 0..n_chargers {
            let parent = format!("n{}", r.below(n_nodes));
            let mut c = json!({"id": format!("c{i}"), "parent": parent});
            let min_a = if r.chance(0.5) {
                6.0
            } else {
                r.range(6.0, 10.0)
            };
            let max_a = (min_a + r.range(0.0, 26.0)).min(32.0);
            match r.below(10) {
                0..=3 => {
                    let rot = r.below(3);
                    c["wiring"] = json!("three_phase");
                    c["phases"] = json!([PH[rot], PH[(rot + 1) % 3], PH[(rot + 2) % 3]]);
                    c["voltage_v"] = json!(230.0);
                    c["single_phase_car"] = json!(r.chance(0.5));
                }
                4..=5 => {
                    c["wiring"] = json!("line_to_neutral");
                    c["phases"] = json!([PH[r.below(3)]]);
                    c["voltage_v"] = json!(230.0);
                }
                6..=8 => {
                    let a = r.below(3);
                    c["wiring"] = json!("line_to_line");
                    c["phases"] = json!([PH[a], PH[(a + 1 + r.below(2)) % 3]]);
                    c["voltage_v"] = json!(400.0);
                }
                _ => {
                    c["kind"] = json!("dc");
                    c["wiring"] = json!("three_phase");
                    c["voltage_v"] = json!(230.0);
                    c["max_w"] = json!(r.range(3000.0, 20000.0));
                    if r.chance(0.5) {
                        c["min_w"] = json!(r.range(500.0, 2000.0));
                    }
                    c["efficiency"] = json!(r.range(0.85, 0.98));
                    c["aux_w"] = json!(r.range(0.0, 300.0));
                    chargers.push(c);
                    continue;
                }
            }
            c["min_a"] = json!(min_a);
            c["max_a"] = json!(max_a);
            if r.chance(0.2) {
                let mut steps = vec![min_a];
                let mut s = min_a;
                while s + 4.0 <= max_a {
                    s += 4.0;
                    steps.push(s);
                }
                c["steps_a"] = json!(steps);
            }
            chargers.push(c);
        }
        let v: Value = json!({"site": {"id": "prop"}, "nodes": nodes, "chargers": chargers});
        Topology::from_value(&v).expect("generated site must be valid")
    }

    /// Owned envelope inputs for one call.
    #[derive(Clone, Debug)]
    pub(crate) struct Inputs {
        pub req_a: Vec<f64>,
        pub req_w: Vec<f64>,
        pub m: [Vec<f64>; 3],
        pub m_age: Vec<f64>,
        pub last_a: Vec<f64>,
        pub last_w: Vec<f64>,
        pub confirmed: Vec<bool>,
        pub connected: Vec<bool>,
        pub faulted: Vec<bool>,
        pub unknown: Vec<bool>,
        pub on_since: Vec<f64>,
        pub off_since: Vec<f64>,
        pub switches: Vec<f64>,
        pub o: [Vec<f64>; 3],
        pub o_age: Vec<f64>,
    }

    impl Inputs {
        pub(crate) fn chargers(&self) -> ChargerInputs<'_> {
            ChargerInputs {
                requested_a: &self.req_a,
                requested_w: &self.req_w,
                measured_l1_a: &self.m[0],
                measured_l2_a: &self.m[1],
                measured_l3_a: &self.m[2],
                measured_age_s: &self.m_age,
                last_sent_a: &self.last_a,
                last_sent_w: &self.last_w,
                last_sent_confirmed: &self.confirmed,
                connected: &self.connected,
                faulted: &self.faulted,
                profile_unknown: &self.unknown,
                on_since_s: &self.on_since,
                off_since_s: &self.off_since,
                switches: &self.switches,
            }
        }
        pub(crate) fn nodes(&self) -> NodeInputs<'_> {
            NodeInputs {
                other_load_l1_a: &self.o[0],
                other_load_l2_a: &self.o[1],
                other_load_l3_a: &self.o[2],
                other_load_age_s: &self.o_age,
            }
        }
        /// Quiet inputs: nothing measured, nothing sent, everything connected.
        pub(crate) fn quiet(topo: &Topology) -> Self {
            let n = topo.n_chargers();
            let nn = topo.n_nodes();
            Inputs {
                req_a: vec![0.0; n],
                req_w: vec![0.0; n],
                m: [vec![0.0; n], vec![0.0; n], vec![0.0; n]],
                m_age: vec![1.0; n],
                last_a: vec![0.0; n],
                last_w: vec![0.0; n],
                confirmed: vec![true; n],
                connected: vec![true; n],
                faulted: vec![false; n],
                unknown: vec![false; n],
                on_since: vec![f64::NAN; n],
                off_since: vec![f64::NAN; n],
                switches: vec![0.0; n],
                o: [vec![0.0; nn], vec![0.0; nn], vec![0.0; nn]],
                o_age: vec![1.0; nn],
            }
        }
    }

    pub(crate) const NOW: f64 = 10_000.0;

    pub(crate) fn gen_inputs(r: &mut Rng, topo: &Topology) -> Inputs {
        let mut x = Inputs::quiet(topo);
        for c in 0..topo.n_chargers() {
            let spec = &topo.chargers[c];
            x.req_a[c] = r.nasty(0.0, 40.0);
            x.req_w[c] = r.nasty(0.0, 25_000.0);
            let draw = r.nasty(0.0, spec.max_a);
            for k in 0..3 {
                x.m[k][c] = if r.chance(0.8) {
                    draw
                } else {
                    r.nasty(0.0, spec.max_a)
                };
            }
            x.m_age[c] = match r.below(6) {
                0 => f64::NAN,
                1 => 600.0,
                2 => -1.0,
                _ => r.range(0.0, 30.0),
            };
            let on = r.chance(0.5);
            x.last_a[c] = if on { r.nasty(6.0, 32.0) } else { 0.0 };
            x.last_w[c] = if on { r.nasty(1000.0, 20_000.0) } else { 0.0 };
            x.confirmed[c] = r.chance(0.7);
            x.connected[c] = r.chance(0.85);
            x.faulted[c] = r.chance(0.05);
            x.unknown[c] = r.chance(0.05);
            x.on_since[c] = if on {
                NOW - r.range(0.0, 600.0)
            } else {
                f64::NAN
            };
            x.off_since[c] = if on {
                f64::NAN
            } else {
                NOW - r.range(0.0, 600.0)
            };
            x.switches[c] = match r.below(8) {
                0 => f64::NAN,
                1 => 10.0,
                _ => r.below(4) as f64,
            };
        }
        for n in 0..topo.n_nodes() {
            for k in 0..3 {
                x.o[k][n] = if r.chance(0.7) {
                    r.range(0.0, 8.0)
                } else {
                    r.nasty(0.0, 8.0)
                };
            }
            x.o_age[n] = match r.below(5) {
                0 => f64::INFINITY,
                1 => f64::NAN,
                _ => r.range(0.0, 30.0),
            };
        }
        x
    }

    pub(crate) fn gen_params(r: &mut Rng) -> EnvelopeParams {
        EnvelopeParams {
            now_s: NOW,
            stale_after_s: 60.0,
            min_off_s: if r.chance(0.5) { 0.0 } else { 120.0 },
            min_on_s: if r.chance(0.5) { 0.0 } else { 120.0 },
            max_switches: if r.chance(0.5) { f64::INFINITY } else { 3.0 },
            max_increase_a: if r.chance(0.7) {
                f64::INFINITY
            } else {
                r.range(0.0, 20.0)
            },
        }
    }

    /// The issue's counting rules, written out again from the site description.
    pub(crate) struct Check<'a> {
        pub topo: &'a Topology,
        pub x: &'a Inputs,
        pub p: EnvelopeParams,
    }

    impl Check<'_> {
        fn fresh(&self, age: f64) -> bool {
            age.is_finite() && (0.0..=self.p.stale_after_s).contains(&age)
        }
        /// Per-terminal current held regardless of the new setpoint.
        fn held(&self, c: usize) -> [f64; 3] {
            let s = &self.topo.chargers[c];
            let nt = s.wiring.terminals();
            let mut h = [0.0; 3];
            if self.fresh(self.x.m_age[c]) {
                for k in 0..nt {
                    let m = self.x.m[k][c];
                    h[k] = if m.is_nan() { s.max_a } else { m.abs() };
                }
            }
            if self.x.unknown[c] {
                for v in h.iter_mut().take(nt) {
                    *v = v.max(s.max_a);
                }
                return h;
            }
            if !self.x.confirmed[c] {
                let ls = match s.kind {
                    ChargerKind::Ac => self.x.last_a[c],
                    ChargerKind::Dc => {
                        let w = self.x.last_w[c];
                        if w.is_nan() {
                            f64::NAN
                        } else if w <= 0.0 {
                            0.0
                        } else {
                            (w.min(s.max_w) / s.efficiency + s.aux_w) / (3.0 * s.voltage_v)
                        }
                    }
                };
                let ls = if ls.is_nan() { s.max_a } else { ls.max(0.0) };
                for v in h.iter_mut().take(nt) {
                    *v = v.max(ls);
                }
            }
            h
        }
        /// What the charger may draw when it follows its new setpoint: the held part that is
        /// not its own fresh measurement (unconfirmed decrease, unknown profile state).
        fn held_cmd(&self, c: usize) -> [f64; 3] {
            if self.x.unknown[c] {
                return self.held(c);
            }
            if self.x.confirmed[c] {
                return [0.0; 3];
            }
            let mut x = self.x.clone();
            x.m_age[c] = f64::NAN;
            Check {
                topo: self.topo,
                x: &x,
                p: self.p,
            }
            .held(c)
        }
        /// The last setpoint sent as line amperes (DC converted; 0 when unknown): written out
        /// again, not taken from the envelope.
        fn last_line_a(&self, c: usize) -> f64 {
            let spec = &self.topo.chargers[c];
            let v = match spec.kind {
                ChargerKind::Ac => self.x.last_a[c],
                ChargerKind::Dc => {
                    let w = self.x.last_w[c];
                    if w.is_nan() || w <= 0.0 {
                        0.0
                    } else {
                        (w.min(spec.max_w) / spec.efficiency + spec.aux_w) / (3.0 * spec.voltage_v)
                    }
                }
            };
            if v.is_nan() {
                0.0
            } else {
                v.max(0.0)
            }
        }
        fn other(&self, n: usize) -> [f64; 3] {
            let max = self.topo.nodes[n].other_load_max_a;
            if !self.fresh(self.x.o_age[n]) {
                return max;
            }
            std::array::from_fn(|k| {
                let m = self.x.o[k][n];
                if m.is_nan() {
                    max[k]
                } else {
                    m.max(0.0)
                }
            })
        }
        fn below(&self, c: usize, n: usize) -> bool {
            let mut cur = Some(self.topo.chargers[c].parent);
            while let Some(i) = cur {
                if i == n {
                    return true;
                }
                cur = self.topo.nodes[i].parent;
            }
            false
        }
        fn unit(p: usize) -> (f64, f64) {
            let a = -2.0 * std::f64::consts::PI / 3.0 * p as f64;
            (a.cos(), a.sin())
        }
        /// Line current phasors, kW and worst-case unbalance at node `n` for setpoints `s`.
        pub(crate) fn node(&self, n: usize, s: &[f64]) -> ([f64; 3], f64, f64) {
            self.node_with(n, s, &|c| self.held(c))
        }
        /// As `node`, every charger below following its setpoint (measurements left out).
        pub(crate) fn node_followed(&self, n: usize, s: &[f64]) -> ([f64; 3], f64, f64) {
            self.node_with(n, s, &|c| self.held_cmd(c))
        }
        fn node_with(
            &self,
            n: usize,
            s: &[f64],
            held: &dyn Fn(usize) -> [f64; 3],
        ) -> ([f64; 3], f64, f64) {
            let v_ln = self.topo.voltage_ln_v;
            let mut re = [0.0; 3];
            let mut im = [0.0; 3];
            let mut w = 0.0;
            let mut drop = [[0.0; 3]; 3];
            let mut l2l = false;
            for m in 0..self.topo.n_nodes() {
                let mut cur = Some(m);
                let mut inside = false;
                while let Some(i) = cur {
                    inside |= i == n;
                    cur = self.topo.nodes[i].parent;
                }
                if inside {
                    let o = self.other(m);
                    for p in 0..3 {
                        let (ur, ui) = Self::unit(p);
                        re[p] += o[p] * ur;
                        im[p] += o[p] * ui;
                        w += o[p] * v_ln;
                    }
                }
            }
            for c in 0..self.topo.n_chargers() {
                if !self.below(c, n) {
                    continue;
                }
                let spec = &self.topo.chargers[c];
                let h = held(c);
                let t: Vec<f64> = (0..spec.wiring.terminals())
                    .map(|k| s[c].max(h[k]))
                    .collect();
                w += t.iter().sum::<f64>() * spec.voltage_v;
                match spec.wiring {
                    Wiring::LineToLine => {
                        l2l = true;
                        let (a, b) = (spec.phases[0], spec.phases[1]);
                        let ((ar, ai), (br, bi)) = (Self::unit(a), Self::unit(b));
                        let (dr, di) = (ar - br, ai - bi);
                        let m = dr.hypot(di);
                        re[a] += t[0] * dr / m;
                        im[a] += t[0] * di / m;
                        re[b] -= t[0] * dr / m;
                        im[b] -= t[0] * di / m;
                    }
                    _ => {
                        for (k, &p) in spec.phases.iter().enumerate() {
                            let (ur, ui) = Self::unit(p);
                            re[p] += t[k] * ur;
                            im[p] += t[k] * ui;
                        }
                        if spec.single_phase_car {
                            let hp = spec.phases[0];
                            for (k, &p) in spec.phases.iter().enumerate() {
                                if p != hp {
                                    drop[hp][p] += t[k];
                                }
                            }
                        }
                    }
                }
            }
            let mag: [f64; 3] = std::array::from_fn(|p| re[p].hypot(im[p]));
            let mut unb: f64 = 0.0;
            for hp in 0..3 {
                for lp in 0..3 {
                    if hp == lp {
                        continue;
                    }
                    let low = if l2l {
                        let off: f64 = (0..3).filter(|&x| x != lp).map(|x| drop[x][lp]).sum();
                        (mag[lp] - off).max(0.0)
                    } else {
                        mag[lp] - drop[hp][lp]
                    };
                    unb = unb.max(mag[hp] - low);
                }
            }
            (mag, w / 1000.0, unb)
        }

        /// Every invariant of the envelope for output `d`; returns the first failure.
        pub(crate) fn invariants(&self, d: &Decision) -> Result<(), String> {
            let topo = self.topo;
            let s = &d.setpoint_a;
            for (c, spec) in topo.chargers.iter().enumerate() {
                let x = s[c];
                if !(x.is_finite() && x >= 0.0) {
                    return Err(format!("charger {c}: setpoint {x}"));
                }
                if x > 0.0 {
                    if self.x.faulted[c] || !self.x.connected[c] {
                        return Err(format!("charger {c}: {x} A while faulted/disconnected"));
                    }
                    match spec.kind {
                        ChargerKind::Ac => {
                            let req = self.x.req_a[c];
                            if x < spec.min_a - 1e-9 || x > spec.max_a + 1e-9 {
                                return Err(format!(
                                    "charger {c}: {x} outside [{}, {}]",
                                    spec.min_a, spec.max_a
                                ));
                            }
                            if !spec.steps_a.is_empty()
                                && !spec.steps_a.iter().any(|&st| (st - x).abs() < 1e-9)
                            {
                                return Err(format!(
                                    "charger {c}: {x} not on a step {:?}",
                                    spec.steps_a
                                ));
                            }
                            if !(x <= req + 1e-9) {
                                return Err(format!("charger {c}: {x} above request {req}"));
                            }
                        }
                        ChargerKind::Dc => {
                            let w = d.setpoint_w[c];
                            if w > spec.max_w + 1e-6 || w < spec.min_w - 1e-6 {
                                return Err(format!(
                                    "dc charger {c}: {w} W outside [{}, {}]",
                                    spec.min_w, spec.max_w
                                ));
                            }
                            if !(w <= self.x.req_w[c] + 1e-6) {
                                return Err(format!(
                                    "dc charger {c}: {w} W above request {}",
                                    self.x.req_w[c]
                                ));
                            }
                        }
                    }
                }
            }
            let zero = vec![0.0; topo.n_chargers()];
            for n in 0..topo.n_nodes() {
                let node = &topo.nodes[n];
                let (mag, kw, unb) = self.node(n, s);
                let tol = |l: f64| 1e-6 * (1.0 + l.abs());
                let off_below = |f: &dyn Fn(usize) -> bool| {
                    (0..topo.n_chargers()).all(|c| !self.below(c, n) || !f(c) || s[c] == 0.0)
                };
                // Where what is held alone (0 for every charger below) is over a phase or kW
                // limit, the counted load cannot hold: then it must hold when every charger
                // below follows its setpoint (or everything contributing is 0).
                // (Not for a phase or kW limit of a node with an unbalance cap: there the plain
                // rule stays. The unbalance itself, over on what is held alone, may go either way.)
                let (mag0, kw0, unb0) = self.node(n, &zero);
                let (mag_f, kw_f, unb_f) = self.node_followed(n, s);
                let no_unb = node.unbalance_limit_a.is_none();
                // And there nothing below it rises above what it was last sent.
                let none_rises = |f: &dyn Fn(usize) -> bool| {
                    (0..topo.n_chargers())
                        .all(|c| !self.below(c, n) || !f(c) || s[c] <= self.last_line_a(c) + 1e-9)
                };
                for p in 0..3 {
                    let lim = node.phase_limit_a[p];
                    let held_over = no_unb && !(mag0[p] <= lim + tol(lim));
                    let on_p = |c: usize| topo.chargers[c].phases.contains(&p);
                    let ok = mag[p] <= lim + tol(lim)
                        || (held_over && mag_f[p] <= lim + tol(lim) && none_rises(&on_p))
                        || off_below(&on_p);
                    if !ok {
                        return Err(format!("node {n} phase {p}: {} > {lim} A", mag[p]));
                    }
                }
                if let Some(l) = node.power_limit_kw {
                    let held_over = no_unb && !(kw0 <= l + tol(l));
                    let ok = kw <= l + tol(l)
                        || (held_over && kw_f <= l + tol(l) && none_rises(&|_| true))
                        || off_below(&|_| true);
                    if !ok {
                        return Err(format!("node {n}: {kw} > {l} kW"));
                    }
                }
                if let Some(l) = node.unbalance_limit_a {
                    let held_over = !(unb0 <= l + tol(l));
                    let followed = held_over && unb_f <= l + tol(l) && none_rises(&|_| true);
                    if !(unb <= l + tol(l)) && !followed && !off_below(&|_| true) {
                        return Err(format!("node {n}: unbalance {unb} > {l} A"));
                    }
                }
            }
            Ok(())
        }
    }

    /// The request that reproduces a decision (AC: amperes, DC: watts).
    pub(crate) fn as_request(topo: &Topology, x: &Inputs, d: &Decision) -> Inputs {
        let mut y = x.clone();
        for c in 0..topo.n_chargers() {
            y.req_a[c] = d.setpoint_a[c];
            y.req_w[c] = d.setpoint_w[c];
        }
        y
    }

    fn run(topo: &Topology, x: &Inputs, p: &EnvelopeParams) -> Decision {
        enforce(topo, &x.chargers(), &x.nodes(), p, true).expect("valid input shapes")
    }

    proptest! {
        #![proptest_config(cases(256))]

        #[test]
        fn envelope_holds_every_limit_for_any_input(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let topo = gen_site(&mut r, 12);
            let x = gen_inputs(&mut r, &topo);
            let p = gen_params(&mut r);
            let d = run(&topo, &x, &p);
            let chk = Check { topo: &topo, x: &x, p };
            if let Err(e) = chk.invariants(&d) {
                prop_assert!(false, "{e}\n{:?}", d);
            }
            prop_assert_eq!(d.reason.len(), topo.n_chargers());
        }

        #[test]
        fn envelope_twice_changes_nothing(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let topo = gen_site(&mut r, 12);
            let x = gen_inputs(&mut r, &topo);
            let p = gen_params(&mut r);
            let d1 = run(&topo, &x, &p);
            let d2 = run(&topo, &as_request(&topo, &x, &d1), &p);
            for c in 0..topo.n_chargers() {
                prop_assert!((d1.setpoint_a[c] - d2.setpoint_a[c]).abs() <= 1e-9 * (1.0 + d1.setpoint_a[c]),
                    "charger {c}: {} then {}", d1.setpoint_a[c], d2.setpoint_a[c]);
                prop_assert!((d1.setpoint_w[c] - d2.setpoint_w[c]).abs() <= 1e-6 * (1.0 + d1.setpoint_w[c]));
            }
        }
    }

    proptest! {
        #![proptest_config(cases(256))]

        /// The common cap of a phase or kW constraint is solved on its linear pieces instead of
        /// by bisection: it must hold the limit and be no lower than the bisection's (60 counts).
        #[test]
        fn common_cap_solve_holds_the_limit_and_matches_bisection(seed in any::<u64>()) {
            let mut r = Rng::new(seed);
            let topo = gen_site(&mut r, 12);
            let x = gen_inputs(&mut r, &topo);
            let p = gen_params(&mut r);
            let mut cnt = counting(&topo, &x.chargers(), &x.nodes(), &p, None);
            for c in 0..topo.n_chargers() {
                cnt.s[c] = sanitise_request(&topo, c, &x.chargers(), &p).0;
            }
            let sub = subtree_other(&topo, &cnt);
            let mut scratch = NodeLoads::new(1);
            let requested = cnt.s.clone();
            for n in 0..topo.n_nodes() {
                let limits = [
                    (Constraint::Power, topo.nodes[n].power_limit_kw),
                    (Constraint::Phase(0), Some(topo.nodes[n].phase_limit_a[0])),
                    (Constraint::Phase(1), Some(topo.nodes[n].phase_limit_a[1])),
                    (Constraint::Phase(2), Some(topo.nodes[n].phase_limit_a[2])),
                ];
                for (k, limit) in limits {
                    let Some(limit) = limit else { continue };
                    cnt.s.clone_from(&requested);
                    let members: Vec<usize> = topo
                        .chargers_below(n)
                        .iter()
                        .copied()
                        .filter(|&c| cnt.s[c] > 0.0 && contributes(&topo, c, k))
                        .collect();
                    let saved: Vec<f64> = members.iter().map(|&c| cnt.s[c]).collect();
                    if members.is_empty()
                        || !violated(single_node_value(&topo, &cnt, &sub, n, k, &mut scratch), limit)
                    {
                        continue;
                    }
                    for &c in &members {
                        cnt.s[c] = 0.0;
                    }
                    let floor = single_node_value(&topo, &cnt, &sub, n, k, &mut scratch);
                    if violated(floor, limit) {
                        continue;
                    }
                    let mut value_at = |cnt: &mut Counting, x: f64| {
                        for (j, &c) in members.iter().enumerate() {
                            cnt.s[c] = saved[j].min(x);
                        }
                        single_node_value(&topo, cnt, &sub, n, k, &mut scratch)
                    };
                    let (mut lo, mut hi) = (0.0, saved.iter().copied().fold(0.0, f64::max));
                    let top = hi;
                    for _ in 0..60 {
                        let mid = 0.5 * (lo + hi);
                        if value_at(&mut cnt, mid) <= limit { lo = mid } else { hi = mid }
                    }
                    let got = common_cap(&topo, &mut cnt, &sub, n, k, (&members, &saved), floor, limit);
                    let v = value_at(&mut cnt, got);
                    prop_assert!(v <= limit, "node {n} {k:?}: cap {got} counts {v} > {limit}");
                    prop_assert!(got >= lo - 1e-9 * (1.0 + top),
                        "node {n} {k:?}: cap {got} below the bisection's {lo}");
                }
            }
        }
    }

    // ---- example tests: one rule each ------------------------------------------------------

    fn site(nodes: &str, chargers: &str) -> Topology {
        let text =
            format!(r#"{{"site": {{"id": "s"}}, "nodes": [{nodes}], "chargers": [{chargers}]}}"#);
        Topology::from_json(&text).unwrap()
    }

    fn ac(id: &str, parent: &str, wiring: &str, phases: &str, extra: &str) -> String {
        format!(
            r#"{{"id": "{id}", "parent": "{parent}", "wiring": "{wiring}", "phases": {phases}, "voltage_v": 230, "max_a": 32{extra}}}"#
        )
    }

    /// Chargers a and b on L1 of circuit c1 (`limit` A) under a 100 A grid.
    fn two_on_a_circuit(limit: f64) -> Topology {
        site(
            &format!(
                r#"{{"id": "g", "phase_limit_a": 100}}, {{"id": "c1", "parent": "g", "kind": "circuit", "phase_limit_a": {limit}}}"#
            ),
            &[
                ac("a", "c1", "line_to_neutral", r#"["L1"]"#, ""),
                ac("b", "c1", "line_to_neutral", r#"["L1"]"#, ""),
            ]
            .join(","),
        )
    }

    #[test]
    fn circuit_limit_shares_the_cut_and_names_node_and_phase() {
        let t = two_on_a_circuit(40.0);
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0, 32.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!(
            (d.setpoint_a[0] - 20.0).abs() < 1e-6 && (d.setpoint_a[1] - 20.0).abs() < 1e-6,
            "{d:?}"
        );
        assert_eq!(d.binding[0], Binding::NodePhase);
        assert_eq!(d.binding_node[0], Some(1));
        assert_eq!(d.binding_phase[0], Some(0));
        assert!(
            d.reason[0].contains("circuit c1 phase L1"),
            "{}",
            d.reason[0]
        );
    }

    #[test]
    fn a_member_is_not_cut_below_what_it_holds_anyway() {
        // a still draws 32 A on the 32 A circuit and is lowered to 16 A; b asks to start at 16 A.
        // Only b's start can go; a's 16 A stays (at 0 it would count the same 32 A, paused for
        // nothing).
        let t = two_on_a_circuit(32.0);
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![16.0, 16.0];
        x.last_a = vec![32.0, 0.0];
        x.m[0][0] = 32.0;
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a, vec![16.0, 0.0], "{d:?}");
        assert_eq!(d.binding[1], Binding::NodePhase);
        assert_ne!(d.binding[0], Binding::NodePhase, "{d:?}");
        // A member above what it holds is cut, but not below it: c draws 10 A and asks 20 A.
        x.req_a = vec![16.0, 20.0];
        x.last_a = vec![32.0, 10.0];
        x.on_since = vec![f64::NAN, NOW - 3600.0];
        x.m[0][1] = 10.0;
        x.m[0][0] = 22.0;
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a[0], 16.0, "{d:?}");
        assert!((d.setpoint_a[1] - 10.0).abs() < 1e-9, "{d:?}");
    }

    /// Five three-phase chargers on feeder f1 (80 A) under a 200 A grid, each measured (fresh)
    /// at `draw` A on every phase, last sent 16 A (confirmed), each asking for `req` A.
    fn measured_feeder(draw: f64, req: f64) -> (Topology, Inputs) {
        let chargers: Vec<String> = (0..5)
            .map(|i| {
                ac(
                    &format!("c{i}"),
                    "f1",
                    "three_phase",
                    r#"["L1","L2","L3"]"#,
                    "",
                )
            })
            .collect();
        let t = site(
            r#"{"id": "g", "phase_limit_a": 200}, {"id": "f1", "parent": "g", "kind": "feeder", "phase_limit_a": 80}"#,
            &chargers.join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![req; 5];
        x.last_a = vec![16.0; 5];
        for k in 0..3 {
            x.m[k] = vec![draw; 5];
        }
        (t, x)
    }

    #[test]
    fn measured_draw_over_a_limit_lowers_to_fit_when_followed_instead_of_pausing_all() {
        // 5 × 16.1 A = 80.5 A measured on 80 A: no setpoint makes the counted load fit. The old
        // rule paused all five, which came back the next tick (sawtooth). Now each is lowered to
        // 16 A: 80 A once they follow; the reason gives the measured value.
        let (t, x) = measured_feeder(16.1, 20.0);
        let p = EnvelopeParams::default();
        let d = run(&t, &x, &p);
        for c in 0..5 {
            assert!((d.setpoint_a[c] - 16.0).abs() < 1e-6, "{d:?}");
            assert_eq!(d.binding[c], Binding::NodePhase);
            assert_eq!(d.binding_node[c], Some(1));
            assert!((d.binding_value[c] - 80.5).abs() < 1e-9, "{d:?}");
        }
        assert_eq!(
            d.reason[0],
            "lowered to 16 A (drawing 16.1 A): feeder f1 phase L1 at 80.5 of 80 A measured: sized to fit when chargers follow their setpoints"
        );
        // The invariant as stated: the counted load is over only where what is held alone is,
        // and there it fits when followed; applying the envelope again changes nothing.
        let chk = Check { topo: &t, x: &x, p };
        chk.invariants(&d).unwrap();
        let (mag, _, _) = chk.node_followed(1, &d.setpoint_a);
        assert!(mag.iter().all(|&m| m <= 80.0 + 1e-6), "{mag:?}");
        let d2 = run(&t, &as_request(&t, &x, &d), &p);
        assert_eq!(d2.setpoint_a, d.setpoint_a);
        // Requests that already fit when followed are kept (16 A: still below the 16.1 A drawn).
        let reason = d.reason[0].clone();
        let (t, x) = measured_feeder(16.1, 16.0);
        let d = run(&t, &x, &p);
        assert!(
            d.setpoint_a.iter().all(|&s| (s - 16.0).abs() < 1e-9),
            "{d:?}"
        );
        assert_eq!(d.reason[0], reason);
        // A charger that has not confirmed its decrease from 32 A may still draw 32 A even when
        // it follows: the other four share the remaining 48 A (12 A each).
        let (t, mut x) = measured_feeder(16.1, 20.0);
        x.last_a[0] = 32.0;
        x.confirmed[0] = false;
        let d = run(&t, &x, &p);
        for c in 1..5 {
            assert!((d.setpoint_a[c] - 12.0).abs() < 1e-6, "{d:?}");
        }
        Check { topo: &t, x: &x, p }.invariants(&d).unwrap();
        // When not even that fits (non-charger load 50 A and two unknown profiles at 32 A), what
        // the feeder controls is paused, as before.
        let (t, mut x) = measured_feeder(16.1, 20.0);
        x.unknown[0] = true;
        x.unknown[1] = true;
        for k in 0..3 {
            x.o[k][1] = 50.0;
        }
        let d = run(&t, &x, &p);
        assert!(d.setpoint_a.iter().all(|&s| s == 0.0), "{d:?}");
        assert!(
            d.reason[2].starts_with("paused: feeder f1 phase L1 at"),
            "{}",
            d.reason[2]
        );
        Check { topo: &t, x: &x, p }.invariants(&d).unwrap();
    }

    /// Charger a was sent 16 A (confirmed) and draws 55 A on every phase: the 50 A grid is over
    /// on what is held alone. Charger b was sent 0. Both ask for 32 A.
    pub(crate) fn grid_measured_over() -> (Topology, Inputs) {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 50}"#,
            &[
                ac("a", "g", "three_phase", r#"["L1","L2","L3"]"#, ""),
                ac("b", "g", "three_phase", r#"["L1","L2","L3"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0, 32.0];
        x.last_a = vec![16.0, 0.0];
        for k in 0..3 {
            x.m[k] = vec![55.0, 0.0];
        }
        (t, x)
    }

    #[test]
    fn nothing_rises_below_a_node_measured_over_its_limit() {
        // Sized only "to fit when followed", a kept 16 A and b got 32 A: 87 A counted on 50.
        // Now nothing below the node rises above what it was sent.
        let (t, x) = grid_measured_over();
        let p = EnvelopeParams::default();
        let d = run(&t, &x, &p);
        assert!(d.setpoint_a[0] <= 16.0 + 1e-9, "{d:?}");
        assert_eq!(d.setpoint_a[1], 0.0, "{d:?}");
        assert_eq!(d.binding[1], Binding::NodePhase);
        let chk = Check { topo: &t, x: &x, p };
        chk.invariants(&d).unwrap();
        // The checker catches a rise there (it is not the envelope's own rule read back).
        let mut risen = d.clone();
        risen.setpoint_a[1] = 6.0;
        assert!(chk.invariants(&risen).is_err());
        let d2 = run(&t, &as_request(&t, &x, &d), &p);
        assert_eq!(d2.setpoint_a, d.setpoint_a);
    }

    #[test]
    fn dc_power_converts_with_efficiency_and_auxiliary_load_and_has_no_6a_rule() {
        // 22 kW at 90 % with 500 W auxiliary load from a 230 V three-phase supply:
        // (22000 / 0.9 + 500) / 690 = 36.15137 A of line current, written out by hand.
        let dc = r#"{"id": "d", "parent": "g", "kind": "dc", "wiring": "three_phase", "phases": ["L1","L2","L3"], "voltage_v": 230, "max_w": 22000, "efficiency": 0.9, "aux_w": 500}"#;
        let t = site(r#"{"id": "g", "phase_limit_a": 100}"#, dc);
        let mut x = Inputs::quiet(&t);
        x.req_w = vec![22000.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!((d.setpoint_a[0] - 36.151_368_760).abs() < 1e-6, "{d:?}");
        assert!((d.setpoint_w[0] - 22000.0).abs() < 1e-6, "{d:?}");
        // 1 kW is 2.33 A of line current: below 6 A, and it runs (no 6 A rule for DC).
        x.req_w = vec![1000.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!(
            (d.setpoint_a[0] - (1000.0 / 0.9 + 500.0) / 690.0).abs() < 1e-9,
            "{d:?}"
        );
        assert!((d.setpoint_w[0] - 1000.0).abs() < 1e-6, "{d:?}");
        // A 20 A line limit leaves (20 · 690 − 500) · 0.9 = 11,970 W of charging power.
        let t = site(r#"{"id": "g", "phase_limit_a": 20}"#, dc);
        let mut x = Inputs::quiet(&t);
        x.req_w = vec![22000.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!((d.setpoint_a[0] - 20.0).abs() < 1e-6, "{d:?}");
        assert!((d.setpoint_w[0] - 11970.0).abs() < 1e-3, "{d:?}");
        assert_eq!(d.binding[0], Binding::NodePhase);
    }

    #[test]
    fn reason_names_the_kind_only_when_it_differs_from_the_id() {
        let t = site(
            r#"{"id": "grid", "kind": "grid", "phase_limit_a": 100, "power_limit_kw": 9.2}"#,
            &[
                ac("a", "grid", "line_to_neutral", r#"["L1"]"#, ""),
                ac("b", "grid", "line_to_neutral", r#"["L2"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0, 32.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.binding[0], Binding::NodePower);
        assert!(
            d.reason[0].contains(": grid at 9.2 of 9.2 kW"),
            "{}",
            d.reason[0]
        );
        assert!(!d.reason[0].contains("grid grid"), "{}", d.reason[0]);
    }

    #[test]
    fn line_to_line_counts_as_phasor_sum_not_plain_sum() {
        // AB and CA loads of 20 A each: line A carries sqrt(3)·20 = 34.6 A, not 40 A.
        let t = site(
            r#"{"id": "g", "phase_limit_a": 35}"#,
            &[
                ac("ab", "g", "line_to_line", r#"["L1","L2"]"#, ""),
                ac("ca", "g", "line_to_line", r#"["L3","L1"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![20.0, 20.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a, vec![20.0, 20.0], "{:?}", d.reason);
        x.req_a = vec![21.0, 21.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        let i = d.setpoint_a[0];
        assert!(i < 21.0 && (3.0f64.sqrt() * i - 35.0).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn six_amp_rule_pauses_instead_of_going_below_minimum() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 10}"#,
            &[
                ac("a", "g", "line_to_neutral", r#"["L1"]"#, ""),
                ac("b", "g", "line_to_neutral", r#"["L1"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![16.0, 16.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        for &v in &d.setpoint_a {
            assert!(v == 0.0 || v >= 6.0, "{d:?}");
        }
        assert!(d.setpoint_a.iter().sum::<f64>() <= 10.0 + 1e-9);
        x.req_a = vec![3.0, 0.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a[0], 0.0);
        assert_eq!(d.binding[0], Binding::MinCurrent);
    }

    #[test]
    fn steps_snap_down() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 100}"#,
            &ac(
                "a",
                "g",
                "line_to_neutral",
                r#"["L1"]"#,
                r#", "steps_a": [8, 16, 24, 32]"#,
            ),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![23.9];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a, vec![16.0]);
        assert_eq!(d.binding[0], Binding::Step);
    }

    #[test]
    fn stale_measurement_is_not_credited_and_stale_other_load_counts_at_max() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 40, "other_load_max_a": 30}"#,
            &ac("a", "g", "line_to_neutral", r#"["L1"]"#, ""),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0];
        x.o[0][0] = 5.0;
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!(
            (d.setpoint_a[0] - 32.0).abs() < 1e-9,
            "fresh 5 A other load leaves 35 A"
        );
        x.o_age[0] = 120.0;
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!((d.setpoint_a[0] - 10.0).abs() < 1e-6, "{d:?}");
        assert_eq!(d.binding[0], Binding::StaleTelemetry);
    }

    /// An infinite building load (an absurd reading, counted as it is) on L1 made the node's
    /// counted L1 current NaN (inf x 0 in its phasor), which passed every check: a charger stayed
    /// on under an infinite unbalance (property test seed 4734383080977946574).
    #[test]
    fn an_infinite_building_load_counts_as_infinite() {
        for (phase, unbalance) in [("L2", r#", "unbalance_limit_a": 20"#), ("L1", "")] {
            let t = site(
                &format!(r#"{{"id": "g", "phase_limit_a": 100{unbalance}}}"#),
                &ac("a", "g", "line_to_neutral", &format!(r#"["{phase}"]"#), ""),
            );
            let mut x = Inputs::quiet(&t);
            x.req_a = vec![16.0];
            x.o[0][0] = f64::INFINITY;
            let d = run(&t, &x, &EnvelopeParams::default());
            assert_eq!(d.setpoint_a[0], 0.0, "{phase}: {d:?}");
            let chk = Check {
                topo: &t,
                x: &x,
                p: EnvelopeParams::default(),
            };
            assert_eq!(chk.invariants(&d), Ok(()));
        }
    }

    #[test]
    fn unconfirmed_decrease_and_unknown_profile_are_counted_high() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 40}"#,
            &[
                ac("a", "g", "line_to_neutral", r#"["L1"]"#, ""),
                ac("b", "g", "line_to_neutral", r#"["L1"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        // a was at 30 A and has not confirmed its decrease to 10 A: it still counts 30 A.
        x.req_a = vec![10.0, 32.0];
        x.last_a = vec![30.0, 0.0];
        x.confirmed = vec![false, true];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a[0], 10.0);
        assert!((d.setpoint_a[1] - 10.0).abs() < 1e-6, "{d:?}");
        assert_eq!(d.binding[0], Binding::UnconfirmedDecrease);
        // b's profile state is unknown: it counts at its 32 A maximum, a gets at most 8 A → 6..8.
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0, 16.0];
        x.unknown = vec![false, true];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!(d.setpoint_a[0] <= 8.0 + 1e-9, "{d:?}");
        // Its meter says 36 A (the site file's maximum is wrong): it counts at 36 A, a gets 0..4
        // A, which is below the 6 A minimum: a pauses.
        x.m[0][1] = 36.0;
        x.m_age = vec![1.0, 1.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert_eq!(d.setpoint_a[0], 0.0, "{d:?}");
        // A stale reading is not counted: back to the maximum.
        x.m_age = vec![1.0, 600.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!(
            d.setpoint_a[0] >= 6.0 && d.setpoint_a[0] <= 8.0 + 1e-9,
            "{d:?}"
        );
    }

    #[test]
    fn unbalance_cap_counts_a_single_phase_car_on_a_three_phase_charger() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 100, "unbalance_limit_a": 16}"#,
            &ac(
                "a",
                "g",
                "three_phase",
                r#"["L1","L2","L3"]"#,
                r#", "single_phase_car": true"#,
            ),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        assert!((d.setpoint_a[0] - 16.0).abs() < 1e-6, "{d:?}");
        assert_eq!(d.binding[0], Binding::Unbalance);
    }

    /// The e2e start-up of session 18 (the shipped example site's grid: 20 A unbalance cap, a
    /// line-to-line charger below): two three-phase cars read at 9 A each, an unbalance of 23 A
    /// on what is held alone, because a single-phase load on the low line had just stopped.
    fn grid_unbalance_measured_over() -> (Topology, Inputs) {
        let spc = r#", "single_phase_car": true"#;
        let t = site(
            r#"{"id": "g", "phase_limit_a": 200, "unbalance_limit_a": 20}"#,
            &[
                ac("a", "g", "three_phase", r#"["L1","L2","L3"]"#, spc),
                ac("b", "g", "three_phase", r#"["L2","L3","L1"]"#, spc),
                ac("c", "g", "line_to_line", r#"["L1","L2"]"#, ""),
                ac("d", "g", "line_to_neutral", r#"["L3"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        // c and d ask for 32 A (they were sent 0, as the allocator asks): sized as if d came
        // on, the low line L3 would seem to hold the unbalance down.
        x.req_a = vec![9.07, 9.07, 32.0, 32.0];
        x.last_a = vec![9.0, 9.0, 0.0, 0.0];
        for k in 0..3 {
            x.m[k] = vec![9.0, 9.0, 0.0, 0.0];
        }
        x.o = [vec![20.0], vec![15.0], vec![15.0]];
        (t, x)
    }

    #[test]
    fn an_unbalance_over_on_what_is_held_alone_is_sized_to_fit_when_followed() {
        // Before: both cars paused ("grid unbalance at 23 of 20 A"), and the allocator's
        // minimum off time then kept them at 0 A for 3 minutes. Followed, a + b on the high line
        // over the 15 A low line (single-phase cars taken off it) fit at 7.5 A each: 7 A.
        let (t, x) = grid_unbalance_measured_over();
        let p = EnvelopeParams::default();
        let d = run(&t, &x, &p);
        assert!(d.setpoint_a[0] >= 6.0 && d.setpoint_a[1] >= 6.0, "{d:?}");
        assert!(d.setpoint_a[0] + d.setpoint_a[1] <= 15.0 + 1e-6, "{d:?}");
        assert_eq!(d.binding[0], Binding::Unbalance);
        let why = &d.reason[0];
        assert!(
            why.contains("at 23 of 20 A measured: sized to fit when"),
            "{why}"
        );
        let chk = Check { topo: &t, x: &x, p };
        chk.invariants(&d).unwrap();
        // The checker holds it to the followed fit: 8 A each would be 21 A when followed.
        let mut more = d.clone();
        more.setpoint_a[0] = 8.0;
        more.setpoint_a[1] = 8.0;
        assert!(chk.invariants(&more).is_err());
        // And nothing rises: c, off, may not start on the room the cars' setpoints leave (d on
        // the low line would hold the counted unbalance down, so the checker lets it).
        assert_eq!(d.setpoint_a[2..], [0.0, 0.0], "{d:?}");
        let mut risen = d.clone();
        risen.setpoint_a[2] = 6.0;
        assert!(chk.invariants(&risen).is_err());
        let d2 = run(&t, &as_request(&t, &x, &d), &p);
        assert_eq!(d2.setpoint_a, d.setpoint_a);
    }

    #[test]
    fn kw_cap_holds() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 100, "power_limit_kw": 11.04}"#,
            &[
                ac("a", "g", "three_phase", r#"["L1","L2","L3"]"#, ""),
                ac("b", "g", "three_phase", r#"["L2","L3","L1"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![32.0, 32.0];
        let d = run(&t, &x, &EnvelopeParams::default());
        let kw: f64 = d.setpoint_a.iter().map(|a| a * 3.0 * 230.0 / 1000.0).sum();
        assert!(kw <= 11.04 + 1e-6 && kw > 11.0, "{kw} {d:?}");
        assert_eq!(d.binding[0], Binding::NodePower);
    }

    #[test]
    fn fault_disconnect_ramp_and_hysteresis() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 100}"#,
            &[
                ac("a", "g", "line_to_neutral", r#"["L1"]"#, ""),
                ac("b", "g", "line_to_neutral", r#"["L2"]"#, ""),
                ac("c", "g", "line_to_neutral", r#"["L3"]"#, ""),
                ac("d", "g", "line_to_neutral", r#"["L3"]"#, ""),
            ]
            .join(","),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![16.0; 4];
        x.faulted[0] = true;
        x.connected[1] = false;
        x.last_a[2] = 8.0;
        x.off_since[3] = NOW - 10.0;
        let p = EnvelopeParams {
            now_s: NOW,
            min_off_s: 60.0,
            max_increase_a: 4.0,
            ..Default::default()
        };
        let d = run(&t, &x, &p);
        assert_eq!(d.setpoint_a, vec![0.0, 0.0, 12.0, 0.0]);
        assert_eq!(
            d.binding,
            vec![
                Binding::Fault,
                Binding::Disconnected,
                Binding::Ramp,
                Binding::Hysteresis
            ]
        );
    }

    #[test]
    fn bad_shapes_and_parameters_are_errors_not_panics() {
        let t = site(
            r#"{"id": "g", "phase_limit_a": 100}"#,
            &ac("a", "g", "line_to_neutral", r#"["L1"]"#, ""),
        );
        let mut x = Inputs::quiet(&t);
        x.req_a = vec![];
        let e = enforce(
            &t,
            &x.chargers(),
            &x.nodes(),
            &EnvelopeParams::default(),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("requested_a"), "{e}");
        let x = Inputs::quiet(&t);
        let p = EnvelopeParams {
            now_s: f64::NAN,
            ..Default::default()
        };
        let e = enforce(&t, &x.chargers(), &x.nodes(), &p, false).unwrap_err();
        assert!(e.to_string().contains("now_s"), "{e}");
    }
}
