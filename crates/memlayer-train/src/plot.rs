//! PNG charts for training reports: loss curves ([`line_chart`]), recall per
//! frequency bucket ([`grouped_bars`]) and recall against cost
//! ([`labeled_scatter`]).
//!
//! Charts are drawn with `plotters` into an in-memory RGB buffer of
//! [`WIDTH`]×[`HEIGHT`] pixels, encoded with the `png` crate and written with
//! [`write_atomic`], so a reader never sees a half-written file.
//!
//! Text is rendered by plotters' pure-Rust `ab_glyph` backend (no
//! font-kit/freetype/fontconfig), which loads no system fonts: the TrueType
//! font [`FONT_PATH`] (DejaVu Sans, Debian package [`FONT_PACKAGE`]) is read
//! at run time and registered once per process. If it is missing, every chart
//! function fails with [`PlotError::FontMissing`] rather than producing a
//! chart without labels.
//!
//! Input values must be finite: NaN/±inf points are rejected with
//! [`PlotError::Input`] naming the series and the index (filter diverged
//! steps out before plotting). Log axes reject values ≤ 0 the same way.
//!
//! Native only: on wasm32 plotters draws text through the browser canvas, so
//! this module is compiled out there.
#![cfg(not(target_arch = "wasm32"))]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use plotters::coord::Shift;
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::data::{DataError, write_atomic};

/// Width of every chart in pixels.
pub const WIDTH: u32 = 960;
/// Height of every chart in pixels.
pub const HEIGHT: u32 = 600;
/// TrueType font used for all chart text, read at run time.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// Debian/Ubuntu package that provides [`FONT_PATH`].
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// Family name under which the font is registered in plotters' process-global
/// font table (unusual on purpose, so other users of plotters don't clash).
const FONT_FAMILY: &str = "memlayer-dejavu-sans";

/// Errors from the chart functions.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The chart font could not be read (usually: the package is not installed).
    #[error(
        "cannot read the chart font {}: {source} (install the Debian package `{FONT_PACKAGE}`: apt-get install {FONT_PACKAGE})",
        path.display()
    )]
    FontMissing {
        /// The font file that was read ([`FONT_PATH`]).
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The font file exists but is not a usable TrueType/OpenType font.
    #[error(
        "{} is not a usable TrueType/OpenType font (expected DejaVu Sans from the Debian package `{FONT_PACKAGE}`)",
        path.display()
    )]
    FontInvalid {
        /// The font file that was read ([`FONT_PATH`]).
        path: PathBuf,
    },
    /// Invalid chart input (empty, non-finite, mismatched lengths, ≤ 0 on a log axis).
    #[error("chart {chart:?}: {message}")]
    Input {
        /// Title of the chart whose input is invalid.
        chart: String,
        /// What is wrong (which series or point, which index, which value).
        message: String,
    },
    /// Drawing or PNG encoding failed.
    #[error("rendering {}: {message}", path.display())]
    Render {
        /// The PNG file that was being produced.
        path: PathBuf,
        /// The drawing or encoding error.
        message: String,
    },
    /// Writing the PNG file failed.
    #[error(transparent)]
    Write(#[from] DataError),
}

/// One line of a [`line_chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry of the line.
    pub name: String,
    /// `(x, y)` points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

/// One group (one colour, e.g. one model variant) of a [`grouped_bars`] chart.
#[derive(Debug, Clone, PartialEq)]
pub struct BarGroup {
    /// Legend entry of the group.
    pub name: String,
    /// One value per category.
    pub values: Vec<f64>,
    /// Half-heights of the error bars, one per category (≥ 0), or empty for none.
    pub errors: Vec<f64>,
}

/// One labelled point of a [`labeled_scatter`] chart.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledPoint {
    /// Text drawn next to the point.
    pub label: String,
    /// Horizontal position (must be > 0 on a log x axis).
    pub x: f64,
    /// Vertical position (centre of the error bar).
    pub y: f64,
    /// Half-height of the vertical error bar (≥ 0; 0 draws none).
    pub y_err: f64,
}

/// Line chart, one colour per series with a legend on the right; `log_y`
/// draws the y axis in log scale (all y must then be > 0). Used for loss
/// curves (x = step or tokens). A series with few points also gets markers,
/// so a single-point series is visible.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<(), PlotError> {
    let spec = LineSpec::new(title, x_label, y_label, series, log_y)?;
    write_chart(Path::new(FONT_PATH), path, |root| spec.draw(root))
}

/// Grouped bar chart: `categories` along x (e.g. frequency buckets "1-2",
/// "3-7", ...), one bar per group (e.g. model variant) in each category, with
/// a legend on the right. `values` of every group must have one entry per
/// category; `errors` the same, or be empty (no error bars). When every
/// value (± error) lies in [0, 1] — recall — the y axis is fixed to 0..1 so
/// charts are comparable.
pub fn grouped_bars(
    path: &Path,
    title: &str,
    categories: &[String],
    y_label: &str,
    groups: &[BarGroup],
) -> Result<(), PlotError> {
    let spec = BarSpec::new(title, categories, y_label, groups)?;
    write_chart(Path::new(FONT_PATH), path, |root| spec.draw(root))
}

