//! Where a model's memory bank is read from: [`Source`], the value of
//! `--source`.

use anyhow::{Context, Result};
use memlayer_bank::{FileSource, PageSource};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What a `--source` names, parsed once while the flags are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `file`: the model directory's own `memory.bank`.
    ModelDir,
    /// A local bank file.
    Path(PathBuf),
    /// An http(s):// URL (scheme in any case), read with Range requests.
    Url(String),
}

impl FromStr for Source {
    type Err = String;

    /// `file`, a path, or a URL. A URL scheme is matched without regard to
    /// case (`HTTP://` is a URL); any scheme other than http and https is
    /// refused by name instead of being taken for a path.
    fn from_str(source: &str) -> Result<Self, String> {
        if source == "file" {
            return Ok(Self::ModelDir);
        }
        if source.is_empty() {
            return Err(
                "an empty source (give `file`, a bank's path or an http(s):// URL)".to_owned(),
            );
        }
        if let Some((scheme, _)) = source.split_once("://") {
            let is_scheme = scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if is_scheme {
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
                    return Ok(Self::Url(source.to_owned()));
                }
                return Err(format!(
                    "unsupported URL scheme {scheme}:// (a bank is read from a file path or an \
                     http:// or https:// URL)"
                ));
            }
        }
        Ok(Self::Path(PathBuf::from(source)))
    }
}

/// As it was given: `file`, the path, or the URL.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ModelDir => f.write_str("file"),
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Url(u) => f.write_str(u),
        }
    }
}

impl Source {
    /// Whether pages come over the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, Self::Url(_))
    }

    /// Opens the page source; `dir` is the model directory ([`Source::ModelDir`]).
    pub fn open(&self, dir: &Path) -> Result<Box<dyn PageSource>> {
        match self {
            Self::Url(url) => {
                let s = memlayer_http::HttpSource::open(url)
                    .with_context(|| format!("opening the bank at {url}"))?;
                Ok(Box::new(s))
            }
            Self::ModelDir => open_file(&dir.join("memory.bank")),
            Self::Path(path) => open_file(path),
        }
    }
}

fn open_file(path: &Path) -> Result<Box<dyn PageSource>> {
    let s = FileSource::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Box::new(s))
}

#[cfg(test)]
mod tests {
    use super::Source;

    #[test]
    fn sources_parse_by_scheme_not_by_prefix() {
        let p = |s: &str| s.parse::<Source>();
        assert_eq!(p("file"), Ok(Source::ModelDir));
        assert_eq!(
            p("http://h/m.bank"),
            Ok(Source::Url("http://h/m.bank".into()))
        );
        assert_eq!(
            p("HtTpS://h/m.bank"),
            Ok(Source::Url("HtTpS://h/m.bank".into()))
        );
        // a file whose name starts with "http" is a path
        assert_eq!(
            p("httpdocs/m.bank"),
            Ok(Source::Path("httpdocs/m.bank".into()))
        );
        assert_eq!(p("./http:/x"), Ok(Source::Path("./http:/x".into())));
        // "://" after something that is not a scheme: a path
        assert_eq!(p("a b://c"), Ok(Source::Path("a b://c".into())));
        assert_eq!(p("1x://c"), Ok(Source::Path("1x://c".into())));
        for bad in ["ftp://h/b", "file://h/b", "gopher://x/y", "s3://b/k"] {
            let e = p(bad).unwrap_err();
            assert!(e.starts_with("unsupported URL scheme "), "{bad}: {e}");
        }
        assert!(p("").is_err());
        for s in ["file", "http://h/m.bank", "/x/m.bank"] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
    }
}
