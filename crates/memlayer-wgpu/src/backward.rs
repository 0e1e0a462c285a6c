//! Backward kernels: embedding-bag (table and per-sample-weight gradients) and product-key lookup.
