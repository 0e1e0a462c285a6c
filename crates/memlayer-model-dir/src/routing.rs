//! Routing a context to its memory blocks (hierarchical memory): the
//! retriever, the cluster tree over the training contexts and, for
//! [`HierRouting::NearestContext`](memlayer_core::model::HierRouting::NearestContext), the index of the training contexts.

use crate::context_index::ContextIndex;
use crate::error::{ModelDirError, Result};
use crate::manifest::Checksums;
use crate::retriever::TfIdfRetriever;
use memlayer_core::hier::cluster::ClusterTree;
use memlayer_core::model::{HierRouting, ModelConfig};
use std::path::Path;

/// The retriever's file in a model directory.
pub const RETRIEVER_FILE: &str = "retriever.json";
/// The cluster tree's file.
pub const TREE_FILE: &str = "tree.safetensors";
/// The nearest-training-context index's file
/// ([`HierRouting::NearestContext`] models only).
pub const CONTEXT_INDEX_FILE: &str = "context_index.json";

/// The routing files of a model directory, as read or fetched (bytes not
/// yet verified).
#[derive(Clone, Copy, Debug)]
pub struct RoutingFiles<'a> {
    /// `retriever.json`.
    pub retriever: &'a [u8],
    /// `tree.safetensors`.
    pub tree: &'a [u8],
    /// `context_index.json` (a [`HierRouting::NearestContext`] model's).
    pub context_index: Option<&'a [u8]>,
}

impl RoutingFiles<'_> {
    /// The files `cfg` needs: none for a model without a hierarchical
    /// memory, the context index only for nearest-context routing.
    pub fn needed(cfg: &ModelConfig) -> &'static [&'static str] {
        match cfg.hier.as_ref().map(|h| h.routing) {
            None => &[],
            Some(HierRouting::Descent) => &[RETRIEVER_FILE, TREE_FILE],
            Some(HierRouting::NearestContext) => &[RETRIEVER_FILE, TREE_FILE, CONTEXT_INDEX_FILE],
        }
    }
}

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
    /// The routing of the model of `cfg` (which must have a hierarchical
    /// memory) from its files in `dir` (a path or URL, for messages): each
    /// checked against `sums` before it is parsed, then the tree against the
    /// config (levels, branching) and the retriever (embedding width), and
    /// the context index against the tree (one path per training context).
    /// The same checks natively and in the browser; errors name the file.
    pub fn from_files(
        cfg: &ModelConfig,
        dir: &Path,
        files: &RoutingFiles<'_>,
        sums: &Checksums,
    ) -> Result<Self> {
        let hier = cfg.hier.as_ref().ok_or_else(|| {
            ModelDirError::Config("the model has no hierarchical memory to route".into())
        })?;
        let bad = |name: &str, e: &dyn std::fmt::Display| {
            ModelDirError::parse(&dir.join(name), e.to_string())
        };
        let verified = |name: &str, bytes: &[u8]| -> Result<()> {
            sums.verify_file(name, bytes).map_err(|e| bad(name, &e))
        };
        let text = |name: &str, bytes: &'_ [u8]| -> Result<String> {
            verified(name, bytes)?;
            String::from_utf8(bytes.to_vec()).map_err(|e| bad(name, &format!("not UTF-8: {e}")))
        };
        let retriever = TfIdfRetriever::from_json(&text(RETRIEVER_FILE, files.retriever)?)
            .map_err(|e| bad(RETRIEVER_FILE, &e))?;
        verified(TREE_FILE, files.tree)?;
        let tree = ClusterTree::from_safetensors(files.tree).map_err(|e| bad(TREE_FILE, &e))?;
        if tree.levels() != hier.levels || tree.branching() != hier.branching {
            return Err(bad(
                TREE_FILE,
                &format!(
                    "a tree of {} levels × branching {}; the config's memory has {} × {}",
                    tree.levels(),
                    tree.branching(),
                    hier.levels,
                    hier.branching
                ),
            ));
        }
        if tree.dim() != retriever.dim() {
            return Err(bad(
                TREE_FILE,
                &format!(
                    "centroids of width {}; the retriever embeds into {}",
                    tree.dim(),
                    retriever.dim()
                ),
            ));
        }
        let index = match hier.routing {
            HierRouting::Descent => None,
            HierRouting::NearestContext => {
                let bytes = files.context_index.ok_or_else(|| {
                    bad(
                        CONTEXT_INDEX_FILE,
                        &"missing: the model routes by nearest context",
                    )
                })?;
                let index = ContextIndex::from_json(&text(CONTEXT_INDEX_FILE, bytes)?)
                    .map_err(|e| bad(CONTEXT_INDEX_FILE, &e))?;
                if index.len() != tree.num_points() {
                    return Err(bad(
                        CONTEXT_INDEX_FILE,
                        &format!(
                            "indexes {} contexts, the tree was built over {}",
                            index.len(),
                            tree.num_points()
                        ),
                    ));
                }
                Some(index)
            }
        };
        Ok(Self {
            retriever,
            tree,
            index,
        })
    }

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
