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
    float* top_s = q + 2 * half;                             // (2, k)
    u32* top_i = (u32*)(top_s + 2 * k);                      // (2, k)
    float* c_s = (float*)(top_i + 2 * k);                    // (max_cand) candidate scores
    float* c_s1 = c_s + max_cand;
    float* c_s2 = c_s1 + max_cand;
    u32* c_row = (u32*)(c_s2 + max_cand);
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
        // bitonic sort, ascending
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
        // the k best: their ids, and their scores recomputed (same bits)
        for (u32 a = tid; a < k; a += nt) {
            u32 id = (u32)(sort[a] & 0xffffffffu);
            top_i[side * k + a] = id;
            top_s[side * k + a] = __fmul_rn(dot_seq(kt + (u64)id * half, qs, half), scale);
        }
        __syncthreads();
    }

    // candidates (a, b) with (a + 1)(b + 1) <= k
    if (tid == 0) {
        u32 n = 0;
        for (u32 a = 0; a < k; ++a) {
            for (u32 b = 0; (a + 1) * (b + 1) <= k; ++b) {
                float s1 = top_s[a], s2 = top_s[k + b];
                c_s[n] = __fadd_rn(s1, s2);
                c_s1[n] = s1;
                c_s2[n] = s2;
                c_row[n] = top_i[a] * n_keys + top_i[k + b];
                ++n;
            }
        }
        n_cand = n;
    }
    __syncthreads();
    // each candidate's rank: how many rank before it (the order is total)
    u64 out0 = (u64)th * k;
    for (u32 c = tid; c < n_cand; c += nt) {
        u32 rank = 0;
        for (u32 o = 0; o < n_cand; ++o)
            rank += before(c_s[o], c_s1[o], c_s2[o], c_row[o], c_s[c], c_s1[c], c_s2[c], c_row[c]);
        if (rank < k) {
            out_indices[out0 + rank] = c_row[c];
            out_scores[out0 + rank] = c_s[c];
        }
    }
    __syncthreads();
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
