"""Throughput of a run's evaluators on one of its checkpoints: one JSON line per evaluator.

    python benchmarks/evaluators.py --workdir workdir/demo [--only perplexity,choices] [--step N]

Each evaluator of config.evals (or --only) is built (tokenising, encoding reference images),
then run twice on the checkpoint's params: the first run includes compilation, the second is
the steady state that `examples_per_s` reports. Examples (`unit`) are, per type (EXAMPLES,
one entry for each type of evaluators/common.py:TYPES): scored tokens (perplexity), questions
(ranked), images captioned (captioning), images generated (sample_grid, geneval; fid: generated,
decoded and measured by the InceptionV3, and by the CLIP too when its CLIP score is on), held-out
scenes (shapes: each generated from its caption, captioned and asked a question; denoising: each
denoised at its timesteps), images reconstructed (reconstruction). Results go to a temporary
folder, not the run's evals/. As in `python -m transfusion_jax.evaluate`: a Transfusion or
Chameleon run's evaluators run on the run's mesh (its params sharded as training shards them); an
autoencoder run's get no tokenizer or codec and run on one device.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfusion_jax import evaluate  # noqa: E402
from transfusion_jax.core import checkpoint, sharding  # noqa: E402
from transfusion_jax.data.tokenizer import get_tokenizer  # noqa: E402
from transfusion_jax.evaluators import common  # noqa: E402
from transfusion_jax.inference.loading import load_for_inference  # noqa: E402
from transfusion_jax.models import family  # noqa: E402
from transfusion_jax.models.autoencoder import loader  # noqa: E402

# type -> (unit, examples of one run from (its results, the evaluator))
EXAMPLES = {
    "perplexity": ("tokens", lambda r, e: r["tokens"]),
    "ranked": ("questions", lambda r, e: r["n"]),
    "captioning": ("images", lambda r, e: r["images"]),
    "sample_grid": ("images", lambda r, e: r["images"]),
    "geneval": ("images", lambda r, e: r["images"]),
    "fid": ("images", lambda r, e: len(e.captions)),
    "shapes": ("scenes", lambda r, e: len(e.captions)),
    "denoising": ("scenes", lambda r, e: len(e.truths)),
    "reconstruction": ("images", lambda r, e: len(e.heldout[0])),
}
assert set(EXAMPLES) == set(common.TYPES), (  # a new type needs its count here
    f"benchmarks/evaluators.py: EXAMPLES {sorted(EXAMPLES)} != TYPES {sorted(common.TYPES)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--only", default="", help="comma-separated names of config.evals")
    a = p.parse_args()

    step = checkpoint.latest_step(a.workdir) if a.step is None else a.step
    config, variables = load_for_inference(a.workdir, step)
    model_run = "autoencoder" in config  # a Transfusion or Chameleon run, else an autoencoder's
    context = common.Context(
        config, get_tokenizer(config.data, a.workdir) if model_run else None,
        loader.load_codec(config.autoencoder, family(config.model)) if model_run else None,
        a.workdir)
    only = tuple(n for n in a.only.split(",") if n)
    names = only or tuple(config.evals)
    placement = contextlib.nullcontext()
    if model_run:  # as python -m transfusion_jax.evaluate runs them: on the run's mesh
        mesh, variables = evaluate.on_the_run_mesh(config, variables)
        placement = contextlib.ExitStack()
        placement.enter_context(jax.set_mesh(mesh))
        placement.enter_context(nn.logical_axis_rules(
            sharding.rules_from_config(config.sharding_rules)))
    with placement, tempfile.TemporaryDirectory() as out:
        for name in names:
            t0 = time.perf_counter()
            built = common.from_config(config.evals, context, (name,))
            build_s = time.perf_counter() - t0
            times, results = [], {}
            for _ in range(2):
                t0 = time.perf_counter()
                os.makedirs(os.path.join(out, name), exist_ok=True)  # as common.run does
                results = built[0].evaluator.run(variables, os.path.join(out, name))
                times.append(time.perf_counter() - t0)
            kind = config.evals[name]["type"]
            unit, examples = EXAMPLES[kind]
            count = examples(results, built[0].evaluator)
            print(json.dumps(dict(
                name=name, type=kind, step=step,
                build_s=round(build_s, 2), first_run_s=round(times[0], 2),
                seconds=round(times[1], 2), examples=count, unit=unit,
                examples_per_s=float(count) / times[1],
                results={k: float(v) for k, v in results.items()})), flush=True)


if __name__ == "__main__":
    main()
