//! The product-key lookup on CUDA (`lookup.cu`): `pk_norm_rows` scores the
//! sub-keys (RMS-normalised with qk-norm), `pk_lookup` does one block per
//! (token, head): the query halves, both halves' sub-key scores and top-k
//! (a bitonic sort of `desc_key(score) << 32 | id` keys in shared memory),
//! the candidates that can be among the best k, their ranks, softmax.
//! Indices and scores are bit-identical to `memlayer_core::pkm::lookup`.

use crate::device::CudaDevice;
use crate::{CudaError, kernels};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use memlayer_core::error::check_len;
use memlayer_core::pkm::{Lookup, PkmConfig, QK_NORM_EPS};

/// Threads per lookup block.
const BLOCK: u32 = 256;

/// Shared memory a block may use without opting in (48 KiB).
const SHARED_LIMIT: usize = 48 * 1024;

/// Candidates `(a, b)` with `(a + 1)(b + 1) <= k`.
pub fn max_candidates(k: usize) -> usize {
    (1..=k).map(|a| k / a).sum()
}

/// The shared memory of one `pk_lookup` block, or why `cfg` does not fit.
pub fn shared_bytes(cfg: &PkmConfig) -> Result<usize, CudaError> {
    let pow2 = cfg.n_keys.next_power_of_two();
    let bytes = pow2 * 8 + 2 * cfg.half() * 4 + 2 * cfg.knn * 8 + max_candidates(cfg.knn) * 16;
    if bytes > SHARED_LIMIT {
        return Err(CudaError::Unsupported(format!(
            "product-key lookup with {} sub-keys, k = {}, k_dim = {} needs {bytes} bytes of shared \
             memory per block; the CUDA kernel has {SHARED_LIMIT} (at most 4096 sub-keys per half: \
             N ≤ 2^24 rows)",
            cfg.n_keys, cfg.knn, cfg.k_dim
        )));
    }
    Ok(bytes)
}

/// A lookup's device buffers for `tokens` queries.
pub struct LookupBuffers {
    /// (heads, 2, n_keys, half) the sub-keys as scored.
    keys: CudaSlice<f32>,
    /// (tokens, heads, k_dim)
    query: CudaSlice<f32>,
    /// (tokens, heads, knn) each.
    indices: CudaSlice<u32>,
    scores: CudaSlice<f32>,
    weights: CudaSlice<f32>,
    tokens: usize,
}

impl LookupBuffers {
    /// Uploads `keys` (heads, 2, n_keys, half) — normalised on the device
    /// when `cfg.qk_norm` — and `query` (tokens, heads, k_dim).
    pub fn upload(
        dev: &CudaDevice,
        cfg: &PkmConfig,
        keys: &[f32],
        query: &[f32],
        tokens: usize,
    ) -> Result<Self, CudaError> {
        cfg.validate()?;
        check_len("keys", keys, &[cfg.heads, 2, cfg.n_keys, cfg.half()])?;
        check_len("query", query, &[tokens, cfg.heads, cfg.k_dim])?;
        shared_bytes(cfg)?;
        let raw = dev.upload("sub-keys", keys)?;
        let keys = if cfg.qk_norm {
            let rows = cfg.heads * 2 * cfg.n_keys;
            let mut out = dev.zeros::<f32>("scored sub-keys", keys.len())?;
            let f = dev.function(&kernels::LOOKUP, "pk_norm_rows")?;
            let (n, len) = (rows as u32, cfg.half() as u32);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(BLOCK), 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = dev.stream().launch_builder(&f);
            launch
                .arg(&raw)
                .arg(&n)
                .arg(&len)
                .arg(&QK_NORM_EPS)
                .arg(&mut out);
            // SAFETY: arguments match pk_norm_rows; rows × len floats each.
            unsafe { launch.launch(cfg) }
                .map_err(|e| CudaError::driver("launching pk_norm_rows", e))?;
            out
        } else {
            raw
        };
        let n = tokens * cfg.heads * cfg.knn;
        Ok(Self {
            keys,
            query: dev.upload("queries", query)?,
            indices: dev.zeros("selected rows", n)?,
            scores: dev.zeros("selected scores", n)?,
            weights: dev.zeros("selected weights", n)?,
            tokens,
        })
    }

