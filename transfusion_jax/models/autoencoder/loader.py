"""Loading a trained autoencoder from its workdir, to run it frozen (Transfusion trainer,
precompute, generation): its config, weights and latent statistics, without its trainer.

    codec = load_codec(config.autoencoder)     # identity, or a trained VAE's codec
    config, variables, stats = load_frozen(workdir)
"""
import json
import os

import jax
import jax.numpy as jnp

from transfusion_jax.core import checkpoint
from transfusion_jax.models.autoencoder.codec import IDENTITY, Codec, check_kind
from transfusion_jax.models.autoencoder.model import Autoencoder, downsample_factor


def load_frozen(workdir: str, step: int | None = None):
    """(config, {"params", "vq"?} variables, latent stats or None) of a trained autoencoder
    (python -m transfusion_jax.train_autoencoder), on the first local device."""
    config = checkpoint.read_config(workdir)
    saved = checkpoint.restore_subtrees(workdir, ("params",), step, optional=("vq",))
    # The state's `vq` field holds the quantiser's mutable collections ({"vq": ...}; {} for a VAE).
    variables = {"params": saved["params"], **saved.get("vq", {})}
    stats_path = os.path.join(workdir, "latent_stats.json")
    stats = None
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            stats = json.load(f)
    return config, variables, stats


def load_codec(ae_cfg, family: str = "transfusion") -> Codec:
    """The codec of config.autoencoder for a model.family; a VAE's or VQ-VAE's weights come from
    its workdir, on device 0."""
    check_kind(ae_cfg, family)
    if ae_cfg.kind == "identity":
        return IDENTITY
    name = {"vae": "VAE", "vq": "VQ-VAE"}[ae_cfg.kind]
    if not ae_cfg.checkpoint:
        raise ValueError(f"autoencoder.checkpoint is empty: expected the workdir of a trained "
                         f"{name} (python -m transfusion_jax.train_autoencoder --config "
                         f"experiments/autoencoder.py:kind={ae_cfg.kind} --workdir DIR)")
    config, variables, stats = load_frozen(ae_cfg.checkpoint)
    if config.model.kind != ae_cfg.kind:
        raise ValueError(f"autoencoder.checkpoint={ae_cfg.checkpoint!r} holds a "
                         f"{config.model.kind!r} autoencoder; autoencoder.kind={ae_cfg.kind!r} "
                         f"needs a {name}")
    if ae_cfg.downsample != downsample_factor(config.model):
        raise ValueError(f"autoencoder.downsample={ae_cfg.downsample}, but the {name} in "
                         f"{ae_cfg.checkpoint} downsamples by {downsample_factor(config.model)}")
    variables = jax.tree.map(jnp.asarray, variables)
    if ae_cfg.kind == "vq":  # code ids need no normalising statistics
        return Codec("vq", Autoencoder(config.model), variables=variables,
                     ae_config=config.model)
    if stats is None:
        raise FileNotFoundError(f"{ae_cfg.checkpoint}/latent_stats.json is missing: the VAE's "
                                "training writes it when it ends (re-run train_autoencoder there)")
    return Codec("vae", Autoencoder(config.model), float(stats["shift"]), float(stats["scale"]),
                 variables, config.model)
