//! The window: chat, model, budget and backend, the memory map and charts.
//! Every model operation runs on the engine thread ([`crate::session`]);
//! this side only sends commands and draws what comes back.

use crate::map::{self, MemoryMap};
use crate::session::{
    Backend, Command, Done, Event, ModelInfo, OpenRequest, Piece, Resized, Session,
};
use eframe::egui::{self, Color32, RichText};
use egui_plot::{Line, Plot, PlotPoints};
use memlayer_runtime::Budget;
use memlayer_runtime::open::BankLocation;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the command line asked the app to do by itself.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Ask this once the model is open.
    pub prompt: Option<String>,
    /// Save the window here once the answer is in.
    pub screenshot: Option<PathBuf>,
    /// Close the window after that.
    pub exit: bool,
    /// Move the budget slider to this percent after the answer's first
    /// piece (applied while it decodes, without reopening the model).
    pub resize_percent: Option<f64>,
}

/// The settings the window starts with.
#[derive(Clone, Debug)]
pub struct Start {
    /// Model directory to open at start (empty: none).
    pub model: String,
    /// `file`, a bank path or a URL.
    pub bank: String,
    /// Budget, percent of the bank as held (values in its dtype, blocks f32).
    pub budget_percent: f64,
    /// Where the model runs.
    pub backend: Backend,
    /// Most tokens per answer.
    pub max_tokens: usize,
    /// The scripted run.
    pub script: Script,
}

struct Turn {
    prompt: String,
    answer: String,
    done: Option<Done>,
}

/// One point per piece of text.
struct Sample {
    piece: f64,
    hit_rate: f64,
    kib: f64,
    tokens_per_second: f64,
}

#[derive(PartialEq)]
enum ScriptState {
    Waiting,
    Asked,
    Shooting,
    Finished,
}

/// How the process should end (read by `main` after the window closed).
pub type ExitCode = Arc<Mutex<i32>>;

/// The app.
pub struct DesktopApp {
    session: Session,
    info: Option<ModelInfo>,
    map: MemoryMap,
    turns: Vec<Turn>,
    input: String,
    model: String,
    bank: String,
    budget_percent: f64,
    backend: Backend,
    has_gpu: bool,
    /// The last budget change, as the top bar says it.
    resized: Option<String>,
    max_tokens: usize,
    error: Option<String>,
    samples: Vec<Sample>,
    last_stats: Option<memlayer_runtime::MemoryStats>,
    last_at: f64,
    /// Frame-to-frame times while a command runs (seconds).
    busy_frames: Vec<f64>,
    last_frame: Option<Instant>,
    script: Script,
    script_state: ScriptState,
    script_failed: bool,
    shot: Arc<Mutex<Option<Result<(), String>>>>,
    exit: ExitCode,
}

impl DesktopApp {
    /// The app on the window of `cc`: the engine shares the window's wgpu
    /// device when there is one.
    pub fn new(cc: &eframe::CreationContext<'_>, start: Start, exit: ExitCode) -> Self {
        let gpu = cc.wgpu_render_state.as_ref().map(|rs| {
            memlayer_wgpu::GpuContext::from_parts(
                rs.adapter.clone(),
                rs.device.clone(),
                rs.queue.clone(),
            )
        });
        let has_gpu = gpu.is_some();
        let ctx = cc.egui_ctx.clone();
        let session = Session::start(gpu, move || ctx.request_repaint());
        let mut app = Self {
            session,
            info: None,
            map: MemoryMap::default(),
            turns: Vec::new(),
            input: start.script.prompt.clone().unwrap_or_default(),
            model: start.model,
            bank: start.bank,
            budget_percent: start.budget_percent,
            backend: if start.backend == Backend::Wgpu && !has_gpu {
                Backend::Cpu
            } else {
                start.backend
            },
            has_gpu,
            resized: None,
            max_tokens: start.max_tokens,
            error: None,
            samples: Vec::new(),
            last_stats: None,
            last_at: 0.0,
            busy_frames: Vec::new(),
            last_frame: None,
            script: start.script,
            script_state: ScriptState::Waiting,
            script_failed: false,
            shot: Arc::new(Mutex::new(None)),
            exit,
        };
        if start.backend == Backend::Wgpu && !has_gpu {
            app.error = Some("no wgpu device behind the window: running on the CPU".into());
        }
        if !app.model.is_empty() {
            app.open();
        }
        app
    }

