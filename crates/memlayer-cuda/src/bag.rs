//! The embedding-bag on CUDA (`bag_forward.cu`, `bag_backward.cu`): the
//! forward over a table in its storage dtype, the table gradient through the
//! reverse index and the per-sample-weight gradient. Inputs are checked on
//! the host with the oracle's rules (`memlayer_core::bag::check_bags`) before
//! anything is uploaded.

use crate::device::{CudaDevice, DeviceTable};
use crate::{CudaError, kernels};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use memlayer_bank::Dtype;
use memlayer_core::bag::{Bags, SparseRows, check_bags};

/// Threads per block of the bag kernels.
const BLOCK: u32 = 256;

/// A u32 count for a kernel argument, or the limit named.
fn u32_of(what: &str, n: usize) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| {
        CudaError::Unsupported(format!("{what} = {n}: the CUDA kernels take 32-bit counts"))
    })
}

/// Blocks of [`BLOCK`] threads covering `threads`.
fn grid(threads: u64) -> Result<LaunchConfig, CudaError> {
    let blocks = u32::try_from(threads.div_ceil(u64::from(BLOCK)))
        .map_err(|_| CudaError::Unsupported(format!("{threads} threads exceed one launch grid")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A batch of bags on the device (CSR: indices, weights, offsets), checked
/// against a table of `rows` rows when uploaded.
pub struct BagBatch {
    indices: CudaSlice<u32>,
    weights: CudaSlice<f32>,
    offsets: CudaSlice<u32>,
    /// Bags.
    pub bags: usize,
    /// Entries (all bags).
    pub nnz: usize,
}

impl BagBatch {
    /// Checks the batch ([`Bags::check`]: lengths, offsets, every index
    /// below `rows`) and uploads it.
    pub fn upload(dev: &CudaDevice, rows: usize, b: &Bags<'_>) -> Result<Self, CudaError> {
        let bags = b.check(rows)?;
        u32_of("entries", b.indices.len())?;
        let off: Vec<u32> = b.offsets.iter().map(|&o| o as u32).collect();
        Ok(Self {
            indices: dev.upload("bag indices", b.indices)?,
            weights: dev.upload("bag weights", b.weights)?,
            offsets: dev.upload("bag offsets", &off)?,
            bags,
            nnz: b.indices.len(),
        })
    }

    /// The batch as the kernels take it.
    pub fn as_ref(&self) -> BagsRef<'_> {
        BagsRef {
            indices: &self.indices,
            weights: &self.weights,
            offsets: &self.offsets,
            bags: self.bags,
            nnz: self.nnz,
        }
    }
}

/// A batch of bags already on the device, borrowed (a [`BagBatch`], or
/// buffers built on the device by an earlier op): the entries'
/// rows and weights (nnz each), the bags' offsets (bags + 1). Rows outside
/// the table are skipped by the kernels.
#[derive(Clone, Copy)]
pub struct BagsRef<'a> {
    /// Row of each entry: (nnz).
    pub indices: &'a CudaSlice<u32>,
    /// Weight of each entry: (nnz).
    pub weights: &'a CudaSlice<f32>,
    /// CSR offsets: (bags + 1), non-decreasing, the last ≤ nnz.
    pub offsets: &'a CudaSlice<u32>,
    /// Bags.
    pub bags: usize,
    /// Entries.
    pub nnz: usize,
}

impl BagsRef<'_> {
    /// Whether the buffers hold what the counts say.
    fn check(&self) -> Result<(), CudaError> {
        if self.indices.len() < self.nnz
            || self.weights.len() < self.nnz
            || self.offsets.len() < self.bags + 1
        {
            return Err(CudaError::Unsupported(format!(
                "a batch of {} bags and {} entries in buffers of {} rows, {} weights, {} offsets",
                self.bags,
                self.nnz,
                self.indices.len(),
                self.weights.len(),
                self.offsets.len()
            )));
        }
        Ok(())
    }
}

/// A table on the device as the kernels read it: (rows, dim) elements of
/// `dtype` (a [`DeviceTable`], or a borrowed buffer).
#[derive(Clone, Copy)]
pub struct TableRef<'a> {
    /// The bytes: at least rows × dim × dtype size.
    pub data: &'a CudaSlice<u8>,
    /// Rows.
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// Storage dtype.
    pub dtype: Dtype,
}

