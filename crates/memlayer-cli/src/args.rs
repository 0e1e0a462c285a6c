//! Argument groups and value parsers shared by several commands: where a
//! model runs ([`Backend`], [`OpsChoice`]), where its memory comes from and
//! how much of it may be resident ([`MemoryArgs`], [`BudgetArg`]), and
//! sampling ([`SamplingArgs`]). Every value is checked while the flags are
//! parsed (a bad one is a usage error, exit code 2, naming the flag), before
//! a model is opened.

use crate::source::Source;
use clap::{ArgMatches, Args, FromArgMatches, ValueEnum};
use memlayer_runtime::Budget;
use memlayer_runtime::Sampling;
use memlayer_runtime::paged::MAX_FETCH_THREADS;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's CPU backend (Flex) with memlayer's CPU memory ops.
    Cpu,
    /// burn-wgpu (Vulkan/Metal/DX12; lavapipe on a machine without GPU).
    Wgpu,
    /// An NVIDIA GPU through CUDA (feature `cuda`): the value page slots
    /// and the embedding-bag on the GPU in the bank's dtype; the dense part
    /// runs on burn's CPU backend (inference only).
    #[cfg(feature = "cuda")]
    Cuda,
}

/// Memory-op implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OpsChoice {
    /// The backend extension where it runs (CPU kernels, WGSL on wgpu), else portable.
    Auto,
    /// burn tensor ops only.
    Portable,
    /// The backend extension (CPU kernels on `cpu`, WGSL kernels on `wgpu`).
    Native,
}

/// Where the memory comes from and how much of it may be resident.
#[derive(Args, Clone, Debug)]
pub struct MemoryArgs {
    /// The bank: `file` (the directory's memory.bank), a path, or an
    /// http(s):// URL (read with Range requests, e.g. from `memlayer serve`).
    /// A model without memory layers has no bank: only `file` is accepted.
    #[arg(long, default_value = "file", value_parser = parse_source)]
    pub source: Source,
    #[command(flatten)]
    pub budget: BudgetArg,
    /// Where the model runs and the page slots live.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// Pages fetched concurrently (0: 1 for a file, 8 for a URL; at most 64).
    #[arg(long, default_value_t = 0, value_parser = parse_fetch_threads)]
    pub fetch_threads: usize,
}

impl MemoryArgs {
    /// `source` under `budget` on `backend`, automatic fetch threads (the
    /// memory of `demo` and `bench paged`).
    pub fn new(source: Source, budget: Budget, backend: Backend) -> Self {
        Self {
            source,
            budget: BudgetArg(budget),
            backend,
            fetch_threads: 0,
        }
    }

    /// Pages fetched at once: `--fetch-threads`, or 8 for a URL and 1 for a file.
    pub fn fetch_threads(&self) -> usize {
        match self.fetch_threads {
            0 if self.source.is_remote() => 8,
            0 => 1,
            n => n,
        }
    }
}

/// `--budget-mb` / `--budget-percent` (at most one), read as one [`Budget`]
/// (100 % of the bank when neither is given).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BudgetArg(pub Budget);

const BUDGET_MB: &str = "budget_mb";
const BUDGET_PERCENT: &str = "budget_percent";

impl FromArgMatches for BudgetArg {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = m
            .get_one::<Budget>(BUDGET_MB)
            .or_else(|| m.get_one::<Budget>(BUDGET_PERCENT));
        Ok(Self(given.copied().unwrap_or_default()))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(b) = m
            .get_one::<Budget>(BUDGET_MB)
            .or_else(|| m.get_one::<Budget>(BUDGET_PERCENT))
        {
            self.0 = *b;
        }
        Ok(())
    }
}

