"""Running a sweep's points: here, one after another, or one job each through launch/.

    run_local(sweep, sweep_dir)            # each point a normal workdir SWEEP_DIR/<point>
    launch_jobs(sweep, sweep_dir, "tpu_pod", extra_args, dry_run=True)

Here (`run_local`), each point runs as a subprocess of the normal trainer command line,
`python -m transfusion_jax.train --config FILE:ARG --workdir SWEEP_DIR/POINT --config.K=V ...`,
with the sweep's environment (the micro sweep: JAX on the CPU's 2 host devices). Resumable:
  - a point whose workdir holds its final checkpoint (checkpoints/<total_steps>/) and, in
    evals/<total_steps>.json, the scalars of every evaluator the sweep's metrics read, is
    skipped: nothing is started for it;
  - a point with the final checkpoint but evaluations missing gets only those, by
    `python -m transfusion_jax.evaluate --workdir DIR --step N --only NAMES`;
  - any other point runs the trainer, which resumes from its newest checkpoint by itself (a
    point killed half-way continues where its last checkpoint left it).
So a killed sweep, run again, finishes the missing points and redoes none. A point that fails
(non-zero exit) is reported and the sweep goes on with the next; the call returns the failures.
The trainer and evaluator commands are parameters (tests substitute a fake). Before the first
point that needs training, the sweep's `prepare` steps (the frozen autoencoders a point names in
its overrides) run when their `done` file is missing.

Through launch/ (`launch_jobs`): one job per point, `bash launch/SCRIPT [point options]
[extra args] [--dry-run] -- TRAIN_ARGS`: the point's own launcher options (experiments/
scaling.py: accelerator, topology or nodes by size), then the sweep's, then what was given on
the command line after `--` (later options win in the scripts). tpu_pod and gke get a name per
point (`--name SWEEP-POINT`, lowercase, [a-z0-9-]). With dry_run the scripts print their
commands (nothing is created or submitted); without, they run, one after another (tpu_pod and
local_multiprocess wait for the training; slurm and gke submit and return). Points already
finished in a local sweep folder are skipped; a gs:// folder is not read.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from transfusion_jax.scaling import flops
from transfusion_jax.scaling.sweep import Point, Sweep

LAUNCHERS = {"local_multiprocess": "local_multiprocess.sh", "tpu_pod": "tpu_pod.sh",
             "gke": "gke_jobset.sh", "slurm": "slurm_gpu.sbatch"}
NAMED = ("tpu_pod", "gke")  # launchers whose jobs need a --name of their own
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STEP = re.compile(r"^\d+$")


def default_trainer(python: str = sys.executable) -> list[str]:
    return [python, "-m", "transfusion_jax.train"]


def default_evaluator(python: str = sys.executable) -> list[str]:
    return [python, "-m", "transfusion_jax.evaluate"]


def point_dir(sweep_dir: str, point: Point) -> str:
    if "://" in sweep_dir:
        return sweep_dir.rstrip("/") + "/" + point.name
    return os.path.join(sweep_dir, point.name)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of workdir/checkpoints/<step>/ (complete saves: Orbax renames a finished save
    to its step; a save in progress has another name)."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder)
                  if _STEP.match(n) and os.path.isdir(os.path.join(folder, n)))


def read_scalars(workdir: str, step: int) -> dict:
    path = os.path.join(workdir, "evals", f"{step}.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def required_evaluators(sweep: Sweep, config) -> list[str]:
    """The evaluators of the run's config.evals whose scalars the sweep's metrics read."""
    wanted = {m.key.split("/", 1)[0] for m in sweep.metrics}
    evals = config.get("evals") or {}
    return sorted(name for name in evals.keys() if name in wanted)  # noqa: SIM118 (ConfigDict)


def status(sweep: Sweep, point: Point, workdir: str, config=None) -> tuple[str, int, list[str]]:
    """("done" | "evaluate" | "train", final step, evaluators missing)."""
    config = config if config is not None else point.resolved()
    final = int(config["total_steps"])
    required = required_evaluators(sweep, config)
    if final not in checkpoint_steps(workdir):
        return "train", final, required
    scalars = read_scalars(workdir, final)
    missing = [n for n in required if not any(k.startswith(n + "/") for k in scalars)]
    return ("evaluate" if missing else "done"), final, missing


def shell_line(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(w) for w in argv])


def _prepare_needed(sweep: Sweep, to_train: list[Point]) -> list:
    used = {str(v) for p in to_train for v in p.overrides.values()}
    return [s for s in sweep.prepare
            if s.workdir in used and not os.path.exists(os.path.join(s.workdir, s.done))]


def _run(argv, env, log) -> int:
    log(f"$ {shell_line(argv)}")
    return subprocess.run(argv, env=env, check=False).returncode


def run_local(sweep: Sweep, sweep_dir: str, names: Sequence[str] = (), *,
              trainer: Sequence[str] | None = None, evaluator: Sequence[str] | None = None,
              python: str = sys.executable, dry_run: bool = False,
              log: Callable[[str], None] = print) -> list[str]:
    """Runs the points (all, or `names`) here, one after another; returns the failed points'
    names (empty: every point finished and evaluated). dry_run: prints what would run."""
    trainer = list(trainer or default_trainer(python))
    evaluator = list(evaluator or default_evaluator(python))
    env = {**os.environ, **sweep.env}
    points = sweep.select(names)
    plans = []
    for point in points:
        workdir = point_dir(sweep_dir, point)
        config = point.resolved()
        state, final, missing = status(sweep, point, workdir, config)
        plans.append((point, workdir, config, state, final, missing))
    to_train = [p for p, *_, state, _, _ in plans if state == "train"]
    prepares = _prepare_needed(sweep, to_train)
    if dry_run:
        total = sum(s.estimated_s for s in prepares)
        for step in prepares:
            log(f"# prepare {step.name} ({step.workdir}/{step.done} missing; about "
                f"{step.estimated_s:.0f} s)")
            log(shell_line(step.argv(python), step.env))
        for point, workdir, config, state, final, missing in plans:
            c = flops.describe(config)
            log(f"# {point.name}: {state}; N={c['N']:,} D={c['D']:,} C={c['C']:.3e}"
                + (f"; about {point.estimated_s:.0f} s" if state == "train" else ""))
            if state == "train":
                total += point.estimated_s
                log(shell_line(trainer + point.train_args(workdir), sweep.env))
            elif state == "evaluate":
                log(shell_line(evaluator + ["--workdir", workdir, "--step", str(final),
                                            "--only", ",".join(missing)], sweep.env))
        log(f"# {len(to_train)} of {len(plans)} points to train; estimated {total / 60:.0f} min")
        return []
    for step in prepares:
        log(f"prepare {step.name}: {step.workdir}")
        if _run(step.argv(python), {**os.environ, **step.env}, log) != 0:
            log(f"error: prepare {step.name} failed: no point can run without it")
            return [p.name for p in to_train]
        done = os.path.join(step.workdir, step.done)
        if not os.path.exists(done):
            open(done, "w").close()
    failed = []
    for i, (point, workdir, config, state, final, missing) in enumerate(plans, 1):
        head = f"[{i}/{len(plans)}] {point.name}"
        if state == "done":
            log(f"{head}: done (checkpoint {final}, evaluations present): skipped")
            continue
        if state == "train":
            log(f"{head}: training to step {final} in {workdir}")
            if _run(trainer + point.train_args(workdir), env, log) != 0:
                log(f"error: {head}: the trainer failed")
                failed.append(point.name)
                continue
            state, final, missing = status(sweep, point, workdir, config)
            if state == "train":
                log(f"error: {head}: the trainer ended without checkpoint {final}")
                failed.append(point.name)
                continue
        if state == "evaluate":
            log(f"{head}: evaluating {','.join(missing)} at step {final}")
            argv = evaluator + ["--workdir", workdir, "--step", str(final),
                                "--only", ",".join(missing)]
            if _run(argv, env, log) != 0 or status(sweep, point, workdir, config)[0] != "done":
                log(f"error: {head}: evaluation failed")
                failed.append(point.name)
                continue
        log(f"{head}: done")
    return failed


def job_name(sweep: Sweep, point: Point) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", f"{sweep.name}-{point.name}".lower()).strip("-")
    return name if name[:1].isalpha() else f"s-{name}"


def launcher_argv(sweep: Sweep, point: Point, launcher: str, workdir: str,
                  extra: Sequence[str] = (), dry_run: bool = False) -> list[str]:
    """bash launch/SCRIPT [--name] [point options] [sweep options] [extra] [--dry-run] --
    TRAIN_ARGS."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher={launcher!r}; expected one of {list(LAUNCHERS)}")
    argv = ["bash", os.path.join(REPO, "launch", LAUNCHERS[launcher])]
    if launcher in NAMED:
        argv += ["--name", job_name(sweep, point)]
    for options in (point.launch.get(launcher, {}), sweep.launch.get(launcher, {})):
        for key, value in options.items():
            argv += [key, str(value)]
    argv += list(extra)
    if dry_run:
        argv.append("--dry-run")
    return argv + ["--", *point.train_args(workdir)]


