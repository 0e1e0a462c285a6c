#!/usr/bin/env bash
# The one script run on a lent NVIDIA GPU machine (see the device tool):
#   run(command="bash scripts/gpu-check.sh", carry=["target/gpu-kit"], timeout_s=500)
# after `bash scripts/gpu-kit.sh` here. Nothing is built there. It records
# the machine, then runs — each step in its own time limit, a failure noted
# and the next step run — the CUDA kernels' oracle tests, the wgpu parity
# tests on the GPU's Vulkan driver, `bench kernels` (CUDA columns with
# PyTorch CUDA as the peer), `bench --quick` (the cross-backend runner), and
# a paged decode with the slots on the GPU against the CPU's answer. Everything lands in $OUT (or target/gpu-out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kit=/tmp/memlayer-gpu-kit
out="${OUT:-target/gpu-out}"
mkdir -p "$out" "$kit"
tar -xJf target/gpu-kit/kit.tar.xz -C "$kit"
log() { printf '\n==> %s\n' "$*" | tee -a "$out/steps.txt"; }
status=0
step() { # NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  log "$name"
  if timeout "$secs" "$@" >"$out/$name.txt" 2>&1; then
    echo "ok: $name" | tee -a "$out/steps.txt"
  else
    echo "FAILED ($?): $name" | tee -a "$out/steps.txt"; status=1
  fi
  tail -n 5 "$out/$name.txt"
}

log "machine"
{ nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; uname -a; nproc; } \
  >"$out/machine.txt" 2>&1
cat "$out/machine.txt" | head -20

# NVRTC: the image's own (CUDA 13); cudarc looks for libnvrtc.so by name
nvrtc=$(ls /usr/local/cuda/lib64/libnvrtc.so.* 2>/dev/null | head -n 1)
[ -n "$nvrtc" ] || nvrtc=$(find /usr /opt /root/.cache -name 'libnvrtc.so.*' -not -name '*builtins*' -not -name '*alt*' 2>/dev/null | head -n 1)
mkdir -p /tmp/memlayer-nvrtc
ln -sf "$nvrtc" /tmp/memlayer-nvrtc/libnvrtc.so
export LD_LIBRARY_PATH="/tmp/memlayer-nvrtc:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "NVRTC: $nvrtc" | tee -a "$out/steps.txt"
export MEMLAYER_REQUIRE_CUDA=1 MEMLAYER_REQUIRE_NVRTC=1 MEMLAYER_PTX_CACHE=/tmp/memlayer-ptx

step cuda-tests 120 "$kit/test-memlayer-cuda-memlayer_cuda" --test-threads 1
for t in "$kit"/test-memlayer-wgpu-*; do
  MEMLAYER_REQUIRE_GPU=1 WGPU_BACKEND=vulkan step "wgpu-$(basename "$t")" 90 "$t" --test-threads 1
done
step bench-kernels 200 "$kit/memlayer" bench kernels --json "$out/bench-kernels.json" \
  --python python3 --torch-script scripts/bench_torch_bag.py
# the cross-backend runner: parity on every backend (CUDA, the GPU's Vulkan), then speed
step bench-runner 150 "$kit/memlayer" bench --quick --out "$out/bench-runner" \
  --python python3 --torch-script scripts/bench_torch_bag.py --model models/demo-pkm
prompt="The company that employs Zovom Tudeind is"
step generate-cpu 60 "$kit/memlayer" generate models/demo-pkm --prompt "$prompt" --line \
  --max-tokens 12 --budget-percent 25
step generate-cuda 60 "$kit/memlayer" generate models/demo-pkm --prompt "$prompt" --line \
  --max-tokens 12 --budget-percent 25 --backend cuda
if diff <(head -n 1 "$out/generate-cpu.txt") <(head -n 1 "$out/generate-cuda.txt") >/dev/null; then
  echo "ok: generate --backend cuda answers like --backend cpu" | tee -a "$out/steps.txt"
else
  echo "FAILED: generate --backend cuda differs from --backend cpu" | tee -a "$out/steps.txt"; status=1
fi
step bench-paged-cuda 120 "$kit/memlayer" bench paged --model models/demo-pkm --backend cuda \
  --json "$out/bench-paged-cuda.json"
exit $status
