//! Errors of the CPU oracle (configs and shapes).

/// A configuration or tensor that the oracle cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OracleError {
    /// A configuration value is out of its domain.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A tensor has the wrong number of elements for its documented shape.
    #[error("shape mismatch for `{what}`: expected {expected} elements {shape}, got {got}")]
    Shape {
        what: &'static str,
        shape: String,
        expected: usize,
        got: usize,
    },
    /// An index addresses a row outside the table.
    #[error("index {index} out of range for a table of {rows} rows")]
    IndexOutOfRange { index: u64, rows: usize },
}

/// Checks that `data` has exactly `dims.iter().product()` elements.
pub fn check_len(what: &'static str, data: &[f32], dims: &[usize]) -> Result<(), OracleError> {
    let expected: usize = dims.iter().product();
    if data.len() == expected {
        Ok(())
    } else {
        Err(OracleError::Shape {
            what,
            shape: format!("{dims:?}"),
            expected,
            got: data.len(),
        })
    }
}