/// Scatter of labelled points (e.g. recall against FLOPs per token, one point
/// per variant) with optional vertical error bars; `log_x` draws the x axis
/// in log scale (all x must then be > 0).
pub fn labeled_scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[LabeledPoint],
    log_x: bool,
) -> Result<(), PlotError> {
    let spec = ScatterSpec::new(title, x_label, y_label, points, log_x)?;
    write_chart(Path::new(FONT_PATH), path, |root| spec.draw(root))
}

// ---------------------------------------------------------------------------
// Rendering plumbing

type Root<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;

/// Drawing-time errors; converted to [`PlotError::Render`] with the output path.
struct DrawError(String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for DrawError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        DrawError(e.to_string())
    }
}

/// Path of the font registered so far (None before the first chart).
/// A mutex rather than a `OnceLock`: registration must happen once, but a
/// failed load (font not installed yet) must not be cached for the life of
/// the process, and `OnceLock::get_or_try_init` is not stable.
static REGISTERED_FONT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Reads and registers the font at `path` with plotters (process-global),
/// unless that file is already registered. Thread-safe.
fn ensure_font(path: &Path) -> Result<(), PlotError> {
    let mut registered = REGISTERED_FONT
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if registered.as_deref() == Some(path) {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|source| PlotError::FontMissing {
        path: path.to_path_buf(),
        source,
    })?;
    // plotters' ab_glyph backend keeps `&'static` font data: leak it, once
    // per registered file (in practice once per process).
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font(FONT_FAMILY, FontStyle::Normal, bytes).map_err(|_| PlotError::FontInvalid {
        path: path.to_path_buf(),
    })?;
    *registered = Some(path.to_path_buf());
    Ok(())
}

/// Registers the font, renders `draw` into an RGB buffer, encodes it as PNG.
fn render_png(
    font: &Path,
    out: &Path,
    draw: impl FnOnce(&Root<'_>) -> Result<(), DrawError>,
) -> Result<Vec<u8>, PlotError> {
    ensure_font(font)?;
    let render_err = |message: String| PlotError::Render {
        path: out.to_path_buf(),
        message,
    };
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        let result = root
            .fill(&WHITE)
            .map_err(DrawError::from)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(DrawError::from));
        result.map_err(|DrawError(m)| render_err(m))?;
    }
    encode_png(&rgb, WIDTH, HEIGHT).map_err(|e| render_err(format!("PNG encoding: {e}")))
}

fn write_chart(
    font: &Path,
    out: &Path,
    draw: impl FnOnce(&Root<'_>) -> Result<(), DrawError>,
) -> Result<(), PlotError> {
    let png = render_png(font, out, draw)?;
    write_atomic(out, &png)?;
    Ok(())
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Style

const TITLE_SIZE: f64 = 26.0;
const DESC_SIZE: f64 = 19.0;
const TICK_SIZE: f64 = 15.0;
const LEGEND_SIZE: f64 = 16.0;
const POINT_LABEL_SIZE: f64 = 15.0;
const MAX_TICKS: usize = 9;

/// Tableau 10: distinct, colour-blind-friendlier than pure RGB.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn font(size: f64) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&BLACK)
}

/// Draws the title and returns the area below it.
fn titled<'a>(root: &Root<'a>, title: &str) -> Result<Root<'a>, DrawError> {
    let inner = root.margin(10, 6, 10, 10);
    Ok(inner.titled(title, font(TITLE_SIZE))?)
}

/// What a legend entry shows next to its name.
#[derive(Clone, Copy)]
enum Swatch {
    Line,
    Box,
}

/// Splits a legend column off the right of `area` (sized to the longest
/// name, at most a quarter of the width) and draws the entries into it.
fn legend<'a>(
    area: &Root<'a>,
    entries: &[(String, RGBColor)],
    swatch: Swatch,
    top: i32,
) -> Result<Root<'a>, DrawError> {
    const SWATCH_W: i32 = 26;
    const GAP: i32 = 8;
    const ROW_H: i32 = 24;
    let style = font(LEGEND_SIZE);
    let (w, _) = area.dim_in_pixel();
    let max_text = (w / 4) as i32 - SWATCH_W - 3 * GAP;
    let mut names = Vec::with_capacity(entries.len());
    let mut widest = 0;
    for (name, _) in entries {
        let name = fit_text(area, name, &style, max_text)?;
        widest = widest.max(area.estimate_text_size(&name, &style)?.0 as i32);
        names.push(name);
    }
    let column = (SWATCH_W + 3 * GAP + widest) as u32;
    let (plot, column_area) = area.split_horizontally(w - column);
    let style = style.pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (name, (_, c))) in names.iter().zip(entries).enumerate() {
        let y = top + ROW_H / 2 + i as i32 * ROW_H;
        let x0 = GAP;
        match swatch {
            Swatch::Line => {
                column_area.draw(&PathElement::new(
                    vec![(x0, y), (x0 + SWATCH_W, y)],
                    c.stroke_width(3),
                ))?;
            }
            Swatch::Box => {
                column_area.draw(&Rectangle::new(
                    [(x0 + 4, y - 8), (x0 + SWATCH_W - 4, y + 8)],
                    c.filled(),
                ))?;
            }
        }
        column_area.draw_text(name, &style, (x0 + SWATCH_W + GAP, y))?;
    }
    Ok(plot)
}

