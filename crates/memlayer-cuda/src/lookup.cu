// Product-key lookup (memlayer_core::pkm::lookup), the same rule and bits:
// per (token, head), each query half (RMS-normalised with qk-norm) is scored
// against its n_keys sub-keys (sequential dot products, times the scale),
// the top-k of each half kept (higher score first, ties to the lower id), the
// candidates (a, b) of the two sorted halves with (a + 1)(b + 1) <= k (every
// candidate that can be among the best k: memlayer_core::pkm::select_from_scores)
// ranked by score, then s1, then s2 (higher first), then row (lower first),
// the best k written with their scores and softmax weights.
//
// pk_norm_rows: rows of `len` values RMS-normalised (the scored sub-keys).
// pk_select_scores: the same selection from scores the caller computed.
// pk_lookup: one block per (token, head); shared memory: the two query halves,
// next_pow2(n_keys) sort keys (bitonic sort), the top-k of each half and the
// candidates. Indices and scores equal the oracle's bit for bit; weights
// within f32 rounding (expf).

__device__ __forceinline__ float rms_inv(const float* v, u32 len, float eps) {
    float ms = 0.0f;
    for (u32 j = 0; j < len; ++j) ms = __fadd_rn(ms, __fmul_rn(v[j], v[j]));
    ms = __fdiv_rn(ms, (float)len);
    return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
}

extern "C" __global__ void pk_norm_rows(const float* x, u32 rows, u32 len, float eps, float* out) {
    u64 r = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* v = x + r * len;
    float inv = rms_inv(v, len, eps);
    for (u32 j = 0; j < len; ++j) out[r * len + j] = __fmul_rn(v[j], inv);
}

// `before(a, b)`: candidate a ranks before candidate b.
__device__ __forceinline__ bool before(float sa, float s1a, float s2a, u32 ra,
                                       float sb, float s1b, float s2b, u32 rb) {
    u32 ka = desc_key(sa), kb = desc_key(sb);
    if (ka != kb) return ka < kb;
    ka = desc_key(s1a); kb = desc_key(s1b);
    if (ka != kb) return ka < kb;
    ka = desc_key(s2a); kb = desc_key(s2b);
    if (ka != kb) return ka < kb;
    return ra < rb;
}

// Ascending bitonic sort of `pow2` keys in shared memory, by every thread
// of the block (the caller synchronises before).
__device__ void bitonic_sort(u64* sort, u32 pow2, u32 tid, u32 nt) {
    for (u32 size = 2; size <= pow2; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = tid; i < pow2; i += nt) {
                u32 j = i ^ stride;
                if (j > i) {
                    bool up = (i & size) == 0;
                    u64 a = sort[i], b = sort[j];
                    if ((a > b) == up) { sort[i] = b; sort[j] = a; }
                }
            }
            __syncthreads();
        }
    }
}

// The sort keys of one half's `n_keys` scores in `sort` (pow2 entries, the
// padding last), each `desc_key(score) << 32 | id`.
__device__ void half_keys(u64* sort, const float* s, u32 n_keys, u32 pow2, u32 tid, u32 nt) {
    for (u32 i = tid; i < pow2; i += nt)
        sort[i] = i < n_keys ? (((u64)desc_key(s[i]) << 32) | i) : ~0ull;
}

// Shared memory of the candidate stage after `sort` (pow2 u64): the top-k of
// each half (scores, ids), the candidates (score, s1, s2, row).
struct Stage {
    float* top_s;  // (2, k)
    u32* top_i;    // (2, k)
    float* c_s;    // (max_cand) each
    float* c_s1;
    float* c_s2;
    u32* c_row;
};

__device__ Stage stage_at(unsigned char* after, u32 k, u32 max_cand) {
    Stage st;
    st.top_s = (float*)after;
    st.top_i = (u32*)(st.top_s + 2 * k);
    st.c_s = (float*)(st.top_i + 2 * k);
    st.c_s1 = st.c_s + max_cand;
    st.c_s2 = st.c_s1 + max_cand;
    st.c_row = (u32*)(st.c_s2 + max_cand);
    return st;
}

// From both halves' top-k (in `st`, synchronised): the candidates (a, b) with
// (a + 1)(b + 1) <= k, each candidate's rank (how many rank before it: the
// order is total), and the best k rows and scores written at `out0`.
__device__ void rank_candidates(const Stage& st, u32 k, u32 n_keys, u32* n_cand, u64 out0,
                                u32* out_indices, float* out_scores, u32 tid, u32 nt) {
    if (tid == 0) {
        u32 n = 0;
        for (u32 a = 0; a < k; ++a) {
            for (u32 b = 0; (a + 1) * (b + 1) <= k; ++b) {
                float s1 = st.top_s[a], s2 = st.top_s[k + b];
                st.c_s[n] = __fadd_rn(s1, s2);
                st.c_s1[n] = s1;
                st.c_s2[n] = s2;
                st.c_row[n] = st.top_i[a] * n_keys + st.top_i[k + b];
                ++n;
            }
        }
        *n_cand = n;
    }
    __syncthreads();
    u32 nc = *n_cand;
    for (u32 c = tid; c < nc; c += nt) {
        u32 rank = 0;
        for (u32 o = 0; o < nc; ++o)
            rank += before(st.c_s[o], st.c_s1[o], st.c_s2[o], st.c_row[o], st.c_s[c], st.c_s1[c],
                           st.c_s2[c], st.c_row[c]);
        if (rank < k) {
            out_indices[out0 + rank] = st.c_row[c];
            out_scores[out0 + rank] = st.c_s[c];
        }
    }
    __syncthreads();
}

