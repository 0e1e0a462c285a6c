//! Memory bandwidth probes: what a gather of table rows should be compared with.
//!
//! [`copy_bandwidth`] times `memcpy` of a large buffer split across the
//! current pool's threads and reports **bytes read** (= bytes copied) per
//! second: a copy reads N bytes and writes N bytes, and the figure counts N
//! once. An embedding-bag reads table rows and writes a small output, so its
//! "gathered row bytes per second" is directly comparable with this number.
//! [`read_bandwidth`] (sum of a buffer on transparent huge pages, as the tables
//! are; no writes) is the ceiling for pure reads: what a gather is held to.

use rayon::prelude::*;
use std::time::Instant;

/// One bandwidth measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bandwidth {
    /// Decimal gigabytes per second (1e9 bytes/s) of bytes read.
    pub gbps: f64,
    /// Bytes read per run.
    pub bytes: usize,
    /// Best (shortest) run, seconds.
    pub seconds: f64,
    /// Threads that ran the copy.
    pub threads: usize,
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Copies a `bytes`-byte buffer into another (`memcpy` per thread over
/// contiguous parts, current rayon pool), best of `runs` after one warm-up
/// copy that also faults the pages in. Counts bytes read (= bytes copied).
pub fn copy_bandwidth(bytes: usize, runs: usize) -> Bandwidth {
    let threads = rayon::current_num_threads();
    let words = bytes / 8;
    let src = crate::alloc::LargeBuf::<u64>::filled(words, 0x5a5a_5a5a_5a5a_5a5a, false);
    let mut dst = crate::alloc::LargeBuf::<u64>::filled(words, 0, false);
    let part = words.div_ceil(threads).max(1);
    let mut copy = || {
        dst.par_chunks_mut(part)
            .zip(src.par_chunks(part))
            .for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy();
    let seconds = best_of(runs, copy);
    std::hint::black_box(&dst[words / 2]);
    Bandwidth {
        gbps: (words * 8) as f64 / seconds / 1e9,
        bytes: words * 8,
        seconds,
        threads,
    }
}

/// Reads a `bytes`-byte buffer (wrapping sum of u64 words per thread over
/// contiguous parts, current rayon pool), best of `runs` after one warm-up read.
/// Counts bytes read; nothing is written, so this is the ceiling of a gather
/// (an embedding-bag reads its rows and writes a small output), while
/// [`copy_bandwidth`] also pays a write (and its read-for-ownership) per byte.
pub fn read_bandwidth(bytes: usize, runs: usize) -> Bandwidth {
    let threads = rayon::current_num_threads();
    let words = bytes / 8;
    let src = crate::alloc::LargeBuf::<u64>::filled(words, 3, true);
    let part = words.div_ceil(threads).max(1);
    let read = || {
        let s: u64 = src
            .par_chunks(part)
            .map(|c| {
                let mut lanes = [0u64; 8];
                for ch in c.chunks_exact(8) {
                    for l in 0..8 {
                        lanes[l] = lanes[l].wrapping_add(ch[l]);
                    }
                }
                lanes.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
    };
    read();
    let seconds = best_of(runs, read);
    Bandwidth {
        gbps: (words * 8) as f64 / seconds / 1e9,
        bytes: words * 8,
        seconds,
        threads,
    }
}
