"""Run a training run's evaluators (config.evals) on one of its checkpoints (a Transfusion or
Chameleon run, model.family, or an autoencoder run).

    python -m transfusion_jax.evaluate --workdir DIR [--step N] [--only NAME,NAME] \
        [--distributed auto|on|off --coordinator_address ... --num_processes N --process_id I]

Loads the run's config, tokenizer, frozen autoencoder (of the run's model.family: a Chameleon
run's VQ-VAE) and the checkpoint's params (the EMA params when the run kept them: what the
trainer evaluates), runs every evaluator of config.evals (or those named by --only, whatever
their `every`) and writes their scalars to DIR/evals/<step>.json and their files to
DIR/evals/<step>/<name>/, as training does. A Transfusion or Chameleon run's evaluators run on
its mesh (config.mesh over this machine's devices; all of them along fsdp when it needs more, as
for a pod run), the params sharded as training shards them: the programs training's evaluations
ran, so the numbers are training's.

Several processes (the same command on every host, as the trainer is launched: core/distributed.py,
launch/local_multiprocess.sh --module transfusion_jax.evaluate): every process loads the
checkpoint, places the params on its own devices (trainers/transfusion.py:place_for_evaluation,
as a multi-process training run does) and computes its share of every evaluator's batches;
all print the same scalars, process 0 writes the files (evaluators/common.py).
"""
import json

import flax.linen as nn
import jax
from absl import flags

from transfusion_jax.core import checkpoint, cli, distributed, sharding
from transfusion_jax.data.tokenizer import get_tokenizer
from transfusion_jax.evaluators import common as evaluators
from transfusion_jax.inference.loading import load_for_inference
from transfusion_jax.models import family
from transfusion_jax.models.autoencoder import loader
from transfusion_jax.trainers import transfusion as trainer


def evaluate(workdir: str, step: int | None = None, only: tuple[str, ...] = ()) -> dict:
    """{"<name>/<key>": scalar} of the evaluators on the checkpoint at `step` (latest: None)."""
    checkpoint.read_config(workdir)  # names a folder that is no training workdir
    step = checkpoint.latest_step(workdir) if step is None else step
    config, variables = load_for_inference(workdir, step)
    if not config.get("evals"):
        raise ValueError(f"{workdir}/config.json has no evals: nothing to run (add "
                         "--config.evals... to the run's config, see evaluators/common.py)")
    model_run = "autoencoder" in config  # a Transfusion or Chameleon run, else an autoencoder's
    context = evaluators.Context(
        config, get_tokenizer(config.data, workdir) if model_run else None,
        loader.load_codec(config.autoencoder, family(config.model)) if model_run else None,
        workdir)
    scheduled = evaluators.from_config(config.evals, context, only)
    if not model_run:  # an autoencoder's evaluators: on one device, as its trainer runs them
        return evaluators.run(scheduled, variables, step, workdir, config)
    mesh, variables = on_the_run_mesh(config, variables)
    with jax.set_mesh(mesh), nn.logical_axis_rules(
            sharding.rules_from_config(config.sharding_rules)):
        return evaluators.run(scheduled, variables, step, workdir, config)


def on_the_run_mesh(config, variables):
    """(mesh, variables): the run's mesh over this process's devices and its params placed with
    the shardings training gives them (from the model's logical axis names and
    config.sharding_rules); when config.mesh needs more devices than this process has (a pod
    run), all of them along fsdp."""
    mesh, params = trainer.place_for_evaluation(config, variables["params"])
    if not _fits(config.mesh, mesh.size):
        distributed.log(f"evaluate: mesh {dict(config.mesh)} does not fit the {mesh.size} "
                        f"devices of this process; evaluating on {dict(mesh.shape)}")
    return mesh, {**variables, "params": params}


def _fits(mesh_config, num_devices: int) -> bool:
    try:
        sharding.mesh_shape(mesh_config, num_devices)
        return True
    except ValueError:
        return False


def main():
    workdir = flags.DEFINE_string("workdir", None, "a training workdir (config.json, checkpoints)")
    step = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    only = flags.DEFINE_list("only", [], "run only these evaluators of config.evals")
    multihost = distributed.define_flags()

    def _main():
        if not workdir.value:
            raise ValueError("--workdir is required")
        distributed.initialize_from_flags({k: v.value for k, v in multihost.items()})
        results = evaluate(workdir.value, step.value, tuple(only.value))
        print(json.dumps(results, indent=1, sort_keys=True))

    cli.run_flags(_main)


if __name__ == "__main__":
    main()