impl TableRef<'_> {
    fn check(&self) -> Result<(), CudaError> {
        let bytes = self
            .rows
            .checked_mul(self.dim)
            .and_then(|n| n.checked_mul(self.dtype.size()));
        match bytes {
            Some(b) if b <= self.data.len() => Ok(()),
            _ => Err(CudaError::Unsupported(format!(
                "a table of {} × {} {:?} in a buffer of {} bytes",
                self.rows,
                self.dim,
                self.dtype,
                self.data.len()
            ))),
        }
    }
}

impl DeviceTable {
    /// The table as the kernels take it.
    pub fn as_ref(&self) -> TableRef<'_> {
        TableRef {
            data: &self.data,
            rows: self.rows,
            dim: self.dim,
            dtype: self.dtype,
        }
    }
}

/// The forward kernel of a storage dtype.
fn forward_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "bag_forward_f32",
        Dtype::F16 => "bag_forward_f16",
        Dtype::Bf16 => "bag_forward_bf16",
    }
}

/// Rows resolved through a page table: (the page table on the device, its
/// entries, rows per page).
type Paging<'a> = Option<(&'a CudaSlice<u32>, u32, u32)>;

/// Enqueues `bag_forward_*` of `batch` over `data` (rows × dim of `dtype`,
/// or slots through `paging`) into `out`.
#[allow(clippy::too_many_arguments)]
fn launch_bag(
    dev: &CudaDevice,
    data: &CudaSlice<u8>,
    dtype: Dtype,
    rows: usize,
    dim: usize,
    paging: Paging<'_>,
    batch: BagsRef<'_>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    batch.check()?;
    if out.len() < batch.bags * dim {
        return Err(CudaError::Unsupported(format!(
            "output of {} floats for {} bags of {dim}",
            out.len(),
            batch.bags
        )));
    }
    if batch.bags == 0 {
        return Ok(());
    }
    let f = dev.function(&kernels::BAG_FORWARD, forward_kernel(dtype))?;
    let (rows, dim, bags) = (
        u32_of("rows", rows)?,
        u32_of("dim", dim)?,
        u32_of("bags", batch.bags)?,
    );
    let cfg = grid(u64::from(bags) * u64::from(dim.div_ceil(4)))?;
    let null = 0u64;
    let (pages, page_rows) = paging.map_or((0, 1), |p| (p.1, p.2));
    let mut launch = dev.stream().launch_builder(&f);
    launch.arg(data).arg(&rows).arg(&dim);
    match paging {
        Some((table, _, _)) => launch.arg(table),
        None => launch.arg(&null),
    };
    launch
        .arg(&pages)
        .arg(&page_rows)
        .arg(batch.indices)
        .arg(batch.weights)
        .arg(batch.offsets)
        .arg(&bags)
        .arg(out);
    // SAFETY: the arguments match bag_forward_*'s signature; every buffer
    // holds the elements the kernel reads (checked at upload), and the
    // kernel skips rows outside the table or its resident pages.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaError::driver("launching bag_forward", e))?;
    Ok(())
}

/// Enqueues the forward of `batch` over `table` into `out` (bags, dim) f32
/// (no wait: time it with events, or read `out`).
pub fn bag_forward_into(
    dev: &CudaDevice,
    table: &DeviceTable,
    batch: &BagBatch,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    bag_forward_on(dev, table.as_ref(), batch.as_ref(), out)
}

/// Enqueues the forward of `bags` over `table` into `out` (bags, dim) f32,
/// all on the device (no wait): the op training runs on burn's buffers.
pub fn bag_forward_on(
    dev: &CudaDevice,
    table: TableRef<'_>,
    bags: BagsRef<'_>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    table.check()?;
    launch_bag(
        dev,
        table.data,
        table.dtype,
        table.rows,
        table.dim,
        None,
        bags,
        out,
    )
}

/// Value pages resident on the device in their storage dtype: `slots`
/// slots of `page_rows` rows of a table of `rows × dim`, and the bag
/// through a page table (the paged memory's device pool).
pub struct PagedSlots {
    data: CudaSlice<u8>,
    /// Rows of the whole table.
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// Rows per page (and per slot).
    pub page_rows: usize,
    /// Slots.
    pub slots: usize,
    /// Storage dtype of the slots (the bank's).
    pub dtype: Dtype,
}

