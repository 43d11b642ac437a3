"""train_autoencoder end to end on the tiny preset: two VQ steps with the discriminator on (its
delayed start is tested in test_autoencoder_losses; one compiled step keeps this test short),
the files a run leaves (metrics, reconstruction grid, checkpoint), and the evaluation's figures."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from transfusion_jax import train_autoencoder
from transfusion_jax.config import load_config
from transfusion_jax.model.autoencoder import Autoencoder


def test_tiny_vq_run(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=vq")
    config.total_steps, config.eval_every, config.loss.gan_start_step = 2, 2, 0
    with pytest.warns(UserWarning, match="LPIPS perceptual loss is off"):
        results = train_autoencoder.train(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["codebook"] > 0 and "gan_d" in r for r in steps)
    evals = [r for r in records if "heldout_psnr" in r]
    assert len(evals) == 1 and evals[0] == {**results, "step": 2}
    assert 0 < results["codes_used"] <= 1 and results["codes_seen"] == 8 * 8 * 8
    grid = np.asarray(Image.open(tmp_path / "recon_2.png"))
    assert grid.shape == (2 * 16, 8 * 16, 3)
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    assert not os.path.exists(tmp_path / "latent_stats.json")  # the VAE's only
    # The checkpoint loads back frozen and reconstructs the held-out images as in training.
    loaded_config, variables, stats = train_autoencoder.load_frozen(str(tmp_path))
    assert stats is None and loaded_config.model.kind == "vq"
    evaluate = train_autoencoder.make_eval(Autoencoder(loaded_config.model))
    heldout = train_autoencoder.scene_batch(config.seed, "heldout", 0, 8, 16)
    again, _ = train_autoencoder.evaluate_heldout(loaded_config, evaluate, variables, heldout)
    assert again["heldout_psnr"] == pytest.approx(results["heldout_psnr"], abs=1e-4)


def test_identity_has_nothing_to_train(tmp_path):
    config = load_config("experiments/autoencoder.py:tiny,kind=identity")
    with pytest.raises(ValueError, match="model.kind: got 'identity'"):
        train_autoencoder.train(config, str(tmp_path))
