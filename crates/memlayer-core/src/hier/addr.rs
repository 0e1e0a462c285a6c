//! Addressing of FFN-memory blocks in a cluster tree (DESIGN §2).
//!
//! A tree of `L` levels and branching `b` has `b^l` nodes at level `l`
//! (`1 ..= L`; the root, level 0, has no block). Node ids at level `l` are in
//! `[0, b^l)` and the children of node `p` at level `l` are `p * b + c`,
//! `c in [0, b)`, at level `l + 1`. Every node owns one block.
//!
//! Flat block index: levels are laid out one after the other, level 1 first:
//! `index(level, node) = offset(level) + node` with
//! `offset(l) = b + b^2 + .. + b^(l-1)`, and
//! `num_blocks(L, b) = b + b^2 + .. + b^L`.

use crate::error::OracleError;

/// Address of one block: a node of the cluster tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId {
    /// Tree level, `1 ..= levels`.
    pub level: u32,
    /// Node id within the level, `0 .. branching^level`.
    pub node: u32,
}

/// Shape of a cluster tree, mapping [`BlockId`] ↔ flat block index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    levels: u32,
    branching: u32,
    num_blocks: usize,
}

/// Total number of blocks of a tree: `b + b^2 + .. + b^L`.
pub fn num_blocks(levels: usize, branching: usize) -> Result<usize, OracleError> {
    Ok(BlockLayout::new(levels, branching)?.num_blocks())
}

impl BlockLayout {
    /// Validates `levels >= 1`, `branching >= 1`, node ids fitting in `u32`
    /// (`b^L <= 2^32`) and the block count fitting in `usize`.
    pub fn new(levels: usize, branching: usize) -> Result<Self, OracleError> {
        if levels == 0 || branching == 0 {
            return Err(OracleError::InvalidConfig(format!(
                "cluster tree needs levels >= 1 and branching >= 1, got {levels} x {branching}"
            )));
        }
        let too_big = || {
            OracleError::InvalidConfig(format!(
                "cluster tree {levels} levels x branching {branching} is too large"
            ))
        };
        let levels32 = u32::try_from(levels).map_err(|_| too_big())?;
        let branching32 = u32::try_from(branching).map_err(|_| too_big())?;
        let mut total = 0u64;
        let mut width = 1u64;
        for _ in 0..levels {
            width = width.checked_mul(branching as u64).ok_or_else(too_big)?;
            total = total.checked_add(width).ok_or_else(too_big)?;
        }
        if width > 1u64 << 32 {
            return Err(too_big());
        }
        let num_blocks = usize::try_from(total).map_err(|_| too_big())?;
        Ok(Self {
            levels: levels32,
            branching: branching32,
            num_blocks,
        })
    }

    /// Number of levels `L`.
    pub fn levels(&self) -> usize {
        self.levels as usize
    }

    /// Branching factor `b`.
    pub fn branching(&self) -> usize {
        self.branching as usize
    }

