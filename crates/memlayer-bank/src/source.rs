//! Page sources: where bank bytes come from (local file, memory; later HTTP
//! Range and browser fetch).
//!
//! A source only reads byte ranges; it knows nothing about pages. The
//! [`super::BankReader`] adds page ids and locations to its errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a source could not deliver bytes.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source could not be opened.
    #[error("cannot open {location}: {source}")]
    Open {
        /// Path or URL.
        location: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The path names something other than a regular file (a FIFO, a
    /// directory, a socket, a device): it is refused before it is read,
    /// and without blocking (a FIFO with no writer would block an open).
    #[error("cannot open {location}: it is a {kind}, not a regular file")]
    NotRegularFile {
        /// The path.
        location: String,
        /// What it is: `FIFO (named pipe)`, `directory`, `socket`, ...
        kind: &'static str,
    },
    /// The requested range lies (partly) past the end of the source.
    #[error("range {offset}..{} is past the end of the source ({size} bytes)", .offset.saturating_add(*.length))]
    OutOfBounds {
        /// Start of the read.
        offset: u64,
        /// Length of the read.
        length: u64,
        /// Length of the source.
        size: u64,
    },
    /// An I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Any other failure (e.g. an HTTP status), described.
    #[error("{0}")]
    Other(String),
}

/// Random-access bytes of a bank file.
///
/// Implementations are cheap to share between threads (`Send + Sync`) and
/// must be object-safe so readers can hold a `Box<dyn PageSource>`.
pub trait PageSource: Send + Sync {
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`, or fails
    /// (a short read is an error, never a partial fill).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Total length of the source in bytes.
    fn len(&self) -> Result<u64, SourceError>;

    /// Whether the source is empty.
    fn is_empty(&self) -> Result<bool, SourceError> {
        Ok(self.len()? == 0)
    }

    /// The path or URL, for error messages.
    fn describe(&self) -> String;

    /// Reads several ranges `(offset, length)`: one result per range, in
    /// order. The default reads them one after the other with
    /// [`PageSource::read_at`]; a source where every request costs a round
    /// trip (HTTP) batches them ([`PageSource::batches_reads`]).
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Vec<Result<Vec<u8>, SourceError>> {
        ranges
            .iter()
            .map(|&(offset, len)| {
                let size = self.len()?;
                let length = usize::try_from(len)
                    .ok()
                    .filter(|_| offset.checked_add(len).is_some_and(|end| end <= size))
                    .ok_or(SourceError::OutOfBounds {
                        offset,
                        length: len,
                        size,
                    })?;
                let mut buf = vec![0u8; length];
                self.read_at(offset, &mut buf)?;
                Ok(buf)
            })
            .collect()
    }

    /// Whether [`PageSource::read_ranges`] costs less than as many
    /// [`PageSource::read_at`] calls (it batches or overlaps them): a
    /// driver then hands it a whole burst of misses at once instead of
    /// reading page by page on its own threads.
    fn batches_reads(&self) -> bool {
        false
    }
}

/// Any pointer to a source is a source (`&S`, `Box<S>`, `Arc<S>`, and
/// `Box<dyn PageSource>`): every call goes to the source it points to.
impl<P> PageSource for P
where
    P: std::ops::Deref + Send + Sync,
    P::Target: PageSource,
{
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_at(offset, buf)
    }
    fn len(&self) -> Result<u64, SourceError> {
        (**self).len()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Vec<Result<Vec<u8>, SourceError>> {
        (**self).read_ranges(ranges)
    }
    fn batches_reads(&self) -> bool {
        (**self).batches_reads()
    }
}

fn check_range(offset: u64, length: usize, size: u64) -> Result<(), SourceError> {
    let length = length as u64;
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(SourceError::OutOfBounds {
            offset,
            length,
            size,
        }),
    }
}

/// Bytes held in memory (tests, fuzzing, banks already downloaded).
#[derive(Clone, Debug)]
pub struct MemSource {
    bytes: Arc<[u8]>,
    name: String,
}

impl MemSource {
    /// A source over `bytes`, described as `<memory>`.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> Self {
        Self::named(bytes, "<memory>")
    }

    /// A source over `bytes` with a name for error messages.
    pub fn named(bytes: impl Into<Arc<[u8]>>, name: impl Into<String>) -> Self {
        Self {
            bytes: bytes.into(),
            name: name.into(),
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl PageSource for MemSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.bytes.len() as u64)?;
        // In range, so `offset` fits usize.
        let start = offset as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Ok(())
    }
    fn len(&self) -> Result<u64, SourceError> {
        Ok(self.bytes.len() as u64)
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(any(unix, windows))]
type FileHandle = std::fs::File;
#[cfg(not(any(unix, windows)))]
type FileHandle = std::sync::Mutex<std::fs::File>;

/// A local file read with positioned reads (`pread` on unix, `seek_read` on
/// windows, a locked seek + read elsewhere). The file is never loaded whole.
///
/// The length is taken when the file is opened; a file that shrinks later
/// gives `OutOfBounds`/I/O errors on reads, never short data.
#[derive(Debug)]
pub struct FileSource {
    file: FileHandle,
    path: PathBuf,
    size: u64,
}

/// `O_NONBLOCK` for the unix targets whose value is known (the `libc`
/// crate is not a dependency): 0o4000 on Linux/Android for the common
/// architectures, 0x4 on the BSDs and Apple platforms. Elsewhere the stat
/// before the open is the only guard.
#[cfg(unix)]
const O_NONBLOCK: Option<i32> = if cfg!(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv32",
        target_arch = "riscv64",
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "s390x",
        target_arch = "loongarch64"
    )
)) {
    Some(0o4000)
} else if cfg!(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
)) {
    Some(0x4)
} else {
    None
};

/// What a file type is, or `None` for a regular file.
fn special_kind(t: &std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("directory");
    }
    if t.is_symlink() {
        return Some("symbolic link");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("FIFO (named pipe)");
        }
        if t.is_socket() {
            return Some("socket");
        }
        if t.is_char_device() {
            return Some("character device");
        }
        if t.is_block_device() {
            return Some("block device");
        }
    }
    Some("special file")
}

/// Opens `path` read-only; on unix with `O_NONBLOCK`, so that a path that
/// became a FIFO after it was checked cannot block the open (the flag
/// changes nothing for reads of a regular file).
fn open_read(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    if let Some(flag) = O_NONBLOCK {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(flag);
    }
    options.open(path)
}

impl FileSource {
    /// Opens the regular file `path` for reading.
    ///
    /// Anything else (a FIFO, directory, socket or device) is refused with
    /// [`SourceError::NotRegularFile`] without blocking: the path is
    /// stat'ed before it is opened, opened non-blocking on unix, and the
    /// opened handle is checked again (the path may change in between).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| SourceError::Open {
            location: path.display().to_string(),
            source,
        };
        let refuse = |t: &std::fs::FileType| match special_kind(t) {
            None => Ok(()),
            Some(kind) => Err(SourceError::NotRegularFile {
                location: path.display().to_string(),
                kind,
            }),
        };
        refuse(&std::fs::metadata(&path).map_err(open_err)?.file_type())?;
        let file = open_read(&path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        refuse(&meta.file_type())?;
        let size = meta.len();
        #[cfg(not(any(unix, windows)))]
        let file = std::sync::Mutex::new(file);
        Ok(Self { file, path, size })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(unix)]
    fn read_raw(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }

    #[cfg(windows)]
    fn read_raw(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::windows::fs::FileExt;
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.seek_read(&mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[cfg(not(any(unix, windows)))]
    fn read_raw(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("file lock poisoned"))?;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buf)
    }
}

impl PageSource for FileSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.size)?;
        self.read_raw(offset, buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // The file shrank since it was opened.
                SourceError::OutOfBounds {
                    offset,
                    length: buf.len() as u64,
                    size: std::fs::metadata(&self.path).map_or(0, |m| m.len()),
                }
            } else {
                SourceError::Io(e)
            }
        })
    }
    fn len(&self) -> Result<u64, SourceError> {
        Ok(self.size)
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Helpers for tests of sources on unusual files (this crate's tests and
/// the CLI's). Not part of the API.
#[doc(hidden)]
pub mod testing {
    use std::io::Write;
    use std::path::Path;

    /// Creates `path` as a sparse file of `len` bytes that starts with
    /// `head`. `Ok(false)` after a loud `SKIPPED` line naming `test` when the
    /// file system cannot hold a file that large (the caller skips its test).
    pub fn sparse_file(path: &Path, len: u64, head: &[u8], test: &str) -> std::io::Result<bool> {
        let mut file = std::fs::File::create(path)?;
        if let Err(e) = file.set_len(len) {
            if matches!(
                e.kind(),
                std::io::ErrorKind::FileTooLarge | std::io::ErrorKind::StorageFull
            ) {
                eprintln!(
                    "!!! SKIPPED {test}: the temp file system cannot hold a sparse {len}-byte file ({e}) !!!"
                );
                return Ok(false);
            }
            return Err(e);
        }
        file.write_all(head)?;
        Ok(true)
    }

    /// Makes a FIFO (named pipe) at `path` with `mkfifo`; panics if it cannot.
    #[cfg(unix)]
    pub fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("run mkfifo");
        assert!(status.success(), "mkfifo failed: {status}");
    }
}
