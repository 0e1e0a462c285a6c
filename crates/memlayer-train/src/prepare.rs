//! Everything a run needs before the first step, computed deterministically
//! from the [`TrainConfig`]: contexts (training and held-out), the BPE
//! tokenizer, the retriever and cluster tree (hierarchical memory), and the
//! packed training sequences. `--resume` recomputes it and checks that the
//! tokenizer saved by the interrupted run is the same.

use crate::config::{DataSpec, TrainConfig};
use crate::data::context_index::ContextIndex;
use crate::data::corpus::{CorpusConfig, load_contexts};
use crate::data::facts::FactsDataset;
use crate::data::packing::{PackedSequences, pack_plain, pack_with_tree};
use crate::data::retriever::TfIdfRetriever;
use crate::data::tokenizer::{DEFAULT_SPECIAL_TOKENS, Tokenizer, train_bpe};
use crate::data::{Context, DataError};
use memlayer_core::hier::cluster::{ClusterConfig, ClusterTree};
use memlayer_core::model::HierRouting;
use memlayer_core::rng::Rng;

pub use memlayer_model_dir::routing::Routing;

/// Prepared data of a run.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The facts world, when the data is generated facts.
    pub facts: Option<FactsDataset>,
    /// Training contexts.
    pub train_contexts: Vec<Context>,
    /// Held-out contexts (perplexity).
    pub heldout_contexts: Vec<Context>,
    /// The tokenizer trained on the training contexts.
    pub tokenizer: Tokenizer,
    /// Retriever + tree (hierarchical memory only).
    pub routing: Option<Routing>,
    /// Training sequences (clustered by path for the hierarchical memory).
    pub train: PackedSequences,
    /// Held-out sequences (with their paths for the hierarchical memory).
    pub heldout: PackedSequences,
}

/// Builds the data of `cfg`.
pub fn prepare(cfg: &TrainConfig) -> Result<Prepared, DataError> {
    cfg.validate().map_err(DataError::Config)?;
    let (facts, mut contexts) = match &cfg.data {
        DataSpec::Facts(fc) => {
            let f = FactsDataset::generate(fc)?;
            let c = f.contexts.clone();
            (Some(f), c)
        }
        DataSpec::Text { path, target_chars } => (
            None,
            load_contexts(
                path,
                &CorpusConfig {
                    target_chars: *target_chars,
                },
            )?,
        ),
    };
    // held-out split: a seeded sample of contexts
    let mut order: Vec<usize> = (0..contexts.len()).collect();
    Rng::new(cfg.data_seed() ^ 0x4845_4c44).shuffle(&mut order);
    let n_held = ((contexts.len() as f64) * cfg.heldout_fraction).round() as usize;
    let mut held_ids: Vec<usize> = order[..n_held.min(order.len())].to_vec();
    held_ids.sort_unstable();
    let mut heldout_contexts = Vec::with_capacity(held_ids.len());
    for &i in held_ids.iter().rev() {
        heldout_contexts.push(contexts.remove(i));
    }
    heldout_contexts.reverse();
    let train_contexts = contexts;
    if train_contexts.is_empty() {
        return Err(DataError::Config("no training contexts".into()));
    }
    let texts: Vec<&str> = train_contexts.iter().map(|c| c.text.as_str()).collect();
    let tokenizer = train_bpe(&texts, cfg.model.vocab_size, &DEFAULT_SPECIAL_TOKENS)?;
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        return Err(DataError::Config(format!(
            "tokenizer has {} tokens, model vocab_size is {}",
            tokenizer.vocab_size(),
            cfg.model.vocab_size
        )));
    }
    let eos = tokenizer.eos_id();
    let train_ids = tokenizer.encode_batch(&texts)?;
    let held_texts: Vec<&str> = heldout_contexts.iter().map(|c| c.text.as_str()).collect();
    let held_ids = tokenizer.encode_batch(&held_texts)?;
    let (routing, train, heldout) = match &cfg.model.hier {
        Some(h) => {
            let retriever = TfIdfRetriever::fit(&texts, cfg.retriever_dim)?;
            let emb = retriever.embed_all(&texts);
            let tree = ClusterTree::build(
                &emb,
                texts.len(),
                retriever.dim(),
                &ClusterConfig::new(h.levels, h.branching, cfg.data_seed()),
            )?;
            let train = pack_with_tree(&train_ids, &tree, cfg.seq_len, eos)?;
            let index = match h.routing {
                HierRouting::Descent => None,
                HierRouting::NearestContext => {
                    Some(ContextIndex::build(&texts, tree.train_paths(), h.levels)?)
                }
            };
            let routing = Routing {
                retriever,
                tree,
                index,
            };
            let mut paths = Vec::with_capacity(held_texts.len() * h.levels);
            for t in &held_texts {
                paths.extend(routing.path(t)?);
            }
            let heldout = crate::data::packing::pack_clustered(
                &held_ids,
                &paths,
                h.levels,
                cfg.seq_len,
                eos,
            )?;
            (Some(routing), train, heldout)
        }
        None => (
            None,
            pack_plain(&train_ids, cfg.seq_len, eos)?,
            pack_plain(&held_ids, cfg.seq_len, eos)?,
        ),
    };
    if train.len() < cfg.batch_size {
        return Err(DataError::Config(format!(
            "{} training sequences of {} tokens, fewer than batch_size {}",
            train.len(),
            cfg.seq_len,
            cfg.batch_size
        )));
    }
    Ok(Prepared {
        facts,
        train_contexts,
        heldout_contexts,
        tokenizer,
        routing,
        train,
        heldout,
    })
}