/// `text`, shortened with "…" until it is at most `max_px` wide.
fn fit_text(
    area: &Root<'_>,
    text: &str,
    style: &TextStyle,
    max_px: i32,
) -> Result<String, DrawError> {
    if area.estimate_text_size(text, style)?.0 as i32 <= max_px {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let candidate: String = chars.iter().collect::<String>() + "…";
        if area.estimate_text_size(&candidate, style)?.0 as i32 <= max_px {
            return Ok(candidate);
        }
    }
    Ok("…".to_string())
}

/// Builds the chart on `x` and `y`; the y label area is sized to the widest
/// tick label, the x label area leaves room for a description if there is one.
fn build_chart<'a, 'b>(
    area: &'a Root<'b>,
    x: &Axis,
    y: &Axis,
    has_x_desc: bool,
) -> Result<Chart<'a, 'b>, DrawError> {
    let tick = font(TICK_SIZE);
    let mut widest = 0;
    for label in &y.labels {
        widest = widest.max(area.estimate_text_size(label, &tick)?.0);
    }
    let y_area = widest + 12 + (DESC_SIZE as u32) + 14;
    let chart = ChartBuilder::on(area)
        .margin_top(8)
        .margin_right(16)
        .margin_left(6)
        .x_label_area_size(if has_x_desc { 58 } else { 32 })
        .y_label_area_size(y_area)
        .build_cartesian_2d(x.clone(), y.clone())?;
    Ok(chart)
}

/// Draws grid, ticks and axis descriptions.
fn draw_mesh(
    chart: &mut Chart<'_, '_>,
    x_desc: &str,
    y_desc: &str,
    x_grid: bool,
) -> Result<(), DrawError> {
    let mut mesh = chart.configure_mesh();
    mesh.label_style(font(TICK_SIZE))
        .axis_desc_style(font(DESC_SIZE))
        .bold_line_style(BLACK.mix(0.12))
        .axis_style(BLACK.mix(0.8))
        .x_desc(x_desc)
        .y_desc(y_desc);
    if !x_grid {
        mesh.disable_x_mesh();
    }
    mesh.draw()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Axes and ticks

impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let frac = (v - self.range.start) / (self.range.end - self.range.start);
        let px = f64::from(limit.1 - limit.0) * frac;
        // Clamp far-off values (none after validation) instead of overflowing.
        limit.0 + (px + 1e-3).floor().clamp(-1e6, 1e6) as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Grid lines only at the ticks (no light lines in between).
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, v: &f64) -> String {
        self.label_at(*v)
    }
}

/// One axis in plot space (log10 of the value for log axes), with the tick
/// positions and their labels. It is also the plotters coordinate of the
/// axis: linear over `range`, ticks exactly at `ticks`, labelled `labels`.
#[derive(Debug, Clone)]
struct Axis {
    range: Range<f64>,
    ticks: Vec<f64>,
    labels: Vec<String>,
    log: bool,
}

impl Axis {
    /// Plot-space coordinate of a data value.
    fn map(&self, v: f64) -> f64 {
        if self.log { v.log10() } else { v }
    }

    /// Label of the tick nearest to plot-space position `v`.
    fn label_at(&self, v: f64) -> String {
        self.ticks
            .iter()
            .zip(&self.labels)
            .min_by(|a, b| (a.0 - v).abs().total_cmp(&(b.0 - v).abs()))
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    }

    /// Linear axis covering `[min, max]` plus the given fractions of padding
    /// below and above; a degenerate range (min == max) is widened.
    fn linear(min: f64, max: f64, pad_lo: f64, pad_hi: f64) -> Axis {
        let (lo, hi) = if max > min {
            let span = max - min;
            (min - span * pad_lo, max + span * pad_hi)
        } else {
            let d = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            (min - d, max + d)
        };
        let (ticks, step) = linear_ticks(lo, hi, MAX_TICKS);
        let labels = format_linear(&ticks, step);
        Axis {
            range: lo..hi,
            ticks,
            labels,
            log: false,
        }
    }

    /// Log axis covering `[min, max]` (both > 0), padded by the given
    /// fractions of the log span; a degenerate range is widened ×/÷ 2.
    fn log(min: f64, max: f64, pad_lo: f64, pad_hi: f64) -> Axis {
        let (lmin, lmax) = (min.log10(), max.log10());
        let (lo, hi) = if lmax > lmin {
            let span = lmax - lmin;
            (lmin - span * pad_lo, lmax + span * pad_hi)
        } else {
            (lmin - 2f64.log10(), lmax + 2f64.log10())
        };
        let (vlo, vhi) = (10f64.powf(lo), 10f64.powf(hi));
        let (values, labels) = match log_ticks(vlo, vhi, MAX_TICKS) {
            Some(values) => {
                let labels = values.iter().map(|&v| format_sig(v)).collect();
                (values, labels)
            }
            // Less than ~half a decade: 1-2-5 ticks would be too sparse.
            None => {
                let (values, step) = linear_ticks(vlo, vhi, MAX_TICKS);
                let values: Vec<f64> = values.into_iter().filter(|&v| v > 0.0).collect();
                let labels = format_linear(&values, step);
                (values, labels)
            }
        };
        Axis {
            range: lo..hi,
            ticks: values.iter().map(|v| v.log10()).collect(),
            labels,
            log: true,
        }
    }
}