    fn open(&mut self) {
        self.error = None;
        let bank = match self.bank.trim().parse::<BankLocation>() {
            Ok(b) => b,
            Err(e) => {
                self.error = Some(format!("bank: {e}"));
                return;
            }
        };
        let budget = match Budget::percent(self.budget_percent) {
            Ok(b) => b,
            Err(e) => {
                self.error = Some(format!("budget: {e}"));
                return;
            }
        };
        self.session.send(Command::Open(OpenRequest {
            dir: PathBuf::from(self.model.trim()),
            bank,
            budget,
            backend: self.backend,
        }));
    }

    /// The slider moved while a model is open: its budget changes in place.
    fn resize_live(&mut self) {
        match Budget::percent(self.budget_percent) {
            Ok(b) => self.session.set_budget(b),
            Err(e) => self.error = Some(format!("budget: {e}")),
        }
    }

    fn resized(&mut self, r: &Resized) {
        let c = &r.change;
        let text = format!(
            // "->": egui's default fonts have no arrow glyph
            "budget {} -> {} ({} -> {} value slots) in place{}: {} pages kept ({} moved within the slots), {} dropped, none fetched again",
            bytes(c.budget_bytes.0),
            bytes(c.budget_bytes.1),
            c.value_slots.0,
            c.value_slots.1,
            if r.while_decoding {
                " while decoding"
            } else {
                ""
            },
            c.kept_pages,
            c.moved_pages,
            c.dropped_pages
        );
        if self.script.prompt.is_some() {
            eprintln!("{text}");
        }
        if let Some(info) = &mut self.info {
            info.budget_bytes = c.budget_bytes.1;
            info.value_slots = c.value_slots.1;
        }
        self.map.set_resident(&r.resident_pages);
        self.resized = Some(text);
    }

    fn ask(&mut self) {
        let prompt = self.input.trim_end().to_owned();
        if prompt.is_empty() || self.session.busy() {
            return;
        }
        self.error = None;
        self.turns.push(Turn {
            prompt: prompt.clone(),
            answer: String::new(),
            done: None,
        });
        self.samples.clear();
        self.last_at = 0.0;
        self.session.send(Command::Generate {
            prompt,
            max_tokens: self.max_tokens,
            line: true,
        });
    }

    fn drain(&mut self) {
        while let Ok(event) = self.session.events.try_recv() {
            match event {
                Event::Opened(info) => {
                    self.resized = None;
                    self.map.clear(&info);
                    self.samples.clear();
                    self.last_stats = None;
                    self.info = Some(*info);
                }
                Event::Piece(p) => {
                    self.piece(&p);
                    // the scripted slider move: after the answer's first piece
                    if let Some(percent) = self.script.resize_percent.take() {
                        self.budget_percent = percent;
                        self.resize_live();
                    }
                }
                Event::Resized(r) => self.resized(&r),
                Event::Done(d) => {
                    if let Some(t) = self.turns.last_mut() {
                        t.done = Some(d);
                    }
                }
                Event::Error(e) => {
                    if self.script.prompt.is_some()
                        && matches!(self.script_state, ScriptState::Waiting | ScriptState::Asked)
                    {
                        // the scripted answer will not come: say so, shoot what the window shows
                        eprintln!("error: {e}");
                        self.script_failed = true;
                        if let Ok(mut code) = self.exit.lock() {
                            *code = 2;
                        }
                    }
                    self.error = Some(e);
                }
            }
        }
    }

    fn piece(&mut self, p: &Piece) {
        if let Some(t) = self.turns.last_mut() {
            t.answer.push_str(&p.text);
        }
        if let Some(info) = &self.info {
            self.map.update(info, p);
        }
        let streamed = self
            .last_stats
            .as_ref()
            .map_or(p.stats.bytes_streamed, |s| {
                p.stats.bytes_streamed.saturating_sub(s.bytes_streamed)
            });
        let dt = (p.at_seconds - self.last_at).max(1e-9);
        self.samples.push(Sample {
            piece: self.samples.len() as f64,
            hit_rate: p.stats.hit_rate,
            kib: streamed as f64 / 1024.0,
            tokens_per_second: if self.samples.is_empty() {
                0.0
            } else {
                1.0 / dt
            },
        });
        self.last_at = p.at_seconds;
        self.last_stats = Some(p.stats);
    }

