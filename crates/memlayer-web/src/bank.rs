//! The memory bank read remotely: its header and page table are fetched
//! once, its pages on demand, each verified against the table's checksum.
//!
//! The code lives in the bank crate ([`memlayer_bank::remote`]), next to the
//! page-in engine that drives it; this module re-exports it under its
//! browser-runtime path (its errors are [`crate::WebError::Remote`]).
//! [`PageFetch`] is where bytes come from: in the browser `fetch` with a
//! `Range` header and a local copy (`web.rs`), natively any
//! [`memlayer_bank::PageSource`] through [`SourceFetch`].

pub use memlayer_bank::remote::{
    FetchedPage, MAX_RUN_BYTES, PageFetch, RemoteBank, RemoteError, SourceFetch, TABLE_RANGE_BYTES,
    adjacent_runs,
};
