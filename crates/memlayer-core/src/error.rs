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
        /// Name of the tensor or argument that was checked.
        what: &'static str,
        /// Its documented shape (dimensions), formatted as text.
        shape: String,
        /// Number of elements the shape implies.
        expected: usize,
        /// Number of elements actually given.
        got: usize,
    },
    /// An index addresses a row outside the table.
    #[error("index {index} out of range for a table of {rows} rows")]
    IndexOutOfRange {
        /// The offending index (token id, row or node index).
        index: u64,
        /// Number of rows in the table; valid indices are `0..rows`.
        rows: usize,
    },
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
