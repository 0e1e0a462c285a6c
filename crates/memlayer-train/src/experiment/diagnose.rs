//! Why a hierarchical memory can or cannot recall a rare fact: a fact is
//! written into the blocks on the tree paths of the training contexts that
//! state it, and read from the blocks on the path of the question. This
//! measures, per frequency bucket and tree level, how often the question's
//! path reaches a node that one of those contexts trained.

use crate::config::TrainConfig;
use crate::eval::sample_queries;
use crate::prepare::prepare;
use crate::trainer::TrainError;
use serde::{Deserialize, Serialize};

/// Routing agreement of one frequency bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingAgreement {
    /// Bucket name.
    pub bucket: String,
    /// Queries measured.
    pub queries: usize,
    /// Per level (1 first): fraction of questions whose path prefix down to
    /// that level equals the training path prefix of a context mentioning
    /// the question's entity.
    pub agreement: Vec<f64>,
    /// Per level: the same fraction for a question routed to a uniformly
    /// random node (the mean share of nodes the entity's contexts trained).
    pub chance: Vec<f64>,
}

/// Routing agreement of one hierarchical-memory variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VariantRouting {
    /// Variant name.
    pub variant: String,
    /// How it routes prompts.
    pub routing: memlayer_core::model::HierRouting,
    /// Rare → common.
    pub buckets: Vec<RoutingAgreement>,
}

/// Routing agreement of the evaluation queries of `cfg` (a hierarchical
/// memory config on the facts world), by bucket.
pub fn routing_agreement(cfg: &TrainConfig) -> Result<Vec<RoutingAgreement>, TrainError> {
    let p = prepare(cfg)?;
    let (Some(facts), Some(routing), Some(h)) = (&p.facts, &p.routing, &cfg.model.hier) else {
        return Err(TrainError::Other(
            "routing agreement needs the facts world and a hierarchical memory".into(),
        ));
    };
    let levels = h.levels;
    // training contexts of each entity, and their training paths
    let mut by_entity: Vec<Vec<usize>> = vec![Vec::new(); facts.entities.len()];
    for (i, c) in p.train_contexts.iter().enumerate() {
        for &e in &c.entity_ids {
            if let Some(v) = by_entity.get_mut(e as usize) {
                v.push(i);
            }
        }
    }
    let queries = sample_queries(facts, cfg.eval_per_bucket, cfg.data_seed());
    let mut out = Vec::new();
    for (b, spec) in facts.buckets.iter().enumerate() {
        let mut hits = vec![0usize; levels];
        let mut chance = vec![0.0f64; levels];
        let mut n = 0usize;
        for q in queries.iter().filter(|q| q.bucket == b) {
            let qp = routing.path(&q.prompt)?;
            let ctxs = by_entity
                .get(q.entity as usize)
                .map_or(&[][..], Vec::as_slice);
            n += 1;
            for l in 0..levels {
                let mut trained: Vec<&[u32]> = Vec::with_capacity(ctxs.len());
                for &c in ctxs {
                    trained.push(&routing.tree.train_path(c)?[..=l]);
                }
                if trained.iter().any(|t| *t == &qp[..=l]) {
                    hits[l] += 1;
                }
                trained.sort_unstable();
                trained.dedup();
                chance[l] += trained.len() as f64 / h.nodes(l + 1) as f64;
            }
        }
        let d = n.max(1) as f64;
        out.push(RoutingAgreement {
            bucket: spec.name.clone(),
            queries: n,
            agreement: hits.iter().map(|&x| x as f64 / d).collect(),
            chance: chance.iter().map(|&x| x / d).collect(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::grid::Grid;

    #[test]
    fn agreement_is_a_fraction_per_level_and_beats_nothing_trivially() {
        let g = Grid::quick().unwrap();
        let hier = g.variant("hier").unwrap();
        let cfg = g.run_config(hier, 1);
        let a = routing_agreement(&cfg).unwrap();
        assert_eq!(a.len(), 4);
        for r in &a {
            assert_eq!(r.agreement.len(), 3);
            assert!(r.queries > 0);
            for (x, c) in r.agreement.iter().zip(&r.chance) {
                assert!((0.0..=1.0).contains(x) && (0.0..=1.0).contains(c), "{r:?}");
            }
            // a deeper prefix can only match less often
            assert!(r.agreement.windows(2).all(|w| w[1] <= w[0]), "{r:?}");
        }
        // the dense config has no tree
        let dense = g.run_config(g.variant("dense-1x").unwrap(), 1);
        assert!(routing_agreement(&dense).is_err());
    }
}
