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
use crate::simd::{Lanes, dispatch_lanes, kernel, prefetch_row};
use crate::storage::{AnyDtype, Rows, Storage, Table};
use memlayer_core::bag::SparseRows;
use rayon::prelude::*;

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
            unsafe { forward_range(k, table, indices, weights, &offsets[b0..=b1], o) }
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

dispatch_lanes! {
    /// Sums the bags delimited by `offs` (absolute positions into `indices`) into `out`.
    ///
    /// # Safety
    /// Every index in `indices[offs[0]..offs[last]]` passed `table.check_indices`,
    /// `offs` is non-decreasing within `indices.len() == weights.len()`, and
    /// `out.len() == (offs.len() - 1) * dim`.
    unsafe fn forward_range[R: Rows](
        table: &R,
        indices: &[u32],
        weights: &[f32],
        offs: &[usize],
        out: &mut [f32],
    ) => forward_range_lanes
}

/// The forward, written once for every kernel family: rows of a few whole
/// vectors that fit `S`'s registers ([`Lanes::REG_ACC`]) take [`forward_reg`];
/// others `S::LANES` lanes of dim at a time, four rows per accumulator pass.
/// Software prefetch of the rows [`crate::simd::prefetch_bytes`] ahead (where
/// `S` prefetches); `acc + w * x` with a separate multiply and add per
/// element, in entry order, so the result equals the oracle's.
///
/// # Safety
/// As [`forward_range`], inside `S`'s `#[target_feature]` wrapper.
#[inline(always)]
unsafe fn forward_range_lanes<S: Lanes, R: Rows>(
    table: &R,
    indices: &[u32],
    weights: &[f32],
    offs: &[usize],
    out: &mut [f32],
) {
    let dim = table.dim();
    if dim.is_multiple_of(S::LANES) && crate::simd::register_accumulators() {
        // rows of 1, 2, 4, 8, 16 or 32 whole vectors that fit the family's registers
        // (one pass per block over a bag's rows measured slower than the loop
        // below: 21 vs 27 GB/s for AVX2 at dim 256 in 4 blocks of 8)
        let n = dim / S::LANES;
        let block = (n.is_power_of_two() && n <= 32 && n <= S::REG_ACC).then_some(n);
        // SAFETY: as this function's (the caller's); the row is `block` vectors.
        unsafe {
            match block {
                Some(32) => return forward_reg::<S, R, 32>(table, indices, weights, offs, out),
                Some(16) => return forward_reg::<S, R, 16>(table, indices, weights, offs, out),
                Some(8) => return forward_reg::<S, R, 8>(table, indices, weights, offs, out),
                Some(4) => return forward_reg::<S, R, 4>(table, indices, weights, offs, out),
                Some(2) => return forward_reg::<S, R, 2>(table, indices, weights, offs, out),
                Some(1) => return forward_reg::<S, R, 1>(table, indices, weights, offs, out),
                _ => {}
            }
        }
    }
    let dv = dim - dim % S::LANES;
    let mut pre = Prefetcher::new::<S, R>(table, offs);
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
                pre.run::<S, R>(table, indices, e.wrapping_add(n));
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
                    let (w0, w1, w2, w3) = (S::splat(s0), S::splat(s1), S::splat(s2), S::splat(s3));
                    let mut d = 0;
                    while d < dv {
                        let mut a = S::load(acc.add(d));
                        a = S::add(a, S::mul(w0, S::widen(p0.add(d))));
                        a = S::add(a, S::mul(w1, S::widen(p1.add(d))));
                        a = S::add(a, S::mul(w2, S::widen(p2.add(d))));
                        a = S::add(a, S::mul(w3, S::widen(p3.add(d))));
                        S::store(acc.add(d), a);
                        d += S::LANES;
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
                        let w0 = S::splat(s0);
                        let mut d = 0;
                        while d < dv {
                            let a = S::add(S::load(acc.add(d)), S::mul(w0, S::widen(p0.add(d))));
                            S::store(acc.add(d), a);
                            d += S::LANES;
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

/// The software prefetch of a gather: rows `ahead` entries past the one being
/// summed (every line, or only the first with pattern 1), and with patterns 2
/// and 3 also their first line at twice that distance (see
/// [`crate::simd::set_prefetch_mode`]; [`forward_reg_interleaved`] does pattern 3's
/// interleaved lines itself).
struct Prefetcher {
    ahead: usize,
    last: usize,
    pf: usize,
    pf2: usize,
    row_bytes: usize,
    l2: bool,
    early: bool,
    first_only: bool,
}

impl Prefetcher {
    /// For the entries `offs[0]..offs[last]` of a gather over `table` with lanes `S`.
    #[inline(always)]
    fn new<S: Lanes, R: Rows>(table: &R, offs: &[usize]) -> Self {
        let row_bytes = table.dim() * std::mem::size_of::<R::Elem>();
        let mode = crate::simd::prefetch_mode();
        Self {
            ahead: if S::PREFETCH {
                prefetch_ahead(row_bytes)
            } else {
                0
            },
            last: offs[offs.len() - 1],
            pf: offs[0],
            pf2: offs[0],
            row_bytes,
            l2: crate::simd::prefetch_l2(),
            early: mode == 2 || mode == 3,
            first_only: mode == 1,
        }
    }

    /// Only the early first-line prefetch of [`Prefetcher::run`] (if on).
    ///
    /// # Safety
    /// As [`Prefetcher::run`].
    #[inline(always)]
    unsafe fn run_early<S: Lanes, R: Rows>(&mut self, table: &R, indices: &[u32], next: usize) {
        if !self.early {
            return;
        }
        let target2 = next.wrapping_add(2 * self.ahead).min(self.last);
        // SAFETY: positions below `last` hold checked indices; prefetch never faults.
        unsafe {
            while self.pf2 < target2 {
                let p = table.row_ptr(*indices.get_unchecked(self.pf2));
                S::prefetch(p.cast(), true);
                self.pf2 = self.pf2.wrapping_add(1);
            }
        }
    }

    /// Prefetches up to the rows `ahead` (and `2 ahead`) entries past `next`,
    /// the first entry not yet summed.
    ///
    /// # Safety
    /// Inside `S`'s wrapper; `indices[..last]` passed `table.check_indices`.
    #[inline(always)]
    unsafe fn run<S: Lanes, R: Rows>(&mut self, table: &R, indices: &[u32], next: usize) {
        if self.ahead == 0 {
            return;
        }
        // wrapping: all positions are < indices.len(), no overflow checks needed
        // SAFETY: positions below `last` hold checked indices; prefetch never faults.
        unsafe {
            self.run_early::<S, R>(table, indices, next);
            let target = next.wrapping_add(self.ahead).min(self.last);
            while self.pf < target {
                prefetch_row::<S>(
                    table.row_ptr(*indices.get_unchecked(self.pf)).cast(),
                    if self.first_only { 1 } else { self.row_bytes },
                    self.l2,
                );
                self.pf = self.pf.wrapping_add(1);
            }
        }
    }
}

/// The forward for rows of exactly `N` vectors of `S` (`N <= S::REG_ACC`):
/// a bag's output row stays in `N` registers across all its entries, one
/// entry at a time (`acc = acc + w * x` per element in entry order, from 0.0,
/// as the oracle), and is stored once. Fewer micro-ops per row than the 4-row
/// pass over the output row in memory, so more row loads fit in the
/// out-of-order window (AVX-512 at dim 256: 35 vs 28 GB/s here).
///
/// # Safety
/// As [`forward_range`], inside `S`'s wrapper; `table.dim() == N * S::LANES`.
#[inline(always)]
unsafe fn forward_reg<S: Lanes, R: Rows, const N: usize>(
    table: &R,
    indices: &[u32],
    weights: &[f32],
    offs: &[usize],
    out: &mut [f32],
) {
    let dim = table.dim();
    let mut pre = Prefetcher::new::<S, R>(table, offs);
    if pre.ahead > 0 && crate::simd::prefetch_mode() == 3 {
        // SAFETY: as this function's.
        unsafe {
            return if pre.l2 {
                forward_reg_interleaved::<S, R, N, true>(
                    table, indices, weights, offs, out, pre.ahead,
                )
            } else {
                forward_reg_interleaved::<S, R, N, false>(
                    table, indices, weights, offs, out, pre.ahead,
                )
            };
        }
    }
    let op = out.as_mut_ptr();
    for b in 0..offs.len() - 1 {
        let (start, end) = (offs[b], offs[b + 1]);
        // SAFETY: rows come from checked indices and hold dim = N * S::LANES
        // elements; out holds (offs.len() - 1) rows of dim.
        unsafe {
            let mut acc = [S::zero(); N];
            for e in start..end {
                let p = table.row_ptr(*indices.get_unchecked(e));
                let w = S::splat(*weights.get_unchecked(e));
                pre.run::<S, R>(table, indices, e.wrapping_add(1));
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = S::add(*a, S::mul(w, S::widen(p.add(v * S::LANES))));
                }
            }
            let o = op.add(b * dim);
            for (v, &a) in acc.iter().enumerate() {
                S::store(o.add(v * S::LANES), a);
            }
        }
    }
}

/// [`forward_reg`] with prefetch pattern 3, as one tight loop: per entry `e`
/// the first line of the row at `e + 2 * ahead` and every line of the row at
/// `e + ahead` (one line beside each vector load of row `e`), both clamped to
/// the last entry; the rows inside the first distances are prefetched before
/// the loop. `L2` picks the level (`prefetcht1` / `prefetcht0`) at compile
/// time. No branch but the loops' own per entry: at dim 64 (4 lines a row)
/// the per-row bookkeeping of the general [`Prefetcher`] cost more than the
/// lines themselves.
///
/// # Safety
/// As [`forward_reg`]; `ahead > 0`.
#[inline(always)]
unsafe fn forward_reg_interleaved<S: Lanes, R: Rows, const N: usize, const L2: bool>(
    table: &R,
    indices: &[u32],
    weights: &[f32],
    offs: &[usize],
    out: &mut [f32],
    ahead: usize,
) {
    let dim = table.dim();
    let (first, last) = (offs[0], offs[offs.len() - 1]);
    let op = out.as_mut_ptr();
    let row_bytes = dim * std::mem::size_of::<R::Elem>();
    // SAFETY: positions in first..last hold checked indices (prefetch never
    // faults); rows hold dim = N * S::LANES elements; out holds
    // (offs.len() - 1) rows of dim.
    unsafe {
        if last > first {
            let row = |e: usize| -> *const u8 { table.row_ptr(*indices.get_unchecked(e)).cast() };
            for e in first..first.saturating_add(2 * ahead).min(last) {
                S::prefetch(row(e), L2);
            }
            for e in first..first.saturating_add(ahead).min(last) {
                crate::simd::prefetch_row::<S>(row(e), row_bytes, L2);
            }
        }
        let final_entry = last.saturating_sub(1);
        for b in 0..offs.len() - 1 {
            let (start, end) = (*offs.get_unchecked(b), *offs.get_unchecked(b + 1));
            let mut acc = [S::zero(); N];
            for e in start..end {
                let p = table.row_ptr(*indices.get_unchecked(e));
                let w = S::splat(*weights.get_unchecked(e));
                let far = e.wrapping_add(2 * ahead).min(final_entry);
                S::prefetch(table.row_ptr(*indices.get_unchecked(far)).cast(), L2);
                let near = e.wrapping_add(ahead).min(final_entry);
                let q: *const u8 = table.row_ptr(*indices.get_unchecked(near)).cast();
                for (v, a) in acc.iter_mut().enumerate() {
                    let off = v * S::LANES * std::mem::size_of::<R::Elem>();
                    if off.is_multiple_of(64) {
                        S::prefetch(q.add(off), L2);
                    }
                    *a = S::add(*a, S::mul(w, S::widen(p.add(v * S::LANES))));
                }
            }
            let o = op.add(b * dim);
            for (v, &a) in acc.iter().enumerate() {
                S::store(o.add(v * S::LANES), a);
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

/// Rows to prefetch ahead for rows of `row_bytes` (0: prefetch off).
fn prefetch_ahead(row_bytes: usize) -> usize {
    let pf_bytes = crate::simd::prefetch_bytes();
    if pf_bytes == 0 {
        0
    } else {
        (pf_bytes / row_bytes.max(1)).clamp(2, 64)
    }
}

/// Per-sample-weight gradient: `dw[e] = dot(table[indices[e]], grad_out[bag(e)])`.
///
/// table: (rows, dim); indices: (nnz); offsets: (bags + 1); grad_out: (bags, dim);
/// dw: (nnz), overwritten. The dot uses lane-parallel partial sums (FMA on
/// AVX2 and NEON), so it matches the oracle to rounding, not bit for bit.
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
    let parts = split_by_bag_chunks(dw, offsets, bags);
    parts.into_par_iter().for_each(|(b0, b1, part)| {
        // SAFETY: indices checked against the table, valid CSR offsets, grad_out of
        // bags rows of dim, part holds the entries of bags b0..b1.
        unsafe {
            let g = &grad_out[b0 * dim..b1 * dim];
            weights_range(k, table, indices, &offsets[b0..=b1], g, part)
        }
    });
    Ok(())
}

dispatch_lanes! {
    /// Dots of the bags delimited by `offs` (absolute positions) into `dw`
    /// (their entries, from `offs[0]`).
    ///
    /// # Safety
    /// Every index in `indices[offs[0]..offs[last]]` passed `table.check_indices`;
    /// `offs` is non-decreasing; `grad_out` holds `offs.len() - 1` rows of dim
    /// from bag `offs`'s first; `dw.len() == offs[last] - offs[0]`.
    unsafe fn weights_range[R: Rows](
        table: &R,
        indices: &[u32],
        offs: &[usize],
        grad_out: &[f32],
        dw: &mut [f32],
    ) => weights_range_lanes
}

/// The per-sample-weight dots, written once for every kernel family, with
/// the rows prefetched ahead (where `S` prefetches).
///
/// # Safety
/// As [`weights_range`], inside `S`'s `#[target_feature]` wrapper.
#[inline(always)]
unsafe fn weights_range_lanes<S: Lanes, R: Rows>(
    table: &R,
    indices: &[u32],
    offs: &[usize],
    grad_out: &[f32],
    dw: &mut [f32],
) {
    let dim = table.dim();
    let row_bytes = dim * std::mem::size_of::<R::Elem>();
    let ahead = if S::PREFETCH {
        prefetch_ahead(row_bytes)
    } else {
        0
    };
    let l2 = crate::simd::prefetch_l2();
    let (base, last) = (offs[0], offs[offs.len() - 1]);
    let mut pf = base;
    for b in 0..offs.len() - 1 {
        let g = grad_out[b * dim..(b + 1) * dim].as_ptr();
        for e in offs[b]..offs[b + 1] {
            // SAFETY: positions below `last` hold checked indices; prefetch never faults;
            // the row and g hold dim elements.
            unsafe {
                let target = (e + 1 + ahead).min(last);
                while ahead > 0 && pf < target {
                    prefetch_row::<S>(
                        table.row_ptr(*indices.get_unchecked(pf)).cast(),
                        row_bytes,
                        l2,
                    );
                    pf += 1;
                }
                dw[e - base] = dot_lanes::<S, R::Elem>(table.row_ptr(indices[e]), g, dim);
            }
        }
    }
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

/// Elements per step of [`dot_lanes`]: at least 16 and two vectors, so
/// 16 / `S::LANES` accumulators (2 on AVX2, 4 on NEON, 16 portable scalars that
/// LLVM vectorises) and 2 on AVX-512.
const DOT_STEP: usize = 16;

/// `dot(row, g)` over `dim` elements: `max(DOT_STEP, 2 S::LANES) / S::LANES`
/// accumulators (fused multiply-add where `S` has it), summed pairwise, then
/// the tail in order.
///
/// # Safety
/// `row` and `g` hold `dim` elements; inside `S`'s wrapper; `S::LANES` is a power
/// of two at most 16.
#[inline(always)]
unsafe fn dot_lanes<S: Lanes, T: Storage>(row: *const T, g: *const f32, dim: usize) -> f32 {
    let l = S::LANES;
    let step = DOT_STEP.max(2 * l);
    let n = step / l;
    // SAFETY: all reads are below dim in both.
    unsafe {
        let mut acc = [S::zero(); 2 * DOT_STEP];
        let mut d = 0;
        while d + step <= dim {
            for (i, a) in acc.iter_mut().enumerate().take(n) {
                let o = d + i * l;
                *a = S::mul_add(S::widen(row.add(o)), S::load(g.add(o)), *a);
            }
            d += step;
        }
        while d + l <= dim {
            acc[0] = S::mul_add(S::widen(row.add(d)), S::load(g.add(d)), acc[0]);
            d += l;
        }
        let mut m = n;
        while m > 1 {
            m /= 2;
            for i in 0..m {
                acc[i] = S::add(acc[i], acc[i + m]);
            }
        }
        let mut s = S::hsum(acc[0]);
        while d < dim {
            s += (*row.add(d)).to_f32() * *g.add(d);
            d += 1;
        }
        s
    }
}
