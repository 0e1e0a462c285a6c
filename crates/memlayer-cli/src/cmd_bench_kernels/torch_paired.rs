//! memlayer against PyTorch CPU in interleaved rounds.
//!
//! The memory of this project's machines (shared VMs) drifts by 15–30 % from
//! one minute to the next, so two figures measured a minute apart rank the
//! machine's moment as much as the two kernels. Here the torch script runs
//! beside memlayer in `--paired` mode (its table set up and warmed once) and
//! the two take turns: each round times a burst of torch calls and a burst of
//! memlayer calls on the same shapes, the order alternating between rounds.
//! The ratio of each round (torch's median seconds over memlayer's) compares
//! the two within seconds of each other; the run reports the median ratio
//! over the rounds and its spread.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use memlayer_cpu::{Cpu, Storage};
use serde_json::{Value, json};

use super::{BagData, CpuBagCalls, INDEX_SETS, Shapes, TorchScript, median};

/// The most calls one request to the script may ask for (its own bound).
const MAX_BURST: usize = 1000;

/// The torch script in `--paired` mode: a child process answering
/// `time N` with N per-call times (see `scripts/bench_torch_bag.py`).
pub(crate) struct TorchPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    /// the script's stdout, a line at a time from a reader thread (so a
    /// script that stops answering is noticed: `timeout`)
    lines: Receiver<std::io::Result<String>>,
    stderr: Option<JoinHandle<String>>,
    timeout: Duration,
}

/// What starting the script gave: a peer, or torch's reason for none.
pub(crate) enum Started {
    Peer(TorchPeer, Value),
    /// torch is not importable (or has no such device): `info` says why
    NoTorch(Value),
}

impl TorchPeer {
    /// Starts the script on the bag workload `s` in `dtype` and waits until
    /// its table is set up and warmed (its first line).
    pub(crate) fn start(
        torch: &TorchScript<'_>,
        s: &Shapes,
        threads: usize,
        dtype: &str,
    ) -> Result<Started> {
        let mut child = Command::new(torch.python)
            // torch gets transparent huge pages for its tensors, as memlayer's tables have
            .env("THP_MEM_ALLOC_ENABLE", "1")
            .arg(torch.script)
            .args(["--rows", &s.rows.to_string(), "--dim", &s.dim.to_string()])
            .args(["--bags", &s.bags.to_string()])
            .args(["--bag-size", &s.bag_size.to_string()])
            .args(["--threads", &threads.to_string(), "--dtype", dtype])
            .args(["--seed", "2024", "--index-sets", &INDEX_SETS.to_string()])
            .arg("--paired")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} {}", torch.python, torch.script.display()))?;
        let (Some(stdin), Some(stdout), Some(mut err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("the torch script's pipes were not opened");
        };
        // stderr drained on its own thread: a chatty script never blocks on it
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = TorchPeer {
            child,
            stdin: Some(stdin),
            lines,
            stderr: Some(stderr),
            timeout: torch.timeout,
        };
        let first = peer.answer()?;
        let info = json!({
            "version": first.get("torch_version").cloned().unwrap_or(Value::Null),
            "threads": first.get("threads").cloned().unwrap_or(Value::Null),
            "error": first.get("error").cloned().unwrap_or(Value::Null),
        });
        if first["ready"].as_bool() == Some(true) {
            Ok(Started::Peer(peer, info))
        } else if first.get("gbps").is_some_and(Value::is_null) {
            Ok(Started::NoTorch(info))
        } else {
            bail!("the torch script did not get ready: {first}")
        }
    }

    /// One JSON line from the script within `timeout`; its stderr in the
    /// error when it ends instead, and the script killed when it is silent.
    fn answer(&mut self) -> Result<Value> {
        let line = match self.lines.recv_timeout(self.timeout) {
            Ok(line) => line.context("reading the torch script's answer")?,
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                bail!(
                    "the torch script gave no answer in {} s (--torch-timeout); stopped it",
                    self.timeout.as_secs_f64()
                );
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                let err = self
                    .stderr
                    .take()
                    .and_then(|h| h.join().ok())
                    .unwrap_or_default();
                bail!(
                    "the torch script ended ({}) without an answer: {}",
                    status.map_or("status unknown".into(), |s| s.to_string()),
                    err.trim()
                );
            }
        };
        serde_json::from_str(line.trim())
            .with_context(|| format!("parsing the torch script's answer {:?}", line.trim()))
    }

    /// Seconds of each of `n` torch calls.
    pub(crate) fn time(&mut self, n: usize) -> Result<Vec<f64>> {
        let n = n.clamp(1, MAX_BURST);
        let stdin = self
            .stdin
            .as_mut()
            .context("the torch script's stdin is closed")?;
        writeln!(stdin, "time {n}")
            .and_then(|()| stdin.flush())
            .context("asking the torch script for calls")?;
        let a = self.answer()?;
        let secs: Vec<f64> = a["seconds"]
            .as_array()
            .with_context(|| format!("the torch script answered {a}"))?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        if secs.len() != n || secs.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("the torch script answered {a} for {n} calls");
        }
        Ok(secs)
    }
}

impl Drop for TorchPeer {
    fn drop(&mut self) {
        // "quit", then end of input; the script exits at either
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        super::wait_or_kill(&mut self.child, Duration::from_secs(10));
    }
}

/// The outcome of [`paired_bag`].
pub(crate) struct Paired {
    /// GB/s of memlayer's and torch's calls over all rounds (medians)
    pub(crate) memlayer_gbps: f64,
    pub(crate) torch_gbps: f64,
    /// memlayer / torch per round (torch's median seconds over memlayer's), sorted
    pub(crate) ratios: Vec<f64>,
    pub(crate) burst: usize,
}

impl Paired {
    pub(crate) fn json(&self) -> Value {
        let r = &self.ratios;
        json!({
            "ratio_median": median(r.clone()),
            "ratio_min": r.first(), "ratio_max": r.last(),
            "rounds": r.len(), "calls_per_burst": self.burst,
            "memlayer_gbps": self.memlayer_gbps, "torch_gbps": self.torch_gbps,
        })
    }
}

/// `rounds` rounds of `burst` torch calls and `burst` memlayer calls (the
/// optimised CPU bag forward over `table`, [`CpuBagCalls`]), alternating
/// which goes first.
pub(crate) fn paired_bag<T: Storage>(
    cpu: &Cpu,
    s: &Shapes,
    data: &BagData,
    table: &[T],
    peer: &mut TorchPeer,
    rounds: usize,
    burst: usize,
) -> Result<Paired> {
    let mut calls = CpuBagCalls::new(cpu, s, data, table)?;
    let mut ours = |n: usize| -> Result<Vec<f64>> { (0..n).map(|_| calls.call()).collect() };
    let burst = burst.clamp(1, MAX_BURST);
    let (mut all_ours, mut all_torch, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds.max(1) {
        let (a, b) = if r % 2 == 0 {
            let b = peer.time(burst)?;
            (ours(burst)?, b)
        } else {
            let a = ours(burst)?;
            (a, peer.time(burst)?)
        };
        ratios.push(median(b.clone()) / median(a.clone()));
        all_ours.extend(a);
        all_torch.extend(b);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(Paired {
        memlayer_gbps: calls.gbps(median(all_ours)),
        torch_gbps: calls.gbps(median(all_torch)),
        ratios,
        burst,
    })
}