/// "Nice" (1-2-5 × 10^k) ticks within `[lo, hi]`, at most about `max`; also
/// returns the step.
fn linear_ticks(lo: f64, hi: f64, max: usize) -> (Vec<f64>, f64) {
    let raw = (hi - lo) / (max.max(2) - 1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last)
        .map(|i| {
            let v = i as f64 * step;
            if v.abs() < step * 1e-9 { 0.0 } else { v }
        })
        .collect();
    (ticks, step)
}

/// Log ticks within `[lo, hi]` from the densest of the mantissa sets {1},
/// {1, 2, 5}, {1..9} with at most `max` ticks (decades thinned further if
/// needed); `None` if that yields fewer than 3 ticks (narrow range).
fn log_ticks(lo: f64, hi: f64, max: usize) -> Option<Vec<f64>> {
    let k0 = lo.log10().floor() as i32;
    let k1 = hi.log10().ceil() as i32;
    let in_range = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let sets: [&[f64]; 3] = [
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[1.0, 2.0, 5.0],
        &[1.0],
    ];
    for set in sets {
        let ticks: Vec<f64> = (k0..=k1)
            .flat_map(|k| set.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|&v| in_range(v))
            .collect();
        if ticks.len() <= max {
            return (ticks.len() >= 3).then_some(ticks);
        }
    }
    // Many decades: every n-th power of ten.
    let decades: Vec<i32> = (k0..=k1).filter(|&k| in_range(10f64.powi(k))).collect();
    let stride = decades.len().div_ceil(max);
    Some(
        decades
            .iter()
            .filter(|&&k| k.rem_euclid(stride as i32) == 0)
            .map(|&k| 10f64.powi(k))
            .collect(),
    )
}

/// Labels for evenly spaced ticks: fixed decimals from the step, or
/// scientific notation for very large/small magnitudes.
fn format_linear(ticks: &[f64], step: f64) -> Vec<String> {
    let max_abs = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
    if max_abs >= 1e5 || (max_abs > 0.0 && max_abs < 1e-3) {
        let digits = (max_abs.log10().floor() - step.log10().floor()).clamp(0.0, 6.0) as usize;
        ticks.iter().map(|&v| format_sci(v, digits)).collect()
    } else {
        let decimals = (-step.log10()).ceil().clamp(0.0, 9.0) as usize;
        ticks.iter().map(|&v| format!("{v:.decimals$}")).collect()
    }
}

/// A single value with up to 3 significant digits (log-axis ticks).
fn format_sig(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        return format_sci(v, 2);
    }
    let decimals = (2.0 - a.log10().floor()).clamp(0.0, 9.0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

/// `1.50e9` → `1.5e9`, `2.00e8` → `2e8`.
fn format_sci(v: f64, digits: usize) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let s = format!("{v:.digits$e}");
    match s.split_once('e') {
        Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
        None => s,
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

// ---------------------------------------------------------------------------
// Input validation

fn input_error(chart: &str, message: String) -> PlotError {
    PlotError::Input {
        chart: chart.to_string(),
        message,
    }
}

fn check_finite(chart: &str, what: &str, name: &str, i: usize, v: f64) -> Result<(), PlotError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(input_error(
            chart,
            format!("{what} of {name:?} at index {i} is {v}, not a finite number"),
        ))
    }
}

fn check_positive(chart: &str, what: &str, name: &str, i: usize, v: f64) -> Result<(), PlotError> {
    if v > 0.0 {
        Ok(())
    } else {
        Err(input_error(
            chart,
            format!("{what} of {name:?} at index {i} is {v}, but a log axis needs values > 0"),
        ))
    }
}

/// Min and max of an iterator of finite values (None if empty).
fn min_max(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

// ---------------------------------------------------------------------------
// Line chart

struct LineSpec<'s> {
    title: &'s str,
    x_label: &'s str,
    y_label: &'s str,
    series: &'s [Series],
    x: Axis,
    y: Axis,
}

/// Series with at most this many points also get point markers.
const MARKER_MAX_POINTS: usize = 30;

