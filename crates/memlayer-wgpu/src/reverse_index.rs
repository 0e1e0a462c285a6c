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

use crate::buffers::{Kernel, grid, read_back, storage_init, storage_zeroed, uniform_init};
use crate::context::{GpuContext, GpuError};

/// WGSL sources of the reverse-index kernels.
pub const HIST_SOURCE: &str = include_str!("../../../shaders/reverse_index_hist.wgsl");
/// Block-wise exclusive scan.
pub const SCAN_SOURCE: &str = include_str!("../../../shaders/reverse_index_scan.wgsl");
/// Adds scanned block sums back.
pub const SCAN_ADD_SOURCE: &str = include_str!("../../../shaders/reverse_index_scan_add.wgsl");
/// Stable radix scatter.
pub const SCATTER_SOURCE: &str = include_str!("../../../shaders/reverse_index_scatter.wgsl");
/// Segment heads of the sorted ids.
pub const HEADS_SOURCE: &str = include_str!("../../../shaders/reverse_index_heads.wgsl");
/// CSR compaction.
pub const COMPACT_SOURCE: &str = include_str!("../../../shaders/reverse_index_compact.wgsl");

/// Elements per radix block (one workgroup).
pub const SORT_BLOCK: usize = 256;
/// Words per scan block.
pub const SCAN_BLOCK: usize = 1024;
/// Digits per radix pass.
pub const RADIX: usize = 256;

/// Uniform of `reverse_index_hist.wgsl` / `reverse_index_scatter.wgsl`. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SortParams {
    pub n: u32,
    pub shift: u32,
    pub n_blocks: u32,
    pub x_groups: u32,
    pub first_pass: u32,
    pub _pad: [u32; 3],
}

/// Uniform of the scan, heads and compact passes of the reverse index. (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LenParams {
    pub n: u32,
    pub x_groups: u32,
    pub _pad: [u32; 2],
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

/// Records a dispatch of `items` items over workgroups of `per_group`
/// items; the params' `x_groups` comes from `grid`.
fn groups(ctx: &GpuContext, items: usize, per_group: usize) -> (u32, u32, u32) {
    grid(ctx, items.div_ceil(per_group) as u32)
}

/// The device buffers of a reverse index over `n` entries (see the module doc).
pub struct ReverseIndex {
    /// Entries indexed.
    pub n: usize,
    /// (n) ids in ascending order.
    pub sorted_ids: wgpu::Buffer,
    /// (n) entry position of each sorted position (ascending within an id).
    pub sorted_entries: wgpu::Buffer,
    /// (n) distinct ids ascending; the first `count` are valid.
    pub unique_ids: wgpu::Buffer,
    /// (n + 1) CSR starts; the first `count + 1` are valid, the rest are 0.
    pub seg_start: wgpu::Buffer,
    /// (1) number of distinct ids.
    pub count: wgpu::Buffer,
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

/// The reverse-index pipelines (built once per context).
pub struct ReverseIndexKernels {
    hist: Kernel,
    scan: Kernel,
    scan_add: Kernel,
    scatter: Kernel,
    heads: Kernel,
    compact: Kernel,
}

impl ReverseIndexKernels {
    /// Builds the pipelines.
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        Ok(Self {
            hist: Kernel::new(ctx, "reverse_index_hist", HIST_SOURCE, "main", &[])?,
            scan: Kernel::new(ctx, "reverse_index_scan", SCAN_SOURCE, "main", &[])?,
            scan_add: Kernel::new(ctx, "reverse_index_scan_add", SCAN_ADD_SOURCE, "main", &[])?,
            scatter: Kernel::new(ctx, "reverse_index_scatter", SCATTER_SOURCE, "main", &[])?,
            heads: Kernel::new(ctx, "reverse_index_heads", HEADS_SOURCE, "main", &[])?,
            compact: Kernel::new(ctx, "reverse_index_compact", COMPACT_SOURCE, "main", &[])?,
        })
    }