    /// Enqueues the lookup (no wait).
    pub fn run(&mut self, dev: &CudaDevice, cfg: &PkmConfig) -> Result<(), CudaError> {
        let groups = u32::try_from(self.tokens * cfg.heads).map_err(|_| {
            CudaError::Unsupported(format!("{} tokens × {} heads", self.tokens, cfg.heads))
        })?;
        if groups == 0 {
            return Ok(());
        }
        let shared = shared_bytes(cfg)? as u32;
        let f = dev.function(&kernels::LOOKUP, "pk_lookup")?;
        let (heads, n_keys, half, k) = (
            cfg.heads as u32,
            cfg.n_keys as u32,
            cfg.half() as u32,
            cfg.knn as u32,
        );
        let qk = u32::from(cfg.qk_norm);
        let scale = cfg.score_scale();
        let pow2 = cfg.n_keys.next_power_of_two() as u32;
        let max_cand = max_candidates(cfg.knn) as u32;
        let launch_cfg = LaunchConfig {
            grid_dim: (groups, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: shared,
        };
        let mut launch = dev.stream().launch_builder(&f);
        launch
            .arg(&self.keys)
            .arg(&self.query)
            .arg(&heads)
            .arg(&n_keys)
            .arg(&half)
            .arg(&k)
            .arg(&qk)
            .arg(&QK_NORM_EPS)
            .arg(&scale)
            .arg(&pow2)
            .arg(&max_cand)
            .arg(&mut self.indices)
            .arg(&mut self.scores)
            .arg(&mut self.weights);
        // SAFETY: arguments match pk_lookup; the shared memory is sized by
        // shared_bytes, the outputs hold tokens × heads × knn each.
        unsafe { launch.launch(launch_cfg) }
            .map_err(|e| CudaError::driver("launching pk_lookup", e))?;
        Ok(())
    }

    /// The result (waits for the stream).
    pub fn read(&self, dev: &CudaDevice, cfg: &PkmConfig) -> Result<Lookup, CudaError> {
        let n = self.tokens * cfg.heads * cfg.knn;
        Ok(Lookup {
            indices: dev.download("selected rows", &self.indices, n)?,
            scores: dev.download("selected scores", &self.scores, n)?,
            weights: dev.download("selected weights", &self.weights, n)?,
        })
    }
}

/// Product-key search and softmax. keys: (heads, 2, n_keys, half); query:
/// (tokens, heads, k_dim) → the selected rows, scores and weights, each
/// (tokens, heads, knn).
pub fn lookup(
    dev: &CudaDevice,
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
) -> Result<Lookup, CudaError> {
    let mut b = LookupBuffers::upload(dev, cfg, keys, query, tokens)?;
    b.run(dev, cfg)?;
    b.read(dev, cfg)
}

/// The shared memory of one `pk_select_scores` block (sort keys, the two
/// halves' top-k, the candidates), or why (n_keys, k) does not fit.
pub fn select_shared_bytes(n_keys: usize, k: usize) -> Result<usize, CudaError> {
    let bytes = n_keys.next_power_of_two() * 8 + 2 * k * 8 + max_candidates(k) * 16;
    if bytes > SHARED_LIMIT {
        return Err(CudaError::Unsupported(format!(
            "product-key selection with {n_keys} sub-keys, k = {k} needs {bytes} bytes of shared \
             memory per block; the CUDA kernel has {SHARED_LIMIT} (at most 4096 sub-keys per half)"
        )));
    }
    Ok(bytes)
}

/// Enqueues product-key selection from scores already on the device (the
/// model's training step, where burn computes the sub-key scores): scores
/// (groups, 2, n_keys) → the best `k` rows `i1 * n_keys + i2` into `rows`
/// and their scores into `best`, (groups, k) each, by the rule of
/// `memlayer_core::pkm::select_from_scores` (its `(i1, i2)` pairs as rows,
/// the same bits). No wait.
pub fn select_from_scores_into(
    dev: &CudaDevice,
    scores: &CudaSlice<f32>,
    (groups, n_keys, k): (usize, usize, usize),
    rows: &mut CudaSlice<u32>,
    best: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    if k == 0 || k > n_keys {
        return Err(CudaError::Unsupported(format!(
            "product-key selection needs 1 <= k ({k}) <= n_keys ({n_keys})"
        )));
    }
    let shared = select_shared_bytes(n_keys, k)? as u32;
    let too_small = groups
        .checked_mul(2 * n_keys)
        .is_none_or(|n| scores.len() < n)
        || rows.len() < groups * k
        || best.len() < groups * k;
    if too_small {
        return Err(CudaError::Unsupported(format!(
            "selection of ({groups}, 2, {n_keys}) scores, k = {k}: buffers of {} scores, {} rows, \
             {} best scores",
            scores.len(),
            rows.len(),
            best.len()
        )));
    }
    let g = u32::try_from(groups)
        .map_err(|_| CudaError::Unsupported(format!("{groups} groups exceed one launch grid")))?;
    if g == 0 {
        return Ok(());
    }
    let f = dev.function(&kernels::LOOKUP, "pk_select_scores")?;
    let (n, kk) = (n_keys as u32, k as u32);
    let pow2 = n_keys.next_power_of_two() as u32;
    let max_cand = max_candidates(k) as u32;
    let cfg = LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut launch = dev.stream().launch_builder(&f);
    launch
        .arg(scores)
        .arg(&n)
        .arg(&kk)
        .arg(&pow2)
        .arg(&max_cand)
        .arg(rows)
        .arg(best);
    // SAFETY: arguments match pk_select_scores; shared memory sized by
    // select_shared_bytes; the buffers' sizes are checked above.
    unsafe { launch.launch(cfg) }
        .map_err(|e| CudaError::driver("launching pk_select_scores", e))?;
    Ok(())
}

/// [`select_from_scores_into`] from host scores (groups, 2, n_keys): the
/// selected rows, (groups, k).
pub fn select_from_scores(
    dev: &CudaDevice,
    scores: &[f32],
    n_keys: usize,
    k: usize,
) -> Result<Vec<u32>, CudaError> {
    if n_keys == 0 || !scores.len().is_multiple_of(2 * n_keys) {
        return Err(CudaError::Unsupported(format!(
            "{} scores are not (groups, 2, {n_keys})",
            scores.len()
        )));
    }
    let groups = scores.len() / (2 * n_keys);
    let s = dev.upload("sub-key scores", scores)?;
    let mut rows = dev.zeros::<u32>("selected rows", groups * k)?;
    let mut best = dev.zeros::<f32>("selected scores", groups * k)?;
    select_from_scores_into(dev, &s, (groups, n_keys, k), &mut rows, &mut best)?;
    dev.download("selected rows", &rows, groups * k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda_for_tests;
    use memlayer_core::pkm;

    fn config(n_keys: usize, knn: usize, heads: usize, k_dim: usize, qk_norm: bool) -> PkmConfig {
        PkmConfig {
            n_keys,
            knn,
            heads,
            k_dim,
            qk_norm,
            ..PkmConfig::paper()
        }
    }

    fn check(
        dev: &CudaDevice,
        cfg: &PkmConfig,
        keys: &[f32],
        query: &[f32],
        tokens: usize,
        what: &str,
    ) {
        let got = lookup(dev, cfg, keys, query, tokens).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = pkm::lookup(cfg, keys, query, tokens).expect("oracle");
        assert_eq!(got.indices, want.indices, "{what}: indices");
        assert_eq!(got.scores, want.scores, "{what}: scores");
        for (g, w) in got.weights.iter().zip(&want.weights) {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{what}: weight {g} vs {w}"
            );
        }
    }

    #[test]
    fn lookup_equals_the_oracle_on_random_and_adversarial_shapes() {
        let Some(dev) = cuda_for_tests() else { return };
        // (n_keys, knn, heads, k_dim, qk_norm, tokens): k = n_keys (every
        // candidate), k = 1, non-power-of-two n_keys, the runner's shapes
        for (i, &(n, k, h, kd, qk, t)) in [
            (5, 5, 1, 8, false, 3),
            (12, 4, 2, 16, true, 7),
            (100, 1, 3, 6, true, 5),
            (256, 32, 4, 128, true, 64),
            (1024, 16, 2, 64, false, 9),
            (4096, 32, 4, 256, true, 8),
        ]
        .iter()
        .enumerate()
        {
            let cfg = config(n, k, h, kd, qk);
            let (keys, query) = pkm::random_lookup_inputs(&cfg, t, 40 + i as u64);
            check(&dev, &cfg, &keys, &query, t, &format!("n_keys {n}, k {k}"));
        }
        // ties: every sub-key equal (all scores tie: rows by id), and
        // -0.0 against +0.0, and a NaN query (NaN ranks last)
        let cfg = config(16, 6, 2, 8, false);
        let keys = vec![0.25; 2 * 2 * 16 * 4];
        let query = vec![1.0; 3 * 2 * 8];
        check(&dev, &cfg, &keys, &query, 3, "all scores tied");
        let mut keys = vec![0.0; 2 * 2 * 16 * 4];
        for (i, v) in keys.iter_mut().enumerate() {
            *v = if i % 3 == 0 { -0.0 } else { 0.0 };
        }
        check(&dev, &cfg, &keys, &query, 3, "signed zeros");
        let (keys, mut query) = pkm::random_lookup_inputs(&cfg, 2, 9);
        query[0] = f32::NAN;
        check(&dev, &cfg, &keys, &query, 2, "a NaN query");
        // no tokens: nothing to do
        check(&dev, &cfg, &keys, &[], 0, "no tokens");
    }

    /// The oracle's selection as rows: its (groups, k, 2) pairs as `i1 * n_keys + i2`.
    fn oracle_rows(scores: &[f32], n_keys: usize, k: usize) -> Vec<u32> {
        pkm::select_from_scores(scores, n_keys, k)
            .expect("oracle")
            .chunks_exact(2)
            .map(|p| p[0] * n_keys as u32 + p[1])
            .collect()
    }

    #[test]
    fn selection_from_scores_equals_the_oracle() {
        let Some(dev) = cuda_for_tests() else { return };
        let mut rng = memlayer_core::rng::Rng::new(3);
        for (n, k, groups) in [
            (5, 5, 3),
            (12, 4, 7),
            (100, 1, 5),
            (256, 32, 33),
            (1000, 16, 4),
        ] {
            let scores: Vec<f32> = (0..groups * 2 * n).map(|_| rng.normal()).collect();
            let got = select_from_scores(&dev, &scores, n, k).expect("select");
            assert_eq!(got, oracle_rows(&scores, n, k), "n_keys {n}, k {k}");
        }
        // ties: every score equal; signed zeros
        let tied = vec![0.5f32; 3 * 2 * 16];
        let want = oracle_rows(&tied, 16, 6);
        assert_eq!(select_from_scores(&dev, &tied, 16, 6).expect("tied"), want);
        let zeros: Vec<f32> = (0..2 * 2 * 16)
            .map(|i| if i % 3 == 0 { -0.0 } else { 0.0 })
            .collect();
        let want = oracle_rows(&zeros, 16, 6);
        assert_eq!(
            select_from_scores(&dev, &zeros, 16, 6).expect("zeros"),
            want
        );
        // k above n_keys is refused by name
        let err = select_from_scores(&dev, &tied, 16, 17)
            .unwrap_err()
            .to_string();
        assert!(err.contains("k (17) <= n_keys (16)"), "{err}");
    }

    #[test]
    fn too_many_sub_keys_are_refused_by_name() {
        let cfg = config(8192, 32, 4, 256, true);
        let err = shared_bytes(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("8192 sub-keys") && err.contains("N ≤ 2^24"),
            "{err}"
        );
        assert_eq!(max_candidates(4), 4 + 2 + 1 + 1);
        assert!(shared_bytes(&config(4096, 32, 4, 256, true)).is_ok());
    }
}
