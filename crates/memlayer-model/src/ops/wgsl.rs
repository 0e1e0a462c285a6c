//! The memory ops on burn-wgpu: the WGSL kernels of `shaders/` launched
//! through burn's raw-source route (`KernelSource` + `SourceKernel`), on
//! burn's own buffers, in burn's command stream.
//!
//! Nothing here is a second copy of `memlayer-wgpu`: the shaders, their
//! metadata and the storage-only adaptation cubecl needs come from its
//! registry (`memlayer_wgpu::shaders`, [`Variant::storage_text`]: every
//! binding `var<storage, read_write>`, overrides as constants), and every
//! kernel sequence — parameter packing, grid folding, dispatch order — is
//! `memlayer-wgpu`'s, generic over its `Launcher` trait, which
//! [`CubeLauncher`] implements on cubecl handles:
//!
//! - forward: `bag_forward::bag_forward` on a flat f32 table of one shard
//!   (a burn tensor is one buffer);
//! - backward: `backward::bag_index` (the deterministic reverse index of
//!   the row ids and the bag of each entry), `backward::table_grad` (sparse
//!   rows, summed in the oracle's order) scattered into burn's dense
//!   gradient by `backward::scatter_dense`, and `backward::weight_grad`;
//! - product-key selection: `lookup::select` (`pk_topk.wgsl` per half,
//!   `pk_candidates.wgsl` for the k best of the k² pairs, the oracle's tie
//!   rule).
//!
//! Errors: burn's op signatures return tensors, so the limits the raw path
//! returns as errors (u32 counts, one binding per buffer, f32, knn range)
//! are checked before this route is chosen: `native::embedding_bag` calls
//! [`check_bag`] and falls back to the portable ops past them,
//! `native::pk_select` returns [`check_select_route`]'s error. A launch
//! error after those checks is a broken invariant and panics naming the op.

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
use memlayer_wgpu::GpuDtype;
use memlayer_wgpu::GpuError;
use memlayer_wgpu::backward::{bag_index, scatter_dense, table_grad, weight_grad};
use memlayer_wgpu::bag_forward::{BagIo, TableView, bag_forward};
use memlayer_wgpu::launch::{Grid, Launcher};
use memlayer_wgpu::lookup::{SelectOut, check_select, select};
use memlayer_wgpu::shaders::Variant;

use super::native::MemoryBackend;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Largest workgroup count per grid dimension (WebGPU's default limit).
const MAX_GROUPS: u32 = 65_535;

/// Largest buffer the WGSL route binds: WebGPU's default
/// `maxStorageBufferBindingSize` (128 MiB), the limit the raw path is
/// proven under; [`check_bag`] and [`check_select_route`] keep every
/// binding of a call within it.
pub const MAX_BINDING_BYTES: u64 = 128 << 20;

/// A registry variant as a cubecl raw-WGSL kernel: the text of
/// [`Variant::storage_text`].
#[derive(Clone, Debug)]
struct CubeKernel {
    variant: Variant,
    text: Arc<str>,
}

impl CubeKernel {
    /// The kernel of `variant`, its storage-only text adapted once per process.
    fn new(variant: Variant) -> Result<Self, GpuError> {
        static TEXTS: OnceLock<Mutex<HashMap<Variant, Arc<str>>>> = OnceLock::new();
        let mut texts = TEXTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let text = match texts.get(&variant) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = variant.storage_text()?.into();
                texts.insert(variant, t.clone());
                t
            }
        };
        Ok(Self { variant, text })
    }
}

impl KernelSource for CubeKernel {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(self.text.to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.variant.shader.name, self.variant.flags))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// [`Launcher`] on burn-wgpu: dispatches on one tensor's cubecl client,
/// in burn's command stream, on burn's buffers.
struct CubeLauncher<'a> {
    like: &'a CubeTensor,
}

impl CubeLauncher<'_> {
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

