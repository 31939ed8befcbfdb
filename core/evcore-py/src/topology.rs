//! `_core.Topology`: the validated site tree, built from the JSON form of the site file.
use crate::errors::{guarded, CoreResultExt};
use arrow_array::StringArray;
use evcore_core::topology::{ChargerKind, Topology};
use evcore_core::N_PHASES;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::Arc;

#[pyclass(name = "Topology", module = "evcore._core", frozen)]
pub struct PyTopology {
    pub inner: Arc<Topology>,
    /// The `charger_id` output column, built once (every control call returns it unchanged and
    /// checks the input's id column against it).
    pub charger_ids: StringArray,
    /// The node ids in site order (the node batch's `node_id` column is checked against it).
    pub node_ids: StringArray,
}

#[pymethods]
impl PyTopology {
    /// Parse and validate `{"site": …, "nodes": […], "chargers": […]}` (non-finite numbers as the
    /// strings "nan", "inf", "-inf"). Raises SiteConfigError naming the node and field.
    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<Self> {
        let t = py.detach(|| guarded(|| Topology::from_json(text))).py()?;
        let charger_ids = StringArray::from_iter_values(t.chargers.iter().map(|c| c.id.as_str()));
        let node_ids = StringArray::from_iter_values(t.nodes.iter().map(|n| n.id.as_str()));
        Ok(PyTopology {
            inner: Arc::new(t),
            charger_ids,
            node_ids,
        })
    }

    #[getter]
    fn site_id(&self) -> &str {
        &self.inner.site_id
    }
    #[getter]
    fn phase_names(&self) -> Vec<String> {
        self.inner.phase_names.to_vec()
    }
    #[getter]
    fn voltage_ln_v(&self) -> f64 {
        self.inner.voltage_ln_v
    }
    #[getter]
    fn n_nodes(&self) -> usize {
        self.inner.n_nodes()
    }
    #[getter]
    fn n_chargers(&self) -> usize {
        self.inner.n_chargers()
    }
    #[getter]
    fn node_ids(&self) -> Vec<String> {
        self.inner.nodes.iter().map(|n| n.id.clone()).collect()
    }
    #[getter]
    fn charger_ids(&self) -> Vec<String> {
        self.inner.chargers.iter().map(|c| c.id.clone()).collect()
    }

    /// Normalised node records (limits after derating; parent as an id or None).
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let t = &self.inner;
        let out = PyList::empty(py);
        for n in &t.nodes {
            let d = PyDict::new(py);
            d.set_item("id", &n.id)?;
            d.set_item("parent", n.parent.map(|p| t.nodes[p].id.clone()))?;
            d.set_item("kind", &n.kind)?;
            d.set_item("phase_limit_a", n.phase_limit_a.to_vec())?;
            d.set_item("power_limit_kw", n.power_limit_kw)?;
            d.set_item("unbalance_limit_a", n.unbalance_limit_a)?;
            d.set_item("other_load_max_a", n.other_load_max_a.to_vec())?;
            d.set_item("breaker_rating_a", n.breaker_rating_a.map(|r| r.to_vec()))?;
            d.set_item("continuous_derating", n.continuous_derating)?;
            d.set_item("depth", n.depth)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Normalised charger records (phases as site phase indices; DC min_a/max_a are line amps).
    fn chargers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let t = &self.inner;
        let out = PyList::empty(py);
        for c in &t.chargers {
            let d = PyDict::new(py);
            d.set_item("id", &c.id)?;
            d.set_item("ocpp_id", &c.ocpp_id)?;
            d.set_item("evse_id", c.evse_id)?;
            d.set_item("connector_id", c.connector_id)?;
            d.set_item("parent", &t.nodes[c.parent].id)?;
            d.set_item("kind", c.kind.as_str())?;
            d.set_item("wiring", c.wiring.as_str())?;
            d.set_item("phases", c.phases.clone())?;
            d.set_item("voltage_v", c.voltage_v)?;
            d.set_item("min_a", c.min_a)?;
            d.set_item("max_a", c.max_a)?;
            d.set_item("steps_a", c.steps_a.clone())?;
            d.set_item("single_phase_car", c.single_phase_car)?;
            let dc = c.kind == ChargerKind::Dc;
            d.set_item("max_w", if dc { Some(c.max_w) } else { None })?;
            d.set_item("min_w", if dc { Some(c.min_w) } else { None })?;
            d.set_item("efficiency", if dc { Some(c.efficiency) } else { None })?;
            d.set_item("aux_w", if dc { Some(c.aux_w) } else { None })?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Sparse phasor coefficients `(node, phase, charger, re, im)` as numpy arrays: the charger's
    /// per-phase current times `re + j·im` adds to that node's line on that site phase.
    #[allow(clippy::type_complexity)]
    fn line_coefficients<'py>(
        &self,
        py: Python<'py>,
    ) -> (
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<f64>>,
    ) {
        let rows = self.inner.line_coefficients();
        let node: Vec<i64> = rows.iter().map(|r| r.0 as i64).collect();
        let phase: Vec<i64> = rows.iter().map(|r| r.1 as i64).collect();
        let charger: Vec<i64> = rows.iter().map(|r| r.2 as i64).collect();
        let re: Vec<f64> = rows.iter().map(|r| r.3).collect();
        let im: Vec<f64> = rows.iter().map(|r| r.4).collect();
        (
            PyArray1::from_vec(py, node),
            PyArray1::from_vec(py, phase),
            PyArray1::from_vec(py, charger),
            PyArray1::from_vec(py, re),
            PyArray1::from_vec(py, im),
        )
    }

    /// Ancestor node indices of a charger, its parent first.
    fn ancestors<'py>(
        &self,
        py: Python<'py>,
        charger: usize,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        if charger >= self.inner.n_chargers() {
            return Err(crate::errors::input_err(
                "charger",
                Some(charger),
                "no such charger index",
            ));
        }
        let v: Vec<i64> = self
            .inner
            .ancestors(charger)
            .iter()
            .map(|&x| x as i64)
            .collect();
        let a = PyArray1::from_vec(py, v);
        a.readonly();
        Ok(a)
    }

    fn __repr__(&self) -> String {
        format!(
            "Topology(site={:?}, nodes={}, chargers={}, phases={})",
            self.inner.site_id,
            self.inner.n_nodes(),
            self.inner.n_chargers(),
            N_PHASES
        )
    }
}
