//! The site topology: a tree of nodes (grid connection → panels/feeders/circuits) with chargers as
//! leaves, parsed from the JSON form of the site file's `[site]`, `[[nodes]]` and `[[chargers]]`
//! tables and validated here, so that no Python code decides whether a site is valid.
//!
//! Line currents are phasors at unity power factor with balanced voltages: site phase `p` has angle
//! `PHASE_ANGLE_RAD[p]` (0, −120°, +120°). Every charger terminal adds a fixed complex coefficient
//! times its terminal current to one or two site lines (`terminal_entries`). This module never
//! decides setpoints; it only describes the site.
use crate::error::{CoreError, CoreResult};
use serde_json::{Map, Value};
use std::collections::HashMap;

pub const N_PHASES: usize = 3;
/// Phase angles of the site's phases L1, L2, L3 (positive sequence).
pub const PHASE_ANGLE_RAD: [f64; N_PHASES] = [
    0.0,
    -2.0 * std::f64::consts::PI / 3.0,
    2.0 * std::f64::consts::PI / 3.0,
];
/// `(cos, sin)` of each site phase's angle: computed once (the hot loops would otherwise call
/// `sin_cos` for every node and phase on every call).
pub fn phase_unit() -> &'static [(f64, f64); N_PHASES] {
    static UNIT: std::sync::OnceLock<[(f64, f64); N_PHASES]> = std::sync::OnceLock::new();
    UNIT.get_or_init(|| {
        std::array::from_fn(|p| {
            let (s, c) = PHASE_ANGLE_RAD[p].sin_cos();
            (c, s)
        })
    })
}
/// IEC 61851: the lowest non-zero AC pilot current.
pub const IEC_MIN_A: f64 = 6.0;
/// How far a three-phase or line-to-neutral charger's `voltage_v` may be from the site's
/// line-to-neutral voltage (nameplates say 220, 230 or 240 V on a 230 V site).
pub const VOLTAGE_LN_TOLERANCE: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wiring {
    ThreePhase,
    LineToNeutral,
    LineToLine,
}

impl Wiring {
    pub fn as_str(self) -> &'static str {
        match self {
            Wiring::ThreePhase => "three_phase",
            Wiring::LineToNeutral => "line_to_neutral",
            Wiring::LineToLine => "line_to_line",
        }
    }
    /// Number of charger terminals that carry a current of their own.
    pub fn terminals(self) -> usize {
        match self {
            Wiring::ThreePhase => 3,
            _ => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChargerKind {
    Ac,
    Dc,
}

impl ChargerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargerKind::Ac => "ac",
            ChargerKind::Dc => "dc",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub id: String,
    pub parent: Option<usize>,
    pub kind: String,
    /// Allowed continuous current per site phase (A).
    pub phase_limit_a: [f64; N_PHASES],
    pub power_limit_kw: Option<f64>,
    pub unbalance_limit_a: Option<f64>,
    /// Non-charger load counted when no fresh measurement exists (A per phase).
    pub other_load_max_a: [f64; N_PHASES],
    /// Set when the file gave the limit as a breaker rating.
    pub breaker_rating_a: Option<[f64; N_PHASES]>,
    pub continuous_derating: Option<f64>,
    /// 0 for the root.
    pub depth: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Charger {
    pub id: String,
    pub ocpp_id: String,
    pub evse_id: u32,
    pub connector_id: u32,
    pub parent: usize,
    pub kind: ChargerKind,
    pub wiring: Wiring,
    /// Site phase index of each charger terminal (3, 1 or 2 entries; 2 = out on [0], back on [1]).
    pub phases: Vec<usize>,
    pub voltage_v: f64,
    /// AC: lowest non-zero setpoint per phase. DC: AC line current per phase at `min_w` (0 if none).
    pub min_a: f64,
    /// AC: highest setpoint per phase. DC: AC line current per phase at `max_w`.
    pub max_a: f64,
    /// Allowed non-zero setpoints, ascending (empty: any value in [min_a, max_a]).
    pub steps_a: Vec<f64>,
    pub single_phase_car: bool,
    pub max_w: f64,
    pub min_w: f64,
    pub efficiency: f64,
    pub aux_w: f64,
}

/// DC: AC line current per phase (A) when delivering `p_w` (0 W → 0 A: off draws nothing).
#[inline]
fn dc_line_current(p_w: f64, efficiency: f64, aux_w: f64, voltage_v: f64) -> f64 {
    if p_w <= 0.0 {
        return 0.0;
    }
    (p_w / efficiency + aux_w) / (3.0 * voltage_v)
}

/// DC: output power (W) for an AC line current per phase (inverse of `dc_line_current`).
#[inline]
fn dc_output_w(line_a: f64, efficiency: f64, aux_w: f64, voltage_v: f64, max_w: f64) -> f64 {
    if line_a <= 0.0 {
        return 0.0;
    }
    ((line_a * 3.0 * voltage_v - aux_w) * efficiency).clamp(0.0, max_w)
}

impl Charger {
    /// DC: AC line current per phase (A) when delivering `p_w` (0 W → 0 A: off draws nothing).
    pub fn dc_line_a(&self, p_w: f64) -> f64 {
        dc_line_current(p_w, self.efficiency, self.aux_w, self.voltage_v)
    }
    /// DC: output power (W) for an AC line current per phase (inverse of `dc_line_a`).
    pub fn dc_power_w(&self, line_a: f64) -> f64 {
        dc_output_w(
            line_a,
            self.efficiency,
            self.aux_w,
            self.voltage_v,
            self.max_w,
        )
    }
    /// Active power (W) drawn per ampere of terminal current, per terminal.
    pub fn watts_per_terminal_a(&self) -> f64 {
        self.voltage_v
    }
}

/// The fields of a charger that every control call reads, packed into one cache line (the full
/// `Charger`, with its ids and vectors, spans several): the hot loops of the envelope and the
/// allocator read these, in site order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChargerHot {
    pub parent: u32,
    pub kind: ChargerKind,
    pub wiring: Wiring,
    /// `wiring.terminals()`.
    pub terminals: u8,
    pub single_phase_car: bool,
    /// Whether `steps_a` is non-empty.
    pub has_steps: bool,
    /// Site phase of each terminal (`phases`, padded with its first entry).
    pub phases: [u8; N_PHASES],
    pub voltage_v: f64,
    pub min_a: f64,
    pub max_a: f64,
    pub max_w: f64,
    pub efficiency: f64,
    pub aux_w: f64,
}

impl ChargerHot {
    /// A value given per charger in its unit as AC line amperes per terminal: `a` for an AC
    /// charger, `w` (DC output W, at most `max_w`) converted for a DC one; NaN stays NaN.
    #[inline]
    pub fn line_a(&self, a: f64, w: f64) -> f64 {
        match self.kind {
            ChargerKind::Ac => a,
            ChargerKind::Dc if w.is_nan() => f64::NAN,
            ChargerKind::Dc => self.dc_line_a(w.min(self.max_w)),
        }
    }

    fn of(ch: &Charger) -> ChargerHot {
        let mut phases = [ch.phases[0] as u8; N_PHASES];
        for (o, &p) in phases.iter_mut().zip(&ch.phases) {
            *o = p as u8;
        }
        ChargerHot {
            parent: ch.parent as u32,
            kind: ch.kind,
            wiring: ch.wiring,
            terminals: ch.wiring.terminals() as u8,
            single_phase_car: ch.single_phase_car,
            has_steps: !ch.steps_a.is_empty(),
            phases,
            voltage_v: ch.voltage_v,
            min_a: ch.min_a,
            max_a: ch.max_a,
            max_w: ch.max_w,
            efficiency: ch.efficiency,
            aux_w: ch.aux_w,
        }
    }
    #[inline]
    pub fn parent(&self) -> usize {
        self.parent as usize
    }
    #[inline]
    pub fn terminals(&self) -> usize {
        usize::from(self.terminals)
    }
    /// The site phases it is wired to (`Charger::phases`).
    #[inline]
    pub fn site_phases(&self) -> &[u8] {
        let n = match self.wiring {
            Wiring::ThreePhase => 3,
            Wiring::LineToNeutral => 1,
            Wiring::LineToLine => 2,
        };
        &self.phases[..n]
    }
    /// Site phase of terminal `k`.
    #[inline]
    pub fn phase(&self, k: usize) -> usize {
        usize::from(self.phases[k])
    }
    /// As `Charger::dc_line_a`.
    #[inline]
    pub fn dc_line_a(&self, p_w: f64) -> f64 {
        dc_line_current(p_w, self.efficiency, self.aux_w, self.voltage_v)
    }
    /// As `Charger::dc_power_w`.
    #[inline]
    pub fn dc_power_w(&self, line_a: f64) -> f64 {
        dc_output_w(
            line_a,
            self.efficiency,
            self.aux_w,
            self.voltage_v,
            self.max_w,
        )
    }
    #[inline]
    pub fn watts_per_terminal_a(&self) -> f64 {
        self.voltage_v
    }
}

/// One charger terminal's contribution to one site line: `current × (re + j im)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TerminalEntry {
    pub terminal: usize,
    pub phase: usize,
    pub re: f64,
    pub im: f64,
}

