//! Interop with facebookresearch/memory checkpoints.
