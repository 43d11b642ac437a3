"""Transfusion pretraining (paper section 4.1).

    --config experiments/transfusion.py:SIZE[,patch=linear|unet][,patch_size=K]

SIZE is tiny (tests and the CPU demo) or one of Table 2: 0.16b, 0.37b, 0.76b, 1.4b, 7b.
"""
import ml_collections

from transfusion_jax.config import parse_arg
from transfusion_jax.model.unet import UNET_PRESETS
from transfusion_jax.sharding import DEFAULT_RULES

# Table 2: (layers, embedding dim, attention heads).
SIZES = {
    "tiny": (2, 64, 4),
    "0.16b": (16, 768, 12),
    "0.37b": (24, 1024, 16),
    "0.76b": (24, 1536, 24),
    "1.4b": (24, 2048, 16),
    "7b": (32, 4096, 32),
}


def llama_mlp_dim(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of 256 (11008 at 4096)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * -(-hidden // multiple_of)


def model_config(size: str, patch: str, patch_size: int) -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"config arg size={size!r}; expected one of {list(SIZES)}")
    depth, dim, heads = SIZES[size]
    tiny = size == "tiny"
    return ml_collections.ConfigDict(dict(
        vocab_size=512 if tiny else 32000,  # paper: the Llama 2 tokenizer
        dim=dim, depth=depth, heads=heads,
        mlp_dim=4 * dim if tiny else llama_mlp_dim(dim),
        rope_theta=10000.0, norm_eps=1e-5, qk_norm=False,
        attention="dense" if tiny else "blockwise", attention_block=512,
        # Latents of the frozen autoencoder: 256x256 pixels -> 32x32x8 (paper 4.1).
        latent_size=8 if tiny else 32, latent_channels=4 if tiny else 8,
        patch=patch, patch_size=patch_size,
        unet=UNET_PRESETS["tiny" if tiny else "paper"],  # ~0.27B at 32x32x8, k=2 (paper 4.1)
        dtype="float32" if tiny else "bfloat16", remat=not tiny,
    ))


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", patch="linear", patch_size=2)
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(arg.size, arg.patch, arg.patch_size)
    config.diffusion = dict(schedule="cosine", timesteps=1000, ddpm_weight=5.0)
    config.optimizer = dict(lr=3e-4, warmup_steps=4000, final_lr=1.5e-5, b1=0.9, b2=0.95,
                            eps=1e-8, weight_decay=0.1, grad_clip=1.0)
    config.total_steps = 250_000
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
    return config
