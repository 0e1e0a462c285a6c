//! Embedding-bag, sum mode with per-sample weights: forward (dense or paged
//! table, f32/f16/bf16 storage), sparse table gradient and per-sample-weight
//! gradient. Same contract as [`memlayer_core::bag`] (CSR `offsets` of len
//! `bags + 1`, empty bags give zero rows).
//!
//! **Bit-exactness.** The forward sums each bag's entries in order with a
//! separate multiply and add per element (`acc = acc + w * row[d]`, no FMA),
//! exactly like the oracle, so its output is bit-identical to
//! [`memlayer_core::bag::bag_forward`] on the widened table, for every thread
//! count and kernel. The table gradient sums each row's contributions in
//! ascending entry position, also bit-identical. Only the per-sample-weight
//! gradient (a dot product per entry) uses lane-parallel partial sums and so
//! differs from the oracle's sequential dot by rounding.
//!
//! Parallelism: bags are split into contiguous chunks run by the current
//! rayon pool (use [`crate::Cpu`] to pick the thread count).

use crate::error::{CpuError, check_len};
use crate::simd::{Kernel, kernel};
use crate::storage::{AnyDtype, Rows, Storage, Table};
use memlayer_core::bag::SparseRows;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// Checks CSR offsets against `nnz` entries and returns the number of bags.
pub fn check_offsets(nnz: usize, offsets: &[usize]) -> Result<usize, CpuError> {
    let bags = offsets
        .len()
        .checked_sub(1)
        .ok_or_else(|| CpuError::Offsets("offsets must have bags + 1 entries".into()))?;
    if offsets[0] != 0 || offsets[bags] != nnz {
        return Err(CpuError::Offsets(format!(
            "offsets must start at 0 and end at {nnz} (got {} .. {})",
            offsets[0], offsets[bags]
        )));
    }
    if offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(CpuError::Offsets("offsets must be non-decreasing".into()));
    }
    Ok(bags)
}

/// Bags per parallel task: about 8 tasks per thread, at least one bag.
fn chunk_bags(bags: usize) -> usize {
    bags.div_ceil(rayon::current_num_threads() * 8).max(1)
}

/// Splits `per_entry` (one element per entry) at the bag chunks of
/// [`chunk_bags`]: `(first bag, end bag, the chunk's entries)` per chunk.
fn split_by_bag_chunks<'a, T>(
    per_entry: &'a mut [T],
    offsets: &[usize],
    bags: usize,
) -> Vec<(usize, usize, &'a mut [T])> {
    let chunk = chunk_bags(bags);
    let mut parts = Vec::new();
    let mut rest = per_entry;
    for c in 0..bags.div_ceil(chunk) {
        let (b0, b1) = (c * chunk, ((c + 1) * chunk).min(bags));
        let (head, tail) = rest.split_at_mut(offsets[b1] - offsets[b0]);
        parts.push((b0, b1, head));
        rest = tail;
    }
    parts
}

/// Forward: `out[b] = Σ_{e in bag b} weights[e] * table[indices[e]]`.
///
/// table: (rows, dim) (any [`Rows`]: dense or paged, f32/f16/bf16);
/// indices, weights: (nnz); offsets: (bags + 1); out: (bags, dim), overwritten.
pub fn bag_forward<R: Rows>(
    table: &R,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
    out: &mut [f32],
) -> Result<(), CpuError> {
    check_len("per_sample_weights", weights.len(), indices.len())?;
    let bags = check_offsets(indices.len(), offsets)?;
    let dim = table.dim();
    check_len("out", out.len(), bags * dim)?;
    table.check_indices(indices)?;
    if dim == 0 || bags == 0 {
        return Ok(());
    }
    let k = kernel();
    let chunk = chunk_bags(bags);
    out.par_chunks_mut(chunk * dim)
        .enumerate()
        .for_each(|(c, o)| {
            let b0 = c * chunk;
            let b1 = (b0 + chunk).min(bags);
            // SAFETY: indices were checked against the table; offsets are valid CSR
            // offsets into indices/weights; o holds (b1 - b0) rows of dim.
            unsafe { forward_range(table, k, indices, weights, &offsets[b0..=b1], o) }
        });
    Ok(())
}

