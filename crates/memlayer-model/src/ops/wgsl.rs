//! The memory ops on burn-wgpu: the WGSL kernels of `shaders/` launched
//! through burn's raw-source route (`KernelSource` + `SourceKernel`), on
//! burn's own buffers, in burn's command stream.
//!
//! The kernels are the files `memlayer-wgpu` runs on its own encoder (same
//! text, same parameter structs); two mechanical adaptations happen at load
//! ([`WgslKernel::text`]): cubecl binds storage buffers only, and suballocates
//! tensors from shared buffers (so one buffer can appear as several
//! bindings of a dispatch), so every binding becomes `var<storage,
//! read_write>` (the `params` uniform too: same layout for the all-scalar
//! parameter structs); and the pipeline-overridable constants become plain
//! constants of the variant launched.
//!
//! - forward: `bag_forward.wgsl`, flat f32 table, one shard (a burn tensor
//!   is one buffer);
//! - backward: the deterministic reverse index (`reverse_index_*.wgsl`:
//!   stable radix sort of the row ids, segment heads, CSR), the bag of each
//!   entry, then `bag_backward_table.wgsl` (sparse rows, summed in the
//!   oracle's order) scattered into burn's dense gradient by
//!   `bag_backward_dense.wgsl`, and `bag_backward_weights.wgsl` for the
//!   per-sample weights;
//! - product-key selection: `pk_topk.wgsl` per half, `pk_candidates.wgsl`
//!   for the k best of the k² pairs, the oracle's tie rule.

use burn::backend::Cube;
use burn::backend::get_device_settings;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{
    CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::tensor::{DType, FloatDType, IntDType, Shape};
use cubecl::prelude::KernelId;
use cubecl::server::{Handle, KernelArguments};
use cubecl::{CubeCount, CubeDim};
use memlayer_wgpu::backward::{BagOfParams, TableParams, WeightsParams};
use memlayer_wgpu::bag_forward::Params as BagParams;
use memlayer_wgpu::lookup::{CandidatesParams, TopkParams, topk_groups};
use memlayer_wgpu::reverse_index::{LenParams, RADIX, SCAN_BLOCK, SORT_BLOCK, SortParams};

use super::native::MemoryBackend;

use super::native::MAX_GPU_KNN as MAX_KNN;

/// Largest workgroup count per grid dimension (WebGPU's default limit).
const MAX_GROUPS: u32 = 65_535;

/// One shader of `shaders/` in the variant launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct WgslKernel {
    /// File name, for the kernel id and messages.
    name: &'static str,
    source: &'static str,
    /// `override NAME` constants and the value they take.
    constants: &'static [(&'static str, &'static str)],
    workgroup: u32,
}

macro_rules! shader {
    ($name:literal, $wg:expr) => {
        shader!($name, $wg, &[])
    };
    ($name:literal, $wg:expr, $consts:expr) => {
        WgslKernel {
            name: $name,
            source: include_str!(concat!("../../../../shaders/", $name)),
            constants: $consts,
            workgroup: $wg,
        }
    };
}

const BAG_FORWARD: WgslKernel = shader!(
    "bag_forward.wgsl",
    256,
    &[("F16", "false"), ("PAGED", "false")]
);
const HIST: WgslKernel = shader!("reverse_index_hist.wgsl", 256);
const SCAN: WgslKernel = shader!("reverse_index_scan.wgsl", 256);
const SCAN_ADD: WgslKernel = shader!("reverse_index_scan_add.wgsl", 256);
const SCATTER: WgslKernel = shader!("reverse_index_scatter.wgsl", 256);
const HEADS: WgslKernel = shader!("reverse_index_heads.wgsl", 256);
const COMPACT: WgslKernel = shader!("reverse_index_compact.wgsl", 256);
const BAG_OF: WgslKernel = shader!("bag_backward_bag_of.wgsl", 256);
const BAG_TABLE: WgslKernel = shader!("bag_backward_table.wgsl", 256);
const BAG_DENSE: WgslKernel = shader!("bag_backward_dense.wgsl", 256);
const BAG_WEIGHTS: WgslKernel = shader!("bag_backward_weights.wgsl", 64, &[("F16", "false")]);
const PK_TOPK: WgslKernel = shader!("pk_topk.wgsl", 256);
const PK_CANDIDATES: WgslKernel = shader!("pk_candidates.wgsl", 64);

