//! `memlayer generate` and `memlayer chat`: text from a model directory with
//! its memory paged in on demand (local file or HTTP Range) under a budget.

use crate::cmd_train::Backend;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use memlayer_core::bank::{BankReader, FileSource, PageSource};
use memlayer_model::MemoryOps;
use memlayer_runtime::paged::{PagedMemory, PagedOptions, PoolDevice};
use memlayer_runtime::{Generation, Generator, MemoryStats, Sampling};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the memory comes from and how much of it may be resident.
#[derive(Args, Clone, Debug)]
pub struct MemoryArgs {
    /// The bank: `file` (the directory's memory.bank), a path, or an
    /// http(s):// URL (read with Range requests, e.g. from `memlayer serve`).
    #[arg(long, default_value = "file")]
    pub source: String,
    /// Resident memory budget in MiB (value pages + blocks, f32).
    #[arg(long, conflicts_with = "budget_percent")]
    pub budget_mb: Option<f64>,
    /// Resident memory budget in percent of the bank's f32 size (default 100).
    #[arg(long)]
    pub budget_percent: Option<f64>,
    /// Where the model runs and the page slots live.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// Pages fetched concurrently (0: 1 for a file, 8 for a URL).
    #[arg(long, default_value_t = 0)]
    pub fetch_threads: usize,
}

/// Sampling flags.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (config, dense weights, tokenizer; the bank unless --source says otherwise).
    pub dir: PathBuf,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop after the first line of output.
    #[arg(long)]
    pub line: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    /// Model directory.
    pub dir: PathBuf,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The page source a `--source` names.
pub fn open_source(dir: &Path, source: &str) -> Result<Box<dyn PageSource>> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let s = memlayer_http::HttpSource::open(source)
            .with_context(|| format!("opening the bank at {source}"))?;
        return Ok(Box::new(s));
    }
    let path = if source == "file" {
        dir.join("memory.bank")
    } else {
        PathBuf::from(source)
    };
    let s = FileSource::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(s))
}

/// Device, ops and page-pool placement of a backend (wgpu: one shared device).
pub fn runtime_device(backend: Backend) -> Result<(Device, MemoryOps, PoolDevice)> {
    match backend {
        Backend::Cpu => {
            let device = Device::flex();
            let ops = MemoryOps::best_for(&device);
            Ok((device, ops, PoolDevice::Host))
        }
        Backend::Wgpu => {
            let ctx = memlayer_wgpu::GpuContext::new(&memlayer_wgpu::GpuOptions {
                adapter_features: true,
                ..Default::default()
            })
            .context("no wgpu adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers)")?;
            let device = memlayer_model::gpu::burn_device(&ctx).map_err(anyhow::Error::msg)?;
            let ops = MemoryOps::best_for(&device);
            Ok((device, ops, PoolDevice::Wgpu(Arc::new(ctx))))
        }
    }
}

/// A model directory opened with paged memory.
pub struct Opened {
    pub generator: Generator,
    pub memory: Arc<PagedMemory>,
    /// Bytes of the bank when fully resident (f32).
    pub bank_bytes: u64,
}

/// Opens `dir` with its memory paged per `args` (`prefetch`: reserve block prefetch).
pub fn open_paged(dir: &Path, args: &MemoryArgs, prefetch: bool) -> Result<Opened> {
    let (device, ops, pool) = runtime_device(args.backend)?;
    let src = open_source(dir, &args.source)?;
    let location = src.describe();
    let bank = BankReader::open(src).with_context(|| format!("reading the bank at {location}"))?;
    let bank_bytes = memlayer_runtime::resident_bytes(&bank);
    let budget_bytes = match (args.budget_mb, args.budget_percent) {
        (Some(mb), _) => (mb * 1024.0 * 1024.0) as u64,
        (None, Some(p)) => (bank_bytes as f64 * p / 100.0) as u64,
        (None, None) => bank_bytes,
    };
    let remote = args.source.starts_with("http://") || args.source.starts_with("https://");
    let fetch_threads = match args.fetch_threads {
        0 if remote => 8,
        0 => 1,
        n => n,
    };
    let opts = PagedOptions {
        budget_bytes,
        fetch_threads,
        prefetch,
        device: pool,
    };
    drop(bank);
    let src = open_source(dir, &args.source)?;
    let (generator, memory) = memlayer_runtime::open_paged(dir, Some(src), opts, &device, ops)
        .with_context(|| format!("opening {}", dir.display()))?;
    Ok(Opened {
        generator,
        memory,
        bank_bytes,
    })
}

