//! Deterministic reverse index (ids -> sorted entry lists) on the GPU.
//!
//! Given `n` entry ids (`ids[e] < id_range`), [`ReverseIndexKernels::record`]
//! builds on the device the CSR that groups entries by id:
//!
//! - `sorted_ids`, `sorted_entries` (n): the pairs `(ids[e], e)` sorted by id
//!   and, among equal ids, by ascending entry position `e` (Meta's
//!   `reverse_indices` order, the order the CPU oracle sums gradients in);
//! - `unique_ids` (count of `n`): the distinct ids, ascending;
//! - `seg_start` (count + 1 of `n + 1`): distinct id `u` owns the sorted
//!   positions `seg_start[u] .. seg_start[u + 1]`; words past `count` are 0;
//! - `count` (1 word): the number of distinct ids.
//!
//! Method: a stable least-significant-digit radix sort, 8 bits a pass and
//! `ceil(bits(id_range - 1) / 8)` passes, each a per-block digit histogram
//! (`shaders/reverse_index_hist.wgsl`), an exclusive scan of the histogram
//! (`reverse_index_scan*.wgsl`) and a stable scatter
//! (`reverse_index_scatter.wgsl`); then segment heads, a scan and a compaction
//! (`reverse_index_heads.wgsl`, `reverse_index_compact.wgsl`). Integer
//! arithmetic only, so the result is unique and independent of scheduling,
//! and memory is O(n) whatever `id_range` is (no per-id counters).

use crate::buffers::{read_back, storage_init};
use crate::context::{GpuContext, GpuError};
use crate::launch::{Kernels, Launcher, u32_of};
use crate::shaders::{self, Variant};

/// The kernels of the reverse index, in launch order.
pub const KERNELS: [Variant; 6] = [
    shaders::REVERSE_INDEX_HIST.plain(),
    shaders::REVERSE_INDEX_SCAN.plain(),
    shaders::REVERSE_INDEX_SCAN_ADD.plain(),
    shaders::REVERSE_INDEX_SCATTER.plain(),
    shaders::REVERSE_INDEX_HEADS.plain(),
    shaders::REVERSE_INDEX_COMPACT.plain(),
];

/// Elements per radix block (one workgroup).
pub const SORT_BLOCK: usize = 256;
/// Words per scan block.
pub const SCAN_BLOCK: usize = 1024;
/// Digits per radix pass.
pub const RADIX: usize = 256;

crate::params! {
/// Uniform of `reverse_index_hist.wgsl` / `reverse_index_scatter.wgsl`. (WGSL layout).
pub struct SortParams {
    /// Number of keys (entries) being sorted.
    pub n: u32,
    /// Bit position of this pass's 8-bit digit (`8 * pass`).
    pub shift: u32,
    /// Radix blocks of 256 keys: `ceil(n / 256)`.
    pub n_blocks: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// 1 on the first pass (values are the entry positions `i`), else 0
    /// (values read from `vals_in`).
    pub first_pass: u32,
    /// Padding to a multiple of 16 bytes (WGSL uniform layout).
    pub _pad: [u32; 3],
}
}

crate::params! {
/// Uniform of the scan, heads and compact passes of the reverse index. (WGSL layout).
pub struct LenParams {
    /// Number of words (or sorted positions) processed.
    pub n: u32,
    /// Workgroups along x of the dispatch grid (workgroup id = `y * x_groups + x`).
    pub x_groups: u32,
    /// Padding to a multiple of 16 bytes (WGSL uniform layout).
    pub _pad: [u32; 2],
}
}

/// Fails with a clear error when a buffer of `bytes` would not fit one binding.
pub fn check_binding(ctx: &GpuContext, what: &str, bytes: u64) -> Result<(), GpuError> {
    let limit = ctx.max_binding_bytes();
    if bytes > limit {
        return Err(GpuError::Invalid(format!(
            "{what}: {bytes} bytes do not fit one storage binding of {limit} bytes"
        )));
    }
    Ok(())
}

/// `n` as a u32 element count, or a clear error.
pub fn count_u32(what: &str, n: usize) -> Result<u32, GpuError> {
    u32::try_from(n).map_err(|_| GpuError::Invalid(format!("{what}: {n} elements exceed u32")))
}