impl Launcher for CubeLauncher<'_> {
    type Buffer = Handle;

    fn max_groups(&self) -> u32 {
        MAX_GROUPS
    }

    fn zeroed(&mut self, _label: &'static str, bytes: u64) -> Result<Handle, GpuError> {
        // at least one word: a binding may not be empty
        Ok(self
            .like
            .client
            .create_from_slice(&vec![0u8; (bytes as usize).max(4)]))
    }

    fn upload(&mut self, _label: &'static str, words: &[u32]) -> Result<Handle, GpuError> {
        if words.is_empty() {
            return self.zeroed("empty", 4);
        }
        Ok(self
            .like
            .client
            .create_from_slice(bytemuck::cast_slice(words)))
    }

    fn scratch(&mut self, _label: &'static str, bytes: u64) -> Result<Handle, GpuError> {
        Ok(self.like.client.empty((bytes as usize).max(4)))
    }

    fn unused(&mut self) -> Result<Handle, GpuError> {
        // its own buffer, so no binding aliases a written one; 16 bytes,
        // the smallest binding of an array of vec4
        self.zeroed("unused binding", 16)
    }

    fn dispatch(
        &mut self,
        kernel: Variant,
        params: &[u8],
        buffers: &[&Handle],
        grid: Grid,
    ) -> Result<(), GpuError> {
        let source = CubeKernel::new(kernel)?;
        let params = self.like.client.create_from_slice(params);
        let mut bindings = vec![params.binding()];
        bindings.extend(buffers.iter().map(|h| (*h).clone().binding()));
        let workgroup = kernel.shader.workgroup;
        self.like.client.launch(
            Box::new(SourceKernel::new(source, CubeDim::new_1d(workgroup))),
            CubeCount::Static(grid.x, grid.y, 1),
            KernelArguments::new().with_buffers(bindings),
        );
        Ok(())
    }
}

/// Whether an embedding-bag over a (rows, v_dim) table with (bags, bag)
/// entries fits the WGSL route: f32 tensors, u32 element counts and every
/// binding within [`MAX_BINDING_BYTES`] (the limits `memlayer-wgpu` checks
/// on its own path). `native::embedding_bag` checks this before it takes
/// the route and uses the portable ops otherwise, so the ops below (forward
/// and both gradients, same shapes) never meet a shape they cannot launch.
pub fn check_bag(
    rows: usize,
    v_dim: usize,
    bags: usize,
    bag: usize,
    f32_tensors: bool,
) -> Result<(), String> {
    if !f32_tensors {
        return Err("the WGSL memory ops take f32 tensors".into());
    }
    let n = bags
        .checked_mul(bag)
        .ok_or_else(|| format!("{bags} × {bag} entries overflow"))?;
    let words = [
        ("value table (rows, v_dim)", rows.checked_mul(v_dim)),
        ("output (bags, v_dim)", bags.checked_mul(v_dim)),
        // the table gradient's sparse rows (n, v_dim)
        ("sparse gradient (bags·bag, v_dim)", n.checked_mul(v_dim)),
        ("offsets (bags + 1)", Some(bags + 1)),
        (
            "radix histogram",
            Some(memlayer_wgpu::reverse_index::RADIX * n.div_ceil(256)),
        ),
    ];
    for (what, w) in words {
        let w = w.ok_or_else(|| format!("{what} overflows"))?;
        let bytes = w as u64 * 4;
        if w > u32::MAX as usize || bytes > MAX_BINDING_BYTES {
            return Err(format!(
                "{what}: {w} elements exceed the WGSL route's u32 range or one binding of \
                 {MAX_BINDING_BYTES} bytes"
            ));
        }
    }
    Ok(())
}