impl Args for BudgetArg {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            clap::Arg::new(BUDGET_MB)
                .long("budget-mb")
                .value_name("BUDGET_MB")
                .action(clap::ArgAction::Set)
                .value_parser(parse_budget_mb)
                .conflicts_with(BUDGET_PERCENT)
                .help(
                    "Resident memory budget in MiB (value pages in the bank's dtype + \
                     blocks as f32; unused by a model without memory layers)",
                ),
        )
        .arg(
            clap::Arg::new(BUDGET_PERCENT)
                .long("budget-percent")
                .value_name("BUDGET_PERCENT")
                .action(clap::ArgAction::Set)
                .value_parser(parse_budget_percent)
                .help(
                    "Resident memory budget in percent of the bank as held: values in its \
                     dtype, blocks as f32 (default 100; unused by a model without memory \
                     layers)",
                ),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `--budget-mb`: a finite number of MiB > 0.
fn parse_budget_mb(s: &str) -> Result<Budget, memlayer_runtime::budget::BudgetError> {
    Budget::parse_mib(s)
}

/// `--budget-percent`: a percentage in (0, 100].
fn parse_budget_percent(s: &str) -> Result<Budget, memlayer_runtime::budget::BudgetError> {
    Budget::parse_percent(s)
}

/// A percentage in (0, 100] as a number (`demo --budget-percent`,
/// `bench paged --budgets`; the messages of [`Budget::parse_percent`]).
pub fn parse_percent(s: &str) -> Result<f64, memlayer_runtime::budget::BudgetError> {
    memlayer_runtime::budget::parse_percent(s)
}

/// `--source`: `file`, a path or an http(s):// URL ([`Source`]'s rules).
pub fn parse_source(s: &str) -> Result<Source, String> {
    s.parse()
}

/// `--fetch-threads`: 0 (automatic) or 1..=`MAX_FETCH_THREADS`, refused
/// while parsing flags, before a model is opened.
fn parse_fetch_threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n > MAX_FETCH_THREADS {
        return Err(format!("{n} is more than {MAX_FETCH_THREADS}"));
    }
    Ok(n)
}

/// A finite number ≥ 0 (temperature).
fn parse_non_negative(s: &str) -> Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x.is_finite() && x >= 0.0) {
        return Err(format!("{s} is not a finite number >= 0"));
    }
    Ok(x)
}

/// A number in (0, 1] (top-p).
fn parse_unit_mass(s: &str) -> Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(x > 0.0 && x <= 1.0) {
        return Err(format!("{s} is not in (0, 1]"));
    }
    Ok(x)
}

/// Sampling flags.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_non_negative)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1] (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = parse_unit_mass)]
    pub top_p: f32,
    /// Sampler seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The runtime's sampling settings.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        memory: MemoryArgs,
    }

    fn parse(args: &[&str]) -> Result<MemoryArgs, clap::Error> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.memory)
    }

    #[test]
    fn budget_flags_are_one_budget() {
        let m = parse(&[]).unwrap();
        assert_eq!(m.budget.0, Budget::FULL);
        assert_eq!(m.source, Source::ModelDir);
        let m = parse(&["--budget-mb", "2"]).unwrap();
        assert_eq!(m.budget.0, Budget::bytes(2 << 20));
        let m = parse(&["--budget-percent", "25"]).unwrap();
        assert_eq!(m.budget.0.as_percent(), Some(25.0));
        let e = parse(&["--budget-mb", "1", "--budget-percent", "2"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let e = parse(&["--budget-percent", "0"]).unwrap_err();
        assert!(
            e.to_string().contains("0 is not a percentage in (0, 100]"),
            "{e}"
        );
        let e = parse(&["--budget-mb", "nan"]).unwrap_err();
        assert!(
            e.to_string().contains("nan is not a finite number > 0"),
            "{e}"
        );
    }

    #[test]
    fn sources_and_fetch_threads() {
        let m = parse(&["--source", "HTTPS://h/b"]).unwrap();
        assert_eq!(m.source, Source::Url("HTTPS://h/b".into()));
        assert_eq!(m.fetch_threads(), 8);
        let m = parse(&["--source", "/x/b.bank", "--fetch-threads", "3"]).unwrap();
        assert_eq!(m.source, Source::Path("/x/b.bank".into()));
        assert_eq!(m.fetch_threads(), 3);
        assert_eq!(parse(&[]).unwrap().fetch_threads(), 1);
        let e = parse(&["--source", "ftp://h/b"]).unwrap_err();
        assert!(
            e.to_string().contains("unsupported URL scheme ftp://"),
            "{e}"
        );
        let e = parse(&["--fetch-threads", "65"]).unwrap_err();
        assert!(e.to_string().contains("65 is more than 64"), "{e}");
    }
}
