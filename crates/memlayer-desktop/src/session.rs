//! The engine side of the app: one thread that owns the opened model (the
//! runtime's [`Generator`] and its [`PagedMemory`]) and runs what the UI
//! asks, so the window never waits on a decode. Commands go in over a
//! channel; events come back with every piece of text and what the memory
//! did for it (the trace of [`PagedMemory::take_trace`]).

use memlayer_core::model::ModelConfig;
use memlayer_runtime::open::{BankLocation, RuntimeBackend, RuntimeDevice};
use memlayer_runtime::paged::{PagedMemory, PagedOptions};
use memlayer_runtime::{
    Budget, BudgetChange, BurnDecoder, Generator, MemoryAccess, MemoryStats, Sampling, open_paged,
};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The window's wgpu device: burn's dense part and the page slots share it.
    Wgpu,
    /// The CPU: burn Flex, pages in host memory (memlayer-cpu's kernels).
    Cpu,
    /// An NVIDIA GPU through CUDA (feature `cuda`): the page slots on the
    /// GPU in the bank's dtype, the dense part on the CPU.
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Backend {
    /// Every backend this build has.
    pub fn all() -> &'static [Backend] {
        &[
            Backend::Wgpu,
            Backend::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda,
        ]
    }

    /// Its name in the picker.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Wgpu => "GPU (wgpu, the window's device)",
            Backend::Cpu => "CPU",
            #[cfg(feature = "cuda")]
            Backend::Cuda => "NVIDIA GPU (CUDA)",
        }
    }
}

/// How to open a model.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// The model directory.
    pub dir: PathBuf,
    /// Where its bank is read from.
    pub bank: BankLocation,
    /// The resident-page budget.
    pub budget: Budget,
    /// Where it runs.
    pub backend: Backend,
}

/// What the UI asks of the engine thread.
#[derive(Debug)]
pub enum Command {
    /// Open a model (the one open before is dropped first).
    Open(OpenRequest),
    /// Apply the budget [`Session::set_budget`] left (if a generation did
    /// not already apply it between two pieces).
    Resize,
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
    /// The open model's budget changed in place (no reopen, no refetch).
    Resized(Box<Resized>),
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
    /// The bank fully resident (values in its dtype, blocks as f32): what
    /// a percent budget is of.
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

/// A budget change applied to the open model.
#[derive(Clone, Debug)]
pub struct Resized {
    /// What the paged memory did.
    pub change: BudgetChange,
    /// The value pages resident after it.
    pub resident_pages: Vec<u32>,
    /// Whether it was applied between two pieces of a running generation.
    pub while_decoding: bool,
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
    /// Open and Generate commands sent and not finished.
    busy: Arc<AtomicUsize>,
    /// The latest budget asked for and not applied yet.
    budget: Arc<Mutex<Option<Budget>>>,
}

impl Session {
    /// Starts the engine thread. `gpu` is the window's device for
    /// [`OpenRequest::gpu`] (`None`: the CPU only); `wake` is called after
    /// every event (the window repaints).
    pub fn start(gpu: Option<memlayer_wgpu::GpuContext>, wake: impl Fn() + Send + 'static) -> Self {
        let (commands, rx) = channel();
        let (tx, events) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let budget = Arc::new(Mutex::new(None));
        let engine = Engine {
            budget: budget.clone(),
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
            budget,
        }
    }

    /// Changes the open model's budget in place: applied between the next
    /// two pieces of a running generation, or at once when idle. Only the
    /// latest of several quick calls is applied (the slider while dragged).
    pub fn set_budget(&self, budget: Budget) {
        if let Ok(mut b) = self.budget.lock() {
            *b = Some(budget);
        }
        let _ = self.commands.send(Command::Resize);
    }

    /// Sends a command (ignored once the engine thread is gone).
    pub fn send(&self, command: Command) {
        if matches!(command, Command::Generate { .. } | Command::Open(_)) {
            self.busy.fetch_add(1, Ordering::SeqCst);
        }
        self.stop.store(false, Ordering::SeqCst);
        let _ = self.commands.send(command);
    }

