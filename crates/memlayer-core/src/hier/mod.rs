//! Hierarchical FFN memory (DESIGN §2).
//!
//! - [`ffn`]: SwiGLU FFN over `[anchor | block_1 .. block_L]`, forward and
//!   backward, and the [`FfnBlock`] page payload.
//! - [`cluster`]: the cluster tree (hierarchical balanced k-means) and the
//!   greedy descent giving a context's path.
//! - [`addr`]: block addressing, `(level, node)` ↔ flat block index.

pub mod addr;
pub mod cluster;
pub mod ffn;

pub use addr::{BlockId, BlockLayout, num_blocks};
pub use cluster::{ClusterConfig, ClusterTree};
pub use ffn::{FfnBlock, FfnGrads, ffn_backward, ffn_forward, ffn_hidden};
