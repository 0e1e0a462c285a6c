#!/usr/bin/env bash
# memlayer's test command (README.md; `.ci/run` calls exactly this).
# Works on a fresh Debian 12 machine: installs what it needs (Debian
# packages, Rust components, NVRTC from PyPI, npm packages), then runs
# formatting, lints, the wasm32 builds (memlayer-core/-cpu/-wgpu checked, the
# browser chat's bundle built into web/pkg), the fuzz target's build and every
# test of the workspace in the one build profile (release) — the browser test
# among them, in headless Chromium with WebGPU (SwiftShader) — then the
# aarch64 tests under qemu-user and the phone targets' check
# (scripts/test-aarch64.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages (only the missing ones)"
bash scripts/system-deps.sh

step "rust components"
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
for t in wasm32-unknown-unknown aarch64-unknown-linux-gnu aarch64-linux-android aarch64-apple-ios; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done

step "NVRTC from PyPI (nvidia-cuda-nvrtc-cu12): every CUDA kernel must compile to PTX"
# No GPU or CUDA toolkit is needed: memlayer-cuda's kernels are compiled by
# NVRTC alone (tests fail, not skip, with MEMLAYER_REQUIRE_NVRTC=1). Set for
# every cargo step below, so the builds share one fingerprint.
nvrtc_dir="${MEMLAYER_NVRTC_DIR:-$HOME/.cache/memlayer/nvrtc}"
if [ ! -e "$nvrtc_dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc_dir" \
    "nvidia-cuda-nvrtc-cu12==12.8.*"
fi
export LD_LIBRARY_PATH="$nvrtc_dir/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MEMLAYER_REQUIRE_NVRTC=1

step "cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --release -- -D warnings

step "cargo clippy with the cuda feature (the CLI's and the desktop's --backend cuda, bench kernels' CUDA columns)"
cargo clippy -p memlayer -p memlayer-cli -p memlayer-desktop --features memlayer/cuda,memlayer-cli/cuda,memlayer-desktop/cuda --all-targets --release -- -D warnings

step "memlayer-core, memlayer-cpu and memlayer-wgpu build for wasm32; memlayer-web lints there"
cargo check -p memlayer-core -p memlayer-cpu -p memlayer-wgpu --release --target wasm32-unknown-unknown
cargo clippy -p memlayer-web --release --target wasm32-unknown-unknown -- -D warnings

step "browser chat: wasm bundle (web/pkg) and the test driver (web/node_modules)"
bash scripts/build-web.sh
(cd web && npm ci --no-audit --no-fund)

step "fuzz target builds"
cargo check --release --manifest-path fuzz/Cargo.toml

step "tests (MEMLAYER_REQUIRE_GPU=${MEMLAYER_REQUIRE_GPU:-0})"
# the C ABI's shared library (cargo test builds no cdylib): its C and Python
# examples link it; and every binary: the CLI's tests run the desktop app
# (cargo test builds only the tested package's binaries). --all-targets, so
# this build resolves features with the dev-dependencies, as `cargo test`
# does: a `--lib --bins` build resolves without them (no indexmap/std from
# cbindgen, no ciborium/default from criterion), and the test build then
# compiled wgpu, naga, cubecl and burn a second time (16 min cold).
cargo build --workspace --release --all-targets
cargo test --workspace --release

step "aarch64 under qemu-user: CPU kernels (NEON) and the C ABI with its C example; phone targets checked"
bash scripts/test-aarch64.sh

step "the CLI built with the cuda feature: --backend cuda on a GPU or a named error without one"
# --workspace: the same feature unification as the builds above, so only the
# crates under the cuda feature rebuild (a `-p memlayer-cli` build alone would
# resolve wgpu's features differently and rebuild burn and wgpu)
cargo test --release --workspace --features memlayer-cli/cuda --test cli_cuda