/// The device buffers of a reverse index over `n` entries (see the module
/// doc); `B` is the launcher's buffer type.
pub struct ReverseIndex<B = wgpu::Buffer> {
    /// Entries indexed.
    pub n: usize,
    /// (n) ids in ascending order.
    pub sorted_ids: B,
    /// (n) entry position of each sorted position (ascending within an id).
    pub sorted_entries: B,
    /// (n) distinct ids ascending; the first `count` are valid.
    pub unique_ids: B,
    /// (n + 1) CSR starts; the first `count + 1` are valid, the rest are 0.
    pub seg_start: B,
    /// (1) number of distinct ids.
    pub count: B,
}

/// A reverse index read back to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReverseIndex {
    /// (n) entry positions grouped by id, ascending within an id.
    pub sorted_entries: Vec<u32>,
    /// (count) distinct ids, ascending.
    pub unique_ids: Vec<u32>,
    /// (count + 1) CSR starts into `sorted_entries`.
    pub seg_start: Vec<u32>,
}

impl ReverseIndex {
    /// Reads the index back (blocking).
    pub fn read(&self, ctx: &GpuContext) -> Result<HostReverseIndex, GpuError> {
        if self.n == 0 {
            return Ok(HostReverseIndex {
                sorted_entries: Vec::new(),
                unique_ids: Vec::new(),
                seg_start: vec![0],
            });
        }
        let count = read_back::<u32>(ctx, &self.count, 0, 1)?[0] as usize;
        Ok(HostReverseIndex {
            sorted_entries: read_back(ctx, &self.sorted_entries, 0, self.n)?,
            unique_ids: read_back(ctx, &self.unique_ids, 0, count)?,
            seg_start: read_back(ctx, &self.seg_start, 0, count + 1)?,
        })
    }
}

/// Launches an exclusive prefix sum of the first `n` u32 words of `data`,
/// in place (multi-level: blocks of [`SCAN_BLOCK`], then the block sums,
/// recursively).
pub fn scan<L: Launcher>(l: &mut L, data: &L::Buffer, n: usize) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    let n32 = u32_of("scan", n)?;
    let blocks = n.div_ceil(SCAN_BLOCK);
    let sums = l.zeroed("scan block sums", (blocks * 4) as u64)?;
    let g = l.grid(blocks)?;
    let params = LenParams {
        n: n32,
        x_groups: g.x,
        _pad: [0; 2],
    };
    l.launch(KERNELS[1], &params, &[data, &sums], g)?;
    if blocks > 1 {
        scan(l, &sums, blocks)?;
        let g = l.grid(n.div_ceil(256))?;
        let params = LenParams {
            x_groups: g.x,
            ..params
        };
        l.launch(KERNELS[2], &params, &[data, &sums], g)?;
    }
    Ok(())
}

/// Launches the reverse index of `ids[..n]` (u32, every id `< id_range`;
/// larger ids are not sorted correctly) into new buffers.
pub fn reverse_index<L: Launcher>(
    l: &mut L,
    ids: &L::Buffer,
    n: usize,
    id_range: u64,
) -> Result<ReverseIndex<L::Buffer>, GpuError> {
    let n32 = u32_of("reverse index entries", n)?;
    if id_range > 1u64 << 32 {
        return Err(GpuError::Invalid(format!(
            "reverse index: id range {id_range} exceeds u32 ids"
        )));
    }
    let bytes = (n * 4) as u64;
    let bufs = [
        l.zeroed("sorted ids", bytes)?,
        l.zeroed("sorted entries", bytes)?,
        l.zeroed("sort scratch ids", bytes)?,
        l.zeroed("sort scratch entries", bytes)?,
    ];
    let unique_ids = l.zeroed("unique ids", bytes)?;
    let seg_start = l.zeroed("segment starts", bytes + 4)?;
    let count = l.zeroed("distinct ids", 4)?;
    if n > 0 {
        let n_blocks = n.div_ceil(SORT_BLOCK);
        let bits = 64 - (id_range.max(1) - 1).leading_zeros() as usize;
        let passes = bits.div_ceil(8).max(1);
        let hist = l.zeroed("radix histogram", (RADIX * n_blocks * 4) as u64)?;
        let g = l.grid(n_blocks)?;
        for pass in 0..passes {
            // passes alternate between the pairs 0/1 and 2/3 so that the last
            // one writes 0/1
            let (out_k, out_v, in_k, in_v) = if (passes - 1 - pass).is_multiple_of(2) {
                (&bufs[0], &bufs[1], &bufs[2], &bufs[3])
            } else {
                (&bufs[2], &bufs[3], &bufs[0], &bufs[1])
            };
            let (in_k, in_v) = if pass == 0 { (ids, ids) } else { (in_k, in_v) };
            let params = SortParams {
                n: n32,
                shift: (8 * pass) as u32,
                n_blocks: n_blocks as u32,
                x_groups: g.x,
                first_pass: (pass == 0) as u32,
                _pad: [0; 3],
            };
            let params = bytemuck::bytes_of(&params);
            l.dispatch(KERNELS[0], params, &[in_k, &hist], g)?;
            scan(l, &hist, RADIX * n_blocks)?;
            l.dispatch(KERNELS[3], params, &[in_k, in_v, &hist, out_k, out_v], g)?;
        }
        // heads, then their exclusive scan (slot of each distinct id)
        let g = l.grid(n.div_ceil(256))?;
        let params = LenParams {
            n: n32,
            x_groups: g.x,
            _pad: [0; 2],
        };
        let params = bytemuck::bytes_of(&params);
        let (sorted_ids, heads) = (&bufs[0], &bufs[2]);
        l.dispatch(KERNELS[4], params, &[sorted_ids, heads], g)?;
        scan(l, heads, n)?;
        l.dispatch(
            KERNELS[5],
            params,
            &[sorted_ids, heads, &unique_ids, &seg_start, &count],
            g,
        )?;
    }
    let [sorted_ids, sorted_entries, _, _] = bufs;
    Ok(ReverseIndex {
        n,
        sorted_ids,
        sorted_entries,
        unique_ids,
        seg_start,
        count,
    })
}

