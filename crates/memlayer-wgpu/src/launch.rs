//! One launcher for every kernel sequence.
//!
//! A kernel sequence (product-key selection, embedding-bag forward, reverse
//! index, bag backward, lookup backward) is written once, generic over
//! [`Launcher`]: what it needs is to dispatch a registry kernel
//! ([`crate::shaders`]) with its parameter struct, its buffers and a
//! workgroup count, and to get scratch buffers. Two implementations:
//!
//! - [`RawLauncher`] (here): a wgpu command encoder and memlayer-wgpu's own
//!   buffers; pipelines built once per [`Kernels`], bind groups and parameter
//!   buffers cached (see [`Kernels`]), one compute pass per sequence (wgpu
//!   orders the dispatches of a pass that share buffers);
//! - cubecl's (`memlayer-model`'s `ops::wgsl`): burn's buffers and stream.
//!
//! Grids beyond the per-dimension limit are folded once, in [`Grid::cover`]:
//! kernels recover the linear workgroup id as `y * x_groups + x` from their
//! `x_groups` parameter and skip ids past the count.

use crate::buffers::{Kernel, storage_zeroed};
use crate::context::{GpuContext, GpuError};
use crate::shaders::{Variant, WgslParams};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use wgpu::util::DeviceExt;

/// A workgroup grid `(x, y, 1)` covering a linear count of workgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Workgroups along x (the kernels' `x_groups` parameter).
    pub x: u32,
    /// Workgroups along y.
    pub y: u32,
}

impl Grid {
    /// `(x, y)` workgroups covering `groups` within `max` per dimension (at
    /// least one workgroup); an error when even `max × max` does not.
    pub fn cover(groups: usize, max: u32) -> Result<Self, GpuError> {
        let max = max.max(1);
        let n = u32::try_from(groups)
            .map_err(|_| GpuError::Invalid(format!("{groups} workgroups exceed u32")))?;
        if n <= max {
            Ok(Self { x: n.max(1), y: 1 })
        } else if n.div_ceil(max) <= max {
            Ok(Self {
                x: max,
                y: n.div_ceil(max),
            })
        } else {
            Err(GpuError::Invalid(format!(
                "{groups} workgroups exceed a {max} × {max} grid"
            )))
        }
    }
}

/// `n` as a u32 kernel parameter, or an error naming `what`.
pub fn u32_of(what: &str, n: usize) -> Result<u32, GpuError> {
    u32::try_from(n)
        .map_err(|_| GpuError::Invalid(format!("{what}: {n} exceeds the kernels' u32 range")))
}

/// What a kernel sequence needs from a device: dispatches of registry
/// kernels and scratch buffers.
pub trait Launcher {
    /// A buffer handle (bound whole).
    type Buffer: Clone;

    /// Largest workgroup count per grid dimension.
    fn max_groups(&self) -> u32;

    /// The grid covering `groups` workgroups ([`Grid::cover`]).
    fn grid(&self, groups: usize) -> Result<Grid, GpuError> {
        Grid::cover(groups, self.max_groups())
    }