    /// Whether a command is running.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }
}

struct Opened {
    generator: Generator<BurnDecoder>,
    memory: Option<Arc<PagedMemory>>,
}

struct Engine {
    budget: Arc<Mutex<Option<Budget>>>,
    gpu: Option<memlayer_wgpu::GpuContext>,
    opened: Option<Opened>,
    events: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
}

impl Engine {
    fn run(mut self, rx: Receiver<Command>) {
        while let Ok(command) = rx.recv() {
            let counted = matches!(command, Command::Generate { .. } | Command::Open(_));
            let result = match command {
                Command::Open(req) => self.open(req),
                Command::Resize => match self.opened.as_ref().map(|o| o.memory.clone()) {
                    Some(memory) => apply_budget(&self.budget, memory.as_deref(), false)
                        .map(|r| r.map_or((), |r| self.emit(Event::Resized(r)))),
                    // the slider is read again by the next Open
                    None => {
                        take_budget(&self.budget);
                        Ok(())
                    }
                },
                Command::Generate {
                    prompt,
                    max_tokens,
                    line,
                } => self.generate(&prompt, max_tokens, line),
            };
            if let Err(e) = result {
                self.emit(Event::Error(e));
            }
            if counted {
                self.busy.fetch_sub(1, Ordering::SeqCst);
            }
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
        // the open request carries the slider's budget
        take_budget(&self.budget);
        let rt = match (&self.gpu, req.backend) {
            (Some(ctx), Backend::Wgpu) => RuntimeDevice::on_wgpu(ctx.clone()),
            (None, Backend::Wgpu) => {
                return Err(
                    "the window has no wgpu device to share (it runs on another renderer): \
                     choose the CPU backend"
                        .into(),
                );
            }
            (_, Backend::Cpu) => RuntimeDevice::open(RuntimeBackend::Cpu),
            #[cfg(feature = "cuda")]
            (_, Backend::Cuda) => RuntimeDevice::open(RuntimeBackend::Cuda),
        }
        .map_err(|e| e.to_string())?;
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
        let device = match req.backend {
            Backend::Wgpu => format!("GPU, shared with the window; pages in {pages}"),
            Backend::Cpu => format!("CPU (burn Flex); pages in {pages}"),
            #[cfg(feature = "cuda")]
            Backend::Cuda => format!("CPU (burn Flex) + CUDA; pages in {pages}"),
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
        let budget = &self.budget;
        let mut resize_error = None;
        let out = opened
            .generator
            .generate_until(prompt, &sampling, line.then_some("\n"), |text, _| {
                // the slider moved while decoding: the next token runs under it
                match apply_budget(budget, memory.as_deref(), true) {
                    Ok(Some(r)) => {
                        let _ = events.send(Event::Resized(r));
                    }
                    Ok(None) => {}
                    Err(e) => resize_error = Some(e),
                }
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
        if let Some(e) = resize_error {
            // the budget stayed what it was; the answer is whole
            self.emit(Event::Error(e));
        }
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

/// Takes the budget [`Session::set_budget`] left, if any.
fn take_budget(budget: &Mutex<Option<Budget>>) -> Option<Budget> {
    budget.lock().ok().and_then(|mut b| b.take())
}

/// Applies a budget left by the slider to `memory` (none: a dense model,
/// nothing to resize). A refused budget (below one token's pages) is an
/// error naming the minimum; the memory keeps the budget it had.
fn apply_budget(
    budget: &Mutex<Option<Budget>>,
    memory: Option<&PagedMemory>,
    while_decoding: bool,
) -> Result<Option<Box<Resized>>, String> {
    let (Some(budget), Some(memory)) = (take_budget(budget), memory) else {
        return Ok(None);
    };
    let change = memory
        .set_budget(budget)
        .map_err(|e| format!("budget {budget}: {e}"))?;
    Ok(Some(Box::new(Resized {
        change,
        resident_pages: memory.resident_value_pages(),
        while_decoding,
    })))
}
