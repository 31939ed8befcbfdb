//! `evcore._core.Planner`: the horizon planner over JSON in, Arrow out.
//!
//! Input is the JSON form of `evcore_core::planner::PlanInput` (the typed facade in
//! `evcore.planner` builds it). Output is one `pyarrow.RecordBatch` with the schedule
//! (`session_id`, `charger_id`, `step_start`, `step_s`, `target_a`, `target_w`) and the summary
//! (status, objective terms, times, binding constraints) as JSON under the schema metadata key
//! `evcore.plan`. Bad input raises `InputError` naming the field; solver trouble is a status.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_pyarrow::ToPyArrow;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use evcore_core::planner::{PlanError, PlanInput, PlanOutput, Planner, PlannerSettings};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _core,
    InputError,
    PyValueError,
    "Bad input; the message names the field."
);
pyo3::create_exception!(
    _core,
    SolverError,
    PyRuntimeError,
    "The solver could not run."
);

/// Raise the module's `InputError`/`SolverError` — whichever class `evcore._core` registered
/// under that name (the core's, if it defines them), so Python sees one class per name.
fn typed_err(py: Python<'_>, name: &str, msg: String) -> PyErr {
    typed_err_field(py, name, None, msg)
}

fn typed_err_field(py: Python<'_>, name: &str, field: Option<&str>, msg: String) -> PyErr {
    let registered = py
        .import("evcore._core")
        .and_then(|m| m.getattr(name))
        .ok()
        .filter(|c| c.is_instance_of::<pyo3::types::PyType>());
    match registered {
        Some(cls) => match cls.call1((msg.clone(),)) {
            Ok(obj) => {
                // Same attributes as the core's InputError (`column`, `row`), plus `field`.
                if let Some(f) = field {
                    let _ = obj.setattr("field", f);
                    let _ = obj.setattr("column", f);
                    let _ = obj.setattr("row", py.None());
                }
                PyErr::from_value(obj)
            }
            Err(e) => e,
        },
        None if name == "InputError" => InputError::new_err(msg),
        None => SolverError::new_err(msg),
    }
}

pub const PLAN_METADATA_KEY: &str = "evcore.plan";

fn to_batch(input: &PlanInput, out: &PlanOutput) -> Result<RecordBatch, String> {
    let n = out.rows.len();
    let mut session_id = Vec::with_capacity(n);
    let mut charger_id = Vec::with_capacity(n);
    let mut step_start = Vec::with_capacity(n);
    let mut step_s = Vec::with_capacity(n);
    let mut target_a = Vec::with_capacity(n);
    let mut target_w = Vec::with_capacity(n);
    for r in &out.rows {
        let s = &input.sessions[r.session];
        session_id.push(s.id.as_str());
        charger_id.push(s.charger_id.as_str());
        step_start.push((out.summary.step_start_s[r.step] * 1e6).round() as i64);
        step_s.push(out.summary.step_s[r.step]);
        if r.dc {
            target_a.push(None);
            target_w.push(Some(r.target));
        } else {
            target_a.push(Some(r.target));
            target_w.push(None);
        }
    }
    let summary = serde_json::to_string(&out.summary).map_err(|e| e.to_string())?;
    let schema = Schema::new(vec![
        Field::new("session_id", DataType::Utf8, false),
        Field::new("charger_id", DataType::Utf8, false),
        Field::new(
            "step_start",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("step_s", DataType::Float64, false),
        Field::new("target_a", DataType::Float64, true),
        Field::new("target_w", DataType::Float64, true),
    ])
    .with_metadata(std::collections::HashMap::from([(
        PLAN_METADATA_KEY.to_string(),
        summary,
    )]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(session_id)),
        Arc::new(StringArray::from(charger_id)),
        Arc::new(TimestampMicrosecondArray::from(step_start).with_timezone("UTC")),
        Arc::new(Float64Array::from(step_s)),
        Arc::new(Float64Array::from(target_a)),
        Arc::new(Float64Array::from(target_w)),
    ];
    RecordBatch::try_new(Arc::new(schema), columns).map_err(|e| e.to_string())
}

/// A receding-horizon planner: keeps its Clarabel solver between calls with the same structure.
#[pyclass(module = "evcore._core", name = "Planner")]
pub struct PyPlanner {
    inner: Mutex<Planner>,
}

#[pymethods]
impl PyPlanner {
    /// `settings_json`: JSON of the planner settings (tolerances, max_iter, limit_margin_rel);
    /// missing means the defaults.
    #[new]
    #[pyo3(signature = (settings_json=None))]
    fn new(py: Python<'_>, settings_json: Option<&str>) -> PyResult<Self> {
        let settings = match settings_json {
            None => PlannerSettings::default(),
            Some(s) => serde_json::from_str(s)
                .map_err(|e| typed_err(py, "InputError", format!("settings: {e}")))?,
        };
        Ok(Self {
            inner: Mutex::new(Planner::new(settings)),
        })
    }

    /// The settings in force, as JSON.
    #[getter]
    fn settings_json(&self, py: Python<'_>) -> PyResult<String> {
        let g = self
            .inner
            .lock()
            .map_err(|_| typed_err(py, "SolverError", "planner poisoned".into()))?;
        serde_json::to_string(g.settings()).map_err(|e| typed_err(py, "SolverError", e.to_string()))
    }

    /// Plan within `budget_s` seconds. Returns a `pyarrow.RecordBatch` (see module docs).
    fn plan<'py>(
        &self,
        py: Python<'py>,
        input_json: &str,
        budget_s: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input: PlanInput = serde_json::from_str(input_json)
            .map_err(|e| typed_err(py, "InputError", format!("planner input: {e}")))?;
        let inner = &self.inner;
        let result = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut g = inner.lock().map_err(|_| "planner poisoned".to_string())?;
                match g.plan(&input, budget_s) {
                    Ok(out) => to_batch(&input, &out).map(Ok),
                    Err(e) => Ok(Err(e)),
                }
            }))
        });
        match result {
            Ok(Ok(Ok(batch))) => batch.to_pyarrow(py),
            Ok(Ok(Err(PlanError::Input { field, message }))) => Err(typed_err_field(
                py,
                "InputError",
                Some(&field),
                format!("{field}: {message}"),
            )),
            Ok(Err(msg)) => Err(typed_err(py, "SolverError", msg)),
            Err(_) => Err(typed_err(
                py,
                "SolverError",
                "planner panicked (a bug; please report it with the input)".into(),
            )),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    if !m.hasattr("InputError")? {
        m.add("InputError", py.get_type::<InputError>())?;
    }
    if !m.hasattr("SolverError")? {
        m.add("SolverError", py.get_type::<SolverError>())?;
    }
    m.add_class::<PyPlanner>()?;
    m.add("PLAN_METADATA_KEY", PLAN_METADATA_KEY)?;
    Ok(())
}