/// Whether product-key selection of (groups, 2, n_keys) scores with `knn`
/// fits the WGSL route (`1 <= knn <= min(n_keys, MAX_K)`, bindings within
/// [`MAX_BINDING_BYTES`]); `native::pk_select` returns this as its error.
pub fn check_select_route(groups: usize, n_keys: usize, knn: usize) -> Result<(), String> {
    check_select(n_keys, knn).map_err(|e| e.to_string())?;
    let scores = groups.saturating_mul(2 * n_keys);
    if scores > u32::MAX as usize || scores as u64 * 4 > MAX_BINDING_BYTES {
        return Err(format!(
            "product-key selection: scores ({groups}, 2, {n_keys}) exceed one binding of \
             {MAX_BINDING_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The result of a launch sequence whose limits were checked before the
/// WGSL route was chosen ([`check_bag`], [`check_select_route`]); an error
/// here is a broken invariant of this module, reported with the op.
fn launched<T>(op: &str, r: Result<T, GpuError>) -> T {
    r.unwrap_or_else(|e| panic!("{op}: {e} (limits are checked before the WGSL route is taken)"))
}

fn float_f32(t: FloatTensor<Cube>) -> CubeTensor {
    // f32 is checked by `check_bag` before the route is taken
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

/// CSR offsets of `bags` fixed-size bags of `bag` entries.
fn uniform_offsets(bags: usize, bag: usize) -> Vec<u32> {
    (0..=bags).map(|b| (b * bag) as u32).collect()
}

/// A (rows, v_dim) f32 value tensor as a one-shard table.
fn table_view<'a>(values: &'a CubeTensor, rows: usize, v_dim: usize) -> TableView<'a, Handle> {
    TableView {
        shards: std::slice::from_ref(&values.handle),
        rows,
        dim: v_dim,
        dtype: GpuDtype::F32,
        rows_per_shard: rows.max(1),
    }
}

impl MemoryBackend for Cube {
    fn memory_bag(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let values = float_f32(values);
        let weights = float_f32(weights);
        let indices = ids_u32(indices);
        let [rows, v_dim] = dims2(&values);
        let [bags, bag] = dims2(&indices);
        let mut l = CubeLauncher { like: &values };
        if bags == 0 || v_dim == 0 {
            let out = launched("memory_bag", l.scratch("bag out", 0));
            return l.tensor(out, [bags, v_dim], DType::F32);
        }
        if bag == 0 {
            return Cube::float_zeros([bags, v_dim].into(), &values.device, FloatDType::F32);
        }
        let out = launched(
            "memory_bag",
            (|| -> Result<Handle, GpuError> {
                let offsets = l.upload("offsets", &uniform_offsets(bags, bag))?;
                let out = l.scratch("bag out", (bags * v_dim * 4) as u64)?;
                let io = BagIo {
                    indices: &indices.handle,
                    weights: &weights.handle,
                    offsets: &offsets,
                    out: &out,
                    bags,
                };
                // the u32-load kernel (as before; both kernels give the same bits)
                bag_forward(
                    &mut l,
                    Some(false),
                    &table_view(&values, rows, v_dim),
                    None,
                    &io,
                )?;
                Ok(out)
            })(),
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
        let weights = float_f32(weights);
        let grad_out = float_f32(grad_out);
        let [bags, bag] = dims2(&indices);
        let n = bags * bag;
        if n == 0 || v_dim == 0 {
            return dense;
        }
        let mut l = CubeLauncher { like: &dense };
        launched(
            "memory_bag backward",
            (|| -> Result<(), GpuError> {
                let offsets = l.upload("offsets", &uniform_offsets(bags, bag))?;
                let idx = bag_index(&mut l, &indices.handle, &offsets, n, bags, rows)?;
                // sparse rows: slot u holds row unique_ids[u], u < count <= n
                let sparse = l.scratch("sparse gradient", (n * v_dim * 4) as u64)?;
                table_grad(
                    &mut l,
                    &idx,
                    &weights.handle,
                    &grad_out.handle,
                    &sparse,
                    v_dim,
                    0,
                    n,
                )?;
                scatter_dense(&mut l, &idx.index, &sparse, &dense.handle, rows, v_dim, n)
            })(),
        );
        dense
    }

    fn memory_bag_grad_weights(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let values = float_f32(values);
        let indices = ids_u32(indices);
        let grad_out = float_f32(grad_out);
        let [rows, v_dim] = dims2(&values);
        let [bags, bag] = dims2(&indices);
        let n = bags * bag;
        if n == 0 {
            return Cube::float_zeros([bags, bag].into(), &values.device, FloatDType::F32);
        }
        let mut l = CubeLauncher { like: &values };
        let dw = launched(
            "memory_bag backward",
            (|| -> Result<Handle, GpuError> {
                let offsets = l.upload("offsets", &uniform_offsets(bags, bag))?;
                let idx = bag_index(&mut l, &indices.handle, &offsets, n, bags, rows)?;
                let dw = l.scratch("weight gradient", (n * 4) as u64)?;
                weight_grad(
                    &mut l,
                    &idx,
                    &values.handle,
                    &grad_out.handle,
                    &dw,
                    GpuDtype::F32,
                    v_dim,
                    0,
                    rows,
                )?;
                Ok(dw)
            })(),
        );
        l.tensor(dw, [bags, bag], DType::F32)
    }

    fn memory_pk_select(scores: FloatTensor<Self>, knn: usize) -> IntTensor<Self> {
        let scores = float_f32(scores);
        let s = scores.meta.shape();
        let (groups, n_keys) = (s[0], s[2]);
        let mut l = CubeLauncher { like: &scores };
        let int_dtype = get_device_settings::<Cube>(&scores.device).int_dtype;
        let rows = launched(
            "memory_pk_select",
            (|| -> Result<Handle, GpuError> {
                let half_bytes = (2 * groups * knn * 4) as u64;
                let out_bytes = (groups * knn * 4) as u64;
                let half_scores = l.scratch("half scores", half_bytes)?;
                let half_ids = l.scratch("half ids", half_bytes)?;
                let rows = l.scratch("rows", out_bytes)?;
                let best_s = l.scratch("scores", out_bytes)?;
                let best_w = l.scratch("weights", out_bytes)?;
                let out = SelectOut {
                    half_scores: &half_scores,
                    half_ids: &half_ids,
                    indices: &rows,
                    scores: &best_s,
                    weights: &best_w,
                };
                select(&mut l, &scores.handle, groups, n_keys, knn, &out)?;
                Ok(rows)
            })(),
        );
        let rows = l.tensor(rows, [groups, knn], DType::I32);
        if int_dtype == IntDType::I32 {
            rows
        } else {
            Cube::int_cast(rows, int_dtype)
        }
    }
}
