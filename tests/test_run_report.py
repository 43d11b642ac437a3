"""evaluators/run_report.py: evals/report.md (a row per evaluated step) and
evals/metrics_vs_flops.png (a panel per metric with two or more points), on hand-written
evals/<step>.json files: no model is built or trained."""
import json
import os
import pathlib

import ml_collections
import pytest

from transfusion_jax.core.config import load_config
from transfusion_jax.evaluators import common, run_report
from transfusion_jax.evaluators.common import Scheduled

D, DEPTH, MLP, VOCAB, B, L = 32, 2, 128, 100, 4, 16


def transformer_config():
    return ml_collections.ConfigDict({
        "model": {"dim": D, "depth": DEPTH, "heads": 2, "mlp_dim": MLP, "vocab_size": VOCAB},
        "data": {"batch_size": B, "seq_len": L},
        "autoencoder": {}})


def closed_form_flops_per_step():
    """6 FLOPs per matmul parameter per element (blocks: 4 D^2 + 3 D M; LM head: D V) plus
    attention 12 depth L^2 D per sequence."""
    params = DEPTH * (4 * D * D + 3 * D * MLP) + D * VOCAB
    return 6.0 * params * B * L + 12.0 * DEPTH * B * L * L * D


EVALS = {  # step -> evals/<step>.json
    100: {"shapes/acc": 0.25, "fid/fid": 80.0, "ppl/loss": 3.5},
    200: {"shapes/acc": 0.5, "fid/fid": float("nan"), "ppl/loss": 3.25, "note": "text"},
    300: {"shapes/acc": 0.625, "fid/fid": 41.125},  # no ppl/loss
}


def write_evals(workdir, evals):
    os.makedirs(workdir / "evals", exist_ok=True)
    for step, scores in evals.items():
        with open(workdir / "evals" / f"{step}.json", "w") as f:
            json.dump(scores, f)  # NaN is written as NaN, read back as float("nan")
    os.makedirs(workdir / "evals" / "100" / "shapes", exist_ok=True)  # files of a step: ignored


def table_rows(path):
    lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.startswith("|")]

    def split(line):
        return [cell.strip() for cell in line.strip("|").split("|")]

    return split(lines[0]), lines[1], [split(line) for line in lines[2:]]


def test_table_rows_columns_flops_and_blanks(tmp_path):
    write_evals(tmp_path, EVALS)
    written = run_report.write(str(tmp_path), transformer_config())
    assert written == {"report": str(tmp_path / "evals/report.md"),
                       "plot": str(tmp_path / "evals/metrics_vs_flops.png")}
    header, rule, rows = table_rows(written["report"])
    assert header == ["step", "training FLOPs", "fid/fid", "ppl/loss", "shapes/acc"]
    assert rule == "|---:|---:|---:|---:|---:|"
    per_step = closed_form_flops_per_step()
    assert per_step == 14598144.0  # 6 * 35968 * 64 + 786432
    assert rows == [
        ["100", f"{100 * per_step:.3e}", "80", "3.5", "0.25"],
        ["200", f"{200 * per_step:.3e}", "", "3.25", "0.5"],     # NaN: blank; "note" skipped
        ["300", f"{300 * per_step:.3e}", "41.12", "", "0.625"],  # no ppl/loss: blank
    ]
    assert rows[0][1] == "1.460e+09"
    text = pathlib.Path(written["report"]).read_text()
    assert "flops_per_step" in text and "MFU" in text and "6ND" in text
    assert "metrics_vs_flops.png" in text


