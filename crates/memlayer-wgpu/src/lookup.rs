//! Product-key lookup kernels (forward): sub-key scores, per-half top-k, candidates, softmax.
