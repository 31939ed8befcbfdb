//! `evcore._core`: conversions between Python (Arrow, numpy) and the pure core.
//! Heavy work runs with the GIL released (`py.detach`); no panic reaches Python.
use pyo3::prelude::*;

mod planner;

pub mod control;
pub mod errors;
pub mod topology;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<topology::PyTopology>()?;
    m.add_function(wrap_pyfunction!(control::enforce, m)?)?;
    m.add_function(wrap_pyfunction!(control::allocate, m)?)?;
    m.add_function(wrap_pyfunction!(control::binding_codes, m)?)?;
    // How far back before a reading the caller looks for the setpoint it was taken under.
    m.add("RAISE_RAMP_S", evcore_core::allocator::RAISE_RAMP_S)?;
    planner::register(m)?;
    Ok(())
}
