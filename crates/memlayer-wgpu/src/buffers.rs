//! Buffers: uploads, read-back, compute kernels, and tables sharded across
//! buffers sized from the device's limits.

use crate::context::{GpuContext, GpuError};
use wgpu::util::DeviceExt;

/// Usage of every storage buffer memlayer creates.
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// A storage buffer holding `data` (at least 4 bytes: empty slices get one
/// zero word, since zero-sized bindings are invalid).
pub fn storage_init<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, data: &[T]) -> wgpu::Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let contents: std::borrow::Cow<[u8]> = if bytes.len() < 4 {
        let mut padded = bytes.to_vec();
        padded.resize(4, 0);
        padded.into()
    } else {
        bytes.into()
    };
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &contents,
            usage: STORAGE,
        })
}

/// A zero-filled storage buffer of `bytes` bytes (at least 4).
pub fn storage_zeroed(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(4).next_multiple_of(4),
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// Copies `count` elements of `T` starting at byte `offset` of `buffer` back
/// to the host (blocking until the GPU is done; native only: on the web a
/// read-back must yield to the browser, use [`read_back_async`]).
pub fn read_back<T: bytemuck::Pod>(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    count: usize,
) -> Result<Vec<T>, GpuError> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        pollster::block_on(read_back_async(ctx, buffer, offset, count))
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (ctx, buffer, offset, count);
        Err(GpuError::ReadBack(
            "a blocking read-back is impossible on the web: use read_back_async".into(),
        ))
    }
}

/// [`read_back`] as a future: natively it polls the device, on the web it
/// resolves when the browser has mapped the staging buffer.
pub async fn read_back_async<T: bytemuck::Pod>(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    count: usize,
) -> Result<Vec<T>, GpuError> {
    let bytes = (count * std::mem::size_of::<T>()) as u64;
    let mut parts = read_back_parts_async(ctx, &[(buffer, offset, bytes)]).await?;
    let part = parts.pop().unwrap_or_default();
    Ok(bytemuck::pod_collect_to_vec::<u8, T>(&part))
}

/// Reads several byte ranges `(buffer, offset, bytes)` back in one
/// submission and one map (one round trip to the device): one `Vec<u8>` per
/// range, in order. Offsets and lengths are rounded to the copy alignment
/// internally; the returned bytes are exactly the requested ones.
pub async fn read_back_parts_async(
    ctx: &GpuContext,
    parts: &[(&wgpu::Buffer, u64, u64)],
) -> Result<Vec<Vec<u8>>, GpuError> {
    read_back_pooled_async(ctx, None, parts).await
}

/// [`read_back_parts_async`] with the staging buffer taken from (and given
/// back to) `pool`, so a repeated read-back creates no buffer.
pub async fn read_back_pooled_async(
    ctx: &GpuContext,
    pool: Option<&StagingPool>,
    parts: &[(&wgpu::Buffer, u64, u64)],
) -> Result<Vec<Vec<u8>>, GpuError> {
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let Some(pending) = PendingRead::record(ctx, pool, &mut encoder, parts)? else {
        return Ok(vec![Vec::new(); parts.len()]);
    };
    ctx.queue.submit([encoder.finish()]);
    pending.finish(ctx, pool).await
}

/// Staging buffers for read-backs, reused: a read-back takes one of the
/// right size (or creates one) and gives it back once read.
#[derive(Default)]
pub struct StagingPool {
    free: std::sync::Mutex<Vec<wgpu::Buffer>>,
    created: std::sync::atomic::AtomicU64,
}

impl StagingPool {
    /// Staging buffers created so far.
    pub fn created(&self) -> u64 {
        self.created.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = free.iter().position(|b| b.size() >= bytes) {
            return free.swap_remove(i);
        }
        drop(free);
        self.created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        new_staging(ctx, bytes.next_power_of_two())
    }

    fn give(&self, buffer: wgpu::Buffer) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < 4 {
            free.push(buffer);
        }
    }
}

