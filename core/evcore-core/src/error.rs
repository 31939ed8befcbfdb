//! One error enum for the pure core; the binding crate maps each variant to one Python exception.
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// The site file (topology sections) is invalid. `node` is the node or charger id (or `site`).
    #[error("site config: {node}.{field}: {message}")]
    SiteConfig {
        node: String,
        field: String,
        message: String,
    },
    /// A bad input array or column; `row` when one row is at fault.
    #[error("input: column {column}{}: {message}", row.map(|r| format!(" row {r}")).unwrap_or_default())]
    Input {
        column: String,
        row: Option<usize>,
        message: String,
    },
    /// An optimisation failed (used by the planner).
    #[error("solver: {0}")]
    Solver(String),
    /// A bug: the binding caught a panic. Never expected; reported instead of crashing.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl CoreError {
    pub fn site(
        node: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        CoreError::SiteConfig {
            node: node.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn input(
        column: impl Into<String>,
        row: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        CoreError::Input {
            column: column.into(),
            row,
            message: message.into(),
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

/// Run core work so that a panic becomes `CoreError::Internal` (an `EvcoreError` in Python)
/// instead of unwinding into Python as a `PanicException` (the binding wraps every call in it).
pub fn guarded<T>(f: impl FnOnce() -> Result<T, CoreError>) -> Result<T, CoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(CoreError::Internal(what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_naming_it() {
        // The default hook would print the panic to stderr; the error carries it instead.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let a: CoreResult<()> = guarded(|| panic!("index {} out of range", 7));
        let b: CoreResult<()> = guarded(|| panic!("static message"));
        let c: CoreResult<()> = guarded(|| std::panic::panic_any(42u8));
        std::panic::set_hook(hook);
        assert_eq!(a, Err(CoreError::Internal("index 7 out of range".into())));
        assert_eq!(b, Err(CoreError::Internal("static message".into())));
        assert_eq!(c, Err(CoreError::Internal("panic".into())));
        assert_eq!(
            b.unwrap_err().to_string(),
            "internal error (please report): static message"
        );
        // Results and errors pass through unchanged.
        assert_eq!(guarded(|| Ok(3)), Ok(3));
        let e = CoreError::input("x", Some(1), "bad");
        assert_eq!(guarded(|| -> CoreResult<()> { Err(e.clone()) }), Err(e));
    }
}
