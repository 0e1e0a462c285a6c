//! AdamW over a host [`ParamStore`], with one set of hyper-parameters per
//! [`ParamGroup`]:
//!
//! - dense matrices: base learning rate, weight decay; gradient clipping by the
//!   global norm of all dense gradients;
//! - norm gains, biases, sub-keys: base learning rate, no weight decay, clipped
//!   with the dense ones;
//! - the product-key value table: its own learning rate (Meta: 10× base) and
//!   clipping; **only the rows read in the step are updated** (lazy Adam:
//!   moments of untouched rows are left as they are);
//! - FFN-memory blocks: their own (lower) learning rate, small weight decay and
//!   clipping; only the blocks fetched in the step are updated.
//!
//! The update is plain f32 arithmetic per element (elements are updated in
//! parallel, each by the same expression; the norms are sequential sums), so a
//! run resumed from a checkpoint continues bit for bit.

use memlayer_core::model::{ParamGroup, ParamStore};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Parameters (or touched rows) of at least this many elements are updated
/// on the rayon pool.
const PARALLEL_MIN_ELEMS: usize = 1 << 17;

/// Hyper-parameters of one group, relative to the base learning rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupHyper {
    /// Learning rate = base × this.
    pub lr_mult: f32,
    /// Decoupled weight decay (AdamW), per unit learning rate.
    pub weight_decay: f32,
    /// Clip this group's gradient norm to this value (0 = no clipping).
    pub clip: f32,
}

/// Optimiser configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Base (peak) learning rate.
    pub lr: f32,
    /// Adam β1.
    pub beta1: f32,
    /// Adam β2.
    pub beta2: f32,
    /// Adam ε.
    pub eps: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// The cosine decays to `lr × min_lr_ratio` at the last step.
    pub min_lr_ratio: f32,
    /// Dense matrices.
    pub dense: GroupHyper,
    /// Gains, biases and sub-keys (clipped together with `dense`).
    pub no_decay: GroupHyper,
    /// The product-key value table.
    pub memory_values: GroupHyper,
    /// FFN-memory blocks.
    pub memory_blocks: GroupHyper,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            dense: GroupHyper {
                lr_mult: 1.0,
                weight_decay: 0.1,
                clip: 1.0,
            },
            no_decay: GroupHyper {
                lr_mult: 1.0,
                weight_decay: 0.0,
                clip: 1.0,
            },
            // Meta: values at 10× the base learning rate (1e-3 vs 1e-4), no decay.
            memory_values: GroupHyper {
                lr_mult: 10.0,
                weight_decay: 0.0,
                clip: 1.0,
            },
            // Apple: memory blocks learn slower than the anchor, small decay.
            memory_blocks: GroupHyper {
                lr_mult: 0.5,
                weight_decay: 0.01,
                clip: 1.0,
            },
        }
    }
}

impl OptimConfig {
    /// Hyper-parameters of `group`.
    pub fn group(&self, group: ParamGroup) -> GroupHyper {
        match group {
            ParamGroup::Dense => self.dense,
            ParamGroup::NoDecay => self.no_decay,
            ParamGroup::MemoryValues => self.memory_values,
            ParamGroup::MemoryBlocks => self.memory_blocks,
        }
    }

    /// Base learning rate at `step` (0-based) of `total`: linear warm-up to
    /// `lr`, then cosine to `lr × min_lr_ratio`.
    pub fn lr_at(&self, step: u64, total: u64) -> f32 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let min = self.min_lr_ratio as f64;
        (self.lr as f64 * (min + (1.0 - min) * cos)) as f32
    }
}

/// Gradients of one step, per parameter in store order.
#[derive(Clone, Debug, Default)]
pub struct StepGrads {
    /// Dense gradient of each parameter (`None`: not reached by the loss).
    pub grads: Vec<Option<Vec<f32>>>,
    /// For sparse groups: the leading-dimension rows touched in this step
    /// (sorted, unique). `None` for dense groups.
    pub touched: Vec<Option<Vec<u32>>>,
}

/// Norms measured by a step (before clipping).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Learning rate used (base).
    pub lr: f32,
    /// Gradient norm of dense + no-decay parameters.
    pub grad_norm: f32,
    /// Gradient norm of the touched value rows.
    pub values_grad_norm: f32,
    /// Gradient norm of the touched blocks.
    pub blocks_grad_norm: f32,
    /// Value rows updated.
    pub values_rows: usize,
    /// Blocks updated.
    pub blocks_rows: usize,
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Optimiser configuration.
    pub config: OptimConfig,
    /// First moments, like the parameters.
    pub m: Vec<Vec<f32>>,
    /// Second moments, like the parameters.
    pub v: Vec<Vec<f32>>,
    /// Steps taken.
    pub step: u64,
}

/// Errors of the optimiser.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Gradients that do not match the parameters.
    #[error("optimizer: {0}")]
    Mismatch(String),
}

fn sq(x: &[f32]) -> f64 {
    x.iter().map(|&g| (g as f64) * (g as f64)).sum()
}

