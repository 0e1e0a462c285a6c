//! The CUDA columns of `bench kernels` (feature `cuda`): on the first NVIDIA
//! GPU, the copy kernel's bandwidth (the ceiling), the bag forward over the
//! same table stored as f32/f16/bf16 (`cuda`, `cuda_f16`, `cuda_bf16`), PyTorch
//! CUDA's `embedding_bag` on the same shapes as the peer (`torch_cuda*`,
//! `null` without torch or CUDA in it), and the product-key lookup per N.
//! Without a GPU the run goes on and says why in `errors`.

use super::{BagData, KernelsArgs, Shapes, time_median, torch_bag_on};
use anyhow::Result;
use memlayer_bank::Dtype;
use memlayer_core::pkm::PkmConfig;
use memlayer_cuda::bag::{BagBatch, bag_forward_into};
use memlayer_cuda::lookup::LookupBuffers;
use memlayer_cuda::{CudaDevice, DeviceTable};
use serde_json::{Map, Value, json};

/// Measures on GPU 0 into `bag` / `copy` (keys `cuda*`, `torch_cuda*`);
/// returns the device's description with its lookup times, or `None`
/// (the reason pushed to `errors`) when there is no GPU.
pub fn measure(
    args: &KernelsArgs,
    s: &Shapes,
    data: &BagData,
    bag: &mut Map<String, Value>,
    copy: &mut Map<String, Value>,
    errors: &mut Vec<String>,
) -> Option<Value> {
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("cuda: {e}"));
            return None;
        }
    };
    match memlayer_cuda::bandwidth::copy_gbps(&dev, s.gpu_copy_bytes as usize, s.iters) {
        Ok(g) => {
            copy.insert("cuda".into(), json!(g));
        }
        Err(e) => errors.push(format!("cuda copy: {e}")),
    }
    for (dtype, key, elem) in [
        (Dtype::F32, "cuda", 4),
        (Dtype::F16, "cuda_f16", 2),
        (Dtype::Bf16, "cuda_bf16", 2),
    ] {
        match cuda_bag(&dev, s, data, dtype) {
            Ok(secs) => {
                bag.insert(key.into(), json!(s.gathered_bytes(elem) / secs / 1e9));
            }
            Err(e) => {
                errors.push(format!("{key}: {e:#}"));
                bag.insert(key.into(), Value::Null);
            }
        }
    }
    for (dtype, key) in [
        ("f32", "torch_cuda"),
        ("f16", "torch_cuda_f16"),
        ("bf16", "torch_cuda_bf16"),
    ] {
        match torch_bag_on(&args.peer.torch(), s, 1, dtype, "cuda") {
            Ok((gbps, _)) => {
                bag.insert(key.into(), gbps.map_or(Value::Null, |g| json!(g)));
            }
            Err(e) => {
                errors.push(format!("{key}: {e:#}"));
                bag.insert(key.into(), Value::Null);
            }
        }
    }
    let mut per_n = Map::new();
    for &n_keys in &s.n_keys {
        let us = cuda_lookup(&dev, s, n_keys).map_err(|e| {
            errors.push(format!("cuda lookup n_keys={n_keys}: {e:#}"));
        });
        per_n.insert(
            (n_keys * n_keys).to_string(),
            us.map_or(Value::Null, |u| json!(u)),
        );
    }
    Some(json!({
        "name": dev.name(), "arch": dev.arch(),
        "lookup_us_per_token": per_n,
    }))
}

/// Median seconds of one bag forward call on `dev` (table stored as `dtype`).
pub(crate) fn cuda_bag(dev: &CudaDevice, s: &Shapes, data: &BagData, dtype: Dtype) -> Result<f64> {
    let table = DeviceTable::upload(dev, &data.table, s.rows, s.dim, dtype)?;
    let bags = memlayer_core::bag::Bags {
        indices: &data.indices,
        weights: &data.weights,
        offsets: &data.offsets,
    };
    let batch = BagBatch::upload(dev, s.rows, &bags)?;
    let mut out = dev.stream().alloc_zeros::<f32>(s.bags * s.dim)?;
    time_median(s.iters, || {
        bag_forward_into(dev, &table, &batch, &mut out)?;
        dev.synchronize()?;
        Ok(())
    })
}

/// Microseconds per token of the lookup for `n_keys²` rows.
pub(crate) fn cuda_lookup(dev: &CudaDevice, s: &Shapes, n_keys: usize) -> Result<f64> {
    let cfg = PkmConfig {
        n_keys,
        heads: s.heads,
        knn: s.knn,
        k_dim: s.k_dim,
        ..PkmConfig::paper()
    };
    let tokens = s.lookup_tokens;
    let (keys, query) = memlayer_core::pkm::random_lookup_inputs(&cfg, tokens, 7);
    let mut b = LookupBuffers::upload(dev, &cfg, &keys, &query, tokens)?;
    let secs = time_median(s.iters, || {
        b.run(dev, &cfg)?;
        dev.synchronize()?;
        Ok(())
    })?;
    Ok(secs / tokens as f64 * 1e6)
}