def launch_jobs(sweep: Sweep, sweep_dir: str, launcher: str, extra: Sequence[str] = (),
                names: Sequence[str] = (), *, dry_run: bool = False, python: str = sys.executable,
                log: Callable[[str], None] = print) -> list[str]:
    """One job per point through launch/; returns the points whose script failed."""
    env = {**os.environ, "PYTHON": python}
    if launcher == "local_multiprocess":
        env.update(sweep.env)
    failed = []
    for point in sweep.select(names):
        workdir = point_dir(sweep_dir, point)
        if "://" not in workdir and not dry_run and status(sweep, point, workdir)[0] == "done":
            log(f"# {point.name}: done: skipped")
            continue
        argv = launcher_argv(sweep, point, launcher, workdir, extra, dry_run)
        c = flops.describe(point.resolved())
        log(f"# job {point.name}: {point.family} {point.size} {point.budget}"
            f"{' ' + point.ablation if point.ablation else ''}; N={c['N']:,} D={c['D']:,} "
            f"C={c['C']:.3e}; workdir {workdir}")
        if dry_run:
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            for line in out.stdout.splitlines():
                log(line)
            if out.returncode != 0:
                log(f"error: {point.name}: {out.stderr.strip()}")
                failed.append(point.name)
            continue
        if _run(argv, env, log) != 0:
            log(f"error: {point.name}: launch/{LAUNCHERS[launcher]} failed")
            failed.append(point.name)
    return failed
