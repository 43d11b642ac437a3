"""Runs that never lose work: torn metrics, the metrics line before its checkpoint, a resume
with another config, damaged checkpoints set aside (issue 13). In-process runs of the tiny
preset (8 fake CPU devices); each ends in an exact resume or a clear error naming the file or field."""
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from transfusion_jax.core import checkpoint
from transfusion_jax.core.config import load_config
from transfusion_jax.core.metrics import MetricsWriter
from transfusion_jax.inference.loading import load_for_inference
from transfusion_jax.trainers import autoencoder as ae_trainer
from transfusion_jax.trainers import transfusion as trainer

TINY = "experiments/transfusion.py:tiny"


def tiny(**overrides):
    config = load_config(TINY)
    config.checkpoint_every = 2
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


def lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    MetricsWriter(str(tmp_path), total_steps=10, resume_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "metrics.jsonl line 3 is torn" in capsys.readouterr().err


def test_bad_autoencoder_config_is_named_before_anything_is_written(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=vae")
    config.log_every = 0
    with pytest.raises(ValueError, match="log_every=0: expected an integer >= 1"):
        ae_trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A tiny run to step 4 (checkpoints at 2 and 4), recording which metrics lines were on
    disk when each checkpoint was saved."""
    workdir = str(tmp_path_factory.mktemp("run"))
    seen, save = {}, checkpoint.save

    def recording_save(manager, step, *args, **kwargs):
        seen[step] = [r["step"] for r in lines(workdir)]
        return save(manager, step, *args, **kwargs)

    checkpoint.save = recording_save
    try:
        trainer.train(tiny(stop_at_step=4), workdir)
    finally:
        checkpoint.save = save
    return workdir, seen


@pytest.mark.slow
def test_every_checkpointed_step_has_its_metrics_line_first(four_steps):
    workdir, seen = four_steps
    assert seen == {2: [1, 2], 4: [1, 2, 3, 4]}


@pytest.mark.slow
def test_a_resume_with_another_config_is_refused_and_config_json_kept(four_steps, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(four_steps[0], workdir)
    saved = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(ValueError, match=r"model.dim: 64 -> 128; optimizer.lr: 0.001 -> 0.002"):
        trainer.train(tiny(stop_at_step=6, model=dict(dim=128), optimizer=dict(lr=0.002)),
                      workdir)
    with pytest.raises(ValueError, match=r"params.embed has shape \(512, 64\), the config builds "
                                         r"\(512, 128\)"):
        trainer.train(tiny(stop_at_step=6, model=dict(dim=128)), workdir,
                      allow_config_changes=("model.dim",))
    assert open(os.path.join(workdir, "config.json")).read() == saved
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(four_steps,
                                                                              tmp_path):
    """Step 4's parameter files truncated: the resume says so, keeps them aside, resumes from 2
    and trains steps 3-4 again to the same weights and metrics."""
    straight, _ = four_steps
    workdir = str(tmp_path / "run")
    shutil.copytree(straight, workdir)
    shards = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d")
    for name in os.listdir(shards):
        with open(os.path.join(shards, name), "r+b") as f:
            f.truncate(64)
    trainer.train(tiny(stop_at_step=4), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == ["4"]
    assert [r["loss"] for r in lines(workdir)] == [r["loss"] for r in lines(straight)]
    _, resumed = load_for_inference(workdir)
    _, expected = load_for_inference(straight)
    jax.tree.map(np.testing.assert_array_equal, resumed, expected)


@pytest.mark.slow
def test_when_no_checkpoint_reads_the_run_stops_naming_them(four_steps, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(four_steps[0], workdir)
    for step in ("2", "4"):
        with open(os.path.join(workdir, "checkpoints", step, "data", "stream_0-of-1.json"),
                  "w") as f:
            f.write("{not json")
    with pytest.raises(FileNotFoundError, match="no checkpoint in .* could be read; the damaged "
                                                "ones are in .*checkpoints_damaged"):
        trainer.train(tiny(stop_at_step=6), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints_damaged"))) == ["2", "4"]
    assert len(lines(workdir)) == 4  # the metrics of the run are kept


@pytest.mark.parametrize("which", ["transfusion", "autoencoder"])
def test_a_workdir_that_cannot_take_checkpoints_stops_the_run_at_start(tmp_path, which):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(ValueError, match=r"checkpoints cannot take checkpoints .*expected a "
                                         "writable folder"):
        if which == "transfusion":
            trainer.train(tiny(), str(tmp_path))
        else:
            ae_trainer.train(tiny_autoencoder(), str(tmp_path))
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- the autoencoder trainer

def tiny_autoencoder(**fields):
    config = load_config("experiments/autoencoder.py:tiny,kind=vae")
    config.evals.heldout.every = 4
    for key, value in fields.items():
        config[key] = value
    return config


@pytest.mark.slow
def test_a_non_finite_autoencoder_update_is_not_applied_and_stops_the_run(tmp_path,
                                                                         monkeypatch):
    """An optimizer whose update is NaN (loss and gradient finite): the step keeps the old
    state, the loop stops at its next log naming the last checkpoint, which holds no NaN."""
    build = ae_trainer.build

    def poisoned(config):
        model, disc, tx, disc_tx = build(config)
        return model, disc, optax.chain(tx, optax.scale(float("nan"))), disc_tx

    monkeypatch.setattr(ae_trainer, "build", poisoned)
    workdir = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="LPIPS"), pytest.raises(
            FloatingPointError, match=r"not finite in 2 of the steps up to 2 .* Last good "
                                      r"checkpoint: 1 in"):
        ae_trainer.train(tiny_autoencoder(log_every=2, checkpoint_every=1), workdir)
    assert lines(workdir)[-1]["finite"] == 0
    saved = checkpoint.restore_subtrees(workdir, ("params", "opt_state"), step=1)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def test_config_json_holds_absolute_paths_and_a_resume_compares_them(tmp_path, monkeypatch):
    """A relative autoencoder.checkpoint (the demo's) is saved absolute, so generate and evaluate
    read the run from any directory; a resume given the same path, relative or absolute, is the
    same run."""
    config = tiny(autoencoder=dict(checkpoint="runs/ae"), data=dict(tfds_data_dir="gs://b/tfds"))
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    checkpoint.write_config(str(workdir), config)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["autoencoder"]["checkpoint"] == str(tmp_path / "runs" / "ae")
    assert saved["data"]["tfds_data_dir"] == "gs://b/tfds" and saved["data"]["latents_dir"] == ""
    for same in ("runs/ae", str(tmp_path / "runs" / "ae"), "./runs/../runs/ae"):
        config.autoencoder.checkpoint = same
        assert checkpoint.check_resume(str(workdir), config, trainer.RESUME_FREE) == []
    config.autoencoder.checkpoint = "runs/other"
    with pytest.raises(ValueError, match="autoencoder.checkpoint: .*runs/ae' -> .*runs/other'"):
        checkpoint.check_resume(str(workdir), config, trainer.RESUME_FREE)


def test_an_autoencoder_resume_with_another_config_is_refused_unless_allowed(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    checkpoint.write_config(str(workdir), tiny_autoencoder())
    longer = tiny_autoencoder(total_steps=8)
    with pytest.raises(ValueError, match=r"total_steps: 4 -> 8.*--allow_config_changes"):
        checkpoint.check_resume(str(workdir), longer, ae_trainer.RESUME_FREE)
    assert checkpoint.check_resume(str(workdir), longer, ae_trainer.RESUME_FREE,
                                   ("total_steps",)) == ["total_steps"]
    assert checkpoint.check_resume(str(workdir), tiny_autoencoder(log_every=3),
                                   ae_trainer.RESUME_FREE) == []  # free: not listed
