"""Import Stable Diffusion's AutoencoderKL (diffusers layout) into our VAE.

A diffusers VAE folder holds config.json and diffusion_pytorch_model.safetensors (or .bin).
`config_from_diffusers` turns its config into our config.model (kind "vae", the same layout:
see `transfusion_jax.models.autoencoder.model`), and `params_from_diffusers` maps every parameter:
each of ours is named by rules that give its diffusers name, so a missing, extra or misshapen
tensor is an error that names it. No torch is needed (`transfusion_jax.weight_files`).

    model_cfg, variables, scaling = load_sd_vae("path/to/vae")
    latents = Autoencoder(model_cfg).apply(variables, x, method=Autoencoder.encode).mean
    latents_for_diffusion = (latents - shift) * scaling   # SD: shift 0, scaling 0.18215
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np

from transfusion_jax.models.autoencoder.model import Autoencoder
from transfusion_jax.models.autoencoder.weight_files import read_weights

_SUPPORTED = dict(act_fn="silu", down_block_types="DownEncoderBlock2D",
                  up_block_types="UpDecoderBlock2D")
# Older checkpoints name the attention projections as in the original LDM code.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def config_from_diffusers(dcfg: dict) -> ml_collections.ConfigDict:
    for field, expected in _SUPPORTED.items():
        values = dcfg.get(field, expected)
        values = [values] if isinstance(values, str) else list(values)
        if any(v != expected for v in values):
            raise ValueError(f"diffusers config {field}: got {values}, only {expected!r} is supported")
    if dcfg.get("in_channels", 3) != dcfg.get("out_channels", 3):
        raise ValueError(f"diffusers config in_channels/out_channels: got {dcfg.get('in_channels')}"
                         f"/{dcfg.get('out_channels')}, expected equal")
    return ml_collections.ConfigDict(dict(
        kind="vae", image_channels=int(dcfg.get("in_channels", 3)),
        channels=tuple(int(c) for c in dcfg["block_out_channels"]),
        num_res_blocks=int(dcfg.get("layers_per_block", 1)),
        mid_attention=bool(dcfg.get("mid_block_add_attention", True)),
        latent_channels=int(dcfg.get("latent_channels", 4)),
        norm_groups=int(dcfg.get("norm_num_groups", 32)), norm_eps=1e-6,
        use_quant_conv=bool(dcfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(dcfg.get("use_post_quant_conv", True)),
        codebook_size=0, vq_beta=0.25, vq_decay=0.99, vq_restart_after=0, dtype="float32",
    ))


def _module_name(name: str, levels: int) -> str:
    """One of our module names -> its diffusers name."""
    rules = (
        (r"down(\d+)_res(\d+)", lambda m: f"down_blocks.{m[1]}.resnets.{m[2]}"),
        (r"down(\d+)_downsample", lambda m: f"down_blocks.{m[1]}.downsamplers.0.conv"),
        (r"up(\d+)_res(\d+)", lambda m: f"up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}"),
        (r"up(\d+)_upsample", lambda m: f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv"),
        (r"mid_res(\d)", lambda m: f"mid_block.resnets.{m[1]}"),
        (r"mid_attn", lambda m: "mid_block.attentions.0"),
        (r"norm_out", lambda m: "conv_norm_out"),
        (r"shortcut", lambda m: "conv_shortcut"),
        (r"norm", lambda m: "group_norm"),  # the attention block's norm
        (r"(q|k|v)", lambda m: f"to_{m[1]}"),
        (r"proj_out", lambda m: "to_out.0"),
    )
    for pattern, fn in rules:
        m = re.fullmatch(pattern, name)
        if m:
            return fn(m)
    return name  # conv_in, conv_out, conv1, conv2, norm1, norm2, quant_conv, ... are the same


def _torch_key(path: tuple[str, ...], levels: int) -> str:
    *modules, leaf = path
    names = [_module_name(m, levels) for m in modules]
    return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def _convert(value: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if len(shape) == 4:  # conv: torch [out, in, kh, kw] -> flax [kh, kw, in, out]
        value = np.transpose(value, (2, 3, 1, 0))
    elif len(shape) == 2:  # Linear [out, in] (or an LDM 1x1 conv [out, in, 1, 1]) -> [in, out]
        value = value.reshape(value.shape[0], value.shape[1]).T
    if value.shape != tuple(shape):
        raise ValueError(f"diffusers weights {key}: got shape {value.shape} after conversion, "
                         f"expected {tuple(shape)}")
    return value


def params_from_diffusers(state: dict, model_cfg) -> dict:
    """{diffusers name: array} -> our `params` (unboxed), checked leaf by leaf."""
    model = Autoencoder(model_cfg)
    image_size = 2 ** len(model_cfg.channels)  # the smallest image every level can halve
    x = jax.ShapeDtypeStruct((1, image_size, image_size, model_cfg.image_channels), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    levels, used = len(model_cfg.channels), set()

    def fetch(path, leaf):
        names = tuple(p.key for p in path)
        key = _torch_key(names, levels)
        if key not in state:
            legacy = key
            for new, old in _LEGACY_ATTENTION.items():
                legacy = legacy.replace(f".{new}.", f".{old}.")
            if legacy not in state:
                raise ValueError(f"diffusers weights: no {key} (for our {'/'.join(names)})")
            key = legacy
        used.add(key)
        return jnp.asarray(_convert(state[key], leaf.shape, key))

    params = jax.tree_util.tree_map_with_path(fetch, abstract)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"diffusers weights: {len(unused)} tensors have no place in our VAE, "
                         f"e.g. {unused[:5]}; is the config the checkpoint's?")
    return params


def load_sd_vae(path: str):
    """A diffusers AutoencoderKL folder -> (config.model, {"params": ...}, scaling, shift)."""
    with open(os.path.join(path, "config.json")) as f:
        dcfg = json.load(f)
    model_cfg = config_from_diffusers(dcfg)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            state = read_weights(os.path.join(path, name))
            break
    else:
        raise FileNotFoundError(f"{path!r}: no diffusion_pytorch_model.safetensors or .bin")
    params = params_from_diffusers(state, model_cfg)
    scaling = float(dcfg.get("scaling_factor") or 0.18215)
    shift = float(dcfg.get("shift_factor") or 0.0)
    return model_cfg, {"params": params}, scaling, shift
