//! The CUDA backends of the runner (feature `cuda`): GPU 0 in f32, f16 and
//! bf16 storage, or one absent entry with the driver's reason.

use std::rc::Rc;

use memlayer_bank::Dtype;
use memlayer_cpu::DType;
use serde_json::json;

use super::backends::{Backend, DTYPES};

/// The bank codec's dtype of a storage dtype.
pub(crate) fn bank_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::Bf16,
    }
}

/// `cuda_f32`, `cuda_f16`, `cuda_bf16` on GPU 0, or why there is none.
pub(crate) fn backends() -> Vec<Backend> {
    match memlayer_cuda::CudaDevice::new(0) {
        Ok(dev) => {
            let info = json!({"device": dev.name(), "arch": dev.arch(), "ordinal": 0});
            let dev = Rc::new(dev);
            DTYPES
                .into_iter()
                .map(|d| {
                    Backend::cuda(
                        format!("cuda_{}", d.name()),
                        d,
                        info.clone(),
                        Rc::clone(&dev),
                    )
                })
                .collect()
        }
        Err(e) => vec![Backend::cuda_absent(format!("no CUDA GPU: {e}"))],
    }
}