impl WgslKernel {
    /// The shader text cubecl compiles: storage-bound parameters and the
    /// variant's constants. Panics if the file does not have the declaration
    /// being adapted (a shader edit that this loader must follow).
    fn text(&self) -> String {
        const UNIFORM: &str = "var<uniform> params: Params;";
        assert!(
            self.source.contains(UNIFORM),
            "{}: expected a `{UNIFORM}` binding",
            self.name
        );
        // every binding read_write: cubecl suballocates tensors from shared
        // buffers, and one wgpu buffer may not be bound read-only and
        // read-write in the same dispatch (cubecl's own kernels bind all
        // storage read_write for the same reason)
        let mut text = self
            .source
            .replace(UNIFORM, "var<storage, read_write> params: Params;")
            .replace("var<storage, read>", "var<storage, read_write>");
        for (name, value) in self.constants {
            let decl = format!("override {name}: bool = false;");
            assert!(
                text.contains(&decl),
                "{}: expected `{decl}` to specialise",
                self.name
            );
            text = text.replace(&decl, &format!("const {name}: bool = {value};"));
        }
        text
    }
}

impl KernelSource for WgslKernel {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(self.text())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.name, self.constants))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// `(x, y)` workgroups covering `n` groups within the per-dimension limit;
/// the shaders fold `y` back in with their `x_groups` parameter.
fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n.max(1), 1)
    } else {
        (MAX_GROUPS, n.div_ceil(MAX_GROUPS))
    }
}

fn u32_of(what: &str, n: usize) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} exceeds the kernels' u32 range"))
}

/// Uniform of `bag_backward_dense.wgsl` (WGSL layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DenseParams {
    dim: u32,
    slots: u32,
    x_groups: u32,
    _pad: u32,
}

/// Launches kernels on one tensor's client.
struct Launcher<'a> {
    like: &'a CubeTensor,
}

impl Launcher<'_> {
    fn upload(&self, bytes: &[u8]) -> Handle {
        self.like.client.create_from_slice(bytes)
    }

    fn zeroed(&self, bytes: usize) -> Handle {
        // at least one word: a binding may not be empty
        self.upload(&vec![0u8; bytes.max(4)])
    }

    fn empty(&self, bytes: usize) -> Handle {
        self.like.client.empty(bytes.max(4))
    }

    /// One dispatch of `kernel` over `groups` workgroups; `params` is bound
    /// first, then `buffers` in binding order.
    fn launch<P: bytemuck::Pod>(
        &self,
        kernel: WgslKernel,
        params: &P,
        buffers: &[&Handle],
        groups: (u32, u32),
    ) {
        let params = self.upload(bytemuck::bytes_of(params));
        let mut bindings = vec![params.binding()];
        bindings.extend(buffers.iter().map(|h| (*h).clone().binding()));
        self.like.client.launch(
            Box::new(SourceKernel::new(kernel, CubeDim::new_1d(kernel.workgroup))),
            CubeCount::Static(groups.0, groups.1, 1),
            KernelArguments::new().with_buffers(bindings),
        );
    }

    fn tensor(&self, handle: Handle, shape: impl Into<Shape>, dtype: DType) -> CubeTensor {
        CubeTensor::new_contiguous(
            self.like.client.clone(),
            self.like.device.clone(),
            shape.into(),
            handle,
            dtype,
        )
    }
}

fn float_f32(t: FloatTensor<Cube>, what: &str) -> CubeTensor {
    assert_eq!(
        t.dtype,
        DType::F32,
        "{what}: the WGSL memory ops take f32 tensors"
    );
    into_contiguous(t)
}

