//! Hierarchical FFN memory (DESIGN §2).
