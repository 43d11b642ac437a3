"""Throughput of a run's evaluators on one of its checkpoints: one JSON line per evaluator.

    python benchmarks/evaluators.py --workdir workdir/demo [--only perplexity,choices] [--step N]

Each evaluator of config.evals (or --only) is built (tokenising, encoding reference images),
then run twice on the checkpoint's params: the first run includes compilation, the second is
the steady state that `examples_per_s` reports. Examples are what the evaluator counts: scored
tokens (perplexity), questions (ranked), images (captioning, fid), else scenes (`num`).
Results go to a temporary folder, not the run's evals/.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transfusion_jax.core import checkpoint  # noqa: E402
from transfusion_jax.data.tokenizer import get_tokenizer  # noqa: E402
from transfusion_jax.evaluators import common  # noqa: E402
from transfusion_jax.inference.loading import load_for_inference  # noqa: E402
from transfusion_jax.models.autoencoder import loader  # noqa: E402

COUNTS = ("tokens", "n", "images", "num")  # the first one an evaluator returns is its examples


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--only", default="", help="comma-separated names of config.evals")
    a = p.parse_args()

    step = checkpoint.latest_step(a.workdir) if a.step is None else a.step
    config, variables = load_for_inference(a.workdir, step)
    context = common.Context(config, get_tokenizer(config.data, a.workdir),
                             loader.load_codec(config.autoencoder), a.workdir)
    only = tuple(n for n in a.only.split(",") if n)
    names = only or tuple(config.evals)
    with tempfile.TemporaryDirectory() as out:
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
            count = next((results[k] for k in COUNTS if k in results),
                         config.evals[name].get("num"))
            print(json.dumps(dict(
                name=name, type=config.evals[name]["type"], step=step,
                build_s=round(build_s, 2), first_run_s=round(times[0], 2),
                seconds=round(times[1], 2), examples=count,
                examples_per_s=None if count is None else float(count) / times[1],
                results={k: float(v) for k, v in results.items()})), flush=True)


if __name__ == "__main__":
    main()
