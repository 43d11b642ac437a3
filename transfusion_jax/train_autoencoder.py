"""Train the latent autoencoder (entry point; the trainer is trainers/autoencoder.py).

    python -m transfusion_jax.train_autoencoder --config experiments/autoencoder.py:kind=vae \
        --workdir DIR [--config.key=value ...]
"""
from absl import flags

from transfusion_jax.core import cli
from transfusion_jax.trainers import autoencoder


def _flags() -> dict:
    return dict(allow_changes=flags.DEFINE_list(
        "allow_config_changes", [], "config fields (or prefixes) a resume may change from the "
        "workdir's saved config, e.g. total_steps"))


def main():
    cli.run(lambda config, workdir, extra: autoencoder.train(
        config, workdir, allow_config_changes=tuple(extra["allow_changes"])),
        "experiments/autoencoder.py[:arg]", _flags)


if __name__ == "__main__":
    main()