impl PagedSlots {
    /// `slots` zeroed slots of `page_rows × dim` values of `dtype`.
    pub fn new(
        dev: &CudaDevice,
        rows: usize,
        dim: usize,
        page_rows: usize,
        slots: usize,
        dtype: Dtype,
    ) -> Result<Self, CudaError> {
        let bytes = slots
            .checked_mul(page_rows)
            .and_then(|n| n.checked_mul(dim))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| {
                CudaError::Unsupported(format!("{slots} slots of {page_rows} × {dim} overflow"))
            })?;
        Ok(Self {
            data: dev.zeros("page slots", bytes)?,
            rows,
            dim,
            page_rows,
            slots,
            dtype,
        })
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.slots * self.page_rows * self.dim * self.dtype.size()
    }

    /// `slots` slots (a new allocation) where slot `to` holds what slot
    /// `from` of `self` holds, for each `(from, to)` of `kept` (device to
    /// device copies; the others zeroed): the paged memory's live resize.
    pub fn resized(
        &self,
        dev: &CudaDevice,
        slots: usize,
        kept: &[(u32, u32)],
    ) -> Result<Self, CudaError> {
        let slot_bytes = self.page_rows * self.dim * self.dtype.size();
        let mut out = Self::new(dev, self.rows, self.dim, self.page_rows, slots, self.dtype)?;
        for &(from, to) in kept {
            let (from, to) = (from as usize, to as usize);
            if from >= self.slots || to >= slots {
                return Err(CudaError::Unsupported(format!(
                    "moving slot {from} of {} to slot {to} of {slots}",
                    self.slots
                )));
            }
            let src = self.data.slice(from * slot_bytes..(from + 1) * slot_bytes);
            let mut dst = out.data.slice_mut(to * slot_bytes..(to + 1) * slot_bytes);
            dev.stream()
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| CudaError::driver(format!("moving slot {from} to {to}"), e))?;
        }
        Ok(out)
    }

    /// Writes a page's values (`≤ page_rows × dim`, f32 as decoded from the
    /// bank; stored back in the slots' dtype, exactly for values that came
    /// from it) into `slot`.
    pub fn write(
        &mut self,
        dev: &CudaDevice,
        slot: usize,
        values: &[f32],
    ) -> Result<(), CudaError> {
        let slot_len = self.page_rows * self.dim;
        if slot >= self.slots || values.len() > slot_len {
            return Err(CudaError::Unsupported(format!(
                "slot {slot} / {} values do not fit {} slots of {slot_len}",
                values.len(),
                self.slots
            )));
        }
        let bytes = memlayer_bank::encode(self.dtype, values);
        let start = slot * slot_len * self.dtype.size();
        let mut dst = self.data.slice_mut(start..start + bytes.len());
        dev.stream()
            .memcpy_htod(&bytes, &mut dst)
            .map_err(|e| CudaError::driver(format!("writing slot {slot}"), e))
    }

    /// `out[b] = Σ_{e in bag b} weights[e] · row(indices[e])`, row `r` read
    /// from slot `page_table[r / page_rows]` → (bags, dim); bit-identical to
    /// the bag over the whole table when every page read is resident.
    pub fn bag(
        &self,
        dev: &CudaDevice,
        page_table: &[u32],
        bags: &Bags<'_>,
    ) -> Result<Vec<f32>, CudaError> {
        let batch = BagBatch::upload(dev, self.rows, bags)?;
        let pages = u32_of("pages", page_table.len())?;
        let table = dev.upload("the page table", page_table)?;
        let mut out = dev.zeros::<f32>("bag output", batch.bags * self.dim)?;
        let paging = Some((&table, pages, u32_of("page rows", self.page_rows)?));
        launch_bag(
            dev,
            &self.data,
            self.dtype,
            self.rows,
            self.dim,
            paging,
            batch.as_ref(),
            &mut out,
        )?;
        dev.download("bag output", &out, batch.bags * self.dim)
    }
}

