"""Training-step throughput of the Transfusion model: one JSON line of measured figures.

    python benchmarks/model_step.py --dim 256 --depth 4 --heads 4 --batch 16 --text 64 \
        --patches 64 --latent_channels 16 [--patch linear|unet] [--attention IMPL]
        [--remat none|full|dots|dots_no_batch|offload] [--logits_chunk N]
    python benchmarks/model_step.py --size 0.76b --mix paper --length 4096 --batch 8 \
        --attention auto --remat full      # a Table 2 size on rows in the paper's mix

By default each row is one document: BOS, caption, BOI, `patches` image elements, EOI, EOS,
with `text` text elements in all (L = text + patches). `--mix paper` packs rows of `--length`
as the paper's data would be (paper_rows.py: about 1:1 text and patches, 256-patch images from
32x32 latents with 2x2 patches, several documents per row). `--size` takes layers, width and
heads from Table 2 (experiments/transfusion.py). The step is the trainer's own (noise, forward,
backward, AdamW), jitted with donation; its time is the median of --steps runs after compile.
MFU divides the analytic FLOPs (transformer matmuls + attention over the full L x L, see
core/flops.py) by the device's peak (the vendor figure on TPU/GPU, a matmul measured in this
run on CPU); `mfu_causal` counts attention at half (MaxText's convention for causal models).
"""
import argparse
import json
import math
import os
import statistics
import time

import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_rows  # noqa: E402
from transfusion_jax.core import flops, sharding, train_state  # noqa: E402
from transfusion_jax.trainers import transfusion as trainer  # noqa: E402
from transfusion_jax.models import example_inputs  # noqa: E402
from transfusion_jax.models.attention import IMPLEMENTATIONS  # noqa: E402
from transfusion_jax.models.transformer import REMAT_POLICIES  # noqa: E402
from transfusion_jax.core.config import load_config, load_module  # noqa: E402

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "transfusion.py")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("dim", 256), ("depth", 4), ("heads", 4), ("batch", 16), ("text", 64),
                          ("patches", 64), ("latent_channels", 16), ("patch_size", 2),
                          ("vocab", 32000), ("steps", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--patch", choices=("linear", "unet"), default="linear")
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="dense")
    p.add_argument("--size", default="", help="a Table 2 size: its layers, width, heads")
    p.add_argument("--mix", choices=("one_doc", "paper"), default="one_doc")
    p.add_argument("--length", type=int, default=4096, help="row length with --mix paper")
    p.add_argument("--attention_block", type=int, default=512)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   default="float32" if jax.default_backend() == "cpu" else "bfloat16")
    p.add_argument("--remat", choices=tuple(REMAT_POLICIES), default="none",
                   help="model.remat: activation checkpointing policy")
    p.add_argument("--logits_chunk", type=int, default=0,
                   help="model.logits_chunk: LM head + cross-entropy per chunk (0: whole)")
    return p.parse_args()


def make_config(a):
    if a.size:
        a.depth, a.dim, a.heads = load_module(EXPERIMENT).SIZES[a.size]
    if a.mix == "paper":  # 256-patch images: 32x32 latents, 2x2 patches (paper section 4.1)
        a.patches, a.patch_size, a.latent_channels = 256, 2, 8
    side = math.isqrt(a.patches)
    if side * side != a.patches or a.text < 5:
        raise SystemExit(f"--patches={a.patches} must be a square and --text={a.text} >= 5")
    config = load_config(f"{EXPERIMENT}:0.16b,patch={a.patch},patch_size={a.patch_size}")
    config.model.update(dim=a.dim, depth=a.depth, heads=a.heads, vocab_size=a.vocab,
                        mlp_dim=load_module(EXPERIMENT).llama_mlp_dim(a.dim),
                        latent_size=side * a.patch_size, latent_channels=a.latent_channels,
                        attention=a.attention, attention_block=a.attention_block,
                        dtype=a.dtype, remat=a.remat, logits_chunk=a.logits_chunk)
    if a.patch == "unet":
        config.model.unet = load_module(EXPERIMENT).UNET_PRESETS["tiny"]
    config.optimizer.warmup_steps = 10
    return config


