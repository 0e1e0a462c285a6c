#!/usr/bin/env bash
# Builds, here (no GPU needed), what scripts/gpu-check.sh runs on a lent
# NVIDIA GPU machine, where nothing can be built or fetched: the CLI with the
# `cuda` feature and the CUDA and wgpu test binaries, stripped and packed
# into target/gpu-kit/kit.tar.xz (about 18 MB: the device tool carries at
# most 64 MiB; carry it: `run(..., carry=["target/gpu-kit"])`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kit=target/gpu-kit-build
rm -rf "$kit" target/gpu-kit && mkdir -p "$kit" target/gpu-kit
target_dir="${CARGO_TARGET_DIR:-target}"

cargo build --release -p memlayer-cli --features cuda
cp "$target_dir/release/memlayer" "$kit/memlayer"

# test binaries: every test target of memlayer-cuda and memlayer-wgpu
for pkg in memlayer-cuda memlayer-wgpu; do
  cargo test --release -p "$pkg" --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
      cp "$exe" "$kit/test-$pkg-$name"
    done
done
strip "$kit"/*
ls -l "$kit"
tar -cf - -C "$kit" . | xz -T0 -6 > target/gpu-kit/kit.tar.xz
ls -l target/gpu-kit/kit.tar.xz
