#!/usr/bin/env python3
"""Make memlayer's Meta-interop fixtures with facebookresearch/memory's own `HashingMemory`.

Run (CPU only, no GPU needed):

    pip install torch numpy safetensors
    python3 scripts/make_meta_fixtures.py --meta-repo /path/to/facebookresearch-memory --out tests/fixtures/meta

`--meta-repo` is a checkout of https://github.com/facebookresearch/memory (the directory that holds
`lingua/product_key/memory.py`). The checkout is imported read-only and never modified; no code from
it is copied into this repository, only the small tensors this script writes.

The fixtures in tests/fixtures/meta were made with torch 2.15.0 (+cu132 wheel, run on CPU),
safetensors 0.8.0, numpy 2.4.6, Python 3.11.7, from facebookresearch/memory commit 7f85280
("Initial Commit").

What the script stubs, at import time and only in this process:
* `triton` / `triton.language`: if triton is not importable, fake modules with a no-op `triton.jit`
  are put into `sys.modules` (Meta's Triton kernels are defined but never launched here).
* `torch.distributed._composable.fsdp` / `torch.distributed.tensor.parallel`: stubbed only if the
  installed torch lacks them (they are used by `mp_parallelize`, which is not called).
* Meta's Triton embedding-bag `xformers_embedding_bag` (as bound in `colwise_embedding_bag`) is
  replaced by `F.embedding_bag(indices, weight, per_sample_weights=scores, mode="sum")` computed in
  f32. Meta's Triton kernel also accumulates `weight.to(f32) * score` in f32, but stores the bag
  into a buffer of the *values'* dtype, so with bf16 values its bag output is rounded to bf16.
  `output` in the expected file keeps the bag in f32 (memlayer's oracle convention, f32
  throughout); for bf16-valued layers the file also holds `output_bag_rounded`, the output with
  the bag rounded to the values' dtype exactly like the Triton kernel's store.

Per fixture `<name>` the script writes:
* `<name>.weights.safetensors`  - the layer's `state_dict()` with Meta's parameter names
  (`keys`, `values.weight`, `query_proj.query_mlps.0.{weight,bias}`, `swilu_projection.*`,
  `value_proj.*`, optionally `gating.*`); metadata: the constructor arguments.
* `<name>.input.safetensors`    - `input`, f32, (tokens, dim) or (1, tokens, dim).
* `<name>.expected.safetensors` - `output` (input's shape, f32), `indices` (tokens, heads, knn; i64),
  `scores` (tokens, heads, knn; f32; pre-softmax, from `last_indices` / `last_scores`),
  optionally `output_bag_rounded`; metadata: knn, versions, the minimum top-k score gap.

Inputs are seeded; tokens whose top-k selection has a near tie (gap < --min-gap between the
k-th and (k+1)-th sub-key score, or between consecutive candidates of the final top-k) are
skipped, so that an independent f32 implementation must reproduce the indices exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path


def install_stubs() -> None:
    """Make Meta's modules importable on a CPU-only machine without touching the checkout."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        triton = types.ModuleType("triton")
        language = types.ModuleType("triton.language")

        def jit(fn=None, **_kwargs):
            if fn is None:
                return lambda f: f
            return fn

        class _Constexpr:  # used only in annotations (`dim: tl.constexpr`)
            pass

        language.constexpr = _Constexpr
        triton.jit = jit
        triton.language = language
        sys.modules["triton"] = triton
        sys.modules["triton.language"] = language

    try:
        import torch.distributed._composable.fsdp  # noqa: F401
        import torch.distributed.tensor.parallel  # noqa: F401
    except ImportError:
        fsdp = types.ModuleType("torch.distributed._composable.fsdp")
        fsdp.MixedPrecisionPolicy = object
        fsdp.fully_shard = lambda module, **_kw: module
        sys.modules["torch.distributed._composable.fsdp"] = fsdp
        tp = types.ModuleType("torch.distributed.tensor.parallel")
        tp.parallelize_module = lambda module, *_a, **_kw: module
        sys.modules["torch.distributed.tensor.parallel"] = tp


# How the stubbed embedding bag treats its output: "f32" keeps it in f32, "values" rounds it to
# the values' dtype (what Meta's Triton kernel does when it stores into `weight.dtype`).
BAG_OUTPUT = {"mode": "f32"}


def embedding_bag_stub(indices, weight, per_sample_weights, mode="sum", bw_algo=None):
    import torch.nn.functional as F

    assert mode == "sum"
    out = F.embedding_bag(
        indices, weight.float(), per_sample_weights=per_sample_weights.float(), mode="sum"
    )
    if BAG_OUTPUT["mode"] == "values":
        out = out.to(weight.dtype)
    return out


def import_meta(meta_repo: Path):
    if not (meta_repo / "lingua" / "product_key" / "memory.py").is_file():
        sys.exit(f"error: {meta_repo} has no lingua/product_key/memory.py (pass a checkout of facebookresearch/memory)")
    install_stubs()
    sys.path.insert(0, str(meta_repo))
    import lingua.product_key.colwise_embedding_bag as ceb
    import lingua.product_key.memory as memory

    ceb.xformers_embedding_bag = embedding_bag_stub
    return memory.HashingMemory


