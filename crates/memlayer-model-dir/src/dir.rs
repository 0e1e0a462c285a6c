//! A model directory: everything a runtime needs, one file per part.
//!
//! ```text
//! config.json          ModelConfig
//! model.safetensors    dense weights (f32), ParamStore names
//! memory.bank          product-key values and FFN-memory blocks (docs/FORMAT.md)
//! tokenizer.json       HF tokenizers BPE
//! retriever.json       TF-IDF retriever     (hierarchical memory)
//! tree.safetensors     cluster tree         (hierarchical memory)
//! context_index.json   training contexts' terms and paths (hierarchical memory
//!                      routed by nearest context)
//! checksums.json       length + xxh3 of every file above, the bank's length and
//!                      table checksum (docs/FORMAT.md, "Model directory");
//!                      written last, verified by every load
//! eval.jsonl           held-out fact questions (facts data)
//! train.json           the training config
//! report.json          evaluation and timing
//! metrics.jsonl        loss per step; loss.png its plot
//! ```
//!
//! Bank sections: `pkm_values` (rows `n_keys²`, `VALUE_PAGE_BYTES` per page,
//! at least `MIN_VALUE_PAGES` pages)
//! then one `ffn_blocks` section per level whose nodes are the level's
//! table rows (`b^l` tree nodes, then the generic block when trained).
//!
//! Loading checks, in this order: `config.json` parses and passes
//! [`ModelConfig::check`] (bounds: a hostile size is named before anything
//! is allocated or hashed); `checksums.json` exists and parses; every file
//! read matches its recorded length and xxh3; the bank's sections fit the
//! config ([`check_bank_fits`]) and its header matches the recorded bank
//! identity ([`Checksums::verify_bank`]), whether it is the directory's file
//! or another source (a URL) — [`check_bank`].

use crate::bank_fit::check_bank_fits;
use crate::error::ModelDirError;
use crate::files::write_atomic;
use crate::manifest::{BANK_FILE, CHECKSUMS_FILE, Checksums, ManifestError};
pub use crate::routing::CONTEXT_INDEX_FILE;
use crate::routing::{RETRIEVER_FILE, Routing, RoutingFiles, TREE_FILE};
use crate::tokenizer::Tokenizer;
use memlayer_bank::{
    BankFileWriter, BankLayout, BankReader, Dtype, FileSource, PageSource, SectionSpec,
};
use memlayer_core::model::params::{VALUES, hier_name};
use memlayer_core::model::{ModelConfig, ParamGroup, ParamStore};
use std::path::{Path, PathBuf};

/// Files every model directory has and every load reads (and verifies).
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// Files a load reads when the model needs them (hierarchical memory).
pub const ROUTING_FILES: [&str; 3] = [RETRIEVER_FILE, TREE_FILE, CONTEXT_INDEX_FILE];

/// Target bytes of one value page (rows per page = this / row bytes, at
/// least one row).
///
/// Small on purpose: a token reads `heads × knn` rows spread over the whole
/// table, so nearly every row a token reads sits on a page of its own; every
/// other row of a page is streamed for nothing and takes a slot from a hot
/// row. Measured with `memlayer bench paged` on the demo model (rows of
/// 512 B) at a 25 % budget (docs/BENCHMARKS.md): 16 KiB pages hit 23 % of
/// accesses and stream 495 KiB per token, 2 KiB pages 29 % and 75 KiB,
/// one-row pages 57 % and 13 KiB, and fewer requests per token.
pub const VALUE_PAGE_BYTES: usize = 512;

fn io(path: &Path, e: impl std::fmt::Display) -> ModelDirError {
    ModelDirError::parse(path, e.to_string())
}

/// Least number of pages a value table is cut into (a small table still
/// gets pages fine enough for a budget of a fraction of it to hold one
/// token's rows).
pub const MIN_VALUE_PAGES: usize = 256;

/// Rows per value page for a table of `rows` rows of `v_dim` values of
/// `dtype`: [`VALUE_PAGE_BYTES`] per page, fewer rows (a power of two) when
/// the table would otherwise have fewer than [`MIN_VALUE_PAGES`] pages.
pub fn value_page_rows(rows: usize, v_dim: usize, dtype: Dtype) -> u32 {
    let by_bytes = (VALUE_PAGE_BYTES / (v_dim * dtype.size()).max(1)).max(1);
    let by_count = (rows / MIN_VALUE_PAGES).max(1);
    let by_count = if by_count.is_power_of_two() {
        by_count
    } else {
        by_count.next_power_of_two() / 2
    };
    by_bytes.min(by_count).clamp(1, u32::MAX as usize) as u32
}

