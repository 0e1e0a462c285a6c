//! memlayer's desktop demo: chat with a memory model and watch its memory
//! stream — which value rows each head reads, which pages were resident,
//! which were fetched, what the budget costs — on the same wgpu device as
//! the memory kernels (eframe/egui), or on the CPU.
//!
//! `memlayer-desktop --model models/demo-pkm` opens a window;
//! `--prompt TEXT --screenshot out.png --exit` runs it by itself: asks once,
//! prints the answer line (as `memlayer generate --line` does), saves the
//! window, closes.

mod app;
mod map;
mod session;
mod shot;

use clap::Parser;
use eframe::egui;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// memlayer's desktop demo.
#[derive(Parser, Debug)]
#[command(name = "memlayer-desktop", version, about)]
struct Args {
    /// A model directory to open at start.
    #[arg(long, default_value = "")]
    model: String,
    /// Where the bank is read from: `file` (the directory's memory.bank), a
    /// path, or an http(s):// URL (e.g. from `memlayer serve`).
    #[arg(long, default_value = "file")]
    bank: String,
    /// Resident-page budget, percent of the bank as held (values in its dtype, blocks f32).
    #[arg(long, default_value_t = 25.0)]
    budget_percent: f64,
    /// `wgpu` (the window's device), `cpu`, or `cuda` (a build with the
    /// `cuda` feature: page slots on an NVIDIA GPU).
    #[arg(long, value_enum, default_value = "wgpu")]
    backend: session::Backend,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// Ask this once the model is open, then print the answer line.
    #[arg(long)]
    prompt: Option<String>,
    /// With --prompt: save the window as PNG once the answer is in.
    #[arg(long)]
    screenshot: Option<PathBuf>,
    /// With --prompt: close the window when done.
    #[arg(long)]
    exit: bool,
    /// With --prompt: move the budget slider to this percent after the
    /// answer's first piece (the page cache resizes while it decodes).
    #[arg(long)]
    resize_percent: Option<f64>,
    /// Window size, `WIDTHxHEIGHT` in points.
    #[arg(long, default_value = "1280x800")]
    size: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let Some((w, h)) = args
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<f32>().ok()?, h.parse::<f32>().ok()?)))
    else {
        eprintln!(
            "error: --size {}: expected WIDTHxHEIGHT, e.g. 1280x800",
            args.size
        );
        return std::process::ExitCode::from(2);
    };
    let start = app::Start {
        model: args.model,
        bank: args.bank,
        budget_percent: args.budget_percent,
        backend: args.backend,
        max_tokens: args.max_tokens,
        script: app::Script {
            prompt: args.prompt,
            screenshot: args.screenshot,
            exit: args.exit,
            resize_percent: args.resize_percent,
        },
    };
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("memlayer")
            .with_inner_size([w, h]),
        renderer: eframe::Renderer::Wgpu,
        wgpu_options: wgpu_options(),
        ..Default::default()
    };
    let exit: app::ExitCode = Arc::new(Mutex::new(0));
    let code = exit.clone();
    let run = eframe::run_native(
        "memlayer",
        options,
        Box::new(move |cc| Ok(Box::new(app::DesktopApp::new(cc, start, code)))),
    );
    if let Err(e) = run {
        eprintln!("error: the window could not run: {e}");
        return std::process::ExitCode::from(1);
    }
    let code = exit.lock().map_or(1, |c| *c);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The window's device is the memory kernels' device too: it is created
/// with the adapter's own features and limits (what burn's wgpu backend and
/// memlayer's kernels ask for), on a Vulkan/Metal/DX12 adapter when there is one.
fn wgpu_options() -> egui_wgpu::WgpuConfiguration {
    use egui_wgpu::{WgpuSetup, WgpuSetupCreateNew};
    let mut create = WgpuSetupCreateNew::without_display_handle();
    create.device_descriptor = Arc::new(|adapter: &wgpu::Adapter| wgpu::DeviceDescriptor {
        label: Some("memlayer-desktop"),
        required_features: adapter
            .features()
            .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
        required_limits: adapter.limits(),
        ..Default::default()
    });
    egui_wgpu::WgpuConfiguration {
        wgpu_setup: WgpuSetup::CreateNew(create),
        ..Default::default()
    }
}
