//! The CUDA kernels run on the CPU by emulation, against the oracle.
//!
//! This machine class has no GPU, so the CUDA C kernels (`src/*.cu` with
//! `src/common.cuh` prepended, the exact text NVRTC compiles:
//! [`kernels::full_source`]) are compiled here as C++ with g++ against a
//! small CUDA shim (`tests/emu/cuda_emu.h`), launched by a driver
//! (`tests/emu/driver.cpp`) with the grid, block and shared-memory sizes the
//! host launchers (`src/lookup.rs`, `src/bag.rs`, `src/bandwidth.rs`) use,
//! and their outputs compared with `memlayer_core`'s oracle: indices, scores,
//! the bag forward and the table gradient bit for bit, softmax weights and
//! weight gradients within f32 rounding — what the GPU tests in `src/*.rs`
//! check on a GPU.
//!
//! What is emulated: every CUDA thread of a block is an OS thread (blocks
//! run one after another); `__syncthreads()` is a block-wide barrier that
//! exited threads no longer wait for; `__shfl_down_sync` is an exchange
//! through a per-warp barrier; `__shared__` variables are per-block statics
//! and the dynamic shared memory is a heap block of exactly the launch's size,
//! filled with 0xCD garbage before each block. The driver is built with
//! AddressSanitizer and UBSan: an access past a buffer (device or shared:
//! e.g. a shared-memory size formula that is too small), a misaligned
//! `float4` load or undefined behaviour fails the test. The one PTX inline
//! asm (f16 → f32) has an exact software twin under `MEMLAYER_CUDA_EMU`.
//!
//! Barriers, deterministically: a second driver is built with
//! ThreadSanitizer (it cannot be combined with ASan), and the kernels with
//! shared memory, barriers or shuffles (`pk_lookup` with and without
//! qk-norm, `pk_select_scores`, `bag_backward_weights_*`) run through it on
//! small grids, against the oracle. TSan sees the shim's barriers (libstdc++'s
//! `std::barrier`: atomics) as synchronisation and checks happens-before, not
//! the interleaving that happened: a shared- or device-memory access that no
//! `__syncthreads()` (or shuffle barrier) orders against another thread's
//! write is reported whatever the OS did, and a report fails the test.
//! Checked by removing, one at a time, each `__syncthreads()` of
//! `bitonic_sort`, of `rank_candidates` and after the top-k loops of
//! `pk_lookup` and `pk_select_scores`: each fails the test on every run.
//!
//! What this does NOT prove: warp-synchronous behaviour and scheduling
//! (there is no lockstep warp; code that leans on implicit warp
//! synchronisation instead of `__syncwarp` or a shuffle is not modelled),
//! races in shapes or kernels not run under TSan (the large shapes run under
//! ASan only, where a missing barrier shows only when the OS's interleaving
//! exposes it), races TSan's bounded history misses (it keeps a few accesses
//! per 8 bytes: it may miss one among many threads touching one word — no
//! such miss was seen in the mutations above), the GPU memory model beyond
//! barrier placement (no weak-ordering or cache effects; the emulated
//! barrier is a full fence), NVRTC's own code generation (fused
//! multiply-adds where the kernels do not use the `_rn` intrinsics, PTX
//! `cvt` NaN payloads), the GPU's `expf` (it may differ from the C
//! library's by an ulp: weights are compared within a tolerance), register
//! or shared-memory limits of a real device, and performance.
//!
//! Needs `g++` (Debian package `g++`, with its sanitizer runtimes: ASan,
//! UBSan, TSan — libtsan2); without
//! it the tests fail, they do not skip.

use memlayer_bank::Dtype;
use memlayer_core::bag;
use memlayer_core::pkm::{self, PkmConfig, QK_NORM_EPS};
use memlayer_core::rng::Rng;
use memlayer_cuda::bag::{bag_of, reverse_index};
use memlayer_cuda::kernels;
use memlayer_cuda::lookup::{max_candidates, shared_bytes};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads per block of every launcher.
const BLOCK: u32 = 256;

/// `NO_SLOT` of bag_forward.cu: a page not resident.
const NO_SLOT: u32 = 0xffff_ffff;

/// The kernels this file launches (each through [`launch`], which refuses
/// any other): must be every kernel of [`kernels::ALL`].
const COVERED: &[&str] = &[
    "pk_norm_rows",
    "pk_lookup",
    "pk_select_scores",
    "bag_forward_f32",
    "bag_forward_f16",
    "bag_forward_bf16",
    "copy_f32x4",
    "bag_backward_table",
    "bag_backward_weights_f32",
    "bag_backward_weights_f16",
    "bag_backward_weights_bf16",
];

const SHIM: &str = include_str!("emu/cuda_emu.h");
const DRIVER: &str = include_str!("emu/driver.cpp");
const CXX_FLAGS: &[&str] = &[
    "-std=c++20",
    "-O1",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-pthread",
    "-DMEMLAYER_CUDA_EMU",
    "-g",
];

/// The sanitizer a driver is built with (the two cannot be combined).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sanitizer {
    /// AddressSanitizer + UBSan: every test.
    Address,
    /// ThreadSanitizer: the kernels with shared memory, barriers or shuffles.
    Thread,
}

impl Sanitizer {
    fn name(self) -> &'static str {
        match self {
            Sanitizer::Address => "asan",
            Sanitizer::Thread => "tsan",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Sanitizer::Address => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
            Sanitizer::Thread => &["-fsanitize=thread"],
        }
    }

    /// The driver's environment: a report fails the run.
    fn env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Sanitizer::Address => &[
                ("ASAN_OPTIONS", "detect_leaks=0"),
                ("UBSAN_OPTIONS", "print_stacktrace=1"),
            ],
            // exit code 66: a data race (or another TSan report)
            Sanitizer::Thread => &[("TSAN_OPTIONS", "halt_on_error=1 exitcode=66")],
        }
    }
}

