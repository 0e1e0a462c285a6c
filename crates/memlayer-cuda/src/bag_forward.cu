// Weighted embedding-bag forward (sum mode with per-sample weights):
// out[b] = Σ_{e in bag b} weights[e] · table[indices[e]], the entries of a bag
// summed in order from 0 — the oracle's order (memlayer_core::bag::bag_forward),
// so the output is bit-identical to it for f32 tables, and for f16/bf16 tables
// widened exactly to f32.
//
// One thread per (bag, group of 4 columns): the threads of a warp read 4
// consecutive columns each of the same rows (coalesced 16-byte loads for f32,
// 8-byte for f16/bf16 when dim % 4 == 0). Rows outside the table are skipped
// (the host checks indices before launching).
//
// table: (rows, dim) in DT — or (slots · page_rows, dim) with a page table;
// indices, weights: (nnz); offsets: (bags + 1) → out: (bags, dim) f32

// Paged: with a page table (`page_table` non-null, `pages` entries), row r
// is row r % page_rows of slot page_table[r / page_rows] of `table` (the
// slots); a row whose page is not resident (NO_SLOT) or outside the table is
// skipped — the host makes every page a batch reads resident first.
#define NO_SLOT 0xffffffffu

template <int DT>
__device__ void bag_forward(const void* table, u32 rows, u32 dim, const u32* page_table, u32 pages,
                            u32 page_rows, const u32* indices, const float* weights,
                            const u32* offsets, u32 bags, float* out) {
    u32 groups = (dim + 3) / 4;
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)bags * groups) return;
    u32 b = (u32)(t / groups);
    u32 d0 = (u32)(t % groups) * 4;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    bool vec = (dim % 4) == 0;
    for (u32 e = offsets[b]; e < offsets[b + 1]; ++e) {
        u32 r = indices[e];
        if (r >= rows) continue;
        u64 local = r;
        if (page_table) {
            u32 p = r / page_rows;
            if (p >= pages || page_table[p] == NO_SLOT) continue;
            local = (u64)page_table[p] * page_rows + r % page_rows;
        }
        float w = weights[e];
        u64 base = local * dim + d0;
        float v[4];
        if (vec) {
            load4<DT>(table, base, v);
        } else {
            for (int j = 0; j < 4; ++j) v[j] = (d0 + j < dim) ? load1<DT>(table, base + j) : 0.0f;
        }
        for (int j = 0; j < 4; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, v[j]));
    }
    for (int j = 0; j < 4; ++j)
        if (d0 + j < dim) out[(u64)b * dim + d0 + j] = acc[j];
}

#define BAG_FORWARD(NAME, DT)                                                                      \
    extern "C" __global__ void NAME(const void* table, u32 rows, u32 dim, const u32* page_table,    \
                                    u32 pages, u32 page_rows, const u32* indices,                  \
                                    const float* weights, const u32* offsets, u32 bags,            \
                                    float* out) {                                                  \
        bag_forward<DT>(table, rows, dim, page_table, pages, page_rows, indices, weights, offsets, \
                        bags, out);                                                                \
    }
BAG_FORWARD(bag_forward_f32, DT_F32)
BAG_FORWARD(bag_forward_f16, DT_F16)
BAG_FORWARD(bag_forward_bf16, DT_BF16)

// Copy probe: out[i] = in[i] as float4 (n4 = elements / 4): the device's
// copy bandwidth, the ceiling the bag's GB/s are reported against.
extern "C" __global__ void copy_f32x4(const float4* in, float4* out, u64 n4) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (; i < n4; i += stride) out[i] = in[i];
}