/// The bank layout of `cfg`'s memory (None when it has none).
pub fn bank_layout(cfg: &ModelConfig, dtype: Dtype) -> Option<BankLayout> {
    let page_rows = cfg
        .pkm_config()
        .map_or(1, |c| value_page_rows(c.n_rows(), c.v_dim, dtype));
    bank_layout_with(cfg, dtype, page_rows)
}

/// [`bank_layout`] with `page_rows` value rows per page.
pub fn bank_layout_with(cfg: &ModelConfig, dtype: Dtype, page_rows: u32) -> Option<BankLayout> {
    let mut sections = Vec::new();
    if let Some(c) = cfg.pkm_config() {
        sections.push(SectionSpec::pkm_values(
            c.n_rows() as u64,
            c.v_dim as u32,
            page_rows,
            dtype,
        ));
    }
    if let Some(h) = &cfg.hier {
        let layers = cfg.dense_layers().len() as u32;
        for l in 1..=h.levels {
            sections.push(SectionSpec::ffn_blocks(
                l as u32,
                h.rows(l) as u64,
                layers,
                h.units[l - 1] as u32,
                cfg.dim as u32,
                dtype,
            ));
        }
    }
    // pages start on a boundary of their own size (up to 4 KiB): small value
    // pages are not padded to 4 KiB each
    let smallest = sections
        .iter()
        .filter_map(|s| s.geometry().ok().map(|g| g.page_bytes))
        .min()
        .unwrap_or(4096)
        .clamp(8, 4096);
    let align = 1u32 << (63 - smallest.leading_zeros());
    (!sections.is_empty()).then(|| BankLayout::new(sections).with_page_align(align))
}

/// Writes the memory of `store` into a bank file at `path` (atomically).
pub fn write_bank(
    cfg: &ModelConfig,
    store: &ParamStore,
    path: &Path,
    dtype: Dtype,
) -> Result<u64, ModelDirError> {
    write_bank_layout(cfg, store, path, bank_layout(cfg, dtype))
}

/// [`write_bank`] with `page_rows` value rows per page.
pub fn write_bank_with(
    cfg: &ModelConfig,
    store: &ParamStore,
    path: &Path,
    dtype: Dtype,
    page_rows: u32,
) -> Result<u64, ModelDirError> {
    write_bank_layout(cfg, store, path, bank_layout_with(cfg, dtype, page_rows))
}

fn write_bank_layout(
    cfg: &ModelConfig,
    store: &ParamStore,
    path: &Path,
    layout: Option<BankLayout>,
) -> Result<u64, ModelDirError> {
    let Some(layout) = layout else {
        return Ok(0);
    };
    let mut w = BankFileWriter::create(path, &layout).map_err(|e| io(path, e))?;
    if cfg.pkm.is_some() {
        w.write_rows(store.data(VALUES)?).map_err(|e| io(path, e))?;
    }
    if let Some(h) = &cfg.hier {
        for l in 1..=h.levels {
            let p = store.get(&hier_name(l))?;
            for row in p.data.chunks_exact(p.row_len()) {
                w.write_page(row).map_err(|e| io(path, e))?;
            }
        }
    }
    w.finish().map_err(|e| io(path, e))
}

/// Reads the memory parameters of `store` back from an opened bank (every
/// page, checksums verified; [`load`] checks the bank with [`check_bank`]
/// first).
pub fn read_bank<S: PageSource>(
    cfg: &ModelConfig,
    store: &mut ParamStore,
    reader: &BankReader<S>,
) -> Result<(), ModelDirError> {
    let path = Path::new(reader.location());
    let mut section = 0usize;
    let mut fill = |name: &str, section: usize| -> Result<(), ModelDirError> {
        let info = *reader
            .sections()
            .get(section)
            .ok_or_else(|| io(path, format!("missing section {section} for {name}")))?;
        let mut data = Vec::new();
        for page in info.page_ids() {
            data.extend(reader.read_page_f32(page).map_err(|e| io(path, e))?);
        }
        let i = store
            .position(name)
            .ok_or_else(|| io(path, format!("no parameter {name}")))?;
        let p = &mut store.params_mut()[i];
        if data.len() != p.data.len() {
            return Err(io(
                path,
                format!(
                    "section {section} has {} values, {name} needs {}",
                    data.len(),
                    p.data.len()
                ),
            ));
        }
        p.data = data;
        Ok(())
    };
    if cfg.pkm.is_some() {
        fill(VALUES, section)?;
        section += 1;
    }
    if let Some(h) = &cfg.hier {
        for l in 1..=h.levels {
            fill(&hier_name(l), section)?;
            section += 1;
        }
    }
    Ok(())
}

