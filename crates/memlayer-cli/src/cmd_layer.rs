//! `memlayer layer ...`: run a single memory layer.
//!
//! `memlayer layer run --weights W.safetensors --knn K --input X.safetensors --out Y.safetensors`
//! loads one facebookresearch/memory `HashingMemory` layer from its state dict
//! (Meta's parameter names; see `memlayer_core::interop`), runs the CPU oracle
//! on `input` and writes:
//! - `output`  (input's shape: `(tokens, dim)` or `(1, tokens, dim)`; f32)
//! - `indices` (tokens, heads, knn; i64) the selected value rows, best first
//! - `scores`  (tokens, heads, knn; f32) their pre-softmax scores (Meta's `get_indices`)

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use memlayer_core::interop;
use safetensors::{Dtype, tensor::TensorView};

#[derive(Subcommand)]
pub enum LayerCommand {
    /// Run one product-key memory layer (a facebookresearch/memory `HashingMemory`
    /// state dict in safetensors) on the tensor `input` of a safetensors file.
    Run(RunArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Safetensors state dict of one `HashingMemory` layer (`keys`, `values.weight`,
    /// `query_proj.query_mlps.0.*`, `swilu_projection.*`, `value_proj.*`, optional `gating.*`).
    #[arg(long, value_name = "W.safetensors")]
    pub weights: PathBuf,
    /// Rows read per head (Meta's `mem_knn`; not stored in a state dict). 1..=n_keys.
    #[arg(long, value_name = "K")]
    pub knn: usize,
    /// Safetensors file with tensor `input`: (tokens, dim) or (1, tokens, dim); f32, f16 or bf16.
    #[arg(long, value_name = "X.safetensors")]
    pub input: PathBuf,
    /// Where to write `output` (input's shape, f32), `indices` (tokens, heads, knn; i64)
    /// and `scores` (tokens, heads, knn; f32, pre-softmax).
    #[arg(long, value_name = "Y.safetensors")]
    pub out: PathBuf,
    /// Prefix of the layer's tensor names in the state dict, e.g. `layers.6.feed_forward.memory.`.
    #[arg(long, default_value = "")]
    pub prefix: String,
}

pub fn run(command: LayerCommand) -> anyhow::Result<()> {
    match command {
        LayerCommand::Run(args) => run_layer(&args),
    }
}

fn run_layer(args: &RunArgs) -> anyhow::Result<()> {
    let weights = std::fs::read(&args.weights)
        .with_context(|| format!("cannot read weights {}", args.weights.display()))?;
    let layer = interop::load_hashing_memory_prefixed(&weights, &args.prefix, args.knn)
        .with_context(|| {
            format!(
                "cannot load a HashingMemory layer from {}",
                args.weights.display()
            )
        })?;
    drop(weights);
    let input_bytes = std::fs::read(&args.input)
        .with_context(|| format!("cannot read input {}", args.input.display()))?;
    let input = interop::load_layer_input(&input_bytes, layer.config.dim)
        .with_context(|| format!("bad input {}", args.input.display()))?;
    let fwd = layer
        .forward(&input.data, input.tokens)
        .context("the layer cannot run on this input")?;

    let c = &layer.config;
    let output: Vec<u8> = fwd.output.iter().flat_map(|v| v.to_le_bytes()).collect();
    let indices: Vec<u8> = fwd
        .indices
        .iter()
        .flat_map(|&i| i64::from(i).to_le_bytes())
        .collect();
    let scores: Vec<u8> = fwd.scores.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sel_shape = vec![input.tokens, c.heads, c.knn];
    let tensors = [
        (
            "output",
            TensorView::new(Dtype::F32, input.shape.clone(), &output)?,
        ),
        (
            "indices",
            TensorView::new(Dtype::I64, sel_shape.clone(), &indices)?,
        ),
        ("scores", TensorView::new(Dtype::F32, sel_shape, &scores)?),
    ];
    let metadata = HashMap::from([
        ("knn".to_string(), c.knn.to_string()),
        (
            "config".to_string(),
            format!(
                "dim={} v_dim={} heads={} n_keys={} k_dim={} knn={} gated={}",
                c.dim, c.v_dim, c.heads, c.n_keys, c.k_dim, c.knn, c.gated
            ),
        ),
        (
            "producer".to_string(),
            format!(
                "memlayer {} layer run (CPU oracle)",
                env!("CARGO_PKG_VERSION")
            ),
        ),
    ]);
    let bytes =
        safetensors::serialize(tensors, Some(metadata)).context("cannot serialize the outputs")?;
    std::fs::write(&args.out, bytes)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "{} tokens through layer dim={} v_dim={} heads={} n_keys={} k_dim={} knn={}{} -> {}",
        input.tokens,
        c.dim,
        c.v_dim,
        c.heads,
        c.n_keys,
        c.k_dim,
        c.knn,
        if c.gated { " gated" } else { "" },
        args.out.display()
    );
    Ok(())
}
