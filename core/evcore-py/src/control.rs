//! `_core.enforce` and `_core.allocate`: Arrow record batches in and out (float columns are
//! borrowed, not copied), the work done with the GIL released.
use crate::errors::{core_err, guarded, input_err, CoreResultExt};
use crate::topology::PyTopology;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow_buffer::{Buffer, OffsetBuffer};
use arrow_pyarrow::PyArrowType;
use arrow_schema::{DataType, Field, Schema};
use evcore_core::allocator::{self, AllocatorParams, Demand};
use evcore_core::envelope::{self, Binding, ChargerInputs, Decision, EnvelopeParams, NodeInputs};
use evcore_core::{CoreError, Topology};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

fn column<'a>(batch: &'a RecordBatch, name: &str) -> PyResult<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| input_err(name, None, "missing column"))
}

fn no_nulls(a: &dyn Array, name: &str) -> PyResult<()> {
    if a.null_count() > 0 {
        let row = (0..a.len()).find(|&i| a.is_null(i));
        return Err(input_err(
            name,
            row,
            "null value (use NaN for unknown numbers)",
        ));
    }
    Ok(())
}

fn f64_col<'a>(batch: &'a RecordBatch, name: &str) -> PyResult<&'a [f64]> {
    let a = column(batch, name)?;
    let arr = a.as_any().downcast_ref::<Float64Array>().ok_or_else(|| {
        input_err(
            name,
            None,
            format!("must be float64, got {}", a.data_type()),
        )
    })?;
    no_nulls(arr, name)?;
    Ok(arr.values().as_ref())
}

fn bool_col(batch: &RecordBatch, name: &str) -> PyResult<Vec<bool>> {
    let a = column(batch, name)?;
    let arr = a
        .as_any()
        .downcast_ref::<BooleanArray>()
        .ok_or_else(|| input_err(name, None, format!("must be bool, got {}", a.data_type())))?;
    no_nulls(arr, name)?;
    Ok(arr.values().iter().collect())
}

/// Integers or floats, as f64 (switch counts).
fn count_col(batch: &RecordBatch, name: &str) -> PyResult<Vec<f64>> {
    let a = column(batch, name)?;
    no_nulls(a.as_ref(), name)?;
    match a.data_type() {
        DataType::Float64 => Ok(f64_col(batch, name)?.to_vec()),
        DataType::Int64 => Ok(a
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|x| x.values().iter().map(|&v| v as f64).collect())
            .unwrap_or_default()),
        DataType::Int32 => Ok(a
            .as_any()
            .downcast_ref::<Int32Array>()
            .map(|x| x.values().iter().map(|&v| f64::from(v)).collect())
            .unwrap_or_default()),
        other => Err(input_err(
            name,
            None,
            format!("must be int64, int32 or float64, got {other}"),
        )),
    }
}

/// The id column must list the site's ids (`site`, the site's own column) in site order: a
/// shifted row would steer the wrong charger. A column holding exactly the site column's bytes
/// and offsets (the usual case) matches without comparing row by row.
fn check_ids(batch: &RecordBatch, name: &str, site: &StringArray) -> PyResult<()> {
    let a = column(batch, name)?;
    let arr = a
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| input_err(name, None, format!("must be utf8, got {}", a.data_type())))?;
    no_nulls(arr, name)?;
    if arr.len() != site.len() {
        return Err(input_err(
            name,
            None,
            format!("has {} rows, the site has {}", arr.len(), site.len()),
        ));
    }
    if arr.value_offsets() == site.value_offsets() && arr.value_data() == site.value_data() {
        return Ok(());
    }
    for i in 0..site.len() {
        if arr.value(i) != site.value(i) {
            return Err(input_err(
                name,
                Some(i),
                format!(
                    "is {:?}, the site has {:?} at this row (rows follow the site file order)",
                    arr.value(i),
                    site.value(i)
                ),
            ));
        }
    }
    Ok(())
}

fn param(d: Option<&Bound<'_, PyDict>>, name: &str, default: f64) -> PyResult<f64> {
    match d {
        None => Ok(default),
        Some(d) => match d.get_item(name)? {
            None => Ok(default),
            Some(v) => v
                .extract::<f64>()
                .map_err(|_| input_err(name, None, "parameter must be a number")),
        },
    }
}

const PARAM_NAMES: &[&str] = &[
    "now_s",
    "stale_after_s",
    "min_on_s",
    "min_off_s",
    "max_switches",
    "max_increase_a",
    "margin_a",
    "admission_hysteresis_s",
    "reclaim_ramp_s",
];