    /// A zero-filled buffer of at least `bytes` bytes (at least 4).
    fn zeroed(&mut self, label: &'static str, bytes: u64) -> Result<Self::Buffer, GpuError>;

    /// A buffer of at least `bytes` bytes (at least 4) whose contents are
    /// undefined: for outputs a kernel writes in full (zero-filled unless the
    /// launcher has cheaper memory).
    fn scratch(&mut self, label: &'static str, bytes: u64) -> Result<Self::Buffer, GpuError> {
        self.zeroed(label, bytes)
    }

    /// A buffer holding `words`.
    fn upload(&mut self, label: &'static str, words: &[u32]) -> Result<Self::Buffer, GpuError>;

    /// A small buffer for bindings the kernel does not read (e.g. the page
    /// table of a flat bag); never bound where the kernel writes.
    fn unused(&mut self) -> Result<Self::Buffer, GpuError>;

    /// One dispatch of `kernel` over `grid`: `params` (the kernel's `Params`
    /// struct, bytes) at binding 0, `buffers[i]` at binding `i + 1`.
    fn dispatch(
        &mut self,
        kernel: Variant,
        params: &[u8],
        buffers: &[&Self::Buffer],
        grid: Grid,
    ) -> Result<(), GpuError>;

    /// [`Launcher::dispatch`] with the kernel's host `Params` struct, which
    /// must be the one its shader's `struct Params` is generated from.
    fn launch<P: WgslParams>(
        &mut self,
        kernel: Variant,
        params: &P,
        buffers: &[&Self::Buffer],
        grid: Grid,
    ) -> Result<(), GpuError> {
        if P::FIELDS != kernel.shader.params {
            return Err(GpuError::Invalid(format!(
                "{}: launched with parameters {:?}, its shader declares {:?}",
                kernel.label(),
                P::FIELDS,
                kernel.shader.params
            )));
        }
        self.dispatch(kernel, bytemuck::bytes_of(params), buffers, grid)
    }
}

/// Counters of what a [`Kernels`] set created on the device (for tests and
/// profiling: a repeated call with the same buffers and shapes must not
/// create anything).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchStats {
    /// Bind groups created.
    pub bind_groups: u64,
    /// Buffers created (parameter buffers, pooled inputs, staging).
    pub buffers: u64,
    /// Dispatches recorded.
    pub dispatches: u64,
}

#[derive(Default)]
struct Counters {
    bind_groups: AtomicU64,
    buffers: AtomicU64,
    dispatches: AtomicU64,
}

/// What a cached bind group binds: the kernel, its parameter bytes and its buffers.
#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    kernel: Variant,
    params: Vec<u8>,
    buffers: Vec<wgpu::Buffer>,
}

/// Bind groups kept at most; past this the cache starts over (a cached group
/// keeps its buffers alive, so the cache stays small).
const MAX_CACHED_BIND_GROUPS: usize = 64;

/// Pipelines of a set of registry variants, built once, with a cache of
/// bind groups keyed on (kernel, parameter bytes, buffers bound): a repeated
/// dispatch with the same parameters and buffers reuses its bind group and
/// its (immutable) parameter buffer, so it creates nothing on the device.
/// Two dispatches with different parameters never share a parameter buffer,
/// so any number of sequences may be recorded before a submit. Dispatches
/// that bind a scratch buffer the launcher itself just created (reverse
/// index, backward) are not cached: they can never repeat.
pub struct Kernels {
    pipelines: HashMap<Variant, Kernel>,
    groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
    unused: wgpu::Buffer,
    counters: Counters,
}

impl Kernels {
    /// Builds the pipelines of `variants` (errors name the kernel).
    pub fn new(
        ctx: &GpuContext,
        variants: impl IntoIterator<Item = Variant>,
    ) -> Result<Self, GpuError> {
        let mut pipelines = HashMap::new();
        for v in variants {
            if pipelines.contains_key(&v) {
                continue;
            }
            let constants = v.constants();
            let kernel = Kernel::new(
                ctx,
                v.shader.name,
                &v.shader.text(),
                v.shader.entry,
                &constants,
            )?;
            pipelines.insert(v, kernel);
        }
        let counters = Counters::default();
        counters.buffers.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            pipelines,
            groups: Mutex::new(HashMap::new()),
            // 16 bytes: the smallest binding of an array of vec4
            unused: storage_zeroed(ctx, "memlayer unused binding", 16),
            counters,
        })
    }

    /// A launcher recording into `encoder` (one compute pass, ended when the
    /// launcher is dropped).
    pub fn launcher<'a>(
        &'a self,
        ctx: &'a GpuContext,
        encoder: &'a mut wgpu::CommandEncoder,
    ) -> RawLauncher<'a> {
        RawLauncher {
            ctx,
            kernels: self,
            encoder,
            pass: None,
            fresh: Vec::new(),
        }
    }

    /// What this set created and recorded so far.
    pub fn stats(&self) -> LaunchStats {
        LaunchStats {
            bind_groups: self.counters.bind_groups.load(Ordering::Relaxed),
            buffers: self.counters.buffers.load(Ordering::Relaxed),
            dispatches: self.counters.dispatches.load(Ordering::Relaxed),
        }
    }

    /// Counts a buffer created on behalf of this set (pooled inputs, staging).
    pub(crate) fn count_buffer(&self) {
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
    }

    /// The bind group of `kernel` with `params` and `buffers`, cached.
    fn bind_group(
        &self,
        ctx: &GpuContext,
        kernel: Variant,
        pipeline: &Kernel,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        cache: bool,
    ) -> wgpu::BindGroup {
        let key = BindKey {
            kernel,
            params: params.to_vec(),
            buffers: buffers.iter().map(|&b| b.clone()).collect(),
        };
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = groups.get(&key) {
            return g.clone();
        }
        let params_buf = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("memlayer params"),
                contents: params,
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params_buf.as_entire_binding(),
        }];
        entries.extend(
            buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: b.as_entire_binding(),
                }),
        );
        let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.shader.name),
            layout: &pipeline.layout,
            entries: &entries,
        });
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        self.counters.bind_groups.fetch_add(1, Ordering::Relaxed);
        if cache {
            if groups.len() >= MAX_CACHED_BIND_GROUPS {
                groups.clear();
            }
            groups.insert(key, group.clone());
        }
        group
    }
}

