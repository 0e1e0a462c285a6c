#!/usr/bin/env bash
# aarch64 (phones, ARM laptops) proven here under emulation: the CPU kernels'
# oracle tests (NEON and portable families) and the C ABI's tests — the C
# example cross-built with Debian's aarch64 gcc — cross-compiled for
# aarch64-unknown-linux-gnu and run under qemu-user. Then the C ABI crate is
# checked for the phone targets (aarch64-linux-android, aarch64-apple-ios)
# with the features a phone build uses (CPU only: no wgpu, no http, no
# training code). scripts/test.sh runs this after installing what it needs
# (scripts/system-deps.sh: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
# qemu-user; rustup targets).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
# the aarch64 loader and libc for qemu-user (and the examples it runs)
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
# the C example is compiled for, and run on, the tests' target
export MEMLAYER_EXAMPLE_CC=aarch64-linux-gnu-gcc
export MEMLAYER_EXAMPLE_RUNNER=qemu-aarch64

echo "== $target: the C ABI library (CPU only), then the tests under qemu-user"
cargo build --release --target "$target" -p memlayer-capi --no-default-features --lib
# the Python example needs an aarch64 interpreter: it runs on the host only
cargo test --release --target "$target" -p memlayer-cpu -p memlayer-capi --no-default-features \
  -- --skip the_python_example

for phone in aarch64-linux-android aarch64-apple-ios; do
  echo "== $phone: cargo check of the C ABI (CPU only; linking needs the NDK / Xcode)"
  cargo check --release --target "$phone" -p memlayer-capi --no-default-features --lib
done