/// Forward: `out[b] = Σ_{e in bag b} weights[e] · table[indices[e]]`,
/// (bags, dim) f32; bit-identical to `memlayer_core::bag::bag_forward` over
/// the table as stored.
pub fn bag_forward(
    dev: &CudaDevice,
    table: &DeviceTable,
    bags: &Bags<'_>,
) -> Result<Vec<f32>, CudaError> {
    let batch = BagBatch::upload(dev, table.rows, bags)?;
    let mut out = dev.zeros::<f32>("bag output", batch.bags * table.dim)?;
    bag_forward_into(dev, table, &batch, &mut out)?;
    dev.download("bag output", &out, batch.bags * table.dim)
}

/// Bag of each entry: (nnz), from the bags' CSR offsets (bags + 1).
pub fn bag_of(offsets: &[usize]) -> Vec<u32> {
    let mut out = vec![0u32; offsets.last().copied().unwrap_or(0)];
    for (b, w) in offsets.windows(2).enumerate() {
        out[w[0]..w[1]].fill(b as u32);
    }
    out
}

/// The reverse index of `indices`: entries sorted by (row, position), the
/// start of each row's segment (segments + 1) and the segments' rows.
pub fn reverse_index(indices: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..indices.len() as u32).collect();
    order.sort_unstable_by_key(|&e| (indices[e as usize], e));
    let mut starts = Vec::new();
    let mut rows = Vec::new();
    for (i, &e) in order.iter().enumerate() {
        let r = indices[e as usize];
        if rows.last() != Some(&r) {
            rows.push(r);
            starts.push(i as u32);
        }
    }
    starts.push(order.len() as u32);
    (order, starts, rows)
}

/// The reverse index of a batch on the device (Meta's `reverse_indices`):
/// the entries sorted by (row, position), each row's segment, the segments'
/// rows and the bag of each entry. Built on the host from the entries' rows
/// — the one place the table gradient's order is decided, so it is the
/// oracle's: each row sums its entries in ascending position.
pub struct ReverseIndex {
    order: CudaSlice<u32>,
    starts: CudaSlice<u32>,
    seg_rows_dev: CudaSlice<u32>,
    bag_of: CudaSlice<u32>,
    /// The rows with a gradient, ascending (one per segment).
    pub seg_rows: Vec<u32>,
    /// Entries.
    pub nnz: usize,
    /// Bags.
    pub bags: usize,
}

impl ReverseIndex {
    /// The index of entries with rows `indices` (nnz) in bags `offsets`
    /// (bags + 1, checked: non-decreasing from 0 to nnz), uploaded.
    pub fn build(dev: &CudaDevice, indices: &[u32], offsets: &[usize]) -> Result<Self, CudaError> {
        let zeros = vec![0.0f32; indices.len()];
        let bags = check_bags(usize::MAX, indices, &zeros, offsets)?;
        u32_of("entries", indices.len())?;
        let (order, starts, seg_rows) = reverse_index(indices);
        u32_of("segments", seg_rows.len())?;
        Ok(Self {
            order: dev.upload("the reverse index", &order)?,
            starts: dev.upload("segment starts", &starts)?,
            seg_rows_dev: dev.upload("segment rows", &seg_rows)?,
            bag_of: dev.upload("entry bags", &bag_of(offsets))?,
            seg_rows,
            nnz: indices.len(),
            bags,
        })
    }

    /// Rows with a gradient.
    pub fn segments(&self) -> usize {
        self.seg_rows.len()
    }

    /// The bag of each entry: (nnz).
    pub fn bag_of(&self) -> &CudaSlice<u32> {
        &self.bag_of
    }
}