/// A split of the chargers into two halves that share no parent node, for work done on two
/// threads: chargers `[0, charger_at)` hang directly below nodes `< node_at` only, chargers
/// `[charger_at, n)` below nodes `>= node_at` only. Sums per parent node made by each half alone
/// are then the same sums, in the same order, as one pass over all chargers makes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Halves {
    pub charger_at: usize,
    pub node_at: usize,
}

#[derive(Clone, Debug)]
pub struct Topology {
    pub site_id: String,
    pub name: Option<String>,
    pub phase_names: [String; N_PHASES],
    pub voltage_ln_v: f64,
    pub frequency_hz: f64,
    pub nodes: Vec<Node>,
    pub chargers: Vec<Charger>,
    /// Nodes with every parent before its children.
    node_order: Vec<usize>,
    /// Flat ancestor lists: charger c's nodes (its parent first, root last) are
    /// `anc[anc_off[c]..anc_off[c+1]]`.
    anc: Vec<usize>,
    anc_off: Vec<usize>,
    entries: Vec<TerminalEntry>,
    entry_off: Vec<usize>,
    /// Whether any line-to-line charger hangs below the node (line currents are then not plain sums).
    node_has_l2l: Vec<bool>,
    /// Chargers below each node: `below[below_off[n]..below_off[n+1]]`.
    below: Vec<usize>,
    below_off: Vec<usize>,
    /// Per charger its coefficient in the linear constraint slots of every node above it:
    /// 1 on each site phase it touches, W per terminal ampere (all terminals) in slot 3 (kW).
    slot_coef: Vec<[f64; N_PHASES + 1]>,
    hot: Vec<ChargerHot>,
    /// Whether the node has no node below it (only chargers, if any).
    node_is_leaf: Vec<bool>,
    /// The most even split of the chargers into two halves without a shared parent, if one
    /// leaves each half at least a quarter of them.
    halves: Option<Halves>,
    node_index: HashMap<String, usize>,
    charger_index: HashMap<String, usize>,
}

// ---- JSON field helpers: every error names the object and the field ----------------------------

fn num(ctx: &str, field: &str, v: &Value) -> CoreResult<f64> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| CoreError::site(ctx, field, "not a number")),
        // Non-finite floats cannot travel in JSON; the Python loader encodes them as strings.
        Value::String(s) if matches!(s.as_str(), "nan" | "inf" | "-inf") => Err(CoreError::site(
            ctx,
            field,
            format!("must be a finite number, got {s}"),
        )),
        other => Err(CoreError::site(
            ctx,
            field,
            format!("must be a number, got {}", type_name(other)),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

fn nonneg(ctx: &str, field: &str, v: &Value) -> CoreResult<f64> {
    let x = num(ctx, field, v)?;
    if !x.is_finite() || x < 0.0 {
        return Err(CoreError::site(
            ctx,
            field,
            format!("must be a finite number >= 0, got {x}"),
        ));
    }
    Ok(x)
}

fn positive(ctx: &str, field: &str, v: &Value) -> CoreResult<f64> {
    let x = nonneg(ctx, field, v)?;
    if x <= 0.0 {
        return Err(CoreError::site(ctx, field, format!("must be > 0, got {x}")));
    }
    Ok(x)
}

fn nonneg3(ctx: &str, field: &str, v: &Value) -> CoreResult<[f64; N_PHASES]> {
    match v {
        Value::Array(items) => {
            if items.len() != N_PHASES {
                return Err(CoreError::site(
                    ctx,
                    field,
                    format!(
                        "must be one number or 3 numbers, got {} numbers",
                        items.len()
                    ),
                ));
            }
            let mut out = [0.0; N_PHASES];
            for (o, it) in out.iter_mut().zip(items) {
                *o = nonneg(ctx, field, it)?;
            }
            Ok(out)
        }
        other => {
            let x = nonneg(ctx, field, other)?;
            Ok([x; N_PHASES])
        }
    }
}

fn string(ctx: &str, field: &str, v: &Value) -> CoreResult<String> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::String(_) => Err(CoreError::site(ctx, field, "must not be empty")),
        other => Err(CoreError::site(
            ctx,
            field,
            format!("must be a string, got {}", type_name(other)),
        )),
    }
}

