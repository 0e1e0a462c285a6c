//! Where a model's memory bank is read from: [`Source`], the value of
//! `--source` — the runtime's [`memlayer_runtime::open::BankLocation`]
//! (`file`, a path, or an http(s):// URL), shared with the C ABI and the
//! desktop app.

pub use memlayer_runtime::open::BankLocation as Source;