fn env_params(d: Option<&Bound<'_, PyDict>>) -> PyResult<EnvelopeParams> {
    if let Some(d) = d {
        for k in d.keys() {
            let k: String = k.extract()?;
            if !PARAM_NAMES.contains(&k.as_str()) {
                return Err(input_err(
                    &k,
                    None,
                    format!("unknown parameter (known: {})", PARAM_NAMES.join(", ")),
                ));
            }
        }
    }
    let def = EnvelopeParams::default();
    Ok(EnvelopeParams {
        now_s: param(d, "now_s", def.now_s)?,
        stale_after_s: param(d, "stale_after_s", def.stale_after_s)?,
        min_on_s: param(d, "min_on_s", def.min_on_s)?,
        min_off_s: param(d, "min_off_s", def.min_off_s)?,
        max_switches: param(d, "max_switches", def.max_switches)?,
        max_increase_a: param(d, "max_increase_a", def.max_increase_a)?,
    })
}

struct Owned {
    confirmed: Vec<bool>,
    connected: Vec<bool>,
    faulted: Vec<bool>,
    unknown: Vec<bool>,
    switches: Vec<f64>,
}

fn owned(batch: &RecordBatch) -> PyResult<Owned> {
    Ok(Owned {
        confirmed: bool_col(batch, "last_sent_confirmed")?,
        connected: bool_col(batch, "connected")?,
        faulted: bool_col(batch, "faulted")?,
        unknown: bool_col(batch, "profile_unknown")?,
        switches: count_col(batch, "switches")?,
    })
}

fn charger_inputs<'a>(batch: &'a RecordBatch, o: &'a Owned) -> PyResult<ChargerInputs<'a>> {
    Ok(ChargerInputs {
        requested_a: f64_col(batch, "requested_a")?,
        requested_w: f64_col(batch, "requested_w")?,
        measured_l1_a: f64_col(batch, "measured_l1_a")?,
        measured_l2_a: f64_col(batch, "measured_l2_a")?,
        measured_l3_a: f64_col(batch, "measured_l3_a")?,
        measured_age_s: f64_col(batch, "measured_age_s")?,
        last_sent_a: f64_col(batch, "last_sent_a")?,
        last_sent_w: f64_col(batch, "last_sent_w")?,
        last_sent_confirmed: &o.confirmed,
        connected: &o.connected,
        faulted: &o.faulted,
        profile_unknown: &o.unknown,
        on_since_s: f64_col(batch, "on_since_s")?,
        off_since_s: f64_col(batch, "off_since_s")?,
        switches: &o.switches,
    })
}

fn node_inputs(batch: &RecordBatch) -> PyResult<NodeInputs<'_>> {
    Ok(NodeInputs {
        other_load_l1_a: f64_col(batch, "other_load_l1_a")?,
        other_load_l2_a: f64_col(batch, "other_load_l2_a")?,
        other_load_l3_a: f64_col(batch, "other_load_l3_a")?,
        other_load_age_s: f64_col(batch, "other_load_age_s")?,
    })
}