/// What [`export`] writes besides the weights.
pub struct ExportParts<'a> {
    /// The tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Retriever + tree (hierarchical memory).
    pub routing: Option<&'a Routing>,
    /// Bank element type.
    pub bank_dtype: Dtype,
    /// Value rows per page of the product-key table (None: [`value_page_rows`]).
    pub value_page_rows: Option<u32>,
}

/// Writes `config.json`, `model.safetensors`, `memory.bank`, `tokenizer.json`
/// and the routing files of a trained model into `dir`.
pub fn export(
    cfg: &ModelConfig,
    store: &ParamStore,
    dir: &Path,
    parts: &ExportParts,
) -> Result<(), ModelDirError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let json = serde_json::to_string_pretty(cfg).map_err(|e| io(dir, e))?;
    write_atomic(&dir.join("config.json"), json.as_bytes())?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "memlayer-dense-v1".to_string());
    let dense = store.to_safetensors(
        |p| !matches!(p.group, ParamGroup::MemoryValues | ParamGroup::MemoryBlocks),
        Some(meta),
    )?;
    write_atomic(&dir.join("model.safetensors"), &dense)?;
    let layout = match parts.value_page_rows {
        Some(rows) => bank_layout_with(cfg, parts.bank_dtype, rows),
        None => bank_layout(cfg, parts.bank_dtype),
    };
    write_bank_layout(cfg, store, &dir.join("memory.bank"), layout)?;
    parts.tokenizer.save(&dir.join("tokenizer.json"))?;
    if let Some(r) = parts.routing {
        r.retriever.save(&dir.join(RETRIEVER_FILE))?;
        let bytes = r.tree.to_safetensors()?;
        write_atomic(&dir.join(TREE_FILE), &bytes)?;
        if let Some(index) = &r.index {
            index.save(&dir.join(CONTEXT_INDEX_FILE))?;
        }
    }
    // last: a directory whose export was cut short fails verification
    write_checksums(dir)?;
    Ok(())
}

/// Records the checksums of `dir`'s files in `checksums.json` (atomically:
/// temp file + rename), and returns them: length + xxh3 of each of
/// [`REQUIRED_FILES`] (which must exist) and of each of [`ROUTING_FILES`]
/// present, and the bank's file length and table checksum when
/// `memory.bank` exists (its header and table are validated; a truncated or
/// padded bank is refused). config.json must pass its bounds and the bank
/// must fit it ([`check_bank_fits`]). [`export`] calls this last; `memlayer
/// checksums DIR` calls it on a directory whose files the user trusts.
pub fn write_checksums(dir: &Path) -> Result<Checksums, ModelDirError> {
    // Only a directory that makes sense is sealed: config.json within its
    // bounds and a bank whose sections fit it.
    let config_path = dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
    let config = ModelConfig::from_json(&config_text).map_err(|e| io(&config_path, e))?;
    let mut sums = Checksums::new();
    for name in REQUIRED_FILES.iter().chain(&ROUTING_FILES) {
        let path = dir.join(name);
        if !REQUIRED_FILES.contains(name) && !path.exists() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        sums.add_file(name, &bytes);
    }
    let bank_path = dir.join(BANK_FILE);
    if bank_path.exists() {
        let src = FileSource::open(&bank_path).map_err(|e| io(&bank_path, e))?;
        let bank = BankReader::open(src).map_err(|e| io(&bank_path, e))?;
        if bank.source_len() != bank.header().file_len {
            return Err(io(
                &bank_path,
                format!(
                    "the file has {} bytes, its header says {}: refusing to record a \
                     truncated bank",
                    bank.source_len(),
                    bank.header().file_len
                ),
            ));
        }
        check_bank_fits(&config, bank.sections(), bank.location()).map_err(ModelDirError::from)?;
        sums.set_bank(BANK_FILE, bank.header());
    }
    write_atomic(&dir.join(CHECKSUMS_FILE), sums.to_json().as_bytes())?;
    Ok(sums)
}

/// Reads `checksums.json` of `dir` (a named error telling how to fix a
/// directory without one).
pub fn read_checksums(dir: &Path) -> Result<Checksums, ModelDirError> {
    let path = dir.join(CHECKSUMS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ManifestError::Missing {
                location: path.display().to_string(),
            }
            .into());
        }
        Err(e) => return Err(io(&path, e)),
    };
    Checksums::from_json(&text, &path.display().to_string()).map_err(ModelDirError::from)
}

/// Reads `name` from `dir` and checks it against `sums`; returns its bytes
/// (what is parsed is exactly what was verified).
fn read_verified(dir: &Path, name: &str, sums: &Checksums) -> Result<Vec<u8>, ModelDirError> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
    sums.verify_file(name, &bytes).map_err(|e| io(&path, e))?;
    Ok(bytes)
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, ModelDirError> {
    String::from_utf8(bytes).map_err(|e| io(path, format!("not UTF-8: {e}")))
}

