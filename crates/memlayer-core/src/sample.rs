//! Picking the next token from logits: greedy, temperature and top-p
//! sampling with a seeded generator (shared by every runtime, native and
//! web, so the same seed gives the same text everywhere).

use crate::rng::Rng;

/// How to pick the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 = greedy (argmax, ties to the lower id); otherwise softmax(logits / T).
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose mass reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks the settings: `temperature` finite and ≥ 0, `top_p` in (0, 1].
    /// A NaN temperature would otherwise sample nothing useful and exit cleanly.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature {} is not a finite number >= 0 (0 = greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p {} is not in (0, 1] (1 = off)", self.top_p));
        }
        Ok(())
    }
}

/// How many tokens a generation may add after a prompt of `prompt_tokens`
/// with a context of `max_seq_len`: at most `max_tokens`, and the prompt must
/// leave room for at least one. The one rule of every runtime (native and
/// browser), so a prompt at or over the context length is an error in both
/// rather than a silent empty answer.
pub fn new_token_budget(
    prompt_tokens: usize,
    max_tokens: usize,
    max_seq_len: usize,
) -> Result<usize, String> {
    if prompt_tokens == 0 {
        return Err("the prompt encodes to no tokens".into());
    }
    if prompt_tokens >= max_seq_len {
        return Err(format!(
            "the prompt takes {prompt_tokens} tokens; the model's context is {max_seq_len}, \
             so no token is left to generate (shorten the prompt)"
        ));
    }
    Ok(max_tokens.min(max_seq_len - prompt_tokens))
}

/// Picks a token from `logits` (vocab) by `s`, drawing from `rng` when sampling.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(i, _)| i as u32)
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax();
    }
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, f64::from((l - max) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    // most likely first (ties to the lower id), cut at top_p
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_p = f64::from(s.top_p.clamp(0.0, 1.0));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= top_p {
            break;
        }
    }
    let probs = &probs[..kept.max(1)];
    let kept_mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * kept_mass;
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0;
        }
    }
    probs[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_nan_negative_and_out_of_range_settings() {
        let ok = Sampling::default();
        assert!(ok.validate().is_ok());
        for t in [f32::NAN, f32::INFINITY, -0.5] {
            let e = Sampling {
                temperature: t,
                ..ok
            }
            .validate()
            .unwrap_err();
            assert!(e.contains("temperature"), "{e}");
        }
        for p in [0.0, -1.0, 1.5, f32::NAN] {
            let e = Sampling { top_p: p, ..ok }.validate().unwrap_err();
            assert!(e.contains("top-p"), "{e}");
        }
        assert!(
            Sampling {
                temperature: 0.7,
                top_p: 0.9,
                ..ok
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn new_token_budget_refuses_prompts_that_fill_the_context() {
        assert_eq!(new_token_budget(3, 32, 64), Ok(32));
        assert_eq!(new_token_budget(60, 32, 64), Ok(4));
        assert_eq!(new_token_budget(63, 32, 64), Ok(1));
        for n in [64, 65, 1000] {
            let e = new_token_budget(n, 32, 64).unwrap_err();
            assert!(
                e.contains(&format!("{n} tokens")) && e.contains("64"),
                "{e}"
            );
        }
        assert!(new_token_budget(0, 32, 64).is_err());
    }

    #[test]
    fn greedy_takes_the_argmax_with_ties_to_the_lower_id() {
        let mut rng = Rng::new(0);
        let s = Sampling::default();
        assert_eq!(pick(&[0.0, 2.0, 2.0, 1.0], &s, &mut rng), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_sampling_follows_the_seed() {
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        // token 2 holds > 50 % of the mass: the nucleus is {2}
        let logits = [0.0, 0.0, 5.0, 0.0];
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            assert_eq!(pick(&logits, &s, &mut rng), 2);
        }
        let s = Sampling { top_p: 1.0, ..s };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..64)
                .map(|_| pick(&[1.0, 1.0, 1.0, 1.0], &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        for t in 0..4 {
            assert!(d.contains(&t), "uniform logits must reach token {t}: {d:?}");
        }
    }
}
