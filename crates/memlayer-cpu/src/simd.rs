//! Kernel selection and the one SIMD vocabulary the kernels are written in.
//!
//! Each CPU kernel (embedding-bag forward, per-sample-weight dot, the
//! product-key score tile and top-k scan) is written **once**, generic over
//! `Lanes`, and instantiated inside a `#[target_feature]` wrapper per
//! instruction set: AVX-512 (F, 16 lanes; f16 widened by `vcvtph2ps`) and
//! AVX2 + FMA + F16C on x86-64, NEON on aarch64, and a
//! portable one-lane type whose loops LLVM vectorises for every other target (auto-vectorised for the
//! compile target: wasm32, ...). The family is picked at run time
//! ([`kernel`]: detection, no `target-cpu` flag needed) and can be forced
//! for tests and benches ([`force_kernel`]).
//!
//! All families give bit-identical results except for the `dot`-style
//! reduction of [`crate::bag::bag_backward_weights`], whose lane count and
//! fused multiply-add differ (it matches the oracle to rounding).

use crate::error::CpuError;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use crate::storage::DType;
use crate::storage::Storage;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

#[cfg(target_arch = "aarch64")]
use core::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

static FORCED: AtomicU8 = AtomicU8::new(0);
/// "The family's own default" in the prefetch knobs below.
const FAMILY_DEFAULT: usize = usize::MAX;
static PREFETCH_BYTES: AtomicUsize = AtomicUsize::new(FAMILY_DEFAULT);
static PREFETCH_L2: AtomicBool = AtomicBool::new(true);
static PREFETCH_MODE: AtomicUsize = AtomicUsize::new(FAMILY_DEFAULT);
static REG_ACC: AtomicBool = AtomicBool::new(true);

/// Default prefetch pattern of the AVX2 and NEON families: 0 (tuned on the
/// AMD EPYC Zen 4 VM, where the early first-line prefetch of pattern 2 cost
/// 16-bit tables 20–30 %; see the crate README).
pub const DEFAULT_PREFETCH_MODE: usize = 0;

/// Default prefetch pattern of the AVX-512 family: 3. On the Xeon of issue 20
/// (2 threads, rows from DRAM) pattern 2 gathered 5–25 % more than pattern 0
/// (the early first-line touch opens the row's DRAM page and lets the L2
/// streamer fetch neighbouring lines without holding one of the core's few L1
/// fill buffers), pattern 3 another 5–7 % on the register path.
pub const DEFAULT_PREFETCH_MODE_AVX512: usize = 3;

/// Prefetch pattern of the gather (tuning; [`reset_prefetch`] goes back to each family's default): 0
/// every line of each row at the prefetch distance; 1 only the row's first
/// line; 2 as 0 plus the first line again at twice the distance (starts the
/// page walk earlier); 3 as 2, except that where the forward keeps a bag's row
/// in registers (`Lanes::REG_ACC`) the row at the distance is prefetched one
/// line per vector load, interleaved with the sums instead of in a burst (as
/// FBGEMM's kernels do).
pub fn set_prefetch_mode(mode: usize) {
    PREFETCH_MODE.store(mode, Ordering::Relaxed);
}

/// Back to each family's default prefetch distance and pattern (undoes
/// [`set_prefetch_bytes`] and [`set_prefetch_mode`]).
pub fn reset_prefetch() {
    PREFETCH_BYTES.store(FAMILY_DEFAULT, Ordering::Relaxed);
    PREFETCH_MODE.store(FAMILY_DEFAULT, Ordering::Relaxed);
}

/// Prefetch pattern of the next call (see [`set_prefetch_mode`]): the one set,
/// else the default of [`kernel`]'s family.
pub fn prefetch_mode() -> usize {
    match PREFETCH_MODE.load(Ordering::Relaxed) {
        FAMILY_DEFAULT if kernel() == Kernel::Avx512 => DEFAULT_PREFETCH_MODE_AVX512,
        FAMILY_DEFAULT => DEFAULT_PREFETCH_MODE,
        m => m,
    }
}

