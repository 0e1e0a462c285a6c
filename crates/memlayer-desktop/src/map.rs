//! The memory map: what the memory did for the latest piece of text.
//!
//! - Product keys: the value table drawn as its `n_keys × n_keys` grid (row
//!   `r` at `(r / n_keys, r % n_keys)`, the two sub-key indices), each row
//!   coloured by its page: resident, hit for this piece, fetched for this
//!   piece; the rows each head read drawn over it in the head's colour.
//! - Hierarchical memory: the cluster tree level by level, the context's
//!   path (one block per level) marked fetched or held.

use crate::session::{ModelInfo, Piece};
use eframe::egui::{self, Color32, ColorImage, TextureHandle, TextureOptions};
use memlayer_runtime::MemoryAccess;
use std::collections::HashSet;

/// Not resident.
pub const EMPTY: Color32 = Color32::from_rgb(22, 24, 30);
/// A resident page.
pub const RESIDENT: Color32 = Color32::from_rgb(44, 66, 120);
/// A page this piece read that was resident.
pub const HIT: Color32 = Color32::from_rgb(60, 170, 90);
/// A page this piece brought in.
pub const FETCHED: Color32 = Color32::from_rgb(235, 140, 40);
/// The rows read, one colour per head.
pub const HEADS: [Color32; 8] = [
    Color32::from_rgb(255, 255, 255),
    Color32::from_rgb(255, 90, 90),
    Color32::from_rgb(255, 230, 80),
    Color32::from_rgb(90, 230, 255),
    Color32::from_rgb(230, 110, 255),
    Color32::from_rgb(150, 255, 120),
    Color32::from_rgb(255, 170, 200),
    Color32::from_rgb(180, 180, 255),
];

/// What the latest piece did, kept for drawing.
#[derive(Default)]
pub struct MemoryMap {
    /// (rows read, head) of the latest piece.
    rows: Vec<(u32, usize)>,
    hit_pages: HashSet<u32>,
    fetched_pages: HashSet<u32>,
    resident: HashSet<u32>,
    /// Per level (from 1): the context's block row and whether it was fetched.
    path: Vec<Option<(usize, bool)>>,
    texture: Option<TextureHandle>,
    dirty: bool,
}

impl MemoryMap {
    /// Forgets everything (a new model).
    pub fn clear(&mut self, info: &ModelInfo) {
        *self = Self {
            path: vec![None; info.tree.map_or(0, |(levels, _)| levels)],
            dirty: true,
            ..Self::default()
        };
    }

    /// The value pages resident now (after a budget change, between pieces).
    pub fn set_resident(&mut self, pages: &[u32]) {
        self.resident = pages.iter().copied().collect();
        self.dirty = true;
    }

    /// Takes in the reads of a piece.
    pub fn update(&mut self, info: &ModelInfo, piece: &Piece) {
        let knn = info.config.pkm.as_ref().map_or(1, |p| p.knn.max(1));
        let mut first_values = true;
        for a in &piece.accesses {
            match a {
                MemoryAccess::Values {
                    rows,
                    bag,
                    hit_pages,
                    fetched_pages,
                } => {
                    if first_values {
                        // a new piece: only its reads are drawn
                        self.rows.clear();
                        self.hit_pages.clear();
                        self.fetched_pages.clear();
                        first_values = false;
                    }
                    let bag = (*bag).max(1);
                    self.rows
                        .extend(rows.iter().enumerate().map(|(i, &r)| (r, (i % bag) / knn)));
                    self.hit_pages.extend(hit_pages);
                    self.fetched_pages.extend(fetched_pages);
                }
                MemoryAccess::Block {
                    level,
                    row,
                    fetched,
                } => {
                    if let Some(slot) = level.checked_sub(1).and_then(|l| self.path.get_mut(l)) {
                        *slot = Some((*row, *fetched));
                    }
                }
            }
        }
        self.resident = piece.resident_pages.iter().copied().collect();
        self.dirty = true;
    }