/// The reverse-index pipelines (built once per context).
pub struct ReverseIndexKernels {
    kernels: Kernels,
}

impl ReverseIndexKernels {
    /// Builds the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Self::with(ctx, [])
    }

    /// Builds the pipelines of the reverse index and of `more` in one set
    /// (for sequences that chain other kernels after the index).
    pub fn with(
        ctx: &GpuContext,
        more: impl IntoIterator<Item = Variant>,
    ) -> Result<Self, GpuError> {
        Ok(Self {
            kernels: Kernels::new(ctx, KERNELS.into_iter().chain(more))?,
        })
    }

    /// The pipeline set (the reverse index's and those added by [`Self::with`]).
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Records an exclusive prefix sum of the first `n` u32 words of `data`,
    /// in place (see [`scan`]).
    pub fn record_scan(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        data: &wgpu::Buffer,
        n: usize,
    ) -> Result<(), GpuError> {
        scan(&mut self.kernels.launcher(ctx, encoder), data, n)
    }

    /// Records the reverse index of `ids[..n]` (device buffer of u32, every id
    /// `< id_range`; larger ids are not sorted correctly). Allocates and
    /// returns the output buffers; nothing is read back.
    pub fn record(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        ids: &wgpu::Buffer,
        n: usize,
        id_range: u64,
    ) -> Result<ReverseIndex, GpuError> {
        check_reverse_index(ctx, ids, n)?;
        reverse_index(&mut self.kernels.launcher(ctx, encoder), ids, n, id_range)
    }

    /// Host convenience: uploads `ids`, builds the index and reads it back.
    /// Every id must be `< id_range` (checked).
    pub fn run(
        &self,
        ctx: &GpuContext,
        ids: &[u32],
        id_range: u64,
    ) -> Result<HostReverseIndex, GpuError> {
        if let Some(&bad) = ids.iter().find(|&&i| u64::from(i) >= id_range) {
            return Err(GpuError::Invalid(format!(
                "reverse index: id {bad} is not below the id range {id_range}"
            )));
        }
        check_binding(ctx, "reverse index ids", (ids.len() * 4) as u64)?;
        let buf = storage_init(ctx, "ids", ids);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let index = ctx.scoped("recording the reverse index", || {
            self.record(ctx, &mut encoder, &buf, ids.len(), id_range)
        })??;
        ctx.queue.submit([encoder.finish()]);
        index.read(ctx)
    }
}

/// The limits of a reverse index over `n` entries of `ids` on this device.
pub(crate) fn check_reverse_index(
    ctx: &GpuContext,
    ids: &wgpu::Buffer,
    n: usize,
) -> Result<(), GpuError> {
    count_u32("reverse index entries", n)?;
    check_binding(ctx, "reverse index CSR", (n as u64 + 1) * 4)?;
    check_binding(
        ctx,
        "radix histogram",
        (RADIX * n.div_ceil(SORT_BLOCK) * 4) as u64,
    )?;
    if (ids.size() as usize) < n * 4 {
        return Err(GpuError::Invalid(format!(
            "reverse index: ids buffer of {} bytes holds fewer than {n} ids",
            ids.size()
        )));
    }
    Ok(())
}