/// Checks a bank before it is used for the model of `config`: its sections
/// fit the config (a named field, the bank's value and the config's) and its
/// header is the bank `sums` records (table checksum and length), whatever
/// its source (the directory's file, another path, a URL).
pub fn check_bank<S: PageSource>(
    config: &ModelConfig,
    sums: &Checksums,
    bank: &BankReader<S>,
) -> Result<(), ModelDirError> {
    check_bank_fits(config, bank.sections(), bank.location()).map_err(ModelDirError::from)?;
    sums.verify_bank(bank.location(), bank.header(), Some(bank.source_len()))
        .map_err(ModelDirError::from)
}

/// A model directory loaded into memory.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The directory.
    pub dir: PathBuf,
    /// Model configuration.
    pub config: ModelConfig,
    /// All parameters (dense and memory).
    pub store: ParamStore,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Retriever + tree, when the model has a hierarchical memory.
    pub routing: Option<Routing>,
    /// `checksums.json`, every file above verified against it (the bank is
    /// checked where it is opened: [`check_bank`]).
    pub checksums: Checksums,
}

/// Loads a model directory written by [`export`], every file verified
/// ([`load_dense`]) and the bank checked ([`check_bank`]) before it is read;
/// errors name the file.
pub fn load(dir: &Path) -> Result<LoadedModel, ModelDirError> {
    let dense = load_dense(dir)?;
    let config = dense.config;
    let mut store = ParamStore::zeros(&config)?;
    for p in dense.store.params() {
        let i = store
            .position(&p.name)
            .ok_or_else(|| io(dir, format!("no parameter {}", p.name)))?;
        store.params_mut()[i].data.clone_from(&p.data);
    }
    if config.pkm.is_some() || config.hier.is_some() {
        let path = dir.join(BANK_FILE);
        let src = FileSource::open(&path).map_err(|e| io(&path, e))?;
        let bank = BankReader::open(src).map_err(|e| io(&path, e))?;
        check_bank(&config, &dense.checksums, &bank)?;
        read_bank(&config, &mut store, &bank)?;
    }
    Ok(LoadedModel {
        config,
        store,
        ..dense
    })
}

/// Loads a model directory without its memory: the store holds the dense
/// parameters only ([`ParamStore::dense_zeros`]); the bank stays where it
/// is, for a runtime that pages it in (and checks it with [`check_bank`]
/// against [`LoadedModel::checksums`]).
///
/// `config.json` is parsed and bounds-checked first, then `checksums.json`
/// is read (a directory without one is refused, with how to fix it) and
/// every file read is verified against it before it is parsed.
pub fn load_dense(dir: &Path) -> Result<LoadedModel, ModelDirError> {
    // bounds first: a hostile config is named before anything is hashed
    let cfg_path = dir.join("config.json");
    let cfg_bytes = std::fs::read(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let text =
        std::str::from_utf8(&cfg_bytes).map_err(|e| io(&cfg_path, format!("not UTF-8: {e}")))?;
    let config = ModelConfig::from_json(text).map_err(|e| io(&cfg_path, e))?;
    let sums = read_checksums(dir)?;
    sums.verify_file("config.json", &cfg_bytes)
        .map_err(|e| io(&cfg_path, e))?;
    let mut store = ParamStore::dense_zeros(&config)?;
    let st_path = dir.join("model.safetensors");
    let bytes = read_verified(dir, "model.safetensors", &sums)?;
    let n = store
        .load_safetensors(&bytes)
        .map_err(|e| io(&st_path, e))?;
    if n != store.len() {
        return Err(io(
            &st_path,
            format!("{n} tensors read, the config needs {}", store.len()),
        ));
    }
    drop(bytes);
    let tok_path = dir.join("tokenizer.json");
    let tok_text = utf8(&tok_path, read_verified(dir, "tokenizer.json", &sums)?)?;
    let tokenizer = Tokenizer::from_json(&tok_text).map_err(|e| io(&tok_path, e))?;
    let routing = if config.hier.is_some() {
        let mut bytes = Vec::new();
        for name in RoutingFiles::needed(&config) {
            let path = dir.join(name);
            bytes.push(std::fs::read(&path).map_err(|e| io(&path, e))?);
        }
        let files = RoutingFiles {
            retriever: &bytes[0],
            tree: &bytes[1],
            context_index: bytes.get(2).map(Vec::as_slice),
        };
        Some(Routing::from_files(&config, dir, &files, &sums)?)
    } else {
        None
    };
    Ok(LoadedModel {
        dir: dir.to_path_buf(),
        config,
        store,
        tokenizer,
        routing,
        checksums: sums,
    })
}