fn new_staging(ctx: &GpuContext, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("memlayer read-back"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// Byte ranges copied into a staging buffer by a recorded command, to be
/// mapped once the command is submitted ([`PendingRead::finish`]).
pub struct PendingRead {
    staging: wgpu::Buffer,
    /// (offset in staging, bytes) of each part
    at: Vec<(u64, u64)>,
}

impl PendingRead {
    /// Records the copies of `parts` `(buffer, offset, bytes)` into a staging
    /// buffer (from `pool` when given); `None` when there are no bytes.
    pub fn record(
        ctx: &GpuContext,
        pool: Option<&StagingPool>,
        encoder: &mut wgpu::CommandEncoder,
        parts: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Option<Self>, GpuError> {
        let align = wgpu::COPY_BUFFER_ALIGNMENT;
        let mut at = Vec::with_capacity(parts.len());
        let mut total = 0u64;
        for &(buffer, offset, bytes) in parts {
            if !offset.is_multiple_of(align)
                || offset + bytes.next_multiple_of(align) > buffer.size()
            {
                return Err(GpuError::ReadBack(format!(
                    "range {offset}..{} of a {}-byte buffer cannot be read back",
                    offset + bytes,
                    buffer.size()
                )));
            }
            at.push((total, bytes));
            total += bytes.next_multiple_of(align);
        }
        if total == 0 {
            return Ok(None);
        }
        let staging = match pool {
            Some(p) => p.take(ctx, total),
            None => new_staging(ctx, total),
        };
        for (&(buffer, offset, bytes), &(dst, _)) in parts.iter().zip(&at) {
            let padded = bytes.next_multiple_of(align);
            if padded > 0 {
                encoder.copy_buffer_to_buffer(buffer, offset, &staging, dst, padded);
            }
        }
        Ok(Some(Self { staging, at }))
    }

    /// Maps the staging buffer (after the recording command was submitted)
    /// and returns the bytes of each part; the buffer goes back to `pool`.
    pub async fn finish(
        self,
        ctx: &GpuContext,
        pool: Option<&StagingPool>,
    ) -> Result<Vec<Vec<u8>>, GpuError> {
        let Self { staging, at } = self;
        let mapped = MapSignal::default();
        let signal = mapped.clone();
        staging.map_async(wgpu::MapMode::Read, .., move |r| signal.set(r));
        // natively the callback runs inside poll; the browser maps by itself
        #[cfg(not(target_arch = "wasm32"))]
        ctx.wait()?;
        #[cfg(target_arch = "wasm32")]
        let _ = ctx;
        mapped
            .await
            .map_err(|e| GpuError::ReadBack(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::ReadBack(e.to_string()))?;
        let out = at
            .iter()
            .map(|&(dst, bytes)| view[dst as usize..(dst + bytes) as usize].to_vec())
            .collect();
        drop(view);
        staging.unmap();
        if let Some(p) = pool {
            p.give(staging);
        }
        Ok(out)
    }
}

type MapResult = Result<(), wgpu::BufferAsyncError>;

/// A one-shot future completed by a `map_async` callback.
#[derive(Clone, Default)]
struct MapSignal(std::sync::Arc<std::sync::Mutex<(Option<MapResult>, Option<std::task::Waker>)>>);

impl MapSignal {
    fn set(&self, r: MapResult) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = Some(r);
        if let Some(w) = s.1.take() {
            w.wake();
        }
    }
}

impl std::future::Future for MapSignal {
    type Output = MapResult;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<MapResult> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match s.0.take() {
            Some(r) => std::task::Poll::Ready(r),
            None => {
                s.1 = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}

/// A compute pipeline built from one WGSL source, with its bind-group layout
/// (group 0, derived from the shader: bindings `0..n` in declaration order).
pub struct Kernel {
    /// Name for errors and labels.
    pub name: &'static str,
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of bind group 0.
    pub layout: wgpu::BindGroupLayout,
}

impl Kernel {
    /// Compiles `source` and builds the pipeline of `entry` (errors name the kernel).
    pub fn new(
        ctx: &GpuContext,
        name: &'static str,
        source: &str,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Result<Self, GpuError> {
        ctx.scoped(&format!("building kernel {name}::{entry}"), || {
            let module = ctx
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                });
            let pipeline = ctx
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        ..Default::default()
                    },
                    cache: None,
                });
            let layout = pipeline.get_bind_group_layout(0);
            Self {
                name,
                pipeline,
                layout,
            }
        })
    }

    /// Records one dispatch of `workgroups` with `bindings[i]` bound at
    /// binding `i`, in a compute pass and bind group of its own: for ad-hoc
    /// shaders (tests, probes). The registry's kernels go through
    /// [`crate::launch::Kernels`] (cached bind groups, one pass per sequence).
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        bindings: &[wgpu::BindingResource<'_>],
        workgroups: (u32, u32, u32),
    ) {
        let entries: Vec<wgpu::BindGroupEntry> = bindings
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(self.name),
            layout: &self.layout,
            entries: &entries,
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(self.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(workgroups.0, workgroups.1, workgroups.2);
    }
}

/// Storage type of a table's rows on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuDtype {
    /// One f32 per element.
    F32,
    /// IEEE half, two per u32 word (`unpack2x16float`); a row of odd width is
    /// padded with one zero half so rows stay word-aligned. Needs no
    /// `shader-f16` feature.
    F16,
    /// bfloat16 (the top half of an f32), two per u32 word as F16; widened
    /// in the kernel by a shift, exactly.
    Bf16,
}

impl GpuDtype {
    /// u32 words one row of `dim` elements takes.
    pub fn row_words(self, dim: usize) -> usize {
        match self {
            GpuDtype::F32 => dim,
            GpuDtype::F16 | GpuDtype::Bf16 => dim.div_ceil(2),
        }
    }

    /// Whether two elements share a u32 word (f16, bf16).
    pub fn packed(self) -> bool {
        self != GpuDtype::F32
    }

    /// Bits of `x` rounded to this 16-bit type (round to nearest even: a
    /// value that came from this type is kept exactly). F32 is not packed.
    fn half_bits(self, x: f32) -> u32 {
        match self {
            GpuDtype::F16 => half::f16::from_f32(x).to_bits() as u32,
            GpuDtype::Bf16 => half::bf16::from_f32(x).to_bits() as u32,
            GpuDtype::F32 => unreachable!("f32 is not packed"),
        }
    }

    /// `bits` of this 16-bit type widened to f32 (exact).
    fn widen_half(self, bits: u16) -> f32 {
        match self {
            GpuDtype::F16 => half::f16::from_bits(bits).to_f32(),
            GpuDtype::Bf16 => f32::from_bits(u32::from(bits) << 16),
            GpuDtype::F32 => unreachable!("f32 is not packed"),
        }
    }
}

/// A `(rows, dim)` table stored across several storage buffers, each no
/// larger than the device's binding limit; shard `s` holds rows
/// `[s * rows_per_shard, (s + 1) * rows_per_shard)`. `rows_per_shard` is a
/// multiple of `unit_rows` so a unit (e.g. a page in a slot pool) never
/// straddles two shards.
pub struct ShardedTable {
    /// Rows in the table.
    pub rows: usize,
    /// Elements per row.
    pub dim: usize,
    /// Storage type.
    pub dtype: GpuDtype,
    /// Rows per shard (the last shard may hold fewer).
    pub rows_per_shard: usize,
    /// The buffers.
    pub shards: Vec<wgpu::Buffer>,
}

impl ShardedTable {
    /// Allocates a zeroed table sized by `ctx.max_binding_bytes()`.
    pub fn zeroed(
        ctx: &GpuContext,
        label: &str,
        rows: usize,
        dim: usize,
        dtype: GpuDtype,
        unit_rows: usize,
    ) -> Result<Self, GpuError> {
        let row_bytes = (dtype.row_words(dim) * 4) as u64;
        let unit_rows = unit_rows.max(1);
        let unit_bytes = row_bytes * unit_rows as u64;
        let limit = ctx.max_binding_bytes();
        if unit_bytes == 0 || unit_bytes > limit {
            return Err(GpuError::Invalid(format!(
                "{label}: a unit of {unit_rows} rows × {dim} ({unit_bytes} bytes) does not fit \
                 one binding of {limit} bytes"
            )));
        }
        let rows_per_shard = ((limit / unit_bytes) as usize * unit_rows).min(rows.max(1));
        let n_shards = rows.div_ceil(rows_per_shard).max(1);
        let shards = ctx.scoped(&format!("allocating {label}"), || {
            (0..n_shards)
                .map(|s| {
                    let r = rows_per_shard.min(rows - (s * rows_per_shard).min(rows));
                    storage_zeroed(ctx, label, r as u64 * row_bytes)
                })
                .collect()
        })?;
        Ok(Self {
            rows,
            dim,
            dtype,
            rows_per_shard,
            shards,
        })
    }

    /// Uploads a whole f32 table `(rows, dim)`, converting to `dtype`.
    pub fn upload(
        ctx: &GpuContext,
        label: &str,
        data: &[f32],
        rows: usize,
        dim: usize,
        dtype: GpuDtype,
    ) -> Result<Self, GpuError> {
        memlayer_core::error::check_len("table", data, &[rows, dim])?;
        let table = Self::zeroed(ctx, label, rows, dim, dtype, 1)?;
        table.write_rows(ctx, 0, &encode_rows(data, dim, dtype))?;
        Ok(table)
    }

    /// u32 words per row.
    pub fn row_words(&self) -> usize {
        self.dtype.row_words(self.dim)
    }

    /// Writes encoded rows (`words`, a multiple of `row_words()`) starting at
    /// `first_row`, splitting the write across shards.
    pub fn write_rows(
        &self,
        ctx: &GpuContext,
        first_row: usize,
        words: &[u32],
    ) -> Result<(), GpuError> {
        let rw = self.row_words();
        if rw == 0 || !words.len().is_multiple_of(rw) || first_row + words.len() / rw > self.rows {
            return Err(GpuError::Invalid(format!(
                "write of {} words at row {first_row} does not fit a table of {} rows × {rw} words",
                words.len(),
                self.rows
            )));
        }
        let mut row = first_row;
        let mut rest = words;
        while !rest.is_empty() {
            let shard = row / self.rows_per_shard;
            let in_shard = row % self.rows_per_shard;
            let n = (self.rows_per_shard - in_shard).min(rest.len() / rw);
            let (now, later) = rest.split_at(n * rw);
            ctx.queue.write_buffer(
                &self.shards[shard],
                (in_shard * rw * 4) as u64,
                bytemuck::cast_slice(now),
            );
            rest = later;
            row += n;
        }
        Ok(())
    }

    /// Copies runs of `unit_rows` rows from `src` (same dim and dtype, both
    /// sharded with units of `unit_rows`, so a unit lies in one shard of
    /// each): for each `(from, to)`, unit `from` of `src` into unit `to` of
    /// `self`, on the device (one submission; no read-back).
    pub fn copy_units_from(
        &self,
        ctx: &GpuContext,
        src: &ShardedTable,
        unit_rows: usize,
        pairs: &[(usize, usize)],
    ) -> Result<(), GpuError> {
        let rw = self.row_words();
        let fits = |t: &ShardedTable, unit: usize| {
            (unit + 1) * unit_rows <= t.rows && t.rows_per_shard.is_multiple_of(unit_rows.max(1))
        };
        if src.dim != self.dim || src.dtype != self.dtype || unit_rows == 0 {
            return Err(GpuError::Invalid(format!(
                "copying units of {unit_rows} rows between tables of {} and {} values per row",
                src.dim, self.dim
            )));
        }
        if let Some(&(from, to)) = pairs
            .iter()
            .find(|&&(from, to)| !fits(src, from) || !fits(self, to))
        {
            return Err(GpuError::Invalid(format!(
                "unit {from} of {} rows → unit {to} of {} rows (units of {unit_rows})",
                src.rows, self.rows
            )));
        }
        let at = |t: &ShardedTable, unit: usize| {
            let row = unit * unit_rows;
            (
                row / t.rows_per_shard,
                ((row % t.rows_per_shard) * rw * 4) as u64,
            )
        };
        let bytes = (unit_rows * rw * 4) as u64;
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("copy table units"),
            });
        for &(from, to) in pairs {
            let (s_shard, s_off) = at(src, from);
            let (d_shard, d_off) = at(self, to);
            enc.copy_buffer_to_buffer(
                &src.shards[s_shard],
                s_off,
                &self.shards[d_shard],
                d_off,
                bytes,
            );
        }
        ctx.queue.submit([enc.finish()]);
        Ok(())
    }

    /// Reads the whole table back as f32 `(rows, dim)`.
    pub fn download(&self, ctx: &GpuContext) -> Result<Vec<f32>, GpuError> {
        let rw = self.row_words();
        let mut words = Vec::with_capacity(self.rows * rw);
        for (s, buf) in self.shards.iter().enumerate() {
            let r = self.rows_per_shard.min(self.rows - s * self.rows_per_shard);
            words.extend(read_back::<u32>(ctx, buf, 0, r * rw)?);
        }
        Ok(decode_rows(&words, self.dim, self.dtype))
    }
}

