//! Storage of a value table: element types (f32, f16, bf16; compute is always
//! f32) and the two row sources the kernels read: a dense table and a paged
//! table read through a page table.

use crate::error::CpuError;
use half::{bf16, f16};

/// Element type of a stored table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (the upper half of an f32).
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A table element: stored narrow or wide, always widened to f32 to compute.
pub trait Storage: bytemuck::Pod + Send + Sync + sealed::Sealed + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type (round to nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Storage for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Storage for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Storage for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A source of table rows: what the embedding-bag kernels gather from.
pub trait Rows: Sync {
    /// Stored element type.
    type Elem: Storage;
    /// `(rows addressable by an index, row width)`.
    fn shape(&self) -> (usize, usize);
    /// Rows addressable by an index.
    fn rows(&self) -> usize {
        self.shape().0
    }
    /// Row width.
    fn dim(&self) -> usize {
        self.shape().1
    }
    /// Checks that every row in `indices` can be read (in range, page resident).
    fn check_indices(&self, indices: &[u32]) -> Result<(), CpuError>;
    /// Pointer to the first of the `dim` elements of row `r`.
    ///
    /// # Safety
    /// `r` must have passed [`Rows::check_indices`].
    unsafe fn row_ptr(&self, r: u32) -> *const Self::Elem;
}

fn check_range(indices: &[u32], rows: usize) -> Result<(), CpuError> {
    // max first: one vectorised pass in the common case
    match indices.iter().copied().max() {
        Some(m) if m as usize >= rows => Err(CpuError::IndexOutOfRange { index: m, rows }),
        _ => Ok(()),
    }
}

/// A dense row-major table. data: (rows, dim)
#[derive(Clone, Copy, Debug)]
pub struct Table<'a, T> {
    data: &'a [T],
    rows: usize,
    dim: usize,
}

impl<'a, T: Storage> Table<'a, T> {
    /// data: (rows, dim)
    pub fn new(data: &'a [T], rows: usize, dim: usize) -> Result<Self, CpuError> {
        crate::error::check_len("table", data.len(), rows * dim)?;
        if rows as u64 > u32::MAX as u64 + 1 {
            return Err(CpuError::InvalidConfig(format!(
                "{rows} rows cannot be addressed by u32 indices"
            )));
        }
        Ok(Self { data, rows, dim })
    }

    /// The elements, (rows, dim).
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &'a [T] {
        &self.data[r * self.dim..(r + 1) * self.dim]
    }
}

impl<T: Storage> Rows for Table<'_, T> {
    type Elem = T;
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.dim)
    }
    fn check_indices(&self, indices: &[u32]) -> Result<(), CpuError> {
        check_range(indices, self.rows)
    }
    #[inline(always)]
    unsafe fn row_ptr(&self, r: u32) -> *const T {
        // SAFETY: r < rows was checked, so the row lies inside `data` (and the product
        // cannot overflow; wrapping keeps overflow checks out of the hot loop).
        unsafe { self.data.as_ptr().add((r as usize).wrapping_mul(self.dim)) }
    }
}

/// A table read through a page table, as the runtime's page cache holds it.
///
/// Row `r` lives in page `r / page_rows`, at position `r % page_rows` of that
/// page. `page_to_slot[page]` is the slot holding the page; slot `s` is page
/// `s % slots_per_buffer` of buffer `s / slots_per_buffer`, and each slot is
/// `page_rows * dim` elements. A slot that is not backed by a buffer (e.g.
/// [`memlayer_bank::cache::NO_SLOT`]) marks a non-resident page.
#[derive(Clone, Copy, Debug)]
pub struct PagedTable<'a, T> {
    rows: usize,
    dim: usize,
    page_rows: u32,
    page_to_slot: &'a [u32],
    slots_per_buffer: u32,
    /// log2 of page_rows and slots_per_buffer when both are powers of two
    /// (shifts instead of divisions in the gather loop)
    shifts: Option<(u32, u32)>,
    buffers: &'a [&'a [T]],
}