/// One line of stats.
pub fn stats_line(g: &Generation, st: &MemoryStats, mem: &PagedMemory) -> String {
    format!(
        "[{} prompt + {} tokens, first token {:.2} s, {:.1} tok/s | hit rate {:.1}% | pages resident {}/{} | {:.2} MiB streamed in {} pages | budget {:.2} MiB on {}]",
        g.prompt_tokens,
        g.tokens.len(),
        g.first_token_seconds,
        g.decode_tokens_per_second(),
        100.0 * st.hit_rate(),
        mem.resident_pages(),
        mem.value_pages(),
        st.bytes_streamed as f64 / (1024.0 * 1024.0),
        st.pages_streamed,
        mem.budget_bytes() as f64 / (1024.0 * 1024.0),
        mem.pool_name(),
    )
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    let o = open_paged(&args.dir, &args.memory, false)?;
    let mut out = std::io::stdout();
    print!("{}", args.prompt);
    out.flush().ok();
    let g = o
        .generator
        .generate(
            &args.prompt,
            &args.sampling.sampling(),
            args.line.then_some("\n"),
            |piece| {
                print!("{piece}");
                out.flush().ok();
            },
        )
        .context("generating")?;
    println!();
    eprintln!("{}", stats_line(&g, &o.memory.stats(), &o.memory));
    Ok(())
}

pub fn run_chat(args: ChatArgs) -> Result<()> {
    let o = open_paged(&args.dir, &args.memory, false)?;
    eprintln!(
        "memlayer chat: {} (memory from {}, budget {:.2} MiB of {:.2} MiB). Empty line or Ctrl-D quits.",
        args.dir.display(),
        o.memory.location(),
        o.memory.budget_bytes() as f64 / (1024.0 * 1024.0),
        o.bank_bytes as f64 / (1024.0 * 1024.0)
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            break;
        }
        let prompt = line.trim_end_matches(['\n', '\r']);
        if prompt.is_empty() {
            break;
        }
        let before = o.memory.stats();
        let mut out = std::io::stdout();
        print!("{prompt}");
        out.flush().ok();
        let sampling = Sampling {
            seed: args.sampling.seed.wrapping_add(turn),
            ..args.sampling.sampling()
        };
        match o
            .generator
            .generate(prompt, &sampling, Some("\n"), |piece| {
                print!("{piece}");
                out.flush().ok();
            }) {
            Ok(g) => {
                println!();
                let after = o.memory.stats();
                let turn_stats = MemoryStats {
                    value_accesses: after.value_accesses - before.value_accesses,
                    value_hits: after.value_hits - before.value_hits,
                    block_requests: after.block_requests - before.block_requests,
                    block_hits: after.block_hits - before.block_hits,
                    pages_streamed: after.pages_streamed - before.pages_streamed,
                    bytes_streamed: after.bytes_streamed - before.bytes_streamed,
                    ..after
                };
                eprintln!("{}", stats_line(&g, &turn_stats, &o.memory));
            }
            Err(e) => {
                println!();
                eprintln!("error: {e}");
            }
        }
        turn += 1;
    }
    Ok(())
}

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory, served under /model/.
    pub dir: PathBuf,
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The web app to serve at / (the browser chat).
    #[arg(long, default_value = "web")]
    pub web: PathBuf,
    /// Log every request.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run_serve(args: ServeArgs) -> Result<()> {
    if !args.dir.join("config.json").is_file() {
        bail!(
            "{} is not a model directory (no config.json)",
            args.dir.display()
        );
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    let mut config = memlayer_http::ServeConfig::new(addr).mount("/model/", &args.dir);
    config.verbose = args.verbose;
    if args.web.is_dir() {
        config = config.mount("/", &args.web);
    }
    let server = memlayer_http::Server::start(config).context("starting the server")?;
    let url = server.url();
    println!("serving {} at {url}/model/", args.dir.display());
    println!("  bank: {url}/model/memory.bank (HTTP Range)");
    if args.web.is_dir() {
        println!("  web app: {url}/ (from {})", args.web.display());
    }
    println!("Ctrl-C stops.");
    server.wait().context("serving")?;
    Ok(())
}
