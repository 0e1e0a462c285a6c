// Shared by every memlayer CUDA kernel (prepended to each source before
// NVRTC compiles it; no CUDA headers are needed, so the kernels compile with
// the NVRTC of PyPI's `nvidia-cuda-nvrtc-cu12` alone).
//
// Arithmetic that must match the CPU oracle bit for bit is written with the
// round-to-nearest intrinsics (`__fmul_rn`, `__fadd_rn`, ...), which NVRTC
// never contracts into fused multiply-adds.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

// Storage dtypes of a table (the `Dtype` codes of the host side).
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// IEEE half → f32, exact (PTX cvt).
#ifndef MEMLAYER_CUDA_EMU
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#else
// The CPU emulation (tests/emulated.rs, never NVRTC): the same conversion
// in software — normals rebiased, subnormals m · 2^-24 (exact in f32),
// ±0, ±inf, NaN with its payload.
__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
    return __uint_as_float(sign | __float_as_uint((float)man * 0x1p-24f));
}
#endif

// bfloat16 → f32, exact (the high half of an f32).
__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Element `i` of a table stored as `DT`, widened to f32.
template <int DT>
__device__ __forceinline__ float load1(const void* table, u64 i) {
    if (DT == DT_F32) return ((const float*)table)[i];
    u16 h = ((const u16*)table)[i];
    return DT == DT_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// Elements `i .. i + 4` (`i` a multiple of 4, the row 16/8-byte aligned).
template <int DT>
__device__ __forceinline__ void load4(const void* table, u64 i, float v[4]) {
    if (DT == DT_F32) {
        float4 q = *(const float4*)((const float*)table + i);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        uint2 q = *(const uint2*)((const u16*)table + i);
        u16 h[4] = {(u16)(q.x & 0xffff), (u16)(q.x >> 16), (u16)(q.y & 0xffff), (u16)(q.y >> 16)};
        for (int j = 0; j < 4; ++j) v[j] = DT == DT_F16 ? f16_to_f32(h[j]) : bf16_to_f32(h[j]);
    }
}

// Sort key of a score in rank order, smaller first: higher score first,
// -0.0 equal to +0.0, NaN as -inf (memlayer_core::pkm's `desc_key`).
__device__ __forceinline__ u32 desc_key(float x) {
    if (x != x) x = neg_inf();
    u32 bits = (x == 0.0f) ? 0u : __float_as_uint(x);
    u32 asc = (bits >> 31) ? ~bits : (bits | 0x80000000u);
    return ~asc;
}

// Sequential dot product in the oracle's order (`acc += a[j] * b[j]` from 0).
__device__ __forceinline__ float dot_seq(const float* a, const float* b, u32 n) {
    float acc = 0.0f;
    for (u32 j = 0; j < n; ++j) acc = __fadd_rn(acc, __fmul_rn(a[j], b[j]));
    return acc;
}