// ---------------------------------------------------------------------------
// building the driver

/// A kernel source as the shim compiles it: the dynamic shared buffer
/// (`extern __shared__ T name[];`) becomes a pointer to the launch's block,
/// every other `__shared__` variable a static.
fn for_the_shim(src: &str) -> String {
    const DYN: &str = "extern __shared__ ";
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        if let Some(pos) = line.find(DYN) {
            let decl = line[pos + DYN.len()..].trim();
            let decl = decl
                .strip_suffix("[];")
                .unwrap_or_else(|| panic!("unexpected dynamic shared declaration: {line}"));
            let (ty, name) = decl
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("unexpected dynamic shared declaration: {line}"));
            out.push_str(&format!(
                "{}{ty}* {name} = ({ty}*)emu::dyn_smem;",
                &line[..pos]
            ));
        } else {
            out.push_str(&line.replace("__shared__", "static"));
        }
        out.push('\n');
    }
    out
}

/// FNV-1a (names the cached driver by everything it is built from).
fn fnv1a(bytes: &[u8], h: u64) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

struct Emu {
    sanitizer: Sanitizer,
    driver: PathBuf,
    work: PathBuf,
}

/// Builds the driver (once per process; cached in the temp dir by a hash of
/// its sources and flags, so an unchanged kernel is not compiled again).
fn build(sanitizer: Sanitizer) -> Result<Emu, String> {
    match Command::new("g++").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(
                "g++ not found: the emulated CUDA kernel tests compile the kernels as \
                        C++ with g++ (Debian package g++; scripts/system-deps.sh installs it)"
                    .into(),
            );
        }
    }
    let sources: Vec<(String, String)> = kernels::ALL
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("k{i}.cu"), for_the_shim(&kernels::full_source(k))))
        .collect();
    let mut inc = String::new();
    for (i, (file, _)) in sources.iter().enumerate() {
        inc.push_str(&format!(
            "namespace emu_k{i} {{\n#include \"{file}\"\n}}\nusing namespace emu_k{i};\n"
        ));
    }
    let mut h = 0xcbf2_9ce4_8422_2325;
    for part in [SHIM, DRIVER, &inc]
        .into_iter()
        .chain(sources.iter().map(|(_, s)| s.as_str()))
        .chain(CXX_FLAGS.iter().copied())
        .chain(sanitizer.flags().iter().copied())
    {
        h = fnv1a(part.as_bytes(), h);
        h = fnv1a(&[0], h);
    }
    let root = std::env::temp_dir().join("memlayer-cuda-emu");
    let dir = root.join(format!("{h:016x}"));
    let driver = dir.join("driver");
    let tag = format!("{}-{}", sanitizer.name(), std::process::id());
    // each launch works in its own `run-…` directory under `root` and
    // removes it afterwards ([`launch`]): nothing is left per process
    let work = root.clone();
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    // a driver in use is touched, so the clean-up below keeps it
    let touched = std::fs::File::options()
        .write(true)
        .open(&driver)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if touched.is_ok() && driver.is_file() {
        return Ok(Emu {
            sanitizer,
            driver,
            work,
        });
    }
    let src = root.join(format!("src-{tag}"));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(src.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    write("cuda_emu.h", SHIM)?;
    write("driver.cpp", DRIVER)?;
    write("kernels.inc", &inc)?;
    for (file, text) in &sources {
        write(file, text)?;
    }
    let tmp = src.join("driver.bin");
    let out = Command::new("g++")
        .args(CXX_FLAGS)
        .args(sanitizer.flags())
        .arg("-I")
        .arg(&src)
        .arg(src.join("driver.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("running g++: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "g++ failed to compile the kernels with the CUDA shim (sources in {}):\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // drivers unused for a day or more go (one in use is touched above)
    let day = std::time::Duration::from_secs(24 * 3600);
    for old in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let stale = std::fs::metadata(old.path().join("driver"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= day);
        let name = old.file_name();
        let is_driver_dir = name.len() == 16
            && name
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_hexdigit());
        if stale && is_driver_dir {
            let _ = std::fs::remove_dir_all(old.path());
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // atomic: a concurrent test process sees the whole driver or none
    std::fs::rename(&tmp, &driver).map_err(|e| format!("{}: {e}", driver.display()))?;
    let _ = std::fs::remove_dir_all(&src);
    Ok(Emu {
        sanitizer,
        driver,
        work,
    })
}

/// The AddressSanitizer + UBSan driver.
fn emu() -> &'static Emu {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    match EMU.get_or_init(|| build(Sanitizer::Address)) {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    }
}

/// The ThreadSanitizer driver.
fn tsan() -> &'static Emu {
    static EMU: OnceLock<Result<Emu, String>> = OnceLock::new();
    match EMU.get_or_init(|| build(Sanitizer::Thread)) {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------
// launching

/// A kernel argument.
enum Arg {
    /// A device buffer (its bytes; read back after the launch).
    Buf(Vec<u8>),
    /// A null pointer.
    Null,
    U32(u32),
    U64(u64),
    F32(f32),
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// An output buffer of `n` 4-byte elements the kernel must write whole:
/// all ones (u32::MAX, a NaN), so an element left unwritten shows.
fn garbage(n: usize) -> Arg {
    Arg::Buf(vec![0xff; 4 * n])
}

/// Blocks of [`BLOCK`] threads covering `threads` (the bag launchers' grid).
fn grid(threads: usize) -> u32 {
    u32::try_from(threads.div_ceil(BLOCK as usize).max(1)).expect("grid")
}

/// Runs `kernel` on `blocks` × `threads` with `shared` bytes of dynamic
/// shared memory → every argument's bytes after the run (empty for scalars).
fn launch(kernel: &str, blocks: u32, threads: u32, shared: usize, args: Vec<Arg>) -> Vec<Vec<u8>> {
    launch_on(emu(), kernel, blocks, threads, shared, args)
}

/// [`launch`] on the driver `emu`.
fn launch_on(
    emu: &Emu,
    kernel: &str,
    blocks: u32,
    threads: u32,
    shared: usize,
    args: Vec<Arg>,
) -> Vec<Vec<u8>> {
    assert!(
        COVERED.contains(&kernel),
        "{kernel} is not in COVERED: add it there and test it"
    );
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let dir = emu.work.join(format!(
        "run-{}-{}-{kernel}-{}",
        emu.sanitizer.name(),
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("launch dir");
    let mut desc = format!("kernel {kernel}\ngrid {blocks}\nblock {threads}\nshared {shared}\n");
    let mut files: Vec<Option<PathBuf>> = Vec::with_capacity(args.len());
    for (i, a) in args.iter().enumerate() {
        let mut file = None;
        match a {
            Arg::Buf(bytes) => {
                let f = dir.join(format!("arg{i}.bin"));
                std::fs::write(&f, bytes).expect("buffer file");
                desc.push_str(&format!("buf {}\n", f.display()));
                file = Some(f);
            }
            Arg::Null => desc.push_str("null\n"),
            Arg::U32(v) => desc.push_str(&format!("u32 {v}\n")),
            Arg::U64(v) => desc.push_str(&format!("u64 {v}\n")),
            Arg::F32(v) => desc.push_str(&format!("f32 {}\n", v.to_bits())),
        }
        files.push(file);
    }
    let launch_file = dir.join("launch.txt");
    std::fs::write(&launch_file, &desc).expect("launch file");
    let out = Command::new(&emu.driver)
        .arg(&launch_file)
        .envs(emu.sanitizer.env().iter().copied())
        .output()
        .expect("running the emulation driver");
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || err.contains("ThreadSanitizer") {
        let tail: String = err.chars().take(6000).collect();
        // the message carries the launch and the driver's report
        let _ = std::fs::remove_dir_all(&dir);
        panic!(
            "{kernel} failed in the emulator ({:?} driver, {}):\n{desc}\n{tail}",
            emu.sanitizer, out.status
        );
    }
    let bufs = files
        .iter()
        .map(|f| {
            f.as_ref()
                .map_or_else(Vec::new, |f| std::fs::read(f).expect("read back"))
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    bufs
}

/// Bit-identical (a NaN equals any NaN: payloads are not compared).
fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: [{i}] {g:e} ({:#010x}) vs the oracle's {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

// ---------------------------------------------------------------------------
// coverage

#[test]
fn every_kernel_has_an_emulated_test() {
    let all: BTreeSet<&str> = kernels::ALL
        .iter()
        .flat_map(|k| k.functions.iter().copied())
        .collect();
    let covered: BTreeSet<&str> = COVERED.iter().copied().collect();
    assert_eq!(covered.len(), COVERED.len(), "COVERED has a duplicate");
    assert_eq!(
        covered, all,
        "the emulated tests must cover exactly kernels::ALL's kernels"
    );
    // and the driver can launch each (its dispatch table)
    let out = Command::new(&emu().driver)
        .arg("--list")
        .output()
        .expect("driver --list");
    let listed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let all: BTreeSet<String> = all.into_iter().map(str::to_string).collect();
    assert_eq!(listed, all, "tests/emu/driver.cpp's KERNELS table");
}

#[test]
fn shim_processing_rewrites_shared_declarations() {
    let src = "    extern __shared__ unsigned char smem[];\n    __shared__ u32 n;\n";
    assert_eq!(
        for_the_shim(src),
        "    unsigned char* smem = (unsigned char*)emu::dyn_smem;\n    static u32 n;\n"
    );
}

// ---------------------------------------------------------------------------
// product-key lookup

fn config(n_keys: usize, knn: usize, heads: usize, k_dim: usize, qk_norm: bool) -> PkmConfig {
    PkmConfig {
        n_keys,
        knn,
        heads,
        k_dim,
        qk_norm,
        ..PkmConfig::paper()
    }
}

/// The oracle's RMS normalisation of one row (memlayer_core::pkm's private
/// `rms_normalise`, the same expression).
fn rms_normalise(v: &[f32]) -> Vec<f32> {
    let ms = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    let inv = 1.0 / (ms + QK_NORM_EPS).sqrt();
    v.iter().map(|x| x * inv).collect()
}

struct Emulated {
    indices: Vec<u32>,
    scores: Vec<f32>,
    weights: Vec<f32>,
}

/// `lookup::LookupBuffers::upload` + `run` + `read`, emulated.
fn emulate_lookup(
    emu: &Emu,
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
) -> Emulated {
    let half = cfg.half();
    let keys = if cfg.qk_norm {
        let rows = cfg.heads * 2 * cfg.n_keys;
        let out = launch_on(
            emu,
            "pk_norm_rows",
            grid(rows),
            BLOCK,
            0,
            vec![
                Arg::Buf(f32_bytes(keys)),
                Arg::U32(rows as u32),
                Arg::U32(half as u32),
                Arg::F32(QK_NORM_EPS),
                garbage(keys.len()),
            ],
        );
        let scored = f32s(&out[4]);
        let want: Vec<f32> = keys.chunks_exact(half).flat_map(rms_normalise).collect();
        same_bits("pk_norm_rows", &scored, &want);
        scored
    } else {
        keys.to_vec()
    };
    let groups = tokens * cfg.heads;
    let n = groups * cfg.knn;
    if groups == 0 {
        return Emulated {
            indices: Vec::new(),
            scores: Vec::new(),
            weights: Vec::new(),
        };
    }
    let shared = shared_bytes(cfg).expect("fits the shared memory");
    let out = launch_on(
        emu,
        "pk_lookup",
        groups as u32,
        BLOCK,
        shared,
        vec![
            Arg::Buf(f32_bytes(&keys)),
            Arg::Buf(f32_bytes(query)),
            Arg::U32(cfg.heads as u32),
            Arg::U32(cfg.n_keys as u32),
            Arg::U32(half as u32),
            Arg::U32(cfg.knn as u32),
            Arg::U32(u32::from(cfg.qk_norm)),
            Arg::F32(QK_NORM_EPS),
            Arg::F32(cfg.score_scale()),
            Arg::U32(cfg.n_keys.next_power_of_two() as u32),
            Arg::U32(max_candidates(cfg.knn) as u32),
            garbage(n),
            garbage(n),
            garbage(n),
        ],
    );
    Emulated {
        indices: u32s(&out[11]),
        scores: f32s(&out[12]),
        weights: f32s(&out[13]),
    }
}

fn check_lookup(cfg: &PkmConfig, keys: &[f32], query: &[f32], tokens: usize, what: &str) {
    check_lookup_on(emu(), cfg, keys, query, tokens, what);
}

/// [`check_lookup`] on the driver `emu`.
fn check_lookup_on(
    emu: &Emu,
    cfg: &PkmConfig,
    keys: &[f32],
    query: &[f32],
    tokens: usize,
    what: &str,
) {
    let got = emulate_lookup(emu, cfg, keys, query, tokens);
    let want = pkm::lookup(cfg, keys, query, tokens).expect("oracle");
    assert_eq!(got.indices, want.indices, "{what}: indices");
    same_bits(&format!("{what}: scores"), &got.scores, &want.scores);
    assert_eq!(got.weights.len(), want.weights.len(), "{what}: weights");
    for (i, (g, w)) in got.weights.iter().zip(&want.weights).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 + 1e-5 * w.abs() || (g.is_nan() && w.is_nan()),
            "{what}: weight [{i}] {g} vs {w}"
        );
    }
}

#[test]
fn pk_norm_rows_and_pk_lookup_equal_the_oracle() {
    // (n_keys, knn, heads, k_dim, qk_norm, tokens): k = n_keys (every
    // candidate), k = 1, one sub-key, non-power-of-two n_keys, k above the
    // block's threads, the runner's shapes (few tokens: a block is 256
    // OS threads here)
    for (i, &(n, k, h, kd, qk, t)) in [
        (5, 5, 1, 8, false, 3),
        (12, 4, 2, 16, true, 7),
        (100, 1, 3, 6, true, 5),
        (1, 1, 2, 2, true, 2),
        (33, 33, 1, 4, false, 2),
        (300, 260, 1, 6, true, 1),
        (256, 32, 4, 128, true, 2),
        (1024, 16, 2, 64, false, 2),
        (4096, 32, 4, 256, true, 1),
    ]
    .iter()
    .enumerate()
    {
        let cfg = config(n, k, h, kd, qk);
        let (keys, query) = pkm::random_lookup_inputs(&cfg, t, 40 + i as u64);
        check_lookup(&cfg, &keys, &query, t, &format!("n_keys {n}, k {k}"));
    }
    // ties: every sub-key equal (all scores tie: rows by id)
    let cfg = config(16, 6, 2, 8, false);
    let keys = vec![0.25; 2 * 2 * 16 * 4];
    let query = vec![1.0; 3 * 2 * 8];
    check_lookup(&cfg, &keys, &query, 3, "all scores tied");
    // few distinct scores: ties between different (s1, s2) splits
    let mut rng = Rng::new(7);
    let keys: Vec<f32> = (0..2 * 2 * 16 * 4)
        .map(|_| rng.below(3) as f32 * 0.5)
        .collect();
    check_lookup(&cfg, &keys, &query, 3, "few distinct scores");
    // -0.0 against +0.0
    let keys: Vec<f32> = (0..2 * 2 * 16 * 4)
        .map(|i| if i % 3 == 0 { -0.0 } else { 0.0 })
        .collect();
    check_lookup(&cfg, &keys, &query, 3, "signed zeros");
    // a NaN in a query (NaN ranks last), with and without qk-norm
    for qk in [false, true] {
        let cfg = config(16, 6, 2, 8, qk);
        let (keys, mut query) = pkm::random_lookup_inputs(&cfg, 2, 9);
        query[0] = f32::NAN;
        query[8 + 5] = f32::NAN;
        check_lookup(
            &cfg,
            &keys,
            &query,
            2,
            &format!("a NaN query, qk_norm {qk}"),
        );
        // infinite queries: ±inf and NaN scores
        query[2] = f32::INFINITY;
        query[16 + 6] = f32::NEG_INFINITY;
        check_lookup(
            &cfg,
            &keys,
            &query,
            2,
            &format!("infinite queries, qk_norm {qk}"),
        );
    }
    // no tokens: no launch, nothing to compare but the oracle's emptiness
    let cfg = config(16, 6, 2, 8, true);
    let (keys, _) = pkm::random_lookup_inputs(&cfg, 0, 9);
    check_lookup(&cfg, &keys, &[], 0, "no tokens");
}

/// `pk_select_scores`' shared memory, as its launcher sizes it.
fn select_shared_bytes(n_keys: usize, k: usize) -> usize {
    memlayer_cuda::lookup::select_shared_bytes(n_keys, k).expect("fits a block")
}

fn check_select(scores: &[f32], n_keys: usize, k: usize, what: &str) {
    check_select_on(emu(), scores, n_keys, k, what);
}

/// [`check_select`] on the driver `emu`.
fn check_select_on(emu: &Emu, scores: &[f32], n_keys: usize, k: usize, what: &str) {
    let groups = scores.len() / (2 * n_keys);
    assert!(groups > 0, "{what}: no groups");
    let pairs = pkm::select_from_scores(scores, n_keys, k).expect("oracle");
    let mut rows = Vec::with_capacity(groups * k);
    let mut sums = Vec::with_capacity(groups * k);
    for (i, p) in pairs.chunks_exact(2).enumerate() {
        let g = i / k;
        let (i1, i2) = (p[0] as usize, p[1] as usize);
        rows.push((i1 * n_keys + i2) as u32);
        let s = &scores[g * 2 * n_keys..];
        sums.push(s[i1] + s[n_keys + i2]);
    }
    let out = launch_on(
        emu,
        "pk_select_scores",
        groups as u32,
        BLOCK,
        select_shared_bytes(n_keys, k),
        vec![
            Arg::Buf(f32_bytes(scores)),
            Arg::U32(n_keys as u32),
            Arg::U32(k as u32),
            Arg::U32(n_keys.next_power_of_two() as u32),
            Arg::U32(max_candidates(k) as u32),
            garbage(groups * k),
            garbage(groups * k),
        ],
    );
    assert_eq!(u32s(&out[5]), rows, "{what}: rows");
    same_bits(&format!("{what}: scores"), &f32s(&out[6]), &sums);
}

#[test]
fn pk_select_scores_equals_the_oracle() {
    let mut rng = Rng::new(11);
    // (n_keys, k, groups): k = n_keys, k = 1, one sub-key, non-power-of-two
    // n_keys, k above the block's threads, the runner's shapes
    for &(n, k, g) in &[
        (5, 5, 3),
        (12, 4, 5),
        (100, 1, 4),
        (1, 1, 2),
        (33, 33, 2),
        (300, 260, 1),
        (256, 32, 4),
        (1024, 16, 2),
        (4096, 32, 1),
    ] {
        let scores = rng.normal_vec(g * 2 * n, 0.0, 1.0);
        check_select(&scores, n, k, &format!("random, n_keys {n}, k {k}"));
    }
    let (n, k, g) = (24, 7, 3);
    check_select(&vec![0.5; g * 2 * n], n, k, "all scores equal");
    let few: Vec<f32> = (0..g * 2 * n).map(|_| rng.below(3) as f32).collect();
    check_select(&few, n, k, "three distinct scores (ties everywhere)");
    let zeros: Vec<f32> = (0..g * 2 * n)
        .map(|_| if rng.below(2) == 0 { -0.0 } else { 0.0 })
        .collect();
    check_select(&zeros, n, k, "signed zeros");
    let mut odd = rng.normal_vec(g * 2 * n, 0.0, 1.0);
    for (i, v) in odd.iter_mut().enumerate() {
        *v = match i % 7 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => -0.0,
            _ => *v,
        };
    }
    check_select(&odd, n, k, "NaN, ±inf and -0.0 scores");
    let mut nan_half = rng.normal_vec(g * 2 * n, 0.0, 1.0);
    nan_half[..n].fill(f32::NAN);
    check_select(&nan_half, n, n, "a half all NaN, k = n_keys");
    // sums that round together: equal scores from different (s1, s2)
    let close: Vec<f32> = (0..g * 2 * n)
        .map(|_| 1.0e8 + rng.below(8) as f32 * 2.0)
        .collect();
    check_select(&close, n, k, "sums equal after rounding");
}

// ---------------------------------------------------------------------------
// embedding-bag

/// A random batch: `bags` bags of 0..=max entries (empty bags included),
/// indices drawn from a few hot rows and the whole table (repeats) — the
/// batch of src/bag.rs's tests.
fn batch(rows: usize, bags: usize, max: usize, seed: u64) -> (Vec<u32>, Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut offsets = vec![0];
    let (mut idx, mut w) = (Vec::new(), Vec::new());
    for b in 0..bags {
        let n = if b % 5 == 3 {
            0
        } else {
            rng.below(max as u64 + 1) as usize
        };
        for _ in 0..n {
            let r = if rng.below(3) == 0 {
                rng.below(4.min(rows as u64))
            } else {
                rng.below(rows as u64)
            };
            idx.push(r as u32);
            w.push(rng.normal());
        }
        offsets.push(idx.len());
    }
    (idx, w, offsets)
}

fn forward_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "bag_forward_f32",
        Dtype::F16 => "bag_forward_f16",
        Dtype::Bf16 => "bag_forward_bf16",
    }
}

fn weights_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "bag_backward_weights_f32",
        Dtype::F16 => "bag_backward_weights_f16",
        Dtype::Bf16 => "bag_backward_weights_bf16",
    }
}

/// A table (or the slots of a paged pool) on the "device".
struct Table {
    dtype: Dtype,
    /// Stored bytes (`memlayer_bank::encode`).
    data: Vec<u8>,
    rows: usize,
    dim: usize,
}

/// `bag::launch_bag`, emulated: (page table, rows per page) when paged.
fn emulate_forward(
    t: &Table,
    paging: Option<(&[u32], usize)>,
    idx: &[u32],
    w: &[f32],
    off: &[usize],
) -> Vec<f32> {
    let bags = off.len() - 1;
    if bags == 0 {
        return Vec::new();
    }
    let (table_arg, pages, page_rows) = match paging {
        Some((pt, pr)) => (Arg::Buf(u32_bytes(pt)), pt.len() as u32, pr as u32),
        None => (Arg::Null, 0, 1),
    };
    let offsets: Vec<u32> = off.iter().map(|&o| o as u32).collect();
    let out = launch(
        forward_kernel(t.dtype),
        grid(bags * t.dim.div_ceil(4)),
        BLOCK,
        0,
        vec![
            Arg::Buf(t.data.clone()),
            Arg::U32(t.rows as u32),
            Arg::U32(t.dim as u32),
            table_arg,
            Arg::U32(pages),
            Arg::U32(page_rows),
            Arg::Buf(u32_bytes(idx)),
            Arg::Buf(f32_bytes(w)),
            Arg::Buf(u32_bytes(&offsets)),
            Arg::U32(bags as u32),
            garbage(bags * t.dim),
        ],
    );
    f32s(&out[10])
}

/// `bag::bag_backward_table`, emulated, with `dense` 0 (the sparse rows'
/// gradients, (segments, dim)) or 1 (into a zeroed (rows, dim) gradient).
fn emulate_backward_table(
    (rows, dim): (usize, usize),
    idx: &[u32],
    w: &[f32],
    off: &[usize],
    grad: &[f32],
    dense: bool,
) -> Option<(Vec<u32>, Vec<f32>)> {
    let (order, starts, seg_rows) = reverse_index(idx);
    let segments = seg_rows.len();
    if segments == 0 {
        return None;
    }
    let out = if dense {
        Arg::Buf(vec![0; 4 * rows * dim])
    } else {
        garbage(segments * dim)
    };
    let got = launch(
        "bag_backward_table",
        grid(segments * dim.div_ceil(4)),
        BLOCK,
        0,
        vec![
            Arg::U32(dim as u32),
            Arg::Buf(u32_bytes(&order)),
            Arg::Buf(u32_bytes(&starts)),
            Arg::Buf(u32_bytes(&seg_rows)),
            Arg::U32(segments as u32),
            Arg::Buf(u32_bytes(&bag_of(off))),
            Arg::Buf(f32_bytes(w)),
            Arg::Buf(f32_bytes(grad)),
            Arg::U32(u32::from(dense)),
            out,
        ],
    );
    Some((seg_rows, f32s(&got[9])))
}

/// `bag::bag_backward_weights`, emulated.
fn emulate_backward_weights(
    emu: &Emu,
    t: &Table,
    idx: &[u32],
    off: &[usize],
    grad: &[f32],
) -> Vec<f32> {
    let nnz = idx.len();
    if nnz == 0 {
        return Vec::new();
    }
    let out = launch_on(
        emu,
        weights_kernel(t.dtype),
        grid(nnz * 32),
        BLOCK,
        0,
        vec![
            Arg::Buf(t.data.clone()),
            Arg::U32(t.rows as u32),
            Arg::U32(t.dim as u32),
            Arg::Buf(u32_bytes(idx)),
            Arg::Buf(u32_bytes(&bag_of(off))),
            Arg::U32(nnz as u32),
            Arg::Buf(f32_bytes(grad)),
            garbage(nnz),
        ],
    );
    f32s(&out[7])
}

/// [`emulate_backward_weights`] against the oracle over the stored `values`
/// (the shuffle tree's order: within f32 rounding).
fn check_backward_weights(
    emu: &Emu,
    t: &Table,
    values: &[f32],
    (idx, off): (&[u32], &[usize]),
    grad: &[f32],
    what: &str,
) {
    let got = emulate_backward_weights(emu, t, idx, off, grad);
    let want = bag::bag_backward_weights(values, t.rows, t.dim, idx, off, grad).expect("oracle");
    assert_eq!(got.len(), want.len(), "{what}: dweights");
    for (e, (g, o)) in got.iter().zip(&want).enumerate() {
        let tol = 1e-5 * (1.0 + o.abs()) * (t.dim as f32).sqrt();
        assert!((g - o).abs() <= tol, "{what}: dweights[{e}] {g} vs {o}");
    }
}

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

/// `values` as stored in `dtype`, widened back (what the oracle reads).
fn stored(dtype: Dtype, values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| memlayer_bank::round_trip(dtype, v))
        .collect()
}

/// (rows, dim, bags, most entries per bag) of the bag tests: dims not a
/// multiple of 4, small, the runner's; rows with repeats and empty bags; a
/// batch of empty bags only.
const BAG_SHAPES: &[(usize, usize, usize, usize)] = &[
    (7, 3, 9, 5),
    (300, 64, 40, 33),
    (1000, 257, 17, 24),
    (4096, 256, 24, 20),
    (5, 6, 4, 0),
];

#[test]
fn bag_forward_and_weight_gradient_equal_the_oracle_for_every_dtype() {
    for &(rows, dim, n_bags, max) in BAG_SHAPES {
        let mut rng = Rng::new(rows as u64);
        let table: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
        let (idx, w, off) = batch(rows, n_bags, max, dim as u64);
        let grad: Vec<f32> = (0..n_bags * dim).map(|_| rng.normal()).collect();
        for dtype in DTYPES {
            let what = format!(
                "{rows}×{dim} {dtype:?}, {n_bags} bags, {} entries",
                idx.len()
            );
            let values = stored(dtype, &table);
            let t = Table {
                dtype,
                data: memlayer_bank::encode(dtype, &table),
                rows,
                dim,
            };
            let got = emulate_forward(&t, None, &idx, &w, &off);
            let want = bag::bag_forward(&values, rows, dim, &idx, &w, &off).expect("oracle");
            same_bits(&format!("{what}: forward"), &got, &want);
            check_backward_weights(emu(), &t, &values, (&idx, &off), &grad, &what);
        }
    }
}

#[test]
fn every_f16_and_bf16_bit_pattern_widens_exactly() {
    // all 65536 patterns as one row (4-wide loads) and as 3 rows of 21845
    // (one value at a time): the bag of row r with weight 1 is row r
    let patterns: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    for dtype in [Dtype::F16, Dtype::Bf16] {
        let values = memlayer_bank::decode(dtype, &patterns).expect("decode");
        for (rows, dim) in [(1, 65536), (3, 21845)] {
            let n = rows * dim;
            let t = Table {
                dtype,
                data: patterns[..2 * n].to_vec(),
                rows,
                dim,
            };
            let idx: Vec<u32> = (0..rows as u32).collect();
            let w = vec![1.0; rows];
            let off: Vec<usize> = (0..=rows).collect();
            let got = emulate_forward(&t, None, &idx, &w, &off);
            let want = bag::bag_forward(&values[..n], rows, dim, &idx, &w, &off).expect("oracle");
            same_bits(&format!("{dtype:?} patterns, {rows}×{dim}"), &got, &want);
        }
    }
}

/// The kernels' own guard (the host refuses such batches before launching):
/// a row at or past the table's end is skipped by the forward and has a zero
/// weight gradient.
#[test]
fn rows_outside_the_table_are_skipped() {
    let (rows, dim) = (9, 8);
    let mut rng = Rng::new(23);
    let table: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
    let idx = [3, rows as u32, 0, rows as u32 + 5, u32::MAX, 8];
    let w = [0.5, 1.0, -2.0, 1.0, 1.0, 0.25];
    let off = [0, 3, 3, 6];
    let kept = [true, false, true, false, false, true];
    let grad: Vec<f32> = (0..3 * dim).map(|_| rng.normal()).collect();
    for dtype in DTYPES {
        let values = stored(dtype, &table);
        let t = Table {
            dtype,
            data: memlayer_bank::encode(dtype, &table),
            rows,
            dim,
        };
        let got = emulate_forward(&t, None, &idx, &w, &off);
        let kept_w: Vec<f32> = w
            .iter()
            .zip(kept)
            .map(|(&w, k)| if k { w } else { 0.0 })
            .collect();
        let kept_idx: Vec<u32> = idx
            .iter()
            .zip(kept)
            .map(|(&r, k)| if k { r } else { 0 })
            .collect();
        // a zero weight adds +0.0 to a sum that is never -0.0: the same bits
        let want = bag::bag_forward(&values, rows, dim, &kept_idx, &kept_w, &off).expect("oracle");
        same_bits(&format!("{dtype:?}: forward"), &got, &want);
        let got = emulate_backward_weights(emu(), &t, &idx, &off, &grad);
        for (e, &k) in kept.iter().enumerate() {
            if !k {
                assert_eq!(
                    got[e].to_bits(),
                    0,
                    "{dtype:?}: dweights[{e}] of a row outside"
                );
            }
        }
    }
}

#[test]
fn paged_bag_through_slots_equals_the_bag_over_the_resident_rows() {
    for (dim, seed) in [(12, 3), (5, 4)] {
        let (rows, page_rows): (usize, usize) = (103, 8);
        let pages = rows.div_ceil(page_rows);
        let mut rng = Rng::new(5);
        let table: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
        let (idx, w, off) = batch(rows, 20, 9, seed);
        // page 5 not resident; the page table stops before the last page
        let missing = 5;
        let listed = pages - 1;
        for dtype in DTYPES {
            let what = format!("paged {dtype:?}, dim {dim}");
            let values = stored(dtype, &table);
            // pages in reversed slots; page 5's slot holds NaN garbage
            let slot_len = page_rows * dim;
            let mut slots = vec![f32::NAN; pages * slot_len];
            let mut page_table = vec![0u32; listed];
            for (p, entry) in page_table.iter_mut().enumerate() {
                let slot = pages - 1 - p;
                if p == missing {
                    *entry = NO_SLOT;
                    continue;
                }
                let end = ((p + 1) * page_rows).min(rows);
                let src = &table[p * page_rows * dim..end * dim];
                slots[slot * slot_len..][..src.len()].copy_from_slice(src);
                *entry = slot as u32;
            }
            let t = Table {
                dtype,
                data: memlayer_bank::encode(dtype, &slots),
                rows,
                dim,
            };
            let got = emulate_forward(&t, Some((&page_table, page_rows)), &idx, &w, &off);
            // the oracle over the entries whose page is resident
            let (mut kept_idx, mut kept_w, mut kept_off) = (Vec::new(), Vec::new(), vec![0]);
            for b in off.windows(2) {
                for e in b[0]..b[1] {
                    let p = idx[e] as usize / page_rows;
                    if p != missing && p < listed {
                        kept_idx.push(idx[e]);
                        kept_w.push(w[e]);
                    }
                }
                kept_off.push(kept_idx.len());
            }
            assert!(kept_idx.len() < idx.len(), "{what}: some entries skipped");
            let want = bag::bag_forward(&values, rows, dim, &kept_idx, &kept_w, &kept_off)
                .expect("oracle");
            same_bits(&what, &got, &want);
            // every page resident, in reversed slots: the whole table's bag
            let all: Vec<u32> = (0..pages).map(|p| (pages - 1 - p) as u32).collect();
            let mut full = vec![0.0; pages * slot_len];
            for p in 0..pages {
                let end = ((p + 1) * page_rows).min(rows);
                let src = &table[p * page_rows * dim..end * dim];
                full[all[p] as usize * slot_len..][..src.len()].copy_from_slice(src);
            }
            let t = Table {
                data: memlayer_bank::encode(dtype, &full),
                ..t
            };
            let got = emulate_forward(&t, Some((&all, page_rows)), &idx, &w, &off);
            let want = bag::bag_forward(&values, rows, dim, &idx, &w, &off).expect("oracle");
            same_bits(&format!("{what}, every page resident"), &got, &want);
        }
    }
}

#[test]
fn bag_backward_table_equals_the_oracle_sparse_and_dense() {
    for &(rows, dim, n_bags, max) in BAG_SHAPES {
        let mut rng = Rng::new(rows as u64 + 1);
        let (idx, w, off) = batch(rows, n_bags, max, dim as u64 + 1);
        let grad: Vec<f32> = (0..n_bags * dim).map(|_| rng.normal()).collect();
        let what = format!("{rows}×{dim}, {n_bags} bags, {} entries", idx.len());
        let want = bag::bag_backward_table(rows, dim, &idx, &w, &off, &grad).expect("oracle");
        match emulate_backward_table((rows, dim), &idx, &w, &off, &grad, false) {
            None => assert!(want.rows.is_empty(), "{what}: no segments"),
            Some((seg_rows, grads)) => {
                assert_eq!(seg_rows, want.rows, "{what}: rows");
                same_bits(&format!("{what}: sparse gradient"), &grads, &want.grads);
            }
        }
        if let Some((_, dense)) = emulate_backward_table((rows, dim), &idx, &w, &off, &grad, true) {
            same_bits(
                &format!("{what}: dense gradient"),
                &dense,
                &want.to_dense(rows),
            );
        }
    }
}

#[test]
fn copy_f32x4_copies_every_float() {
    let mut rng = Rng::new(17);
    // the launcher's grid (one thread per float4), and a grid-stride loop
    for (n4, blocks) in [(1000usize, None), (1000, Some(1)), (3, None)] {
        let input: Vec<u8> = (0..n4 * 16).map(|_| rng.below(256) as u8).collect();
        let blocks = blocks.unwrap_or_else(|| grid(n4));
        let out = launch(
            "copy_f32x4",
            blocks,
            BLOCK,
            0,
            vec![
                Arg::Buf(input.clone()),
                garbage(n4 * 4),
                Arg::U64(n4 as u64),
            ],
        );
        assert_eq!(out[1], input, "copy of {n4} float4 on {blocks} blocks");
        assert_eq!(out[0], input, "the input is left alone");
    }
}

/// The emulator's own plumbing: a launch that reads past its shared memory
/// is caught (this is what makes a too-small shared-memory formula fail).
#[test]
fn a_shared_memory_size_too_small_is_caught() {
    let (n, k, g) = (64, 8, 1);
    let scores = vec![1.0f32; g * 2 * n];
    let args = vec![
        Arg::Buf(f32_bytes(&scores)),
        Arg::U32(n as u32),
        Arg::U32(k as u32),
        Arg::U32(n as u32),
        Arg::U32(max_candidates(k) as u32),
        garbage(g * k),
        garbage(g * k),
    ];
    let short = select_shared_bytes(n, k) - 4;
    let caught = std::panic::catch_unwind(|| launch("pk_select_scores", 1, BLOCK, short, args));
    assert!(
        caught.is_err(),
        "a 4-byte shortfall of shared memory went unnoticed"
    );
}

// ---------------------------------------------------------------------------
// ThreadSanitizer

/// The kernels with shared memory and barriers (`pk_lookup` with and without
/// qk-norm, `pk_select_scores`) and the warp shuffle
/// (`bag_backward_weights_*`) on the ThreadSanitizer driver, on small grids
/// (1–3 blocks: TSan is slow), against the oracle. TSan sees the shim's
/// barriers as synchronisation, so an access to shared (or device) memory
/// that no `__syncthreads()` orders against another thread's write is a
/// data race whatever the OS's interleaving: the driver exits with 66 and
/// the test fails with TSan's report.
#[test]
fn barriers_order_every_shared_access_under_thread_sanitizer() {
    let emu = tsan();
    // (n_keys, knn, heads, k_dim, qk_norm, tokens): several keys per thread
    // (next_pow2(300) = 512 sort keys on 256 threads), few keys, k = n_keys
    for (i, &(n, k, h, kd, qk, t)) in [
        (12, 4, 2, 16, false, 1),
        (40, 6, 1, 8, true, 3),
        (300, 9, 1, 6, true, 1),
        (7, 7, 1, 4, false, 2),
    ]
    .iter()
    .enumerate()
    {
        let cfg = config(n, k, h, kd, qk);
        assert!(t * h <= 3, "a small grid");
        let (keys, query) = pkm::random_lookup_inputs(&cfg, t, 60 + i as u64);
        let what = format!("tsan: n_keys {n}, k {k}, qk_norm {qk}");
        check_lookup_on(emu, &cfg, &keys, &query, t, &what);
    }
    let mut rng = Rng::new(13);
    for &(n, k, g) in &[(12, 4, 3), (300, 9, 1), (7, 7, 2)] {
        let scores = rng.normal_vec(g * 2 * n, 0.0, 1.0);
        check_select_on(emu, &scores, n, k, &format!("tsan: n_keys {n}, k {k}"));
    }
    // 20 entries: 20 warps on 3 blocks (the last partly idle); dim 40: lanes
    // loop over columns, some lanes past dim
    let (rows, dim) = (30, 40);
    let mut rng = Rng::new(19);
    let table: Vec<f32> = (0..rows * dim).map(|_| rng.normal()).collect();
    let idx: Vec<u32> = (0..20).map(|_| rng.below(rows as u64) as u32).collect();
    let off = [0, 3, 3, 11, 20];
    let grad: Vec<f32> = (0..4 * dim).map(|_| rng.normal()).collect();
    assert_eq!(grid(idx.len() * 32), 3, "a small grid");
    for dtype in DTYPES {
        let t = Table {
            dtype,
            data: memlayer_bank::encode(dtype, &table),
            rows,
            dim,
        };
        let values = stored(dtype, &table);
        let what = format!("tsan: {dtype:?} weight gradient");
        check_backward_weights(emu, &t, &values, (&idx, &off), &grad, &what);
    }
}
