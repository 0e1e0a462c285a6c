//! Streaming bank writer.
//!
//! The writer reserves the header and page table (zeros), streams pages in
//! page-id order at aligned offsets, keeps only the page table (24 bytes per
//! page) and at most one partly filled page in memory, and on `finish` seeks
//! back to write the header and table with their checksums.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::codec::encode_into;
use super::error::BankError;
use super::format::{
    BankLayout, Header, PageEntry, PageId, Plan, SectionInfo, VERSION, align_up, checksum,
    encode_header, encode_page_entry, encode_section,
};

const ZEROS: [u8; 4096] = [0; 4096];

/// Writes a bank to any `Write + Seek` (a file, a `Cursor<Vec<u8>>`, ...).
///
/// Pages must be written in page-id order: section by section, and within a
/// section in row (or block) order. The bank occupies the stream from
/// offset 0 (`new` seeks there). Use [`BankFileWriter`] to write a path
/// atomically.
pub struct BankWriter<W: Write + Seek> {
    out: W,
    location: String,
    plan: Plan,
    pages: Vec<PageEntry>,
    /// End of the bytes written so far (the next page goes at `align_up(pos)`).
    pos: u64,
    /// Index of the section of the next page.
    section: usize,
    /// Encoded rows of the next page, filled by `write_rows`.
    pending: Vec<u8>,
    pending_rows: u64,
    scratch: Vec<u8>,
}

impl<W: Write + Seek> BankWriter<W> {
    /// Starts a bank with `layout` on `out`; errors name the location `<writer>`.
    pub fn new(out: W, layout: &BankLayout) -> Result<Self, BankError> {
        Self::with_location(out, layout, "<writer>")
    }

    /// Starts a bank with `layout` on `out`; errors name `location`.
    pub fn with_location(
        mut out: W,
        layout: &BankLayout,
        location: impl Into<String>,
    ) -> Result<Self, BankError> {
        let location = location.into();
        let plan = layout.plan()?;
        let io = |source| BankError::Write {
            location: location.clone(),
            source,
        };
        out.seek(SeekFrom::Start(0)).map_err(io)?;
        write_zeros(&mut out, plan.meta_len).map_err(io)?;
        let pos = plan.meta_len;
        Ok(Self {
            out,
            location,
            pages: Vec::new(),
            pos,
            section: 0,
            pending: Vec::new(),
            pending_rows: 0,
            scratch: Vec::new(),
            plan,
        })
    }

    /// The validated layout: sections with their page ids.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Id of the next page to be written (= number of pages written).
    pub fn next_page(&self) -> PageId {
        self.pages.len() as PageId
    }

    /// Section of the next page, or None once every page is written.
    fn current_section(&mut self) -> Option<SectionInfo> {
        let id = self.next_page();
        while let Some(s) = self.plan.sections.get(self.section) {
            if id < s.first_page + s.geometry.page_count {
                return Some(*s);
            }
            self.section += 1;
        }
        None
    }

    fn all_written(&self) -> BankError {
        BankError::InvalidInput(format!(
            "{}: all {} pages of the bank are already written",
            self.location, self.plan.page_count
        ))
    }

    fn io(&self, source: std::io::Error) -> BankError {
        BankError::Write {
            location: self.location.clone(),
            source,
        }
    }

    /// Writes the next page from already-encoded bytes (`dtype` of its section,
    /// little-endian, exactly the page's length).
    pub fn write_page_bytes(&mut self, bytes: &[u8]) -> Result<(), BankError> {
        if self.pending_rows > 0 {
            return Err(BankError::InvalidInput(format!(
                "{}: page {} is partly filled by write_rows ({} rows); finish it with write_rows",
                self.location,
                self.next_page(),
                self.pending_rows
            )));
        }
        self.emit(bytes)
    }

