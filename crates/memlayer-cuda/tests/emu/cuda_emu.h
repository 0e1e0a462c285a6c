// A small CUDA shim: just enough of the CUDA C dialect and runtime to compile
// memlayer's kernels (src/*.cu with src/common.cuh, as NVRTC compiles them)
// as C++ on the CPU and run them with their real launch geometry
// (tests/emulated.rs). Not a general CUDA emulator.
//
// Threads: every CUDA thread of a block is a std::thread (blockDim.x of them,
// created once per launch); the blocks of the grid run one after another.
// `__syncthreads()` is a block-wide std::barrier; a thread that returns from
// the kernel drops out of it (CUDA counts exited threads as arrived).
// `__shfl_down_sync` exchanges through a per-warp array and a per-warp
// barrier. `__shared__` variables are `static` (one block at a time: a
// static is the block's shared memory); the dynamic shared buffer
// (`extern __shared__`) is a heap block of exactly the launch's shared bytes,
// filled with 0xCD garbage before each block (reads of unwritten shared
// memory show, and a sanitizer sees any access past the launch's size).
//
// Every barrier (block, warp, the launch's gate between blocks) is a
// std::barrier: atomics (and futex waits) that ThreadSanitizer models as
// synchronisation, so the TSan build (tests/emulated.rs) reports exactly the
// shared-memory accesses that no barrier orders.
//
// Arithmetic: the round-to-nearest intrinsics are the plain IEEE operations
// (compiled with -ffp-contract=off: nothing fuses); expf/fmaxf are the C
// library's (the GPU's expf may differ by an ulp).
#pragma once

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};

inline dim3 gridDim = {1, 1, 1};
inline dim3 blockDim = {1, 1, 1};
inline uint3 blockIdx = {0, 0, 0};
inline thread_local uint3 threadIdx = {0, 0, 0};

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }

namespace emu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

// One warp's shuffle exchange.
struct Warp {
    std::unique_ptr<std::barrier<>> bar;
    unsigned width = 0;  // lanes in this warp (the last warp may be partial)
    uint64_t slot[32] = {};
};

// The block being run (replaced between blocks while every thread waits).
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<Warp> warps;
// The dynamic shared memory of the launch (exactly its shared bytes).
inline unsigned char* dyn_smem = nullptr;
inline size_t dyn_bytes = 0;

inline void setup_block(unsigned b) {
    blockIdx = {b, 0, 0};
    if (dyn_bytes) std::memset(dyn_smem, 0xCD, dyn_bytes);
    unsigned n = blockDim.x;
    block_bar = std::make_unique<std::barrier<>>(n);
    warps.clear();
    warps.resize((n + 31) / 32);
    for (unsigned w = 0; w < warps.size(); ++w) {
        unsigned width = n - w * 32 < 32 ? n - w * 32 : 32;
        warps[w].width = width;
        warps[w].bar = std::make_unique<std::barrier<>>(width);
        std::memset(warps[w].slot, 0xCD, sizeof warps[w].slot);
    }
}

// A thread's kernel returned: it no longer takes part in barriers.
inline void thread_exit() {
    block_bar->arrive_and_drop();
    warps[threadIdx.x / 32].bar->arrive_and_drop();
}

// Runs `kernel()` on a grid of `grid` blocks of `block` threads with
// `shared` bytes of dynamic shared memory.
template <class F>
void launch(unsigned grid, unsigned block, size_t shared, F kernel) {
    if (block == 0 || block > 1024) fail("block size outside 1..=1024");
    if (grid == 0) fail("a launch of 0 blocks (CUDA refuses it)");
    if (shared > 48 * 1024) fail("more than 48 KiB of dynamic shared memory");
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    dyn_bytes = shared;
    void* p = nullptr;
    // exact size (a sanitizer sees accesses past it), CUDA's 16-byte alignment
    if (posix_memalign(&p, 128, shared ? shared : 1) != 0) fail("out of memory");
    dyn_smem = (unsigned char*)p;
    setup_block(0);
    std::barrier<> gate(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                gate.arrive_and_wait();  // block b is set up
                kernel();
                thread_exit();
                gate.arrive_and_wait();  // every thread is done with block b
                if (t == 0 && b + 1 < grid) setup_block(b + 1);
            }
        });
    }
    for (auto& th : threads) th.join();
    block_bar.reset();
    warps.clear();
    std::free(dyn_smem);
    dyn_smem = nullptr;
    dyn_bytes = 0;
}

}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

// `v` of lane (lane + off) of the warp, or the caller's own `v` past the
// warp's end. Every lane of `mask` must call it (these kernels: full warps).
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned off) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    unsigned lane = threadIdx.x % 32;
    emu::Warp& w = emu::warps[threadIdx.x / 32];
    unsigned want = w.width == 32 ? 0xffffffffu : ((1u << w.width) - 1);
    if ((mask & want) != want) emu::fail("__shfl_down_sync: the emulator needs every lane in the mask");
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    w.bar->arrive_and_wait();
    T r = v;
    if (lane + off < w.width) std::memcpy(&r, &w.slot[lane + off], sizeof(T));
    w.bar->arrive_and_wait();
    return r;
}