/// Enqueues the table gradient `dtable[row(e)] += weights[e] · grad_out[bag(e)]`
/// of the batch `rix` indexes (each row's entries summed in ascending
/// position: bit-identical to `memlayer_core::bag::bag_backward_table`)
/// into `out`: with `dense`, the touched rows of a zeroed (rows, dim)
/// gradient, else the (segments, dim) rows in `rix.seg_rows` order. No wait.
pub fn table_grad_into(
    dev: &CudaDevice,
    rix: &ReverseIndex,
    dim: usize,
    weights: &CudaSlice<f32>,
    grad_out: &CudaSlice<f32>,
    dense: bool,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let segments = rix.segments();
    if segments == 0 || dim == 0 {
        return Ok(());
    }
    let out_rows = if dense {
        rix.seg_rows.last().map_or(0, |&r| r as usize + 1)
    } else {
        segments
    };
    if weights.len() < rix.nnz || grad_out.len() < rix.bags * dim || out.len() < out_rows * dim {
        return Err(CudaError::Unsupported(format!(
            "table gradient of {} entries, {} bags of {dim}: buffers of {} weights, {} gradients,              an output of {} (needs {})",
            rix.nnz,
            rix.bags,
            weights.len(),
            grad_out.len(),
            out.len(),
            out_rows * dim
        )));
    }
    let d = u32_of("dim", dim)?;
    let n_seg = u32_of("segments", segments)?;
    let f = dev.function(&kernels::BAG_BACKWARD, "bag_backward_table")?;
    let dense = u32::from(dense);
    let cfg = grid(u64::from(n_seg) * u64::from(d.div_ceil(4)))?;
    let mut launch = dev.stream().launch_builder(&f);
    launch
        .arg(&d)
        .arg(&rix.order)
        .arg(&rix.starts)
        .arg(&rix.seg_rows_dev)
        .arg(&n_seg)
        .arg(&rix.bag_of)
        .arg(weights)
        .arg(grad_out)
        .arg(&dense)
        .arg(out);
    // SAFETY: arguments match bag_backward_table; the index's arrays come
    // from `build`, the other buffers' sizes are checked above.
    unsafe { launch.launch(cfg) }
        .map_err(|e| CudaError::driver("launching bag_backward_table", e))?;
    Ok(())
}

/// Table gradient `dtable[indices[e]] += weights[e] · grad_out[bag(e)]`,
/// per row in ascending entry position (the reverse index): the touched
/// rows and their gradients, bit-identical to
/// `memlayer_core::bag::bag_backward_table`. grad_out: (bags, dim).
pub fn bag_backward_table(
    dev: &CudaDevice,
    (rows, dim): (usize, usize),
    b: &Bags<'_>,
    grad_out: &[f32],
) -> Result<SparseRows, CudaError> {
    let bags = b.check(rows)?;
    memlayer_core::error::check_len("grad_out", grad_out, &[bags, dim])?;
    let rix = ReverseIndex::build(dev, b.indices, b.offsets)?;
    let segments = rix.segments();
    if segments == 0 {
        return Ok(SparseRows::empty(dim));
    }
    let weights = dev.upload("bag weights", b.weights)?;
    let grad = dev.upload("grad_out", grad_out)?;
    let mut out = dev.zeros::<f32>("table gradient", segments * dim)?;
    table_grad_into(dev, &rix, dim, &weights, &grad, false, &mut out)?;
    Ok(SparseRows {
        dim,
        grads: dev.download("table gradient", &out, segments * dim)?,
        rows: rix.seg_rows,
    })
}

/// Enqueues the per-sample-weight gradient `dweights[e] = table[indices[e]]
/// · grad_out[bag_of[e]]` (nnz) into `out` (no wait); entries whose row is
/// outside the table get 0.
pub fn weights_grad_into(
    dev: &CudaDevice,
    table: TableRef<'_>,
    indices: &CudaSlice<u32>,
    bag_of: &CudaSlice<u32>,
    nnz: usize,
    grad_out: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    table.check()?;
    let n = u32_of("entries", nnz)?;
    if n == 0 {
        return Ok(());
    }
    if indices.len() < nnz || bag_of.len() < nnz || out.len() < nnz {
        return Err(CudaError::Unsupported(format!(
            "weight gradient of {nnz} entries in buffers of {} rows, {} bags, {} outputs",
            indices.len(),
            bag_of.len(),
            out.len()
        )));
    }
    let name = match table.dtype {
        Dtype::F32 => "bag_backward_weights_f32",
        Dtype::F16 => "bag_backward_weights_f16",
        Dtype::Bf16 => "bag_backward_weights_bf16",
    };
    let f = dev.function(&kernels::BAG_BACKWARD, name)?;
    let (rows, dim) = (u32_of("rows", table.rows)?, u32_of("dim", table.dim)?);
    let cfg = grid(u64::from(n) * 32)?;
    let mut launch = dev.stream().launch_builder(&f);
    launch
        .arg(table.data)
        .arg(&rows)
        .arg(&dim)
        .arg(indices)
        .arg(bag_of)
        .arg(&n)
        .arg(grad_out)
        .arg(out);
    // SAFETY: arguments match bag_backward_weights_*; one warp per entry;
    // the buffers hold nnz entries (checked) and the kernel reads the rows
    // of grad_out its bag_of names (the caller's batch).
    unsafe { launch.launch(cfg) }
        .map_err(|e| CudaError::driver("launching bag_backward_weights", e))?;
    Ok(())
}