impl<'a, T: Storage> PagedTable<'a, T> {
    /// rows, dim: the logical table (rows, dim); page_rows: rows per page;
    /// page_to_slot: (ceil(rows / page_rows)); buffers: each up to
    /// (slots_per_buffer, page_rows, dim) elements.
    pub fn new(
        rows: usize,
        dim: usize,
        page_rows: usize,
        page_to_slot: &'a [u32],
        slots_per_buffer: usize,
        buffers: &'a [&'a [T]],
    ) -> Result<Self, CpuError> {
        if page_rows == 0 || slots_per_buffer == 0 {
            return Err(CpuError::InvalidConfig(
                "page_rows and slots_per_buffer must be positive".into(),
            ));
        }
        if rows as u64 > u32::MAX as u64 + 1 || page_rows as u64 > u32::MAX as u64 {
            return Err(CpuError::InvalidConfig(format!(
                "{rows} rows / {page_rows} page rows cannot be addressed by u32"
            )));
        }
        let pages = rows.div_ceil(page_rows);
        if page_to_slot.len() < pages {
            return Err(CpuError::Shape {
                what: "page_to_slot",
                expected: pages,
                got: page_to_slot.len(),
            });
        }
        let slot_elems = page_rows * dim;
        if slots_per_buffer as u64 * buffers.len() as u64 > u32::MAX as u64 {
            return Err(CpuError::InvalidConfig("too many slots for u32 ids".into()));
        }
        for b in buffers {
            if b.len() > slots_per_buffer * slot_elems {
                return Err(CpuError::InvalidConfig(format!(
                    "a slot buffer of {} elements exceeds {slots_per_buffer} slots of {slot_elems}",
                    b.len()
                )));
            }
        }
        Ok(Self {
            rows,
            dim,
            page_rows: page_rows as u32,
            page_to_slot,
            slots_per_buffer: slots_per_buffer as u32,
            shifts: (page_rows.is_power_of_two() && slots_per_buffer.is_power_of_two()).then(
                || {
                    (
                        page_rows.trailing_zeros(),
                        slots_per_buffer.trailing_zeros(),
                    )
                },
            ),
            buffers,
        })
    }

    fn slot_ok(&self, slot: u32) -> bool {
        let b = (slot / self.slots_per_buffer) as usize;
        let s = (slot % self.slots_per_buffer) as usize;
        b < self.buffers.len()
            && (s + 1) * self.page_rows as usize * self.dim <= self.buffers[b].len()
    }
}

impl<T: Storage> Rows for PagedTable<'_, T> {
    type Elem = T;
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.dim)
    }
    fn check_indices(&self, indices: &[u32]) -> Result<(), CpuError> {
        check_range(indices, self.rows)?;
        for &r in indices {
            let page = (r / self.page_rows) as usize;
            let slot = self.page_to_slot[page];
            if !self.slot_ok(slot) {
                return Err(CpuError::PageNotResident { row: r, page, slot });
            }
        }
        Ok(())
    }
    #[inline(always)]
    unsafe fn row_ptr(&self, r: u32) -> *const T {
        let (page, within, spb_shift) = match self.shifts {
            Some((ps, ss)) => (r >> ps, r & (self.page_rows - 1), Some(ss)),
            None => {
                let page = r / self.page_rows;
                let within = r.wrapping_sub(page.wrapping_mul(self.page_rows));
                (page, within, None)
            }
        };
        // SAFETY: check_indices verified the page is mapped to a slot whose whole page lies
        // inside its buffer, and within < page_rows.
        unsafe {
            let slot = *self.page_to_slot.get_unchecked(page as usize);
            let (b, s) = match spb_shift {
                Some(ss) => (slot >> ss, slot & (self.slots_per_buffer - 1)),
                None => (slot / self.slots_per_buffer, slot % self.slots_per_buffer),
            };
            let base = self.buffers.get_unchecked(b as usize);
            let row_in_buf = (s as usize)
                .wrapping_mul(self.page_rows as usize)
                .wrapping_add(within as usize);
            base.as_ptr().add(row_in_buf.wrapping_mul(self.dim))
        }
    }
}

/// A table of a runtime-chosen element type: one variant per [`DType`],
/// each holding the table kind (dense [`TableRef`] or paged
/// [`PagedTableRef`]) of that element type.
#[derive(Clone, Copy, Debug)]
pub enum AnyDtype<F32, F16, Bf16> {
    /// f32 storage.
    F32(F32),
    /// f16 storage.
    F16(F16),
    /// bf16 storage.
    Bf16(Bf16),
}

impl<F32, F16, Bf16> AnyDtype<F32, F16, Bf16> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            AnyDtype::F32(_) => DType::F32,
            AnyDtype::F16(_) => DType::F16,
            AnyDtype::Bf16(_) => DType::Bf16,
        }
    }
}

/// A dense table of a runtime-chosen element type.
pub type TableRef<'a> = AnyDtype<Table<'a, f32>, Table<'a, f16>, Table<'a, bf16>>;

/// A paged table of a runtime-chosen element type.
pub type PagedTableRef<'a> =
    AnyDtype<PagedTable<'a, f32>, PagedTable<'a, f16>, PagedTable<'a, bf16>>;

/// Rounds f32 values to `T` (for building narrow tables and their oracle twins).
pub fn narrow<T: Storage>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// Widens `T` values to f32.
pub fn widen<T: Storage>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}