/// [`Launcher`] on raw wgpu: records into a command encoder, all dispatches
/// of one launcher in one compute pass.
pub struct RawLauncher<'a> {
    ctx: &'a GpuContext,
    kernels: &'a Kernels,
    encoder: &'a mut wgpu::CommandEncoder,
    pass: Option<wgpu::ComputePass<'static>>,
    /// buffers this launcher created (bind groups binding them are not cached)
    fresh: Vec<wgpu::Buffer>,
}

impl RawLauncher<'_> {
    /// Ends the compute pass (if any), e.g. before the encoder records a copy.
    pub fn end_pass(&mut self) {
        self.pass = None;
    }

    /// The encoder (the pass is ended first).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.end_pass();
        self.encoder
    }
}

impl Drop for RawLauncher<'_> {
    fn drop(&mut self) {
        self.end_pass();
    }
}

impl Launcher for RawLauncher<'_> {
    type Buffer = wgpu::Buffer;

    fn max_groups(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    fn zeroed(&mut self, label: &'static str, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        self.kernels.count_buffer();
        let b = storage_zeroed(self.ctx, label, bytes);
        self.fresh.push(b.clone());
        Ok(b)
    }

    fn upload(&mut self, label: &'static str, words: &[u32]) -> Result<wgpu::Buffer, GpuError> {
        self.kernels.count_buffer();
        let b = crate::buffers::storage_init(self.ctx, label, words);
        self.fresh.push(b.clone());
        Ok(b)
    }

    fn unused(&mut self) -> Result<wgpu::Buffer, GpuError> {
        Ok(self.kernels.unused.clone())
    }

    fn dispatch(
        &mut self,
        kernel: Variant,
        params: &[u8],
        buffers: &[&wgpu::Buffer],
        grid: Grid,
    ) -> Result<(), GpuError> {
        let pipeline =
            self.kernels.pipelines.get(&kernel).ok_or_else(|| {
                GpuError::Invalid(format!("kernel {} was not built", kernel.label()))
            })?;
        if buffers.len() + 1 != kernel.shader.bindings.len() {
            return Err(GpuError::Invalid(format!(
                "kernel {} binds {} buffers, {} given",
                kernel.label(),
                kernel.shader.bindings.len() - 1,
                buffers.len()
            )));
        }
        let cache = !buffers.iter().any(|b| self.fresh.contains(b));
        let group = self
            .kernels
            .bind_group(self.ctx, kernel, pipeline, params, buffers, cache);
        let pass = self.pass.get_or_insert_with(|| {
            self.encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("memlayer sequence"),
                    timestamp_writes: None,
                })
                .forget_lifetime()
        });
        pass.set_pipeline(&pipeline.pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(grid.x, grid.y, 1);
        self.kernels
            .counters
            .dispatches
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