/// [`bag_forward`] on a table of runtime dtype, dense ([`TableRef`](crate::TableRef)) or
/// paged ([`PagedTableRef`](crate::PagedTableRef)). out: (bags, dim)
pub fn bag_forward_any<A: Rows, B: Rows, C: Rows>(
    table: AnyDtype<A, B, C>,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
    out: &mut [f32],
) -> Result<(), CpuError> {
    match table {
        AnyDtype::F32(t) => bag_forward(&t, indices, weights, offsets, out),
        AnyDtype::F16(t) => bag_forward(&t, indices, weights, offsets, out),
        AnyDtype::Bf16(t) => bag_forward(&t, indices, weights, offsets, out),
    }
}

/// Sums the bags delimited by `offs` (absolute positions into `indices`) into `out`.
///
/// # Safety
/// Every index in `indices[offs[0]..offs[last]]` passed `table.check_indices`,
/// `offs` is non-decreasing within `indices.len() == weights.len()`, and
/// `out.len() == (offs.len() - 1) * dim`.
unsafe fn forward_range<R: Rows>(
    table: &R,
    k: Kernel,
    indices: &[u32],
    weights: &[f32],
    offs: &[usize],
    out: &mut [f32],
) {
    match k {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Kernel::Avx2 is only chosen when the CPU has AVX2, FMA and F16C.
        Kernel::Avx2 => unsafe { forward_range_avx2(table, indices, weights, offs, out) },
        // SAFETY: forwarded caller contract.
        _ => unsafe { forward_range_portable(table, indices, weights, offs, out) },
    }
}

/// Portable forward: four rows per pass over the accumulator, order kept per element.
///
/// # Safety
/// As [`forward_range`].
unsafe fn forward_range_portable<R: Rows>(
    table: &R,
    indices: &[u32],
    weights: &[f32],
    offs: &[usize],
    out: &mut [f32],
) {
    let dim = table.dim();
    // SAFETY (closure): checked index, row of dim elements.
    let row = |e: usize| unsafe { std::slice::from_raw_parts(table.row_ptr(indices[e]), dim) };
    for (b, acc) in out.chunks_exact_mut(dim).enumerate() {
        acc.fill(0.0);
        let (mut e, end) = (offs[b], offs[b + 1]);
        while e + 4 <= end {
            let (r0, r1, r2, r3) = (row(e), row(e + 1), row(e + 2), row(e + 3));
            let (w0, w1, w2, w3) = (weights[e], weights[e + 1], weights[e + 2], weights[e + 3]);
            for ((((a, &x0), &x1), &x2), &x3) in acc.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
                let mut v = *a;
                v += w0 * x0.to_f32();
                v += w1 * x1.to_f32();
                v += w2 * x2.to_f32();
                v += w3 * x3.to_f32();
                *a = v;
            }
            e += 4;
        }
        while e < end {
            let (r0, w0) = (row(e), weights[e]);
            for (a, &x0) in acc.iter_mut().zip(r0) {
                *a += w0 * x0.to_f32();
            }
            e += 1;
        }
    }
}

/// Prefetches every cache line of `bytes` bytes from `p` (all cache levels, or L2 with `l2`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(p: *const u8, bytes: usize, l2: bool) {
    let start = p as usize & !63;
    let end = p as usize + bytes;
    let mut a = start;
    while a < end {
        // SAFETY: prefetch never faults, whatever the address.
        unsafe {
            if l2 {
                _mm_prefetch::<_MM_HINT_T1>(a as *const i8)
            } else {
                _mm_prefetch::<_MM_HINT_T0>(a as *const i8)
            }
        };
        a += 64;
    }
}

