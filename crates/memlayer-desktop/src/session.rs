//! The engine side of the app: one thread that owns the opened model (the
//! runtime's [`Generator`] and its [`PagedMemory`]) and runs what the UI
//! asks, so the window never waits on a decode. Commands go in over a
//! channel; events come back with every piece of text and what the memory
//! did for it (the trace of [`PagedMemory::take_trace`]).

use memlayer_core::model::ModelConfig;
use memlayer_runtime::open::{BankLocation, RuntimeDevice};
use memlayer_runtime::paged::{PagedMemory, PagedOptions};
use memlayer_runtime::{
    Budget, BurnDecoder, Generator, MemoryAccess, MemoryStats, Sampling, open_paged,
};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

/// How to open a model.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// The model directory.
    pub dir: PathBuf,
    /// Where its bank is read from.
    pub bank: BankLocation,
    /// The resident-page budget.
    pub budget: Budget,
    /// Run on the window's wgpu device (else the CPU).
    pub gpu: bool,
}

/// What the UI asks of the engine thread.
#[derive(Debug)]
pub enum Command {
    /// Open a model (the one open before is dropped first).
    Open(OpenRequest),
    /// Generate after a prompt.
    Generate {
        /// The prompt.
        prompt: String,
        /// Most tokens.
        max_tokens: usize,
        /// Stop at the first newline (the answer line, as `memlayer generate --line`).
        line: bool,
    },
}

/// What the engine tells the UI.
#[derive(Debug)]
pub enum Event {
    /// A model is open.
    Opened(Box<ModelInfo>),
    /// A piece of generated text and what the memory did since the last piece.
    Piece(Box<Piece>),
    /// A generation ended (or was stopped).
    Done(Done),
    /// Something failed; the message names it. The app keeps running.
    Error(String),
}

/// The opened model, as the panels show it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Where the bank is read from (`file`, a path, a URL).
    pub bank: String,
    /// Its configuration.
    pub config: ModelConfig,
    /// Where the dense model runs and the pages live.
    pub device: String,
    /// The budget in bytes.
    pub budget_bytes: u64,
    /// The bank's f32 size.
    pub bank_bytes: u64,
    /// Value pages in the bank, value slots the budget holds.
    pub value_pages: u64,
    /// Value slots the budget holds.
    pub value_slots: u32,
    /// Rows per value page (0: no product-key memory).
    pub page_rows: usize,
    /// Levels and branching of the cluster tree (hierarchical memory).
    pub tree: Option<(usize, usize)>,
}

/// One piece of text and the memory's work for it.
#[derive(Clone, Debug)]
pub struct Piece {
    /// The text.
    pub text: String,
    /// The reads since the last piece (the prompt's reads come with the first).
    pub accesses: Vec<MemoryAccess>,
    /// The value pages resident after it.
    pub resident_pages: Vec<u32>,
    /// The counters after it (cumulative since the model was opened).
    pub stats: MemoryStats,
    /// Seconds since the generation started.
    pub at_seconds: f64,
}

/// The end of a generation.
#[derive(Clone, Debug)]
pub struct Done {
    /// The generated text (the pieces joined).
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Decode speed after the first token.
    pub tokens_per_second: f64,
    /// Seconds to the first token.
    pub first_token_seconds: f64,
    /// Whether the stop button ended it.
    pub stopped: bool,
}

/// The UI's handle on the engine thread.
pub struct Session {
    commands: Sender<Command>,
    /// Events to drain every frame.
    pub events: Receiver<Event>,
    /// Set by the stop button; the engine checks it after every piece.
    pub stop: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
}

impl Session {
    /// Starts the engine thread. `gpu` is the window's device for
    /// [`OpenRequest::gpu`] (`None`: the CPU only); `wake` is called after
    /// every event (the window repaints).
    pub fn start(gpu: Option<memlayer_wgpu::GpuContext>, wake: impl Fn() + Send + 'static) -> Self {
        let (commands, rx) = channel();
        let (tx, events) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            gpu,
            opened: None,
            events: tx,
            wake: Box::new(wake),
            stop: stop.clone(),
            busy: busy.clone(),
        };
        std::thread::Builder::new()
            .name("memlayer-engine".into())
            .spawn(move || engine.run(rx))
            .expect("spawn the engine thread");
        Self {
            commands,
            events,
            stop,
            busy,
        }
    }

    /// Sends a command (ignored once the engine thread is gone).
    pub fn send(&self, command: Command) {
        if matches!(command, Command::Generate { .. } | Command::Open(_)) {
            self.busy.store(true, Ordering::SeqCst);
        }
        self.stop.store(false, Ordering::SeqCst);
        let _ = self.commands.send(command);
    }

    /// Whether a command is running.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }
}

