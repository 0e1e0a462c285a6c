//! Cluster tree by hierarchical balanced k-means (DESIGN §2).
//!
//! # Construction ([`ClusterTree::build`])
//! 1. Every embedding row is L2-normalised (norm accumulated in f64; a zero
//!    row stays zero). All distances are squared L2 between normalised rows,
//!    computed as sequential f32 sums.
//! 2. Level 1 clusters all `n` points into `b` clusters; every level-`l` node
//!    is then split into `b` children at level `l + 1`, with ids `p * b + c`
//!    (see [`super::addr`]). Nodes are processed in id order, and each node
//!    draws from its own [`Rng`] seeded by `(seed, level, node)`, so the tree
//!    does not depend on processing order.
//! 3. Splitting the `m` points of one node into `k = b` clusters:
//!    - `m == 0`: every child's centroid is a copy of the node's centroid.
//!    - `0 < m <= k`: child `c < m` gets the `c`-th point of the node (points
//!      in ascending index order) and that point as centroid; children
//!      `c >= m` are empty and get a copy of the node's centroid.
//!    - `m > k`: k-means++ seeding, then Lloyd iterations with **balanced
//!      assignment**, until the assignment stops changing or `max_iters`
//!      assignments were made. Each iteration assigns, then recomputes every
//!      centroid as the mean (f64 accumulation in ascending point order) of
//!      its points, so the stored centroids are always the means of the
//!      stored clusters.
//!
//! # Balanced assignment
//! Cluster sizes are constrained to `[floor(m/k), ceil(m/k)]` (so none is
//! empty when `m >= k`). Points are visited in decreasing order of their
//! *margin* (squared distance to the second-nearest centroid minus the
//! nearest; ties by lower point index): the confident points choose first.
//! Each point goes to its nearest centroid (ties to the lower cluster id)
//! among the clusters still below `ceil(m/k)`, unless the points left are
//! exactly enough to bring every cluster up to `floor(m/k)`, in which case it
//! goes to its nearest cluster still below `floor(m/k)`. This greedy always
//! succeeds and is deterministic.
//!
//! # k-means++ seeding
//! The first centre is point `rng.below(m)`; each next centre is drawn with
//! probability proportional to the squared distance to the nearest chosen
//! centre (f64 cumulative sum, first index whose running sum exceeds
//! `rng.next_f64() * total`). If all remaining distances are zero (duplicate
//! points) the next centre is `rng.below(m)`.
//!
//! # Descent ([`ClusterTree::path`])
//! Normalise the query like the training rows, then at each level take the
//! nearest centroid among the `b` children of the current node (the `b`
//! level-1 nodes at the start), ties to the lower node id.
//!
//! The stored training paths ([`ClusterTree::train_path`]) are the balanced
//! assignments made during construction; [`ClusterTree::path`] is the plain
//! nearest-centroid descent. They agree for points that are clearly inside
//! their cluster, but a point the balance constraint moved to a farther
//! cluster descends to its nearest one.

use super::addr::{BlockId, BlockLayout};
use crate::error::{OracleError, check_len};
use crate::rng::Rng;

/// Configuration of [`ClusterTree::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Number of levels `L` (>= 1).
    pub levels: usize,
    /// Branching factor `b` (>= 1).
    pub branching: usize,
    /// Maximum number of Lloyd assignments per node (>= 1).
    pub max_iters: usize,
    /// Seed of every random choice (k-means++ seeding).
    pub seed: u64,
}

impl ClusterConfig {
    /// `levels` x `branching` with `max_iters = 50`.
    pub fn new(levels: usize, branching: usize, seed: u64) -> Self {
        Self {
            levels,
            branching,
            max_iters: 50,
            seed,
        }
    }

    /// The paper's tree: 4 levels x branching 16 (16/256/4096/65536 nodes).
    pub fn paper(seed: u64) -> Self {
        Self::new(4, 16, seed)
    }
}

/// A cluster tree: centroids per level and the path of every training point.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTree {
    layout: BlockLayout,
    dim: usize,
    n: usize,
    /// `centroids[l - 1]`: (b^l, e).
    centroids: Vec<Vec<f32>>,
    /// `sizes[l - 1]`: (b^l) number of training points in each node.
    sizes: Vec<Vec<u32>>,
    /// (n, L): node id per level of every training point.
    paths: Vec<u32>,
}

/// L2-normalises `row` into `out`: norm in f64, `x / norm` rounded to f32;
/// a zero row stays zero.
fn normalize_into(row: &[f32], out: &mut [f32]) {
    let norm = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    for (o, &v) in out.iter_mut().zip(row) {
        *o = if norm > 0.0 {
            (v as f64 / norm) as f32
        } else {
            0.0
        };
    }
}

