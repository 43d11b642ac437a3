"""Evaluators built from `config.evals`, in the style of big_vision's evaluators/common.py.

    config.evals = {
        "samples": {"type": "sample_grid", "every": 500},
        "shapes": {"type": "shapes", "every": 1000, "num": 16},
    }

Each entry names a type (a module of this package, listed in TYPES) and `every` (run at every
multiple of it and at the run's last step; 0: only on request, `python -m transfusion_jax.evaluate`);
its other keys are the evaluator's options. An evaluator module defines
`Evaluator(context, **options)` with `run(variables, out_dir) -> {name: scalar}`; it may write
files into `out_dir` (evals/<step>/<name>/). Scalars are returned as "<name>/<key>" and written,
per step, to evals/<step>.json.
"""
import dataclasses
import importlib
import json
import os
import time
from typing import Any

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
    each evaluator's jitted forward runs sharded (tests/test_evaluators_mesh.py)."""
    results = {}
    path = os.path.join(workdir, "evals", f"{step}.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    for scheduled in evaluators:
        out_dir = os.path.join(workdir, "evals", str(step), scheduled.name)
        os.makedirs(out_dir, exist_ok=True)
        t0 = time.perf_counter()
        scores = scheduled.evaluator.run(variables, out_dir)
        distributed.log(f"step {step}: eval {scheduled.name} in "
                        f"{time.perf_counter() - t0:.1f}s: "
                        + " ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        results.update({f"{scheduled.name}/{k}": float(v) for k, v in scores.items()})
        with open(path, "w") as f:
            json.dump({**saved, **results}, f, indent=1, sort_keys=True)
    try:
        run_report.write(workdir, config)
    except Exception as e:  # noqa: BLE001 - the report must never fail an evaluation
        distributed.log(f"warning: evals/report.md not written ({type(e).__name__}: {e})")
    return results