/// AVX2 forward: 8 lanes of dim at a time, four rows per accumulator pass,
/// software prefetch of the rows [`crate::simd::prefetch_bytes`] ahead; `acc + w * x`
/// with separate multiply and add so the result equals the oracle's.
///
/// # Safety
/// As [`forward_range`], and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn forward_range_avx2<R: Rows>(
    table: &R,
    indices: &[u32],
    weights: &[f32],
    offs: &[usize],
    out: &mut [f32],
) {
    let dim = table.dim();
    let d8 = dim & !7;
    let row_bytes = dim * std::mem::size_of::<R::Elem>();
    let ahead = prefetch_ahead(row_bytes);
    let l2 = crate::simd::prefetch_l2();
    let last = offs[offs.len() - 1];
    let mut pf = offs[0];
    // early first-line touch (starts the page walk) at twice the distance
    let early = crate::simd::prefetch_mode() == 2;
    let first_only = crate::simd::prefetch_mode() == 1;
    let mut pf2 = offs[0];
    let op = out.as_mut_ptr();
    for b in 0..offs.len() - 1 {
        let (mut e, end) = (offs[b], offs[b + 1]);
        // SAFETY: out holds (offs.len() - 1) rows of dim; rows come from checked indices;
        // every pointer read below stays within its row of dim elements.
        unsafe {
            let acc = op.add(b.wrapping_mul(dim));
            std::ptr::write_bytes(acc, 0, dim);
            while e < end {
                // wrapping: all positions are < indices.len(), no overflow checks needed
                let n = end.wrapping_sub(e).min(4);
                let target = if ahead == 0 {
                    0
                } else {
                    e.wrapping_add(n).wrapping_add(ahead).min(last)
                };
                if early && ahead > 0 {
                    let target2 = e.wrapping_add(n).wrapping_add(2 * ahead).min(last);
                    while pf2 < target2 {
                        let p = table.row_ptr(*indices.get_unchecked(pf2)) as *const i8;
                        _mm_prefetch::<_MM_HINT_T1>(p);
                        pf2 = pf2.wrapping_add(1);
                    }
                }
                while pf < target {
                    prefetch_row(
                        table.row_ptr(*indices.get_unchecked(pf)) as *const u8,
                        if first_only { 1 } else { row_bytes },
                        l2,
                    );
                    pf = pf.wrapping_add(1);
                }
                if n == 4 {
                    let p0 = table.row_ptr(*indices.get_unchecked(e));
                    let p1 = table.row_ptr(*indices.get_unchecked(e + 1));
                    let p2 = table.row_ptr(*indices.get_unchecked(e + 2));
                    let p3 = table.row_ptr(*indices.get_unchecked(e + 3));
                    let (s0, s1, s2, s3) = (
                        *weights.get_unchecked(e),
                        *weights.get_unchecked(e + 1),
                        *weights.get_unchecked(e + 2),
                        *weights.get_unchecked(e + 3),
                    );
                    let (w0, w1, w2, w3) = (
                        _mm256_set1_ps(s0),
                        _mm256_set1_ps(s1),
                        _mm256_set1_ps(s2),
                        _mm256_set1_ps(s3),
                    );
                    let mut d = 0;
                    while d < d8 {
                        let mut a = _mm256_loadu_ps(acc.add(d));
                        a = _mm256_add_ps(a, _mm256_mul_ps(w0, R::Elem::load8_avx2(p0.add(d))));
                        a = _mm256_add_ps(a, _mm256_mul_ps(w1, R::Elem::load8_avx2(p1.add(d))));
                        a = _mm256_add_ps(a, _mm256_mul_ps(w2, R::Elem::load8_avx2(p2.add(d))));
                        a = _mm256_add_ps(a, _mm256_mul_ps(w3, R::Elem::load8_avx2(p3.add(d))));
                        _mm256_storeu_ps(acc.add(d), a);
                        d += 8;
                    }
                    while d < dim {
                        let mut v = *acc.add(d);
                        v += s0 * (*p0.add(d)).to_f32();
                        v += s1 * (*p1.add(d)).to_f32();
                        v += s2 * (*p2.add(d)).to_f32();
                        v += s3 * (*p3.add(d)).to_f32();
                        *acc.add(d) = v;
                        d += 1;
                    }
                } else {
                    for e in e..e + n {
                        let p0 = table.row_ptr(*indices.get_unchecked(e));
                        let s0 = *weights.get_unchecked(e);
                        let w0 = _mm256_set1_ps(s0);
                        let mut d = 0;
                        while d < d8 {
                            let a = _mm256_loadu_ps(acc.add(d));
                            let a =
                                _mm256_add_ps(a, _mm256_mul_ps(w0, R::Elem::load8_avx2(p0.add(d))));
                            _mm256_storeu_ps(acc.add(d), a);
                            d += 8;
                        }
                        while d < dim {
                            *acc.add(d) += s0 * (*p0.add(d)).to_f32();
                            d += 1;
                        }
                    }
                }
                e = e.wrapping_add(n);
            }
        }
    }
}

