// Embedding-bag backward.
//
// bag_backward_table: the table gradient through the reverse index (entries
// grouped by row, ascending entry position within a row — built by the host,
// Meta's `reverse_indices`): segment s (row seg_rows[s]) sums
// weights[e] · grad_out[bag_of[e]] over its entries in order from 0, the
// oracle's order (memlayer_core::bag::bag_backward_table), so the gradient is
// deterministic and bit-identical to it. One thread per (segment, 4 columns).
// `dense` != 0 writes row seg_rows[s] of a (rows, dim) gradient (zeroed by
// the host), else row s of the (segments, dim) sparse gradient.
//
// bag_backward_weights: dweights[e] = table[indices[e]] · grad_out[bag_of[e]];
// one warp per entry, lanes over columns and a shuffle tree (not the oracle's
// sequential order: equal within f32 rounding).

extern "C" __global__ void bag_backward_table(u32 dim, const u32* order, const u32* seg_offsets,
                                              const u32* seg_rows, u32 segments, const u32* bag_of,
                                              const float* weights, const float* grad_out, u32 dense,
                                              float* out) {
    u32 groups = (dim + 3) / 4;
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)segments * groups) return;
    u32 s = (u32)(t / groups);
    u32 d0 = (u32)(t % groups) * 4;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (u32 i = seg_offsets[s]; i < seg_offsets[s + 1]; ++i) {
        u32 e = order[i];
        float w = weights[e];
        const float* g = grad_out + (u64)bag_of[e] * dim + d0;
        for (int j = 0; j < 4; ++j)
            if (d0 + j < dim) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, g[j]));
    }
    u64 row = dense ? seg_rows[s] : s;
    for (int j = 0; j < 4; ++j)
        if (d0 + j < dim) out[row * dim + d0 + j] = acc[j];
}

template <int DT>
__device__ void bag_backward_weights(const void* table, u32 rows, u32 dim, const u32* indices,
                                     const u32* bag_of, u32 nnz, const float* grad_out, float* dweights) {
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    u32 lane = threadIdx.x % 32;
    if (warp >= nnz) return;
    u32 e = (u32)warp;
    u32 r = indices[e];
    float acc = 0.0f;
    if (r < rows) {
        const float* g = grad_out + (u64)bag_of[e] * dim;
        for (u32 d = lane; d < dim; d += 32) acc += load1<DT>(table, (u64)r * dim + d) * g[d];
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) dweights[e] = acc;
}

extern "C" __global__ void bag_backward_weights_f32(const void* table, u32 rows, u32 dim, const u32* indices,
                                                    const u32* bag_of, u32 nnz, const float* grad_out,
                                                    float* dweights) {
    bag_backward_weights<DT_F32>(table, rows, dim, indices, bag_of, nnz, grad_out, dweights);
}
extern "C" __global__ void bag_backward_weights_f16(const void* table, u32 rows, u32 dim, const u32* indices,
                                                    const u32* bag_of, u32 nnz, const float* grad_out,
                                                    float* dweights) {
    bag_backward_weights<DT_F16>(table, rows, dim, indices, bag_of, nnz, grad_out, dweights);
}
extern "C" __global__ void bag_backward_weights_bf16(const void* table, u32 rows, u32 dim, const u32* indices,
                                                     const u32* bag_of, u32 nnz, const float* grad_out,
                                                     float* dweights) {
    bag_backward_weights<DT_BF16>(table, rows, dim, indices, bag_of, nnz, grad_out, dweights);
}
