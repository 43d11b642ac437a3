"""Figures for the shapes report: what a user would rather look at than read.

    text_to_image_figure(path, captions, truths, generated, marks)   # caption -> image
    image_to_text_figure(path, images, captions, marks, qa)          # image -> caption, answer
    training_curves(path, workdir, score_keys, current=(step, scores))

Each writes one small PNG (dpi 100) with matplotlib's object API (a `Figure` drawn by Agg,
no pyplot: no global backend or state is touched) and returns its path, or None where there
is nothing to draw. `marks` are shapes_scores.item_marks: objects found, spurious, exact.
"""
from __future__ import annotations

import glob
import json
import os
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

DPI = 100
RIGHT, WRONG = "#1a7f37", "#c62828"
_TEXT = dict(parse_math=False, clip_on=False)  # generated text is shown as it is, no $math$


def _clean(text: str, limit: int) -> str:
    """One line of at most `limit` characters (generated text may hold newlines, run on)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _wrap(text: str, width: int, lines: int) -> str:
    return "\n".join(textwrap.wrap(_clean(text, width * lines), width)[:lines])


def _mark(mark: dict) -> tuple[str, str]:
    """('2/3 objects right, 1 spurious', colour): green only when the object set is exact."""
    words = f"{mark['found']}/{mark['objects']} objects right"
    if mark["spurious"]:
        words += f", {mark['spurious']} spurious"
    return words, RIGHT if mark["exact"] else WRONG


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _show(fig: Figure, rect, image) -> None:
    ax = fig.add_axes(rect)
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()


def text_to_image_figure(path: str, captions, truths, generated, marks, cols: int = 4,
                         limit: int = 16) -> str:
    """A cell per held-out scene (the first `limit`): its true image and the image generated
    from its caption side by side, the caption below, the generated image's parse marked."""
    n = min(len(captions), limit)
    rows = -(-n // cols)
    cell_w, cell_h, img = 2.5, 2.35, 1.15  # inches
    top = 0.45
    fig = Figure(figsize=(cols * cell_w, rows * cell_h + top))
    W, H = fig.get_size_inches()
    fig.text(0.5, 1 - 0.12 / H, "Text to image: held-out caption (below), its true image (left), "
             "the image generated from the caption (right)", ha="center", va="top",
             fontsize=10, **_TEXT)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y_top = c * cell_w, H - top - r * cell_h
        for k, image in enumerate((truths[i], generated[i])):
            _show(fig, [(x0 + 0.08 + k * (img + 0.04)) / W, (y_top - img) / H, img / W, img / H],
                  image)
        words, colour = _mark(marks[i])
        fig.text((x0 + 0.08) / W, (y_top - img - 0.04) / H, words, color=colour, fontsize=7,
                 va="top", weight="bold", **_TEXT)
        fig.text((x0 + 0.08) / W, (y_top - img - 0.2) / H, _wrap(captions[i], 42, 6),
                 fontsize=6.5, va="top", linespacing=1.15, **_TEXT)
    return _save(fig, path)


def image_to_text_figure(path: str, images, captions, marks, qa=None, cols: int = 2,
                         limit: int = 16) -> str:
    """A cell per held-out image (the first `limit`): the image, the caption generated for it
    with its parse marked, and where `qa` gives (question, answer, generated, right) the
    question asked about it, the true and the generated answer."""
    n = min(len(images), limit)
    rows = -(-n // cols)
    cell_w, cell_h, img = 4.9, 1.45, 1.15
    top = 0.45
    fig = Figure(figsize=(cols * cell_w, rows * cell_h + top))
    W, H = fig.get_size_inches()
    fig.text(0.5, 1 - 0.12 / H, "Image to text: held-out image, the caption generated for it "
             "(greedy), and one question about it", ha="center", va="top", fontsize=10, **_TEXT)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y_top = c * cell_w, H - top - r * cell_h
        _show(fig, [(x0 + 0.08) / W, (y_top - img) / H, img / W, img / H], images[i])
        tx = (x0 + img + 0.2) / W
        words, colour = _mark(marks[i])
        fig.text(tx, y_top / H, words, color=colour, fontsize=7, va="top", weight="bold", **_TEXT)
        fig.text(tx, (y_top - 0.16) / H, _wrap(captions[i] or "(nothing)", 62, 4), fontsize=6.5,
                 va="top", linespacing=1.15, **_TEXT)
        if qa is not None:
            question, answer, made, right = qa[i]
            fig.text(tx, (y_top - 0.82) / H, _clean(f"Q: {question}", 70), fontsize=6.5,
                     va="top", **_TEXT)
            fig.text(tx, (y_top - 0.98) / H,
                     _clean(f"A: {made or '(nothing)'}   (true: {answer})", 70),
                     color=RIGHT if right else WRONG, fontsize=6.5, va="top", **_TEXT)
    return _save(fig, path)


def read_metrics(workdir: str, keys=("lm_loss", "diffusion_loss")) -> dict:
    """{key: (steps, values)} from workdir/metrics.jsonl (a resumed run's repeated steps: the
    last line wins); {} without the file."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a stop
                continue
            if "step" in row:
                by_step[int(row["step"])] = row
    steps = sorted(by_step)
    out = {}
    for key in keys:
        pairs = [(s, by_step[s][key]) for s in steps
                 if isinstance(by_step[s].get(key), (int, float))]
        if pairs:
            out[key] = tuple(np.asarray(v, np.float64) for v in zip(*pairs))
    return out


def read_eval_scores(workdir: str, current: tuple[int, dict] | None = None) -> dict:
    """{step: {"<name>/<key>": scalar}} from workdir/evals/<step>.json, with `current` (a step
    and the scalars of an evaluation not written there yet) merged over its step."""
    out = {}
    for path in glob.glob(os.path.join(workdir, "evals", "*.json")):
        name = os.path.basename(path)[:-len(".json")]
        if name.isdigit():
            try:
                with open(path) as f:
                    out[int(name)] = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
    if current is not None:
        step, scores = current
        out[step] = {**out.get(step, {}), **scores}
    return out


def _series(evals: dict, match) -> tuple[list, list]:
    """(steps, values) of the first key that `match` accepts, per step."""
    steps, values = [], []
    for step in sorted(evals):
        for key, value in sorted(evals[step].items()):
            if match(key):
                steps.append(step)
                values.append(value)
                break
    return steps, values


def _smooth(values: np.ndarray) -> np.ndarray:
    k = max(1, len(values) // 40)
    return np.convolve(values, np.ones(k) / k, mode="valid") if k > 1 else values


TRANSFUSION_LOSSES = (("lm_loss", "LM loss (train)"), ("diffusion_loss", "diffusion loss (train)"))
# The Chameleon trainer's split of its one LM loss (objectives.chameleon_loss).
CHAMELEON_LOSSES = (("lm_loss_text", "LM loss, text tokens (train)"),
                    ("lm_loss_image", "LM loss, image tokens (train)"))


def training_curves(path: str, workdir: str, score_keys: dict, gain_suffix: str | None,
                    current: tuple[int, dict] | None = None,
                    losses=TRANSFUSION_LOSSES) -> str | None:
    """Four panels: the two `losses` ((metrics key, title) pairs: Transfusion's LM and
    diffusion loss by default) against steps (workdir/metrics.jsonl), the scores `score_keys`
    ({label: "<name>/<key>"}) and the conditioning gain (the first key ending in `gain_suffix`;
    None: a model without one, the Chameleon baseline) against evaluated steps
    (workdir/evals/<step>.json and `current`). None when the workdir has neither metrics nor
    evaluations."""
    metrics = read_metrics(workdir, tuple(key for key, _ in losses))
    evals = read_eval_scores(workdir, current)
    if not metrics and not evals:
        return None
    fig = Figure(figsize=(10, 6.4))
    axes = fig.subplots(2, 2)
    for ax, (key, title) in zip(axes[0], losses):
        ax.set_title(title, fontsize=10)
        if key not in metrics:
            ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", transform=ax.transAxes)
            continue
        steps, values = metrics[key]
        ax.plot(steps, values, color="#9ecae1", lw=0.8)
        smooth = _smooth(values)
        ax.plot(steps[len(steps) - len(smooth):], smooth, color="#08519c", lw=1.5)
        if np.all(values > 0):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax = axes[1, 0]
    ax.set_title("held-out shapes scores", fontsize=10)
    drawn = False
    for label, key in score_keys.items():
        steps, values = _series(evals, lambda k, key=key: k == key)
        if steps:
            ax.plot(steps, values, marker="o", label=label)
            drawn = True
    if drawn:
        ax.set_ylim(-0.03, 1.05)
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    if gain_suffix is None:
        ax.set_title("conditioning gain: a diffusion model's (Transfusion only)", fontsize=9)
        steps, values = [], []
    else:
        ax.set_title(f"conditioning gain ({gain_suffix.rsplit('/', 1)[-1]}): "
                     "1 - eps MSE right / wrong caption", fontsize=9)
        steps, values = _series(evals, lambda k: k.endswith(gain_suffix))
    if steps:
        ax.plot(steps, values, marker="o", color="#6a3d9a")
        ax.axhline(0.0, color="grey", lw=0.8)
    gain_note = ("no evaluation has the denoising evaluator's gain yet" if gain_suffix
                 else "no diffusion head, no gain")
    for ax, shown, note in ((axes[1, 0], drawn, "no evaluation has these scores yet"),
                            (axes[1, 1], bool(steps), gain_note)):
        if not shown:
            ax.text(0.5, 0.5, note, ha="center", transform=ax.transAxes, fontsize=8)
    last = max([int(v[0][-1]) for v in metrics.values()] + list(evals))
    for ax in axes.flat:
        ax.set_xlim(0, last * 1.03 + 1)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