/// Sparse table gradient: `dtable[indices[e]] += weights[e] * grad_out[bag(e)]`,
/// summed per row in ascending entry position (bit-identical to
/// [`memlayer_core::bag::bag_backward_table`]).
///
/// indices, weights: (nnz); offsets: (bags + 1); grad_out: (bags, dim) →
/// `SparseRows` with rows sorted unique, grads (rows.len(), dim).
///
/// Entries are sorted by the key `(row, entry)` (parallel sort of unique
/// keys, so the order does not depend on the thread count), then each row's
/// segment is reduced in parallel — which is an embedding-bag forward over
/// `grad_out` with the entries' bags as indices.
pub fn bag_backward_table(
    rows: usize,
    dim: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
    grad_out: &[f32],
) -> Result<SparseRows, CpuError> {
    let mut out = SparseRows::empty(dim);
    bag_backward_table_into(rows, dim, indices, weights, offsets, grad_out, &mut out)?;
    Ok(out)
}

/// [`bag_backward_table`] into `out`, reusing its allocations (a training loop
/// keeps one `SparseRows` and avoids faulting in a fresh gradient buffer per step).
pub fn bag_backward_table_into(
    rows: usize,
    dim: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
    grad_out: &[f32],
    out: &mut SparseRows,
) -> Result<(), CpuError> {
    check_len("per_sample_weights", weights.len(), indices.len())?;
    let bags = check_offsets(indices.len(), offsets)?;
    check_len("grad_out", grad_out.len(), bags * dim)?;
    if let Some(&m) = indices.iter().max()
        && m as usize >= rows
    {
        return Err(CpuError::IndexOutOfRange { index: m, rows });
    }
    if indices.len() > u32::MAX as usize || bags > u32::MAX as usize {
        return Err(CpuError::InvalidConfig(
            "more than u32::MAX entries or bags".into(),
        ));
    }
    // (row, entry) keys, unique, sorted
    let mut keys: Vec<u64> = indices
        .par_iter()
        .enumerate()
        .map(|(e, &r)| ((r as u64) << 32) | e as u64)
        .collect();
    keys.par_sort_unstable();
    // bag of each entry
    let mut bag_of = vec![0u32; indices.len()];
    split_by_bag_chunks(&mut bag_of, offsets, bags)
        .into_par_iter()
        .for_each(|(b0, b1, part)| {
            let base = offsets[b0];
            for b in b0..b1 {
                part[offsets[b] - base..offsets[b + 1] - base].fill(b as u32);
            }
        });
    // permuted entries: gather indices = bag, weights = weight, segments by row
    let (seg_idx, seg_w): (Vec<u32>, Vec<f32>) = keys
        .par_iter()
        .map(|&k| {
            let e = (k & 0xffff_ffff) as usize;
            (bag_of[e], weights[e])
        })
        .unzip();
    out.dim = dim;
    out.rows.clear();
    let mut seg_offsets = vec![0usize];
    for (i, &k) in keys.iter().enumerate() {
        let r = (k >> 32) as u32;
        if out.rows.last() != Some(&r) {
            if i > 0 {
                seg_offsets.push(i);
            }
            out.rows.push(r);
        }
    }
    if !keys.is_empty() {
        seg_offsets.push(keys.len());
    }
    // every element is overwritten by the reduction below; a new buffer goes on huge
    // pages (faulting in a fresh 100 MB gradient page by page costs more than the sum)
    let len = out.rows.len() * dim;
    if out.grads.capacity() < len {
        out.grads = crate::alloc::zeroed_vec_huge(len);
    } else {
        out.grads.clear();
        out.grads.resize(len, 0.0);
    }
    let g = Table::new(grad_out, bags, dim)?;
    bag_forward(&g, &seg_idx, &seg_w, &seg_offsets, &mut out.grads)
}