def make_batch(a, cfg):
    """`--mix paper`: paper_rows.batch_contract; else one document per row, laid out as the batch contract says:
    BOS, caption (text - 4 tokens), BOI, the image's patches, EOI, EOS."""
    if a.mix == "paper":
        m = cfg.model
        return paper_rows.batch_contract(a.batch, a.length, a.patches, a.vocab,
                                         (m.latent_size, m.latent_size, m.latent_channels))
    length, p = a.text + a.patches, a.patches
    boi = a.text - 3
    idx = np.arange(length)
    is_patch = (idx > boi) & (idx <= boi + p)
    tokens = np.random.default_rng(0).integers(5, a.vocab, length)
    tokens[is_patch] = 0
    tokens[[0, boi, boi + p + 1, length - 1]] = (1, 3, 4, 2)  # BOS, BOI, EOI, EOS
    next_is_text = np.append(~is_patch[1:], False)
    row = dict(tokens=tokens, segment_ids=np.ones(length), positions=idx,
               mask_pos=np.where(is_patch, boi + p, idx),
               patch_index=np.where(is_patch, idx - boi - 1, -1),
               targets=np.where(next_is_text, np.roll(tokens, -1), 0),
               text_weights=~is_patch & next_is_text & (tokens != 3))
    batch = {k: np.tile(np.asarray(v, np.float32 if k == "text_weights" else np.int32), (a.batch, 1))
             for k, v in row.items()}
    batch["patch_positions"] = np.tile(idx[is_patch].astype(np.int32), (a.batch, 1, 1))
    batch["image_mask"] = np.ones((a.batch, 1), bool)
    batch["max_timestep"] = np.full((a.batch, 1), 1000, np.int32)
    size = cfg.model.latent_size
    batch["images"] = np.random.default_rng(1).standard_normal(
        (a.batch, 1, size, size, a.latent_channels)).astype(np.float32)
    return batch


def main():
    a = parse_args()
    config = make_config(a)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model, tx = trainer.model_and_optimizer(config)
    host_batch = make_batch(a, config)
    length, slots = host_batch["tokens"].shape[1], host_batch["image_mask"].shape[1]
    inputs = example_inputs(config.model, length, slots)
    state = train_state.create_state(trainer.make_init_fn(config, model, tx, inputs), mesh,
                                     config.sharding_rules, seed=0)
    batch = jax.device_put(host_batch, jax.devices()[0])
    step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=0)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)

    seconds = statistics.median(times)
    analytic = flops.flops_per_step(config.model, a.batch, length)
    half_attention = 6.0 * config.model.depth * a.batch * length ** 2 * config.model.dim
    peak, peak_source = flops.peak_flops(jax.devices()[0], jnp.dtype(a.dtype))
    memory = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(json.dumps(dict(
        device=jax.devices()[0].device_kind, dtype=a.dtype, params=params,
        dim=a.dim, depth=a.depth, heads=a.heads, batch=a.batch, length=length,
        size=a.size or None, mix=a.mix, images=int(host_batch["image_mask"].sum()),
        patch=a.patch, attention=a.attention, attention_block=a.attention_block,
        remat=a.remat, logits_chunk=a.logits_chunk,
        analytic_flops_per_step=analytic,
        seconds_per_step=seconds, compile_s=round(compile_s, 2),
        elements_per_s=a.batch * length / seconds,
        peak_flops_per_s=peak, peak_source=peak_source, mfu=analytic / seconds / peak,
        mfu_causal=(analytic - half_attention) / seconds / peak,
        peak_memory_gib=None if memory is None else memory / 2**30,
        loss=float(metrics["loss"]))), flush=True)


if __name__ == "__main__":
    main()