    /// Total number of blocks, `b + .. + b^L`.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn check_level(&self, level: usize) -> Result<(), OracleError> {
        if (1..=self.levels()).contains(&level) {
            Ok(())
        } else {
            Err(OracleError::InvalidConfig(format!(
                "level {level} not in 1..={}",
                self.levels
            )))
        }
    }

    /// Number of nodes at `level` (`1 ..= L`): `b^level`.
    pub fn nodes_at(&self, level: usize) -> Result<usize, OracleError> {
        self.check_level(level)?;
        // fits: b^level <= b + .. + b^L = num_blocks (a usize)
        Ok(self.branching().pow(level as u32))
    }

    /// Flat index of the first block of `level`: `b + .. + b^(level-1)`.
    pub fn level_offset(&self, level: usize) -> Result<usize, OracleError> {
        self.check_level(level)?;
        let mut off = 0usize;
        let mut width = 1usize;
        for _ in 1..level {
            width *= self.branching();
            off += width;
        }
        Ok(off)
    }

    /// Flat index of `id`; errors if its level or node is out of range.
    pub fn index(&self, id: BlockId) -> Result<usize, OracleError> {
        let level = id.level as usize;
        let nodes = self.nodes_at(level)?;
        let node = id.node as usize;
        if node >= nodes {
            return Err(OracleError::IndexOutOfRange {
                index: id.node as u64,
                rows: nodes,
            });
        }
        Ok(self.level_offset(level)? + node)
    }

    /// The block at flat `index` (inverse of [`Self::index`]).
    pub fn block(&self, index: usize) -> Result<BlockId, OracleError> {
        if index >= self.num_blocks {
            return Err(OracleError::IndexOutOfRange {
                index: index as u64,
                rows: self.num_blocks,
            });
        }
        let mut rest = index;
        let mut width = 1usize;
        for level in 1..=self.levels {
            width *= self.branching();
            if rest < width {
                return Ok(BlockId {
                    level,
                    node: rest as u32,
                });
            }
            rest -= width;
        }
        unreachable!("index < num_blocks lies in some level")
    }

    /// Parent of `id` (`None` for level 1, whose parent is the root).
    pub fn parent(&self, id: BlockId) -> Result<Option<BlockId>, OracleError> {
        self.index(id)?;
        Ok((id.level > 1).then(|| BlockId {
            level: id.level - 1,
            node: id.node / self.branching,
        }))
    }

    /// Blocks along a descent `path` (node id per level, level 1 first): one
    /// per level. Validates the length, the ranges and that each node is a
    /// child of the previous one.
    pub fn path_blocks(&self, path: &[u32]) -> Result<Vec<BlockId>, OracleError> {
        if path.len() != self.levels() {
            return Err(OracleError::Shape {
                what: "cluster path",
                shape: format!("[{}]", self.levels),
                expected: self.levels(),
                got: path.len(),
            });
        }
        let mut out = Vec::with_capacity(path.len());
        let mut parent = 0u64;
        for (i, &node) in path.iter().enumerate() {
            let id = BlockId {
                level: i as u32 + 1,
                node,
            };
            self.index(id)?;
            if node as u64 / self.branching as u64 != parent {
                return Err(OracleError::InvalidConfig(format!(
                    "path node {node} at level {} is not a child of node {parent}",
                    i + 1
                )));
            }
            parent = node as u64;
            out.push(id);
        }
        Ok(out)
    }

    /// Flat block indices along a descent `path` (see [`Self::path_blocks`]).
    pub fn path_indices(&self, path: &[u32]) -> Result<Vec<usize>, OracleError> {
        self.path_blocks(path)?
            .into_iter()
            .map(|id| self.index(id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_offsets() {
        assert_eq!(num_blocks(4, 16).unwrap(), 16 + 256 + 4096 + 65536);
        assert_eq!(num_blocks(1, 1).unwrap(), 1);
        assert_eq!(num_blocks(3, 1).unwrap(), 3);
        let l = BlockLayout::new(3, 4).unwrap();
        assert_eq!(l.num_blocks(), 4 + 16 + 64);
        assert_eq!(l.level_offset(1).unwrap(), 0);
        assert_eq!(l.level_offset(2).unwrap(), 4);
        assert_eq!(l.level_offset(3).unwrap(), 20);
        assert_eq!(l.nodes_at(3).unwrap(), 64);
        assert_eq!(
            l.index(BlockId { level: 2, node: 5 }).unwrap(),
            9,
            "level 2 starts after the 4 level-1 blocks"
        );
    }

    #[test]
    fn index_round_trips() {
        for (levels, b) in [(1, 1), (1, 7), (2, 3), (3, 4), (4, 2)] {
            let l = BlockLayout::new(levels, b).unwrap();
            let mut expected = 0usize;
            for level in 1..=levels {
                for node in 0..l.nodes_at(level).unwrap() {
                    let id = BlockId {
                        level: level as u32,
                        node: node as u32,
                    };
                    let i = l.index(id).unwrap();
                    assert_eq!(i, expected);
                    assert_eq!(l.block(i).unwrap(), id);
                    expected += 1;
                }
            }
            assert_eq!(expected, l.num_blocks());
            assert!(l.block(expected).is_err());
        }
    }

    #[test]
    fn invalid_inputs_are_errors() {
        assert!(BlockLayout::new(0, 4).is_err());
        assert!(BlockLayout::new(3, 0).is_err());
        assert!(BlockLayout::new(9, 16).is_err()); // 16^9 > 2^32 node ids
        assert!(BlockLayout::new(8, 16).is_ok()); // 16^8 = 2^32
        assert!(BlockLayout::new(usize::MAX, 2).is_err());
        let l = BlockLayout::new(2, 3).unwrap();
        assert!(l.index(BlockId { level: 0, node: 0 }).is_err());
        assert!(l.index(BlockId { level: 3, node: 0 }).is_err());
        assert!(matches!(
            l.index(BlockId { level: 1, node: 3 }),
            Err(OracleError::IndexOutOfRange { index: 3, rows: 3 })
        ));
        assert!(l.nodes_at(0).is_err());
        assert!(l.level_offset(3).is_err());
        assert!(l.path_blocks(&[1]).is_err()); // too short
        assert!(l.path_blocks(&[1, 2]).is_err()); // 2 is a child of 0, not 1
        assert!(l.path_blocks(&[3, 9]).is_err()); // out of range
    }

    #[test]
    fn paths_and_parents() {
        let l = BlockLayout::new(3, 4).unwrap();
        let path = [2u32, 2 * 4 + 3, (2 * 4 + 3) * 4 + 1];
        let ids = l.path_blocks(&path).unwrap();
        assert_eq!(ids[2], BlockId { level: 3, node: 45 });
        assert_eq!(l.path_indices(&path).unwrap(), vec![2, 4 + 11, 20 + 45]);
        assert_eq!(l.parent(ids[2]).unwrap(), Some(ids[1]));
        assert_eq!(l.parent(ids[1]).unwrap(), Some(ids[0]));
        assert_eq!(l.parent(ids[0]).unwrap(), None);
    }
}
