"""Train a Transfusion model (entry point; the trainer is trainers/transfusion.py).

    python -m transfusion_jax.train --config experiments/transfusion.py:tiny --workdir DIR \
        [--config.key=value ...] [--distributed auto|on|off ...]

Multi-host: the same command on every host (launch/); see core/distributed.py.
"""
from absl import flags

from transfusion_jax.core import cli, distributed
from transfusion_jax.trainers import transfusion


def _distributed_flags() -> dict:
    """Multi-host (core/distributed.py:define_flags), and the data streams and config changes."""
    return dict(
        **distributed.define_flags(),
        data_streams=flags.DEFINE_integer(
            "data_streams", None, "data streams per batch (default: the first run's process "
            "count; kept by the checkpoint)"),
        allow_changes=flags.DEFINE_list(
            "allow_config_changes", [], "config fields (or prefixes) a resume may change from "
            "the workdir's saved config, e.g. total_steps,optimizer"))


def _main(config, workdir, extra):
    distributed.initialize_from_flags(extra)
    transfusion.train(config, workdir, data_streams=extra["data_streams"],
                      allow_config_changes=tuple(extra["allow_changes"]))


def main():
    cli.run(_main, "experiments/transfusion.py[:arg]", _distributed_flags)


if __name__ == "__main__":
    main()
