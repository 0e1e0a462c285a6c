//! How much of a model's memory may be resident at once: a [`Budget`].
//!
//! A budget is either a number of bytes or a percentage of the bank's
//! resident size (every value row in the bank's dtype, as the slot pools
//! hold it, and every block as f32: [`memlayer_bank::resident_bytes`]; a
//! 25 % budget of an f16 bank holds as many value pages as 25 % of the same
//! bank in f32, in half the bytes). A percentage needs the bank to become
//! bytes, so a front-end (the CLI's `--budget-mb` / `--budget-percent`, the C
//! ABI, the desktop app) keeps the [`Budget`] it was given and the runtime
//! [`Budget::resolve`]s it once the bank is open.
//!
//! Parsing is shared too, so every front-end refuses the same inputs with the
//! same words:
//!
//! ```
//! use memlayer_runtime::Budget;
//!
//! let quarter = Budget::parse_percent("25").unwrap();
//! assert_eq!(quarter.resolve(8 << 20), 2 << 20);
//! let one_mib = Budget::parse_mib("1").unwrap();
//! assert_eq!(one_mib.resolve(8 << 20), 1 << 20);
//! assert_eq!("25%".parse::<Budget>().unwrap(), quarter);
//! assert_eq!("1MiB".parse::<Budget>().unwrap(), one_mib);
//! assert_eq!(
//!     Budget::parse_percent("0").unwrap_err().to_string(),
//!     "0 is not a percentage in (0, 100]"
//! );
//! ```

use std::fmt;
use std::str::FromStr;

/// Bytes in a MiB.
const MIB: f64 = 1024.0 * 1024.0;

/// A resident-memory budget: bytes, or a percentage of the bank's resident
/// size ([`memlayer_bank::resident_bytes`]). Built only through its constructors and parsers, so a percent
/// budget is always in (0, 100]; the default is 100 % (the whole bank).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget(Kind);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Bytes(u64),
    Percent(f64),
}

/// Why a budget was refused; the message names the input and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetError {
    /// The text is not a number.
    NotANumber(String),
    /// A size that is not a finite number > 0.
    NotPositive(String),
    /// A percentage outside (0, 100].
    NotAPercentage(String),
    /// A [`FromStr`] input with no known unit.
    UnknownUnit(String),
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotANumber(s) => write!(f, "{s:?} is not a number"),
            Self::NotPositive(s) => write!(f, "{s} is not a finite number > 0"),
            Self::NotAPercentage(s) => write!(f, "{s} is not a percentage in (0, 100]"),
            Self::UnknownUnit(s) => write!(
                f,
                "{s:?} is not a budget (a percentage such as 25% or a size such as 64MiB, \
                 512KiB, 2GiB or 1048576B)"
            ),
        }
    }
}

impl std::error::Error for BudgetError {}

impl Default for Budget {
    /// [`Budget::FULL`].
    fn default() -> Self {
        Self::FULL
    }
}

impl Budget {
    /// 100 % of the bank: everything may be resident.
    pub const FULL: Budget = Budget(Kind::Percent(100.0));

    /// A budget of exactly `bytes` (a runtime refuses one too small to hold a
    /// page when it opens the bank).
    pub fn bytes(bytes: u64) -> Self {
        Self(Kind::Bytes(bytes))
    }

    /// A budget of `mib` MiB, rounded down to whole bytes (saturating at
    /// `u64::MAX`); `mib` must be finite and > 0.
    pub fn mib(mib: f64) -> Result<Self, BudgetError> {
        if !(mib.is_finite() && mib > 0.0) {
            return Err(BudgetError::NotPositive(mib.to_string()));
        }
        Ok(Self::bytes((mib * MIB) as u64))
    }

    /// A budget of `percent` % of the bank's resident size; `percent`
    /// must be in (0, 100].
    pub fn percent(percent: f64) -> Result<Self, BudgetError> {
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(BudgetError::NotAPercentage(percent.to_string()));
        }
        Ok(Self(Kind::Percent(percent)))
    }

    /// Parses a number of MiB (`--budget-mb`): finite and > 0, e.g. `1.5`.
    pub fn parse_mib(s: &str) -> Result<Self, BudgetError> {
        let x = number(s)?;
        Self::mib(x).map_err(|_| BudgetError::NotPositive(s.to_owned()))
    }

    /// Parses a percentage without its `%` (`--budget-percent`): in (0, 100].
    pub fn parse_percent(s: &str) -> Result<Self, BudgetError> {
        Ok(Self(Kind::Percent(parse_percent(s)?)))
    }

    /// The byte count of a byte budget.
    pub fn as_bytes(&self) -> Option<u64> {
        match self.0 {
            Kind::Bytes(b) => Some(b),
            Kind::Percent(_) => None,
        }
    }

    /// The percentage of a percent budget, in (0, 100].
    pub fn as_percent(&self) -> Option<f64> {
        match self.0 {
            Kind::Percent(p) => Some(p),
            Kind::Bytes(_) => None,
        }
    }

    /// The budget in bytes for a bank of `resident_bytes` (its resident
    /// size, [`memlayer_bank::resident_bytes`]): a byte budget as it is (it may
    /// exceed the bank), a percentage of `resident_bytes` rounded down (100 %
    /// is exactly `resident_bytes`).
    pub fn resolve(&self, resident_bytes: u64) -> u64 {
        match self.0 {
            Kind::Bytes(b) => b,
            Kind::Percent(p) if p >= 100.0 => resident_bytes,
            Kind::Percent(p) => (resident_bytes as f64 * p / 100.0) as u64,
        }
    }
}