impl<'s> LineSpec<'s> {
    fn new(
        title: &'s str,
        x_label: &'s str,
        y_label: &'s str,
        series: &'s [Series],
        log_y: bool,
    ) -> Result<Self, PlotError> {
        if series.is_empty() {
            return Err(input_error(title, "no series to plot".into()));
        }
        for s in series {
            if s.points.is_empty() {
                return Err(input_error(
                    title,
                    format!("series {:?} has no points", s.name),
                ));
            }
            for (i, &(x, y)) in s.points.iter().enumerate() {
                check_finite(title, "x", &s.name, i, x)?;
                check_finite(title, "y", &s.name, i, y)?;
                if log_y {
                    check_positive(title, "y", &s.name, i, y)?;
                }
            }
        }
        let all = || series.iter().flat_map(|s| s.points.iter().copied());
        let (x_min, x_max) = min_max(all().map(|p| p.0)).expect("non-empty");
        let (y_min, y_max) = min_max(all().map(|p| p.1)).expect("non-empty");
        let x = Axis::linear(x_min, x_max, 0.0, 0.02);
        let y = if log_y {
            Axis::log(y_min, y_max, 0.04, 0.04)
        } else {
            Axis::linear(y_min, y_max, 0.05, 0.05)
        };
        Ok(LineSpec {
            title,
            x_label,
            y_label,
            series,
            x,
            y,
        })
    }

    fn draw(&self, root: &Root<'_>) -> Result<(), DrawError> {
        let body = titled(root, self.title)?;
        let entries: Vec<(String, RGBColor)> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), colour(i)))
            .collect();
        let plot = legend(&body, &entries, Swatch::Line, 8)?;
        let mut chart = build_chart(&plot, &self.x, &self.y, !self.x_label.is_empty())?;
        draw_mesh(&mut chart, self.x_label, self.y_label, true)?;
        for (i, s) in self.series.iter().enumerate() {
            let c = colour(i);
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|&(x, y)| (self.x.map(x), self.y.map(y)))
                .collect();
            if pts.len() > 1 {
                chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?;
            }
            if pts.len() <= MARKER_MAX_POINTS {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Grouped bars

struct BarSpec<'s> {
    title: &'s str,
    y_label: &'s str,
    groups: &'s [BarGroup],
    x: Axis,
    y: Axis,
}

impl<'s> BarSpec<'s> {
    fn new(
        title: &'s str,
        categories: &'s [String],
        y_label: &'s str,
        groups: &'s [BarGroup],
    ) -> Result<Self, PlotError> {
        if categories.is_empty() {
            return Err(input_error(title, "no categories".into()));
        }
        if groups.is_empty() {
            return Err(input_error(title, "no bar groups".into()));
        }
        let n = categories.len();
        for g in groups {
            if g.values.len() != n {
                return Err(input_error(
                    title,
                    format!(
                        "group {:?} has {} values for {n} categories",
                        g.name,
                        g.values.len()
                    ),
                ));
            }
            if !g.errors.is_empty() && g.errors.len() != n {
                return Err(input_error(
                    title,
                    format!(
                        "group {:?} has {} errors for {n} categories (give one per category, or none)",
                        g.name,
                        g.errors.len()
                    ),
                ));
            }
            for (i, &v) in g.values.iter().enumerate() {
                check_finite(title, "value", &g.name, i, v)?;
            }
            for (i, &e) in g.errors.iter().enumerate() {
                check_finite(title, "error", &g.name, i, e)?;
                if e < 0.0 {
                    return Err(input_error(
                        title,
                        format!("error of {:?} at index {i} is {e}, must be ≥ 0", g.name),
                    ));
                }
            }
        }
        // Bars start at 0, so 0 is always in range.
        let extents = groups.iter().flat_map(|g| {
            g.values.iter().enumerate().flat_map(|(i, &v)| {
                let e = g.errors.get(i).copied().unwrap_or(0.0);
                [v - e, v + e]
            })
        });
        let (lo, hi) = min_max(extents.chain([0.0])).expect("non-empty");
        let y = if lo >= 0.0 && hi <= 1.0 {
            Axis::linear(0.0, 1.0, 0.0, 0.04)
        } else {
            Axis::linear(lo, hi, if lo < 0.0 { 0.05 } else { 0.0 }, 0.05)
        };
        let x = Axis {
            range: 0.0..n as f64,
            ticks: (0..n).map(|i| i as f64 + 0.5).collect(),
            labels: categories.to_vec(),
            log: false,
        };
        Ok(BarSpec {
            title,
            y_label,
            groups,
            x,
            y,
        })
    }

