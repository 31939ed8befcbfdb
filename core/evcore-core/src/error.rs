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