struct Opened {
    generator: Generator<BurnDecoder>,
    memory: Option<Arc<PagedMemory>>,
}

struct Engine {
    gpu: Option<memlayer_wgpu::GpuContext>,
    opened: Option<Opened>,
    events: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
}

impl Engine {
    fn run(mut self, rx: Receiver<Command>) {
        while let Ok(command) = rx.recv() {
            let result = match command {
                Command::Open(req) => self.open(req),
                Command::Generate {
                    prompt,
                    max_tokens,
                    line,
                } => self.generate(&prompt, max_tokens, line),
            };
            if let Err(e) = result {
                self.emit(Event::Error(e));
            }
            self.busy.store(false, Ordering::SeqCst);
            (self.wake)();
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
        (self.wake)();
    }

    fn open(&mut self, req: OpenRequest) -> Result<(), String> {
        // the old model's pages and slots go first: the budget is for one model
        self.opened = None;
        let rt = match (&self.gpu, req.gpu) {
            (Some(ctx), true) => RuntimeDevice::on_wgpu(ctx.clone()),
            (None, true) => {
                return Err(
                    "the window has no wgpu device to share (it runs on another renderer): \
                     choose the CPU backend"
                        .into(),
                );
            }
            (_, false) => RuntimeDevice::open(memlayer_runtime::open::RuntimeBackend::Cpu),
        }
        .map_err(|e| e.to_string())?;
        let on_gpu = !matches!(rt.pool, memlayer_runtime::paged::PoolDevice::Host);
        let source = match &req.bank {
            BankLocation::ModelDir => None,
            other => Some(other.open(&req.dir).map_err(|e| e.to_string())?),
        };
        let opts = PagedOptions {
            budget: req.budget,
            fetch_threads: if req.bank.is_remote() { 8 } else { 1 },
            prefetch: false,
            device: rt.pool,
        };
        let (generator, memory) = open_paged(&req.dir, source, opts, &rt.device, rt.ops)
            .map_err(|e| format!("{}: {e}", req.dir.display()))?;
        if let Some(m) = &memory {
            m.set_trace(true);
        }
        let config = generator.config().clone();
        // where the pages live: the pool's own description (the runtime's)
        let pages = memory
            .as_ref()
            .map_or("no memory".into(), |m| m.pool_name().to_owned());
        let device = if on_gpu {
            format!("GPU, shared with the window; pages in {pages}")
        } else {
            format!("CPU (burn Flex); pages in {pages}")
        };
        let info = ModelInfo {
            dir: req.dir.clone(),
            bank: req.bank.to_string(),
            tree: generator
                .routing()
                .map(|r| (r.tree.levels(), r.tree.branching())),
            config,
            device,
            budget_bytes: memory.as_ref().map_or(0, |m| m.budget_bytes()),
            bank_bytes: memory.as_ref().map_or(0, |m| m.bank_bytes()),
            value_pages: memory.as_ref().map_or(0, |m| m.value_pages()),
            value_slots: memory.as_ref().map_or(0, |m| m.value_slots()),
            page_rows: memory
                .as_ref()
                .and_then(|m| m.value_geometry())
                .map_or(0, |v| v.page_rows),
        };
        self.opened = Some(Opened { generator, memory });
        self.emit(Event::Opened(Box::new(info)));
        Ok(())
    }

    fn generate(&mut self, prompt: &str, max_tokens: usize, line: bool) -> Result<(), String> {
        let opened = self
            .opened
            .as_mut()
            .ok_or("no model is open: open a model directory first")?;
        let memory = opened.memory.clone();
        if let Some(m) = &memory {
            // reads of an earlier, failed call are not this generation's
            m.take_trace();
        }
        let sampling = Sampling {
            max_tokens,
            ..Sampling::default()
        };
        let t0 = Instant::now();
        let (events, wake, stop) = (&self.events, &self.wake, &self.stop);
        let out = opened
            .generator
            .generate_until(prompt, &sampling, line.then_some("\n"), |text, _| {
                let (accesses, resident_pages, stats) = match &memory {
                    Some(m) => (m.take_trace(), m.resident_value_pages(), m.stats()),
                    None => (Vec::new(), Vec::new(), MemoryStats::default()),
                };
                let _ = events.send(Event::Piece(Box::new(Piece {
                    text: text.to_owned(),
                    accesses,
                    resident_pages,
                    stats,
                    at_seconds: t0.elapsed().as_secs_f64(),
                })));
                wake();
                if stop.load(Ordering::SeqCst) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .map_err(|e| e.to_string())?;
        self.emit(Event::Done(Done {
            tokens_per_second: out.decode_tokens_per_second(),
            first_token_seconds: out.first_token_seconds,
            tokens: out.tokens.len(),
            stopped: out.stopped_by_caller,
            text: out.text,
        }));
        Ok(())
    }
}
