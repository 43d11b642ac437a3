"""Attention under the Transfusion mask on TPU: JAX's Pallas splash attention, per row.

Splash attention skips every (query block, key block) pair its block mask marks empty and
applies the element mask only on partial blocks. Its static masks (causal, local, numpy) are
fixed at trace time, but the Transfusion mask changes with every batch (where the images and
the document boundaries fall), so each row gets a *dynamic* mask, built on device from the
row's key ranges (attention_ranges.py): one [L, L] bool per row, shared by all heads. Splash
turns it into its block-sparse form inside the step; rows run one after another (`lax.map`),
which is what a device holds anyway at the paper's 2 rows of 4096 per device.

`interpret=True` runs the same kernel through the Pallas interpreter (any backend; the tests).
"""
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info


def _row_mask(k_start, k_end, keys: int):
    cols = jnp.arange(keys, dtype=jnp.int32)
    return ((k_start[:, None] <= cols) & (cols < k_end[:, None]))[None]  # [1, Lq, Lk]


def _dynamic_kernel(mask, sizes, interpret):
    """`splash.make_splash_mha` for a mask known only on device. (jax 0.10's maker maps
    `jnp.array` over the mask info, which turns its `is_dynamic_mask` flag into a tracer under
    jit; the pieces it calls work, so they are called here directly.)"""
    blocks = (sizes.block_q, sizes.block_kv)
    # One block shape serves every kernel, so the dq kernel reuses the forward's mask info.
    fwd, _ = info.process_dynamic_mask(mask, blocks, downcast_smem_data=False)
    dkv, _ = info.process_dynamic_mask_dkv(mask, blocks, downcast_smem_data=False)
    return splash.SplashAttentionKernel(
        fwd, fwd, dkv, block_sizes=sizes, is_mqa=False, save_residuals=False,
        mask_value=splash.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
        residual_checkpoint_name=None, mask_function=None, interpret=interpret)


def splash_attention(q, k, v, k_start, k_end, *, block: int = 512, interpret: bool = False):
    """q [B, Lq, H, Dh], k, v [B, Lk, H, Dh] -> [B, Lq, H, Dh]: query i of a row sees keys
    [k_start[i], k_end[i]). Rows with an empty range output zeros."""
    lq, lk = q.shape[1], k.shape[1]
    bq, bk = min(block, lq), min(block, lk)
    if lq % bq or lk % bk:
        raise ValueError(f"model.attention_block={block} must divide the query and key lengths "
                         f"({lq}, {lk}) for splash attention")
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                              block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                              block_kv_dq=bk)
    scale = q.shape[-1] ** -0.5

    def row(args):
        q_row, k_row, v_row, ks, ke = args  # [L, H, D] -> splash's [H, L, D]
        kernel = _dynamic_kernel(_row_mask(ks, ke, lk), sizes, interpret)
        heads_first = lambda x: jnp.swapaxes(x, 0, 1)
        out = kernel(heads_first(q_row * scale), heads_first(k_row), heads_first(v_row))
        # Splash gives a fully masked row the mean of nothing as 0/0 guarded to 0; make padding
        # exactly zero whatever the kernel's convention.
        return jnp.where((ke > ks)[:, None, None], heads_first(out), 0).astype(q.dtype)

    return jax.lax.map(row, (q, k, v, k_start, k_end))
