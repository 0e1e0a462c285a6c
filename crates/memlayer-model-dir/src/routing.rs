//! Routing a context to its memory blocks (hierarchical memory): the
//! retriever, the cluster tree over the training contexts and, for
//! [`HierRouting::NearestContext`](memlayer_core::model::HierRouting::NearestContext), the index of the training contexts.

use crate::context_index::ContextIndex;
use crate::error::{ModelDirError, Result};
use crate::retriever::TfIdfRetriever;
use memlayer_core::hier::cluster::ClusterTree;
use memlayer_core::model::ModelConfig;

/// Routing of contexts to memory blocks: the retriever and the tree built
/// over the training contexts' embeddings, and for
/// [`HierRouting::NearestContext`](memlayer_core::model::HierRouting::NearestContext) the index of the training contexts.
#[derive(Clone, Debug)]
pub struct Routing {
    /// Embeds a context.
    pub retriever: TfIdfRetriever,
    /// Cluster tree of the training contexts.
    pub tree: ClusterTree,
    /// Nearest-training-context index (`None`: greedy descent).
    pub index: Option<ContextIndex>,
}

impl Routing {
    /// Tree path (node id per level) of `text`: the nearest training
    /// context's path when there is an index and `text` shares a term with
    /// it, else greedy descent.
    pub fn path(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(p) = self.index.as_ref().and_then(|i| i.path(text)) {
            return Ok(p);
        }
        Ok(self.tree.path(&self.retriever.embed(text))?)
    }
}

/// Block rows of the context `text` (one tree node per level) for a model
/// with a hierarchical memory; `None` for a model without one.
pub fn route(
    cfg: &ModelConfig,
    routing: Option<&Routing>,
    text: &str,
) -> Result<Option<Vec<usize>>> {
    match (&cfg.hier, routing) {
        (Some(_), Some(r)) => Ok(Some(
            r.path(text)?.into_iter().map(|x| x as usize).collect(),
        )),
        (Some(_), None) => Err(ModelDirError::Other(
            "the model has a hierarchical memory but no retriever/tree".into(),
        )),
        _ => Ok(None),
    }
}