    /// Records an exclusive prefix sum of the first `n` u32 words of `data`,
    /// in place (multi-level: blocks of 1024, then the block sums, recursively).
    pub fn record_scan(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        data: &wgpu::Buffer,
        n: usize,
    ) -> Result<(), GpuError> {
        if n == 0 {
            return Ok(());
        }
        let n32 = count_u32("scan", n)?;
        let blocks = n.div_ceil(SCAN_BLOCK);
        let sums = storage_zeroed(ctx, "scan block sums", (blocks * 4) as u64);
        let g = grid(ctx, blocks as u32);
        let params = uniform_init(
            ctx,
            "scan params",
            &LenParams {
                n: n32,
                x_groups: g.0,
                _pad: [0; 2],
            },
        );
        self.scan.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                data.as_entire_binding(),
                sums.as_entire_binding(),
            ],
            g,
        );
        if blocks > 1 {
            self.record_scan(ctx, encoder, &sums, blocks)?;
            let g = groups(ctx, n, 256);
            let params = uniform_init(
                ctx,
                "scan add params",
                &LenParams {
                    n: n32,
                    x_groups: g.0,
                    _pad: [0; 2],
                },
            );
            self.scan_add.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    data.as_entire_binding(),
                    sums.as_entire_binding(),
                ],
                g,
            );
        }
        Ok(())
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
        let n32 = count_u32("reverse index entries", n)?;
        if id_range > 1u64 << 32 {
            return Err(GpuError::Invalid(format!(
                "reverse index: id range {id_range} exceeds u32 ids"
            )));
        }
        check_binding(ctx, "reverse index CSR", (n as u64 + 1) * 4)?;
        let n_blocks = n.div_ceil(SORT_BLOCK);
        check_binding(ctx, "radix histogram", (RADIX * n_blocks * 4) as u64)?;
        if (ids.size() as usize) < n * 4 {
            return Err(GpuError::Invalid(format!(
                "reverse index: ids buffer of {} bytes holds fewer than {n} ids",
                ids.size()
            )));
        }
        let bytes = (n * 4) as u64;
        let bufs = [
            storage_zeroed(ctx, "sorted ids", bytes),
            storage_zeroed(ctx, "sorted entries", bytes),
            storage_zeroed(ctx, "sort scratch ids", bytes),
            storage_zeroed(ctx, "sort scratch entries", bytes),
        ];
        let unique_ids = storage_zeroed(ctx, "unique ids", bytes);
        let seg_start = storage_zeroed(ctx, "segment starts", bytes + 4);
        let count = storage_zeroed(ctx, "distinct ids", 4);
        if n == 0 {
            let [sorted_ids, sorted_entries, _, _] = bufs;
            return Ok(ReverseIndex {
                n,
                sorted_ids,
                sorted_entries,
                unique_ids,
                seg_start,
                count,
            });
        }
        let bits = 64 - (id_range.max(1) - 1).leading_zeros() as usize;
        let passes = bits.div_ceil(8).max(1);
        let hist = storage_zeroed(ctx, "radix histogram", (RADIX * n_blocks * 4) as u64);
        let g = grid(ctx, n_blocks as u32);
        for pass in 0..passes {
            // passes alternate between the pairs 0/1 and 2/3 so that the last
            // one writes 0/1
            let (out_k, out_v, in_k, in_v) = if (passes - 1 - pass).is_multiple_of(2) {
                (&bufs[0], &bufs[1], &bufs[2], &bufs[3])
            } else {
                (&bufs[2], &bufs[3], &bufs[0], &bufs[1])
            };
            let (in_k, in_v) = if pass == 0 { (ids, ids) } else { (in_k, in_v) };
            let params = uniform_init(
                ctx,
                "radix params",
                &SortParams {
                    n: n32,
                    shift: (8 * pass) as u32,
                    n_blocks: n_blocks as u32,
                    x_groups: g.0,
                    first_pass: (pass == 0) as u32,
                    _pad: [0; 3],
                },
            );
            self.hist.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    in_k.as_entire_binding(),
                    hist.as_entire_binding(),
                ],
                g,
            );
            self.record_scan(ctx, encoder, &hist, RADIX * n_blocks)?;
            self.scatter.dispatch(
                ctx,
                encoder,
                &[
                    params.as_entire_binding(),
                    in_k.as_entire_binding(),
                    in_v.as_entire_binding(),
                    hist.as_entire_binding(),
                    out_k.as_entire_binding(),
                    out_v.as_entire_binding(),
                ],
                g,
            );
        }
        let [sorted_ids, sorted_entries, heads, _] = bufs;
        // heads, then their exclusive scan (slot of each distinct id)
        let g = groups(ctx, n, 256);
        let params = uniform_init(
            ctx,
            "heads params",
            &LenParams {
                n: n32,
                x_groups: g.0,
                _pad: [0; 2],
            },
        );
        self.heads.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                sorted_ids.as_entire_binding(),
                heads.as_entire_binding(),
            ],
            g,
        );
        self.record_scan(ctx, encoder, &heads, n)?;
        self.compact.dispatch(
            ctx,
            encoder,
            &[
                params.as_entire_binding(),
                sorted_ids.as_entire_binding(),
                heads.as_entire_binding(),
                unique_ids.as_entire_binding(),
                seg_start.as_entire_binding(),
                count.as_entire_binding(),
            ],
            g,
        );
        Ok(ReverseIndex {
            n,
            sorted_ids,
            sorted_entries,
            unique_ids,
            seg_start,
            count,
        })
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