/// Whether the embedding-bag forward keeps a bag's output row in registers
/// when the row is a few whole vectors (`Lanes::REG_ACC`: AVX-512); on by default,
/// off for tuning (then every row takes the 4-rows-per-pass loop).
pub fn set_register_accumulators(on: bool) {
    REG_ACC.store(on, Ordering::Relaxed);
}

/// Whether the register-accumulator forward is on (see [`set_register_accumulators`]).
pub fn register_accumulators() -> bool {
    REG_ACC.load(Ordering::Relaxed)
}

/// Default distance of the software prefetch in the embedding-bag gather of
/// the AVX2 and NEON families: rows are prefetched this many bytes of row data
/// ahead of the row being summed (2 to 64 rows).
pub const DEFAULT_PREFETCH_BYTES: usize = 8 * 1024;

/// Default prefetch distance of the AVX-512 family: with pattern 2 or 3, 16-bit
/// rows gathered 20–30 % faster at 32 KiB than at 8 KiB on the Xeon of issue 20,
/// f32 rows the same or better.
pub const DEFAULT_PREFETCH_BYTES_AVX512: usize = 32 * 1024;

/// Sets the software-prefetch distance in bytes of rows for every family (0
/// disables it; [`reset_prefetch`] goes back to each family's default); for tuning.
pub fn set_prefetch_bytes(bytes: usize) {
    PREFETCH_BYTES.store(bytes, Ordering::Relaxed);
}

/// Software-prefetch distance of the next call in bytes of rows: the one set,
/// else the default of [`kernel`]'s family.
pub fn prefetch_bytes() -> usize {
    match PREFETCH_BYTES.load(Ordering::Relaxed) {
        FAMILY_DEFAULT if kernel() == Kernel::Avx512 => DEFAULT_PREFETCH_BYTES_AVX512,
        FAMILY_DEFAULT => DEFAULT_PREFETCH_BYTES,
        b => b,
    }
}

/// Prefetch into L2 and outer levels (the default: it measured faster than
/// all levels here, L1 miss buffers stay free for the loads; `T1` on x86-64,
/// `PLDL2KEEP` on aarch64) or into every level (`T0`, `PLDL1KEEP`); for tuning.
pub fn set_prefetch_l2(on: bool) {
    PREFETCH_L2.store(on, Ordering::Relaxed);
}

/// Whether the prefetch targets L2 (see [`set_prefetch_l2`]).
pub fn prefetch_l2() -> bool {
    PREFETCH_L2.load(Ordering::Relaxed)
}

/// A kernel family: one instruction set the kernels are instantiated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// x86-64 with AVX-512F (plus AVX2, FMA, F16C): 16 lanes; f16 widened by
    /// `vcvtph2ps` (zmm), bf16 by a 16-bit shift.
    Avx512,
    /// x86-64 with AVX2, FMA and F16C (8 lanes).
    Avx2,
    /// aarch64 Advanced SIMD (NEON, 4 lanes; f16 widened by `fcvtl`).
    Neon,
    /// Plain Rust on 8-lane arrays, auto-vectorised for the compile target.
    Portable,
}

impl Kernel {
    /// Every family, best first.
    pub const ALL: [Kernel; 4] = [Kernel::Avx512, Kernel::Avx2, Kernel::Neon, Kernel::Portable];

