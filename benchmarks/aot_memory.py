"""Per-device memory of the trainer's compiled step for a TPU slice this machine does not have:
compiled ahead of time against a compile-only TPU topology (needs libtpu importable; no TPU),
or against this machine's CPU devices (--platform cpu). Prints one JSON line per run, with the
analytic estimate beside XLA's numbers.

    PYTHONPATH=/path/to/libtpu_pkg python benchmarks/aot_memory.py --size 0.16b \
        --topology v5p:2x2x2 --mesh fsdp=8 --rows_per_device 2

Latents go in directly (the frozen autoencoder's encoder is not part of the count).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # compile-only: no worker lookup

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfusion_jax.core import sharding, train_state  # noqa: E402
from transfusion_jax.trainers import transfusion as trainer  # noqa: E402
from transfusion_jax.models import example_inputs  # noqa: E402
from transfusion_jax.core.config import load_config  # noqa: E402
from transfusion_jax.data.config import resolve_max_images  # noqa: E402
from transfusion_jax.models import attention, patches_per_image  # noqa: E402

GIB = 2**30


def devices(platform: str, topology: str):
    if platform == "cpu":
        return jax.devices()
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology, "tpu").devices


def abstract_batch(config, max_images, batch_sharding):
    b, length = config.data.batch_size, config.data.seq_len
    p, m = patches_per_image(config.model), config.model
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
    batch = {k: ints(b, length) for k in ("tokens", "segment_ids", "positions", "mask_pos",
                                          "patch_index", "targets")}
    batch["text_weights"] = jax.ShapeDtypeStruct((b, length), jnp.float32, sharding=batch_sharding)
    batch["patch_positions"] = ints(b, max_images, p)
    batch["images"] = jax.ShapeDtypeStruct(
        (b, max_images, m.latent_size, m.latent_size, m.latent_channels), jnp.float32,
        sharding=batch_sharding)
    batch["image_mask"] = jax.ShapeDtypeStruct((b, max_images), jnp.bool_, sharding=batch_sharding)
    batch["max_timestep"] = ints(b, max_images)
    return batch


def estimate(config, params: int, n_devices: int, mesh: dict, rows_per_device: int) -> dict:
    """Analytic bytes per device: fp32 params, Adam moments and grads split over fsdp*tensor
    (replicated over data), and the remat'd activations: each layer keeps its input
    [rows, L, dim] in the compute dtype, plus one layer's working set recomputed in the
    backward pass (about 34*L*dim + 5*heads*L*block bytes per row at bf16, after Korthikanti
    et al. 2022, with blockwise attention instead of the L^2 scores), and the float32 logits
    over the vocabulary with their gradient (2 * rows * L * vocab/tensor * 4 bytes, which
    dominate at small sizes)."""
    shards = mesh["fsdp"] * mesh["tensor"]
    m, length = config.model, config.data.seq_len
    state = 4 * params * 3 / shards + 4 * params / shards  # params + 2 moments, grads
    width = 2 if m.dtype == "bfloat16" else 4
    kept = m.depth * rows_per_device * length * m.dim * width
    block = min(m.attention_block, length)
    layer = rows_per_device * (34 * length * m.dim / mesh["tensor"]
                               + 5 * m.heads / mesh["tensor"] * length * block) * width / 2
    logits = 2 * rows_per_device * length * m.vocab_size / mesh["tensor"] * 4
    activations = kept + layer + logits
    return {"state_gib": state / GIB, "activations_gib": activations / GIB,
            "total_gib": (state + activations) / GIB}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.16b")
    ap.add_argument("--platform", default="tpu", choices=["tpu", "cpu"])
    ap.add_argument("--topology", default="v5p:2x2x2")
    ap.add_argument("--mesh", default="fsdp=-1", help="data=..,fsdp=..,tensor=..")
    ap.add_argument("--rows_per_device", type=int, default=2)
    ap.add_argument("--seq_len", type=int, default=0, help="0: the size's (4096)")
    ap.add_argument("--attention", default="", help="model.attention; '': the preset's (auto: "
                    "the target's kernel, splash on TPU)")
    args = ap.parse_args()

    config = load_config(f"experiments/transfusion.py:{args.size}")
    devs = devices(args.platform, args.topology)
    mesh_cfg = {"data": 1, "fsdp": 1, "tensor": 1}
    mesh_cfg.update({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(mesh_cfg, len(devs))))
    config.mesh = shape
    if args.seq_len:
        config.data.seq_len = args.seq_len
    if args.attention:
        config.model.attention = args.attention
    if config.model.attention == "auto":  # resolved for the target, not this machine's CPU
        config.model.attention = attention.resolve("auto", args.platform)
    config.data.batch_size = args.rows_per_device * shape["data"] * shape["fsdp"]
    mesh = sharding.make_mesh(shape, devs)
    max_images = resolve_max_images(config.data, patches_per_image(config.model))
    model, tx = trainer.model_and_optimizer(config)
    inputs = example_inputs(config.model, config.data.seq_len, max_images)
    state = train_state.abstract_state(trainer.make_init_fn(config, model, tx, inputs), mesh,
                                       config.sharding_rules)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    batch_sharding = sharding.batch_sharding(mesh)
    batch = abstract_batch(config, max_images, batch_sharding)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(trainer.make_train_step(config, model, tx), donate_argnums=0,
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config.sharding_rules)):
        lowered = step.lower(state, batch)
        compiled = lowered.compile()
    mem = compiled.memory_analysis()
    hlo = lowered.as_text()
    print(json.dumps({
        "size": args.size, "params_b": params / 1e9, "platform": args.platform,
        "topology": args.topology if args.platform == "tpu" else f"cpu x{len(devs)}",
        "devices": len(devs), "mesh": shape, "rows_per_device": args.rows_per_device,
        "seq_len": config.data.seq_len, "attention": config.model.attention,
        # Pallas kernel calls in the lowered step (Mosaic on TPU, Triton on GPU); the compile
        # above is what proves they lower for the target
        "pallas_calls": hlo.count("tpu_custom_call") + hlo.count("__gpu$xla.gpu.triton"),
        "compile_s": round(time.perf_counter() - t0, 1),
        "xla_arguments_gib": mem.argument_size_in_bytes / GIB,
        "xla_temporaries_gib": mem.temp_size_in_bytes / GIB,
        "xla_outputs_gib": mem.output_size_in_bytes / GIB,
        "xla_total_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GIB,
        "estimate": estimate(config, params, len(devs), shape, args.rows_per_device),
    }), flush=True)


if __name__ == "__main__":
    main()
