#!/usr/bin/env python3
"""PyTorch reference for memlayer's embedding-bag benchmark (CPU, or CUDA with --device cuda).

Times torch.nn.functional.embedding_bag(mode="sum", per_sample_weights, offsets)
on a (rows, dim) table of the given dtype, `bags` bags of `bag-size` uniform
random indices, and prints ONE JSON line:

  {"gbps": x, "seconds_per_call": y, "torch_version": "...", "threads": T, ...}

computed exactly like memlayer's bench: gbps = gathered row bytes per call
(bags * bag_size * dim * element size) / seconds_per_call / 1e9, where
seconds_per_call is the MEDIAN of `iters` timed calls after `warmup` untimed
calls ("best_seconds"/"best_gbps" give the fastest call too).

--index-sets N: successive calls rotate through N index sets, set k being the
indices shifted by k * rows // N (mod rows), as memlayer's runner does, so a
call does not find the previous call's rows in a large L3.

Thread count: torch.set_num_threads(T) (and set_num_interop_threads(1)); torch's
own intra-op thread count must equal memlayer's rayon pool size for a fair
comparison. OPENBLAS_CORETYPE is irrelevant here (embedding_bag does not call
BLAS). Indices/offsets are int64 by default (torch's usual), int32 with
--index-dtype int32. torch requires per_sample_weights in the table's dtype,
so f16/bf16 runs pass f16/bf16 weights (memlayer takes f32 weights always).
Large allocations use torch's allocator; set THP_MEM_ALLOC_ENABLE=1 to give
torch transparent huge pages (compare with memlayer's --huge option).

--paired: for interleaving with memlayer's calls in one run (`memlayer bench
kernels` does this). After the set-up and warm-up it prints ONE JSON line with
"ready": true (and torch_version, threads), then answers each stdin line
"time N" (1 <= N <= 1000) with one JSON line {"seconds": [N per-call times]},
continuing the index-set rotation, until "quit" or end of input. Any other
line is answered {"error": "..."} and the script goes on.

If torch is not importable it prints {"gbps": null, "error": "torch not installed"}
and exits 0; with --device cuda and no CUDA in torch, {"gbps": null, "error": "..."}.
On CUDA every timed call is followed by torch.cuda.synchronize().
"""

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--bags", type=int, default=1024)
    ap.add_argument("--bag-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index-dtype", choices=["int64", "int32"], default="int64")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--index-sets", type=int, default=1)
    ap.add_argument("--paired", action="store_true")
    a = ap.parse_args()

    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure means "no torch"
        print(json.dumps({"gbps": None, "error": "torch not installed"}))
        return 0

    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"gbps": None, "error": "torch has no CUDA device",
                          "torch_version": torch.__version__}))
        return 0
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    idt = {"int64": torch.int64, "int32": torch.int32}[a.index_dtype]
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        table = torch.empty(a.rows, a.dim, dtype=dt)
        # fill in slices: randn of a 1 GiB f32 table at once needs 2x memory for f16/bf16
        step = max(1, (64 << 20) // max(1, a.dim * 4))
        for r0 in range(0, a.rows, step):
            r1 = min(a.rows, r0 + step)
            table[r0:r1] = torch.randn(r1 - r0, a.dim, generator=g).to(dt)
        nnz = a.bags * a.bag_size
        base = torch.randint(0, a.rows, (nnz,), generator=g, dtype=torch.int64)
        n_sets = max(1, a.index_sets)
        index_sets = [
            ((base + k * (a.rows // n_sets)) % a.rows).to(idt) for k in range(n_sets)
        ]
        offsets = (torch.arange(a.bags + 1, dtype=torch.int64) * a.bag_size).to(idt)
        weights = torch.randn(nnz, generator=g).to(dt)
        if a.device == "cuda":
            table, offsets, weights = (t.to("cuda") for t in (table, offsets, weights))
            index_sets = [t.to("cuda") for t in index_sets]
        calls = [0]

        def sync():
            if a.device == "cuda":
                torch.cuda.synchronize()

        def call():
            indices = index_sets[calls[0] % len(index_sets)]
            calls[0] += 1
            return torch.nn.functional.embedding_bag(
                indices,
                table,
                offsets,
                mode="sum",
                per_sample_weights=weights,
                include_last_offset=True,
            )

        out = call()
        assert out.shape == (a.bags, a.dim), out.shape
        for _ in range(a.warmup):
            call()
        sync()

        def timed(n):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                sync()
                times.append(time.perf_counter() - t0)
            return times

        if a.paired:
            return serve_paired(timed, torch)
        times = timed(max(1, a.iters))

    elem = {"f32": 4, "f16": 2, "bf16": 2}[a.dtype]
    gathered = nnz * a.dim * elem
    med = statistics.median(times)
    best = min(times)
    print(
        json.dumps(
            {
                "gbps": gathered / med / 1e9,
                "seconds_per_call": med,
                "best_gbps": gathered / best / 1e9,
                "best_seconds": best,
                "torch_version": torch.__version__,
                "threads": torch.get_num_threads(),
                "rows": a.rows,
                "dim": a.dim,
                "bags": a.bags,
                "bag_size": a.bag_size,
                "dtype": a.dtype,
                "device": a.device,
                "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                "index_dtype": a.index_dtype,
                "index_sets": len(index_sets),
                "iters": len(times),
                "gathered_bytes_per_call": gathered,
                "rows_per_second": nnz / med,
            }
        )
    )
    return 0


def serve_paired(timed, torch) -> int:
    """The --paired protocol (see the module docstring) on stdin/stdout."""
    def say(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True, "torch_version": torch.__version__,
         "threads": torch.get_num_threads()})
    for line in sys.stdin:
        words = line.split()
        if words == ["quit"]:
            break
        if len(words) == 2 and words[0] == "time" and words[1].isdigit() \
                and 1 <= int(words[1]) <= 1000:
            say({"seconds": timed(int(words[1]))})
        else:
            say({"error": f"unknown request {line.strip()[:80]!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
