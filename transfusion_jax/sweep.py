"""Run, launch or analyse a scaling sweep (entry point; transfusion_jax/scaling/).

    python -m transfusion_jax.sweep --config experiments/scaling.py:micro  # transfusion-sweep
        [--sweep_dir DIR] [--points NAME,NAME] [--dry-run]
        [--launcher local_multiprocess|tpu_pod|gke|slurm [-- LAUNCHER OPTIONS]]
        [--analyze] [--report_dir DIR] [--trainer CMD] [--evaluator CMD]

Without --launcher: runs the points here one after another, each a normal workdir
SWEEP_DIR/POINT (default SWEEP_DIR: the sweep's own, e.g. workdir/scaling/micro), skipping the
finished ones (a re-run after a kill finishes the missing points and redoes none), then writes
the report (SWEEP_DIR/report: scaling.md, scaling.png, points.json). Run it from the repository
root (the micro sweep's autoencoder paths are relative, as the demo's). --dry-run prints each
point's state, its N, D, C and the commands, and the estimated time.

With --launcher: one job per point through launch/ (the options after `--` go to every job);
--dry-run prints each job's commands, nothing is created or submitted.

--analyze: only the report, from whatever the points' workdirs hold.
--trainer/--evaluator: the commands to run instead of `python -m transfusion_jax.train` /
`python -m transfusion_jax.evaluate` (shell words; tests use a fake).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from transfusion_jax.scaling import report, runner
from transfusion_jax.scaling.sweep import load_sweep


def _log(line: str) -> None:
    print(line, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m transfusion_jax.sweep",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiments/scaling.py:paper|micro[,k=v]")
    p.add_argument("--sweep_dir", default="", help="folder of the points' workdirs "
                   "(default: the sweep's sweep_dir)")
    p.add_argument("--points", default="", help="comma-separated point names (default: all)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print what would run; run nothing")
    p.add_argument("--launcher", choices=sorted(runner.LAUNCHERS), default=None,
                   help="one job per point through launch/ instead of running here")
    p.add_argument("--analyze", "--analyse", dest="analyze", action="store_true",
                   help="only write the report")
    p.add_argument("--report_dir", default="", help="where the report goes "
                   "(default: SWEEP_DIR/report)")
    p.add_argument("--trainer", default="", help="trainer command (default: python -m "
                   "transfusion_jax.train)")
    p.add_argument("--evaluator", default="", help="evaluator command (default: python -m "
                   "transfusion_jax.evaluate)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    try:
        sweep = load_sweep(args.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweep_dir = args.sweep_dir or sweep.sweep_dir
    names = [n for n in args.points.split(",") if n]
    try:
        if args.analyze:
            paths = report.write(sweep, sweep_dir, args.report_dir or None)
            _log(f"report: {paths['markdown']}" + (f", {paths['plot']}" if paths["plot"] else ""))
            return 0
        if extra and not args.launcher:
            print("error: options after -- go to a launcher: give --launcher", file=sys.stderr)
            return 2
        if args.launcher:
            failed = runner.launch_jobs(sweep, sweep_dir, args.launcher, extra, names,
                                        dry_run=args.dry_run, log=_log)
        else:
            failed = runner.run_local(sweep, sweep_dir, names,
                                      trainer=shlex.split(args.trainer) or None,
                                      evaluator=shlex.split(args.evaluator) or None,
                                      dry_run=args.dry_run, log=_log)
            if not args.dry_run:
                paths = report.write(sweep, sweep_dir, args.report_dir or None)
                _log(f"report: {paths['markdown']}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