    /// Writes the next page from f32 values (converted to the section's dtype).
    ///
    /// `values` must hold exactly the page's `rows × dim` values (a full page,
    /// or the remainder rows for the last page of a `pkm_values` section; one
    /// whole block `layers*3*units × dim` for `ffn_blocks`).
    pub fn write_page(&mut self, values: &[f32]) -> Result<(), BankError> {
        let s = self.current_section().ok_or_else(|| self.all_written())?;
        let local = self.next_page() - s.first_page;
        let expected = s.geometry.rows_in_page(local) * u64::from(s.geometry.dim);
        if values.len() as u64 != expected {
            return Err(BankError::InvalidInput(format!(
                "{}: page {} (section {}, {}) needs {expected} values, got {}",
                self.location,
                self.next_page(),
                s.index,
                s.spec.kind.name(),
                values.len()
            )));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        encode_into(s.spec.dtype, values, &mut scratch);
        let r = self.write_page_bytes(&scratch);
        self.scratch = scratch;
        r
    }

    /// Appends rows (`values.len()` a multiple of the section's `dim`) to the
    /// current section, cutting them into pages as they fill.
    ///
    /// A call may span pages but not sections: writing more rows than the
    /// current section has left is an error (nothing is written then).
    pub fn write_rows(&mut self, values: &[f32]) -> Result<(), BankError> {
        let s = self.current_section().ok_or_else(|| self.all_written())?;
        let dim = u64::from(s.geometry.dim);
        let n = values.len() as u64;
        let local = self.next_page() - s.first_page;
        let done = local * s.geometry.page_rows + self.pending_rows;
        let left = s.geometry.rows - done;
        if !n.is_multiple_of(dim) || n / dim > left {
            return Err(BankError::InvalidInput(format!(
                "{}: write_rows got {n} values, which is not a whole number of rows of {dim} \
                 or more than the {left} rows left in section {} ({})",
                self.location,
                s.index,
                s.spec.kind.name()
            )));
        }
        let mut rest = values;
        while !rest.is_empty() {
            let s = self.current_section().ok_or_else(|| self.all_written())?;
            let local = self.next_page() - s.first_page;
            let page_rows = s.geometry.rows_in_page(local);
            let take = (page_rows - self.pending_rows).min(rest.len() as u64 / dim);
            let (chunk, tail) = rest.split_at((take * dim) as usize);
            encode_into(s.spec.dtype, chunk, &mut self.pending);
            self.pending_rows += take;
            rest = tail;
            if self.pending_rows == page_rows {
                let page = std::mem::take(&mut self.pending);
                self.pending_rows = 0;
                let r = self.emit(&page);
                self.pending = page;
                self.pending.clear();
                r?;
            }
        }
        Ok(())
    }

    /// Writes one page's bytes at the next aligned offset and records its entry.
    fn emit(&mut self, bytes: &[u8]) -> Result<(), BankError> {
        let s = self.current_section().ok_or_else(|| self.all_written())?;
        let id = self.next_page();
        let expected = s.geometry.page_len(id - s.first_page);
        if bytes.len() as u64 != expected {
            return Err(BankError::InvalidInput(format!(
                "{}: page {id} (section {}, {} {}) needs {expected} bytes, got {}",
                self.location,
                s.index,
                s.spec.kind.name(),
                s.spec.dtype,
                bytes.len()
            )));
        }
        let offset = align_up(self.pos, u64::from(self.plan.page_align)).ok_or_else(|| {
            BankError::InvalidInput(format!("{}: file offset overflows", self.location))
        })?;
        write_zeros(&mut self.out, offset - self.pos).map_err(|e| self.io(e))?;
        self.out.write_all(bytes).map_err(|e| self.io(e))?;
        self.pages.push(PageEntry {
            offset,
            length: expected,
            checksum: checksum(bytes),
        });
        self.pos = offset + expected;
        Ok(())
    }

    /// Writes the header and page table and returns the inner writer.
    ///
    /// Fails if some page is not written yet.
    pub fn finish(mut self) -> Result<W, BankError> {
        if self.pending_rows > 0 || self.next_page() < self.plan.page_count {
            return Err(BankError::InvalidInput(format!(
                "{}: bank incomplete: {} of {} pages written{}",
                self.location,
                self.next_page(),
                self.plan.page_count,
                if self.pending_rows > 0 {
                    format!(
                        " and {} rows of page {} pending",
                        self.pending_rows,
                        self.next_page()
                    )
                } else {
                    String::new()
                }
            )));
        }
        let mut table = Vec::with_capacity((self.plan.meta_len - 64) as usize);
        for s in &self.plan.sections {
            table.extend_from_slice(&encode_section(s));
        }
        for e in &self.pages {
            table.extend_from_slice(&encode_page_entry(e));
        }
        let header = Header {
            version: VERSION,
            page_align: self.plan.page_align,
            section_count: self.plan.sections.len() as u32,
            page_count: self.plan.page_count,
            file_len: self.pos,
            table_checksum: checksum(&table),
        };
        let r: std::io::Result<()> = (|| {
            self.out.seek(SeekFrom::Start(0))?;
            self.out.write_all(&encode_header(&header))?;
            self.out.write_all(&table)?;
            self.out.seek(SeekFrom::Start(self.pos))?;
            self.out.flush()
        })();
        r.map_err(|e| self.io(e))?;
        Ok(self.out)
    }

    /// Bytes of the bank written so far (the file length once finished).
    pub fn len(&self) -> u64 {
        self.pos
    }

    /// Whether nothing beyond the reserved header and table has been written.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

fn write_zeros(out: &mut impl Write, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn process_id() -> u32 {
    #[cfg(not(target_family = "wasm"))]
    {
        std::process::id()
    }
    #[cfg(target_family = "wasm")]
    {
        0
    }
}

/// Writes a bank to a path atomically: a temporary file in the same
/// directory, renamed over `path` by [`BankFileWriter::finish`] after an
/// fsync. If the writer is dropped unfinished (or finishing fails) the
/// temporary file is removed and `path` is untouched.
pub struct BankFileWriter {
    writer: Option<BankWriter<BufWriter<File>>>,
    tmp: PathBuf,
    path: PathBuf,
}

impl BankFileWriter {
    /// Creates the temporary file next to `path` and starts the bank.
    pub fn create(path: impl AsRef<Path>, layout: &BankLayout) -> Result<Self, BankError> {
        let path = path.as_ref().to_path_buf();
        let location = path.display().to_string();
        layout.plan()?;
        let io = |source| BankError::Write {
            location: location.clone(),
            source,
        };
        let name = path.file_name().ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "path has no file name",
            ))
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (file, tmp) = loop {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".{}-{n}.tmp", process_id()));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => break (f, tmp),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1_000_000 => {
                    continue;
                }
                Err(e) => return Err(io(e)),
            }
        };
        let mut this = Self {
            writer: None,
            tmp,
            path,
        };
        this.writer = Some(BankWriter::with_location(
            BufWriter::with_capacity(1 << 20, file),
            layout,
            location,
        )?);
        Ok(this)
    }

    fn inner(&mut self) -> Result<&mut BankWriter<BufWriter<File>>, BankError> {
        self.writer
            .as_mut()
            .ok_or_else(|| BankError::InvalidInput("bank writer already finished".into()))
    }

    /// The validated layout. See [`BankWriter::plan`].
    pub fn plan(&self) -> Option<&Plan> {
        self.writer.as_ref().map(BankWriter::plan)
    }

    /// See [`BankWriter::next_page`].
    pub fn next_page(&self) -> PageId {
        self.writer.as_ref().map_or(0, BankWriter::next_page)
    }

    /// See [`BankWriter::write_page`].
    pub fn write_page(&mut self, values: &[f32]) -> Result<(), BankError> {
        self.inner()?.write_page(values)
    }

    /// See [`BankWriter::write_page_bytes`].
    pub fn write_page_bytes(&mut self, bytes: &[u8]) -> Result<(), BankError> {
        self.inner()?.write_page_bytes(bytes)
    }

    /// See [`BankWriter::write_rows`].
    pub fn write_rows(&mut self, values: &[f32]) -> Result<(), BankError> {
        self.inner()?.write_rows(values)
    }

    /// Writes the header and table, fsyncs, and renames the temporary file
    /// over the destination. Returns the file length in bytes.
    pub fn finish(mut self) -> Result<u64, BankError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| BankError::InvalidInput("bank writer already finished".into()))?;
        let len = writer.len();
        let location = self.path.display().to_string();
        let io = |source| BankError::Write {
            location: location.clone(),
            source,
        };
        let buf = writer.finish()?;
        {
            // Closed at the end of this block, before the rename (Windows needs that).
            let file = buf.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        self.tmp = PathBuf::new();
        #[cfg(unix)]
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Best effort: persist the rename itself.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(len)
    }
}

impl Drop for BankFileWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