/// Dense table gradient: [`bag_backward_table`] written into a (rows, dim)
/// buffer with zeros in untouched rows, bit-identical to
/// `bag_backward_table(..).to_dense(rows)` without the sparse copy.
///
/// indices, weights: (nnz); offsets: (bags + 1); grad_out: (bags, dim);
/// out: (rows, dim), overwritten.
///
/// The entries are grouped by row with a stable counting sort (O(nnz + rows),
/// which the dense output costs anyway), so each row's segment holds its
/// entries in ascending position, as in [`bag_backward_table`]; the segments
/// of all rows — empty for untouched rows — are then reduced in parallel by
/// an embedding-bag forward over `grad_out`, which zeroes empty segments.
pub fn bag_backward_table_dense(
    rows: usize,
    dim: usize,
    indices: &[u32],
    weights: &[f32],
    offsets: &[usize],
    grad_out: &[f32],
    out: &mut [f32],
) -> Result<(), CpuError> {
    check_len("per_sample_weights", weights.len(), indices.len())?;
    let bags = check_offsets(indices.len(), offsets)?;
    check_len("grad_out", grad_out.len(), bags * dim)?;
    check_len("out", out.len(), rows * dim)?;
    if let Some(&m) = indices.iter().max()
        && m as usize >= rows
    {
        return Err(CpuError::IndexOutOfRange { index: m, rows });
    }
    if bags > u32::MAX as usize {
        return Err(CpuError::InvalidConfig("more than u32::MAX bags".into()));
    }
    // row_offsets[r]..row_offsets[r + 1]: the segment of row r
    let mut row_offsets = vec![0usize; rows + 1];
    for &r in indices {
        row_offsets[r as usize + 1] += 1;
    }
    for r in 0..rows {
        row_offsets[r + 1] += row_offsets[r];
    }
    // entries in ascending position within each segment: bag and weight
    let mut next = row_offsets[..rows].to_vec();
    let mut seg_idx = vec![0u32; indices.len()];
    let mut seg_w = vec![0.0f32; indices.len()];
    for b in 0..bags {
        for e in offsets[b]..offsets[b + 1] {
            let slot = &mut next[indices[e] as usize];
            seg_idx[*slot] = b as u32;
            seg_w[*slot] = weights[e];
            *slot += 1;
        }
    }
    let g = Table::new(grad_out, bags, dim)?;
    bag_forward(&g, &seg_idx, &seg_w, &row_offsets, out)
}

/// Per-sample-weight gradient: `dw[e] = dot(table[indices[e]], grad_out[bag(e)])`.
///
/// table: (rows, dim); indices: (nnz); offsets: (bags + 1); grad_out: (bags, dim);
/// dw: (nnz), overwritten. The dot uses lane-parallel partial sums (FMA on
/// AVX2), so it matches the oracle to rounding, not bit for bit.
pub fn bag_backward_weights<R: Rows>(
    table: &R,
    indices: &[u32],
    offsets: &[usize],
    grad_out: &[f32],
    dw: &mut [f32],
) -> Result<(), CpuError> {
    let bags = check_offsets(indices.len(), offsets)?;
    let dim = table.dim();
    check_len("grad_out", grad_out.len(), bags * dim)?;
    check_len("dw", dw.len(), indices.len())?;
    table.check_indices(indices)?;
    if bags == 0 {
        return Ok(());
    }
    let k = kernel();
    let ahead = prefetch_ahead(dim * std::mem::size_of::<R::Elem>());
    let parts = split_by_bag_chunks(dw, offsets, bags);
    parts.into_par_iter().for_each(|(b0, b1, part)| {
        let (base, last) = (offsets[b0], offsets[b1]);
        let mut pf = base;
        for b in b0..b1 {
            let g = &grad_out[b * dim..(b + 1) * dim];
            for e in offsets[b]..offsets[b + 1] {
                if k == Kernel::Avx2 && ahead > 0 {
                    // SAFETY: positions below `last` hold checked indices.
                    unsafe { prefetch_rows(table, indices, &mut pf, (e + 1 + ahead).min(last)) };
                }
                // SAFETY: index checked; the row has dim elements.
                let row = unsafe { std::slice::from_raw_parts(table.row_ptr(indices[e]), dim) };
                part[e - base] = dot_row(k, row, g);
            }
        }
    });
    Ok(())
}