    /// The scripted run: ask once open, print the answer, shoot, close.
    fn script_step(&mut self, ctx: &egui::Context) {
        if self.script.prompt.is_none() {
            return;
        }
        match self.script_state {
            ScriptState::Waiting => {
                if self.script_failed {
                    self.script_state = ScriptState::Asked;
                } else if self.info.is_some() && !self.session.busy() {
                    self.ask();
                    self.script_state = ScriptState::Asked;
                }
            }
            ScriptState::Asked => {
                let finished = self.turns.last().is_some_and(|t| t.done.is_some());
                if (finished || self.script_failed) && !self.session.busy() {
                    let answered = self.turns.last().filter(|_| !self.script_failed);
                    if let Some((t, d)) = answered.and_then(|t| Some((t, t.done.as_ref()?))) {
                        let mut line = format!("{}{}", t.prompt, d.text);
                        if !line.ends_with('\n') {
                            line.push('\n');
                        }
                        print!("{line}");
                    }
                    let (p50, p95, max) = frame_stats(&self.busy_frames);
                    eprintln!(
                        "frames while decoding: {} (p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms)",
                        self.busy_frames.len(),
                        p50 * 1e3,
                        p95 * 1e3,
                        max * 1e3
                    );
                    match self.script.screenshot.clone() {
                        Some(path) => {
                            let shot = self.shot.clone();
                            ctx.request_screenshot(move |image| {
                                let r = crate::shot::save_png(&path, &image);
                                if let Ok(mut s) = shot.lock() {
                                    *s = Some(r);
                                }
                            });
                            self.script_state = ScriptState::Shooting;
                        }
                        None => self.script_state = ScriptState::Finished,
                    }
                }
            }
            ScriptState::Shooting => {
                let taken = self.shot.lock().ok().and_then(|mut s| s.take());
                if let Some(r) = taken {
                    if let Err(e) = r {
                        eprintln!("error: screenshot: {e}");
                        if let Ok(mut code) = self.exit.lock() {
                            *code = 3;
                        }
                    }
                    self.script_state = ScriptState::Finished;
                }
            }
            ScriptState::Finished => {
                if self.script.exit {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
        }
        if self.script_state != ScriptState::Finished || self.script.exit {
            ctx.request_repaint();
        }
    }

    fn top(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.heading("memlayer");
            ui.separator();
            ui.label("model");
            ui.add(
                egui::TextEdit::singleline(&mut self.model)
                    .desired_width(260.0)
                    .hint_text("a model directory"),
            );
            ui.label("bank");
            ui.add(
                egui::TextEdit::singleline(&mut self.bank)
                    .desired_width(200.0)
                    .hint_text("file, a path or an http(s):// URL"),
            );
            ui.label("budget %");
            let slider = ui
                .add(egui::Slider::new(&mut self.budget_percent, 1.0..=100.0).logarithmic(true))
                .on_hover_text(
                    "the page cache of the open model resizes in place: the most recent pages stay",
                );
            // applied once the drag ends (or on a click / typed value)
            if self.info.is_some()
                && (slider.drag_stopped() || (slider.changed() && !slider.dragged()))
            {
                self.resize_live();
            }
            egui::ComboBox::from_id_salt("backend")
                .selected_text(self.backend.label())
                .show_ui(ui, |ui| {
                    for &b in Backend::all() {
                        ui.add_enabled_ui(b != Backend::Wgpu || self.has_gpu, |ui| {
                            ui.selectable_value(&mut self.backend, b, b.label());
                        });
                    }
                });
            let busy = self.session.busy();
            if ui
                .add_enabled(!busy, egui::Button::new("Open"))
                .on_hover_text(
                    "open the model (again) with this bank and backend; its pages stream anew",
                )
                .clicked()
            {
                self.open();
            }
        });
        if let Some(info) = &self.info {
            ui.label(
                RichText::new(format!(
                    "{} — {} · budget {} of {} ({} of {} value pages) · bank {}",
                    info.dir.display(),
                    info.device,
                    bytes(info.budget_bytes),
                    bytes(info.bank_bytes),
                    info.value_slots,
                    info.value_pages,
                    info.bank
                ))
                .small(),
            );
        }
        if let Some(r) = &self.resized {
            ui.label(RichText::new(r).small().weak());
        }
    }