fn int_ge1(ctx: &str, field: &str, v: &Value) -> CoreResult<u32> {
    match v.as_u64() {
        Some(x) if (1..=u64::from(u32::MAX)).contains(&x) => Ok(x as u32),
        _ => Err(CoreError::site(
            ctx,
            field,
            format!("must be an integer >= 1, got {v}"),
        )),
    }
}

/// Entry `i` of the site's `list` ("nodes", "chargers"): a table with a string `id`; errors
/// name it by its position, as it has no id yet.
fn table_with_id<'v>(
    raw: &'v Value,
    list: &str,
    i: usize,
    what: &str,
) -> CoreResult<(&'v Map<String, Value>, String)> {
    let at = format!("{list}[{i}]");
    let obj = raw
        .as_object()
        .ok_or_else(|| CoreError::site(&at, what, "must be a table"))?;
    let id = obj
        .get("id")
        .ok_or_else(|| CoreError::site(&at, "id", "missing"))?;
    Ok((obj, string(&at, "id", id)?))
}

fn check_keys(ctx: &str, obj: &Map<String, Value>, allowed: &[&str]) -> CoreResult<()> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(CoreError::site(
                ctx,
                k.as_str(),
                format!("unknown key (allowed: {})", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

const NODE_KEYS: &[&str] = &[
    "id",
    "parent",
    "kind",
    "phase_limit_a",
    "breaker_rating_a",
    "continuous_derating",
    "power_limit_kw",
    "unbalance_limit_a",
    "other_load_max_a",
    "name",
];
const CHARGER_KEYS: &[&str] = &[
    "id",
    "ocpp_id",
    "evse_id",
    "connector_id",
    "parent",
    "kind",
    "wiring",
    "phases",
    "voltage_v",
    "min_a",
    "max_a",
    "steps_a",
    "single_phase_car",
    "max_w",
    "min_w",
    "efficiency",
    "aux_w",
    "name",
];
const NODE_KINDS: &[&str] = &["grid", "transformer", "panel", "feeder", "circuit"];

impl Topology {
    /// Parse and validate the JSON form of a site file (an object with `site`, `nodes`,
    /// `chargers`; other top-level keys are ignored here).
    pub fn from_json(text: &str) -> CoreResult<Topology> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| CoreError::site("site", "json", format!("not valid JSON: {e}")))?;
        Self::from_value(&root)
    }

    pub fn from_value(root: &Value) -> CoreResult<Topology> {
        let root = root
            .as_object()
            .ok_or_else(|| CoreError::site("site", "file", "the site file must be a table"))?;
        let site = match root.get("site") {
            Some(Value::Object(m)) => m,
            Some(_) => return Err(CoreError::site("site", "site", "[site] must be a table")),
            None => return Err(CoreError::site("site", "site", "missing [site] table")),
        };
        let site_id = string(
            "site",
            "id",
            site.get("id")
                .ok_or_else(|| CoreError::site("site", "id", "missing"))?,
        )?;
        let name = match site.get("name") {
            None => None,
            Some(v) => Some(string("site", "name", v)?),
        };
        let phase_names: [String; N_PHASES] = match site.get("phase_names") {
            None => ["L1".into(), "L2".into(), "L3".into()],
            Some(Value::Array(items)) if items.len() == N_PHASES => {
                let mut out: [String; N_PHASES] = Default::default();
                for (o, it) in out.iter_mut().zip(items) {
                    *o = string("site", "phase_names", it)?;
                }
                if out[0] == out[1] || out[1] == out[2] || out[0] == out[2] {
                    return Err(CoreError::site(
                        "site",
                        "phase_names",
                        "the 3 phase names must differ",
                    ));
                }
                out
            }
            Some(_) => return Err(CoreError::site("site", "phase_names", "must be 3 strings")),
        };
        let voltage_ln_v = match site.get("voltage_ln_v") {
            None => 230.0,
            Some(v) => positive("site", "voltage_ln_v", v)?,
        };
        let frequency_hz = match site.get("frequency_hz") {
            None => 50.0,
            Some(v) => positive("site", "frequency_hz", v)?,
        };

        let empty = Vec::new();
        let raw_nodes = match root.get("nodes") {
            Some(Value::Array(a)) => a,
            None => &empty,
            Some(_) => return Err(CoreError::site("site", "nodes", "must be [[nodes]] tables")),
        };
        let raw_chargers = match root.get("chargers") {
            Some(Value::Array(a)) => a,
            None => &empty,
            Some(_) => {
                return Err(CoreError::site(
                    "site",
                    "chargers",
                    "must be [[chargers]] tables",
                ))
            }
        };
        if raw_nodes.is_empty() {
            return Err(CoreError::site(
                "site",
                "nodes",
                "at least one [[nodes]] (the grid connection) is required",
            ));
        }

        // Nodes, first pass: ids and fields.
        let mut node_index: HashMap<String, usize> = HashMap::new();
        let mut nodes: Vec<Node> = Vec::with_capacity(raw_nodes.len());
        let mut parent_ids: Vec<Option<String>> = Vec::with_capacity(raw_nodes.len());
        for (i, raw) in raw_nodes.iter().enumerate() {
            let (obj, id) = table_with_id(raw, "nodes", i, "node")?;
            let ctx = id.as_str();
            check_keys(ctx, obj, NODE_KEYS)?;
            if node_index.insert(id.clone(), i).is_some() {
                return Err(CoreError::site(ctx, "id", "duplicate node id"));
            }
            let parent = match obj.get("parent") {
                None => None,
                Some(v) => Some(string(ctx, "parent", v)?),
            };
            let kind = match obj.get("kind") {
                None => "panel".to_string(),
                Some(v) => {
                    let k = string(ctx, "kind", v)?;
                    if !NODE_KINDS.contains(&k.as_str()) {
                        return Err(CoreError::site(
                            ctx,
                            "kind",
                            format!("unknown kind {k:?} (one of {})", NODE_KINDS.join(", ")),
                        ));
                    }
                    k
                }
            };
            let (phase_limit_a, breaker_rating_a, continuous_derating) =
                match (obj.get("phase_limit_a"), obj.get("breaker_rating_a")) {
                    (Some(_), Some(_)) => {
                        return Err(CoreError::site(
                            ctx,
                            "breaker_rating_a",
                            "give either phase_limit_a or breaker_rating_a, not both",
                        ))
                    }
                    (None, None) => {
                        return Err(CoreError::site(
                            ctx,
                            "phase_limit_a",
                            "missing (give phase_limit_a or breaker_rating_a)",
                        ))
                    }
                    (Some(v), None) => {
                        if obj.contains_key("continuous_derating") {
                            return Err(CoreError::site(
                                ctx,
                                "continuous_derating",
                                "only applies with breaker_rating_a",
                            ));
                        }
                        (nonneg3(ctx, "phase_limit_a", v)?, None, None)
                    }
                    (None, Some(v)) => {
                        let rating = nonneg3(ctx, "breaker_rating_a", v)?;
                        let derating = match obj.get("continuous_derating") {
                            None => 0.8,
                            Some(d) => {
                                let d = positive(ctx, "continuous_derating", d)?;
                                if d > 1.0 {
                                    return Err(CoreError::site(
                                        ctx,
                                        "continuous_derating",
                                        format!("must be in (0, 1], got {d}"),
                                    ));
                                }
                                d
                            }
                        };
                        (rating.map(|r| r * derating), Some(rating), Some(derating))
                    }
                };
            let power_limit_kw = match obj.get("power_limit_kw") {
                None => None,
                Some(v) => Some(nonneg(ctx, "power_limit_kw", v)?),
            };
            let unbalance_limit_a = match obj.get("unbalance_limit_a") {
                None => None,
                Some(v) => Some(nonneg(ctx, "unbalance_limit_a", v)?),
            };
            let other_load_max_a = match obj.get("other_load_max_a") {
                None => [0.0; N_PHASES],
                Some(v) => nonneg3(ctx, "other_load_max_a", v)?,
            };
            parent_ids.push(parent);
            nodes.push(Node {
                id,
                parent: None,
                kind,
                phase_limit_a,
                power_limit_kw,
                unbalance_limit_a,
                other_load_max_a,
                breaker_rating_a,
                continuous_derating,
                depth: 0,
            });
        }
        // Parents, the single root, cycles.
        let mut root_idx: Option<usize> = None;
        for (i, pid) in parent_ids.iter().enumerate() {
            match pid {
                None => {
                    if let Some(r) = root_idx {
                        return Err(CoreError::site(
                            &nodes[i].id,
                            "parent",
                            format!(
                                "missing: only the grid connection has no parent, and {:?} already is it",
                                nodes[r].id
                            ),
                        ));
                    }
                    root_idx = Some(i);
                }
                Some(p) => match node_index.get(p) {
                    Some(&pi) if pi == i => {
                        return Err(CoreError::site(
                            &nodes[i].id,
                            "parent",
                            "a node cannot be its own parent",
                        ))
                    }
                    Some(&pi) => nodes[i].parent = Some(pi),
                    None => {
                        return Err(CoreError::site(
                            &nodes[i].id,
                            "parent",
                            format!("unknown parent node {p:?}"),
                        ))
                    }
                },
            }
        }
        let root_idx = match root_idx {
            Some(r) => r,
            None => {
                return Err(CoreError::site(
                    &nodes[0].id,
                    "parent",
                    "every node has a parent, so the tree is a cycle: exactly one node (the grid connection) must have none",
                ))
            }
        };
        let n_nodes = nodes.len();
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n_nodes];
        for (i, n) in nodes.iter().enumerate() {
            if let Some(p) = n.parent {
                children[p].push(i);
            }
        }
        let mut node_order = Vec::with_capacity(n_nodes);
        node_order.push(root_idx);
        let mut head = 0;
        while head < node_order.len() {
            let cur = node_order[head];
            head += 1;
            for &c in &children[cur] {
                nodes[c].depth = nodes[cur].depth + 1;
                node_order.push(c);
            }
        }
        if node_order.len() != n_nodes {
            let mut reached = vec![false; n_nodes];
            for &i in &node_order {
                reached[i] = true;
            }
            let bad = (0..n_nodes).find(|&i| !reached[i]).unwrap_or(0);
            return Err(CoreError::site(
                &nodes[bad].id,
                "parent",
                "cycle: following parents from this node never reaches the grid connection",
            ));
        }

        // Chargers.
        let mut charger_index: HashMap<String, usize> = HashMap::new();
        // (station, EVSE) -> the charger on it: one charger per EVSE (the 1.6 connector id). The
        // central system refused a second one only when the edge started (`site check` and
        // every other user of the site took it).
        let mut on_evse: HashMap<(String, u32), String> = HashMap::new();
        let mut chargers: Vec<Charger> = Vec::with_capacity(raw_chargers.len());
        for (i, raw) in raw_chargers.iter().enumerate() {
            let (obj, id) = table_with_id(raw, "chargers", i, "charger")?;
            let c = Self::parse_charger(&id, obj, &node_index, &phase_names, voltage_ln_v)?;
            if node_index.contains_key(&id) {
                return Err(CoreError::site(
                    &id,
                    "id",
                    "duplicate id: a node has the same id",
                ));
            }
            if charger_index.insert(id.clone(), i).is_some() {
                return Err(CoreError::site(&id, "id", "duplicate charger id"));
            }
            if let Some(other) = on_evse.insert((c.ocpp_id.clone(), c.evse_id), id.clone()) {
                return Err(CoreError::site(
                    &id,
                    "evse_id",
                    format!(
                        "charger {other:?} is on station {:?} EVSE {} already (give each its own \
                         ocpp_id or evse_id)",
                        c.ocpp_id, c.evse_id
                    ),
                ));
            }
            chargers.push(c);
        }

        let mut topo = Topology {
            site_id,
            name,
            phase_names,
            voltage_ln_v,
            frequency_hz,
            nodes,
            chargers,
            node_order,
            anc: Vec::new(),
            anc_off: Vec::new(),
            entries: Vec::new(),
            entry_off: Vec::new(),
            node_has_l2l: vec![false; n_nodes],
            slot_coef: Vec::new(),
            hot: Vec::new(),
            below: Vec::new(),
            below_off: Vec::new(),
            node_is_leaf: Vec::new(),
            halves: None,
            node_index,
            charger_index,
        };
        topo.derive();
        topo.check_usable()?;
        Ok(topo)
    }

    fn parse_charger(
        id: &str,
        obj: &Map<String, Value>,
        node_index: &HashMap<String, usize>,
        phase_names: &[String; N_PHASES],
        voltage_ln_v: f64,
    ) -> CoreResult<Charger> {
        let ctx = id;
        check_keys(ctx, obj, CHARGER_KEYS)?;
        let ocpp_id = match obj.get("ocpp_id") {
            None => id.to_string(),
            Some(v) => string(ctx, "ocpp_id", v)?,
        };
        let evse_id = match obj.get("evse_id") {
            None => 1,
            Some(v) => int_ge1(ctx, "evse_id", v)?,
        };
        let connector_id = match obj.get("connector_id") {
            None => 1,
            Some(v) => int_ge1(ctx, "connector_id", v)?,
        };
        let parent_id = string(
            ctx,
            "parent",
            obj.get("parent")
                .ok_or_else(|| CoreError::site(ctx, "parent", "missing"))?,
        )?;
        let parent = *node_index.get(&parent_id).ok_or_else(|| {
            CoreError::site(ctx, "parent", format!("unknown parent node {parent_id:?}"))
        })?;
        let kind = match obj
            .get("kind")
            .map(|v| string(ctx, "kind", v))
            .transpose()?
            .as_deref()
        {
            None | Some("ac") => ChargerKind::Ac,
            Some("dc") => ChargerKind::Dc,
            Some(k) => {
                return Err(CoreError::site(
                    ctx,
                    "kind",
                    format!("must be \"ac\" or \"dc\", got {k:?}"),
                ))
            }
        };
        let wiring = match obj
            .get("wiring")
            .map(|v| string(ctx, "wiring", v))
            .transpose()?
            .as_deref()
        {
            Some("three_phase") => Wiring::ThreePhase,
            Some("line_to_neutral") => Wiring::LineToNeutral,
            Some("line_to_line") => Wiring::LineToLine,
            None => return Err(CoreError::site(ctx, "wiring", "missing")),
            Some(w) => {
                return Err(CoreError::site(
                    ctx,
                    "wiring",
                    format!("must be three_phase, line_to_neutral or line_to_line, got {w:?}"),
                ))
            }
        };
        if kind == ChargerKind::Dc && wiring != Wiring::ThreePhase {
            return Err(CoreError::site(
                ctx,
                "wiring",
                "DC chargers are connected three_phase",
            ));
        }
        let want = match wiring {
            Wiring::ThreePhase => 3,
            Wiring::LineToNeutral => 1,
            Wiring::LineToLine => 2,
        };
        let phases: Vec<usize> = match obj.get("phases") {
            None if wiring == Wiring::ThreePhase => vec![0, 1, 2],
            None => return Err(CoreError::site(ctx, "phases", "missing")),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    let name = string(ctx, "phases", it)?;
                    let p = phase_names.iter().position(|n| *n == name).ok_or_else(|| {
                        CoreError::site(
                            ctx,
                            "phases",
                            format!(
                                "phase {name:?} is not one of the site's phases {phase_names:?}"
                            ),
                        )
                    })?;
                    if out.contains(&p) {
                        return Err(CoreError::site(
                            ctx,
                            "phases",
                            format!("phase {name:?} named twice"),
                        ));
                    }
                    out.push(p);
                }
                out
            }
            Some(_) => {
                return Err(CoreError::site(
                    ctx,
                    "phases",
                    "must be a list of phase names",
                ))
            }
        };
        if phases.len() != want {
            return Err(CoreError::site(
                ctx,
                "phases",
                format!(
                    "{} wiring needs {want} phase(s), got {}",
                    wiring.as_str(),
                    phases.len()
                ),
            ));
        }
        // Three-phase and line-to-neutral chargers see the site's line-to-neutral voltage: it is
        // derived when absent and checked when given (a line-to-line 400 V here would undercount
        // a DC charger's line current and every kW by sqrt(3)). Line-to-line chargers state theirs
        // (208 V three-phase or 240 V split-phase on a 120 V site).
        let voltage_v = match (obj.get("voltage_v"), wiring) {
            (None, Wiring::LineToLine) => {
                return Err(CoreError::site(
                    ctx,
                    "voltage_v",
                    "missing (line-to-line chargers state the voltage across their terminals)",
                ))
            }
            (None, _) => voltage_ln_v,
            (Some(v), Wiring::LineToLine) => positive(ctx, "voltage_v", v)?,
            (Some(v), _) => {
                let v = positive(ctx, "voltage_v", v)?;
                if (v - voltage_ln_v).abs() > VOLTAGE_LN_TOLERANCE * voltage_ln_v {
                    return Err(CoreError::site(
                        ctx,
                        "voltage_v",
                        format!(
                            "{v} V is not the site's line-to-neutral voltage ({voltage_ln_v} V, \
                             [site] voltage_ln_v, within {:.0} %): {} chargers are counted \
                             line-to-neutral; leave voltage_v out to use the site's",
                            VOLTAGE_LN_TOLERANCE * 100.0,
                            wiring.as_str()
                        ),
                    ));
                }
                v
            }
        };
        let single_phase_car = match obj.get("single_phase_car") {
            None => wiring == Wiring::ThreePhase && kind == ChargerKind::Ac,
            Some(Value::Bool(b)) => *b && wiring == Wiring::ThreePhase && kind == ChargerKind::Ac,
            Some(_) => {
                return Err(CoreError::site(
                    ctx,
                    "single_phase_car",
                    "must be true or false",
                ))
            }
        };
        let mut c = Charger {
            id: id.to_string(),
            ocpp_id,
            evse_id,
            connector_id,
            parent,
            kind,
            wiring,
            phases,
            voltage_v,
            min_a: 0.0,
            max_a: 0.0,
            steps_a: Vec::new(),
            single_phase_car,
            max_w: 0.0,
            min_w: 0.0,
            efficiency: 1.0,
            aux_w: 0.0,
        };
        match kind {
            ChargerKind::Ac => {
                for k in ["max_w", "min_w", "efficiency", "aux_w"] {
                    if obj.contains_key(k) {
                        return Err(CoreError::site(
                            ctx,
                            k,
                            "only for DC chargers (kind = \"dc\")",
                        ));
                    }
                }
                c.max_a = positive(
                    ctx,
                    "max_a",
                    obj.get("max_a")
                        .ok_or_else(|| CoreError::site(ctx, "max_a", "missing"))?,
                )?;
                c.min_a = match obj.get("min_a") {
                    None => IEC_MIN_A,
                    Some(v) => nonneg(ctx, "min_a", v)?,
                };
                if c.min_a < IEC_MIN_A {
                    return Err(CoreError::site(
                        ctx,
                        "min_a",
                        format!(
                            "AC chargers cannot go below {IEC_MIN_A} A (IEC 61851), got {}",
                            c.min_a
                        ),
                    ));
                }
                if c.min_a > c.max_a {
                    return Err(CoreError::site(
                        ctx,
                        "min_a",
                        format!("min_a {} is above max_a {}", c.min_a, c.max_a),
                    ));
                }
                if let Some(v) = obj.get("steps_a") {
                    let items = v.as_array().ok_or_else(|| {
                        CoreError::site(ctx, "steps_a", "must be a list of numbers")
                    })?;
                    let mut steps = Vec::with_capacity(items.len());
                    for it in items {
                        let s = nonneg(ctx, "steps_a", it)?;
                        if s == 0.0 {
                            continue; // 0 is always allowed
                        }
                        if s < c.min_a || s > c.max_a {
                            return Err(CoreError::site(
                                ctx,
                                "steps_a",
                                format!(
                                    "step {s} is outside [min_a, max_a] = [{}, {}]",
                                    c.min_a, c.max_a
                                ),
                            ));
                        }
                        steps.push(s);
                    }
                    steps.sort_by(f64::total_cmp);
                    steps.dedup();
                    if steps.is_empty() {
                        return Err(CoreError::site(ctx, "steps_a", "no non-zero step"));
                    }
                    c.steps_a = steps;
                }
            }
            ChargerKind::Dc => {
                for k in ["max_a", "min_a", "steps_a"] {
                    if obj.contains_key(k) {
                        return Err(CoreError::site(
                            ctx,
                            k,
                            "DC chargers are set in W (max_w, min_w)",
                        ));
                    }
                }
                c.max_w = positive(
                    ctx,
                    "max_w",
                    obj.get("max_w").ok_or_else(|| {
                        CoreError::site(ctx, "max_w", "missing (DC chargers need max_w)")
                    })?,
                )?;
                c.min_w = match obj.get("min_w") {
                    None => 0.0,
                    Some(v) => nonneg(ctx, "min_w", v)?,
                };
                if c.min_w > c.max_w {
                    return Err(CoreError::site(
                        ctx,
                        "min_w",
                        format!("min_w {} is above max_w {}", c.min_w, c.max_w),
                    ));
                }
                c.efficiency = match obj.get("efficiency") {
                    None => 0.95,
                    Some(v) => positive(ctx, "efficiency", v)?,
                };
                if c.efficiency > 1.0 {
                    return Err(CoreError::site(
                        ctx,
                        "efficiency",
                        format!("must be in (0, 1], got {}", c.efficiency),
                    ));
                }
                c.aux_w = match obj.get("aux_w") {
                    None => 0.0,
                    Some(v) => nonneg(ctx, "aux_w", v)?,
                };
                c.max_a = c.dc_line_a(c.max_w);
                c.min_a = if c.min_w > 0.0 {
                    c.dc_line_a(c.min_w)
                } else {
                    0.0
                };
            }
        }
        Ok(c)
    }

    fn derive(&mut self) {
        let nc = self.chargers.len();
        self.anc.clear();
        self.anc_off.clear();
        self.anc_off.push(0);
        self.entries.clear();
        self.entry_off.clear();
        self.entry_off.push(0);
        for c in 0..nc {
            let mut n = Some(self.chargers[c].parent);
            while let Some(i) = n {
                self.anc.push(i);
                if self.chargers[c].wiring == Wiring::LineToLine {
                    self.node_has_l2l[i] = true;
                }
                n = self.nodes[i].parent;
            }
            self.anc_off.push(self.anc.len());
            let ch = &self.chargers[c];
            match ch.wiring {
                Wiring::ThreePhase | Wiring::LineToNeutral => {
                    for (k, &p) in ch.phases.iter().enumerate() {
                        let (im, re) = PHASE_ANGLE_RAD[p].sin_cos();
                        self.entries.push(TerminalEntry {
                            terminal: k,
                            phase: p,
                            re,
                            im,
                        });
                    }
                }
                Wiring::LineToLine => {
                    let (a, b) = (ch.phases[0], ch.phases[1]);
                    let (ia, ra) = PHASE_ANGLE_RAD[a].sin_cos();
                    let (ib, rb) = PHASE_ANGLE_RAD[b].sin_cos();
                    // Current in phase with V_a − V_b, unit magnitude.
                    let (dr, di) = (ra - rb, ia - ib);
                    let m = (dr * dr + di * di).sqrt();
                    let (re, im) = (dr / m, di / m);
                    self.entries.push(TerminalEntry {
                        terminal: 0,
                        phase: a,
                        re,
                        im,
                    });
                    self.entries.push(TerminalEntry {
                        terminal: 0,
                        phase: b,
                        re: -re,
                        im: -im,
                    });
                }
            }
            self.entry_off.push(self.entries.len());
        }
        self.slot_coef = self
            .chargers
            .iter()
            .map(|ch| {
                let mut k = [0.0; N_PHASES + 1];
                for &p in &ch.phases {
                    k[p] = 1.0;
                }
                k[N_PHASES] = ch.watts_per_terminal_a() * ch.wiring.terminals() as f64;
                k
            })
            .collect();
        self.hot = self.chargers.iter().map(ChargerHot::of).collect();
        let nn = self.nodes.len();
        let mut counts = vec![0usize; nn];
        for &n in &self.anc {
            counts[n] += 1;
        }
        self.below_off = Vec::with_capacity(nn + 1);
        self.below_off.push(0);
        for n in 0..nn {
            let last = self.below_off[n];
            self.below_off.push(last + counts[n]);
        }
        let mut fill = self.below_off.clone();
        self.below = vec![0; self.anc.len()];
        for c in 0..nc {
            for &n in &self.anc[self.anc_off[c]..self.anc_off[c + 1]] {
                self.below[fill[n]] = c;
                fill[n] += 1;
            }
        }
        self.node_is_leaf = vec![true; nn];
        for node in &self.nodes {
            if let Some(p) = node.parent {
                self.node_is_leaf[p] = false;
            }
        }
        self.halves = self.split_in_halves();
    }

    /// The split point `s` closest to the middle where every parent of chargers `[0, s)` is a
    /// lower node index than every parent of chargers `[s, n)` (sites list chargers circuit by
    /// circuit, so there is usually one next to the middle).
    fn split_in_halves(&self) -> Option<Halves> {
        let nc = self.chargers.len();
        if nc < 4 {
            return None;
        }
        let parent = |c: usize| self.chargers[c].parent;
        // suffix_min[s]: lowest parent of chargers [s, n).
        let mut suffix_min = vec![usize::MAX; nc + 1];
        for c in (0..nc).rev() {
            suffix_min[c] = suffix_min[c + 1].min(parent(c));
        }
        let mut best: Option<Halves> = None;
        let mut prefix_max = 0;
        for s in 1..nc {
            prefix_max = prefix_max.max(parent(s - 1));
            if prefix_max < suffix_min[s] {
                let closer =
                    best.is_none_or(|b| s.abs_diff(nc / 2) < b.charger_at.abs_diff(nc / 2));
                if closer {
                    best = Some(Halves {
                        charger_at: s,
                        node_at: suffix_min[s],
                    });
                }
            }
        }
        best.filter(|b| b.charger_at >= nc / 4 && b.charger_at <= nc - nc / 4)
    }

    /// A node whose limit is zero (or below the charger's minimum) on a phase that a charger below
    /// it needs can never let that charger charge: reject the file.
    fn check_usable(&self) -> CoreResult<()> {
        for (c, ch) in self.chargers.iter().enumerate() {
            // The least a running charger draws (line amperes per terminal) and how far that
            // alone unbalances the phases.
            let need = match ch.kind {
                ChargerKind::Ac => ch.min_a,
                ChargerKind::Dc => ch.dc_line_a(ch.min_w),
            };
            let need_unbalance = match (ch.kind, ch.wiring) {
                (ChargerKind::Dc, _) => 0.0,
                (ChargerKind::Ac, Wiring::ThreePhase) if !ch.single_phase_car => 0.0,
                (ChargerKind::Ac, _) => ch.min_a,
            };
            for &n in self.ancestors(c) {
                let node = &self.nodes[n];
                for &p in &ch.phases {
                    let lim = node.phase_limit_a[p];
                    if lim <= 0.0 || lim < need {
                        return Err(CoreError::site(
                            &node.id,
                            if node.breaker_rating_a.is_some() { "breaker_rating_a" } else { "phase_limit_a" },
                            format!(
                                "limit {lim} A on phase {} can never carry charger {:?} (needs at least {} A there)",
                                self.phase_names[p],
                                ch.id,
                                need.max(f64::MIN_POSITIVE)
                            ),
                        ));
                    }
                }
                // A kW limit below a charger's minimum power is allowed: it is how a
                // curtailment (edge/coreio.py) says that nothing below the node may run.
                if let Some(kw) = node.power_limit_kw {
                    if kw <= 0.0 {
                        return Err(CoreError::site(
                            &node.id,
                            "power_limit_kw",
                            format!("0 kW can never carry charger {:?}", ch.id),
                        ));
                    }
                }
                if let Some(u) = node.unbalance_limit_a {
                    if u < need_unbalance {
                        return Err(CoreError::site(
                            &node.id,
                            "unbalance_limit_a",
                            format!(
                                "{u} A can never carry charger {:?} (at its minimum {} A it unbalances the phases by {} A)",
                                ch.id, ch.min_a, need_unbalance
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    // ---- accessors (stable: the planner and the bindings use them) ----------------------------

    pub fn n_nodes(&self) -> usize {
        self.nodes.len()
    }
    pub fn n_chargers(&self) -> usize {
        self.chargers.len()
    }
    pub fn root(&self) -> usize {
        self.node_order[0]
    }
    /// Node indices with every parent before its children.
    pub fn node_order(&self) -> &[usize] {
        &self.node_order
    }
    /// The nodes whose limits a charger counts against: its parent first, the root last.
    pub fn ancestors(&self, charger: usize) -> &[usize] {
        &self.anc[self.anc_off[charger]..self.anc_off[charger + 1]]
    }
    /// How each terminal current of the charger enters the site's line current phasors.
    pub fn terminal_entries(&self, charger: usize) -> &[TerminalEntry] {
        &self.entries[self.entry_off[charger]..self.entry_off[charger + 1]]
    }
    /// Complex coefficient (re, im) of the charger's per-phase current (every terminal carrying the
    /// same current) in the line-current phasor of site phase `phase` at any node above it.
    pub fn line_coefficient(&self, charger: usize, phase: usize) -> (f64, f64) {
        self.terminal_entries(charger)
            .iter()
            .filter(|e| e.phase == phase)
            .fold((0.0, 0.0), |(r, i), e| (r + e.re, i + e.im))
    }
    /// Sparse list of `(node, phase, charger, re, im)`: every non-zero coefficient of a charger's
    /// per-phase current in a node's line-current phasor.
    pub fn line_coefficients(&self) -> Vec<(usize, usize, usize, f64, f64)> {
        let mut out = Vec::new();
        for c in 0..self.chargers.len() {
            for p in 0..N_PHASES {
                let (re, im) = self.line_coefficient(c, p);
                if re != 0.0 || im != 0.0 {
                    for &n in self.ancestors(c) {
                        out.push((n, p, c, re, im));
                    }
                }
            }
        }
        out
    }
    /// Every charger below the node (at any depth), ascending.
    pub fn chargers_below(&self, node: usize) -> &[usize] {
        &self.below[self.below_off[node]..self.below_off[node + 1]]
    }
    /// The charger's coefficients in a node's linear constraint slots (per-terminal ampere →
    /// phase L1..L3 amperes, slot 3: watts), the same at every node above it.
    pub fn slot_coefs(&self, charger: usize) -> &[f64; N_PHASES + 1] {
        &self.slot_coef[charger]
    }
    /// The charger's hot fields (one cache line).
    #[inline]
    pub fn hot(&self, charger: usize) -> &ChargerHot {
        &self.hot[charger]
    }
    /// Whether no node hangs below the node.
    pub fn node_is_leaf(&self, node: usize) -> bool {
        self.node_is_leaf[node]
    }
    /// Two halves of the chargers without a shared parent node, if the site has them.
    pub fn halves(&self) -> Option<Halves> {
        self.halves
    }
    pub fn node_has_line_to_line(&self, node: usize) -> bool {
        self.node_has_l2l[node]
    }
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.node_index.get(id).copied()
    }
    pub fn charger_index(&self, id: &str) -> Option<usize> {
        self.charger_index.get(id).copied()
    }
    /// Whether `node` lies on the path from `charger` to the root.
    pub fn is_below(&self, charger: usize, node: usize) -> bool {
        self.ancestors(charger).contains(&node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(nodes: &str, chargers: &str) -> String {
        format!(
            r#"{{"site": {{"id": "s", "voltage_ln_v": 230}}, "nodes": [{nodes}], "chargers": [{chargers}]}}"#
        )
    }

    const GRID: &str = r#"{"id": "grid", "phase_limit_a": 100}"#;

    #[test]
    fn parses_breaker_rating_with_derating() {
        let t = Topology::from_json(&site(
            r#"{"id": "grid", "breaker_rating_a": 250, "continuous_derating": 0.8}"#,
            "",
        ))
        .unwrap();
        assert_eq!(t.nodes[0].phase_limit_a, [200.0; 3]);
        assert_eq!(t.nodes[0].breaker_rating_a, Some([250.0; 3]));
    }

    #[test]
    fn rejects_cycles_unknown_parents_and_duplicates() {
        let e = Topology::from_json(&site(
            r#"{"id": "a", "parent": "b", "phase_limit_a": 1}, {"id": "b", "parent": "a", "phase_limit_a": 1}, {"id": "g", "phase_limit_a": 1}"#,
            "",
        ))
        .unwrap_err();
        assert!(
            matches!(e, CoreError::SiteConfig { ref field, .. } if field == "parent"),
            "{e}"
        );
        let e = Topology::from_json(&site(
            &format!("{GRID}, {{\"id\": \"f\", \"parent\": \"nope\", \"phase_limit_a\": 1}}"),
            "",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("f.parent"), "{e}");
        let e = Topology::from_json(&site(&format!("{GRID}, {GRID}"), "")).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn rejects_two_chargers_on_one_stations_evse() {
        let two = |station: &str, evse: u32| {
            site(
                GRID,
                &format!(
                    r#"{{"id": "c1", "parent": "grid", "ocpp_id": "CP01", "wiring": "three_phase", "min_a": 6, "max_a": 32}},
                       {{"id": "c2", "parent": "grid", "ocpp_id": "{station}", "evse_id": {evse}, "wiring": "three_phase", "min_a": 6, "max_a": 32}}"#
                ),
            )
        };
        let e = Topology::from_json(&two("CP01", 1)).unwrap_err();
        assert!(
            matches!(e, CoreError::SiteConfig { ref node, ref field, .. } if node == "c2" && field == "evse_id"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(r#""c1" is on station "CP01" EVSE 1"#),
            "{e}"
        );
        // Their own EVSEs, or their own stations: fine.
        assert!(Topology::from_json(&two("CP01", 2)).is_ok());
        assert!(Topology::from_json(&two("CP02", 1)).is_ok());
    }

    #[test]
    fn rejects_bad_numbers_and_min_above_max() {
        let e = Topology::from_json(&site(r#"{"id": "grid", "phase_limit_a": "nan"}"#, ""))
            .unwrap_err();
        assert!(e.to_string().contains("grid.phase_limit_a"), "{e}");
        let e =
            Topology::from_json(&site(r#"{"id": "grid", "phase_limit_a": -1}"#, "")).unwrap_err();
        assert!(e.to_string().contains(">= 0"), "{e}");
        let e = Topology::from_json(&site(
            GRID,
            r#"{"id": "c", "parent": "grid", "wiring": "three_phase", "voltage_v": 230, "min_a": 20, "max_a": 16}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("c.min_a"), "{e}");
    }

    #[test]
    fn three_phase_and_dc_voltage_is_line_to_neutral_checked_or_derived() {
        // A DC charger given the line-to-line 400 V would count its line current sqrt(3) low.
        let e = Topology::from_json(&site(
            GRID,
            r#"{"id": "dc1", "parent": "grid", "kind": "dc", "wiring": "three_phase", "voltage_v": 400, "max_w": 50000}"#,
        ))
        .unwrap_err();
        assert!(
            matches!(e, CoreError::SiteConfig { ref node, ref field, .. } if node == "dc1" && field == "voltage_v"),
            "{e}"
        );
        assert!(e.to_string().contains("voltage_ln_v"), "{e}");
        let e = Topology::from_json(&site(
            GRID,
            r#"{"id": "ac3", "parent": "grid", "wiring": "three_phase", "voltage_v": 400, "max_a": 32}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("ac3.voltage_v"), "{e}");
        // Left out, it is the site's; 240 V on a 230 V site is within the tolerance.
        let t = Topology::from_json(&site(
            GRID,
            r#"{"id": "dc1", "parent": "grid", "kind": "dc", "wiring": "three_phase", "max_w": 50000, "efficiency": 1.0},
               {"id": "ln", "parent": "grid", "wiring": "line_to_neutral", "phases": ["L1"], "voltage_v": 240, "max_a": 32}"#,
        ))
        .unwrap();
        assert_eq!(t.chargers[0].voltage_v, 230.0);
        assert!((t.chargers[0].dc_line_a(50_000.0) - 50_000.0 / (3.0 * 230.0)).abs() < 1e-9);
        assert_eq!(t.chargers[1].voltage_v, 240.0);
        // Line-to-line chargers state their own voltage, which is not checked against L-N.
        let e = Topology::from_json(&site(
            GRID,
            r#"{"id": "ll", "parent": "grid", "wiring": "line_to_line", "phases": ["L1", "L2"], "max_a": 32}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("ll.voltage_v"), "{e}");
    }

    #[test]
    fn rejects_phase_the_parent_lacks() {
        let e = Topology::from_json(&site(
            r#"{"id": "grid", "phase_limit_a": [100, 0, 100]}"#,
            r#"{"id": "c", "parent": "grid", "wiring": "line_to_neutral", "phases": ["L2"], "voltage_v": 230, "max_a": 16}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("grid.phase_limit_a"), "{e}");
    }

    #[test]
    fn line_to_line_phasor_magnitude_matches_domain_formula() {
        let t = Topology::from_json(&format!(
            r#"{{"site": {{"id": "s", "phase_names": ["A","B","C"], "voltage_ln_v": 120}}, "nodes": [{GRID}], "chargers": [
            {{"id": "ab", "parent": "grid", "wiring": "line_to_line", "phases": ["A","B"], "voltage_v": 208, "max_a": 32}},
            {{"id": "ca", "parent": "grid", "wiring": "line_to_line", "phases": ["C","A"], "voltage_v": 208, "max_a": 32}}]}}"#
        ))
        .unwrap();
        let (iab, ica) = (10.0, 7.0);
        let (r1, i1) = t.line_coefficient(0, 0);
        let (r2, i2) = t.line_coefficient(1, 0);
        let (re, im) = (iab * r1 + ica * r2, iab * i1 + ica * i2);
        let got = (re * re + im * im).sqrt();
        let want = (iab * iab + ica * ica + iab * ica).sqrt();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
    #[test]
    fn halves_split_chargers_between_parents() {
        let circuits: Vec<String> = (0..4)
            .map(|k| format!(r#"{{"id": "k{k}", "parent": "grid", "phase_limit_a": 50}}"#))
            .collect();
        let nodes = format!("{GRID},{}", circuits.join(","));
        let charger = |i: usize, k: usize| {
            format!(
                r#"{{"id": "c{i}", "parent": "k{k}", "wiring": "line_to_neutral", "phases": ["L1"], "voltage_v": 230, "max_a": 16}}"#
            )
        };
        // Circuit by circuit (3 chargers each): the split nearest the middle is between k1 and k2.
        let cs: Vec<String> = (0..12).map(|i| charger(i, i / 3)).collect();
        let t = Topology::from_json(&site(&nodes, &cs.join(","))).unwrap();
        let h = t.halves().expect("a split");
        assert_eq!((h.charger_at, t.nodes[h.node_at].id.as_str()), (6, "k2"));
        for c in 0..12 {
            assert_eq!(t.chargers[c].parent < h.node_at, c < h.charger_at);
        }
        assert!(!t.node_is_leaf(0) && t.node_is_leaf(1));
        // Circuits taking turns: no split without a shared parent.
        let cs: Vec<String> = (0..12).map(|i| charger(i, i % 4)).collect();
        let t = Topology::from_json(&site(&nodes, &cs.join(","))).unwrap();
        assert_eq!(t.halves(), None);
    }
}
