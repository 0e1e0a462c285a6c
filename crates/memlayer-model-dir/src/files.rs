//! Whole-file reads and atomic writes; errors name the path.

use crate::error::{ModelDirError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed and synced, then renamed over `path`. A reader never
/// sees a half-written file; on error the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| ModelDirError::Config(format!("{} is not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f =
            std::fs::File::create(&tmp).map_err(|e| ModelDirError::io("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| ModelDirError::io("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| ModelDirError::io("sync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelDirError::io("rename into", path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole file as UTF-8; errors name the path (missing file, not
/// UTF-8 with the offset of the first bad byte).
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| ModelDirError::io("read", path, e))?;
    String::from_utf8(bytes).map_err(|e| ModelDirError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// A fresh, empty directory under the system temp dir for tests.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "memlayer-model-dir-{name}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}