/// `ids`: the site's charger ids (`PyTopology::charger_ids`, built once).
fn output(
    topo: &Topology,
    ids: ArrayRef,
    dec: Decision,
    extra: Option<(Vec<f64>, Vec<bool>)>,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = topo.n_chargers();
    let binding = StringArray::from_iter_values(dec.binding.iter().map(|b| b.code()));
    let bnode = StringArray::from_iter(
        dec.binding_node
            .iter()
            .map(|n| n.map(|i| topo.nodes[i].id.as_str())),
    );
    let bphase = StringArray::from_iter(
        dec.binding_phase
            .iter()
            .map(|p| p.map(|i| topo.phase_names[i].as_str())),
    );
    let reason = if dec.reason.len() == n {
        StringArray::from_iter_values(dec.reason.iter())
    } else {
        // n empty strings: all offsets 0, no bytes.
        StringArray::new(
            OffsetBuffer::new_zeroed(n),
            Buffer::from(Vec::<u8>::new()),
            None,
        )
    };
    let mut fields = vec![
        Field::new("charger_id", DataType::Utf8, false),
        Field::new("setpoint_a", DataType::Float64, false),
        Field::new("setpoint_w", DataType::Float64, false),
        Field::new("binding", DataType::Utf8, false),
        Field::new("binding_node", DataType::Utf8, true),
        Field::new("binding_phase", DataType::Utf8, true),
        Field::new("binding_value", DataType::Float64, false),
        Field::new("binding_limit", DataType::Float64, false),
        Field::new("reason", DataType::Utf8, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        ids,
        Arc::new(Float64Array::from(dec.setpoint_a)),
        Arc::new(Float64Array::from(dec.setpoint_w)),
        Arc::new(binding),
        Arc::new(bnode),
        Arc::new(bphase),
        Arc::new(Float64Array::from(dec.binding_value)),
        Arc::new(Float64Array::from(dec.binding_limit)),
        Arc::new(reason),
    ];
    if let Some((level, admitted)) = extra {
        fields.push(Field::new("level_a", DataType::Float64, false));
        fields.push(Field::new("admitted", DataType::Boolean, false));
        cols.push(Arc::new(Float64Array::from(level)));
        cols.push(Arc::new(BooleanArray::from(admitted)));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
}

/// The site and its output id column, once both batches are checked to list the site's chargers
/// and nodes in site order.
fn site_of(
    topology: &PyTopology,
    cb: &RecordBatch,
    nb: &RecordBatch,
) -> PyResult<(Arc<Topology>, ArrayRef)> {
    check_ids(cb, "charger_id", &topology.charger_ids)?;
    check_ids(nb, "node_id", &topology.node_ids)?;
    // A clone of the column shares its buffers: no copy.
    let ids: ArrayRef = Arc::new(topology.charger_ids.clone());
    Ok((topology.inner.clone(), ids))
}

fn arrow_err(e: arrow_schema::ArrowError) -> PyErr {
    core_err(CoreError::Internal(format!(
        "building the output batch: {e}"
    )))
}

/// Safe setpoints for every charger (see docs/envelope.md for the schemas).
#[pyfunction]
#[pyo3(signature = (topology, chargers, nodes, params=None, explain=true))]
pub fn enforce(
    py: Python<'_>,
    topology: &PyTopology,
    chargers: PyArrowType<RecordBatch>,
    nodes: PyArrowType<RecordBatch>,
    params: Option<&Bound<'_, PyDict>>,
    explain: bool,
) -> PyResult<PyArrowType<RecordBatch>> {
    let (cb, nb) = (chargers.0, nodes.0);
    let (topo, ids) = site_of(topology, &cb, &nb)?;
    let p = env_params(params)?;
    let o = owned(&cb)?;
    let ci = charger_inputs(&cb, &o)?;
    let ni = node_inputs(&nb)?;
    let out = py
        .detach(|| {
            guarded(|| {
                let dec = envelope::enforce(&topo, &ci, &ni, &p, explain)?;
                Ok(output(&topo, ids, dec, None))
            })
        })
        .py()?
        .map_err(arrow_err)?;
    Ok(PyArrowType(out))
}

/// Allocation + envelope in one call (see docs/envelope.md). Demand columns live in the charger
/// batch: energy_wanted_kwh, departure_s, priority, target_a, target_w, behind_plan and the
/// optional read_under_a, read_under_w (left out: NaN, not known).
#[pyfunction]
#[pyo3(signature = (topology, chargers, nodes, params=None, explain=true))]
pub fn allocate(
    py: Python<'_>,
    topology: &PyTopology,
    chargers: PyArrowType<RecordBatch>,
    nodes: PyArrowType<RecordBatch>,
    params: Option<&Bound<'_, PyDict>>,
    explain: bool,
) -> PyResult<PyArrowType<RecordBatch>> {
    let (cb, nb) = (chargers.0, nodes.0);
    let (topo, ids) = site_of(topology, &cb, &nb)?;
    let def = AllocatorParams::default();
    let p = AllocatorParams {
        envelope: env_params(params)?,
        margin_a: param(params, "margin_a", def.margin_a)?,
        admission_hysteresis_s: param(
            params,
            "admission_hysteresis_s",
            def.admission_hysteresis_s,
        )?,
        reclaim_ramp_s: param(params, "reclaim_ramp_s", def.reclaim_ramp_s)?,
    };
    let o = owned(&cb)?;
    let ci = charger_inputs(&cb, &o)?;
    let ni = node_inputs(&nb)?;
    let behind = bool_col(&cb, "behind_plan")?;
    // Optional: a caller that does not know what a reading was taken under leaves them out.
    let nan = vec![f64::NAN; cb.num_rows()];
    let optional = |name: &str| -> PyResult<&[f64]> {
        if cb.column_by_name(name).is_some() {
            f64_col(&cb, name)
        } else {
            Ok(&nan)
        }
    };
    let demand = Demand {
        energy_wanted_kwh: f64_col(&cb, "energy_wanted_kwh")?,
        departure_s: f64_col(&cb, "departure_s")?,
        priority: f64_col(&cb, "priority")?,
        target_a: f64_col(&cb, "target_a")?,
        target_w: f64_col(&cb, "target_w")?,
        behind_plan: &behind,
        read_under_a: optional("read_under_a")?,
        read_under_w: optional("read_under_w")?,
    };
    let out = py
        .detach(|| {
            guarded(|| {
                allocator::allocate(&topo, &ci, &ni, &demand, &p, explain)
                    .map(|a| output(&topo, ids, a.decision, Some((a.level_a, a.admitted))))
            })
        })
        .py()?
        .map_err(arrow_err)?;
    Ok(PyArrowType(out))
}

/// Every binding code the envelope and allocator can report.
#[pyfunction]
pub fn binding_codes() -> Vec<&'static str> {
    Binding::ALL.iter().map(|b| b.code()).collect()
}