/// Encodes f32 rows `(rows, dim)` as device words.
pub fn encode_rows(data: &[f32], dim: usize, dtype: GpuDtype) -> Vec<u32> {
    match dtype {
        GpuDtype::F32 => bytemuck::cast_slice(data).to_vec(),
        GpuDtype::F16 | GpuDtype::Bf16 => {
            let rw = dtype.row_words(dim);
            let mut out = Vec::with_capacity(data.len().div_ceil(2.max(dim)) * rw);
            for row in data.chunks_exact(dim.max(1)) {
                for pair in 0..rw {
                    let lo = dtype.half_bits(row[2 * pair]);
                    let hi = row.get(2 * pair + 1).map_or(0, |&v| dtype.half_bits(v));
                    out.push(lo | (hi << 16));
                }
            }
            out
        }
    }
}

/// Decodes device words into f32 rows `(rows, dim)`.
pub fn decode_rows(words: &[u32], dim: usize, dtype: GpuDtype) -> Vec<f32> {
    match dtype {
        GpuDtype::F32 => bytemuck::cast_slice(words).to_vec(),
        GpuDtype::F16 | GpuDtype::Bf16 => {
            let rw = dtype.row_words(dim);
            let mut out = Vec::with_capacity(words.len() * 2);
            for row in words.chunks_exact(rw.max(1)) {
                for c in 0..dim {
                    let w = row[c / 2];
                    let bits = if c % 2 == 0 { w & 0xffff } else { w >> 16 };
                    out.push(dtype.widen_half(bits as u16));
                }
            }
            out
        }
    }
}
