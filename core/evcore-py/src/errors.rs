//! The Python exception hierarchy under `evcore._core` and the one conversion from `CoreError`.
//!
//! `SiteConfigError` and `InputError` subclass both `EvcoreError` and `ValueError`, and
//! `SolverError` both `EvcoreError` and `RuntimeError`; `create_exception!` takes one base, so
//! these three are built at import with `type(name, (EvcoreError, ValueError), …)`.
use evcore_core::CoreError;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

pyo3::create_exception!(
    _core,
    EvcoreError,
    PyException,
    "Base class of every evcore error."
);

static SITE_CONFIG_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INPUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SOLVER_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn make_type(
    py: Python<'_>,
    name: &str,
    second: Bound<'_, PyType>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, [py.get_type::<EvcoreError>(), second])?;
    let ns = PyDict::new(py);
    ns.set_item("__module__", "evcore._core")?;
    ns.set_item("__doc__", doc)?;
    let builtins = py.import("builtins")?;
    let ty = builtins.getattr("type")?.call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

fn site_config_error(py: Python<'_>) -> PyResult<&Py<PyType>> {
    SITE_CONFIG_ERROR.get_or_try_init(py, || {
        make_type(
            py,
            "SiteConfigError",
            py.get_type::<PyValueError>(),
            "The site file is invalid; `.node` and `.field` name what is wrong.",
        )
    })
}
fn input_error(py: Python<'_>) -> PyResult<&Py<PyType>> {
    INPUT_ERROR.get_or_try_init(py, || {
        make_type(
            py,
            "InputError",
            py.get_type::<PyValueError>(),
            "A bad input array or record batch; `.column` and `.row` (or None) name it.",
        )
    })
}
fn solver_error(py: Python<'_>) -> PyResult<&Py<PyType>> {
    SOLVER_ERROR.get_or_try_init(py, || {
        make_type(
            py,
            "SolverError",
            py.get_type::<PyRuntimeError>(),
            "An optimisation did not reach a usable solution.",
        )
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("EvcoreError", py.get_type::<EvcoreError>())?;
    m.add("SiteConfigError", site_config_error(py)?.bind(py))?;
    m.add("InputError", input_error(py)?.bind(py))?;
    m.add("SolverError", solver_error(py)?.bind(py))?;
    Ok(())
}

fn build(py: Python<'_>, e: CoreError) -> PyResult<PyErr> {
    let msg = e.to_string();
    let (ty, attrs): (&Py<PyType>, Vec<(&str, Py<PyAny>)>) = match e {
        CoreError::SiteConfig { node, field, .. } => (
            site_config_error(py)?,
            vec![
                ("node", node.into_pyobject(py)?.into_any().unbind()),
                ("field", field.into_pyobject(py)?.into_any().unbind()),
            ],
        ),
        CoreError::Input { column, row, .. } => (
            input_error(py)?,
            vec![
                ("column", column.into_pyobject(py)?.into_any().unbind()),
                ("row", row.into_pyobject(py)?.into_any().unbind()),
            ],
        ),
        CoreError::Solver(_) => (solver_error(py)?, vec![]),
        CoreError::Internal(_) => return Ok(EvcoreError::new_err(msg)),
    };
    let inst = ty.bind(py).call1((msg,))?;
    for (k, v) in attrs {
        inst.setattr(k, v)?;
    }
    Ok(PyErr::from_value(inst))
}

/// The one conversion from a core error to its Python exception.
pub fn core_err(e: CoreError) -> PyErr {
    Python::attach(|py| build(py, e).unwrap_or_else(|err| err))
}

/// `result.py()?` in binding code (planner.rs uses it too).
pub trait CoreResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> CoreResultExt<T> for Result<T, CoreError> {
    fn py(self) -> PyResult<T> {
        self.map_err(core_err)
    }
}

/// An `InputError` raised from binding code (bad column type, nulls, row order).
pub fn input_err(column: &str, row: Option<usize>, message: impl Into<String>) -> PyErr {
    core_err(CoreError::input(column, row, message))
}

pub use evcore_core::error::guarded;
