"""Train a Transfusion model (entry point; the trainer is trainers/transfusion.py).

    python -m transfusion_jax.train --config experiments/transfusion.py:tiny --workdir DIR \
        [--config.key=value ...] [--distributed auto|on|off ...]

Multi-host: the same command on every host (launch/); see core/distributed.py.
"""
from absl import flags

from transfusion_jax.core import cli, distributed
from transfusion_jax.trainers import transfusion


def _distributed_flags() -> dict:
    """Multi-host (core/distributed.py). Unset: auto-detected under a cluster (Cloud TPU,
    SLURM, Open MPI, JAX_COORDINATOR_ADDRESS); nothing on a plain machine."""
    return dict(
        mode=flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                               "start jax.distributed: auto (flags or a cluster), on, off"),
        coordinator=flags.DEFINE_string("coordinator_address", None,
                                        "host:port of process 0's coordinator (explicit multi-host)"),
        num_processes=flags.DEFINE_integer("num_processes", None, "processes in the job"),
        process_id=flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1"),
        data_streams=flags.DEFINE_integer(
            "data_streams", None, "data streams per batch (default: the first run's process "
            "count; kept by the checkpoint)"),
        allow_changes=flags.DEFINE_list(
            "allow_config_changes", [], "config fields (or prefixes) a resume may change from "
            "the workdir's saved config, e.g. total_steps,optimizer"))


def _main(config, workdir, extra):
    started = distributed.maybe_initialize(extra["coordinator"], extra["num_processes"],
                                           extra["process_id"], extra["mode"])
    if started:
        distributed.log(f"jax.distributed ({started}): {distributed.describe()}")
    transfusion.train(config, workdir, data_streams=extra["data_streams"],
                      allow_config_changes=tuple(extra["allow_changes"]))


def main():
    cli.run(_main, "experiments/transfusion.py[:arg]", _distributed_flags)


if __name__ == "__main__":
    main()