/// Per-sample-weight gradient `dweights[e] = table[indices[e]] · grad_out[bag(e)]`
/// (nnz), within f32 rounding of `memlayer_core::bag::bag_backward_weights`
/// (a warp sums each dot product as a tree).
pub fn bag_backward_weights(
    dev: &CudaDevice,
    table: &DeviceTable,
    indices: &[u32],
    offsets: &[usize],
    grad_out: &[f32],
) -> Result<Vec<f32>, CudaError> {
    let zeros = vec![0.0f32; indices.len()];
    let bags = check_bags(table.rows, indices, &zeros, offsets)?;
    memlayer_core::error::check_len("grad_out", grad_out, &[bags, table.dim])?;
    if indices.is_empty() {
        return Ok(Vec::new());
    }
    let idx = dev.upload("bag indices", indices)?;
    let bag_of = dev.upload("entry bags", &bag_of(offsets))?;
    let grad = dev.upload("grad_out", grad_out)?;
    let mut out = dev.zeros::<f32>("weight gradient", indices.len())?;
    weights_grad_into(
        dev,
        table.as_ref(),
        &idx,
        &bag_of,
        indices.len(),
        &grad,
        &mut out,
    )?;
    dev.download("weight gradient", &out, indices.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda_for_tests;
    use memlayer_core::bag;
    use memlayer_core::rng::Rng;

    fn bags_of<'a>(indices: &'a [u32], weights: &'a [f32], offsets: &'a [usize]) -> Bags<'a> {
        Bags {
            indices,
            weights,
            offsets,
        }
    }

    #[test]
    fn reverse_index_groups_rows_in_entry_order() {
        let (order, starts, rows) = reverse_index(&[5, 1, 5, 0, 1, 5]);
        assert_eq!(rows, [0, 1, 5]);
        assert_eq!(starts, [0, 1, 3, 6]);
        assert_eq!(order, [3, 1, 4, 0, 2, 5]);
        assert_eq!(bag_of(&[0, 2, 2, 5]), [0, 0, 2, 2, 2]);
    }

    /// A random batch: `bags` bags of 0..=max entries (empty bags included),
    /// indices drawn from a few hot rows and the whole table (repeats).
    fn batch(rows: usize, bags: usize, max: usize, seed: u64) -> (Vec<u32>, Vec<f32>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let mut offsets = vec![0];
        let (mut idx, mut w) = (Vec::new(), Vec::new());
        for b in 0..bags {
            let n = if b % 5 == 3 {
                0
            } else {
                rng.below(max as u64 + 1) as usize
            };
            for _ in 0..n {
                let r = if rng.below(3) == 0 {
                    rng.below(4)
                } else {
                    rng.below(rows as u64)
                };
                idx.push(r as u32);
                w.push(rng.normal());
            }
            offsets.push(idx.len());
        }
        (idx, w, offsets)
    }

    #[test]
    fn forward_and_backward_equal_the_oracle_for_every_dtype_and_shape() {
        let Some(dev) = cuda_for_tests() else { return };
        // dims: not a multiple of 4, small, the runner's; rows with repeats
        for (rows, dim, n_bags, max) in [
            (7, 3, 9, 5),
            (300, 64, 40, 33),
            (1000, 257, 17, 64),
            (4096, 256, 64, 128),
        ] {
            let mut rng = Rng::new(rows as u64);
            let table: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
            let (idx, w, off) = batch(rows, n_bags, max, dim as u64);
            let bags = bags_of(&idx, &w, &off);
            let grad: Vec<f32> = (0..n_bags * dim).map(|_| rng.normal()).collect();
            for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                let what = format!("{rows}×{dim} {dtype:?}, {n_bags} bags");
                let stored: Vec<f32> = table
                    .iter()
                    .map(|&v| memlayer_bank::round_trip(dtype, v))
                    .collect();
                let dt = DeviceTable::upload(&dev, &table, rows, dim, dtype).expect("upload");
                let got = bag_forward(&dev, &dt, &bags).expect("forward");
                let want = bag::bag_forward(&stored, rows, dim, &idx, &w, &off).expect("oracle");
                assert_eq!(got, want, "{what}: forward not bit-identical");
                let got = bag_backward_weights(&dev, &dt, &idx, &off, &grad).expect("dw");
                let want = bag::bag_backward_weights(&stored, rows, dim, &idx, &off, &grad)
                    .expect("oracle");
                for (e, (g, o)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (1.0 + o.abs()) * (dim as f32).sqrt();
                    assert!((g - o).abs() <= tol, "{what}: dweights[{e}] {g} vs {o}");
                }
            }
            let got = bag_backward_table(&dev, (rows, dim), &bags, &grad).expect("dtable");
            let want = bag::bag_backward_table(rows, dim, &idx, &w, &off, &grad).expect("oracle");
            assert_eq!(got, want, "{rows}×{dim}: table gradient not bit-identical");
        }
    }

    #[test]
    fn the_paged_bag_through_slots_equals_the_bag_over_the_whole_table() {
        let Some(dev) = cuda_for_tests() else { return };
        let (rows, dim, page_rows): (usize, usize, usize) = (103, 12, 8);
        let pages = rows.div_ceil(page_rows);
        let mut rng = Rng::new(5);
        let table: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
        let (idx, w, off) = batch(rows, 20, 9, 3);
        let bags = bags_of(&idx, &w, &off);
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let stored: Vec<f32> = table
                .iter()
                .map(|&v| memlayer_bank::round_trip(dtype, v))
                .collect();
            // every page resident, in reversed slots
            let mut slots =
                PagedSlots::new(&dev, rows, dim, page_rows, pages, dtype).expect("slots");
            let mut page_table = vec![0u32; pages];
            for p in 0..pages {
                let slot = pages - 1 - p;
                let end = ((p + 1) * page_rows).min(rows);
                slots
                    .write(&dev, slot, &stored[p * page_rows * dim..end * dim])
                    .expect("write");
                page_table[p] = slot as u32;
            }
            let got = slots.bag(&dev, &page_table, &bags).expect("bag");
            let want = bag::bag_forward(&stored, rows, dim, &idx, &w, &off).expect("oracle");
            assert_eq!(got, want, "{dtype:?}: paged bag not bit-identical");
            assert_eq!(slots.bytes(), pages * page_rows * dim * dtype.size());
            // a live resize: every page moves to slot p (device copies), in
            // a pool one slot larger; the bag reads the same
            let kept: Vec<(u32, u32)> = (0..pages as u32)
                .map(|p| (pages as u32 - 1 - p, p))
                .collect();
            let grown = slots.resized(&dev, pages + 1, &kept).expect("resize");
            let identity: Vec<u32> = (0..pages as u32).collect();
            let got = grown.bag(&dev, &identity, &bags).expect("bag");
            assert_eq!(got, want, "{dtype:?}: paged bag after a resize");
            assert!(
                slots.resized(&dev, 1, &kept).is_err(),
                "slot outside the new pool"
            );
        }
    }

    #[test]
    fn empty_batches_and_bad_indices() {
        let Some(dev) = cuda_for_tests() else { return };
        let dt = DeviceTable::upload(&dev, &[1.0; 8], 4, 2, Dtype::F32).expect("upload");
        // only empty bags: zeros
        assert_eq!(
            bag_forward(&dev, &dt, &bags_of(&[], &[], &[0, 0, 0])).expect("empty"),
            vec![0.0; 4]
        );
        let g = bag_backward_table(&dev, (4, 2), &bags_of(&[], &[], &[0, 0]), &[1.0, 1.0])
            .expect("empty");
        assert!(g.rows.is_empty());
        // a row outside the table is refused before anything is uploaded
        let err = bag_forward(&dev, &dt, &bags_of(&[4], &[1.0], &[0, 1]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("index 4 out of range"), "{err}");
    }
}