/// Row ids as u32 words (the kernels' index type): i32/u32 tensors as they
/// are, wider ones cast (ids are < 2^31 by the model's shapes).
fn ids_u32(t: IntTensor<Cube>) -> CubeTensor {
    let t = match t.dtype {
        DType::I32 | DType::U32 => t,
        _ => Cube::int_cast(t, IntDType::I32),
    };
    into_contiguous(t)
}

fn dims2(t: &CubeTensor) -> [usize; 2] {
    let s = t.meta.shape();
    [s[0], s[1]]
}

/// The device buffers of a reverse index (see `memlayer_wgpu::reverse_index`).
struct ReverseIndex {
    sorted_ids: Handle,
    sorted_entries: Handle,
    unique_ids: Handle,
    seg_start: Handle,
    count: Handle,
}

/// Exclusive prefix sum of the first `n` words of `data`, in place.
fn scan(l: &Launcher, data: &Handle, n: usize) {
    let blocks = n.div_ceil(SCAN_BLOCK);
    let sums = l.zeroed(blocks * 4);
    let g = grid(blocks as u32);
    let params = LenParams {
        n: u32_of("scan", n),
        x_groups: g.0,
        _pad: [0; 2],
    };
    l.launch(SCAN, &params, &[data, &sums], g);
    if blocks > 1 {
        scan(l, &sums, blocks);
        let g = grid(n.div_ceil(256) as u32);
        let params = LenParams {
            x_groups: g.0,
            ..params
        };
        l.launch(SCAN_ADD, &params, &[data, &sums], g);
    }
}

/// The reverse index of `ids[..n]`, every id `< id_range`; `n >= 1`.
fn reverse_index(l: &Launcher, ids: &Handle, n: usize, id_range: usize) -> ReverseIndex {
    let n32 = u32_of("bag entries", n);
    let bytes = n * 4;
    let bufs = [
        l.zeroed(bytes),
        l.zeroed(bytes),
        l.zeroed(bytes),
        l.zeroed(bytes),
    ];
    let unique_ids = l.zeroed(bytes);
    let seg_start = l.zeroed(bytes + 4);
    let count = l.zeroed(4);
    let n_blocks = n.div_ceil(SORT_BLOCK);
    let bits = usize::BITS as usize - (id_range.max(1) - 1).leading_zeros() as usize;
    let passes = bits.div_ceil(8).max(1);
    let hist = l.zeroed(RADIX * n_blocks * 4);
    let g = grid(n_blocks as u32);
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
            x_groups: g.0,
            first_pass: (pass == 0) as u32,
            _pad: [0; 3],
        };
        l.launch(HIST, &params, &[in_k, &hist], g);
        scan(l, &hist, RADIX * n_blocks);
        l.launch(SCATTER, &params, &[in_k, in_v, &hist, out_k, out_v], g);
    }
    let [sorted_ids, sorted_entries, heads, _] = bufs;
    let g = grid(n.div_ceil(256) as u32);
    let params = LenParams {
        n: n32,
        x_groups: g.0,
        _pad: [0; 2],
    };
    l.launch(HEADS, &params, &[&sorted_ids, &heads], g);
    scan(l, &heads, n);
    l.launch(
        COMPACT,
        &params,
        &[&sorted_ids, &heads, &unique_ids, &seg_start, &count],
        g,
    );
    ReverseIndex {
        sorted_ids,
        sorted_entries,
        unique_ids,
        seg_start,
        count,
    }
}

/// The bag of every entry of `bags` fixed-size bags of `bag` entries.
fn bag_of(l: &Launcher, bags: usize, bag: usize) -> Handle {
    let n = bags * bag;
    let offsets: Vec<u32> = (0..=bags).map(|b| u32_of("bag entries", b * bag)).collect();
    let offsets = l.upload(bytemuck::cast_slice(&offsets));
    let out = l.empty(n * 4);
    let g = grid(n.div_ceil(256) as u32);
    let params = BagOfParams {
        n: n as u32,
        bags: u32_of("bags", bags),
        x_groups: g.0,
        _pad: 0,
    };
    l.launch(BAG_OF, &params, &[&offsets, &out], g);
    out
}