    /// The product-key grid as an image: 2×2 pixels per value row, (2 n_keys,
    /// 2 n_keys); a row read shows its head's colour in the top-left pixel
    /// and its page's state (hit / fetched) in the other three.
    pub fn grid_image(&self, info: &ModelInfo) -> Option<ColorImage> {
        let pkm = info.config.pkm.as_ref()?;
        let n = pkm.n_keys;
        let side = 2 * n;
        let page_rows = info.page_rows.max(1);
        let mut pixels = vec![EMPTY; side * side];
        let mut cell = |r: usize, colour: Color32, all: bool| {
            let (i, j) = (r / n, r % n);
            for (di, dj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                if all || (di, dj) == (0, 0) {
                    pixels[(2 * i + di) * side + 2 * j + dj] = colour;
                }
            }
        };
        for r in 0..n * n {
            let page = (r / page_rows) as u32;
            let colour = if self.fetched_pages.contains(&page) {
                FETCHED
            } else if self.hit_pages.contains(&page) {
                HIT
            } else if self.resident.contains(&page) {
                RESIDENT
            } else {
                continue;
            };
            cell(r, colour, true);
        }
        for &(r, head) in &self.rows {
            if (r as usize) < n * n {
                cell(r as usize, HEADS[head % HEADS.len()], false);
            }
        }
        Some(ColorImage::new([side, side], pixels))
    }

    /// Draws the product-key grid (square, as wide as `ui` allows up to `max`).
    pub fn show_grid(&mut self, ui: &mut egui::Ui, info: &ModelInfo, max: f32) {
        if self.dirty || self.texture.is_none() {
            if let Some(image) = self.grid_image(info) {
                match &mut self.texture {
                    Some(t) => t.set(image, TextureOptions::NEAREST),
                    None => {
                        self.texture = Some(ui.ctx().load_texture(
                            "memory-map",
                            image,
                            TextureOptions::NEAREST,
                        ))
                    }
                }
            }
            self.dirty = false;
        }
        if let Some(t) = &self.texture {
            let side = ui.available_width().min(max).max(64.0);
            ui.image((t.id(), egui::vec2(side, side)));
        }
    }

    /// Draws the cluster tree: one row of nodes per level, the path marked.
    pub fn show_tree(&self, ui: &mut egui::Ui, info: &ModelInfo) {
        let Some((levels, branching)) = info.tree else {
            return;
        };
        let width = ui.available_width().max(100.0);
        let row_h = 18.0;
        let (rect, _) = ui.allocate_exact_size(
            egui::vec2(width, row_h * levels as f32 + 4.0),
            egui::Sense::hover(),
        );
        let painter = ui.painter_at(rect);
        for l in 0..levels {
            let nodes = branching.saturating_pow(l as u32 + 1).max(1);
            let cell = width / nodes as f32;
            let y = rect.top() + l as f32 * row_h;
            // every node, faint (wide levels become a band)
            painter.rect_filled(
                egui::Rect::from_min_size(
                    egui::pos2(rect.left(), y + 2.0),
                    egui::vec2(width, row_h - 4.0),
                ),
                2.0,
                EMPTY,
            );
            if cell >= 3.0 {
                for i in 0..nodes {
                    let x = rect.left() + i as f32 * cell;
                    painter.rect_filled(
                        egui::Rect::from_min_size(
                            egui::pos2(x + 0.5, y + 3.0),
                            egui::vec2((cell - 1.0).max(1.0), row_h - 6.0),
                        ),
                        1.0,
                        RESIDENT.gamma_multiply(0.35),
                    );
                }
            }
            if let Some(Some((row, fetched))) = self.path.get(l) {
                let x = rect.left() + *row as f32 * cell;
                painter.rect_filled(
                    egui::Rect::from_min_size(
                        egui::pos2(x, y + 1.0),
                        egui::vec2(cell.max(4.0), row_h - 2.0),
                    ),
                    2.0,
                    if *fetched { FETCHED } else { HIT },
                );
            }
        }
    }
}