def test_plot_panels_and_points(tmp_path):
    write_evals(tmp_path, EVALS)
    per_step = run_report.step_flops(transformer_config())
    assert per_step == closed_form_flops_per_step()
    points = run_report.series(run_report.read_evals(str(tmp_path)), per_step)
    # fid/fid: 100 and 300 (200 is NaN); ppl/loss: 100 and 200; shapes/acc: all three
    assert points == {"fid/fid": ([100 * per_step, 300 * per_step], [80.0, 41.125]),
                      "ppl/loss": ([100 * per_step, 200 * per_step], [3.5, 3.25]),
                      "shapes/acc": ([100 * per_step, 200 * per_step, 300 * per_step],
                                     [0.25, 0.5, 0.625])}
    fig = run_report.figure(points)
    assert [ax.get_title() for ax in fig.axes] == ["fid/fid", "ppl/loss", "shapes/acc"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    assert [len(ax.lines[0].get_xdata()) for ax in fig.axes] == [2, 2, 3]
    run_report.write(str(tmp_path), transformer_config())
    from matplotlib.image import imread
    height, width = imread(tmp_path / "evals/metrics_vs_flops.png").shape[:2]
    assert (width, height) == (900, 240)  # 3 columns x 3.0 in, 1 row x 2.4 in, at 100 dpi


def test_grid_has_at_most_four_columns():
    points = {f"m{i}": ([1.0, 2.0], [0.0, 1.0]) for i in range(6)}
    fig = run_report.figure(points)
    assert len(fig.axes) == 6  # the two unused cells of the 2 x 4 grid are removed
    assert tuple(fig.get_size_inches()) == (12.0, 4.8)


def test_one_step_gives_a_table_and_no_plot(tmp_path):
    write_evals(tmp_path, {100: EVALS[100]})
    (tmp_path / "evals/metrics_vs_flops.png").write_bytes(b"stale")
    written = run_report.write(str(tmp_path), transformer_config())
    assert written == {"report": str(tmp_path / "evals/report.md")}
    assert not (tmp_path / "evals/metrics_vs_flops.png").exists()
    _, _, rows = table_rows(written["report"])
    assert rows == [["100", f"{100 * closed_form_flops_per_step():.3e}", "80", "3.5", "0.25"]]


def test_autoencoder_run_uses_steps(tmp_path):
    config = load_config("experiments/autoencoder.py:kind=vae")
    assert run_report.step_flops(config) is None  # no transformer, no data.seq_len
    write_evals(tmp_path, {1: {"heldout/l1": 0.5}, 2: {"heldout/l1": 0.25}})
    written = run_report.write(str(tmp_path), config)
    header, _, rows = table_rows(written["report"])
    assert header == ["step", "heldout/l1"]
    assert rows == [["1", "0.5"], ["2", "0.25"]]
    assert "x axis is the training step" in pathlib.Path(written["report"]).read_text()
    fig = run_report.figure(run_report.series(run_report.read_evals(str(tmp_path)), None),
                            log_x=False)
    assert fig.axes[0].get_xscale() == "linear"
    assert fig.axes[0].get_xlabel() == "training step"
    assert os.path.exists(written["plot"])


def test_plot_error_is_a_warning(tmp_path, monkeypatch, capsys):
    write_evals(tmp_path, EVALS)

    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    monkeypatch.setattr(run_report, "figure", broken)
    written = run_report.write(str(tmp_path), transformer_config())
    assert written == {"report": str(tmp_path / "evals/report.md")}
    assert "warning: run report" in capsys.readouterr().err


class FakeEvaluator:
    def __init__(self, scores):
        self.scores = scores

    def run(self, variables, out_dir):
        return self.scores


def test_common_run_writes_the_report(tmp_path):
    config = transformer_config()
    for step, score in ((10, 1.5), (20, 1.25)):
        common.run([Scheduled("fake", 10, FakeEvaluator({"loss": score}))], {}, step,
                   str(tmp_path), config)
    header, _, rows = table_rows(tmp_path / "evals/report.md")
    per_step = closed_form_flops_per_step()
    assert header == ["step", "training FLOPs", "fake/loss"]
    assert rows == [["10", f"{10 * per_step:.3e}", "1.5"], ["20", f"{20 * per_step:.3e}", "1.25"]]
    assert (tmp_path / "evals/metrics_vs_flops.png").exists()


def test_common_run_survives_a_failing_report(tmp_path, monkeypatch, capsys):
    def broken(workdir, config):
        raise OSError("disk full")

    monkeypatch.setattr(run_report, "write", broken)
    results = common.run([Scheduled("fake", 0, FakeEvaluator({"loss": 2.0}))], {}, 0,
                         str(tmp_path))
    assert results == {"fake/loss": 2.0}
    assert json.loads((tmp_path / "evals/0.json").read_text()) == {"fake/loss": 2.0}
    assert "warning: evals/report.md not written" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("inf"), True, "x", None])
def test_non_finite_and_non_numeric_values_are_skipped(tmp_path, value):
    write_evals(tmp_path, {5: {"a": 1.0, "b": value}})
    assert run_report.read_evals(str(tmp_path)) == {5: {"a": 1.0}}