impl MemoryBackend for Cube {
    fn memory_bag(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let values = float_f32(values, "memory_bag values");
        let weights = float_f32(weights, "memory_bag weights");
        let indices = ids_u32(indices);
        let [rows, v_dim] = dims2(&values);
        let [bags, bag] = dims2(&indices);
        let l = Launcher { like: &values };
        if bags == 0 || v_dim == 0 {
            return l.tensor(l.empty(0), [bags, v_dim], DType::F32);
        }
        if bag == 0 {
            return Cube::float_zeros([bags, v_dim].into(), &values.device, FloatDType::F32);
        }
        let offsets: Vec<u32> = (0..=bags).map(|b| u32_of("bag entries", b * bag)).collect();
        let offsets = l.upload(bytemuck::cast_slice(&offsets));
        let out = l.empty(bags * v_dim * 4);
        // bag_forward.wgsl's layout: 4 words per lane and block, bags packed
        // into a workgroup of 256 when rows are short (as memlayer-wgpu)
        let tpb = v_dim.div_ceil(4).next_power_of_two().clamp(1, 256);
        let bags_per_wg = 256 / tpb;
        let g = grid(bags.div_ceil(bags_per_wg) as u32);
        let params = BagParams {
            bags: u32_of("bags", bags),
            dim: u32_of("v_dim", v_dim),
            row_words: v_dim as u32,
            n_shards: 1,
            tpb: tpb as u32,
            bags_per_wg: bags_per_wg as u32,
            x_groups: g.0,
            page_shift: 0,
            rows: u32_of("table rows", rows),
            page_rows: 1,
            n_pages: 0,
            n_slots: 0,
            rows_per_shard: u32_of("table rows", rows.max(1)),
            first_shard: 0,
            accumulate: 0,
            one: 1.0,
        };
        // page table and shards 1, 2: not read when flat with one shard;
        // bound to their own word so no binding aliases a written one
        let unused = l.zeroed(4);
        l.launch(
            BAG_FORWARD,
            &params,
            &[
                &indices.handle,
                &weights.handle,
                &offsets,
                &unused,
                &out,
                &values.handle,
                &unused,
                &unused,
            ],
            g,
        );
        l.tensor(out, [bags, v_dim], DType::F32)
    }

    fn memory_bag_grad_values(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [rows, v_dim] = dims2(&values);
        let dense = Cube::float_zeros([rows, v_dim].into(), &values.device, FloatDType::F32);
        let indices = ids_u32(indices);
        let weights = float_f32(weights, "memory_bag weights");
        let grad_out = float_f32(grad_out, "memory_bag gradient");
        let [bags, bag] = dims2(&indices);
        let n = bags * bag;
        if n == 0 || v_dim == 0 {
            return dense;
        }
        let l = Launcher { like: &dense };
        let index = reverse_index(&l, &indices.handle, n, rows);
        let bag_of = bag_of(&l, bags, bag);
        // sparse rows: slot u holds row unique_ids[u], u < count <= n
        let sparse = l.empty(n * v_dim * 4);
        let g = grid(u32_of("gradient elements", n * v_dim.div_ceil(4)).div_ceil(256));
        let params = TableParams {
            dim: v_dim as u32,
            slot_base: 0,
            slots: n as u32,
            x_groups: g.0,
        };
        l.launch(
            BAG_TABLE,
            &params,
            &[
                &index.seg_start,
                &index.sorted_entries,
                &bag_of,
                &weights.handle,
                &grad_out.handle,
                &sparse,
            ],
            g,
        );
        // bag_backward_dense.wgsl addresses the dense table with u32
        u32_of("value table elements", rows * v_dim);
        let g = grid(u32_of("gradient elements", n * v_dim).div_ceil(256));
        let params = DenseParams {
            dim: v_dim as u32,
            slots: n as u32,
            x_groups: g.0,
            _pad: 0,
        };
        l.launch(
            BAG_DENSE,
            &params,
            &[&index.count, &index.unique_ids, &sparse, &dense.handle],
            g,
        );
        dense
    }

