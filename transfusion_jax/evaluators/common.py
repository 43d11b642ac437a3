"""Evaluators built from `config.evals`, in the style of big_vision's evaluators/common.py.

    config.evals = {
        "samples": {"type": "sample_grid", "every": 500},
        "shapes": {"type": "shapes", "every": 1000, "num": 16},
    }

Each entry names a type (a module of this package, listed in TYPES) and `every` (run at every
multiple of it and at the run's last step; 0: only on request, `python -m transfusion_jax.evaluate`);
its other keys are the evaluator's options. An evaluator module defines
`Evaluator(context, **options)` with `run(variables, out_dir) -> {name: scalar}`; it may write
files into `out_dir` (evals/<step>/<name>/), and writes none when out_dir is "". Scalars are
returned as "<name>/<key>" and written, per step, to evals/<step>.json.

Several processes (a multi-host run, or `evaluate` launched on every host): every process runs
every evaluator on its own devices, data parallel. An evaluator cuts its work into fixed batches
(the last one padded) and computes batch i only where core/distributed.py:mine(i) says so (process
i % process_count); then `distributed.gather_batches` brings all batches' outputs to every
process in batch order, and every process computes the same scores from them. Noise is keyed by
the batch index alone (fold_in(key, i), or the seed plus i), so the numbers do not depend on the
process count. Only process 0 gets an out_dir and writes files (evals/, the run report); the
others get "".
"""
import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any

import jax

from transfusion_jax.core import distributed
from transfusion_jax.evaluators import run_report

TYPES = {
    "sample_grid": "transfusion_jax.evaluators.sample_grid",
    "shapes": "transfusion_jax.evaluators.shapes",
    "reconstruction": "transfusion_jax.evaluators.reconstruction",
    "captioning": "transfusion_jax.evaluators.captioning",
    "perplexity": "transfusion_jax.evaluators.perplexity",
    "ranked": "transfusion_jax.evaluators.ranked",
    "fid": "transfusion_jax.evaluators.fid",
    "geneval": "transfusion_jax.evaluators.geneval",
    "denoising": "transfusion_jax.evaluators.denoising",
}
RESERVED = ("type", "every")


@dataclasses.dataclass(frozen=True)
class Context:
    """What evaluators may use besides the variables: the run's config, its tokenizer and
    frozen autoencoder codec, and the workdir."""
    config: Any
    tokenizer: Any
    codec: Any
    workdir: str


@dataclasses.dataclass(frozen=True)
class Scheduled:
    name: str
    every: int
    evaluator: Any

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last_step)


def read_jsonl_records(who: str, path: str, num: int | None, well_formed, expected: str) -> list:
    """The first `num` (None: all) non-blank lines of a JSONL file, parsed; a line that is not
    JSON or fails `well_formed(record)` stops with ValueError "<who>: <path>:<line>: expected
    ..." (the ranked and geneval evaluators' inputs)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if num is not None and len(out) >= num:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ok = well_formed(record)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"{who}: {path}:{number}: expected {expected}")
            out.append(record)
    return out


def check_config(evals) -> None:
    """Every entry of config.evals names a known type and a valid `every` (one of the run's
    checks at start, before anything is written)."""
    for name, spec in (evals or {}).items():
        if "type" not in spec or spec["type"] not in TYPES:
            raise ValueError(f"evals.{name}.type={spec.get('type')!r}: expected one of "
                             f"{sorted(TYPES)}")
        every = spec.get("every", 0)
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"evals.{name}.every={every!r}: expected an integer >= 0 "
                             "(0: only with python -m transfusion_jax.evaluate)")


def from_config(evals, context: Context, only: tuple[str, ...] = (),
                scheduled_only: bool = False) -> list[Scheduled]:
    """The evaluators of config.evals (`only`: these names; `scheduled_only`: those with
    every > 0, what a training run needs), built once (their jitted functions are reused at
    every evaluation)."""
    check_config(evals)
    unknown = sorted(set(only) - set(evals or {}))
    if unknown:
        raise ValueError(f"evaluators {unknown} are not in config.evals "
                         f"(it has {sorted(evals or {})})")
    out = []
    for name, spec in (evals or {}).items():
        if (only and name not in only) or (scheduled_only and not spec.get("every", 0)):
            continue
        module = importlib.import_module(TYPES[spec["type"]])
        options = {k: v for k, v in spec.items() if k not in RESERVED}
        try:
            evaluator = module.Evaluator(context, **options)
        except TypeError as e:
            raise ValueError(f"evals.{name}: {e}") from None
        out.append(Scheduled(name, int(spec.get("every", 0)), evaluator))
    return out


def run(evaluators: list[Scheduled], variables, step: int, workdir: str, config=None) -> dict:
    """Runs `evaluators` on `variables` (at training step `step`) -> {"<name>/<key>": scalar};
    files go to workdir/evals/<step>/<name>/, the scalars to workdir/evals/<step>.json (merged
    with what that file already holds), after each evaluator: a later one of the same step reads
    the earlier ones' there (the shapes report plots the denoising evaluator's gain). Then the
    run's report over all evaluated steps (run_report.py: evals/report.md and, from two steps,
    evals/metrics_vs_flops.png; the training FLOPs come from `config`, the run's config: None
    gives steps only); a failure there is a warning line, never the evaluation's failure.
    `variables` are used as the caller placed them: the trainer and `evaluate` call this under
    the run's mesh and logical axis rules with the params sharded as training shards them, so
    each evaluator's jitted forward runs sharded (tests/test_evaluators_mesh.py).
    Several processes: every process calls this (the evaluators' gathers are collectives), each
    on its own devices; every one returns the same scalars, process 0 alone writes the files,
    and each process prints how many of each evaluator's batches it computed (module doc)."""
    results, writer = {}, jax.process_index() == 0
    path = os.path.join(workdir, "evals", f"{step}.json")
    saved = {}
    if writer and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    for scheduled in evaluators:
        out_dir = os.path.join(workdir, "evals", str(step), scheduled.name) if writer else ""
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        t0 = time.perf_counter()
        distributed.dealt()  # count this evaluator's batches only
        scores = scheduled.evaluator.run(variables, out_dir)
        _log_share(scheduled.name)
        distributed.log(f"step {step}: eval {scheduled.name} in "
                        f"{time.perf_counter() - t0:.1f}s: "
                        + " ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        results.update({f"{scheduled.name}/{k}": float(v) for k, v in scores.items()})
        if writer:
            with open(path, "w") as f:
                json.dump({**saved, **results}, f, indent=1, sort_keys=True)
    if writer:
        _write_report(workdir, config)
    return results


def _log_share(name: str) -> None:
    """Several processes: a line in every process's log (not only process 0's) with the share
    of the evaluator's batches this process computed: the split is seen where it happens."""
    here, batches = distributed.dealt()
    if jax.process_count() > 1:
        print(f"eval {name}: this process computed {here} of {batches} batches",
              file=sys.stderr, flush=True)


def _write_report(workdir: str, config) -> None:
    try:
        run_report.write(workdir, config)
    except Exception as e:  # noqa: BLE001 - the report must never fail an evaluation
        distributed.log(f"warning: evals/report.md not written ({type(e).__name__}: {e})")
