//! Slot pools: where resident value pages live (host memory or device
//! buffers), and the embedding-bag that reads them through a page table.
//!
//! A pool has `slots` slots of `page_rows × dim` values in the bank's dtype
//! (f32, f16 or bf16: a 16-bit bank stays 16-bit in every pool, so a slot
//! takes [`memlayer_bank::pagein::ValueGeometry::slot_bytes`]); page `p` of
//! the value table is resident in slot `page_table[p]` ([`NO_SLOT`]
//! otherwise). Every pool widens the stored values exactly and sums in the
//! oracle's order, so a bag through a pool is bit-identical to the bag over
//! the full table decoded to f32 (`memlayer_core::bag::bag_forward`).

use memlayer_bank::cache::NO_SLOT;

/// Errors of a pool.
pub type PoolError = String;

/// One bag call through a page table (CSR bags, as `memlayer_core::bag`).
#[derive(Clone, Copy, Debug)]
pub struct PagedBag<'a> {
    /// Slot of each value page (`NO_SLOT`: not resident).
    pub page_table: &'a [u32],
    /// Value rows of all bags' entries.
    pub indices: &'a [u32],
    /// Weight of each entry.
    pub weights: &'a [f32],
    /// Start of each bag in `indices` (bags + 1).
    pub offsets: &'a [usize],
}

/// Resident value pages and the bag over them.
pub trait SlotPool: Send {
    /// Writes page data (`≤ page_rows × dim` values; a short last page
    /// leaves the slot's tail stale, never read) into `slot`.
    fn write_slot(&mut self, slot: u32, data: &[f32]) -> Result<(), PoolError>;

