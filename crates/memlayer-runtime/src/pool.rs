//! Slot pools: where resident value pages live (host memory or device
//! buffers), and the embedding-bag that reads them through a page table.
//!
//! A pool has `slots` slots of `page_rows × dim` f32; page `p` of the value
//! table is resident in slot `page_table[p]` ([`NO_SLOT`] otherwise). Both
//! pools sum in the oracle's order, so a bag through a pool is bit-identical
//! to the bag over the full table (`memlayer_core::bag::bag_forward`).

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

/// Slots in host memory, summed by `memlayer-cpu`'s paged gather.
pub struct HostPool {
    rows: usize,
    dim: usize,
    page_rows: usize,
    slots: usize,
    data: Vec<f32>,
}

impl HostPool {
    /// A pool of `slots` slots for a table of `rows × dim` in pages of `page_rows`.
    pub fn new(rows: usize, dim: usize, page_rows: usize, slots: usize) -> Result<Self, PoolError> {
        Ok(Self {
            rows,
            dim,
            page_rows,
            slots,
            data: vec![0.0; slots * page_rows * dim],
        })
    }
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
        self.data[slot as usize * slot_len..][..data.len()].copy_from_slice(data);
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
        // a slot a page moves to is free after the resize, never another's source
        for &(from, to) in kept {
            if from != to {
                let src = from as usize * slot_len;
                self.data
                    .copy_within(src..src + slot_len, to as usize * slot_len);
            }
        }
        self.data.resize(slots * slot_len, 0.0);
        self.data.shrink_to_fit();
        self.slots = slots;
        Ok(())
    }

    fn bag(&mut self, b: &PagedBag<'_>) -> Result<Vec<f32>, PoolError> {
        let bags = b.offsets.len().saturating_sub(1);
        let buffers = [self.data.as_slice()];
        let table = memlayer_cpu::PagedTable::new(
            self.rows,
            self.dim,
            self.page_rows,
            b.page_table,
            self.slots.max(1),
            &buffers,
        )
        .map_err(|e| e.to_string())?;
        let mut out = vec![0.0f32; bags * self.dim];
        // on the ambient rayon pool (burn's, when called from the model)
        memlayer_cpu::bag::bag_forward(&table, b.indices, b.weights, b.offsets, &mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn bytes(&self) -> u64 {
        (self.data.len() * 4) as u64
    }

    fn describe(&self) -> String {
        "host memory".into()
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

#[cfg(feature = "wgpu")]
impl DevicePool {
    /// A pool of `slots` slots of `page_rows × dim` f32 on `ctx`'s device.
    pub fn new(
        ctx: std::sync::Arc<memlayer_wgpu::GpuContext>,
        dim: usize,
        page_rows: usize,
        slots: usize,
    ) -> Result<Self, PoolError> {
        let kernels =
            memlayer_wgpu::bag_forward::BagForward::new(&ctx).map_err(|e| e.to_string())?;
        let table = memlayer_wgpu::ShardedTable::zeroed(
            &ctx,
            "page slots",
            slots * page_rows,
            dim,
            memlayer_wgpu::GpuDtype::F32,
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
        let words =
            memlayer_wgpu::buffers::encode_rows(data, self.dim, memlayer_wgpu::GpuDtype::F32);
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
            memlayer_wgpu::GpuDtype::F32,
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
        (self.slots.rows * self.dim * 4) as u64
    }

    fn describe(&self) -> String {
        format!("{} ({:?})", self.ctx.info.name, self.ctx.info.backend)
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
