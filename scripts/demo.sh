#!/usr/bin/env bash
# memlayer's main job on built-in data (README.md, first command): builds the
# CLI and runs `memlayer demo` — the shipped memory model (models/demo-pkm)
# answers held-out fact questions with a quarter of its memory bank resident,
# pages streamed from the bank on demand, next to the fully resident run
# (recall, tokens/s, hit rate, bytes streamed). Arguments are passed on to
# `memlayer demo` (e.g. `--backend wgpu`, `--source http://…`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# DejaVu Sans: the font of the loss plot, if the demo has to train its
# fallback model (models/demo-pkm missing).
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    fonts-dejavu-core
fi

# the workspace's binaries (the tests build them too, with the
# dev-dependencies' features on top: `--all-targets` in scripts/test.sh)
cargo build --release --workspace --bins
target_dir="${CARGO_TARGET_DIR:-target}"
"$target_dir/release/memlayer" demo "$@"
