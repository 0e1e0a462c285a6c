//! The stats line `generate` and `chat` print on stderr after a generation.

use memlayer_runtime::paged::PagedMemory;
use memlayer_runtime::{Generation, MemoryStats};

/// One line of stats: speed, and for a model with paged memory its hit
/// rate, resident pages, bytes streamed and budget (`memory`: the paged
/// memory and the counters to show, e.g. one chat turn's).
pub fn stats_line(g: &Generation, memory: Option<(&MemoryStats, &PagedMemory)>) -> String {
    let speed = format!(
        "{} prompt + {} tokens, first token {:.2} s, {:.1} tok/s",
        g.prompt_tokens,
        g.tokens.len(),
        g.first_token_seconds,
        g.decode_tokens_per_second(),
    );
    let Some((st, mem)) = memory else {
        return format!("[{speed} | no memory layers]");
    };
    format!(
        "[{speed} | hit rate {:.1}% | pages resident {}/{} | {:.2} MiB streamed in {} pages | budget {:.2} MiB on {}]",
        100.0 * st.hit_rate(),
        mem.resident_pages(),
        mem.value_pages(),
        st.bytes_streamed as f64 / (1024.0 * 1024.0),
        st.pages_streamed,
        mem.budget_bytes() as f64 / (1024.0 * 1024.0),
        mem.pool_name(),
    )
}

/// The counters of what happened between `before` and `after` (one chat
/// turn); the gauges are `after`'s.
pub fn since(before: &MemoryStats, after: &MemoryStats) -> MemoryStats {
    MemoryStats {
        value_accesses: after.value_accesses - before.value_accesses,
        value_hits: after.value_hits - before.value_hits,
        block_requests: after.block_requests - before.block_requests,
        block_hits: after.block_hits - before.block_hits,
        pages_streamed: after.pages_streamed - before.pages_streamed,
        bytes_streamed: after.bytes_streamed - before.bytes_streamed,
        ..*after
    }
}
