"""A run's evaluations in one place: evals/report.md and evals/metrics_vs_flops.png.

    write(workdir, config)  # after each evaluation (evaluators/common.py: run)

Reads every workdir/evals/<step>.json and writes
  - evals/report.md: one markdown table, a row per evaluated step: the step, the training FLOPs
    spent to reach it, then every scalar metric (sorted by name; blank where a step lacks the
    metric or holds a value that is not a finite number);
  - evals/metrics_vs_flops.png, when at least one metric has two or more evaluated steps: a
    small panel per such metric (at most 4 columns), the metric against training FLOPs (log
    scale), points joined by lines.

Training FLOPs are the analytic count of core/flops.py, flops_per_step(config.model,
data.batch_size, data.seq_len) x step: what the trainer's MFU divides (transformer matmuls at 6
FLOPs per parameter per element, plus the attention products over the full L x L). They are not
the 6ND (6 x non-embedding parameters x tokens) of the paper's scaling plots (footnote 15); a
later issue adds that count. Step 0 (0 FLOPs) has no place on a log axis and is left off the
plot (it stays in the table).

An autoencoder run (config without data.seq_len or a transformer model.dim/depth/mlp_dim/
vocab_size: a convolutional VAE or VQ-VAE, which core/flops.py does not count) gets no FLOPs: the
table has no FLOPs column and the plot's x axis is the training step (linear), named so in the
report and on the axes (an invented FLOPs figure would be worse than none). So does a call
without a config.

Only process 0 writes. Plotting errors come back as a warning line, never raised: the report must
not fail an evaluation (evaluators/common.py also guards the whole call).
"""
from __future__ import annotations

import json
import math
import os
import re

import jax

from transfusion_jax.core import distributed, flops

REPORT = "report.md"
PLOT = "metrics_vs_flops.png"
MAX_COLUMNS = 4
_STEP_FILE = re.compile(r"^(\d+)\.json$")


