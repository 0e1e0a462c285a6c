//! Embedding-bag forward kernel (flat and paged tables, f32 and f16 storage).