    /// Lower-case name (`avx512`, `avx2`, `neon`, `portable`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Neon => "neon",
            Kernel::Portable => "portable",
        }
    }

    /// The family called `name` ([`Kernel::name`]).
    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    }

    fn code(self) -> u8 {
        match self {
            Kernel::Avx2 => 1,
            Kernel::Neon => 2,
            Kernel::Portable => 3,
            Kernel::Avx512 => 4,
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this CPU runs `k` (run-time detection; cached by std).
pub fn runs(k: Kernel) -> bool {
    match k {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        Kernel::Portable => true,
        _ => false,
    }
}

/// The best family this CPU runs (run-time detection).
pub fn detected() -> Kernel {
    Kernel::ALL
        .into_iter()
        .find(|&k| runs(k))
        .unwrap_or(Kernel::Portable)
}

/// Every family this CPU runs, best first (ending with portable).
pub fn available() -> Vec<Kernel> {
    Kernel::ALL.into_iter().filter(|&k| runs(k)).collect()
}

/// Forces a family for every later call in the process (`None`: back to
/// detection); for tests and benches. A family this CPU does not run is
/// refused by name.
pub fn force_kernel(k: Option<Kernel>) -> Result<(), CpuError> {
    if let Some(k) = k
        && !available().contains(&k)
    {
        let names: Vec<&str> = available().iter().map(|k| k.name()).collect();
        return Err(CpuError::InvalidConfig(format!(
            "the {k} kernels do not run on this CPU (it runs: {})",
            names.join(", ")
        )));
    }
    FORCED.store(k.map_or(0, Kernel::code), Ordering::Relaxed);
    Ok(())
}

/// The kernel family used by the next call: the forced one, else [`detected`].
pub fn kernel() -> Kernel {
    match FORCED.load(Ordering::Relaxed) {
        1 => Kernel::Avx2,
        2 => Kernel::Neon,
        3 => Kernel::Portable,
        4 => Kernel::Avx512,
        _ => detected(),
    }
}

/// The vocabulary every CPU kernel is written in: vectors of `LANES` f32 and
/// the few operations the memory ops need. A kernel generic over `Lanes` is
/// `#[inline(always)]` and instantiated inside a `#[target_feature]` wrapper
/// of its instruction set, so the methods inline with that ISA enabled.
///
/// # Safety
/// An implementation's methods may only run where its instruction set is
/// available (inside such a wrapper, after [`kernel`] chose it); pointer
/// arguments must be valid for `LANES` elements. Implementations must
/// round exactly like scalar f32 code in `add`, `mul` and `widen`: the
/// embedding-bag forward and the score tiles are bit-identical to the oracle.
pub(crate) unsafe trait Lanes {
    /// A vector of `LANES` f32.
    type V: Copy;
    /// Lanes per vector.
    const LANES: usize;
    /// Whether [`Lanes::prefetch`] does anything (gathers skip its bookkeeping otherwise).
    const PREFETCH: bool;
    /// Most vectors of a bag's output row the forward keeps in registers across
    /// the whole bag (0: always accumulate in the output row in memory).
    const REG_ACC: usize;
    /// All lanes 0.0.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// `LANES` f32 from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::V;
    /// `LANES` f32 to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Lane-wise `a + b`, rounded once.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a * b`, rounded once.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `a * b + c`, fused where the ISA has FMA (for reductions that
    /// are not bit-exact anyway).
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Sum of the lanes (ISA order).
    unsafe fn hsum(v: Self::V) -> f32;
    /// Bit `l` set iff `v[l] > t[l]` (never for NaN).
    unsafe fn gt_mask(v: Self::V, t: Self::V) -> u32;
    /// `LANES` elements of `T` from `p`, widened exactly to f32.
    unsafe fn widen<T: Storage>(p: *const T) -> Self::V;
    /// Prefetch hint for the cache line holding `p` (into L2 and outer levels
    /// with `l2`, else every level); never faults.
    unsafe fn prefetch(p: *const u8, l2: bool);
}

/// The portable family: one lane of plain Rust; the loops over `dim` are
/// simple enough for LLVM to vectorise for the compile target (SSE2, wasm
/// simd128, RISC-V V, ...); no prefetch.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

// SAFETY: plain Rust, no instruction set assumed; scalar f32 ops.
unsafe impl Lanes for Portable {
    type V = f32;
    const LANES: usize = 1;
    const PREFETCH: bool = false;
    const REG_ACC: usize = 0;
    #[inline(always)]
    unsafe fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: the caller guarantees a readable f32.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: the caller guarantees a writable f32.
        unsafe { *p = v }
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn hsum(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn gt_mask(v: f32, t: f32) -> u32 {
        u32::from(v > t)
    }
    #[inline(always)]
    unsafe fn widen<T: Storage>(p: *const T) -> f32 {
        // SAFETY: the caller guarantees a readable element.
        unsafe { *p }.to_f32()
    }
    #[inline(always)]
    unsafe fn prefetch(_: *const u8, _: bool) {}
}

/// x86-64 AVX2 + FMA + F16C, 8 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: only run inside `#[target_feature(enable = "avx2,fma,f16c")]` wrappers
// chosen when `detected()` found those features; `add`/`mul` are single IEEE ops.
#[cfg(target_arch = "x86_64")]
unsafe impl Lanes for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    const PREFETCH: bool = true;
    // measured no faster at dim 64 (8 vectors) on the Xeon of issue 20
    const REG_ACC: usize = 0;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: 8 readable f32 (caller).
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: 8 writable f32 (caller).
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
            _mm_cvtss_f32(h)
        }
    }
    #[inline(always)]
    unsafe fn gt_mask(v: __m256, t: __m256) -> u32 {
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, t)) as u32 }
    }
    #[inline(always)]
    unsafe fn widen<T: Storage>(p: *const T) -> __m256 {
        // SAFETY: 8 readable elements (caller); F16C enabled by the wrapper.
        // bf16 -> f32 is a zero-extension to 32 bits and a shift into the upper half.
        unsafe {
            match T::DTYPE {
                DType::F32 => _mm256_loadu_ps(p.cast()),
                DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                DType::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(p.cast()),
                ))),
            }
        }
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, l2: bool) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            if l2 {
                _mm_prefetch::<_MM_HINT_T1>(p.cast())
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p.cast())
            }
        }
    }
}