    /// `out[b] = Σ_{e in offsets[b]..offsets[b+1]} weights[e] · row(indices[e])`
    /// where row `r` is row `r % page_rows` of slot `page_table[r / page_rows]`.
    /// Every page an entry needs must be resident. → (bags, dim)
    fn bag(&mut self, bag: &PagedBag<'_>) -> Result<Vec<f32>, PoolError>;

    /// Becomes a pool of `slots` slots in which new slot `to` holds what
    /// slot `from` holds now, for each `(from, to)` of `kept` (every page
    /// that stays resident; `from == to` for those that do not move): the
    /// live budget change ([`memlayer_bank::pagein::PageIn::resize`]).
    /// On an error the pool is unchanged.
    fn resize(&mut self, slots: usize, kept: &[(u32, u32)]) -> Result<(), PoolError>;

    /// Bytes the pool holds.
    fn bytes(&self) -> u64;

    /// Where the slots live (`host` or the adapter's name).
    fn describe(&self) -> String;
}

/// Slots in host memory in the bank's dtype (an f16/bf16 bank stays
/// 16-bit), summed by `memlayer-cpu`'s paged gather, which widens each
/// element exactly and accumulates in f32 (bit-identical to the oracle over
/// the bank's values).
pub struct HostPool {
    rows: usize,
    dim: usize,
    page_rows: usize,
    slots: usize,
    data: HostSlots,
}

/// The slots' elements, in the bank's dtype.
enum HostSlots {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

/// `$body` with `$v` bound to the slot vector, whatever its element type.
macro_rules! with_slots {
    ($slots:expr, $v:ident => $body:expr) => {
        match $slots {
            HostSlots::F32($v) => $body,
            HostSlots::F16($v) => $body,
            HostSlots::Bf16($v) => $body,
        }
    };
}

impl HostPool {
    /// A pool of `slots` slots for a table of `rows × dim` in pages of
    /// `page_rows`, holding values of `dtype` (the bank's).
    pub fn new(
        rows: usize,
        dim: usize,
        page_rows: usize,
        slots: usize,
        dtype: memlayer_bank::Dtype,
    ) -> Result<Self, PoolError> {
        let len = slots * page_rows * dim;
        let data = match dtype {
            memlayer_bank::Dtype::F32 => HostSlots::F32(vec![0.0; len]),
            memlayer_bank::Dtype::F16 => HostSlots::F16(vec![half::f16::ZERO; len]),
            memlayer_bank::Dtype::Bf16 => HostSlots::Bf16(vec![half::bf16::ZERO; len]),
        };
        Ok(Self {
            rows,
            dim,
            page_rows,
            slots,
            data,
        })
    }
}

/// Narrows `src` into `dst` (same length). The drivers hand a page over
/// decoded to f32 (`memlayer_bank::drive`'s `write(slot, &[f32])`, one
/// callback for every pool and the browser); a value decoded from an f16 or
/// bf16 bank is exactly representable in it, so rounding it back gives the
/// stored bits (round to nearest even of an exact value is the value). That
/// keeps the drivers and the `SlotPool` trait dtype-free, at the cost of one
/// widening and narrowing per element of a fetched page: nothing beside the
/// checksum and the fetch.
fn narrow_into<T: memlayer_cpu::Storage>(dst: &mut [T], src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = T::from_f32(x);
    }
}

fn bag_over<T: memlayer_cpu::Storage>(
    pool: &HostPool,
    data: &[T],
    b: &PagedBag<'_>,
) -> Result<Vec<f32>, PoolError> {
    let bags = b.offsets.len().saturating_sub(1);
    let buffers = [data];
    let table = memlayer_cpu::PagedTable::new(
        pool.rows,
        pool.dim,
        pool.page_rows,
        b.page_table,
        pool.slots.max(1),
        &buffers,
    )
    .map_err(|e| e.to_string())?;
    let mut out = vec![0.0f32; bags * pool.dim];
    // on the ambient rayon pool (burn's, when called from the model)
    memlayer_cpu::bag::bag_forward(&table, b.indices, b.weights, b.offsets, &mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn resize_slots<T: memlayer_cpu::Storage>(
    data: &mut Vec<T>,
    slot_len: usize,
    slots: usize,
    kept: &[(u32, u32)],
) {
    // a slot a page moves to is free after the resize, never another's source
    for &(from, to) in kept {
        if from != to {
            let src = from as usize * slot_len;
            data.copy_within(src..src + slot_len, to as usize * slot_len);
        }
    }
    data.resize(slots * slot_len, T::zeroed());
    data.shrink_to_fit();
}

impl SlotPool for HostPool {
    fn write_slot(&mut self, slot: u32, data: &[f32]) -> Result<(), PoolError> {
        let slot_len = self.page_rows * self.dim;
        if slot as usize >= self.slots || data.len() > slot_len {
            return Err(format!(
                "slot {slot} / {} values do not fit a pool of {} slots × {slot_len}",
                data.len(),
                self.slots
            ));
        }
        let at = slot as usize * slot_len;
        with_slots!(&mut self.data, v => narrow_into(&mut v[at..][..data.len()], data));
        Ok(())
    }

    fn resize(&mut self, slots: usize, kept: &[(u32, u32)]) -> Result<(), PoolError> {
        let slot_len = self.page_rows * self.dim;
        if let Some(&(from, to)) = kept
            .iter()
            .find(|&&(from, to)| from as usize >= self.slots || to as usize >= slots)
        {
            return Err(format!(
                "moving slot {from} of {} to slot {to} of {slots}",
                self.slots
            ));
        }
        with_slots!(&mut self.data, v => resize_slots(v, slot_len, slots, kept));
        self.slots = slots;
        Ok(())
    }

    fn bag(&mut self, b: &PagedBag<'_>) -> Result<Vec<f32>, PoolError> {
        with_slots!(&self.data, v => bag_over(self, v, b))
    }

    fn bytes(&self) -> u64 {
        with_slots!(&self.data, v => std::mem::size_of_val(v.as_slice()) as u64)
    }

    fn describe(&self) -> String {
        let dtype = match self.data {
            HostSlots::F32(_) => "f32",
            HostSlots::F16(_) => "f16",
            HostSlots::Bf16(_) => "bf16",
        };
        format!("host memory ({dtype} slots)")
    }
}

/// Slots in device buffers (sharded by the adapter's binding limit), summed
/// by `bag_forward.wgsl` through the page table.
#[cfg(feature = "wgpu")]
pub struct DevicePool {
    ctx: std::sync::Arc<memlayer_wgpu::GpuContext>,
    kernels: memlayer_wgpu::bag_forward::BagForward,
    slots: memlayer_wgpu::ShardedTable,
    page_rows: usize,
    dim: usize,
}

/// The device storage of a bank's dtype: f32, or f16 / bf16 packed two per
/// u32 word and widened exactly in `bag_forward.wgsl`.
#[cfg(feature = "wgpu")]
pub fn gpu_dtype(dtype: memlayer_bank::Dtype) -> memlayer_wgpu::GpuDtype {
    match dtype {
        memlayer_bank::Dtype::F32 => memlayer_wgpu::GpuDtype::F32,
        memlayer_bank::Dtype::F16 => memlayer_wgpu::GpuDtype::F16,
        memlayer_bank::Dtype::Bf16 => memlayer_wgpu::GpuDtype::Bf16,
    }
}

#[cfg(feature = "wgpu")]
impl DevicePool {
    /// A pool of `slots` slots of `page_rows × dim` values of `dtype` (the
    /// bank's) on `ctx`'s device.
    pub fn new(
        ctx: std::sync::Arc<memlayer_wgpu::GpuContext>,
        dim: usize,
        page_rows: usize,
        slots: usize,
        dtype: memlayer_bank::Dtype,
    ) -> Result<Self, PoolError> {
        let kernels =
            memlayer_wgpu::bag_forward::BagForward::new(&ctx).map_err(|e| e.to_string())?;
        let table = memlayer_wgpu::ShardedTable::zeroed(
            &ctx,
            "page slots",
            slots * page_rows,
            dim,
            gpu_dtype(dtype),
            page_rows,
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            ctx,
            kernels,
            slots: table,
            page_rows,
            dim,
        })
    }
}

#[cfg(feature = "wgpu")]
impl SlotPool for DevicePool {
    fn write_slot(&mut self, slot: u32, data: &[f32]) -> Result<(), PoolError> {
        // values decoded from a 16-bit bank round back to their own bits
        // (see `narrow_into`)
        let words = memlayer_wgpu::buffers::encode_rows(data, self.dim, self.slots.dtype);
        self.slots
            .write_rows(&self.ctx, slot as usize * self.page_rows, &words)
            .map_err(|e| e.to_string())
    }

    fn resize(&mut self, slots: usize, kept: &[(u32, u32)]) -> Result<(), PoolError> {
        let table = memlayer_wgpu::ShardedTable::zeroed(
            &self.ctx,
            "page slots",
            slots * self.page_rows,
            self.dim,
            self.slots.dtype,
            self.page_rows,
        )
        .map_err(|e| e.to_string())?;
        let pairs: Vec<(usize, usize)> = kept
            .iter()
            .map(|&(from, to)| (from as usize, to as usize))
            .collect();
        table
            .copy_units_from(&self.ctx, &self.slots, self.page_rows, &pairs)
            .map_err(|e| e.to_string())?;
        self.slots = table;
        Ok(())
    }

    fn bag(&mut self, b: &PagedBag<'_>) -> Result<Vec<f32>, PoolError> {
        self.kernels
            .run_paged(
                &self.ctx,
                &self.slots,
                self.page_rows,
                b.page_table,
                b.indices,
                b.weights,
                b.offsets,
            )
            .map_err(|e| e.to_string())
    }

    fn bytes(&self) -> u64 {
        (self.slots.rows * self.slots.row_words() * 4) as u64
    }

    fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?} slots)",
            self.ctx.info.name, self.ctx.info.backend, self.slots.dtype
        )
    }
}