    fn chat(&mut self, ui: &mut egui::Ui) {
        let busy = self.session.busy();
        egui::Panel::bottom("ask").show(ui, |ui| {
            ui.horizontal(|ui| {
                let edit = ui.add(
                    egui::TextEdit::singleline(&mut self.input)
                        .desired_width(ui.available_width() - 120.0)
                        .hint_text("ask the model (it completes the line)"),
                );
                let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                let can_ask = !busy && self.info.is_some();
                if ui.add_enabled(can_ask, egui::Button::new("Ask")).clicked() || (enter && can_ask)
                {
                    self.ask();
                }
                if ui.add_enabled(busy, egui::Button::new("Stop")).clicked() {
                    self.session
                        .stop
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
            if let Some(e) = &self.error {
                ui.colored_label(Color32::from_rgb(255, 110, 100), format!("error: {e}"));
            }
        });
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .stick_to_bottom(true)
                .show(ui, |ui| {
                    if self.turns.is_empty() {
                        ui.label(RichText::new("Open a model, then ask it something.").italics());
                    }
                    for t in &self.turns {
                        ui.label(RichText::new(&t.prompt).strong());
                        ui.label(
                            RichText::new(&t.answer)
                                .monospace()
                                .color(Color32::from_rgb(140, 220, 255)),
                        );
                        if let Some(d) = &t.done {
                            ui.label(
                                RichText::new(format!(
                                    "{} tokens · first after {:.2} s · {:.1} tok/s{}",
                                    d.tokens,
                                    d.first_token_seconds,
                                    d.tokens_per_second,
                                    if d.stopped { " · stopped" } else { "" }
                                ))
                                .small()
                                .weak(),
                            );
                        }
                        ui.separator();
                    }
                });
        });
    }

    fn memory(&mut self, ui: &mut egui::Ui) {
        let Some(info) = self.info.clone() else {
            ui.label("no model open");
            return;
        };
        ui.heading("Memory");
        if let Some(p) = &info.config.pkm {
            ui.label(format!(
                "product keys: {n}×{n} = {} value rows, {} heads × top-{} per token, {} rows per page",
                p.n_keys * p.n_keys,
                p.heads,
                p.knn,
                info.page_rows,
                n = p.n_keys
            ));
            ui.horizontal_wrapped(|ui| {
                legend(ui, map::RESIDENT, "resident");
                legend(ui, map::HIT, "hit");
                legend(ui, map::FETCHED, "fetched");
                for h in 0..p.heads.min(map::HEADS.len()) {
                    legend(ui, map::HEADS[h], &format!("head {h}"));
                }
            });
            self.map.show_grid(ui, &info, 360.0);
        }
        if let Some((levels, branching)) = info.tree {
            ui.label(format!(
                "cluster tree: {levels} levels × {branching}-way; the context's path"
            ));
            self.map.show_tree(ui, &info);
        }
        if let Some(s) = &self.last_stats {
            ui.label(format!(
                "hit rate {:.1} % · {} pages streamed ({}) · {} resident of {} slots · {} evictions",
                s.hit_rate * 100.0,
                s.pages_streamed,
                bytes(s.bytes_streamed),
                s.resident_pages,
                s.slots,
                s.evictions
            ));
        }
        let series = |f: fn(&Sample) -> f64| -> PlotPoints<'static> {
            self.samples
                .iter()
                .map(|s| [s.piece, f(s)])
                .collect::<Vec<_>>()
                .into()
        };
        for (name, f) in [
            ("hit rate", (|s: &Sample| s.hit_rate) as fn(&Sample) -> f64),
            ("KiB streamed per token", |s: &Sample| s.kib),
            ("tokens/s", |s: &Sample| s.tokens_per_second),
        ] {
            ui.label(RichText::new(name).small());
            Plot::new(name)
                .height(80.0)
                .allow_scroll(false)
                .allow_drag(false)
                .show(ui, |plot| plot.line(Line::new(name, series(f))));
        }
    }
}

fn legend(ui: &mut egui::Ui, colour: Color32, name: &str) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
    ui.painter().rect_filled(rect, 2.0, colour);
    ui.label(RichText::new(name).small());
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// (p50, p95, max) of frame times in seconds (zeros when empty).
pub fn frame_stats(frames: &[f64]) -> (f64, f64, f64) {
    if frames.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut f = frames.to_vec();
    f.sort_by(f64::total_cmp);
    let at = |q: f64| f[((f.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95), f[f.len() - 1])
}

impl eframe::App for DesktopApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let now = Instant::now();
        if self.session.busy() {
            if let Some(last) = self.last_frame {
                self.busy_frames
                    .push(now.duration_since(last).as_secs_f64());
            }
            self.last_frame = Some(now);
            ui.ctx().request_repaint();
        } else {
            self.last_frame = None;
        }
        self.drain();
        let ctx = ui.ctx().clone();
        self.script_step(&ctx);
        egui::Panel::top("top").show(ui, |ui| self.top(ui));
        egui::Panel::right("memory")
            .default_size(440.0)
            .min_size(380.0)
            .resizable(true)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.memory(ui));
            });
        self.chat(ui);
    }
}