/// Squared L2 distance, sequential f32.
#[inline]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0.0f32;
    for (&x, &y) in a.iter().zip(b) {
        let d = x - y;
        acc += d * d;
    }
    acc
}

/// Position (in `0..k`) of the nearest of the `k` rows of `cents` (k, e) to
/// `p`, ties to the lower position.
fn nearest(p: &[f32], cents: &[f32], e: usize) -> usize {
    let mut best = 0;
    let mut best_d = f32::INFINITY;
    for (c, row) in cents.chunks_exact(e).enumerate() {
        let d = sq_dist(p, row);
        if d < best_d {
            best_d = d;
            best = c;
        }
    }
    best
}

fn check_finite(what: &str, data: &[f32]) -> Result<(), OracleError> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(OracleError::InvalidConfig(format!(
            "{what} has a non-finite value at element {i}"
        ))),
    }
}

/// Seed of the generator of node `node` at (parent) level `level`.
fn node_seed(seed: u64, level: usize, node: usize) -> u64 {
    seed ^ (level as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (node as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

impl ClusterTree {
    /// Builds the tree over `n` embeddings `emb` (n, e) (see the module docs).
    ///
    /// Errors on a bad config (`levels`, `branching` or `max_iters` of 0, a
    /// tree too large to address), `e == 0`, a wrong `emb` length or
    /// non-finite values. `n == 0` gives a tree whose centroids are all zero.
    pub fn build(
        emb: &[f32],
        n: usize,
        e: usize,
        cfg: &ClusterConfig,
    ) -> Result<Self, OracleError> {
        let layout = BlockLayout::new(cfg.levels, cfg.branching)?;
        if cfg.max_iters == 0 {
            return Err(OracleError::InvalidConfig("max_iters must be >= 1".into()));
        }
        if e == 0 {
            return Err(OracleError::InvalidConfig(
                "embedding dim must be positive".into(),
            ));
        }
        let too_big = || OracleError::InvalidConfig("cluster tree is too large".into());
        let floats = layout.num_blocks().checked_mul(e).ok_or_else(too_big)?;
        if floats > isize::MAX as usize / 4 || u32::try_from(n).is_err() {
            return Err(too_big());
        }
        check_len("embeddings", emb, &[n, e])?;
        check_finite("embeddings", emb)?;

        let mut x = vec![0.0f32; n * e];
        for (row, out) in emb.chunks_exact(e).zip(x.chunks_exact_mut(e)) {
            normalize_into(row, out);
        }
        let (levels, b) = (layout.levels(), layout.branching());
        let mut centroids = Vec::with_capacity(levels);
        let mut sizes = Vec::with_capacity(levels);
        let mut paths = vec![0u32; n * levels];

        // Level 0: the root holds every point; its centroid is their mean.
        let all: Vec<u32> = (0..n as u32).collect();
        let mut parent_cents = mean_of(&x, e, &all);
        let mut members = vec![all];
        for level in 0..levels {
            let mut cents = Vec::with_capacity(members.len() * b * e);
            let mut next = Vec::with_capacity(members.len() * b);
            for (p, pts) in members.iter().enumerate() {
                let mut rng = Rng::new(node_seed(cfg.seed, level, p));
                let parent = &parent_cents[p * e..(p + 1) * e];
                let (c, labels) = split_node(&x, e, pts, parent, b, cfg.max_iters, &mut rng);
                cents.extend_from_slice(&c);
                let mut children = vec![Vec::new(); b];
                for (&i, &l) in pts.iter().zip(&labels) {
                    children[l as usize].push(i);
                    paths[i as usize * levels + level] = (p * b + l as usize) as u32;
                }
                next.extend(children);
            }
            sizes.push(next.iter().map(|c: &Vec<u32>| c.len() as u32).collect());
            centroids.push(cents);
            parent_cents = centroids[level].clone();
            members = next;
        }
        Ok(Self {
            layout,
            dim: e,
            n,
            centroids,
            sizes,
            paths,
        })
    }

    /// Block addressing of this tree's shape.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// Number of levels `L`.
    pub fn levels(&self) -> usize {
        self.layout.levels()
    }

    /// Branching factor `b`.
    pub fn branching(&self) -> usize {
        self.layout.branching()
    }

    /// Embedding dim `e`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of training points.
    pub fn num_points(&self) -> usize {
        self.n
    }

    /// Centroids of `level` (`1 ..= L`): (b^level, e).
    pub fn centroids(&self, level: usize) -> Result<&[f32], OracleError> {
        self.layout.nodes_at(level)?;
        Ok(&self.centroids[level - 1])
    }

    /// Centroid of one node: (e).
    pub fn centroid(&self, id: BlockId) -> Result<&[f32], OracleError> {
        self.layout.index(id)?;
        let e = self.dim;
        let at = id.node as usize * e;
        Ok(&self.centroids[id.level as usize - 1][at..at + e])
    }

    /// Number of training points in each node of `level`: (b^level).
    pub fn cluster_sizes(&self, level: usize) -> Result<&[u32], OracleError> {
        self.layout.nodes_at(level)?;
        Ok(&self.sizes[level - 1])
    }

    /// Paths of all training points: (n, L), node id per level.
    pub fn train_paths(&self) -> &[u32] {
        &self.paths
    }

    /// Path of training point `i` as assigned during construction: (L).
    pub fn train_path(&self, i: usize) -> Result<&[u32], OracleError> {
        if i >= self.n {
            return Err(OracleError::IndexOutOfRange {
                index: i as u64,
                rows: self.n,
            });
        }
        let l = self.levels();
        Ok(&self.paths[i * l..(i + 1) * l])
    }

    /// Greedy descent of one embedding (e): node id per level (L), see the
    /// module docs. Errors on a wrong length or non-finite values.
    pub fn path(&self, embedding: &[f32]) -> Result<Vec<u32>, OracleError> {
        check_len("query embedding", embedding, &[self.dim])?;
        check_finite("query embedding", embedding)?;
        let e = self.dim;
        let b = self.branching();
        let mut q = vec![0.0f32; e];
        normalize_into(embedding, &mut q);
        let mut out = Vec::with_capacity(self.levels());
        let mut parent = 0usize;
        for cents in &self.centroids {
            let first = parent * b;
            let children = &cents[first * e..(first + b) * e];
            parent = first + nearest(&q, children, e);
            out.push(parent as u32);
        }
        Ok(out)
    }

    /// [`Self::path`] of each of `n` embeddings (n, e) → (n, L).
    pub fn paths(&self, emb: &[f32], n: usize) -> Result<Vec<u32>, OracleError> {
        check_len("query embeddings", emb, &[n, self.dim])?;
        let mut out = Vec::with_capacity(n * self.levels());
        for row in emb.chunks_exact(self.dim) {
            out.extend(self.path(row)?);
        }
        Ok(out)
    }
}

/// Mean of rows `pts` of `x` (·, e), f64 accumulation in the given order;
/// zeros if `pts` is empty.
fn mean_of(x: &[f32], e: usize, pts: &[u32]) -> Vec<f32> {
    let mut acc = vec![0.0f64; e];
    for &i in pts {
        let row = &x[i as usize * e..(i as usize + 1) * e];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    let m = pts.len().max(1) as f64;
    acc.iter().map(|&a| (a / m) as f32).collect()
}

/// Splits the points `pts` (ascending indices into `x` (·, e)) into `k`
/// clusters. Returns the centroids (k, e) and each point's cluster (m).
fn split_node(
    x: &[f32],
    e: usize,
    pts: &[u32],
    parent: &[f32],
    k: usize,
    max_iters: usize,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<u32>) {
    let m = pts.len();
    let row = |i: u32| &x[i as usize * e..(i as usize + 1) * e];
    if m <= k {
        let mut cents = Vec::with_capacity(k * e);
        for &i in pts {
            cents.extend_from_slice(row(i));
        }
        for _ in m..k {
            cents.extend_from_slice(parent);
        }
        return (cents, (0..m as u32).collect());
    }
    let mut cents = kmeans_pp(x, e, pts, k, rng);
    let mut labels: Vec<u32> = Vec::new();
    for _ in 0..max_iters {
        let dist = distances(x, e, pts, &cents, k);
        let new = balanced_assign(&dist, m, k);
        cents = cluster_means(x, e, pts, &new, k);
        let done = new == labels;
        labels = new;
        if done {
            break;
        }
    }
    (cents, labels)
}

/// k-means++ seeding (see the module docs): k centres (k, e) from `pts`.
fn kmeans_pp(x: &[f32], e: usize, pts: &[u32], k: usize, rng: &mut Rng) -> Vec<f32> {
    let m = pts.len();
    let row = |i: u32| &x[i as usize * e..(i as usize + 1) * e];
    let mut cents = Vec::with_capacity(k * e);
    let first = pts[rng.below(m as u64) as usize];
    cents.extend_from_slice(row(first));
    let mut d2: Vec<f64> = pts
        .iter()
        .map(|&i| sq_dist(row(i), row(first)) as f64)
        .collect();
    for _ in 1..k {
        let total: f64 = d2.iter().sum();
        let pick = if total > 0.0 {
            let target = rng.next_f64() * total;
            let mut acc = 0.0f64;
            let mut pick = d2.iter().rposition(|&v| v > 0.0).unwrap_or(0);
            for (j, &v) in d2.iter().enumerate() {
                acc += v;
                if acc > target {
                    pick = j;
                    break;
                }
            }
            pick
        } else {
            rng.below(m as u64) as usize
        };
        let c = row(pts[pick]);
        cents.extend_from_slice(c);
        for (dj, &i) in d2.iter_mut().zip(pts) {
            *dj = dj.min(sq_dist(row(i), c) as f64);
        }
    }
    cents
}

/// Squared distances of each point to each centroid: (m, k).
fn distances(x: &[f32], e: usize, pts: &[u32], cents: &[f32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(pts.len() * k);
    for &i in pts {
        let p = &x[i as usize * e..(i as usize + 1) * e];
        out.extend(cents.chunks_exact(e).map(|c| sq_dist(p, c)));
    }
    out
}

/// Nearest position among `0..k` of a distance row satisfying `allowed`,
/// ties to the lower position.
fn nearest_allowed(dist: &[f32], allowed: impl Fn(usize) -> bool) -> usize {
    let mut best = usize::MAX;
    let mut best_d = f32::INFINITY;
    for (c, &d) in dist.iter().enumerate() {
        if allowed(c) && (best == usize::MAX || d < best_d) {
            best = c;
            best_d = d;
        }
    }
    best
}

/// Balanced assignment (see the module docs). dist: (m, k) → labels (m),
/// with every cluster size in `[floor(m/k), ceil(m/k)]`.
fn balanced_assign(dist: &[f32], m: usize, k: usize) -> Vec<u32> {
    let (lo, hi) = (m / k, m.div_ceil(k));
    let margin: Vec<f32> = dist
        .chunks_exact(k)
        .map(|row| {
            let (mut d1, mut d2) = (f32::INFINITY, f32::INFINITY);
            for &d in row {
                if d < d1 {
                    d2 = d1;
                    d1 = d;
                } else if d < d2 {
                    d2 = d;
                }
            }
            if k > 1 { d2 - d1 } else { 0.0 }
        })
        .collect();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| margin[b].total_cmp(&margin[a]).then(a.cmp(&b)));

    let mut sizes = vec![0usize; k];
    let mut labels = vec![0u32; m];
    let mut deficit = k * lo; // Σ_c max(0, lo - size_c)
    let mut remaining = m;
    for i in order {
        let row = &dist[i * k..(i + 1) * k];
        let forced = remaining == deficit;
        let c = if forced {
            nearest_allowed(row, |c| sizes[c] < lo)
        } else {
            nearest_allowed(row, |c| sizes[c] < hi)
        };
        if sizes[c] < lo {
            deficit -= 1;
        }
        sizes[c] += 1;
        remaining -= 1;
        labels[i] = c as u32;
    }
    labels
}

/// Centroids (k, e) as the means of the clusters given by `labels`.
fn cluster_means(x: &[f32], e: usize, pts: &[u32], labels: &[u32], k: usize) -> Vec<f32> {
    let mut members = vec![Vec::new(); k];
    for (&i, &l) in pts.iter().zip(labels) {
        members[l as usize].push(i);
    }
    members.iter().flat_map(|mem| mean_of(x, e, mem)).collect()
}

/// Format name stored in a saved tree's safetensors metadata.
pub const TREE_FORMAT: &str = "memlayer-cluster-tree";

/// Little-endian 4-byte words (f32 or u32) of a tensor's bytes.
fn le_words<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    bytes
        .chunks_exact(4)
        .map(|c| bytemuck::cast(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

fn bad_tree(msg: String) -> OracleError {
    OracleError::InvalidConfig(format!("cluster tree file: {msg}"))
}

impl ClusterTree {
    /// Serialises the tree as safetensors: `centroids.{l}` f32 (b^l, e) and
    /// `sizes.{l}` u32 (b^l) for l = 1..=L, `paths` u32 (n, L); metadata
    /// `format`, `version` = 1, `levels`, `branching`, `dim`, `points`.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, OracleError> {
        use safetensors::tensor::{Dtype, TensorView};
        let err = |e: safetensors::SafeTensorError| bad_tree(e.to_string());
        let b = self.branching();
        let mut views = Vec::new();
        for l in 1..=self.levels() {
            let nodes = b.pow(l as u32);
            let c = &self.centroids[l - 1];
            let z = &self.sizes[l - 1];
            views.push((
                format!("centroids.{l}"),
                TensorView::new(Dtype::F32, vec![nodes, self.dim], bytemuck::cast_slice(c))
                    .map_err(err)?,
            ));
            views.push((
                format!("sizes.{l}"),
                TensorView::new(Dtype::U32, vec![nodes], bytemuck::cast_slice(z)).map_err(err)?,
            ));
        }
        views.push((
            "paths".to_string(),
            TensorView::new(
                Dtype::U32,
                vec![self.n, self.levels()],
                bytemuck::cast_slice(&self.paths),
            )
            .map_err(err)?,
        ));
        let meta = [
            ("format", TREE_FORMAT.to_string()),
            ("version", "1".to_string()),
            ("levels", self.levels().to_string()),
            ("branching", b.to_string()),
            ("dim", self.dim.to_string()),
            ("points", self.n.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(views, Some(meta)).map_err(err)
    }

    /// Reads a tree written by [`Self::to_safetensors`], checking every shape,
    /// that centroids are finite and that every stored path descends through
    /// children; errors name the tensor or field.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, OracleError> {
        use safetensors::{SafeTensors, tensor::Dtype};
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad_tree(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad_tree(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |k: &str| -> Result<usize, OracleError> {
            meta.get(k)
                .ok_or_else(|| bad_tree(format!("metadata `{k}` is missing")))?
                .parse()
                .map_err(|e| bad_tree(format!("metadata `{k}`: {e}")))
        };
        if meta.get("format").map(String::as_str) != Some(TREE_FORMAT) {
            return Err(bad_tree(format!(
                "metadata `format` is not {TREE_FORMAT:?}"
            )));
        }
        if field("version")? != 1 {
            return Err(bad_tree("unsupported version (this build reads 1)".into()));
        }
        let (levels, b, dim, n) = (
            field("levels")?,
            field("branching")?,
            field("dim")?,
            field("points")?,
        );
        let layout = BlockLayout::new(levels, b)?;
        let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>, OracleError> {
            let t = st
                .tensor(name)
                .map_err(|_| bad_tree(format!("tensor `{name}` is missing")))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(bad_tree(format!(
                    "tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().to_vec())
        };
        let (mut centroids, mut sizes) = (Vec::new(), Vec::new());
        for l in 1..=levels {
            let nodes = layout.nodes_at(l)?;
            let c: Vec<f32> = le_words(&tensor(
                &format!("centroids.{l}"),
                Dtype::F32,
                &[nodes, dim],
            )?);
            if c.iter().any(|v| !v.is_finite()) {
                return Err(bad_tree(format!("tensor `centroids.{l}` is not finite")));
            }
            centroids.push(c);
            sizes.push(le_words(&tensor(
                &format!("sizes.{l}"),
                Dtype::U32,
                &[nodes],
            )?));
        }
        let paths: Vec<u32> = le_words(&tensor("paths", Dtype::U32, &[n, levels])?);
        for (i, p) in paths.chunks_exact(levels.max(1)).enumerate() {
            layout
                .path_blocks(p)
                .map_err(|e| bad_tree(format!("tensor `paths` row {i}: {e}")))?;
        }
        Ok(Self {
            layout,
            dim,
            n,
            centroids,
            sizes,
            paths,
        })
    }
}

#[cfg(test)]
mod io_tests {
    use super::*;

    fn tree() -> ClusterTree {
        let mut rng = Rng::new(9);
        let (n, e) = (60, 5);
        let emb = rng.normal_vec(n * e, 0.0, 1.0);
        ClusterTree::build(&emb, n, e, &ClusterConfig::new(2, 3, 4)).unwrap()
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let t = tree();
        let back = ClusterTree::from_safetensors(&t.to_safetensors().unwrap()).unwrap();
        assert_eq!(back.levels(), t.levels());
        assert_eq!(back.branching(), t.branching());
        assert_eq!(back.train_paths(), t.train_paths());
        for l in 1..=t.levels() {
            let bits = |c: &[f32]| c.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(back.centroids(l).unwrap()),
                bits(t.centroids(l).unwrap())
            );
            assert_eq!(back.cluster_sizes(l).unwrap(), t.cluster_sizes(l).unwrap());
        }
        let q = [0.3, -1.0, 0.2, 0.0, 2.0];
        assert_eq!(back.path(&q).unwrap(), t.path(&q).unwrap());
    }

    /// Re-serialises `t` with one tensor replaced (or dropped when `data` is None).
    fn tampered(
        t: &ClusterTree,
        name: &str,
        data: Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Vec<u8> {
        let bytes = t.to_safetensors().unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .filter(|(k, _)| k != name)
            .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        if let Some((d, shape, b)) = data {
            owned.push((name.to_string(), d, shape, b));
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(k, d, s, b)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, header.metadata().clone()).unwrap()
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        let t = tree();
        let err = |b: &[u8]| ClusterTree::from_safetensors(b).unwrap_err().to_string();
        assert!(err(b"not a tree").contains("cluster tree file"));
        assert!(err(&tampered(&t, "centroids.2", None)).contains("`centroids.2` is missing"));
        let wrong = (safetensors::Dtype::F32, vec![2, 5], vec![0u8; 40]);
        assert!(err(&tampered(&t, "centroids.1", Some(wrong))).contains("`centroids.1`"));
        let mut nan = t.centroids(1).unwrap().to_vec();
        nan[0] = f32::NAN;
        let nan = (
            safetensors::Dtype::F32,
            vec![3, 5],
            bytemuck::cast_slice(&nan).to_vec(),
        );
        assert!(err(&tampered(&t, "centroids.1", Some(nan))).contains("not finite"));
        // a path whose level-2 node is not a child of its level-1 node
        let mut paths = t.train_paths().to_vec();
        paths[0] = 0;
        paths[1] = 8;
        let paths = (
            safetensors::Dtype::U32,
            vec![60, 2],
            bytemuck::cast_slice(&paths).to_vec(),
        );
        assert!(err(&tampered(&t, "paths", Some(paths))).contains("`paths` row 0"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `b` well-separated blobs of `per` points each in dim `e`, interleaved
    /// in a shuffled order. Returns (embeddings (n, e), blob of each point).
    fn blobs(b: usize, per: usize, e: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        // centres: distinct signed basis directions (orthogonal or opposite)
        assert!(b <= 2 * e);
        let mut order: Vec<usize> = (0..b * per).collect();
        rng.shuffle(&mut order);
        let mut x = vec![0.0f32; b * per * e];
        let mut blob = vec![0usize; b * per];
        for (pos, &k) in order.iter().enumerate() {
            let c = k / per;
            blob[pos] = c;
            let row = &mut x[pos * e..(pos + 1) * e];
            for v in row.iter_mut() {
                *v = spread * rng.normal();
            }
            row[c % e] += if c < e { 1.0 } else { -1.0 };
        }
        (x, blob)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn same_seed_gives_identical_tree_and_other_seed_differs() {
        let mut rng = Rng::new(11);
        let (n, e) = (300, 6);
        let x = rng.normal_vec(n * e, 0.0, 1.0);
        let cfg = ClusterConfig::new(3, 3, 42);
        let a = ClusterTree::build(&x, n, e, &cfg).unwrap();
        let b = ClusterTree::build(&x, n, e, &cfg).unwrap();
        for l in 1..=3 {
            assert_eq!(bits(a.centroids(l).unwrap()), bits(b.centroids(l).unwrap()));
        }
        assert_eq!(a.train_paths(), b.train_paths());
        assert_eq!(a, b);
        let c = ClusterTree::build(&x, n, e, &ClusterConfig::new(3, 3, 43)).unwrap();
        assert_ne!(a, c, "a different seed should change this tree");
    }

    /// Every node's children hold between floor(m/b) and ceil(m/b) of its m points.
    fn assert_balanced(t: &ClusterTree) {
        let b = t.branching();
        let mut parent_sizes = vec![t.num_points() as u32];
        for l in 1..=t.levels() {
            let sizes = t.cluster_sizes(l).unwrap();
            assert_eq!(sizes.len(), b.pow(l as u32));
            for (p, &m) in parent_sizes.iter().enumerate() {
                let m = m as usize;
                let kids = &sizes[p * b..(p + 1) * b];
                assert_eq!(kids.iter().map(|&s| s as usize).sum::<usize>(), m);
                for &s in kids {
                    assert!(
                        s as usize <= m.div_ceil(b),
                        "level {l} parent {p}: {kids:?}"
                    );
                    assert!(s as usize >= m / b, "level {l} parent {p}: {kids:?}");
                }
            }
            parent_sizes = sizes.to_vec();
        }
    }

    #[test]
    fn clusters_are_balanced() {
        // unbalanced data: one dense blob plus scattered points
        let mut rng = Rng::new(12);
        let (n, e) = (517, 5);
        let mut x = rng.normal_vec(n * e, 0.0, 1.0);
        for v in x.iter_mut().take(300 * e).step_by(e) {
            *v += 10.0;
        }
        for (levels, b) in [(1, 4), (2, 5), (3, 3), (2, 16)] {
            let t = ClusterTree::build(&x, n, e, &ClusterConfig::new(levels, b, 1)).unwrap();
            assert_balanced(&t);
        }
    }

    #[test]
    fn level_one_recovers_well_separated_blobs() {
        for (b, e, seed) in [(4, 8, 1), (8, 4, 2), (16, 12, 3)] {
            let per = 40;
            let (x, blob) = blobs(b, per, e, 0.05, seed);
            let n = b * per;
            let t = ClusterTree::build(&x, n, e, &ClusterConfig::new(2, b, seed)).unwrap();
            // same blob <=> same level-1 cluster
            let mut cluster_of_blob = vec![None; b];
            for i in 0..n {
                let c = t.train_path(i).unwrap()[0];
                match cluster_of_blob[blob[i]] {
                    None => cluster_of_blob[blob[i]] = Some(c),
                    Some(c0) => assert_eq!(c0, c, "blob {} split", blob[i]),
                }
            }
            let mut used: Vec<u32> = cluster_of_blob.iter().map(|c| c.unwrap()).collect();
            used.sort();
            used.dedup();
            assert_eq!(used.len(), b, "two blobs merged");
            assert!(
                t.cluster_sizes(1)
                    .unwrap()
                    .iter()
                    .all(|&s| s as usize == per)
            );
            assert_balanced(&t);
            // descent of every training point lands in its level-1 cluster
            for i in 0..n {
                let p = t.path(&x[i * e..(i + 1) * e]).unwrap();
                assert_eq!(p[0], t.train_path(i).unwrap()[0], "point {i}");
            }
        }
    }

    #[test]
    fn paths_descend_through_children() {
        let mut rng = Rng::new(13);
        let (n, e) = (400, 7);
        let x = rng.normal_vec(n * e, 0.0, 1.0);
        let t = ClusterTree::build(&x, n, e, &ClusterConfig::new(3, 4, 5)).unwrap();
        let layout = t.layout();
        let queries = rng.normal_vec(50 * e, 0.0, 1.0);
        let qp = t.paths(&queries, 50).unwrap();
        for path in qp.chunks_exact(3).chain(t.train_paths().chunks_exact(3)) {
            assert!(path[0] < 4);
            assert_eq!(path[1] / 4, path[0]);
            assert_eq!(path[2] / 4, path[1]);
            layout.path_blocks(path).unwrap();
        }
        // descent is deterministic and matches a brute-force re-implementation
        for (qi, q) in queries.chunks_exact(e).enumerate() {
            let mut qn = vec![0.0; e];
            normalize_into(q, &mut qn);
            let mut parent = 0usize;
            for l in 1..=3 {
                let cents = t.centroids(l).unwrap();
                let mut best = (f32::INFINITY, 0usize);
                for c in 0..4 {
                    let node = parent * 4 + c;
                    let d = sq_dist(&qn, &cents[node * e..(node + 1) * e]);
                    if d < best.0 {
                        best = (d, node);
                    }
                }
                parent = best.1;
                assert_eq!(qp[qi * 3 + l - 1] as usize, parent);
            }
        }
        // centroids are the means of their clusters' normalised points
        let mut xn = vec![0.0; n * e];
        for (r, o) in x.chunks_exact(e).zip(xn.chunks_exact_mut(e)) {
            normalize_into(r, o);
        }
        let level1: Vec<u32> = (0..n).map(|i| t.train_path(i).unwrap()[0]).collect();
        for c in 0..4u32 {
            let pts: Vec<u32> = (0..n as u32).filter(|&i| level1[i as usize] == c).collect();
            let id = BlockId { level: 1, node: c };
            assert_eq!(bits(t.centroid(id).unwrap()), bits(&mean_of(&xn, e, &pts)));
        }
    }

    #[test]
    fn scale_invariance_from_normalisation() {
        let mut rng = Rng::new(14);
        let (n, e) = (120, 5);
        let x = rng.normal_vec(n * e, 0.0, 1.0);
        let x4: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
        let cfg = ClusterConfig::new(2, 3, 9);
        let a = ClusterTree::build(&x, n, e, &cfg).unwrap();
        let b = ClusterTree::build(&x4, n, e, &cfg).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn fewer_points_than_branching() {
        let (n, e, b) = (3, 4, 5);
        let x = vec![
            1.0, 0.0, 0.0, 0.0, //
            0.0, 2.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, -3.0,
        ];
        let t = ClusterTree::build(&x, n, e, &ClusterConfig::new(2, b, 0)).unwrap();
        assert_eq!(t.cluster_sizes(1).unwrap(), &[1, 1, 1, 0, 0]);
        let c1 = t.centroids(1).unwrap();
        assert_eq!(&c1[4..8], &[0.0, 1.0, 0.0, 0.0]);
        let mean = [1.0 / 3.0, 1.0 / 3.0, 0.0, -1.0 / 3.0];
        assert_eq!(&c1[12..16], &mean); // empty cluster: the root centroid
        assert_eq!(&c1[16..20], &mean);
        for i in 0..n {
            let p = t.train_path(i).unwrap();
            assert_eq!(p, &[i as u32, (i * b) as u32]);
            assert_eq!(t.path(&x[i * e..(i + 1) * e]).unwrap(), p);
        }
        // children of an empty node copy its centroid
        let c2 = t.centroids(2).unwrap();
        for c in 0..b {
            let node = 3 * b + c;
            assert_eq!(&c2[node * e..(node + 1) * e], &mean);
        }
        assert_balanced(&t);
    }

    #[test]
    fn no_points() {
        let t = ClusterTree::build(&[], 0, 3, &ClusterConfig::new(2, 4, 0)).unwrap();
        assert_eq!(t.num_points(), 0);
        assert!(t.train_paths().is_empty());
        assert!(t.centroids(2).unwrap().iter().all(|&v| v == 0.0));
        assert_eq!(t.path(&[1.0, 2.0, 3.0]).unwrap(), vec![0, 0]);
        assert!(t.train_path(0).is_err());
    }

    #[test]
    fn identical_points_and_zero_vectors() {
        let (n, e) = (50, 3);
        let x: Vec<f32> = (0..n).flat_map(|_| [0.5f32, -1.0, 2.0]).collect();
        let t = ClusterTree::build(&x, n, e, &ClusterConfig::new(2, 4, 3)).unwrap();
        assert_balanced(&t);
        let mut p = [0.0f32; 3];
        normalize_into(&x[..3], &mut p);
        for l in 1..=2 {
            for c in t.centroids(l).unwrap().chunks_exact(e) {
                for (a, b) in c.iter().zip(&p) {
                    assert!((a - b).abs() < 1e-6);
                }
            }
        }
        // all-zero embeddings stay zero; mixed with non-zero rows
        let mut z = vec![0.0f32; 40 * e];
        z[..e].copy_from_slice(&[1.0, 0.0, 0.0]);
        let t = ClusterTree::build(&z, 40, e, &ClusterConfig::new(2, 3, 3)).unwrap();
        assert_balanced(&t);
        assert_eq!(t.path(&[0.0, 0.0, 0.0]).unwrap().len(), 2);
        let t = ClusterTree::build(&z[e..], 39, e, &ClusterConfig::new(1, 3, 3)).unwrap();
        assert!(t.centroids(1).unwrap().iter().all(|&v| v == 0.0));
        assert_balanced(&t);
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let x = vec![0.5f32; 12];
        let ok = ClusterConfig::new(2, 2, 0);
        assert!(ClusterTree::build(&x, 4, 3, &ok).is_ok());
        assert!(ClusterTree::build(&x, 5, 3, &ok).is_err());
        assert!(ClusterTree::build(&x, 12, 0, &ok).is_err());
        assert!(ClusterTree::build(&x, 4, 3, &ClusterConfig::new(0, 2, 0)).is_err());
        assert!(ClusterTree::build(&x, 4, 3, &ClusterConfig::new(2, 0, 0)).is_err());
        assert!(ClusterTree::build(&x, 4, 3, &ClusterConfig::new(9, 16, 0)).is_err());
        let no_iters = ClusterConfig { max_iters: 0, ..ok };
        assert!(ClusterTree::build(&x, 4, 3, &no_iters).is_err());
        let mut bad = x.clone();
        bad[5] = f32::NAN;
        assert!(ClusterTree::build(&bad, 4, 3, &ok).is_err());
        let t = ClusterTree::build(&x, 4, 3, &ok).unwrap();
        assert!(t.path(&[1.0, 2.0]).is_err());
        assert!(t.path(&[1.0, f32::INFINITY, 0.0]).is_err());
        assert!(t.paths(&[1.0; 7], 2).is_err());
        assert!(t.centroids(0).is_err());
        assert!(t.centroids(3).is_err());
        assert!(t.cluster_sizes(3).is_err());
        assert!(t.centroid(BlockId { level: 1, node: 2 }).is_err());
    }

    #[test]
    fn balanced_assign_respects_bounds_on_adversarial_distances() {
        // every point prefers cluster 0
        let (m, k) = (10, 3);
        let dist: Vec<f32> = (0..m).flat_map(|i| [0.0, 1.0 + i as f32, 2.0]).collect();
        let labels = balanced_assign(&dist, m, k);
        let mut sizes = [0; 3];
        for &l in &labels {
            sizes[l as usize] += 1;
        }
        assert!(sizes.iter().all(|&s| (3..=4).contains(&s)), "{sizes:?}");
        // the most confident points (margin 2, lower index first) got cluster 0
        assert_eq!(&labels[1..5], &[0, 0, 0, 0]);
        assert!(labels[5..].iter().chain(&labels[..1]).all(|&l| l != 0));
    }
}