def selection_gap(model, x, knn: int) -> float:
    """Smallest score gap (float64) that decides the top-k selection/order of any head of `x` (dim,)."""
    import torch

    with torch.no_grad():
        lin = model.query_proj.query_mlps[0]
        q = lin.weight.double() @ x.double()
        if lin.bias is not None:
            q = q + lin.bias.double()
        q = q.view(model.heads, model.k_dim)
        half = model.k_dim // 2
        keys = model.keys.detach().double().view(model.heads, 2, -1, half)
        n_keys = keys.shape[2]
        gap = float("inf")
        for h in range(model.heads):
            s1 = keys[h, 0] @ q[h, :half]
            s2 = keys[h, 1] @ q[h, half:]
            best = []
            for s in (s1, s2):
                srt, idx = torch.sort(s, descending=True)
                if knn < n_keys:
                    gap = min(gap, float(srt[knn - 1] - srt[knn]))
                best.append((srt[:knn], idx[:knn]))
            cand = (best[0][0].view(-1, 1) + best[1][0].view(1, -1)).reshape(-1)
            srt, _ = torch.sort(cand, descending=True)
            m = min(knn + 1, srt.numel())
            if m >= 2:
                gap = min(gap, float((srt[: m - 1] - srt[1:m]).min()))
    return gap


def make_fixture(HashingMemory, out_dir: Path, name: str, *, seed: int, dim: int, tokens: int,
                 knn: int, values_dtype: str, batch_dim: bool, min_gap: float, **mem_kwargs) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    HashingMemory.VALUES = None  # class-level shared values: start every layer afresh
    HashingMemory.EVAL_MEMORY = True
    model = HashingMemory(dim, dim, mem_knn=knn, **mem_kwargs)
    model.reset_parameters()
    if values_dtype == "f32":
        # Meta creates values in bf16; give this layer genuine f32 values (same init law).
        w = torch.nn.Parameter(torch.empty(model.values.weight.shape, dtype=torch.float32))
        torch.nn.init.normal_(w, mean=0, std=model.v_dim**-0.5)
        model.values.weight = w
    else:
        assert values_dtype == "bf16" and model.values.weight.dtype == torch.bfloat16
    model.eval()

    # Seeded inputs; keep the first `tokens` rows whose selection has no near tie.
    gen = torch.Generator().manual_seed(seed + 1)
    pool = torch.randn(8 * tokens, dim, generator=gen)
    kept, gaps = [], []
    for row in pool:
        g = selection_gap(model, row, knn)
        if g >= min_gap:
            kept.append(row)
            gaps.append(g)
        if len(kept) == tokens:
            break
    if len(kept) < tokens:
        sys.exit(f"error: {name}: only {len(kept)} of {8 * tokens} tokens have a selection gap >= {min_gap}")
    x = torch.stack(kept)  # (tokens, dim)

    with torch.no_grad():
        BAG_OUTPUT["mode"] = "f32"
        out = model(x.view(1, tokens, dim)).view(tokens, dim)
        indices = model.last_indices.clone()
        scores = model.last_scores.clone()
        BAG_OUTPUT["mode"] = "values"
        out_rounded = model(x.view(1, tokens, dim)).view(tokens, dim)
        assert torch.equal(model.last_indices, indices)
        BAG_OUTPUT["mode"] = "f32"

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = dict(input_dim=dim, output_dim=dim, mem_knn=knn, **mem_kwargs)
    weights_meta = {
        "source": "facebookresearch/memory lingua/product_key/memory.py HashingMemory",
        "constructor": json.dumps(config, sort_keys=True),
        "values_dtype": values_dtype,
    }
    save_file(state, str(out_dir / f"{name}.weights.safetensors"), metadata=weights_meta)

    shape = (1, tokens, dim) if batch_dim else (tokens, dim)
    save_file({"input": x.reshape(shape).float().contiguous()}, str(out_dir / f"{name}.input.safetensors"))

    expected = {
        "output": out.float().reshape(shape).contiguous(),
        "indices": indices.to(torch.int64).contiguous(),
        "scores": scores.float().contiguous(),
    }
    if values_dtype != "f32":
        expected["output_bag_rounded"] = out_rounded.float().reshape(shape).contiguous()
    exp_meta = {
        "knn": str(knn),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "min_selection_gap": repr(min(gaps)),
        "bag": "output: embedding bag kept in f32; output_bag_rounded: bag rounded to the values' dtype (Triton store)",
    }
    save_file(expected, str(out_dir / f"{name}.expected.safetensors"), metadata=exp_meta)
    print(f"{name}: state {{{', '.join(f'{k}: {tuple(v.shape)} {v.dtype}' for k, v in state.items())}}}")
    print(f"{name}: input {shape}, min selection gap {min(gaps):.3e}, "
          f"max |output - output_bag_rounded| {float((out - out_rounded).abs().max()):.3e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meta-repo", type=Path, required=True, help="checkout of facebookresearch/memory")
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/meta"))
    ap.add_argument("--min-gap", type=float, default=1e-4, help="minimum top-k score gap of kept tokens")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # deterministic CPU reductions
    HashingMemory = import_meta(args.meta_repo.resolve())
    args.out.mkdir(parents=True, exist_ok=True)

    # (a) f32 values, input (tokens, dim).
    make_fixture(HashingMemory, args.out, "pkm_f32", seed=1234, dim=32, tokens=8, knn=4,
                 values_dtype="f32", batch_dim=False, min_gap=args.min_gap,
                 mem_heads=2, mem_n_keys=16, mem_k_dim=16)
    # (b) bf16 values (as Meta creates them), n_keys not a power of two, v_dim != dim, gated,
    #     input (1, tokens, dim).
    make_fixture(HashingMemory, args.out, "pkm_bf16_gated", seed=4321, dim=24, tokens=6, knn=8,
                 values_dtype="bf16", batch_dim=True, min_gap=args.min_gap,
                 mem_heads=4, mem_n_keys=12, mem_k_dim=8, mem_v_dim=40, mem_gated=True)


if __name__ == "__main__":
    main()
