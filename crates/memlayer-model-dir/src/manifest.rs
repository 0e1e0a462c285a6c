//! The checksums of a model directory: `checksums.json` (docs/FORMAT.md,
//! "Model directory").
//!
//! The bank checks itself (every page has its xxh3 in the page table, and the
//! table's own xxh3 is in the header), but the other files of a model
//! directory did not: a flipped byte in `model.safetensors` gave garbage text.
//! `checksums.json` records, for every file a runtime reads, its byte length
//! and xxh3-64, and for the bank its length and the header's table checksum —
//! which covers every page's checksum, so it identifies the whole bank from its
//! first bytes (a bank served over HTTP is identified without reading its
//! pages). The exporter writes it last; the native and the browser runtimes
//! verify with this one implementation.
//!
//! ```
//! use memlayer_model_dir::manifest::Checksums;
//! let mut c = Checksums::new();
//! c.add_file("config.json", b"{}");
//! let c = Checksums::from_json(&c.to_json(), "checksums.json").unwrap();
//! c.verify_file("config.json", b"{}").unwrap();
//! assert!(c.verify_file("config.json", b"{ }").is_err());
//! assert!(c.verify_file("tokenizer.json", b"{}").is_err()); // not listed
//! ```

use memlayer_bank::{Header, format::checksum};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// File name of the checksums in a model directory.
pub const CHECKSUMS_FILE: &str = "checksums.json";
/// `format` field of [`Checksums`].
pub const CHECKSUMS_FORMAT: &str = "memlayer-checksums";
/// `version` field of [`Checksums`] this crate writes and reads.
pub const CHECKSUMS_VERSION: u32 = 1;
/// File name of the bank in a model directory.
pub const BANK_FILE: &str = "memory.bank";

/// u64 checksums as 16 lower-case hex digits (JSON numbers lose precision
/// above 2^53 in JavaScript and in many JSON tools).
mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(D::Error::custom(format!(
                "checksum {text:?} is not 16 hex digits"
            )));
        }
        u64::from_str_radix(&text, 16).map_err(D::Error::custom)
    }
}

/// Length and xxh3-64 of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Bytes.
    pub len: u64,
    /// xxh3-64 (seed 0) of the whole file, as 16 hex digits in JSON.
    #[serde(with = "hex64")]
    pub xxh3: u64,
}

impl FileDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            xxh3: checksum(bytes),
        }
    }
}

impl std::fmt::Display for FileDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, xxh3 {:016x}", self.len, self.xxh3)
    }
}

/// What identifies a bank: its file length and the header's table checksum
/// (the xxh3 of the section descriptors and the page table, which holds
/// every page's xxh3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BankIdentity {
    /// The bank's file name in the directory (`memory.bank`).
    pub file: String,
    /// File length in bytes (the header's `file_len`).
    pub len: u64,
    /// The header's `table_checksum`, as 16 hex digits in JSON.
    #[serde(with = "hex64")]
    pub table_xxh3: u64,
}

impl BankIdentity {
    /// The identity of the bank whose header is `header`, stored as `file`.
    pub fn of(file: &str, header: &Header) -> Self {
        Self {
            file: file.to_string(),
            len: header.file_len,
            table_xxh3: header.table_checksum,
        }
    }
}

/// `checksums.json`: the digests of a model directory's files and the
/// identity of its bank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checksums {
    /// [`CHECKSUMS_FORMAT`].
    pub format: String,
    /// [`CHECKSUMS_VERSION`].
    pub version: u32,
    /// Every file a runtime reads (but the bank), by name in the directory.
    pub files: BTreeMap<String, FileDigest>,
    /// The bank, when the model has a memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank: Option<BankIdentity>,
}

impl Default for Checksums {
    fn default() -> Self {
        Self::new()
    }
}