/// x86-64 AVX-512F (with AVX2, FMA, F16C), 16 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

// SAFETY: only run inside `#[target_feature(enable = "avx512f,avx2,fma,f16c")]`
// wrappers chosen when `runs(Kernel::Avx512)` found those features; `add`/`mul`
// are single IEEE ops (round to nearest, no embedded rounding override).
#[cfg(target_arch = "x86_64")]
unsafe impl Lanes for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    const PREFETCH: bool = true;
    // 16 of the 32 zmm registers: rows of up to 256 f32 (dim 256: 35 vs 28 GB/s)
    const REG_ACC: usize = 32;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: 16 readable f32 (caller).
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: 16 writable f32 (caller).
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        // upper 256 bits onto the lower, then AVX2's order (pairwise halves)
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            Avx2::hsum(_mm256_add_ps(lo, hi))
        }
    }
    #[inline(always)]
    unsafe fn gt_mask(v: __m512, t: __m512) -> u32 {
        unsafe { u32::from(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, t)) }
    }
    #[inline(always)]
    unsafe fn widen<T: Storage>(p: *const T) -> __m512 {
        // SAFETY: 16 readable elements (caller); AVX-512F enabled by the wrapper.
        // f16: VCVTPH2PS zmm (exact, subnormals included); bf16 -> f32 is a
        // zero-extension to 32 bits and a shift into the upper half (exact).
        unsafe {
            match T::DTYPE {
                DType::F32 => _mm512_loadu_ps(p.cast()),
                DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                DType::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p.cast()),
                ))),
            }
        }
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, l2: bool) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { Avx2::prefetch(p, l2) }
    }
}

/// aarch64 Advanced SIMD (NEON), 4 lanes.
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy)]
pub(crate) struct Neon;

// SAFETY: only run inside `#[target_feature(enable = "neon")]` wrappers chosen
// when `detected()` found NEON; `vaddq`/`vmulq` are single IEEE ops (no fusion).
#[cfg(target_arch = "aarch64")]
unsafe impl Lanes for Neon {
    type V = float32x4_t;
    const LANES: usize = 4;
    const PREFETCH: bool = true;
    // not timed on ARM hardware yet: the loop over the output row in memory
    const REG_ACC: usize = 0;
    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> float32x4_t {
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: 4 readable f32 (caller).
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: 4 writable f32 (caller).
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul_add(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn hsum(v: float32x4_t) -> f32 {
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn gt_mask(v: float32x4_t, t: float32x4_t) -> u32 {
        const BITS: [u32; 4] = [1, 2, 4, 8];
        unsafe { vaddvq_u32(vandq_u32(vcgtq_f32(v, t), vld1q_u32(BITS.as_ptr()))) }
    }
    #[inline(always)]
    unsafe fn widen<T: Storage>(p: *const T) -> float32x4_t {
        // SAFETY: 4 readable elements (caller). f16: FCVTL (base Armv8, exact);
        // bf16: widen to 32 bits shifted into the upper half.
        unsafe {
            match T::DTYPE {
                DType::F32 => vld1q_f32(p.cast()),
                DType::F16 => {
                    // FCVTL by hand: the `vcvt_f32_f16` intrinsic needs Rust 1.94 (MSRV 1.90)
                    let h = vld1_u16(p.cast());
                    let r: float32x4_t;
                    core::arch::asm!("fcvtl {r:v}.4s, {h:v}.4h", r = lateout(vreg) r,
                        h = in(vreg) h, options(pure, nomem, nostack, preserves_flags));
                    r
                }
                DType::Bf16 => vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast()))),
            }
        }
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const u8, l2: bool) {
        // SAFETY: PRFM is a hint: it never faults and writes nothing.
        unsafe {
            if l2 {
                core::arch::asm!("prfm pldl2keep, [{p}]", p = in(reg) p,
                    options(nostack, readonly, preserves_flags));
            } else {
                core::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p,
                    options(nostack, readonly, preserves_flags));
            }
        }
    }
}

