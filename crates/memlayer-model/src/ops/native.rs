//! The memory ops as a burn backend extension.
//!
//! [`MemoryBackend`] adds two ops to burn's backend trait. The CPU
//! implementation runs on burn's Flex backend with `memlayer-cpu`'s kernels
//! (the optimised CPU path: bit-identical to the oracle for the forward and
//! the table gradient); `Autodiff<B>` gets a hand-written backward:
//! `dV[idx] += w · dm` (rows touched by the batch only, scattered into the
//! dense gradient burn expects) and `dw = V[idx] · dm`. The `Autodiff<B>`
//! implementation (training) is compiled with the `autodiff` feature only.

#[cfg(feature = "autodiff")]
use burn::backend::AutodiffBackend;
#[cfg(feature = "autodiff")]
use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};
use memlayer_core::pkm;

use super::OpsError;

/// Memory ops added to a burn backend.
#[backend_extension(Autodiff: cfg(feature = "autodiff"), Flex, Cube: cfg(feature = "wgpu"))]
pub trait MemoryBackend: burn::backend::Backend {
    /// Weighted embedding-bag. values: (rows, v_dim); indices, weights:
    /// (bags, bag) → (bags, v_dim).
    fn memory_bag(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Gradient of [`Self::memory_bag`] for the value table: (rows, v_dim),
    /// zero outside the rows in `indices`.
    fn memory_bag_grad_values(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Gradient of [`Self::memory_bag`] for the weights: (bags, bag).
    fn memory_bag_grad_weights(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Product-key selection. scores: (groups, 2, n_keys) → (groups, knn)
    /// rows `i1 * n_keys + i2`, best first, by the oracle's rule (not
    /// differentiable).
    fn memory_pk_select(scores: FloatTensor<Self>, knn: usize) -> IntTensor<Self>;
}

/// Whether [`MemoryBackend`] runs on `device` (with or without autodiff):
/// Flex, and burn-wgpu with the `wgpu` feature.
pub fn supported(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "wgpu")]
        DispatchDevice::Cube(cubecl::Device::Wgpu(_)) => true,
        // unreachable when burn is built with Flex alone (no wgpu, no
        // autodiff: the runtime and the C ABI on a phone)
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Whether `device` is burn-wgpu (the WGSL route).
fn on_wgpu(device: &Device) -> bool {
    #[cfg(feature = "wgpu")]
    if let DispatchDevice::Cube(cubecl::Device::Wgpu(_)) = device.clone().inner().as_dispatch() {
        return true;
    }
    let _ = device;
    false
}

/// Weighted embedding-bag through the extension. On burn-wgpu the shapes
/// and dtypes are checked against the WGSL route's limits first
/// (`wgsl::check_bag`: f32, u32 counts, one binding per buffer, the limits
/// `memlayer-wgpu` checks on its own path); a call past them takes the
/// portable ops instead (same result, burn's autodiff), so the extension's
/// forward and backward only see shapes they can launch.
pub fn embedding_bag(values: Tensor<2>, indices: Tensor<2, Int>, weights: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if on_wgpu(&values.device()) {
        let ([rows, v_dim], [bags, bag]) = (values.dims(), indices.dims());
        let f32s = values.dtype() == DType::F32 && weights.dtype() == DType::F32;
        if super::wgsl::check_bag(rows, v_dim, bags, bag, f32s).is_err() {
            return super::portable::embedding_bag(values, indices, weights);
        }
    }
    Tensor::from_dispatch(Dispatch::memory_bag(
        values.into_dispatch(),
        indices.into_dispatch(),
        weights.into_dispatch(),
    ))
}

/// Product-key selection through the extension: (groups, 2, n_keys) scores
/// → (groups, knn) rows.
pub fn pk_select(scores: Tensor<3>, knn: usize) -> Result<Tensor<2, Int>, OpsError> {
    let device = scores.device();
    if !supported(&device) {
        return Err(OpsError::Unsupported(format!("{device:?}")));
    }
    let [groups, two, n_keys] = scores.dims();
    let max_knn = if on_wgpu(&device) {
        MAX_GPU_KNN.min(n_keys)
    } else {
        n_keys
    };
    #[cfg(feature = "wgpu")]
    if on_wgpu(&device) && two == 2 {
        let f32s = scores.dtype() == DType::F32;
        super::wgsl::check_select_route(groups, n_keys, knn)
            .and_then(|()| {
                f32s.then_some(())
                    .ok_or_else(|| "scores must be f32".into())
            })
            .map_err(|e| OpsError::Oracle(memlayer_core::error::OracleError::InvalidConfig(e)))?;
    }
    let _ = groups;
    if two != 2 || knn == 0 || knn > max_knn {
        return Err(OpsError::Oracle(
            memlayer_core::error::OracleError::InvalidConfig(format!(
                "product-key selection needs scores (groups, 2, n_keys) and 1 <= knn ({knn}) <= {max_knn} (n_keys {n_keys}, GPU limit {MAX_GPU_KNN})"
            )),
        ));
    }
    Ok(Tensor::from_dispatch(Dispatch::memory_pk_select(
        scores.detach().into_dispatch(),
        knn,
    )))
}

/// Largest `knn` the WGSL selection handles (`pk_candidates.wgsl`).
pub const MAX_GPU_KNN: usize = 128;

#[cfg(feature = "wgpu")]
const _: () = assert!(MAX_GPU_KNN == memlayer_wgpu::lookup::MAX_K);

fn floats(t: &FloatTensor<Flex>) -> Vec<f32> {
    t.clone().into_data().iter::<f32>().collect()
}

/// `f` over the values of `t` in row-major order: borrowed from the tensor
/// when it is contiguous f32 (no host copy of the value table or the scores),
/// else from a copy.
fn with_floats<R>(t: &FloatTensor<Flex>, f: impl FnOnce(&[f32]) -> R) -> R {
    match t.as_slice::<f32>() {
        Some(s) => f(s),
        None => f(&floats(t)),
    }
}

fn ids(t: &FloatTensor<Flex>) -> Vec<u32> {
    t.clone()
        .into_data()
        .iter::<i64>()
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        .collect()
}

fn dims2(t: &FloatTensor<Flex>) -> [usize; 2] {
    let s = t.layout().shape();
    [s[0], s[1]]
}

fn flex_f32(data: Vec<f32>, shape: impl Into<Shape>) -> FloatTensor<Flex> {
    burn::backend::flex::FlexTensor::from_data(TensorData::new(data, shape.into()))
}

/// Panics with the op and the oracle's message: extension ops return
/// tensors, so shape errors caught here are programming errors of the caller
/// (the model validates its config up front).
fn expect<T, E: std::fmt::Display>(op: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{op}: {e}"))
}

/// A bag op's inputs on the host: table shape, flat row ids and the CSR
/// offsets of fixed-size bags.
struct HostBag {
    rows: usize,
    v_dim: usize,
    bags: usize,
    bag: usize,
    idx: Vec<u32>,
    offsets: Vec<usize>,
}

impl HostBag {
    /// `f(table, other)` on the value table (rows, v_dim) and another
    /// tensor's floats, borrowed where contiguous; panics naming `op` on the
    /// kernel's error (see [`expect`]).
    fn with_table<E: std::fmt::Display>(
        &self,
        op: &str,
        values: &FloatTensor<Flex>,
        other: &FloatTensor<Flex>,
        f: impl FnOnce(&memlayer_cpu::Table<'_, f32>, &[f32]) -> Result<(), E>,
    ) {
        with_floats(values, |table_data| {
            let table = expect(
                op,
                memlayer_cpu::Table::new(table_data, self.rows, self.v_dim),
            );
            with_floats(other, |o| expect(op, f(&table, o)))
        })
    }

    fn new(values: &FloatTensor<Flex>, indices: &IntTensor<Flex>) -> Self {
        let [rows, v_dim] = dims2(values);
        let [bags, bag] = dims2(indices);
        Self {
            rows,
            v_dim,
            bags,
            bag,
            idx: ids(indices),
            offsets: memlayer_core::bag::uniform_offsets(bags, bag),
        }
    }
}

impl MemoryBackend for Flex {
    fn memory_bag(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let h = HostBag::new(&values, &indices);
        let mut out = vec![0.0f32; h.bags * h.v_dim];
        h.with_table("memory_bag", &values, &weights, |table, w| {
            memlayer_cpu::bag::bag_forward(table, &h.idx, w, &h.offsets, &mut out)
        });
        flex_f32(out, [h.bags, h.v_dim])
    }

    fn memory_bag_grad_values(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let h = HostBag::new(&values, &indices);
        let (rows, v_dim) = (h.rows, h.v_dim);
        // written straight into the dense gradient burn expects (no sparse
        // rows in between); every element is overwritten
        let mut dense = vec![0.0f32; rows * v_dim];
        with_floats(&weights, |w| {
            with_floats(&grad_out, |g| {
                expect(
                    "memory_bag backward",
                    memlayer_cpu::bag::bag_backward_table_dense(
                        rows, v_dim, &h.idx, w, &h.offsets, g, &mut dense,
                    ),
                )
            })
        });
        flex_f32(dense, [rows, v_dim])
    }

    fn memory_bag_grad_weights(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let h = HostBag::new(&values, &indices);
        let mut dw = vec![0.0f32; h.bags * h.bag];
        h.with_table("memory_bag backward", &values, &grad_out, |table, g| {
            memlayer_cpu::bag::bag_backward_weights(table, &h.idx, &h.offsets, g, &mut dw)
        });
        flex_f32(dw, [h.bags, h.bag])
    }

    fn memory_pk_select(scores: FloatTensor<Self>, knn: usize) -> IntTensor<Self> {
        use rayon::prelude::*;
        let s = scores.layout().shape().clone();
        let (groups, n_keys) = (s[0], s[2]);
        // groups are independent: select in parallel, 64 groups per task,
        // each task writing its own part of the output: rows i1 * n_keys + i2
        const GROUPS_PER_TASK: usize = 64;
        let mut ids = vec![0i64; groups * knn];
        with_floats(&scores, |host| {
            host.par_chunks(2 * n_keys * GROUPS_PER_TASK)
                .zip(ids.par_chunks_mut(knn * GROUPS_PER_TASK))
                .for_each(|(c, out)| {
                    let pairs = expect("memory_pk_select", pkm::select_from_scores(c, n_keys, knn));
                    for (o, p) in out.iter_mut().zip(pairs.chunks_exact(2)) {
                        *o = i64::from(p[0]) * n_keys as i64 + i64::from(p[1]);
                    }
                })
        });
        burn::backend::flex::FlexTensor::from_data(
            TensorData::new(ids, [groups, knn]).convert_dtype(DType::I64),
        )
    }
}

#[cfg(feature = "autodiff")]
impl<B: MemoryBackend, C: CheckpointStrategy> MemoryBackend for Autodiff<B, C> {
    fn memory_bag(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MemoryBagBackward;

        impl<B: MemoryBackend> Backward<B, 2> for MemoryBagBackward {
            // values, indices, weights of the forward
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_values, node_weights] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (values, indices, weights) = ops.state;
                if let Some(node) = node_weights {
                    let dw =
                        B::memory_bag_grad_weights(values.clone(), indices.clone(), grad.clone());
                    grads.register::<B>(node.id, dw);
                }
                if let Some(node) = node_values {
                    let dv = B::memory_bag_grad_values(values, indices, weights, grad);
                    grads.register::<B>(node.id, dv);
                }
            }
        }

        let (values, values_node) = values.into_parts();
        let (weights, weights_node) = weights.into_parts();
        match MemoryBagBackward
            .prepare::<C>([values_node, weights_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::memory_bag(values.clone(), indices.clone(), weights.clone());
                prep.finish((values, indices, weights), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::memory_bag(values, indices, weights)),
        }
    }

    fn memory_bag_grad_values(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        weights: FloatTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Autodiff::<B, C>::from_inner(B::memory_bag_grad_values(
            Autodiff::<B, C>::inner(values),
            indices,
            Autodiff::<B, C>::inner(weights),
            Autodiff::<B, C>::inner(grad_out),
        ))
    }

    fn memory_bag_grad_weights(
        values: FloatTensor<Self>,
        indices: IntTensor<Self>,
        grad_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Autodiff::<B, C>::from_inner(B::memory_bag_grad_weights(
            Autodiff::<B, C>::inner(values),
            indices,
            Autodiff::<B, C>::inner(grad_out),
        ))
    }

    fn memory_pk_select(scores: FloatTensor<Self>, knn: usize) -> IntTensor<Self> {
        B::memory_pk_select(Autodiff::<B, C>::inner(scores), knn)
    }
}
