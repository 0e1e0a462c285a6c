//! Evaluation: held-out-template recall of facts by frequency bucket, and
//! perplexity on held-out contexts.
//!
//! Recall is exact match of greedy decoding: the model, given the held-out
//! prompt, must produce every token of `" " + answer`. It is computed by
//! teacher forcing in one forward (greedy decoding reproduces the answer iff
//! the argmax at each answer position is the next answer token).
//! Multiple-choice ("ranked") recall asks whether the answer is the most
//! likely of all values of its attribute after the prompt (chance = 1/#values),
//! which shows knowledge a small model has but cannot yet put out verbatim.
//! The baseline per bucket is what always answering an attribute's most
//! mentioned value would score.

use crate::data::facts::{ATTRIBUTES, FactQuery, FactsDataset, attribute_index};
use crate::data::packing::PackedSequences;
use crate::data::tokenizer::Tokenizer;
use crate::prepare::Routing;
use crate::trainer::TrainError;
use memlayer_core::model::ModelConfig;
use memlayer_core::rng::Rng;
use memlayer_model::Model;
use serde::{Deserialize, Serialize};

/// Recall of one frequency bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketRecall {
    /// Bucket name (mention counts, e.g. `3-7`).
    pub name: String,
    /// Queries evaluated.
    pub queries: usize,
    /// Exact-match recall (greedy decoding reproduces the answer).
    pub recall: f64,
    /// Multiple-choice recall: the answer is the most likely of the
    /// attribute's values (sum of token log-probabilities after the prompt).
    pub ranked_recall: f64,
    /// Recall of answering each attribute's most mentioned value.
    pub baseline: f64,
    /// `1 / number of values`, averaged over the bucket's queries.
    pub chance: f64,
}

/// Result of [`evaluate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Rare → common.
    pub buckets: Vec<BucketRecall>,
    /// Recall over all evaluated queries.
    pub recall: f64,
    /// Mean next-token loss on held-out sequences (nats).
    pub heldout_loss: f64,
    /// `exp(heldout_loss)`.
    pub perplexity: f64,
    /// Held-out sequences evaluated.
    pub heldout_sequences: usize,
}

/// A deterministic sample of at most `per_bucket` queries of each bucket
/// (all when `per_bucket` is 0), in bucket order.
pub fn sample_queries(facts: &FactsDataset, per_bucket: usize, seed: u64) -> Vec<FactQuery> {
    let mut out = Vec::new();
    for b in 0..facts.buckets.len() {
        let mut qs: Vec<&FactQuery> = facts.eval.iter().filter(|q| q.bucket == b).collect();
        if per_bucket > 0 && qs.len() > per_bucket {
            Rng::new(seed ^ (b as u64 + 1).wrapping_mul(0x51_7cc1_b727_220a)).shuffle(&mut qs);
            qs.truncate(per_bucket);
            qs.sort_by_key(|q| (q.entity, attribute_index(&q.attribute)));
        }
        out.extend(qs.into_iter().cloned());
    }
    out
}