// keys: (heads, 2, n_keys, half) as scored; query: (tokens, heads, 2 * half)
// → indices, scores, weights: (tokens, heads, k). `pow2` = next_pow2(n_keys),
// `max_cand` = Σ_{a<k} floor(k / (a + 1)).
extern "C" __global__ void pk_lookup(const float* keys, const float* query, u32 heads, u32 n_keys,
                                     u32 half, u32 k, u32 qk_norm, float eps, float scale, u32 pow2,
                                     u32 max_cand, u32* out_indices, float* out_scores,
                                     float* out_weights) {
    extern __shared__ unsigned char smem[];
    u64* sort = (u64*)smem;                                  // (pow2)
    float* q = (float*)(sort + pow2);                        // (2, half)
    Stage st = stage_at((unsigned char*)(q + 2 * half), k, max_cand);
    __shared__ u32 n_cand;

    u32 th = blockIdx.x;  // token * heads + head
    u32 h = th % heads;
    u32 tid = threadIdx.x, nt = blockDim.x;
    const float* qsrc = query + (u64)th * 2 * half;

    // the query halves as scored
    for (u32 j = tid; j < 2 * half; j += nt) q[j] = qsrc[j];
    __syncthreads();
    if (qk_norm) {
        __shared__ float inv[2];
        if (tid < 2) inv[tid] = rms_inv(q + tid * half, half, eps);
        __syncthreads();
        for (u32 j = tid; j < 2 * half; j += nt) q[j] = __fmul_rn(q[j], inv[j / half]);
        __syncthreads();
    }

    for (u32 side = 0; side < 2; ++side) {
        const float* kt = keys + ((u64)h * 2 + side) * n_keys * half;
        const float* qs = q + side * half;
        for (u32 i = tid; i < pow2; i += nt) {
            if (i < n_keys) {
                float s = __fmul_rn(dot_seq(kt + (u64)i * half, qs, half), scale);
                sort[i] = ((u64)desc_key(s) << 32) | i;
            } else {
                sort[i] = ~0ull;
            }
        }
        __syncthreads();
        bitonic_sort(sort, pow2, tid, nt);
        // the k best: their ids, and their scores recomputed (same bits)
        for (u32 a = tid; a < k; a += nt) {
            u32 id = (u32)(sort[a] & 0xffffffffu);
            st.top_i[side * k + a] = id;
            st.top_s[side * k + a] = __fmul_rn(dot_seq(kt + (u64)id * half, qs, half), scale);
        }
        __syncthreads();
    }

    u64 out0 = (u64)th * k;
    rank_candidates(st, k, n_keys, &n_cand, out0, out_indices, out_scores, tid, nt);
    // softmax over the k scores, in the oracle's order
    if (tid == 0) {
        float m = neg_inf();
        for (u32 a = 0; a < k; ++a) m = fmaxf(m, out_scores[out0 + a]);
        float sum = 0.0f;
        for (u32 a = 0; a < k; ++a) {
            float e = expf(__fsub_rn(out_scores[out0 + a], m));
            out_weights[out0 + a] = e;
            sum = __fadd_rn(sum, e);
        }
        for (u32 a = 0; a < k; ++a) out_weights[out0 + a] = __fdiv_rn(out_weights[out0 + a], sum);
    }
}

// Selection from scores already computed (the model's training step, where
// burn computes the sub-key scores): scores (groups, 2, n_keys) → the best k
// rows `i1 * n_keys + i2` and their scores, (groups, k) each, by the same
// rule as pk_lookup (memlayer_core::pkm::select_from_scores). One block per
// group; shared memory: pow2 sort keys, then the candidate stage.
extern "C" __global__ void pk_select_scores(const float* scores, u32 n_keys, u32 k, u32 pow2,
                                            u32 max_cand, u32* out_indices, float* out_scores) {
    extern __shared__ unsigned char smem[];
    u64* sort = (u64*)smem;  // (pow2)
    Stage st = stage_at((unsigned char*)(sort + pow2), k, max_cand);
    __shared__ u32 n_cand;
    u32 g = blockIdx.x;
    u32 tid = threadIdx.x, nt = blockDim.x;
    for (u32 side = 0; side < 2; ++side) {
        const float* s = scores + ((u64)g * 2 + side) * n_keys;
        half_keys(sort, s, n_keys, pow2, tid, nt);
        __syncthreads();
        bitonic_sort(sort, pow2, tid, nt);
        for (u32 a = tid; a < k; a += nt) {
            u32 id = (u32)(sort[a] & 0xffffffffu);
            st.top_i[side * k + a] = id;
            st.top_s[side * k + a] = s[id];
        }
        __syncthreads();
    }
    rank_candidates(st, k, n_keys, &n_cand, (u64)g * k, out_indices, out_scores, tid, nt);
}
