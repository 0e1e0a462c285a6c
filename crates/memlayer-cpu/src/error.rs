//! Errors of the optimised CPU path.

use std::fmt;

/// Why an op of the CPU path cannot run on its inputs.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuError {
    /// A tensor has the wrong number of elements for its documented shape.
    Shape {
        /// Which argument.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// `offsets` is not a valid CSR offset array for the entries.
    Offsets(String),
    /// An index addresses a row outside the table.
    IndexOutOfRange {
        /// The offending row id.
        index: u32,
        /// Rows of the table.
        rows: usize,
    },
    /// A row's page is not resident (`page_to_slot[page]` is no valid slot).
    PageNotResident {
        /// The row asked for.
        row: u32,
        /// Its page.
        page: usize,
        /// The slot the page table holds for it.
        slot: u32,
    },
    /// A configuration value is out of its domain.
    InvalidConfig(String),
    /// The rayon thread pool could not be built.
    ThreadPool(String),
}

impl fmt::Display for CpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuError::Shape {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch for `{what}`: expected {expected} elements, got {got}"
            ),
            CpuError::Offsets(m) => write!(f, "invalid offsets: {m}"),
            CpuError::IndexOutOfRange { index, rows } => {
                write!(f, "index {index} out of range for a table of {rows} rows")
            }
            CpuError::PageNotResident { row, page, slot } => write!(
                f,
                "row {row} lives in page {page}, which is not resident (page table slot {slot})"
            ),
            CpuError::InvalidConfig(m) => write!(f, "invalid config: {m}"),
            CpuError::ThreadPool(m) => write!(f, "cannot build the thread pool: {m}"),
        }
    }
}

impl std::error::Error for CpuError {}

impl From<memlayer_core::error::OracleError> for CpuError {
    fn from(e: memlayer_core::error::OracleError) -> Self {
        CpuError::InvalidConfig(e.to_string())
    }
}

/// Checks that `len == expected`.
pub(crate) fn check_len(what: &'static str, len: usize, expected: usize) -> Result<(), CpuError> {
    if len == expected {
        Ok(())
    } else {
        Err(CpuError::Shape {
            what,
            expected,
            got: len,
        })
    }
}