/// Slots on an NVIDIA GPU in the bank's dtype (f16/bf16 banks stay 16-bit
/// on the device), summed by `memlayer-cuda`'s bag kernel through the page
/// table (bit-identical to the host pool).
#[cfg(feature = "cuda")]
pub struct CudaPool {
    dev: std::sync::Arc<memlayer_cuda::CudaDevice>,
    slots: memlayer_cuda::PagedSlots,
}

#[cfg(feature = "cuda")]
impl CudaPool {
    /// A pool of `slots` slots of `page_rows × dim` values of `dtype` for a
    /// table of `rows` rows on `dev`.
    pub fn new(
        dev: std::sync::Arc<memlayer_cuda::CudaDevice>,
        rows: usize,
        dim: usize,
        page_rows: usize,
        slots: usize,
        dtype: memlayer_bank::Dtype,
    ) -> Result<Self, PoolError> {
        let slots = memlayer_cuda::PagedSlots::new(&dev, rows, dim, page_rows, slots, dtype)
            .map_err(|e| e.to_string())?;
        Ok(Self { dev, slots })
    }
}

#[cfg(feature = "cuda")]
impl SlotPool for CudaPool {
    fn write_slot(&mut self, slot: u32, data: &[f32]) -> Result<(), PoolError> {
        self.slots
            .write(&self.dev, slot as usize, data)
            .map_err(|e| e.to_string())
    }

    fn resize(&mut self, slots: usize, kept: &[(u32, u32)]) -> Result<(), PoolError> {
        self.slots = self
            .slots
            .resized(&self.dev, slots, kept)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn bag(&mut self, b: &PagedBag<'_>) -> Result<Vec<f32>, PoolError> {
        self.slots
            .bag(
                &self.dev,
                b.page_table,
                &memlayer_core::bag::Bags {
                    indices: b.indices,
                    weights: b.weights,
                    offsets: b.offsets,
                },
            )
            .map_err(|e| e.to_string())
    }

    fn bytes(&self) -> u64 {
        self.slots.bytes() as u64
    }

    fn describe(&self) -> String {
        format!("{} (CUDA, {:?} slots)", self.dev.name(), self.slots.dtype)
    }
}

/// Marks a non-resident page in a page table.
pub const MISSING: u32 = NO_SLOT;