/// Prefetches every cache line (64 bytes) of `bytes` bytes from `p`.
///
/// # Safety
/// As [`Lanes`]: inside `S`'s wrapper.
#[inline(always)]
pub(crate) unsafe fn prefetch_row<S: Lanes>(p: *const u8, bytes: usize, l2: bool) {
    let start = p as usize & !63;
    let end = p as usize + bytes;
    let mut a = start;
    while a < end {
        // SAFETY: prefetch never faults.
        unsafe { S::prefetch(a as *const u8, l2) };
        a += 64;
    }
}

/// Defines `$name(kernel, args..)`, which runs the generic kernel
/// `$lanes::<S, generics..>(args..)` with the lanes of `kernel`, inside a
/// `#[target_feature]` wrapper of its instruction set — the one place those
/// wrappers are written:
///
/// ```text
/// dispatch_lanes! {
///     /// docs
///     unsafe fn forward_range[R: Rows](table: &R, out: &mut [f32]) => forward_range_lanes
/// }
/// ```
///
/// The defined function has the safety contract of `$lanes` minus the
/// instruction set, which `kernel` (from [`kernel`]) vouches for.
macro_rules! dispatch_lanes {
    (
        $(#[$meta:meta])*
        unsafe fn $name:ident [$($g:ident : $bound:path),*] ($($arg:ident : $ty:ty),* $(,)?) => $lanes:ident
    ) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<$($g: $bound),*>(kernel: $crate::simd::Kernel, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<$($g: $bound),*>($($arg: $ty),*) {
                // SAFETY: AVX-512F, AVX2, FMA and F16C are enabled here; the rest is the caller's.
                unsafe { $lanes::<$crate::simd::Avx512 $(, $g)*>($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<$($g: $bound),*>($($arg: $ty),*) {
                // SAFETY: AVX2, FMA and F16C are enabled here; the rest is the caller's.
                unsafe { $lanes::<$crate::simd::Avx2 $(, $g)*>($($arg),*) }
            }
            #[cfg(target_arch = "aarch64")]
            #[target_feature(enable = "neon")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn neon<$($g: $bound),*>($($arg: $ty),*) {
                // SAFETY: NEON is enabled here; the rest is the caller's.
                unsafe { $lanes::<$crate::simd::Neon $(, $g)*>($($arg),*) }
            }
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Kernel::Avx512 is only chosen when the CPU has AVX-512F, AVX2, FMA, F16C.
                $crate::simd::Kernel::Avx512 => unsafe { avx512::<$($g),*>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Kernel::Avx2 is only chosen when the CPU has AVX2, FMA and F16C.
                $crate::simd::Kernel::Avx2 => unsafe { avx2::<$($g),*>($($arg),*) },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: Kernel::Neon is only chosen when the CPU has NEON.
                $crate::simd::Kernel::Neon => unsafe { neon::<$($g),*>($($arg),*) },
                // SAFETY: the portable lanes need no instruction set.
                _ => unsafe { $lanes::<$crate::simd::Portable $(, $g)*>($($arg),*) },
            }
        }
    };
}
pub(crate) use dispatch_lanes;
