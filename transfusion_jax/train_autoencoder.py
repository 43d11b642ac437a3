"""Train the latent autoencoder (entry point; the trainer is trainers/autoencoder.py).

    python -m transfusion_jax.train_autoencoder --config experiments/autoencoder.py:kind=vae \
        --workdir DIR [--config.key=value ...]
"""
from transfusion_jax.core import cli
from transfusion_jax.trainers import autoencoder


def main():
    cli.run(lambda config, workdir, _: autoencoder.train(config, workdir),
            "experiments/autoencoder.py[:arg]")


if __name__ == "__main__":
    main()
