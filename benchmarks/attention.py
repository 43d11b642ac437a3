"""Attention forward+backward under the Transfusion mask against plain causal attention.

    python benchmarks/attention.py [--length 4096] [--batch 2] [--heads 16] [--head_dim 64]
        [--impls dense,blockwise,...] [--block 512] [--steps 5]

Rows follow the paper's mix (paper_rows.py: packed documents, text tokens to image patches about
1:1, 256-patch images, caption-first and image-first, text documents cut at the row's end).
The causal rows are one document of text (segment 1, mask_pos = index).
Each implementation runs both masks with the same kernel; one JSON line per (impl, mask), then
one per impl with `transfusion_over_causal` and `over_blockwise` (time ratios). Utilisation
counts the FLOPs of the allowed (query, key) pairs only (4 * Dh per pair forward, 2.5x that
backward, as FlashAttention-2 counts) against the device peak (vendor figure on TPU/GPU, a
matmul measured in this run on CPU).
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_rows  # noqa: E402
from transfusion_jax.core import flops  # noqa: E402
from transfusion_jax.models import attention  # noqa: E402

DEFAULT_IMPLS = {"cpu": "dense,blockwise", "gpu": "dense,blockwise,pallas_gpu,cudnn",
                 "tpu": "dense,blockwise,splash"}


def rows(kind: str, batch: int, length: int, seed: int = 0):
    if kind == "causal":
        return (np.ones((batch, length), np.int32),
                np.tile(np.arange(length, dtype=np.int32), (batch, 1)))
    rng = np.random.default_rng(seed)
    seg, pos = zip(*(paper_rows.segments(rng, length) for _ in range(batch)))
    return np.stack(seg), np.stack(pos)


def allowed_pairs(seg, pos) -> int:
    k_start, k_end, _, _ = attention.attention_ranges.self_ranges(jnp.asarray(seg),
                                                                  jnp.asarray(pos))
    return int(jnp.sum(k_end - k_start))


def make_fn(impl: str, block: int):
    if impl == "cudnn":  # a dense [B, 1, L, L] mask: cuDNN's fused kernel, no block skipping
        def fn(q, k, v, seg, pos):
            mask = attention.transfusion_mask(seg, pos)[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        return fn
    return functools.partial(attention.attend, impl, block_size=block)


def time_fwd_bwd(fn, q, k, v, seg, pos, steps: int):
    weights = jax.random.normal(jax.random.key(3), q.shape, q.dtype)
    loss = lambda q, k, v: jnp.sum((fn(q, k, v, seg, pos) * weights).astype(jnp.float32))
    step = jax.jit(jax.grad(loss, (0, 1, 2)))
    t0 = time.perf_counter()
    compiled = step.lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def main():
    backend = jax.default_backend()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--impls", default=DEFAULT_IMPLS.get(backend, "dense,blockwise"))
    p.add_argument("--dtype", default="float32" if backend == "cpu" else "bfloat16")
    a = p.parse_args()

    dtype = jnp.dtype(a.dtype)
    shape = (a.batch, a.length, a.heads, a.head_dim)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(0), 3))
    peak, source = flops.peak_flops(jax.devices()[0], dtype)
    masks = {kind: tuple(map(jnp.asarray, rows(kind, a.batch, a.length))) for kind in
             ("transfusion", "causal")}
    pairs = {kind: allowed_pairs(*m) for kind, m in masks.items()}
    results = {}
    for impl in a.impls.split(","):
        for kind, (seg, pos) in masks.items():
            try:
                seconds, compile_s = time_fwd_bwd(make_fn(impl, a.block), q, k, v, seg, pos,
                                                  a.steps)
            except Exception as e:  # a kernel this backend cannot run: say so, go on
                print(json.dumps(dict(impl=impl, mask=kind, error=f"{type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:300]}")), flush=True)
                continue
            work = 3.5 * 4 * a.head_dim * a.heads * pairs[kind]
            results[impl, kind] = seconds
            print(json.dumps(dict(
                impl=impl, mask=kind, device=jax.devices()[0].device_kind, dtype=a.dtype,
                batch=a.batch, length=a.length, heads=a.heads, head_dim=a.head_dim,
                block=a.block, mask_density=pairs[kind] / (a.batch * a.length ** 2),
                seconds_fwd_bwd=seconds, compile_s=round(compile_s, 2),
                elements_per_s=a.batch * a.length / seconds,
                flops_per_s=work / seconds, utilisation=work / seconds / peak,
                peak_flops_per_s=peak, peak_source=source)), flush=True)
    for impl in a.impls.split(","):
        if (impl, "transfusion") in results and (impl, "causal") in results:
            base = results.get(("blockwise", "transfusion"))
            print(json.dumps(dict(
                impl=impl, length=a.length,
                transfusion_over_causal=results[impl, "transfusion"] / results[impl, "causal"],
                over_blockwise=None if base is None else results[impl, "transfusion"] / base,
                over_dense=(results[impl, "transfusion"] / results["dense", "transfusion"]
                            if ("dense", "transfusion") in results else None))), flush=True)


if __name__ == "__main__":
    main()