impl AdamW {
    /// Zero moments for `store`.
    pub fn new(config: OptimConfig, store: &ParamStore) -> Self {
        let zeros = || {
            store
                .params()
                .iter()
                .map(|p| vec![0.0; p.data.len()])
                .collect()
        };
        Self {
            config,
            m: zeros(),
            v: zeros(),
            step: 0,
        }
    }

    /// One update of `store` with `grads` at base learning rate `lr`.
    pub fn step(
        &mut self,
        store: &mut ParamStore,
        grads: &StepGrads,
        lr: f32,
    ) -> Result<StepStats, OptimError> {
        let n = store.len();
        if grads.grads.len() != n || grads.touched.len() != n || self.m.len() != n {
            return Err(OptimError::Mismatch(format!(
                "{} gradients / {} touched lists / {} moments for {n} parameters",
                grads.grads.len(),
                grads.touched.len(),
                self.m.len()
            )));
        }
        // Norms per clipping group: dense (Dense + NoDecay), values, blocks.
        let mut norms = [0.0f64; 3];
        let mut rows_updated = [0usize; 2];
        for (p, (g, touched)) in store
            .params()
            .iter()
            .zip(grads.grads.iter().zip(&grads.touched))
        {
            let Some(g) = g else { continue };
            if g.len() != p.data.len() {
                return Err(OptimError::Mismatch(format!(
                    "gradient of {} has {} values, parameter {}",
                    p.name,
                    g.len(),
                    p.data.len()
                )));
            }
            let slot = match p.group {
                ParamGroup::Dense | ParamGroup::NoDecay => 0,
                ParamGroup::MemoryValues => 1,
                ParamGroup::MemoryBlocks => 2,
            };
            match touched {
                Some(rows) if slot > 0 => {
                    let rl = p.row_len();
                    rows_updated[slot - 1] += rows.len();
                    for &r in rows {
                        let r = r as usize;
                        if r * rl >= g.len() {
                            return Err(OptimError::Mismatch(format!(
                                "touched row {r} outside {}",
                                p.name
                            )));
                        }
                        norms[slot] += sq(&g[r * rl..(r + 1) * rl]);
                    }
                }
                _ => norms[slot] += sq(g),
            }
        }
        let norms = norms.map(|x| x.sqrt() as f32);
        let clip_scale = |norm: f32, clip: f32| {
            if clip > 0.0 && norm > clip {
                clip / (norm + 1e-6)
            } else {
                1.0
            }
        };
        let c = &self.config;
        let scales = [
            clip_scale(norms[0], c.dense.clip),
            clip_scale(norms[1], c.memory_values.clip),
            clip_scale(norms[2], c.memory_blocks.clip),
        ];
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, p) in store.params_mut().iter_mut().enumerate() {
            let Some(g) = &grads.grads[i] else { continue };
            let h = c.group(p.group);
            let (scale, sparse) = match p.group {
                ParamGroup::Dense | ParamGroup::NoDecay => (scales[0], false),
                ParamGroup::MemoryValues => (scales[1], true),
                ParamGroup::MemoryBlocks => (scales[2], true),
            };
            let plr = lr * h.lr_mult;
            let rl = p.row_len();
            let n = p.data.len();
            let (m, v, data) = (&mut self.m[i], &mut self.v[i], &mut p.data);
            // one element at a time, the same arithmetic whichever thread runs it
            let update = |g: &[f32], m: &mut [f32], v: &mut [f32], data: &mut [f32]| {
                for j in 0..g.len() {
                    let gj = g[j] * scale;
                    m[j] = c.beta1 * m[j] + (1.0 - c.beta1) * gj;
                    v[j] = c.beta2 * v[j] + (1.0 - c.beta2) * gj * gj;
                    let mhat = m[j] / bc1;
                    let vhat = v[j] / bc2;
                    data[j] -= plr * (mhat / (vhat.sqrt() + c.eps) + h.weight_decay * data[j]);
                }
            };
            // small parameters stay on this thread: waking the pool costs more
            // (its threads spin afterwards, next to this thread's work)
            let parallel = |elems: usize| elems >= PARALLEL_MIN_ELEMS;
            match (&grads.touched[i], sparse) {
                // sorted unique rows (checked in range above): the rows in parallel
                (Some(rows), true)
                    if parallel(rows.len() * rl) && rows.windows(2).all(|w| w[0] < w[1]) =>
                {
                    let mut hit = vec![false; n / rl];
                    for &r in rows {
                        hit[r as usize] = true;
                    }
                    data.par_chunks_mut(rl)
                        .zip(m.par_chunks_mut(rl))
                        .zip(v.par_chunks_mut(rl))
                        .zip(g.par_chunks(rl))
                        .zip(hit.par_iter())
                        .with_min_len(64)
                        .for_each(|((((d, m), v), g), &hit)| {
                            if hit {
                                update(g, m, v, d);
                            }
                        });
                }
                (Some(rows), true) => {
                    for &r in rows {
                        let r = r as usize;
                        let range = r * rl..(r + 1) * rl;
                        update(
                            &g[range.clone()],
                            &mut m[range.clone()],
                            &mut v[range.clone()],
                            &mut data[range],
                        );
                    }
                }
                (None, _) | (Some(_), false) if !parallel(n) => update(g, m, v, data),
                _ => {
                    const CHUNK: usize = 1 << 14;
                    data.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((d, m), v), g)| update(g, m, v, d));
                }
            }
        }
        Ok(StepStats {
            lr,
            grad_norm: norms[0],
            values_grad_norm: norms[1],
            blocks_grad_norm: norms[2],
            values_rows: rows_updated[0],
            blocks_rows: rows_updated[1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> ParamStore {
        let mut s = ParamStore::new();
        s.push("w", &[2, 2], vec![1.0, -1.0, 0.5, 2.0], ParamGroup::Dense)
            .unwrap();
        s.push("b", &[2], vec![0.1, 0.2], ParamGroup::NoDecay)
            .unwrap();
        s.push(
            "memory_values.weight",
            &[4, 2],
            (0..8).map(|x| x as f32).collect(),
            ParamGroup::MemoryValues,
        )
        .unwrap();
        s
    }

    #[test]
    fn adamw_first_step_matches_closed_form() {
        let mut s = store();
        let cfg = OptimConfig {
            dense: GroupHyper {
                lr_mult: 1.0,
                weight_decay: 0.1,
                clip: 0.0,
            },
            ..OptimConfig::default()
        };
        let mut opt = AdamW::new(cfg.clone(), &s);
        let g = StepGrads {
            grads: vec![Some(vec![0.5, -0.25, 0.0, 1.0]), None, None],
            touched: vec![None, None, None],
        };
        let before = s.clone();
        opt.step(&mut s, &g, 0.01).unwrap();
        // step 1: mhat = g, vhat = g², update = sign(g) (for g != 0) + wd·p
        let w0 = before.data("w").unwrap();
        let w1 = s.data("w").unwrap();
        for j in 0..4 {
            let gj = [0.5f32, -0.25, 0.0, 1.0][j];
            let upd = if gj == 0.0 {
                0.0
            } else {
                gj / (gj.abs() + 1e-8)
            };
            let want = w0[j] - 0.01 * (upd + 0.1 * w0[j]);
            assert!((w1[j] - want).abs() < 1e-6, "{j}: {} vs {want}", w1[j]);
        }
        assert_eq!(s.data("b").unwrap(), before.data("b").unwrap());
    }

    #[test]
    fn sparse_rows_only_touched_rows_change_and_clip_is_per_group() {
        let mut s = store();
        let mut opt = AdamW::new(OptimConfig::default(), &s);
        let big = vec![100.0f32; 8];
        let g = StepGrads {
            grads: vec![Some(vec![0.1; 4]), Some(vec![0.1; 2]), Some(big)],
            touched: vec![None, None, Some(vec![1, 3])],
        };
        let before = s.clone();
        let st = opt.step(&mut s, &g, 0.01).unwrap();
        let v0 = before.data("memory_values.weight").unwrap();
        let v1 = s.data("memory_values.weight").unwrap();
        assert_eq!(&v1[0..2], &v0[0..2], "row 0 untouched");
        assert_eq!(&v1[4..6], &v0[4..6], "row 2 untouched");
        assert_ne!(&v1[2..4], &v0[2..4]);
        assert_ne!(&v1[6..8], &v0[6..8]);
        // values norm counts only touched rows: sqrt(4 * 100²) = 200
        assert!((st.values_grad_norm - 200.0).abs() < 1e-3);
        assert!((st.grad_norm - (6.0f32 * 0.01).sqrt()).abs() < 1e-6);
        assert_eq!(st.values_rows, 2);
        // moments of untouched rows stay zero
        assert_eq!(&opt.m[2][0..2], &[0.0, 0.0]);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            ..OptimConfig::default()
        };
        assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-6);
        assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-6);
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-6);
        assert!((c.lr_at(100, 100) - 0.1).abs() < 1e-6);
        let mid = c.lr_at(55, 100);
        assert!((mid - 0.55).abs() < 1e-3, "{mid}");
    }

    #[test]
    fn mismatched_gradients_are_errors() {
        let mut s = store();
        let mut opt = AdamW::new(OptimConfig::default(), &s);
        let g = StepGrads {
            grads: vec![Some(vec![0.0; 3]), None, None],
            touched: vec![None, None, None],
        };
        let err = opt.step(&mut s, &g, 0.1).unwrap_err();
        assert!(err.to_string().contains("gradient of w"), "{err}");
        let g = StepGrads {
            grads: vec![None, None, Some(vec![0.0; 8])],
            touched: vec![None, None, Some(vec![9])],
        };
        assert!(opt.step(&mut s, &g, 0.1).is_err());
    }
}
