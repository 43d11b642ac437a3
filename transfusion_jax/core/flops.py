"""FLOP accounting: analytic model FLOPs per step and the device's matmul peak.

Model FLOPs (what MFU divides) count the transformer's matmuls (Q, K, V, O, SwiGLU, LM head)
at 6 FLOPs per parameter per element (forward 2, backward 4) and the attention score and value
products over the full L x L (12 * L^2 * D per row per layer, as PaLM's appendix B). Patch
layers are left out: they are under 0.5% of the parameters with `linear`; the `unet` convolutions
are not counted, so MFU understates a U-Net model's work. (XLA's cost analysis is no substitute:
it counts the body of the scanned layer loop once.)
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 matmul peaks per device (vendor figures), for MFU on accelerators.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def transformer_matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per element: blocks and the LM head."""
    attn = 4 * cfg.dim * cfg.dim
    mlp = 3 * cfg.dim * cfg.mlp_dim
    return cfg.depth * (attn + mlp) + cfg.dim * cfg.vocab_size


def flops_per_step(cfg, batch: int, length: int) -> float:
    """Analytic training FLOPs of one step on [batch, length] elements (forward + backward)."""
    matmuls = 6.0 * transformer_matmul_params(cfg) * batch * length
    attention = 12.0 * cfg.depth * batch * length * length * cfg.dim
    return matmuls + attention


def peak_flops(device=None, dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> tuple[float, str]:
    """(FLOP/s, source): the vendor peak for known accelerators, else a measured matmul peak
    (median of `repeats` timed [size, size] @ [size, size] products after compilation)."""
    device = device or jax.devices()[0]
    for name, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return peak, f"table:{name}"
    return measure_matmul_peak(device, dtype, size, repeats), "measured"


def measure_matmul_peak(device=None, dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size ** 3 / float(np.median(times))