/// Most mentioned value of each attribute (in [`ATTRIBUTES`] order).
pub fn majority_values(facts: &FactsDataset) -> Vec<String> {
    ATTRIBUTES
        .iter()
        .enumerate()
        .map(|(a, _)| {
            let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
            for e in &facts.entities {
                *counts.entry(e.values[a].as_str()).or_default() += u64::from(e.mentions[a]);
            }
            counts
                .into_iter()
                .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(x.0)))
                .map(|(v, _)| v.to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// Block rows of the context `text` ([`memlayer_model_dir::routing::route`]).
pub fn route(
    cfg: &ModelConfig,
    routing: Option<&Routing>,
    text: &str,
) -> Result<Option<Vec<usize>>, TrainError> {
    Ok(memlayer_model_dir::routing::route(cfg, routing, text)?)
}

/// Whether greedy decoding after `q.prompt` produces `" " + q.answer`.
pub fn recalled(
    model: &Model,
    tokenizer: &Tokenizer,
    routing: Option<&Routing>,
    q: &FactQuery,
) -> Result<bool, TrainError> {
    let prompt = tokenizer.encode(&q.prompt)?;
    let answer = tokenizer.encode(&q.continuation())?;
    if prompt.is_empty() || answer.is_empty() {
        return Ok(false);
    }
    let mut all = prompt.clone();
    all.extend_from_slice(&answer);
    let rows = route(model.config(), routing, &q.prompt)?;
    let input = &all[..all.len() - 1];
    let f = model.forward(model.tokens(input, 1)?, rows.as_deref(), None)?;
    let v = model.config().vocab_size;
    // (1, t, vocab) → argmax at positions prompt.len()-1 ..
    let logits: Vec<f32> = f.logits.into_data().iter::<f32>().collect();
    for (j, &want) in answer.iter().enumerate() {
        let pos = prompt.len() - 1 + j;
        let row = &logits[pos * v..(pos + 1) * v];
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(i, _)| i as u32);
        if best != want {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether `q.answer` is the most likely continuation among `candidates`
/// (sum of the continuation tokens' log-probabilities; ties go to the
/// earlier candidate). One batched forward over all candidates.
pub fn ranked_first(
    model: &Model,
    tokenizer: &Tokenizer,
    routing: Option<&Routing>,
    q: &FactQuery,
    candidates: &[String],
) -> Result<bool, TrainError> {
    let prompt = tokenizer.encode(&q.prompt)?;
    if prompt.is_empty() || candidates.is_empty() {
        return Ok(false);
    }
    let conts: Vec<Vec<u32>> = candidates
        .iter()
        .map(|c| tokenizer.encode(&format!(" {c}")))
        .collect::<Result<_, _>>()?;
    let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 {
        return Ok(false);
    }
    let width = prompt.len() + longest - 1;
    let pad = tokenizer.eos_id();
    let mut tokens = Vec::with_capacity(conts.len() * width);
    for c in &conts {
        let mut row = prompt.clone();
        row.extend_from_slice(c);
        row.truncate(width);
        row.resize(width, pad);
        tokens.extend(row);
    }
    let rows = route(model.config(), routing, &q.prompt)?.map(|r| {
        r.iter()
            .cycle()
            .take(r.len() * conts.len())
            .copied()
            .collect::<Vec<_>>()
    });
    let f = model.forward(model.tokens(&tokens, conts.len())?, rows.as_deref(), None)?;
    let v = model.config().vocab_size;
    // (n, width, vocab) log-probabilities
    let logp: Vec<f32> = burn::tensor::activation::log_softmax(f.logits, 2)
        .into_data()
        .iter::<f32>()
        .collect();
    let mut best = (f64::NEG_INFINITY, usize::MAX);
    for (i, c) in conts.iter().enumerate() {
        let mut score = 0.0f64;
        for (j, &tok) in c.iter().enumerate() {
            let pos = prompt.len() - 1 + j;
            score += logp[(i * width + pos) * v + tok as usize] as f64;
        }
        if score > best.0 {
            best = (score, i);
        }
    }
    Ok(candidates.get(best.1).is_some_and(|c| c == &q.answer))
}

/// Mean loss over held-out sequences (up to `max_sequences`).
pub fn heldout_loss(
    model: &Model,
    heldout: &PackedSequences,
    max_sequences: usize,
) -> Result<(f64, usize), TrainError> {
    let n = heldout.len().min(max_sequences);
    if n == 0 {
        return Ok((f64::NAN, 0));
    }
    let mut total = 0.0;
    let batch = 8;
    let mut done = 0;
    while done < n {
        let ids: Vec<usize> = (done..(done + batch).min(n)).collect();
        let mut tokens = Vec::new();
        let mut rows: Vec<usize> = Vec::new();
        for &i in &ids {
            tokens.extend_from_slice(heldout.sequence(i));
            rows.extend(heldout.path(i).iter().map(|&x| x as usize));
        }
        let rows = model.config().hier.as_ref().map(|_| rows);
        let (loss, _) = model.loss(&tokens, ids.len(), rows.as_deref())?;
        let l: f32 = loss.into_data().iter::<f32>().next().unwrap_or(f32::NAN);
        total += l as f64 * ids.len() as f64;
        done += ids.len();
    }
    Ok((total / n as f64, n))
}

/// Recall by bucket on `queries` and held-out perplexity.
pub fn evaluate(
    model: &Model,
    tokenizer: &Tokenizer,
    routing: Option<&Routing>,
    facts: Option<&FactsDataset>,
    queries: &[FactQuery],
    heldout: &PackedSequences,
) -> Result<EvalReport, TrainError> {
    let mut buckets = Vec::new();
    let mut hits_all = 0usize;
    if let Some(f) = facts {
        let majority = majority_values(f);
        for (b, spec) in f.buckets.iter().enumerate() {
            let qs: Vec<&FactQuery> = queries.iter().filter(|q| q.bucket == b).collect();
            let mut hits = 0usize;
            let mut ranked = 0usize;
            let mut base = 0usize;
            let mut chance = 0.0;
            for q in &qs {
                if recalled(model, tokenizer, routing, q)? {
                    hits += 1;
                }
                if ranked_first(model, tokenizer, routing, q, f.candidates(q))? {
                    ranked += 1;
                }
                let a = attribute_index(&q.attribute).unwrap_or(0);
                if majority.get(a).is_some_and(|m| m == &q.answer) {
                    base += 1;
                }
                chance += 1.0 / f.candidates(q).len().max(1) as f64;
            }
            hits_all += hits;
            let n = qs.len().max(1) as f64;
            buckets.push(BucketRecall {
                name: spec.name.clone(),
                queries: qs.len(),
                recall: hits as f64 / n,
                ranked_recall: ranked as f64 / n,
                baseline: base as f64 / n,
                chance: chance / n,
            });
        }
    }
    let (heldout_loss, heldout_sequences) = heldout_loss(model, heldout, 256)?;
    Ok(EvalReport {
        recall: hits_all as f64 / queries.len().max(1) as f64,
        buckets,
        heldout_loss,
        perplexity: heldout_loss.exp(),
        heldout_sequences,
    })
}