/// A model directory whose files do not match their checksums, or whose
/// checksums are missing or unreadable. Every message names the file (or the
/// bank's path or URL) and both values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The directory has no `checksums.json`.
    #[error(
        "{location} is missing: the files of this model directory cannot be verified (it was \
         exported before checksums existed, or copied without them). Re-export the model \
         (`memlayer train … --out DIR` writes checksums.json last), or, if you trust its files \
         as they are, record their checksums with `memlayer checksums DIR`"
    )]
    Missing {
        /// Where `checksums.json` was looked for (path or URL).
        location: String,
    },
    /// `checksums.json` is not valid.
    #[error("{location}: not a valid checksums file: {message}")]
    Parse {
        /// Its path or URL.
        location: String,
        /// What is wrong.
        message: String,
    },
    /// A file the runtime reads has no entry.
    #[error(
        "{file} has no entry in checksums.json, so it cannot be verified (re-export the model)"
    )]
    Unlisted {
        /// The file.
        file: String,
    },
    /// A file's bytes differ from its recorded digest.
    #[error(
        "checksum mismatch for {file}: checksums.json records {expected}, the file has \
         {actual} (the file is corrupt or is not this model's)"
    )]
    FileMismatch {
        /// The file.
        file: String,
        /// Recorded.
        expected: FileDigest,
        /// Read.
        actual: FileDigest,
    },
    /// A bank is used but `checksums.json` records none.
    #[error("checksums.json records no bank, so the bank at {location} cannot be verified")]
    NoBank {
        /// The bank's path or URL.
        location: String,
    },
    /// The bank's header does not match the recorded identity.
    #[error(
        "the bank at {location} is not this model's bank: its table checksum is \
         {actual_table:016x} and its length {actual_len} bytes; checksums.json records table \
         checksum {:016x} and {} bytes for {}",
        expected.table_xxh3,
        expected.len,
        expected.file
    )]
    NotThisBank {
        /// The bank's path or URL.
        location: String,
        /// Recorded.
        expected: BankIdentity,
        /// The header's table checksum.
        actual_table: u64,
        /// The header's file length, or the source's length when it differs.
        actual_len: u64,
    },
}

impl Checksums {
    /// No files, no bank.
    pub fn new() -> Self {
        Self {
            format: CHECKSUMS_FORMAT.to_string(),
            version: CHECKSUMS_VERSION,
            files: BTreeMap::new(),
            bank: None,
        }
    }

    /// Records `name` with the digest of `bytes`.
    pub fn add_file(&mut self, name: &str, bytes: &[u8]) {
        self.files.insert(name.to_string(), FileDigest::of(bytes));
    }

    /// Records the bank stored as `file` whose header is `header`.
    pub fn set_bank(&mut self, file: &str, header: &Header) {
        self.bank = Some(BankIdentity::of(file, header));
    }

    /// Pretty JSON with a final newline (files sorted by name: the same
    /// directory always gives the same bytes).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses `checksums.json` text read from `location` (format and
    /// version checked, unknown fields refused).
    pub fn from_json(text: &str, location: &str) -> Result<Self, ManifestError> {
        let parse = |message: String| ManifestError::Parse {
            location: location.to_string(),
            message,
        };
        let c: Self = serde_json::from_str(text).map_err(|e| parse(e.to_string()))?;
        if c.format != CHECKSUMS_FORMAT || c.version != CHECKSUMS_VERSION {
            return Err(parse(format!(
                "format {:?} version {}, expected {CHECKSUMS_FORMAT:?} version {CHECKSUMS_VERSION}",
                c.format, c.version
            )));
        }
        Ok(c)
    }

    /// Checks that `bytes`, read as `name`, are what was recorded.
    pub fn verify_file(&self, name: &str, bytes: &[u8]) -> Result<(), ManifestError> {
        let expected = *self
            .files
            .get(name)
            .ok_or_else(|| ManifestError::Unlisted {
                file: name.to_string(),
            })?;
        let actual = FileDigest::of(bytes);
        if actual != expected {
            return Err(ManifestError::FileMismatch {
                file: name.to_string(),
                expected,
                actual,
            });
        }
        Ok(())
    }

