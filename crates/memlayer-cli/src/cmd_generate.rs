//! `memlayer generate` and `memlayer chat`: text from a model directory with
//! its memory paged in on demand (local file or HTTP Range) under a budget.

use crate::cmd_train::Backend;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use memlayer_bank::{BankReader, FileSource, PageSource};
use memlayer_model::MemoryOps;
use memlayer_runtime::paged::{MAX_FETCH_THREADS, PagedMemory, PagedOptions, PoolDevice};
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
    #[arg(long, conflicts_with = "budget_percent", value_parser = parse_positive)]
    pub budget_mb: Option<f64>,
    /// Resident memory budget in percent of the bank's f32 size (default 100).
    #[arg(long, value_parser = parse_percent)]
    pub budget_percent: Option<f64>,
    /// Where the model runs and the page slots live.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// Pages fetched concurrently (0: 1 for a file, 8 for a URL; at most 64).
    #[arg(long, default_value_t = 0, value_parser = parse_fetch_threads)]
    pub fetch_threads: usize,
}

/// `--fetch-threads`: 0 (automatic) or 1..=`MAX_FETCH_THREADS`, refused
/// while parsing flags, before a model is opened.
fn parse_fetch_threads(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n > MAX_FETCH_THREADS {
        return Err(format!("{n} is more than {MAX_FETCH_THREADS}"));
    }
    Ok(n)
}

/// A finite number ≥ 0 (temperature).
fn parse_non_negative(s: &str) -> std::result::Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x.is_finite() && x >= 0.0) {
        return Err(format!("{s} is not a finite number >= 0"));
    }
    Ok(x)
}

/// A number in (0, 1] (top-p).
fn parse_unit_mass(s: &str) -> std::result::Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x > 0.0 && x <= 1.0) {
        return Err(format!("{s} is not in (0, 1]"));
    }
    Ok(x)
}

/// A finite number > 0 (a budget in MiB).
fn parse_positive(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x.is_finite() && x > 0.0) {
        return Err(format!("{s} is not a finite number > 0"));
    }
    Ok(x)
}

/// A percentage in (0, 100].
pub fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x > 0.0 && x <= 100.0) {
        return Err(format!("{s} is not a percentage in (0, 100]"));
    }
    Ok(x)
}

/// Sampling flags.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_non_negative)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = parse_unit_mass)]
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

/// What a `--source` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A local bank file (`file` = the model directory's memory.bank).
    Path(PathBuf),
    /// An http(s):// URL, read with Range requests.
    Url(String),
}

impl SourceSpec {
    /// Reads `--source`: `file`, a path, or a URL. A URL scheme is matched
    /// without regard to case (`HTTP://` is a URL); any scheme other than
    /// http and https is refused by name instead of being taken for a path.
    pub fn parse(dir: &Path, source: &str) -> Result<Self> {
        if source == "file" {
            return Ok(Self::Path(dir.join("memory.bank")));
        }
        if let Some((scheme, _)) = source.split_once("://") {
            let is_scheme = scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if is_scheme {
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
                    return Ok(Self::Url(source.to_owned()));
                }
                bail!(
                    "--source {source}: unsupported URL scheme {scheme}:// (a bank is read from a file path or an http:// or https:// URL)"
                );
            }
        }
        Ok(Self::Path(PathBuf::from(source)))
    }

    /// Whether pages come over the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Url(_))
    }

    /// Opens the page source.
    pub fn open(&self) -> Result<Box<dyn PageSource>> {
        match self {
            Self::Url(url) => {
                let s = memlayer_http::HttpSource::open(url)
                    .with_context(|| format!("opening the bank at {url}"))?;
                Ok(Box::new(s))
            }
            Self::Path(path) => {
                let s = FileSource::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Ok(Box::new(s))
            }
        }
    }
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
    let spec = SourceSpec::parse(dir, &args.source)?;
    let src = spec.open()?;
    let location = src.describe();
    let bank = BankReader::open(src).with_context(|| format!("reading the bank at {location}"))?;
    let bank_bytes = memlayer_runtime::resident_bytes(&bank);
    let budget_bytes = match (args.budget_mb, args.budget_percent) {
        (Some(mb), _) => (mb * 1024.0 * 1024.0) as u64,
        (None, Some(p)) => (bank_bytes as f64 * p / 100.0) as u64,
        (None, None) => bank_bytes,
    };
    let remote = spec.is_remote();
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
    let src = spec.open()?;
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
    let mut stdin = std::io::stdin().lock();
    let mut raw = Vec::new();
    let mut turn = 0u64;
    loop {
        eprint!("> ");
        raw.clear();
        if std::io::BufRead::read_until(&mut stdin, b'\n', &mut raw)
            .context("reading a line from stdin")?
            == 0
        {
            break;
        }
        let line = match std::str::from_utf8(&raw) {
            Ok(line) => line,
            Err(e) => {
                // Not text: say so and wait for the next line.
                eprintln!(
                    "error: that line is not UTF-8 text (invalid byte {:#04x} at byte {}); type it again",
                    raw[e.valid_up_to()],
                    e.valid_up_to()
                );
                continue;
            }
        };
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
    /// Connections open at once; one more gets a 503 and is closed. Lowered
    /// to what the open-files limit (ulimit -n) allows.
    #[arg(long, default_value_t = memlayer_http::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a connection may take to send a request (new, or idle
    /// between requests) before it is closed.
    #[arg(long, default_value_t = memlayer_http::DEFAULT_IDLE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,
    /// Seconds a client may take no byte of a reply before its connection
    /// is closed.
    #[arg(long, default_value_t = memlayer_http::DEFAULT_WRITE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_secs: u64,
    /// Let web pages of this origin (e.g. http://localhost:3000) read the
    /// served files; repeatable. Default: none, only the web app served here.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
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
    config.max_connections = args.max_connections as usize;
    config.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_secs);
    config.write_timeout = std::time::Duration::from_secs(args.write_timeout_secs);
    config.cors_origins = args.cors_origins.clone();
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
    println!(
        "  limits: {} connections, idle timeout {} s, write timeout {} s",
        server.max_connections(),
        args.idle_timeout_secs,
        args.write_timeout_secs
    );
    if args.cors_origins.is_empty() {
        println!("  CORS: off (only pages served from {url} can read these files)");
    } else {
        println!(
            "  CORS: pages of {} may read these files",
            args.cors_origins.join(", ")
        );
    }
    println!("Ctrl-C stops.");
    server.wait().context("serving")?;
    Ok(())
}
