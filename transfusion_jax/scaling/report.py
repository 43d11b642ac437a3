"""A sweep's analysis: every point's metrics, the fits, Figure 5 and Table 3.

    records = collect(sweep, sweep_dir)
    analysis = analyse(sweep, records)
    write(sweep, sweep_dir, out_dir)   # scaling.md, scaling.png, points.json in out_dir

A point's record: its family, size, budget, ablation label, N, D and C = 6ND (scaling/flops.py,
from the workdir's config.json when it exists, else from the sweep's definition) and the scalars
of evals/<total_steps>.json, the last step's evaluations. A point without them is listed as
missing and takes no part in the fits.

Fits: per metric and family, the grid points (ablations left out) that pass the metric's
threshold (footnote 16) and are positive (a log axis), fitted log(metric) = a + b log(C)
(scaling/fit.py); intervals with 3 or more points. The parity FLOP ratio as Table 3 computes it.

Outputs (markdown, matplotlib PNG):
  - scaling.png, after Figure 5: one panel per metric, log metric over log FLOPs, both families'
    points (hollow: dropped by the threshold) and fitted lines;
  - scaling.md: the Table 3-style table (each family's largest run, the parity FLOP ratio with
    its interval), the fits (a, b with intervals), the ablations against their base point (which
    way each metric moved, better or worse by the metric's direction), every point's numbers;
  - points.json: the records, for any other plot.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from transfusion_jax.scaling import flops
from transfusion_jax.scaling.fit import (
    Metric,
    Parity,
    PowerLaw,
    fit_power_law,
    keep_point,
    parity_ratio,
)
from transfusion_jax.scaling.runner import point_dir, read_scalars
from transfusion_jax.scaling.sweep import Sweep

FAMILIES = ("transfusion", "chameleon")
COLOURS = {"transfusion": "#1f77b4", "chameleon": "#d62728"}
LABELS = {"transfusion": "Transfusion", "chameleon": "Chameleon"}
MAX_COLUMNS = 3


def _config(point, workdir):
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return point.resolved()


def collect(sweep: Sweep, sweep_dir: str) -> list[dict]:
    """One record per point (see the module docstring)."""
    records = []
    for point in sweep.points:
        workdir = point_dir(sweep_dir, point)
        config = _config(point, workdir)
        count = flops.describe(config)
        final = int(config["total_steps"])
        scalars = read_scalars(workdir, final)
        metrics = {m.key: float(scalars[m.key]) for m in sweep.metrics
                   if isinstance(scalars.get(m.key), (int, float))
                   and not isinstance(scalars.get(m.key), bool)}
        records.append(dict(name=point.name, family=point.family, size=point.size,
                            budget=point.budget, ablation=point.ablation, base=point.base,
                            N=count["N"], D=count["D"], C=count["C"], step=final,
                            evaluated=bool(scalars), metrics=metrics))
    return records


def analyse(sweep: Sweep, records: list[dict]) -> dict:
    """{metric key: {"points": {family: [(C, value, kept, why)]}, "fits": {family: PowerLaw|None},
    "parity": Parity}}."""
    out = {}
    for metric in sweep.metrics:
        points, fits = {}, {}
        for family in FAMILIES:
            rows = []
            for r in records:
                if r["family"] != family or r["ablation"] or metric.key not in r["metrics"]:
                    continue
                value = r["metrics"][metric.key]
                kept, why = keep_point(metric, value)
                rows.append((r["C"], value, kept, why))
            points[family] = sorted(rows)
            kept = [(c, v) for c, v, k, _ in rows if k]
            fits[family] = (fit_power_law(*zip(*kept)) if len({c for c, _ in kept}) >= 2
                            else None)
        chameleon = [(c, v) for c, v, k, _ in points["chameleon"] if k]
        out[metric.key] = dict(points=points, fits=fits,
                               parity=parity_ratio(fits["transfusion"], chameleon,
                                                   metric.direction))
    return out


# ------------------------------------------------------------------------------ markdown

def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def _interval(pair) -> str:
    return f"[{_num(pair[0])}, {_num(pair[1])}]" if pair else "-"


def _row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _largest(points, family):
    kept = [(c, v) for c, v, k, _ in points[family] if k]
    return max(kept)[1] if kept else None


def parity_table(sweep: Sweep, analysis: dict) -> list[str]:
    metrics = sweep.metrics
    lines = [_row(["", *[f"{m.label} ({m.direction} is better)" for m in metrics]]),
             "|---|" + "---:|" * len(metrics)]
    for family in FAMILIES:
        lines.append(_row([f"{LABELS[family]}, largest run",
                           *[_num(_largest(analysis[m.key]["points"], family)) for m in metrics]]))
    parities: list[Parity] = [analysis[m.key]["parity"] for m in metrics]
    lines.append(_row(["Parity FLOP ratio", *[_num(p.ratio) if p.ratio is not None
                                              else f"- ({p.note})" for p in parities]]))
    lines.append(_row(["95% interval", *[_interval(p.interval) for p in parities]]))
    return lines


def fits_table(sweep: Sweep, analysis: dict) -> list[str]:
    lines = [_row(["metric", "family", "points (kept / all)", "a", "a 95% interval", "b",
                   "b 95% interval"]), "|---|---|---:|---:|---:|---:|---:|"]
    for m in sweep.metrics:
        for family in FAMILIES:
            rows = analysis[m.key]["points"][family]
            fit: PowerLaw | None = analysis[m.key]["fits"][family]
            kept = sum(1 for *_, k, _ in rows if k)
            lines.append(_row([m.label, LABELS[family], f"{kept} / {len(rows)}",
                               _num(fit.a) if fit else "-",
                               _interval(fit.interval("a")) if fit else "-",
                               _num(fit.b) if fit else "-",
                               _interval(fit.interval("b")) if fit else "-"]))
    return lines


def _moved(metric: Metric, base, value) -> str:
    if base is None or value is None:
        return "-"
    if value == base:
        return f"{_num(base)} -> {_num(value)} (same)"
    better = value < base if metric.direction == "lower" else value > base
    return f"{_num(base)} -> {_num(value)} ({'better' if better else 'worse'})"


def ablation_table(sweep: Sweep, records: list[dict]) -> list[str]:
    by_name = {r["name"]: r for r in records}
    rows = [r for r in records if r["ablation"]]
    if not rows:
        return []
    lines = [_row(["switch", "point", "base", *[m.label for m in sweep.metrics]]),
             "|---|---|---|" + "---|" * len(sweep.metrics)]
    for r in rows:
        base = by_name.get(r["base"], {"metrics": {}})
        lines.append(_row([r["ablation"], r["name"], r["base"],
                           *[_moved(m, base["metrics"].get(m.key), r["metrics"].get(m.key))
                             for m in sweep.metrics]]))
    return lines


def points_table(sweep: Sweep, records: list[dict], analysis: dict) -> list[str]:
    dropped = {(m.key, c, v): why for m in sweep.metrics for fam in FAMILIES
               for c, v, k, why in analysis[m.key]["points"][fam] if not k}
    lines = [_row(["point", "family", "size", "budget", "N", "D", "C = 6ND",
                   *[m.key for m in sweep.metrics]]),
             "|---|---|---|---|---:|---:|---:|" + "---:|" * len(sweep.metrics)]
    for r in records:
        cells = []
        for m in sweep.metrics:
            v = r["metrics"].get(m.key)
            why = dropped.get((m.key, r["C"], v)) if v is not None and not r["ablation"] else None
            cells.append("missing" if v is None
                         else _num(v) + (f" (dropped: {why})" if why else ""))
        lines.append(_row([r["name"], r["family"], r["size"], r["budget"], f"{r['N']:,}",
                           f"{r['D']:,}", f"{r['C']:.3e}", *cells]))
    return lines


def markdown(sweep: Sweep, records: list[dict], analysis: dict, plot: str | None) -> str:
    missing = [r["name"] for r in records if not r["metrics"]]
    parts = [f"# Scaling sweep `{sweep.name}`", "",
             ("FLOPs are the paper's theoretical C = 6ND (footnote 15): N the transformer's "
             "non-embedding parameters, D the elements trained on (text tokens and image "
             "elements as the model sees them). Fits: log(metric) = a + b log(C), least squares; "
             "95% intervals from the fit (t, n - 2) where a family has 3 or more points. "
             "Parity FLOP ratio (Table 3): the FLOPs Transfusion's fit needs to reach the value "
             "of Chameleon's largest run, over that run's FLOPs (below 1: Transfusion needs less)."),
             ""]
    if missing:
        parts += [f"Points without evaluations (left out): {', '.join(missing)}.", ""]
    if plot:
        parts += [f"![scaling]({plot})", ""]
    parts += ["## Parity (Table 3)", "", *parity_table(sweep, analysis), "",
              "## Fits", "", *fits_table(sweep, analysis), ""]
    ablations = ablation_table(sweep, records)
    if ablations:
        parts += ["## Ablations (against the base point)", "", *ablations, ""]
    parts += ["## Points", "", *points_table(sweep, records, analysis), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ plot

def figure(sweep: Sweep, analysis: dict):
    """Figure 5's layout: a log-log panel per metric, both families, points and fitted lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    metrics = sweep.metrics
    columns = min(MAX_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(4.0 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        fig.delaxes(ax)
    for ax, m in zip(axes, metrics):
        result = analysis[m.key]
        every_c = [c for fam in FAMILIES for c, *_ in result["points"][fam]]
        for fam in FAMILIES:
            pts = result["points"][fam]
            kept = [(c, v) for c, v, k, _ in pts if k]
            dropped = [(c, v) for c, v, k, _ in pts if not k and v > 0]
            if kept:
                ax.scatter(*zip(*kept), color=COLOURS[fam], s=18, label=LABELS[fam], zorder=3)
            if dropped:
                ax.scatter(*zip(*dropped), facecolors="none", edgecolors=COLOURS[fam], s=18,
                           zorder=3)
            fit = result["fits"][fam]
            if fit and every_c:
                xs = np.geomspace(min(every_c), max(every_c), 50)
                ax.plot(xs, fit.predict(xs), color=COLOURS[fam], lw=1.2)
        parity = result["parity"]
        title = m.label + (f"\nparity FLOP ratio {parity.ratio:.3g}" if parity.ratio else "")
        ax.set_title(title, fontsize=8)
        if every_c:  # few plain labels: 1, 2, 5 x 10^k on x; 3 significant digits on y
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            if any(v > 0 for fam in FAMILIES for _, v, *_ in result["points"][fam]):
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_xlabel("FLOPs (6ND)", fontsize=7)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write(sweep: Sweep, sweep_dir: str, out_dir: str | None = None) -> dict:
    """Writes scaling.md, scaling.png and points.json into out_dir (default SWEEP_DIR/report);
    returns {"markdown", "plot", "points"} paths (plot None when no metric has a point)."""
    out_dir = out_dir or os.path.join(sweep_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    records = collect(sweep, sweep_dir)
    analysis = analyse(sweep, records)
    plot = None
    if any(analysis[m.key]["points"][f] for m in sweep.metrics for f in FAMILIES):
        plot = os.path.join(out_dir, "scaling.png")
        figure(sweep, analysis).savefig(plot, dpi=120)
    md = os.path.join(out_dir, "scaling.md")
    with open(md, "w") as f:
        f.write(markdown(sweep, records, analysis, os.path.basename(plot) if plot else None))
    pts = os.path.join(out_dir, "points.json")
    with open(pts, "w") as f:
        json.dump(records, f, indent=1)
    return {"markdown": md, "plot": plot, "points": pts}