    /// Checks that the bank at `location` (path or URL), whose validated
    /// header is `header` and whose source holds `source_len` bytes when
    /// known, is the recorded one: same table checksum, same length.
    pub fn verify_bank(
        &self,
        location: &str,
        header: &Header,
        source_len: Option<u64>,
    ) -> Result<(), ManifestError> {
        let expected = self.bank.as_ref().ok_or_else(|| ManifestError::NoBank {
            location: location.to_string(),
        })?;
        let actual_len = match source_len {
            Some(n) if n != header.file_len => n,
            _ => header.file_len,
        };
        if header.table_checksum != expected.table_xxh3 || actual_len != expected.len {
            return Err(ManifestError::NotThisBank {
                location: location.to_string(),
                expected: expected.clone(),
                actual_table: header.table_checksum,
                actual_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memlayer_bank::{BankLayout, BankReader, BankWriter, Dtype, MemSource, SectionSpec};

    fn bank(seed: f32, rows: u64) -> Vec<u8> {
        let layout = BankLayout::new(vec![SectionSpec::pkm_values(rows, 4, 2, Dtype::F32)]);
        let mut w = BankWriter::new(std::io::Cursor::new(Vec::new()), &layout).unwrap();
        let values: Vec<f32> = (0..rows * 4).map(|i| seed + i as f32).collect();
        w.write_rows(&values).unwrap();
        w.finish().unwrap().into_inner()
    }

    fn header(bytes: &[u8]) -> Header {
        *BankReader::open(MemSource::new(bytes.to_vec()))
            .unwrap()
            .header()
    }

    fn sample() -> (Checksums, Vec<u8>) {
        let b = bank(0.0, 10);
        let mut c = Checksums::new();
        c.add_file("config.json", br#"{"dim": 4}"#);
        c.add_file("model.safetensors", &[7u8; 300]);
        c.set_bank(BANK_FILE, &header(&b));
        (c, b)
    }

    #[test]
    fn round_trip_is_exact_and_stable() {
        let (c, _) = sample();
        let json = c.to_json();
        assert!(json.ends_with('\n'));
        let back = Checksums::from_json(&json, "x").unwrap();
        assert_eq!(back, c);
        assert_eq!(back.to_json(), json, "same bytes again");
        // checksums are 16 hex digits, never JSON numbers
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let x = &v["files"]["model.safetensors"]["xxh3"];
        assert_eq!(x.as_str().map(str::len), Some(16), "{v}");
        assert_eq!(v["bank"]["table_xxh3"].as_str().map(str::len), Some(16));
        assert_eq!(v["format"], CHECKSUMS_FORMAT);
    }

    #[test]
    fn bad_manifests_are_refused_with_the_location() {
        let (c, _) = sample();
        let json = c.to_json();
        for bad in [
            json.replace(CHECKSUMS_FORMAT, "other"),
            json.replace("\"version\": 1", "\"version\": 2"),
            json.replace("\"len\"", "\"length\""),
            "[]".to_string(),
            {
                let h = format!("{:016x}", c.files["config.json"].xxh3);
                json.replace(&h, "12345")
            },
        ] {
            assert_ne!(bad, json);
            let e = Checksums::from_json(&bad, "/m/checksums.json").unwrap_err();
            assert!(matches!(e, ManifestError::Parse { .. }), "{e}");
            assert!(e.to_string().contains("/m/checksums.json"), "{e}");
        }
    }

    #[test]
    fn any_changed_byte_or_length_is_a_named_mismatch() {
        let (c, _) = sample();
        c.verify_file("model.safetensors", &[7u8; 300]).unwrap();
        for i in [0usize, 150, 299] {
            let mut b = vec![7u8; 300];
            b[i] ^= 0x10;
            let e = c.verify_file("model.safetensors", &b).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("model.safetensors")
                    && msg.contains(&format!("{:016x}", FileDigest::of(&[7u8; 300]).xxh3))
                    && msg.contains(&format!("{:016x}", FileDigest::of(&b).xxh3)),
                "{msg}"
            );
        }
        let e = c.verify_file("model.safetensors", &[7u8; 299]).unwrap_err();
        assert!(e.to_string().contains("299 bytes"), "{e}");
        let e = c.verify_file("tokenizer.json", b"{}").unwrap_err();
        assert_eq!(
            e,
            ManifestError::Unlisted {
                file: "tokenizer.json".into()
            }
        );
    }

    #[test]
    fn the_bank_is_identified_by_its_header() {
        let (c, b) = sample();
        c.verify_bank("here", &header(&b), Some(b.len() as u64))
            .unwrap();
        c.verify_bank("here", &header(&b), None).unwrap();
        // same shape, other values: another table checksum
        let other = bank(1.0, 10);
        let e = c
            .verify_bank("http://x/memory.bank", &header(&other), None)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("the bank at http://x/memory.bank is not this model's bank"),
            "{msg}"
        );
        // a truncated source of the right bank
        let e = c
            .verify_bank("here", &header(&b), Some(b.len() as u64 - 1))
            .unwrap_err();
        assert!(matches!(e, ManifestError::NotThisBank { .. }), "{e}");
        // no bank recorded
        let mut none = c.clone();
        none.bank = None;
        let e = none.verify_bank("here", &header(&b), None).unwrap_err();
        assert!(e.to_string().contains("records no bank"), "{e}");
    }
}
