//! `memlayer serve`: a model directory (and the web app) over HTTP with
//! Range support on 127.0.0.1.

use crate::open::config_has_memory_layers;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

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
    /// Answer a Range of several ranges with the whole file (200), as a
    /// server or CDN without multi-range support does (clients then send
    /// one request per range).
    #[arg(long)]
    pub no_multi_range: bool,
    /// Hold every reply this many milliseconds: a network round trip on
    /// 127.0.0.1, for latency-shaped benchmarks.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub delay_ms: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if !args.dir.join("config.json").is_file() {
        bail!(
            "{} is not a model directory (no config.json)",
            args.dir.display()
        );
    }
    // The server serves files as they are; the model is checked by whoever
    // reads it. A config.json that does not parse is taken to have memory.
    let memory_layers = config_has_memory_layers(&args.dir).unwrap_or(true);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    let mut config = memlayer_http::ServeConfig::new(addr).mount("/model/", &args.dir);
    config.verbose = args.verbose;
    config.max_connections = args.max_connections as usize;
    config.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_secs);
    config.write_timeout = std::time::Duration::from_secs(args.write_timeout_secs);
    config.cors_origins = args.cors_origins.clone();
    config.multi_range = !args.no_multi_range;
    config.delay = std::time::Duration::from_millis(args.delay_ms);
    if args.web.is_dir() {
        config = config.mount("/", &args.web);
    }
    let server = memlayer_http::Server::start(config).context("starting the server")?;
    let url = server.url();
    println!("serving {} at {url}/model/", args.dir.display());
    if memory_layers {
        println!("  bank: {url}/model/memory.bank (HTTP Range)");
    } else {
        println!("  bank: none (the model has no memory layers)");
    }
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
