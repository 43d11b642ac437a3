"""A training run's weights for generation and evaluation, without its trainer or optimizer: a
Transfusion or Chameleon run (config.model.family; models.build_model builds its module), or an
autoencoder run."""
from transfusion_jax.core import checkpoint


def load_for_inference(workdir: str, step: int | None = None):
    """(config, variables) of the latest (or given) checkpoint: {"params": ...} for
    `model.apply` (the EMA params when the run kept them; with the quantiser's collections of a
    VQ-VAE run), on one local device. The optimizer state is not read."""
    config = checkpoint.read_config(workdir)
    saved = checkpoint.restore_subtrees(workdir, ("params",), step,
                                        optional=("ema_params", "vq"))
    return config, {"params": saved.get("ema_params", saved["params"]), **saved.get("vq", {})}
