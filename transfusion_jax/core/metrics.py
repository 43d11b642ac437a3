"""Where metrics go: metrics.jsonl, TensorBoard event files and a console progress line.

Only process 0 writes. On resume the writer drops jsonl records and TensorBoard events after
the restored step (`purge_step`), so a resumed run's files read as if it had never stopped.
"""
import json
import os
import sys
import time

import jax
from tensorboardX import SummaryWriter

# Fields that measure the machine, not the model: they differ between identical runs.
TIMING_KEYS = ("elements_per_s", "flops_per_s", "mfu", "steps_per_s")


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._start = (time.time(), resume_step)
        if not self.enabled:
            return
        _truncate_jsonl(self.path, resume_step)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict[str, float]):
        if not self.enabled:
            return
        record = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.add_scalars(step, metrics)

    def add_scalars(self, step: int, metrics: dict[str, float]):
        """TensorBoard only: evaluations, whose record is evals/<step>.json (metrics.jsonl keeps
        one line per training step)."""
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.tb.add_scalar(key, _scalar(value), step)

    def progress(self, step: int, metrics: dict[str, float]):
        """One console line: step, fraction, loss terms, throughput and ETA."""
        if not self.enabled:
            return
        t0, s0 = self._start
        rate = (step - s0) / max(time.time() - t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k} {metrics[k]:.4g}" for k in
                         ("loss", "lm_loss", "diffusion_loss", "grad_norm", "lr", "mfu") if k in metrics)
        print(f"step {step}/{self.total_steps} [{100 * step / self.total_steps:3.0f}%] {shown} "
              f"| {rate:.2f} steps/s, ETA {_duration(eta)}", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            self.tb.close()


def _scalar(v):
    v = float(v)
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def _truncate_jsonl(path: str, last_step: int):
    """Keep the records of steps <= last_step (all of them when starting fresh: none exist).
    A torn line (a kill in the middle of a write) is dropped with a warning naming it."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                print(f"warning: {path} line {number} is torn or not a metrics record; dropped: "
                      f"{line.strip()[:80]!r}", file=sys.stderr, flush=True)
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)  # a kill here leaves the old file or the new one, never half of one