/// Rows to prefetch ahead for rows of `row_bytes` (0: prefetch off).
fn prefetch_ahead(row_bytes: usize) -> usize {
    let pf_bytes = crate::simd::prefetch_bytes();
    if pf_bytes == 0 {
        0
    } else {
        (pf_bytes / row_bytes.max(1)).clamp(2, 64)
    }
}

/// Prefetches the rows of `indices[*pf..target]` and advances `pf` (no-op off x86-64).
///
/// # Safety
/// Every index in `indices[*pf..target]` passed `table.check_indices`.
#[inline(always)]
unsafe fn prefetch_rows<R: Rows>(table: &R, indices: &[u32], pf: &mut usize, target: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let row_bytes = table.dim() * std::mem::size_of::<R::Elem>();
        let l2 = crate::simd::prefetch_l2();
        while *pf < target {
            // SAFETY: checked index (caller); prefetching never faults.
            let p = unsafe { table.row_ptr(*indices.get_unchecked(*pf)) };
            prefetch_row(p as *const u8, row_bytes, l2);
            *pf += 1;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (table, indices, pf, target);
}

/// [`bag_backward_weights`] on a table of runtime dtype, dense
/// ([`TableRef`](crate::TableRef)) or paged ([`PagedTableRef`](crate::PagedTableRef)).
pub fn bag_backward_weights_any<A: Rows, B: Rows, C: Rows>(
    table: AnyDtype<A, B, C>,
    indices: &[u32],
    offsets: &[usize],
    grad_out: &[f32],
    dw: &mut [f32],
) -> Result<(), CpuError> {
    match table {
        AnyDtype::F32(t) => bag_backward_weights(&t, indices, offsets, grad_out, dw),
        AnyDtype::F16(t) => bag_backward_weights(&t, indices, offsets, grad_out, dw),
        AnyDtype::Bf16(t) => bag_backward_weights(&t, indices, offsets, grad_out, dw),
    }
}

#[inline]
fn dot_row<T: Storage>(k: Kernel, row: &[T], g: &[f32]) -> f32 {
    match k {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Kernel::Avx2 is only chosen when the CPU has AVX2, FMA and F16C.
        Kernel::Avx2 => unsafe { dot_row_avx2(row, g) },
        _ => dot_row_portable(row, g),
    }
}

fn dot_row_portable<T: Storage>(row: &[T], g: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut rc = row.chunks_exact(8);
    let mut gc = g.chunks_exact(8);
    for (r, gg) in (&mut rc).zip(&mut gc) {
        for l in 0..8 {
            lanes[l] += r[l].to_f32() * gg[l];
        }
    }
    let mut s = lanes.iter().sum::<f32>();
    for (r, gg) in rc.remainder().iter().zip(gc.remainder()) {
        s += r.to_f32() * gg;
    }
    s
}

/// # Safety
/// The CPU has AVX2, FMA and F16C; `row.len() == g.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_avx2<T: Storage>(row: &[T], g: &[f32]) -> f32 {
    let dim = row.len().min(g.len());
    let (rp, gp) = (row.as_ptr(), g.as_ptr());
    // SAFETY: all reads are below dim in both slices.
    unsafe {
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut d = 0;
        while d + 16 <= dim {
            a0 = _mm256_fmadd_ps(T::load8_avx2(rp.add(d)), _mm256_loadu_ps(gp.add(d)), a0);
            a1 = _mm256_fmadd_ps(
                T::load8_avx2(rp.add(d + 8)),
                _mm256_loadu_ps(gp.add(d + 8)),
                a1,
            );
            d += 16;
        }
        if d + 8 <= dim {
            a0 = _mm256_fmadd_ps(T::load8_avx2(rp.add(d)), _mm256_loadu_ps(gp.add(d)), a0);
            d += 8;
        }
        let a = _mm256_add_ps(a0, a1);
        let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps::<0b01>(h, h));
        let mut s = _mm_cvtss_f32(h);
        while d < dim {
            s += (*rp.add(d)).to_f32() * *gp.add(d);
            d += 1;
        }
        s
    }
}