def read_evals(workdir: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of workdir/evals/<step>.json, finite numbers only (booleans,
    strings, NaN and infinities are left out). A file that is not a JSON object is skipped
    with a warning."""
    folder = os.path.join(workdir, "evals")
    out = {}
    if not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        match = _STEP_FILE.match(name)
        if not match:
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as e:
            distributed.log(f"warning: run report: {folder}/{name} skipped ({e})")
            continue
        out[int(match.group(1))] = {
            key: float(value) for key, value in saved.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}
    return dict(sorted(out.items()))


def step_flops(config) -> float | None:
    """Analytic training FLOPs of one step (core/flops.py, as the trainer's MFU), or None for a
    run whose config names no transformer model and sequence length (an autoencoder run)."""
    try:
        model, data = config["model"], config["data"]
        fields = [model[k] for k in ("dim", "depth", "mlp_dim", "vocab_size")]
        batch, length = data["batch_size"], data["seq_len"]
        if not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (*fields, batch, length)):
            return None
        return flops.flops_per_step(model, batch, length)
    except (KeyError, TypeError, AttributeError):
        return None


def _number(value: float) -> str:
    return f"{value:.4g}"


def _flops(value: float) -> str:
    return f"{value:.3e}"


def table(evals: dict[int, dict[str, float]], per_step: float | None) -> str:
    """The markdown table: step, training FLOPs (when `per_step` is known), then each metric."""
    metrics = sorted({key for scores in evals.values() for key in scores})
    header = ["step"] + (["training FLOPs"] if per_step is not None else []) + metrics
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
             "|" + "---:|" * len(header)]
    for step, scores in evals.items():
        row = [str(step)] + ([_flops(per_step * step)] if per_step is not None else [])
        row += [_number(scores[key]) if key in scores else "" for key in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def series(evals: dict[int, dict[str, float]], per_step: float | None
           ) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (xs, ys)} of the metrics with at least two points: x is training FLOPs (points
    at 0 FLOPs left off: the axis is logarithmic) or, without `per_step`, the step."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for step, scores in evals.items():
        x = per_step * step if per_step is not None else float(step)
        if per_step is not None and x <= 0:
            continue
        for key, value in scores.items():
            xs, ys = out.setdefault(key, ([], []))
            xs.append(x)
            ys.append(value)
    return {key: xy for key, xy in sorted(out.items()) if len(xy[0]) >= 2}


def figure(points: dict[str, tuple[list[float], list[float]]], log_x: bool = True):
    """A matplotlib Figure (object API, no pyplot) with one panel per metric of `points`, or
    None when there is none."""
    if not points:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    columns = min(MAX_COLUMNS, len(points))
    rows = math.ceil(len(points) / columns)
    fig = Figure(figsize=(3.0 * columns, 2.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(points):]:
        fig.delaxes(ax)
    for ax, (key, (xs, ys)) in zip(axes, points.items()):
        ax.plot(xs, ys, marker="o", markersize=3, lw=1.2, color="#08519c")
        ax.set_title(key, fontsize=8)
        if log_x:  # few labels: 1, 2, 5 x 10^k, or 3 plain ticks within a decade
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3) if max(xs) < 10 * min(xs)
                                       else LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training FLOPs" if log_x else "training step", fontsize=7)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _header(workdir: str, per_step: float | None, config) -> str:
    title = f"# Evaluations: {os.path.basename(os.path.normpath(workdir))}\n\n"
    if per_step is not None:
        return title + (
            f"Training FLOPs: the analytic count of core/flops.py, flops_per_step(model, "
            f"batch_size={config['data']['batch_size']}, seq_len={config['data']['seq_len']}) "
            f"= {_flops(per_step)} per step, times the step; the count the trainer's MFU "
            "divides (transformer matmuls at 6 FLOPs per parameter per element plus attention "
            "over the full sequence). Not the 6ND of the paper's scaling plots (footnote 15), "
            "which a later issue adds.\n\n")
    why = ("no config was given" if config is None else
           "the run has no transformer model or data.seq_len (an autoencoder run): "
           "core/flops.py does not count its FLOPs")
    return title + f"No training FLOPs: {why}; the plot's x axis is the training step.\n\n"


def write(workdir: str, config) -> dict[str, str]:
    """Writes workdir/evals/report.md and, when a metric has two or more points,
    workdir/evals/metrics_vs_flops.png (a stale one is removed otherwise) -> {"report": path,
    "plot": path} of what was written. Process 0 only; others return {}."""
    if jax.process_index() != 0:
        return {}
    evals = read_evals(workdir)
    folder = os.path.join(workdir, "evals")
    os.makedirs(folder, exist_ok=True)
    per_step = step_flops(config) if config is not None else None
    report, plot = os.path.join(folder, REPORT), os.path.join(folder, PLOT)
    written = {}
    points = series(evals, per_step)
    plot_note = ""
    try:
        fig = figure(points, log_x=per_step is not None)
        if fig is None:
            if os.path.exists(plot):
                os.remove(plot)
        else:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(fig)
            fig.savefig(plot, dpi=100)
            written["plot"] = plot
            skipped = (" (step 0 is left off: the FLOPs axis is logarithmic)"
                       if per_step is not None and 0 in evals else "")
            plot_note = (f"\n![metrics vs training {'FLOPs' if per_step is not None else 'step'}]"
                         f"({PLOT}){skipped}\n")
    except Exception as e:  # noqa: BLE001 - a figure must never fail an evaluation
        distributed.log(f"warning: run report: {plot} not written ({type(e).__name__}: {e})")
    body = (_header(workdir, per_step, config)
            + "A row per evaluated step (evals/<step>.json); blank: the step has no finite "
              "value of that metric.\n\n"
            + table(evals, per_step) + plot_note)
    tmp = report + ".tmp"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, report)
    written["report"] = report
    return written