    fn draw(&self, root: &Root<'_>) -> Result<(), DrawError> {
        let body = titled(root, self.title)?;
        let entries: Vec<(String, RGBColor)> = self
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.name.clone(), colour(i)))
            .collect();
        let plot = legend(&body, &entries, Swatch::Box, 8)?;
        let mut chart = build_chart(&plot, &self.x, &self.y, false)?;
        draw_mesh(&mut chart, "", self.y_label, false)?;
        // Each category spans [i, i+1): 12% gap on each side, bars share the rest.
        let gap = 0.12;
        let width = (1.0 - 2.0 * gap) / self.groups.len() as f64;
        let base = self.y.range.start.max(0.0).min(self.y.range.end);
        for (j, g) in self.groups.iter().enumerate() {
            let c = colour(j);
            let x0 = |i: usize| i as f64 + gap + j as f64 * width;
            chart.draw_series(g.values.iter().enumerate().map(|(i, &v)| {
                Rectangle::new(
                    [(x0(i) + width * 0.04, base), (x0(i) + width * 0.96, v)],
                    c.filled(),
                )
            }))?;
        }
        // Error bars on top of all bars.
        let err_style = BLACK.stroke_width(2);
        for (j, g) in self.groups.iter().enumerate() {
            for (i, (&v, &e)) in g.values.iter().zip(&g.errors).enumerate() {
                if e <= 0.0 {
                    continue;
                }
                let cx = i as f64 + gap + (j as f64 + 0.5) * width;
                let cap = width * 0.2;
                let (lo, hi) = (v - e, v + e);
                chart.draw_series([
                    PathElement::new(vec![(cx, lo), (cx, hi)], err_style),
                    PathElement::new(vec![(cx - cap, lo), (cx + cap, lo)], err_style),
                    PathElement::new(vec![(cx - cap, hi), (cx + cap, hi)], err_style),
                ])?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Labelled scatter

struct ScatterSpec<'s> {
    title: &'s str,
    x_label: &'s str,
    y_label: &'s str,
    points: &'s [LabeledPoint],
    x: Axis,
    y: Axis,
}

impl<'s> ScatterSpec<'s> {
    fn new(
        title: &'s str,
        x_label: &'s str,
        y_label: &'s str,
        points: &'s [LabeledPoint],
        log_x: bool,
    ) -> Result<Self, PlotError> {
        if points.is_empty() {
            return Err(input_error(title, "no points to plot".into()));
        }
        for (i, p) in points.iter().enumerate() {
            check_finite(title, "x", &p.label, i, p.x)?;
            check_finite(title, "y", &p.label, i, p.y)?;
            check_finite(title, "y_err", &p.label, i, p.y_err)?;
            if p.y_err < 0.0 {
                return Err(input_error(
                    title,
                    format!(
                        "y_err of {:?} at index {i} is {}, must be ≥ 0",
                        p.label, p.y_err
                    ),
                ));
            }
            if log_x {
                check_positive(title, "x", &p.label, i, p.x)?;
            }
        }
        let (x_min, x_max) = min_max(points.iter().map(|p| p.x)).expect("non-empty");
        let (y_min, y_max) =
            min_max(points.iter().flat_map(|p| [p.y - p.y_err, p.y + p.y_err])).expect("non-empty");
        // Extra room on the right for the labels, which are drawn right of the points.
        let x = if log_x {
            Axis::log(x_min, x_max, 0.08, 0.22)
        } else {
            Axis::linear(x_min, x_max, 0.08, 0.22)
        };
        let y = Axis::linear(y_min, y_max, 0.08, 0.12);
        Ok(ScatterSpec {
            title,
            x_label,
            y_label,
            points,
            x,
            y,
        })
    }

    fn draw(&self, root: &Root<'_>) -> Result<(), DrawError> {
        let body = titled(root, self.title)?;
        let mut chart = build_chart(&body, &self.x, &self.y, !self.x_label.is_empty())?;
        draw_mesh(&mut chart, self.x_label, self.y_label, true)?;
        let err_style = BLACK.mix(0.7).stroke_width(2);
        for (i, p) in self.points.iter().enumerate() {
            if p.y_err > 0.0 {
                let x = self.x.map(p.x);
                let (lo, hi) = (p.y - p.y_err, p.y + p.y_err);
                chart.draw_series([
                    EmptyElement::at((x, lo)) + PathElement::new(vec![(-5, 0), (5, 0)], err_style),
                    EmptyElement::at((x, hi)) + PathElement::new(vec![(-5, 0), (5, 0)], err_style),
                ])?;
                chart.draw_series([PathElement::new(vec![(x, lo), (x, hi)], err_style)])?;
            }
            let c = colour(i);
            let label_style = font(POINT_LABEL_SIZE).pos(Pos::new(HPos::Left, VPos::Bottom));
            chart.draw_series([EmptyElement::at((self.x.map(p.x), p.y))
                + Circle::new((0, 0), 6, c.filled())
                + Text::new(p.label.clone(), (8, -4), label_style)])?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A fresh output path in the temp dir; files are removed by `Out::drop`
    /// unless MEMLAYER_KEEP_PLOTS is set (to look at them).
    struct Out(PathBuf);

    impl Out {
        fn new(name: &str) -> Out {
            // one directory per output: tests run in parallel, and each
            // removes its own directory when done
            let dir = std::env::temp_dir().join(format!(
                "memlayer-plot-tests-{}-{}",
                std::process::id(),
                name.replace(['/', '.'], "_")
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Out(dir.join(name))
        }
    }

    impl Drop for Out {
        fn drop(&mut self) {
            if std::env::var_os("MEMLAYER_KEEP_PLOTS").is_none() {
                let _ = std::fs::remove_file(&self.0);
                let _ = self.0.parent().map(std::fs::remove_dir);
            } else {
                eprintln!("kept {}", self.0.display());
            }
        }
    }

    /// Checks signature, size and that the image is not blank; returns the
    /// number of distinct colours.
    fn check_png(path: &Path) -> usize {
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "no PNG signature");
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let colours: HashSet<&[u8]> = buf[..info.buffer_size()].chunks_exact(3).collect();
        assert!(
            colours.len() > 3,
            "only {} colours: blank chart",
            colours.len()
        );
        colours.len()
    }

    fn loss_curves() -> Vec<Series> {
        let curve = |name: &str, scale: f64| Series {
            name: name.to_string(),
            points: (0..=200)
                .map(|s| {
                    let step = s as f64 * 50.0;
                    (
                        step,
                        2.2 + scale * 8.0 / (1.0 + step / 400.0) + 0.05 * (s as f64).sin(),
                    )
                })
                .collect(),
        };
        vec![
            curve("dense baseline", 1.0),
            curve("pkm 256k keys", 0.8),
            curve("hierarchical 1M", 0.7),
        ]
    }

    #[test]
    fn plot_line_chart_linear_and_log() {
        for log_y in [false, true] {
            let out = Out::new(&format!("loss-log{log_y}.png"));
            line_chart(
                &out.0,
                "Training loss",
                "step",
                "loss (nats/token)",
                &loss_curves(),
                log_y,
            )
            .unwrap();
            check_png(&out.0);
        }
    }

    #[test]
    fn plot_line_chart_degenerate_ranges() {
        let single = [Series {
            name: "one point".into(),
            points: vec![(3.0, 1.5)],
        }];
        let flat = [
            Series {
                name: "flat".into(),
                points: vec![(0.0, 2.0), (1.0, 2.0), (2.0, 2.0)],
            },
            Series {
                name: "zeros".into(),
                points: vec![(0.0, 0.0), (0.0, 0.0)],
            },
        ];
        for (name, series, log_y) in [
            ("single", &single[..], false),
            ("single-log", &single[..], true),
            ("flat", &flat[..], false),
        ] {
            let out = Out::new(&format!("degenerate-{name}.png"));
            line_chart(&out.0, name, "x", "y", series, log_y).unwrap();
            check_png(&out.0);
        }
    }

    #[test]
    fn plot_line_chart_rejects_bad_input() {
        let out = Out::new("bad-line.png");
        let err = |series: &[Series], log_y| {
            let e = line_chart(&out.0, "t", "x", "y", series, log_y).unwrap_err();
            assert!(matches!(e, PlotError::Input { .. }), "{e}");
            assert!(!out.0.exists());
            e.to_string()
        };
        err(&[], false);
        let s = |points: Vec<(f64, f64)>| Series {
            name: "s".into(),
            points,
        };
        assert!(err(&[s(vec![])], false).contains("no points"));
        let msg = err(&[s(vec![(0.0, 1.0), (1.0, f64::NAN)])], false);
        assert!(msg.contains("index 1") && msg.contains("NaN"), "{msg}");
        assert!(err(&[s(vec![(f64::INFINITY, 1.0)])], false).contains("inf"));
        let msg = err(&[s(vec![(0.0, 1.0), (1.0, 0.0)])], true);
        assert!(msg.contains("log axis"), "{msg}");
        assert!(err(&[s(vec![(0.0, -1.0)])], true).contains("log axis"));
    }

    fn recall_groups() -> (Vec<String>, Vec<BarGroup>) {
        let categories = ["1-2", "3-7", "8-31", "32-127", "128+"]
            .map(String::from)
            .to_vec();
        let groups = vec![
            BarGroup {
                name: "dense".into(),
                values: vec![0.02, 0.10, 0.35, 0.70, 0.93],
                errors: vec![0.01, 0.03, 0.04, 0.03, 0.02],
            },
            BarGroup {
                name: "pkm 256k".into(),
                values: vec![0.15, 0.40, 0.72, 0.90, 0.97],
                errors: vec![0.03, 0.04, 0.03, 0.02, 0.01],
            },
            BarGroup {
                name: "hierarchical 1M".into(),
                values: vec![0.25, 0.55, 0.81, 0.94, 0.98],
                errors: vec![],
            },
        ];
        (categories, groups)
    }

    #[test]
    fn plot_grouped_bars() {
        let (categories, groups) = recall_groups();
        let out = Out::new("recall-bars.png");
        grouped_bars(
            &out.0,
            "Fact recall by training frequency",
            &categories,
            "recall",
            &groups,
        )
        .unwrap();
        check_png(&out.0);
        // Values outside [0, 1] and all-zero values still render.
        let out = Out::new("bars-other.png");
        let odd = [BarGroup {
            name: "x".into(),
            values: vec![-2.0, 0.0, 30.0],
            errors: vec![],
        }];
        let cats = ["a", "b", "c"].map(String::from);
        grouped_bars(&out.0, "odd", &cats, "v", &odd).unwrap();
        check_png(&out.0);
        let zero = [BarGroup {
            name: "x".into(),
            values: vec![0.0; 3],
            errors: vec![0.0; 3],
        }];
        let out = Out::new("bars-zero.png");
        grouped_bars(&out.0, "zero", &cats, "v", &zero).unwrap();
        check_png(&out.0);
    }

    #[test]
    fn plot_grouped_bars_rejects_bad_input() {
        let out = Out::new("bad-bars.png");
        let (categories, groups) = recall_groups();
        let err = |cats: &[String], groups: &[BarGroup]| {
            let e = grouped_bars(&out.0, "t", cats, "y", groups).unwrap_err();
            assert!(matches!(e, PlotError::Input { .. }), "{e}");
            e.to_string()
        };
        err(&[], &groups);
        err(&categories, &[]);
        let mut g = groups.clone();
        g[1].values.pop();
        assert!(err(&categories, &g).contains("4 values for 5 categories"));
        let mut g = groups.clone();
        g[0].errors.push(0.1);
        assert!(err(&categories, &g).contains("6 errors"));
        let mut g = groups.clone();
        g[2].values[3] = f64::NAN;
        assert!(err(&categories, &g).contains("index 3"));
        let mut g = groups;
        g[0].errors[0] = -0.1;
        assert!(err(&categories, &g).contains("≥ 0"));
        assert!(!out.0.exists());
    }

    fn variants() -> Vec<LabeledPoint> {
        [
            ("dense 40M", 8.0e7, 0.31, 0.02),
            ("dense 160M", 3.2e8, 0.45, 0.02),
            ("pkm 256k", 9.0e7, 0.52, 0.03),
            ("pkm 1M", 9.5e7, 0.61, 0.03),
            ("hierarchical 1M", 1.0e8, 0.66, 0.0),
        ]
        .into_iter()
        .map(|(label, x, y, y_err)| LabeledPoint {
            label: label.into(),
            x,
            y,
            y_err,
        })
        .collect()
    }

    #[test]
    fn plot_labeled_scatter() {
        for log_x in [false, true] {
            let out = Out::new(&format!("scatter-log{log_x}.png"));
            labeled_scatter(
                &out.0,
                "Recall vs compute",
                "FLOPs per token",
                "recall (rare facts)",
                &variants(),
                log_x,
            )
            .unwrap();
            check_png(&out.0);
        }
        // One point: degenerate ranges on both axes.
        let out = Out::new("scatter-single.png");
        labeled_scatter(&out.0, "one", "x", "y", &variants()[..1], true).unwrap();
        check_png(&out.0);
    }

    #[test]
    fn plot_labeled_scatter_rejects_bad_input() {
        let out = Out::new("bad-scatter.png");
        let err = |points: &[LabeledPoint], log_x| {
            let e = labeled_scatter(&out.0, "t", "x", "y", points, log_x).unwrap_err();
            assert!(matches!(e, PlotError::Input { .. }), "{e}");
            e.to_string()
        };
        err(&[], false);
        let mut p = variants();
        p[2].x = 0.0;
        assert!(err(&p, true).contains("log axis"));
        let mut p = variants();
        p[1].y = f64::NEG_INFINITY;
        assert!(err(&p, false).contains("\"dense 160M\""));
        let mut p = variants();
        p[0].y_err = -1.0;
        assert!(err(&p, false).contains("y_err"));
        assert!(!out.0.exists());
    }

    #[test]
    fn plot_missing_font_is_a_clear_error() {
        let missing = Path::new("/nonexistent/memlayer/DejaVuSans.ttf");
        let out = Out::new("no-font.png");
        let e = write_chart(missing, &out.0, |_| Ok(())).unwrap_err();
        assert!(matches!(e, PlotError::FontMissing { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains(FONT_PACKAGE), "{msg}");
        assert!(!out.0.exists());
        // A file that is not a font.
        let not_font = Out::new("not-a-font.ttf");
        std::fs::write(&not_font.0, b"not a font").unwrap();
        let e = write_chart(&not_font.0, &out.0, |_| Ok(())).unwrap_err();
        assert!(matches!(e, PlotError::FontInvalid { .. }), "{e}");
        assert!(!out.0.exists());
    }

    #[test]
    fn plot_ticks_and_labels() {
        let (t, step) = linear_ticks(0.0, 10_000.0, 9);
        assert_eq!(step, 2000.0);
        assert_eq!(
            format_linear(&t, step),
            ["0", "2000", "4000", "6000", "8000", "10000"]
        );
        let (t, step) = linear_ticks(0.0, 1.0, 9);
        assert_eq!(format_linear(&t, step)[..3], ["0.0", "0.2", "0.4"]);
        let (t, step) = linear_ticks(0.0, 1.2e9, 9);
        assert_eq!(format_linear(&t, step)[..3], ["0", "2e8", "4e8"]);
        // Less than a decade: no 1-2-5 ticks, linear fallback.
        assert_eq!(log_ticks(2.0, 3.0, 9), None);
        assert_eq!(
            log_ticks(1.5, 60.0, 9),
            Some(vec![2.0, 5.0, 10.0, 20.0, 50.0])
        );
        assert_eq!(
            log_ticks(1e-2, 1e20, 9),
            Some([0, 3, 6, 9, 12, 15, 18].map(|k| 10f64.powi(k)).to_vec())
        );
        assert_eq!(format_sig(0.30000000000000004), "0.3");
        assert_eq!(format_sig(2e8), "2e8");
        assert_eq!(format_sci(1.25e9, 3), "1.25e9");
        let a = Axis::log(2.0, 9.0, 0.0, 0.0);
        assert!(a.ticks.len() >= 3, "{a:?}");
        assert!(a.labels.iter().all(|l| !l.is_empty()));
    }
}