    fn memory_bag_grad_weights(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let values = float_f32(values, "memory_bag values");
        let indices = ids_u32(indices);
        let grad_out = float_f32(grad_out, "memory_bag gradient");
        let [rows, v_dim] = dims2(&values);
        let [bags, bag] = dims2(&indices);
        let n = bags * bag;
        if n == 0 {
            return Cube::float_zeros([bags, bag].into(), &values.device, FloatDType::F32);
        }
        let l = Launcher { like: &values };
        let index = reverse_index(&l, &indices.handle, n, rows);
        let bag_of = bag_of(&l, bags, bag);
        let dw = l.empty(n * 4);
        let g = grid(n.div_ceil(64) as u32);
        let params = WeightsParams {
            n: n as u32,
            dim: u32_of("v_dim", v_dim),
            row_words: v_dim as u32,
            first_row: 0,
            shard_rows: u32_of("table rows", rows),
            x_groups: g.0,
            _pad: [0; 2],
        };
        l.launch(
            BAG_WEIGHTS,
            &params,
            &[
                &index.sorted_ids,
                &index.sorted_entries,
                &bag_of,
                &grad_out.handle,
                &values.handle,
                &dw,
            ],
            g,
        );
        l.tensor(dw, [bags, bag], DType::F32)
    }

    fn memory_pk_select(scores: FloatTensor<Self>, knn: usize) -> IntTensor<Self> {
        let scores = float_f32(scores, "product-key scores");
        let s = scores.meta.shape();
        let (groups, n_keys) = (s[0], s[2]);
        assert!(
            (1..=MAX_KNN.min(n_keys)).contains(&knn),
            "memory_pk_select: knn {knn} must be in 1..={} (n_keys {n_keys}, WGSL limit {MAX_KNN})",
            MAX_KNN.min(n_keys)
        );
        let l = Launcher { like: &scores };
        let int_dtype = get_device_settings::<Cube>(&scores.device).int_dtype;
        if groups == 0 {
            let empty = l.tensor(l.empty(0), [0, knn], DType::I32);
            return Cube::int_cast(empty, int_dtype);
        }
        // per-half top-k: rows (groups, 2) of n_keys scores
        let half_rows = 2 * groups;
        let half_s = l.empty(half_rows * knn * 4);
        let half_i = l.empty(half_rows * knn * 4);
        let g = grid(u32_of("score rows", half_rows));
        let params = TopkParams {
            rows: half_rows as u32,
            n_keys: u32_of("n_keys", n_keys),
            k: knn as u32,
            row0: 0,
            x_groups: g.0,
            groups: topk_groups(knn, n_keys) as u32,
            _pad: [0; 2],
        };
        l.launch(PK_TOPK, &params, &[&scores.handle, &half_s, &half_i], g);
        // the k best of the k² pairs (rows i1 * n_keys + i2), oracle order
        let rows = l.empty(groups * knn * 4);
        let best_s = l.empty(groups * knn * 4);
        let best_w = l.empty(groups * knn * 4);
        let g = grid(groups.div_ceil(64) as u32);
        let params = CandidatesParams {
            tokens_heads: groups as u32,
            k: knn as u32,
            n_keys: n_keys as u32,
            x_groups: g.0,
        };
        l.launch(
            PK_CANDIDATES,
            &params,
            &[&half_s, &half_i, &rows, &best_s, &best_w],
            g,
        );
        let rows = l.tensor(rows, [groups, knn], DType::I32);
        if int_dtype == IntDType::I32 {
            rows
        } else {
            Cube::int_cast(rows, int_dtype)
        }
    }
}