/// Parses a percentage without its `%`: a number in (0, 100] (the messages
/// of [`Budget::parse_percent`]).
pub fn parse_percent(s: &str) -> Result<f64, BudgetError> {
    let x = number(s)?;
    if !(x > 0.0 && x <= 100.0) {
        return Err(BudgetError::NotAPercentage(s.to_owned()));
    }
    Ok(x)
}

fn number(s: &str) -> Result<f64, BudgetError> {
    s.parse().map_err(|_| BudgetError::NotANumber(s.to_owned()))
}

/// `25%` (a percentage), or a size with a binary unit: `64MiB`, `512KiB`,
/// `2GiB`, `1048576B` (units case-insensitive, spaces allowed before the
/// unit; `M`, `K`, `G` are read as MiB, KiB, GiB). The inverse of
/// [`Budget`]'s `Display` (`25%`, `1048576B`).
impl FromStr for Budget {
    type Err = BudgetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return Self::parse_percent(p.trim_end())
                .map_err(|_| BudgetError::NotAPercentage(s.to_owned()));
        }
        let split = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
        let (num, unit) = t.split_at(split);
        let scale = match unit.to_ascii_lowercase().as_str() {
            "b" => 1.0,
            "k" | "kib" => 1024.0,
            "m" | "mib" => MIB,
            "g" | "gib" => MIB * 1024.0,
            _ => return Err(BudgetError::UnknownUnit(s.to_owned())),
        };
        let x: f64 = num
            .trim_end()
            .parse()
            .map_err(|_| BudgetError::NotANumber(s.to_owned()))?;
        if !(x.is_finite() && x > 0.0) {
            return Err(BudgetError::NotPositive(s.to_owned()));
        }
        Ok(Self::bytes((x * scale) as u64))
    }
}

/// `25%` or `1048576B` ([`FromStr`] reads both back).
impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Kind::Bytes(b) => write!(f, "{b}B"),
            Kind::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_keep_their_bounds_and_messages() {
        for bad in ["nan", "NaN", "-4", "0", "inf", "-inf"] {
            let e = Budget::parse_mib(bad).unwrap_err();
            assert_eq!(e.to_string(), format!("{bad} is not a finite number > 0"));
        }
        assert_eq!(
            Budget::parse_mib("abc").unwrap_err().to_string(),
            "\"abc\" is not a number"
        );
        for bad in ["0", "-1", "100.5", "nan", "inf"] {
            let e = Budget::parse_percent(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{bad} is not a percentage in (0, 100]")
            );
        }
        assert_eq!(
            Budget::parse_percent("x").unwrap_err().to_string(),
            "\"x\" is not a number"
        );
        assert_eq!(Budget::parse_percent("100").unwrap(), Budget::FULL);
        assert_eq!(Budget::parse_mib("0.5").unwrap(), Budget::bytes(512 * 1024));
    }

    #[test]
    fn resolve_matches_the_cli_arithmetic() {
        let bank = 8_388_608 + 12_345;
        assert_eq!(Budget::FULL.resolve(bank), bank);
        assert_eq!(Budget::default().resolve(u64::MAX), u64::MAX);
        for p in [25.0, 33.3, 0.01, 99.99] {
            let b = Budget::percent(p).unwrap();
            assert_eq!(b.resolve(bank), (bank as f64 * p / 100.0) as u64);
        }
        for mb in [1.0, 0.0001, 2.5] {
            let b = Budget::mib(mb).unwrap();
            assert_eq!(b.resolve(bank), (mb * 1024.0 * 1024.0) as u64);
            assert_eq!(b.as_bytes(), Some((mb * 1024.0 * 1024.0) as u64));
        }
        assert_eq!(Budget::mib(1e300).unwrap().resolve(1), u64::MAX);
        assert_eq!(Budget::percent(25.0).unwrap().as_percent(), Some(25.0));
        assert!(Budget::percent(0.0).is_err() && Budget::mib(f64::NAN).is_err());
    }

    #[test]
    fn from_str_and_display_round_trip() {
        let cases = [
            ("25%", Budget::percent(25.0).unwrap()),
            (" 12.5 % ", Budget::percent(12.5).unwrap()),
            ("64MiB", Budget::bytes(64 << 20)),
            ("1.5 mib", Budget::bytes(3 << 19)),
            ("512KiB", Budget::bytes(512 << 10)),
            ("2G", Budget::bytes(2 << 30)),
            ("1e3B", Budget::bytes(1000)),
            ("4096B", Budget::bytes(4096)),
        ];
        for (text, want) in cases {
            let got: Budget = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<Budget>().unwrap(), got, "{text}");
        }
        for bad in [
            "", "25", "0%", "150%", "x%", "-1MiB", "nanMiB", "5 TB", "MiB",
        ] {
            assert!(bad.parse::<Budget>().is_err(), "{bad:?} accepted");
        }
        assert!(
            "5 TB"
                .parse::<Budget>()
                .unwrap_err()
                .to_string()
                .contains("not a budget")
        );
    }
}
