#!/usr/bin/env bash
# Builds the browser chat's wasm bundle (crates/memlayer-web) into web/pkg:
# the wasm32 target and a wasm-bindgen CLI of the version Cargo.lock pins
# are installed if missing. Then `memlayer serve models/demo-pkm --web web`
# serves the chat at http://127.0.0.1:8080/ (see web/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

want=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
rustup target list --installed | grep -q '^wasm32-unknown-unknown$' \
  || rustup target add wasm32-unknown-unknown
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $want"; then
  cargo install wasm-bindgen-cli --version "$want"
fi

cargo build -p memlayer-web --release --target wasm32-unknown-unknown
target_dir="${CARGO_TARGET_DIR:-target}"
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  "$target_dir/wasm32-unknown-unknown/release/memlayer_web.wasm"
ls -l web/pkg
