#!/usr/bin/env bash
# memlayer's main job on built-in data (README.md, first command).
#
# Until the paged-inference demo lands, it exercises the paged memory bank end
# to end — writes a 32 MiB bank of random product-key memory values (seeded),
# prints its header and page table, verifies every page's checksum, flips one
# byte inside page 2 of a copy and shows that `inspect --verify` names it —
# then trains the `tiny-pkm` model on the generated long-tail facts (about two
# minutes on 2 cores) and prints its recall by frequency bucket.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p memlayer-cli
target_dir="${CARGO_TARGET_DIR:-target}"
memlayer="$target_dir/release/memlayer"
out="$target_dir/demo"
mkdir -p "$out"

echo "==> memlayer bank synth (262144 rows x 64, f16, pages of 4096 rows)"
"$memlayer" bank synth --out "$out/values.mlbank" --rows 262144 --dim 64 --page-rows 4096 --dtype f16 --seed 7

echo "==> memlayer inspect --verify"
"$memlayer" inspect "$out/values.mlbank" --verify | tee "$out/inspect.txt"

echo "==> flip one byte inside page 2 of a copy; inspect --verify must fail and name page 2"
cp "$out/values.mlbank" "$out/corrupt.mlbank"
offset=$(awk '$1 == "2" && NF == 4 { print $2 }' "$out/inspect.txt")
python3 - "$out/corrupt.mlbank" "$((offset + 1000))" <<'PY'
import sys
path, at = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0xFF]))
PY
if "$memlayer" inspect "$out/corrupt.mlbank" --verify; then
  echo "ERROR: corruption was not detected" >&2
  exit 1
fi
echo "==> corruption detected as expected"

echo "==> memlayer train --preset tiny-pkm (model directory: $out/tiny-pkm)"
rm -rf "$out/tiny-pkm"
"$memlayer" train --preset tiny-pkm --out "$out/tiny-pkm"

echo "==> memlayer inspect --verify of the trained model's memory bank"
"$memlayer" inspect "$out/tiny-pkm/memory.bank" --verify | tail -n 3
