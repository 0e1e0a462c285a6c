//! Training checkpoints: parameters, AdamW moments and the step, in one
//! safetensors file written atomically (temp file + rename), so a process
//! killed at any moment leaves either the previous or the new checkpoint.
//!
//! Tensors: `param/{name}`, `adam_m/{name}`, `adam_v/{name}` (f32); metadata:
//! `step` (optimizer steps taken), `config` (the training config as JSON, to
//! refuse resuming a different run), `format` = `memlayer-checkpoint-v1`.

use crate::data::write_atomic;
use crate::optim::{AdamW, OptimConfig};
use memlayer_core::model::ParamStore;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File name of the checkpoint inside the run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const FORMAT: &str = "memlayer-checkpoint-v1";

/// Errors reading or writing a checkpoint; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// I/O on the checkpoint file.
    #[error("checkpoint {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The file is not a checkpoint of this run.
    #[error("checkpoint {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Parameters.
    pub store: ParamStore,
    /// Optimiser state (its `step` is the number of steps taken).
    pub optim: AdamW,
}

/// Writes `store` and `optim` to `dir/checkpoint.safetensors` atomically.
pub fn save(
    dir: &Path,
    store: &ParamStore,
    optim: &AdamW,
    config_json: &str,
) -> Result<PathBuf, CheckpointError> {
    let path = dir.join(CHECKPOINT_FILE);
    let err = |message: String| CheckpointError::Io {
        path: path.clone(),
        message,
    };
    let mut views = Vec::with_capacity(store.len() * 3);
    for (i, p) in store.params().iter().enumerate() {
        for (prefix, data) in [
            ("param", &p.data),
            ("adam_m", &optim.m[i]),
            ("adam_v", &optim.v[i]),
        ] {
            let view = TensorView::new(Dtype::F32, p.shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| err(format!("tensor {prefix}/{}: {e}", p.name)))?;
            views.push((format!("{prefix}/{}", p.name), view));
        }
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("step".to_string(), optim.step.to_string());
    meta.insert("config".to_string(), config_json.to_string());
    meta.insert(
        "optimizer".to_string(),
        serde_json::to_string(&optim.config).map_err(|e| err(e.to_string()))?,
    );
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
    write_atomic(&path, &bytes).map_err(|e| err(e.to_string()))?;
    Ok(path)
}

/// Whether `dir` holds a checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join(CHECKPOINT_FILE).is_file()
}

/// Loads `dir/checkpoint.safetensors` into a copy of `template` (which fixes
/// names and shapes). Fails, naming the file, when it is missing, corrupt,
/// of another format, or was written for a different training config.
pub fn load(
    dir: &Path,
    template: &ParamStore,
    config_json: &str,
) -> Result<Checkpoint, CheckpointError> {
    let path = dir.join(CHECKPOINT_FILE);
    let invalid = |message: String| CheckpointError::Invalid {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| CheckpointError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| invalid("no metadata".into()))?;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(invalid(format!("not a {FORMAT} file")));
    }
    if meta.get("config").map(String::as_str) != Some(config_json) {
        return Err(invalid(
            "written by a run with a different training config; use another --out or the same config"
                .into(),
        ));
    }
    let step: u64 = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad step".into()))?;
    let optim_cfg: OptimConfig = meta
        .get("optimizer")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| invalid("bad optimizer config".into()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let mut store = template.clone();
    let mut optim = AdamW::new(optim_cfg, template);
    optim.step = step;
    for (i, p) in store.params_mut().iter_mut().enumerate() {
        for (prefix, dst) in [
            ("param", &mut p.data),
            ("adam_m", &mut optim.m[i]),
            ("adam_v", &mut optim.v[i]),
        ] {
            let name = format!("{prefix}/{}", p.name);
            let view = st
                .tensor(&name)
                .map_err(|_| invalid(format!("missing tensor {name}")))?;
            if view.dtype() != Dtype::F32 || view.shape() != p.shape.as_slice() {
                return Err(invalid(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    view.shape(),
                    p.shape
                )));
            }
            for (d, s) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
    }
    Ok(Checkpoint { store, optim })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::StepGrads;
    use memlayer_core::model::ParamGroup;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("memlayer-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn store() -> ParamStore {
        let mut s = ParamStore::new();
        s.push(
            "a",
            &[2, 3],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            ParamGroup::Dense,
        )
        .unwrap();
        s.push("b", &[1], vec![0.5], ParamGroup::NoDecay).unwrap();
        s
    }

    #[test]
    fn round_trip_restores_params_moments_and_step() {
        let d = dir("rt");
        let mut s = store();
        let mut opt = AdamW::new(OptimConfig::default(), &s);
        let g = StepGrads {
            grads: vec![Some(vec![0.1, -0.2, 0.3, 0.0, 1.0, -1.0]), Some(vec![2.0])],
            touched: vec![None, None],
        };
        opt.step(&mut s, &g, 0.01).unwrap();
        opt.step(&mut s, &g, 0.01).unwrap();
        save(&d, &s, &opt, "{\"x\":1}").unwrap();
        let c = load(&d, &store(), "{\"x\":1}").unwrap();
        assert_eq!(c.store, s);
        assert_eq!(c.optim, opt);
        let err = load(&d, &store(), "{\"x\":2}").unwrap_err();
        assert!(
            err.to_string().contains("different training config"),
            "{err}"
        );
        // corruption is detected and names the file
        let p = d.join(CHECKPOINT_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&p, &bytes).unwrap();
        let err = load(&d, &store(), "{\"x\":1}").unwrap_err();
        assert!(err.to_string().contains(CHECKPOINT_FILE), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_checkpoint_names_the_path() {
        let d = dir("missing");
        assert!(!exists(&d));
        let err = load(&d, &store(), "{}").unwrap_err();
        assert!(err.to_string().contains(CHECKPOINT_FILE), "{err}");
    }
}
